"""The erasure-coder conformance test: every backend behind ErasureCoder must pass all of
it, and all backends must write the same parity. The ISA-L variant skips (with the
loader's reason) only when no ISA-L is loadable — neither the copy in the pyeclib wheel
(a dependency on Linux x86-64/aarch64, so it is there after a plain pip install) nor
Debian's libisal2; PHALANX_REQUIRE_ISAL=1 turns that skip into a failure.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import sys
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.checkpoint import _crc, _gf256, _isal
from phalanx.checkpoint import erasure as erasure_mod
from phalanx.checkpoint.erasure import (
    ErasureCoder,
    ErasureError,
    IsalCoder,
    NumpyCoder,
    available_backends,
    isal_unavailable_reason,
    make_coder,
)
from phalanx.errors import PhalanxError

U8 = npt.NDArray[np.uint8]
BACKENDS = ["isal", "numpy"]
SHAPES = [(1, 0), (1, 1), (2, 1), (4, 2), (8, 2), (6, 3)]
LENGTHS = [0, 1, 1001, 64 * 1024]


def _require(backend: str) -> None:
    if backend == "isal":
        why = isal_unavailable_reason()
        if why is not None:
            if os.environ.get("PHALANX_REQUIRE_ISAL") == "1":
                pytest.fail(f"PHALANX_REQUIRE_ISAL=1 but {why}")
            pytest.skip(why)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    _require(name)
    return name


def _random_shards(rng: np.random.Generator, count: int, length: int) -> list[U8]:
    return [rng.integers(0, 256, length, dtype=np.uint8) for _ in range(count)]


def _encode(coder: ErasureCoder, data: list[U8]) -> list[U8]:
    length = data[0].shape[0]
    parity = [np.full(length, 0xA5, np.uint8) for _ in range(coder.m)]  # dirty buffers
    coder.encode(data, parity)
    return data + parity


def _loss_patterns(n: int, m: int) -> Iterator[tuple[int, ...]]:
    for lost in range(m + 1):
        yield from itertools.combinations(range(n), lost)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("k", "m"), SHAPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_every_loss_pattern_restores(backend: str, k: int, m: int, length: int) -> None:
    coder = make_coder(k, m, backend)  # type: ignore[arg-type]
    assert coder.backend == backend and (coder.k, coder.m, coder.n) == (k, m, k + m)
    rng = np.random.default_rng(k * 100 + m * 10 + length)
    shards = _encode(coder, _random_shards(rng, k, length))
    for lost in _loss_patterns(k + m, m):
        present = {i: shards[i] for i in range(k + m) if i not in lost}
        assert coder.missing(present) == lost
        out = {i: np.full(length, 0x5A, np.uint8) for i in lost}
        coder.decode(present, out)
        for i in lost:
            assert np.array_equal(out[i], shards[i]), (lost, i)


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 1), (4, 2), (6, 3)])
def test_fewer_than_k_shards_is_a_typed_error(backend: str, k: int, m: int) -> None:
    coder = make_coder(k, m, backend)  # type: ignore[arg-type]
    shards = _encode(coder, _random_shards(np.random.default_rng(1), k, 64))
    for lost in itertools.combinations(range(k + m), m + 1):
        present = {i: shards[i] for i in range(k + m) if i not in lost}
        with pytest.raises(ErasureError) as exc:
            coder.decode(present, {i: np.empty(64, np.uint8) for i in lost})
        assert exc.value.reason == "too-few-shards"
        assert exc.value.present == frozenset(present)
        assert isinstance(exc.value, PhalanxError)


def test_decode_into_slices_of_one_buffer(backend: str) -> None:
    """Outputs may be views into one caller buffer (no copies), e.g. a restore area."""
    k, m, length = 4, 2, 4096
    coder = make_coder(k, m, backend)  # type: ignore[arg-type]
    shards = _encode(coder, _random_shards(np.random.default_rng(2), k, length))
    area = np.zeros(k * length, np.uint8)
    views = [area[i * length : (i + 1) * length] for i in range(k)]
    views[2][:] = shards[2]
    views[3][:] = shards[3]
    coder.decode({2: views[2], 3: views[3], 4: shards[4], 5: shards[5]}, {0: views[0], 1: views[1]})
    assert np.array_equal(area, np.concatenate(shards[:k]))


def test_unaligned_slices(backend: str) -> None:
    """Shards at odd offsets inside one buffer (no alignment is promised by callers)."""
    k, m, length = 4, 2, 1001
    coder = make_coder(k, m, backend)  # type: ignore[arg-type]
    raw = np.random.default_rng(9).integers(0, 256, 1 + (k + m) * length, dtype=np.uint8)
    shards = [raw[1 + i * length : 1 + (i + 1) * length] for i in range(k + m)]
    want = [s.copy() for s in shards[:k]]
    coder.encode(shards[:k], shards[k:])
    assert _encode(make_coder(k, m, "numpy"), want)[k:][0].tobytes() == shards[k].tobytes()
    for i in (0, 3):
        shards[i][:] = 0
    coder.decode({i: shards[i] for i in (1, 2, 4, 5)}, {0: shards[0], 3: shards[3]})
    assert all(np.array_equal(a, b) for a, b in zip(shards[:k], want, strict=True))


def test_repair_rebuilds_parity_and_data_in_one_call(backend: str) -> None:
    coder = make_coder(6, 3, backend)  # type: ignore[arg-type]
    shards = _encode(coder, _random_shards(np.random.default_rng(3), 6, 777))
    present = {i: shards[i] for i in (0, 2, 3, 5, 6, 8)}
    out = {i: np.empty(777, np.uint8) for i in (1, 4, 7)}  # two data, one parity
    coder.decode(present, out)
    assert all(np.array_equal(out[i], shards[i]) for i in out)
    coder.decode(present, {})  # nothing wanted: a valid no-op


def test_stripes_do_not_change_the_result(backend: str) -> None:
    rng = np.random.default_rng(4)
    data = _random_shards(rng, 4, 64 * 1024 + 3)
    whole = _encode(make_coder(4, 2, backend), data)  # type: ignore[arg-type]
    striped = _encode(make_coder(4, 2, backend, stripe_bytes=4096), data)  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(whole, striped, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 10),
    m=st.integers(0, 4),
    length=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_property_random_round_trip(
    k: int, m: int, length: int, seed: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    originals = _random_shards(rng, k, length)
    backends = available_backends()
    encoded = {b: _encode(make_coder(k, m, b), originals) for b in backends}  # type: ignore[arg-type]
    ref = encoded["numpy"]
    for b in backends:
        assert all(np.array_equal(x, y) for x, y in zip(encoded[b], ref, strict=True)), b
    lost = data.draw(st.lists(st.integers(0, k + m - 1), unique=True, max_size=m))
    for b in backends:  # each backend decodes the other's shards
        other = ref if b != "numpy" else encoded[backends[0]]
        present = {i: other[i] for i in range(k + m) if i not in lost}
        out = {i: np.empty(length, np.uint8) for i in lost}
        make_coder(k, m, b).decode(present, out)  # type: ignore[arg-type]
        assert all(np.array_equal(out[i], originals[i] if i < k else ref[i]) for i in lost)


# ---------------------------------------------------------------------------- cross-backend


@pytest.mark.parametrize(("k", "m"), [*SHAPES, (10, 4), (17, 5), (200, 55)])
def test_backends_write_identical_parity(k: int, m: int) -> None:
    _require("isal")
    data = _random_shards(np.random.default_rng(k + m), k, 999)
    a = _encode(make_coder(k, m, "isal"), data)
    b = _encode(make_coder(k, m, "numpy"), data)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_generator_is_isal_cauchy1() -> None:
    """The format is ISA-L's gf_gen_cauchy1_matrix; pin a few bytes so it cannot drift."""
    g = make_coder(4, 2, "numpy").generator
    assert np.array_equal(g[:4], np.eye(4, dtype=np.uint8))
    for i in range(2):
        for j in range(4):
            assert _gf256.gf_mul(int(g[4 + i, j]), (4 + i) ^ j) == 1
    assert make_coder(1, 1, "numpy").generator.tolist() == [[1], [1]]  # 1+1 mirrors
    with pytest.raises(ValueError):
        g[0, 0] = 7  # read-only


def test_isal_library_agrees_with_our_generator() -> None:
    _require("isal")
    lib, _ = _isal.load()
    assert lib is not None
    for k, m in [(1, 1), (4, 2), (8, 2), (6, 3), (100, 155)]:
        a = np.zeros((k + m, k), np.uint8)
        lib._lib.gf_gen_cauchy1_matrix(a.ctypes.data, k + m, k)
        assert np.array_equal(a, _gf256.generator_matrix(k, m))


def test_gf256_matrix_inverse() -> None:
    rng = np.random.default_rng(6)
    for k, m in [(4, 2), (8, 2), (20, 10)]:
        g = _gf256.generator_matrix(k, m)
        rows = np.sort(rng.choice(k + m, k, replace=False))
        inv = _gf256.mat_inv(g[rows])
        assert np.array_equal(_gf256.mat_mul(inv, g[rows]), np.eye(k, dtype=np.uint8))
    with pytest.raises(ZeroDivisionError):
        _gf256.mat_inv(np.zeros((2, 2), np.uint8))


def test_gf256_multiply_matches_carryless_reference() -> None:
    def slow(a: int, b: int) -> int:
        r = 0
        while b:
            if b & 1:
                r ^= a
            a <<= 1
            if a & 0x100:
                a ^= _gf256.GF_POLY
            b >>= 1
        return r

    for a in range(0, 256, 7):
        for b in range(0, 256, 5):
            assert _gf256.gf_mul(a, b) == slow(a, b)
    assert all(_gf256.gf_mul(a, _gf256.gf_inv(a)) == 1 for a in range(1, 256))


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("k", "m"), [(0, 1), (1, -1), (200, 56), (True, 1)])
def test_bad_parameters(backend: str, k: int, m: int) -> None:
    with pytest.raises(ErasureError) as exc:
        make_coder(k, m, backend)  # type: ignore[arg-type]
    assert exc.value.reason == "bad-params"


def test_bad_shards_are_refused(backend: str) -> None:
    coder = make_coder(2, 1, backend)  # type: ignore[arg-type]
    a, b, p = (np.zeros(8, np.uint8) for _ in range(3))

    def bad(data: list[object], parity: list[object]) -> str:
        with pytest.raises(ErasureError) as exc:
            coder.encode(data, parity)  # type: ignore[arg-type]
        return exc.value.reason

    assert bad([a], [p]) == "bad-shard"  # too few data shards
    assert bad([a, b], []) == "bad-shard"  # too few parity buffers
    assert bad([a, np.zeros(9, np.uint8)], [p]) == "bad-shard"  # unequal lengths
    assert bad([a, np.zeros(8, np.uint16)], [p]) == "bad-shard"  # dtype
    assert bad([a, np.zeros((2, 4), np.uint8)], [p]) == "bad-shard"  # 2-D
    assert bad([a, np.zeros(16, np.uint8)[::2]], [p]) == "bad-shard"  # strided
    assert bad([a, bytearray(8)], [p]) == "bad-shard"  # not an ndarray
    ro = np.zeros(8, np.uint8)
    ro.setflags(write=False)
    assert bad([a, b], [ro]) == "bad-shard"  # read-only output
    assert bad([a, b], [a]) == "bad-shard"  # output aliases input
    big = np.zeros(24, np.uint8)
    assert bad([big[:8], big[8:16]], [big[4:12]]) == "bad-shard"  # overlap


def test_bad_indices_are_refused(backend: str) -> None:
    coder = make_coder(2, 1, backend)  # type: ignore[arg-type]
    s = [np.zeros(8, np.uint8) for _ in range(3)]
    for present, out in [
        ({0: s[0], 3: s[1]}, {1: s[2]}),  # index past k+m-1
        ({0: s[0], -1: s[1]}, {1: s[2]}),
        ({0: s[0], 1: s[1]}, {1: s[2]}),  # present and wanted
    ]:
        with pytest.raises(ErasureError) as exc:
            coder.decode(present, out)
        assert exc.value.reason == "bad-index"


def test_zero_parity_code_is_a_plain_split(backend: str) -> None:
    coder = make_coder(3, 0, backend)  # type: ignore[arg-type]
    data = _random_shards(np.random.default_rng(7), 3, 10)
    coder.encode(data, [])
    coder.decode(dict(enumerate(data)), {})
    with pytest.raises(ErasureError):
        coder.decode({0: data[0], 1: data[1]}, {2: np.empty(10, np.uint8)})


# ---------------------------------------------------------------------------- backend choice


def test_make_coder_choice(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(make_coder(4, 2, "numpy"), NumpyCoder)
    assert "numpy" in available_backends()
    with pytest.raises(ErasureError) as exc:
        make_coder(4, 2, "isal", isal_library="/nonexistent/libisal.so.2")
    assert exc.value.reason == "backend-unavailable"
    assert "/nonexistent/libisal.so.2" in str(exc.value)
    erasure_mod._warned_fallback = False
    with caplog.at_level(logging.WARNING, logger="phalanx.checkpoint.erasure"):
        coder = make_coder(4, 2, "auto", isal_library="/nonexistent/libisal.so.2")
    assert coder.backend == "numpy"
    assert "falls back to numpy" in caplog.text
    with pytest.raises(ErasureError):
        make_coder(4, 2, "gpu")  # type: ignore[arg-type]
    if isal_unavailable_reason() is None:
        auto = make_coder(4, 2)
        assert isinstance(auto, IsalCoder) and auto.detail.startswith("isal ")


#: where pyproject's environment marker installs pyeclib (and with it ISA-L)
PIP_GIVES_ISAL = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")


@pytest.mark.skipif(not PIP_GIVES_ISAL, reason="pyeclib has wheels for Linux x86-64/aarch64 only")
def test_a_plain_pip_install_gives_isal_speed() -> None:
    """The default search takes the ISA-L inside the pyeclib wheel, before any system
    copy: `pip install phalanx` alone must encode at ISA-L speed."""
    copies = _isal.bundled_copies()
    assert copies, "pyeclib (a dependency here) is installed but carries no libisal"
    assert all("pyeclib.libs" in c for c in copies)
    lib, why = _isal.load()
    assert lib is not None, why
    assert lib.path == copies[0]
    coder = make_coder(4, 2)
    assert isinstance(coder, IsalCoder) and "pyeclib.libs" in coder.detail
    token, detail = erasure_mod.backend_summary()
    assert token == f"isal-{lib.version}" and lib.path in detail
    assert erasure_mod.backend_summary("numpy")[0] == "numpy"


@pytest.mark.skipif(not PIP_GIVES_ISAL, reason="pyeclib has wheels for Linux x86-64/aarch64 only")
def test_snapshot_checksums_use_the_isal_that_pip_installed() -> None:
    """The CRC-32 of every shard comes from the same bundled ISA-L (about 3x zlib's
    speed here), not only from a system libisal2, and equals zlib's value."""
    assert _crc.crc32_backend() == f"isal ({_isal.bundled_copies()[0]})"
    rng = np.random.default_rng(3)
    for n in (0, 1, 4095, 4097, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert _crc.crc32(data) == zlib.crc32(data.tobytes())
        assert _crc.crc32(data.tobytes(), 7) == zlib.crc32(data.tobytes(), 7)


@pytest.mark.skipif(not PIP_GIVES_ISAL, reason="pyeclib has wheels for Linux x86-64/aarch64 only")
def test_finding_isal_starts_no_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ctypes.util.find_library`` forks (ldconfig, gcc); a fork beside a daemon's gRPC
    threads aborted it ("epoll_wait error: Bad file descriptor"). With a copy that loads
    by name, the search must not call it."""
    import ctypes.util

    def forbidden(name: str) -> str | None:
        raise AssertionError(f"find_library({name!r}) was called")

    monkeypatch.setattr(ctypes.util, "find_library", forbidden)
    monkeypatch.setattr(_isal, "_cache", {})
    lib, why = _isal.load()
    assert lib is not None, why


def test_every_isal_copy_writes_the_same_parity() -> None:
    """The bundled copy and a system libisal2 (where installed) are interchangeable:
    shards one encodes decode with the other and with numpy (the matrix is the format)."""
    paths = [*_isal.bundled_copies(), *(n for n in _isal.DEFAULT_NAMES)]
    loaded = [p for p in paths if _isal.load(p)[0] is not None]
    if not loaded:
        pytest.skip("no ISA-L copy loads here")
    rng = np.random.default_rng(11)
    data = _random_shards(rng, 4, 70_001)
    want = [np.empty(70_001, np.uint8) for _ in range(2)]
    make_coder(4, 2, "numpy").encode(data, want)
    for path in loaded:
        got = [np.empty(70_001, np.uint8) for _ in range(2)]
        make_coder(4, 2, "isal", isal_library=path).encode(data, got)
        assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)), path


# ---------------------------------------------------------------------------- GIL


def test_isal_encode_does_not_stall_python_threads() -> None:
    """A 64 MiB 4+2 encode in a background thread; the main thread spins in pure Python
    and records the longest gap between its ticks. ≤ 50 ms is a liveness bound (the
    recorded baseline is 0.3 ms), not a timing benchmark."""
    _require("isal")
    k, m, size = 4, 2, 64 << 20
    coder = make_coder(k, m, "isal")
    buf = np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8)
    length = size // k
    data = [buf[i * length : (i + 1) * length] for i in range(k)]
    parity = [np.empty(length, np.uint8) for _ in range(m)]
    coder.encode([d[:4096] for d in data], [p[:4096] for p in parity])  # tables cached
    span: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        coder.encode(data, parity)
        span.extend((t0, time.perf_counter()))

    th = threading.Thread(target=work)
    ticks: list[float] = []
    th.start()
    while th.is_alive():
        ticks.append(time.perf_counter())
    th.join()
    t0, t1 = span
    points = [t0, *(t for t in ticks if t0 <= t <= t1), t1]
    gap = max(b - a for a, b in itertools.pairwise(points))
    assert gap <= 0.050, (
        f"main thread stalled {gap * 1e3:.1f} ms during a {(t1 - t0) * 1e3:.0f} ms encode"
    )

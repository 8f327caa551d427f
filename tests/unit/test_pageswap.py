"""Page swap (comm/pageswap.py) on its own: real mremap on real mappings, no sockets.

What must hold: the array gets the result byte for byte wherever it sits (page
aligned or not, inside a larger buffer whose other bytes are left alone); the pages
are exchanged, not copied (the twin gets the array's old bytes); only private
anonymous memory is ever exchanged (a file, shared memory, a tiny array: refused);
repeated exchanges do not pile up mappings; and a move the kernel refuses still
leaves the array with the result.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from phalanx.comm import pageswap

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pageswap.available(), reason="Linux mremap"
)

MiB = 1 << 20


@pytest.fixture(params=["ioctl", "text"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways of reading the mappings: PROCMAP_QUERY (6.11+) and /proc/self/maps."""
    if request.param == "text":
        monkeypatch.setattr(pageswap, "_can_query", lambda: False)
    elif not pageswap._can_query():
        pytest.skip("this kernel has no PROCMAP_QUERY")
    yield request.param


@pytest.fixture
def arena() -> np.ndarray:
    return pageswap.new_arena(8 * MiB + pageswap.HUGE)


def _placed(offset: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, x): x is ``nbytes`` bytes at ``offset`` into a buffer of sentinels."""
    buf = np.full(nbytes + offset + 3 * pageswap.PAGE, 0xA5, dtype=np.uint8)
    x = buf[offset + pageswap.PAGE : offset + pageswap.PAGE + nbytes]
    return buf, x


@pytest.mark.parametrize("offset", [0, 1, 16, 64, 4095])
def test_the_array_gets_the_result_and_its_neighbours_keep_theirs(
    offset: int, arena: np.ndarray, backend: str
) -> None:
    buf, x = _placed(offset, 5 * MiB + 13)
    x[:] = np.arange(x.size) % 251
    old = x.copy()
    head = x.ctypes.data - buf.ctypes.data
    outside = np.concatenate([buf[:head], buf[head + x.size :]])
    view = x[1000:2000]  # a view taken before sees the result too
    result = pageswap.twin(arena, x)
    result[:] = (np.arange(x.size) * 7) % 241
    want = result.copy()
    assert pageswap.eligible(x)
    assert pageswap.move_into(x, result)
    assert np.array_equal(x, want)
    assert np.array_equal(view, want[1000:2000])
    after = np.concatenate([buf[:head], buf[head + x.size :]])
    assert np.array_equal(after, outside)
    # exchanged, not copied: the twin's whole pages now hold the array's old bytes
    lo, hi = pageswap._interior(x)
    a, b = lo - x.ctypes.data, hi - x.ctypes.data
    assert b - a >= 4 * MiB
    assert np.array_equal(result[a:b], old[a:b])


def test_a_typed_array_and_the_twin_reused_many_times(arena: np.ndarray) -> None:
    x = np.zeros(MiB, dtype=np.float32)  # 4 MiB
    maps_before = Path("/proc/self/maps").read_text().count("\n")
    for i in range(40):
        result = pageswap.twin(arena, x)
        result[:] = np.float32(i) + np.arange(x.size, dtype=np.float32)
        assert pageswap.move_into(x, result)
        assert x[0] == i and x[-1] == i + x.size - 1
    # exchanges may cut a mapping in a few places, but they do not pile up
    assert Path("/proc/self/maps").read_text().count("\n") <= maps_before + 8


def test_only_private_anonymous_memory_is_eligible(tmp_path: Path, backend: str) -> None:
    assert pageswap.eligible(np.zeros(MiB, dtype=np.float32))
    on_disk = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=(MiB,))
    assert not pageswap.eligible(on_disk)
    shared = np.frombuffer(mmap.mmap(-1, 4 * MiB), dtype=np.uint8)  # MAP_SHARED
    assert not pageswap.eligible(shared)
    assert not pageswap.eligible(np.zeros(1000, dtype=np.uint8))  # no whole page inside
    frozen = np.zeros(MiB, dtype=np.float32)
    frozen.flags.writeable = False
    assert not pageswap.eligible(frozen)
    assert not pageswap.eligible(np.zeros((1024, 1024), dtype=np.float32)[:, ::2])


def test_without_a_readable_proc_nothing_is_eligible(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*args: object, **kwargs: object) -> int:
        raise FileNotFoundError(2, "no /proc here")

    monkeypatch.setattr(pageswap, "_can_query", lambda: False)
    monkeypatch.setattr(pageswap, "open", no_proc, raising=False)
    assert not pageswap.eligible(np.zeros(MiB, dtype=np.float32))


def test_an_ineligible_array_gets_the_result_by_copy(tmp_path: Path, arena: np.ndarray) -> None:
    on_disk = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=(MiB,))
    result = pageswap.twin(arena, on_disk)
    result[:] = 3.0
    assert pageswap.move_into(on_disk, result)
    on_disk.flush()
    assert np.array_equal(np.fromfile(tmp_path / "x.bin", dtype=np.float32), result)


@pytest.mark.parametrize(("fail_at", "reusable"), [(1, True), (2, True), (3, False)])
def test_a_move_the_kernel_refuses_still_hands_over_the_result(
    fail_at: int, reusable: bool, arena: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the three moves of an exchange refused once: the array still ends with
    the result; only a refused third move (the array's old pages back into the twin)
    leaves the twin unfit for reuse."""
    x = np.arange(MiB, dtype=np.float32)
    result = pageswap.twin(arena, x)
    result[:] = -np.arange(MiB, dtype=np.float32)
    want = result.copy()
    real = pageswap._move
    calls = {"n": 0}

    def flaky(src: int, dst: int, nbytes: int, flags: int = 0) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(12, "refused by the test")
        real(src, dst, nbytes, flags)

    monkeypatch.setattr(pageswap, "_move", flaky)
    assert pageswap.move_into(x, result) is reusable
    assert np.array_equal(x, want)
    assert calls["n"] >= fail_at


def test_no_room_to_park_the_pages_hands_over_the_result_by_copy(
    arena: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parking reservation refused (ENOMEM: overcommit off, RLIMIT_AS): the partial
    edge pages were copied first and the error escaped, leaving the array a mix of
    result and input behind an untyped OSError. Now it gets the whole result by copy."""
    _buf, x = _placed(16, 2 * MiB + 13)  # not page aligned: partial first and last page
    x[:] = 7
    result = pageswap.twin(arena, x)
    result[:] = np.arange(x.size) % 251
    want = result.copy()

    class NoRoom:
        def __getattr__(self, name: str) -> object:
            return getattr(mmap, name)

        def mmap(self, *args: object, **kwargs: object) -> mmap.mmap:
            raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(pageswap, "mmap", NoRoom())
    assert pageswap.move_into(x, result) is True
    assert np.array_equal(x, want)


def test_a_twin_keeps_the_huge_page_phase(arena: np.ndarray) -> None:
    x = np.zeros(MiB + 3, dtype=np.float32)
    t = pageswap.twin(arena, x)
    assert (t.ctypes.data - x.ctypes.data) % pageswap.HUGE == 0
    with pytest.raises(ValueError, match="too small"):
        pageswap.twin(pageswap.new_arena(MiB), x)


def _unmapped(address: int, nbytes: int) -> bool:
    """Whether any page of [address, address + nbytes) is mapped by nothing: a hole
    another thread's mmap could take (mincore answers ENOMEM for such a range)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = (ctypes.c_ubyte * (nbytes // pageswap.PAGE + 1))()
    if libc.mincore(address, nbytes, vec) == 0:
        return False
    assert ctypes.get_errno() == errno.ENOMEM, os.strerror(ctypes.get_errno())
    return True


def _watch_for_holes(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[tuple[int, int]]]:
    """After every move of an exchange, look at every span any move of it touched
    (clear the second list between exchanges: the parking place goes with each)."""
    real = pageswap._move
    spans: list[tuple[int, int]] = []
    holes: list[str] = []

    def watched(src: int, dst: int, nbytes: int, flags: int = 0) -> None:
        real(src, dst, nbytes, flags)
        spans.extend([(src, nbytes), (dst, nbytes)])
        holes.extend(
            f"move #{len(spans) // 2} left {a:#x}+{n} unmapped" for a, n in spans if _unmapped(a, n)
        )

    monkeypatch.setattr(pageswap, "_move", watched)
    return holes, spans


def test_an_exchange_never_leaves_a_hole_another_thread_could_map(
    arena: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two moves of an exchange, an address in play was mapped by nothing; an
    mmap by another thread in that instant (numpy allocating, a daemon mapping a
    client's region) could land there, and the next move, which maps over its
    destination, wiped it: a mapping gone under the thread that made it. The data
    plane read EFAULT (stop 39's CI, a daemon's link in test_daemon_twin). Every move
    now leaves its source mapped (MREMAP_DONTUNMAP)."""
    x = np.arange(2 * MiB, dtype=np.float32)
    result = pageswap.twin(arena, x)
    result[:] = 5
    holes, spans = _watch_for_holes(monkeypatch)
    assert pageswap.move_into(x, result)
    assert np.all(x == 5)
    assert holes == [] and len(spans) >= 6  # three moves at least
    spans.clear()
    # the daemon's twin regions: shared mappings of two memfds
    n = 64 * pageswap.PAGE
    fds = [os.memfd_create("px-hole-test") for _ in range(2)]
    try:
        for fd in fds:
            os.ftruncate(fd, n)
        a, b = (np.frombuffer(mmap.mmap(fd, n), dtype=np.uint8) for fd in fds)
        a[:], b[:] = 1, 2
        assert pageswap.exchange_shared(a.ctypes.data, b.ctypes.data, n)
        assert np.all(a == 2) and np.all(b == 1)
        assert holes == [] and len(spans) == 6
    finally:
        for fd in fds:
            os.close(fd)

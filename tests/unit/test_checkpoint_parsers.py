"""What snapshot metadata read off the wire may not do: every malformed or lying
generation metadata / manifest is a LayoutError (never OverflowError, RecursionError,
a 2**50-byte buffer or an object array), a generation read under another key is not
offered, and one bad generation never aborts a restore that a good one can serve.
Plus the bounds that keep ISA-L's ``int`` length from overflowing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from phalanx.checkpoint import _isal
from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint.erasure import available_backends, make_coder
from phalanx.checkpoint.generation import GenerationMeta, Geometry
from phalanx.checkpoint.layout import (
    ArraySpec,
    LayoutError,
    Manifest,
    copy_into,
    plan,
    unflatten,
    with_checksums,
)
from phalanx.checkpoint.snapshot import (
    RestoreError,
    SnapshotConfig,
    SnapshotNotFound,
    SnapshotService,
)
from phalanx.checkpoint.store import ShardKey
from phalanx.config import SnapshotSettings
from phalanx.errors import ConfigError
from tests.unit.test_snapshot_service import Cluster, same, state

# --------------------------------------------------------------------------- parsers


def _doc(man: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "v": 1,
        "nbytes": 64,
        "arrays": [[["a"], "numpy", "<f4", [16], 0, 64, 0]],
    }
    manifest.update(man or {})
    doc: dict[str, Any] = {
        "v": 1,
        "owner": "o",
        "generation": 1,
        "step": 1,
        "k": 1,
        "m": 1,
        "shard_bytes": 64,
        "holders": ["a", "b"],
        "crcs": [[0, 0]],
        "manifest": json.dumps(manifest),
    }
    doc.update(kw)
    return doc


def _raw(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _arr(*fields: Any) -> dict[str, Any]:
    return {"arrays": [list(f) for f in fields]}


BAD: dict[str, bytes] = {
    "k=Infinity": _raw(_doc()).replace(b'"k":1', b'"k":Infinity'),
    "step=NaN": _raw(_doc()).replace(b'"step":1', b'"step":NaN'),
    "shard_bytes=1e400": _raw(_doc()).replace(b'"shard_bytes":64', b'"shard_bytes":1e400'),
    "k=2.0": _raw(_doc()).replace(b'"k":1', b'"k":2.0'),
    "deep nesting": b'{"v":1,"owner":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not an object": b"[1,2,3]",
    "m=-1": _raw(_doc(m=-1, holders=[], crcs=[[]])),
    "k=0": _raw(_doc(k=0, holders=["a"], crcs=[[0]])),
    "k+m=300": _raw(_doc(k=200, m=100, holders=[str(i) for i in range(300)], crcs=[[0] * 300])),
    "step<0": _raw(_doc(step=-1)),
    "generation<0": _raw(_doc(generation=-5)),
    "owner empty": _raw(_doc(owner="")),
    "owner not str": _raw(_doc(owner=5)),
    "holder not str": _raw(_doc(holders=["a", 7])),
    "crc out of range": _raw(_doc(crcs=[[0, 2**32]])),
    "shard_bytes 2**50": _raw(_doc(shard_bytes=1 << 50, man={"nbytes": 1 << 50})),
    "shard_bytes not aligned": _raw(_doc(shard_bytes=100)),
    "nbytes 2**50": _raw(
        _doc(man={"nbytes": 1 << 50, **_arr([["a"], "numpy", "|u1", [1 << 50], 0, 1 << 50, 0])})
    ),
    "object dtype": _raw(_doc(man=_arr([["a"], "numpy", "|O", [8], 0, 64, 0]))),
    "ml_dtypes attribute": _raw(_doc(man=_arr([["a"], "numpy", "finfo", [16], 0, 64, 0]))),
    "structured dtype": _raw(_doc(man=_arr([["a"], "numpy", "i4,f4", [8], 0, 64, 0]))),
    "unknown kind": _raw(_doc(man=_arr([["a"], "pickle", "<f4", [16], 0, 64, 0]))),
    "torch dtype unknown": _raw(_doc(man=_arr([["a"], "torch", "torch.nn", [16], 0, 64, 0]))),
    "empty path": _raw(_doc(man=_arr([[], "numpy", "<f4", [16], 0, 64, 0]))),
    "empty path part": _raw(_doc(man=_arr([["a", ""], "numpy", "<f4", [16], 0, 64, 0]))),
    "slash in path": _raw(_doc(man=_arr([["a/b"], "numpy", "<f4", [16], 0, 64, 0]))),
    "path not str": _raw(_doc(man=_arr([[3], "numpy", "<f4", [16], 0, 64, 0]))),
    "path a prefix of another": _raw(
        _doc(
            shard_bytes=128,
            man={
                "nbytes": 128,
                **_arr(
                    [["a"], "numpy", "<f4", [16], 0, 64, 0],
                    [["a", "b"], "numpy", "<f4", [16], 64, 64, 0],
                ),
            },
        )
    ),
    "same path twice": _raw(
        _doc(
            shard_bytes=128,
            man={
                "nbytes": 128,
                **_arr(
                    [["a"], "numpy", "<f4", [16], 0, 64, 0],
                    [["a"], "numpy", "<f4", [16], 64, 64, 0],
                ),
            },
        )
    ),
    "shape does not match nbytes": _raw(_doc(man=_arr([["a"], "numpy", "<f4", [1000], 0, 64, 0]))),
    "torch shape 2**40, nbytes 0": _raw(
        _doc(man=_arr([["a"], "torch", "torch.float32", [1 << 40], 0, 0, 0]))
    ),
    "negative dim": _raw(_doc(man=_arr([["a"], "numpy", "<f4", [-4, -4], 0, 64, 0]))),
    "array field missing": _raw(_doc(man=_arr([["a"], "numpy", "<f4", [16], 0, 64]))),
    "manifest not a str": _raw({**_doc(), "manifest": {"v": 1}}),
}


@pytest.mark.parametrize("label", sorted(BAD))
def test_malformed_generation_metadata_is_a_layout_error(label: str) -> None:
    with pytest.raises(LayoutError):
        GenerationMeta.from_bytes(BAD[label])


def test_a_manifest_may_not_claim_more_than_a_snapshot_holds() -> None:
    n = 1 << 50
    doc = {"v": 1, "nbytes": n, "arrays": [[["a"], "numpy", "|u1", [n], 0, n, 0]]}
    with pytest.raises(LayoutError):
        Manifest.from_bytes(_raw(doc))


def test_what_plan_writes_still_parses_and_restores_exactly() -> None:
    import ml_dtypes
    import torch

    st: dict[str, Any] = {
        "ü": np.arange(3, dtype=np.float32),
        "t": np.array(["2020-01-01"], dtype="datetime64[D]"),
        "s": np.array(["ab"], dtype="U2"),
        "e": np.zeros((0, 3), np.float64),
        "big": np.arange(6, dtype=">i8").reshape(2, 3),
        "bf": np.ones(5, ml_dtypes.bfloat16),
        "nest": {"x": torch.arange(7, dtype=torch.bfloat16), "y": torch.zeros(0, 4)},
    }
    man, src = plan(st)
    buf = np.zeros(man.nbytes, np.uint8)
    copy_into(man, src, buf)
    man = with_checksums(man, buf)
    stripes = Geometry(man.nbytes, 1, 64).stripes
    meta = GenerationMeta("o", 1, 2, 1, 1, 64, ("a", "b"), ((0, 0),) * stripes, man)
    back = GenerationMeta.from_bytes(meta.to_bytes())
    assert back == meta
    out = unflatten(back.manifest, buf)
    assert same(
        {k: v for k, v in out.items() if k != "nest"}, {k: st[k] for k in out if k != "nest"}
    )
    for name, t in st["nest"].items():
        got = out["nest"][name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


# --------------------------------------------------------------------------- restore


def _lying_generation(c: Cluster, owner: str, generation: int) -> None:
    """A peer holding the cluster secret writes ``owner``'s generation: geometry and
    CRCs consistent, only the array's shape does not match its bytes (the reviewer's
    construction)."""
    buf = np.zeros(128, np.uint8)
    man = Manifest((ArraySpec(("w",), "numpy", "<f4", (1000,), 0, 128, crc32(buf)),), 128)
    geo = Geometry(128, 2, 4096)
    pieces = [buf[a:b] for a, b in (geo.piece(0, i) for i in range(2))]
    pieces.append(pieces[0] ^ pieces[1])
    holders = ("p0", "p2", "p3")
    crcs = (tuple(crc32(p) for p in pieces),)
    meta = GenerationMeta(owner, generation, 999, 2, 1, 4096, holders, crcs, man)
    ch = c.hub.channel()
    blob = np.frombuffer(meta.to_bytes(), np.uint8)
    one = np.ones(1, np.uint8)
    for i, h in enumerate(holders):
        ch.put(h, ShardKey(owner, generation, 0, i), pieces[i].copy(), crc32(pieces[i]), timeout=5)
        ch.put(h, ShardKey.meta(owner, generation), blob.copy(), crc32(blob), timeout=5)
        ch.put(h, ShardKey.seal(owner, generation), one.copy(), crc32(one), timeout=5)


def test_a_lying_generation_never_hides_the_valid_ones() -> None:
    c = Cluster(4, 2, 1)
    try:
        c.svcs["p1"].snapshot(state(5), 5).wait(20)
        _lying_generation(c, "px", 10**15)
        owner, step, got = c.svcs["p0"].restore_newest(timeout=10)
        assert (owner, step) == ("p1", 5) and same(got, state(5))
        with pytest.raises(SnapshotNotFound):
            c.svcs["p0"].restore_peer("px", timeout=10)
        assert c.svcs["p0"].restore_peer("p1", timeout=10)[0] == 5
    finally:
        c.close()


def test_metadata_read_under_another_key_is_not_offered() -> None:
    """p1's genuine metadata copied under px's key: restoring px must not return p1's
    state (the metadata names another owner than the key it was read under)."""
    c = Cluster(4, 2, 1)
    try:
        c.svcs["p1"].snapshot(state(5), 5).wait(20)
        ch = c.hub.channel()
        (gen,) = {k.generation for k in c.stores["p0"].keys("p1") + c.stores["p2"].keys("p1")}
        holder = next(h for h in c.ids if ShardKey.meta("p1", gen) in c.stores[h].keys("p1"))
        blob, crc = c.stores[holder].get(ShardKey.meta("p1", gen))
        one = np.ones(1, np.uint8)
        for h in c.ids:
            ch.put(h, ShardKey.meta("px", gen + 1), blob.copy(), crc, timeout=5)
            ch.put(h, ShardKey.seal("px", gen + 1), one.copy(), crc32(one), timeout=5)
        with pytest.raises(SnapshotNotFound):
            c.svcs["p0"].restore_peer("px", timeout=10)
        owner, step, _ = c.svcs["p0"].restore_newest(timeout=10)
        assert (owner, step) == ("p1", 5)
    finally:
        c.close()


def test_any_error_of_one_candidate_moves_on_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(4, 2, 1)
    try:
        c.svcs["p1"].snapshot(state(5), 5).wait(20)
        c.svcs["p2"].snapshot(state(9), 9).wait(20)
        real = SnapshotService._rebuild

        def rebuild(self: SnapshotService, meta: GenerationMeta, *a: Any) -> Any:
            if meta.owner == "p2":
                raise MemoryError("a buffer this large cannot be had")
            return real(self, meta, *a)

        monkeypatch.setattr(SnapshotService, "_rebuild", rebuild)
        owner, step, got = c.svcs["p0"].restore_newest(timeout=10)
        assert (owner, step) == ("p1", 5) and same(got, state(5))
        with pytest.raises(RestoreError, match="MemoryError"):
            c.svcs["p0"].restore_peer("p2", timeout=10)
    finally:
        c.close()


# --------------------------------------------------------------------------- ISA-L length


needs_isal = pytest.mark.skipif("isal" not in available_backends(), reason="no ISA-L here")


@needs_isal
def test_isal_calls_are_chunked_below_its_int_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """ec_encode_data takes an ``int`` length: a piece of 2 GiB or more overflowed it
    and no parity was written. Every call is now at most MAX_LENGTH bytes (made small
    here) whatever ``stripe_bytes`` says, and the result is the numpy engine's."""
    monkeypatch.setattr(_isal, "MAX_LENGTH", 4096)
    lengths: list[int] = []
    real = _isal.IsaL.encode

    def spy(self: _isal.IsaL, length: int, *a: Any) -> None:
        lengths.append(length)
        real(self, length, *a)

    monkeypatch.setattr(_isal.IsaL, "encode", spy)
    k, m, n = 3, 2, 20_000
    ci = make_coder(k, m, "isal", stripe_bytes=1 << 20)
    cn = make_coder(k, m, "numpy")
    rng = np.random.default_rng(3)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    pi = [np.zeros(n, np.uint8) for _ in range(m)]
    pn = [np.zeros(n, np.uint8) for _ in range(m)]
    ci.encode(data, pi)
    cn.encode(data, pn)
    assert all(np.array_equal(a, b) for a, b in zip(pi, pn, strict=True))
    out = {0: np.zeros(n, np.uint8), 2: np.zeros(n, np.uint8)}
    ci.decode({1: data[1], 3: pi[0], 4: pi[1]}, out)
    assert np.array_equal(out[0], data[0]) and np.array_equal(out[2], data[2])
    assert lengths and max(lengths) <= 4096 and sum(lengths) == 2 * n


@needs_isal
def test_isal_refuses_a_length_its_int_cannot_hold() -> None:
    lib, _ = _isal.load()
    assert lib is not None
    rows = np.ones((1, 1), np.uint8)
    a, b = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="length"):
        lib.encode(
            1 << 31,
            1,
            1,
            lib.init_tables(rows),
            _isal.IsaL.pointers([a.ctypes.data]),
            _isal.IsaL.pointers([b.ctypes.data]),
        )


def test_shard_bytes_is_bounded_in_both_configs() -> None:
    with pytest.raises(ValueError, match="shard_bytes"):
        SnapshotConfig(shard_bytes=2 << 30)
    with pytest.raises(ConfigError, match="shard_bytes"):
        SnapshotSettings(shard_bytes=2 << 30)
    assert SnapshotConfig(shard_bytes=1 << 30).shard_bytes == 1 << 30
    assert SnapshotSettings(shard_bytes=1 << 30).shard_bytes == 1 << 30

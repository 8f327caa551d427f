"""State layout: flatten/unflatten round trips, refusals with clear errors, manifests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from phalanx.checkpoint.layout import (
    LayoutError,
    Manifest,
    changes,
    copy_into,
    plan,
    unflatten,
    verify,
    with_checksums,
)


def _roundtrip(state: dict[str, Any]) -> tuple[Manifest, dict[str, Any]]:
    man, src = plan(state)
    buf = np.empty(man.nbytes, np.uint8)
    copy_into(man, src, buf)
    man = with_checksums(man, buf)
    assert verify(man, buf) == []
    man2 = Manifest.from_bytes(man.to_bytes())
    assert man2 == man
    return man2, unflatten(man2, buf)


def test_nested_numpy_roundtrip_is_exact_and_aligned() -> None:
    rng = np.random.default_rng(0)
    state = {
        "model": {"w": rng.random((3, 5), np.float32), "b": np.zeros(0), "i": np.arange(7)},
        "opt": {"step": np.array(5, np.int64), "m": {"x": rng.random(33).astype(np.float16)}},
        "flags": np.array([True, False]),
    }
    man, out = _roundtrip(state)
    assert all(a.offset % 64 == 0 for a in man.arrays)
    assert out["model"]["w"].dtype == np.float32 and out["model"]["w"].shape == (3, 5)
    for path in (("model", "w"), ("model", "b"), ("opt", "m", "x"), ("flags",)):
        a: Any = state
        b: Any = out
        for p in path:
            a, b = a[p], b[p]
        assert isinstance(a, np.ndarray)
        assert np.array_equal(a, b) and a.dtype == b.dtype
    w: Any = out["model"]
    w["w"][0, 0] = 42  # a fresh copy, not a view of the buffer
    orig: Any = state["model"]
    assert orig["w"][0, 0] != 42


def test_bfloat16_and_torch_tensors() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    state = {
        "bf": np.arange(5).astype(ml_dtypes.bfloat16),
        "t": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
        "g": torch.ones(2, requires_grad=True),
        "s": torch.tensor(3.5),
    }
    _, out = _roundtrip(state)
    assert out["bf"].dtype == state["bf"].dtype and np.array_equal(out["bf"], state["bf"])
    assert isinstance(out["t"], torch.Tensor) and out["t"].dtype == torch.bfloat16
    assert torch.equal(out["t"], state["t"]) and torch.equal(out["s"], state["s"])
    assert torch.equal(out["g"], state["g"].detach())


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"a": np.array([object()])}, "object-dtype"),
        ({"a": np.zeros(2, dtype=[("x", "i4")])}, "object-dtype"),
        ({"a": np.ones((4, 4))[:, :2]}, "non-contiguous"),
        ({"a": np.ones((4, 4)).T}, "non-contiguous"),
        ({1: np.ones(2)}, "bad-key"),
        ({"a/b": np.ones(2)}, "bad-key"),
        ({"a": [1, 2]}, "bad-type"),
        ([np.ones(2)], "bad-state"),
    ],
)
def test_refusals_name_the_array(state: Any, reason: str) -> None:
    with pytest.raises(LayoutError) as info:
        plan(state)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_changes_report_shape_dtype_added_removed() -> None:
    a, _ = plan({"w": np.ones(3), "b": np.ones(2), "gone": np.ones(1)})
    b, _ = plan({"w": np.ones(4), "b": np.ones(2, np.float32), "new": np.ones(1)})
    assert changes(None, b) == ()
    assert changes(a, a) == ()
    assert changes(a, b) == ("b", "gone", "new", "w")


def test_corrupt_bytes_fail_verify_and_bad_manifest_is_refused() -> None:
    man, src = plan({"x": np.arange(100)})
    buf = np.empty(man.nbytes, np.uint8)
    copy_into(man, src, buf)
    man = with_checksums(man, buf)
    buf[3] ^= 1
    assert verify(man, buf) == ["x"]
    for bad in (
        b"not json",
        b'{"v": 2}',
        b'{"v":1,"nbytes":8,"arrays":[[["x"],"numpy","<i8",[2],0,16,0]]}',
    ):
        with pytest.raises(LayoutError):
            Manifest.from_bytes(bad)

"""phalanx.torch.treecodec: state dicts in, the very same state dicts out (no sockets)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from phalanx.torch import treecodec  # noqa: E402
from phalanx.torch.errors import StateLayoutError  # noqa: E402


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()))
        if isinstance(a, torch.nn.Parameter):
            assert a.requires_grad == b.requires_grad
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _tree() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the layers' default initialisation
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(5, 3, generator=g)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),  # int keys, tuples, 0-d step tensors, plain values
        "dtypes": {
            str(dt): (torch.randn(2, 3, generator=g) * 10).to(dt)
            for dt in (
                torch.float16,
                torch.bfloat16,
                torch.float64,
                torch.int8,
                torch.int64,
                torch.uint8,
                torch.bool,
                torch.complex64,
            )
        },
        "odd": [torch.empty(0, 5), torch.tensor(3.5), torch.arange(12.0).reshape(3, 4).t()],
        "param": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "plain": {
            1: None,
            (1, "a"): True,
            2.5: "x",
            "big": 2**70,
            "neg": -(2**63),
            "nan": float("nan"),
            "inf": -math.inf,
            "bytes": b"\x00\xff",
            "dtype": torch.float32,
            "size": torch.Size([2, 3]),
            "tuple": (1, [2, (3,)]),
        },
    }


def test_round_trip_is_exact() -> None:
    tree = _tree()
    header, arrays = treecodec.encode(tree)
    assert all(a.dtype == np.uint8 and a.ndim == 1 for a in arrays)
    back = treecodec.decode(header, [a.copy() for a in arrays])
    # a transposed (non-contiguous) tensor comes back contiguous with the same values
    tree["odd"][2] = tree["odd"][2].contiguous()
    _same(tree, back)


def test_pack_unpack_and_canonical_bytes() -> None:
    a, b = _tree(), _tree()
    assert treecodec.pack(a) == treecodec.pack(b)  # equal trees -> equal bytes
    back = treecodec.unpack(treecodec.pack(a))
    a["odd"][2] = a["odd"][2].contiguous()
    _same(a, back)
    b["plain"]["big"] += 1
    assert treecodec.pack(b) != treecodec.pack(_tree())


def test_contiguous_tensors_are_viewed_not_copied() -> None:
    t = torch.arange(10, dtype=torch.float32)
    _, arrays = treecodec.encode({"t": t})
    assert arrays[0].ctypes.data == t.data_ptr()


@pytest.mark.parametrize(
    "bad",
    [object(), {"f": lambda: 1}, {"s": {1, 2}}, {1.5j: 1}, torch.zeros(2).to_sparse()],
)
def test_what_cannot_travel_is_refused(bad: Any) -> None:
    with pytest.raises(StateLayoutError):
        treecodec.encode(bad)


def test_garbage_is_refused() -> None:
    with pytest.raises(StateLayoutError):
        treecodec.unpack(b"XXXX" + bytes(20))
    with pytest.raises(StateLayoutError):
        treecodec.decode(b"not json", [])
    blob = treecodec.pack({"t": torch.ones(100)})
    with pytest.raises(StateLayoutError):
        treecodec.unpack(blob[:-8])

"""Which gradients travel together: the bucket plan of the elastic DDP path.

Pure (no torch): :func:`plan_buckets` takes the parameters (index, dtype name, element
count) in registration order and groups them, **last parameter first** (backward
produces the last layers' gradients first, so the first bucket fills first and its
all-reduce overlaps with the rest of the backward pass), one dtype per bucket, each
bucket up to ``cap_bytes`` (a parameter larger than the cap gets a bucket of its own).
Every member computes the same plan from the same model, so bucket *i* meets bucket
*i* on every member; buckets are launched strictly in plan order.

This module must never allocate memory or import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bucket", "plan_buckets"]

_ITEMSIZE = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8,
    "complex128": 16,
}  # fmt: skip
_ALIGN_BYTES = 64


@dataclass(frozen=True)
class Bucket:
    """One all-reduce: its dtype, its parameters (indices) and their element offsets
    in the bucket's flat buffer, and the buffer's length in elements."""

    index: int
    dtype: str
    params: tuple[int, ...]
    offsets: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


def plan_buckets(params: Sequence[tuple[int, str, int]], cap_bytes: int) -> list[Bucket]:
    """Buckets for ``params`` = ``[(index, dtype, numel), ...]`` in registration order."""
    if cap_bytes <= 0:
        raise ValueError("the bucket cap must be > 0 bytes")
    open_: dict[str, tuple[list[int], list[int], int]] = {}  # dtype -> params, offsets, used
    done: list[tuple[str, list[int], list[int], int]] = []
    for index, dtype, numel in reversed(params):
        if dtype not in _ITEMSIZE:
            raise ValueError(f"parameter {index}: gradients of dtype {dtype} are not supported")
        item = _ITEMSIZE[dtype]
        per = max(1, _ALIGN_BYTES // item)
        ps, offs, used = open_.get(dtype, ([], [], 0))
        start = -(-used // per) * per
        if ps and (start + numel) * item > cap_bytes:
            done.append((dtype, ps, offs, used))
            ps, offs, start = [], [], 0
        ps.append(index)
        offs.append(start)
        open_[dtype] = (ps, offs, start + numel)
    for dtype, (ps, offs, used) in open_.items():
        if ps:
            done.append((dtype, ps, offs, used))
    # the order buckets fill in: by the position of their first (last-registered) param
    pos = {index: i for i, (index, _, _) in enumerate(reversed(params))}
    done.sort(key=lambda b: pos[b[1][0]])
    return [
        Bucket(i, dt, tuple(ps), tuple(offs), max(used, 1))
        for i, (dt, ps, offs, used) in enumerate(done)
    ]

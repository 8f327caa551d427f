"""Averaging a model's buffers (BatchNorm running statistics) over the members.

:class:`BufferSync` reduces every buffer to the **weighted mean** over the
contributors, ``sum_i w_i b_i / sum_i w_i``, with integral weights (examples per
member for elastic DDP; 0/1 for DiLoCo; rank 0 alone for ``buffers="rank0"``), in at
most two lossless all-reduces (``sum``) over shared memory:

* floating buffers in one op of float64 if any buffer is float64, else float32 (the
  statistics are not upcast on the wire);
* integer buffers (``num_batches_tracked``) in one int64 op: ``sum_i w_i k_i`` is exact,
  and equal counters come back equal.

:meth:`reduce` returns the means without touching the buffers; the caller installs them
(:meth:`apply`) only once the step is committed, or writes them to the live buffers at
once when a failed attempt restores those anyway. Both ops must have run among the
contributors of the attempt's opening op, else the reduction does not count.

This module must never vote or decide whether an attempt counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from phalanx.client import Client

__all__ = ["BufferSync"]


class BufferSync:
    """See the module docstring. ``buffers``: the live buffers, in a fixed order."""

    def __init__(self, client: Client, buffers: Sequence[torch.Tensor], *,
                 timeout: float = 30.0) -> None:  # fmt: skip
        self.client = client
        self.timeout = timeout
        self.buffers = list(buffers)
        self.floats = [b for b in self.buffers if b.dtype.is_floating_point]
        self.ints = [b for b in self.buffers if not b.dtype.is_floating_point]
        wide = any(b.dtype == torch.float64 for b in self.floats)
        self.fdtype = np.float64 if wide else np.float32
        nf = sum(b.numel() for b in self.floats)
        ni = sum(b.numel() for b in self.ints)
        self._fop: np.ndarray[Any, Any] | None = None
        self._iop: np.ndarray[Any, Any] | None = None
        try:
            if self.floats:
                self._fop = client.empty((nf + 1,), np.dtype(self.fdtype))
            if self.ints:
                self._iop = client.empty((ni + 1,), "int64")
        except BaseException:
            self.close()  # the first one mapped, the second refused: nothing left mapped
            raise
        self.nbytes = (0 if self._fop is None else self._fop.nbytes) + (
            0 if self._iop is None else self._iop.nbytes)  # fmt: skip

    def reduce(
        self,
        weight: int,
        total: int,
        epoch: int,
        contributors: tuple[str, ...],
        timeout: float | None = None,
    ) -> tuple[str, list[torch.Tensor]]:
        """All-reduce ``weight * buffer``; (why it does not count, or "", the means in
        buffer order). Raises the collectives' errors. ``timeout``: what both ops
        together may take (a caller's deadline: each op gets what is left of it);
        ``None``: the constructor's ``timeout`` for each op."""
        if not self.buffers:
            return "", []
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        results = []
        for op, group in ((self._fop, self.floats), (self._iop, self.ints)):
            if op is None:
                continue
            off = 0
            for b in group:
                n = b.numel()
                src = b.detach().reshape(-1).to("cpu")
                if src.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
                    src = src.to(torch.float32)
                op[off : off + n] = src.numpy().astype(op.dtype) * weight
                off += n
            op[off] = weight
            # one after the other: a failed op leaves nothing queued for the next view
            t = self.timeout if deadline is None else max(0.001, deadline - time.monotonic())
            results.append(self.client.all_reduce(op, "sum", timeout=t))
        for r in results:
            if r.epoch != epoch or r.contributors != contributors:
                return "a buffer op ran in another view", []
        for op in (self._fop, self._iop):
            if op is not None and int(op[-1]) != total:
                return f"buffer weights sum to {op[-1]}, not {total}", []
        means: dict[int, torch.Tensor] = {}
        for op, group in ((self._fop, self.floats), (self._iop, self.ints)):
            if op is None:
                continue
            off = 0
            for b in group:
                n = b.numel()
                seg = op[off : off + n]
                if b.dtype.is_floating_point:
                    m = torch.from_numpy(seg / op.dtype.type(total)).to(b.dtype)
                else:  # exact: equal counters stay equal
                    m = torch.from_numpy(np.floor_divide(seg + total // 2, total)).to(b.dtype)
                means[id(b)] = m.reshape(b.shape)
                off += n
        return "", [means[id(b)] for b in self.buffers]

    def close(self) -> None:
        """Unmap the two op buffers in the daemon (idempotent)."""
        for op in (self._fop, self._iop):
            if op is not None:
                self.client._release(op)
        self._fop = self._iop = None

    @staticmethod
    def apply(targets: Sequence[torch.Tensor], means: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, m in zip(targets, means, strict=True):
                t.copy_(m)

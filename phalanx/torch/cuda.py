"""The CUDA path: device tensors staged through pinned, daemon-shared host memory.

The daemon moves bytes that live in host memory it shares with the training process
(``client.empty``). Device tensors therefore cross twice per use, and this module is
the only place that does it:

* :class:`Mirror` — training state that lives on a GPU (parameters, buffers, optimizer
  state) has a host twin in the shared state arrays: :meth:`Mirror.push` copies every
  device tensor to its twin (before the state is declared with ``update_state``),
  :meth:`Mirror.pull` copies the twins back (after ``begin_step`` received the group's
  state). One synchronisation per call, not per tensor.
* :class:`DeviceBucket` — a gradient bucket whose gradients live on the device: the
  parameters' ``.grad`` are views of one flat device buffer; :meth:`stage_out` copies it
  into the bucket's shared host twin (waiting only for the current stream's work, i.e.
  the backward kernels that produced the gradients), the all-reduce runs on the host
  twin with zero copies, :meth:`stage_in` copies the result back.

Host memory is pinned with ``cudaHostRegister`` (best effort: DMA from pinned pages is
faster, unpinned copies still work). **Written for a GPU host and not exercised on the
project's CPU-only machines** (a separate issue runs it there); nothing outside this
module knows about CUDA streams. This module must never be imported on the CPU path
(the manager imports it only when a tensor is on a device).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["DeviceBucket", "Mirror", "pin"]

log = logging.getLogger(__name__)

_pinned: set[int] = set()


def pin(host: torch.Tensor) -> bool:
    """Page-lock ``host`` (a CPU tensor over shared memory) for fast DMA; True if it is.
    Idempotent per address; failures are logged once and ignored."""
    ptr = host.data_ptr()
    if ptr in _pinned:
        return True
    if not torch.cuda.is_available():
        return False
    nbytes = host.numel() * host.element_size()
    if nbytes == 0:
        return False
    try:
        rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)  # type: ignore[no-untyped-call]
    except Exception as exc:  # pinning is an optimisation only
        log.warning("event=pin_failed bytes=%d error=%r", nbytes, str(exc))
        return False
    ok = int(rc) == 0 if rc is not None else True
    if ok:
        _pinned.add(ptr)
    return ok


class Mirror:
    """Device tensors and their host twins (views into shared state arrays)."""

    def __init__(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        host_buffers: Sequence[torch.Tensor],
    ) -> None:
        self.pairs = [(d, h) for d, h in pairs if d.device.type != "cpu"]
        for buf in host_buffers:
            pin(buf)
        self.devices = sorted({d.device for d, _ in self.pairs}, key=str)

    def _sync(self) -> None:
        for dev in self.devices:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def push(self) -> None:
        """Device -> host twins (blocks until the copies are done)."""
        with torch.no_grad():
            for dev_t, host in self.pairs:
                host.copy_(dev_t, non_blocking=True)
        self._sync()

    def pull(self) -> None:
        """Host twins -> device (blocks until the copies are done)."""
        with torch.no_grad():
            for dev_t, host in self.pairs:
                dev_t.copy_(host, non_blocking=True)
        self._sync()


class DeviceBucket:
    """A gradient bucket on a device with a pinned, daemon-shared host twin."""

    def __init__(self, device: torch.device, numel: int, dtype: torch.dtype, host: torch.Tensor):
        self.device = device
        self.flat = torch.zeros(numel, dtype=dtype, device=device)
        self.host = host
        pin(host)

    def stage_out(self) -> torch.Tensor:
        """Copy the device gradients into the host twin; return the twin (ready)."""
        stream = torch.cuda.current_stream(self.device)
        with torch.no_grad():
            self.host.copy_(self.flat, non_blocking=True)
        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ev.record(stream)
        ev.synchronize()  # only this copy (and the kernels before it) are waited for
        return self.host

    def stage_in(self) -> None:
        """Copy the reduced host twin back to the device buffer."""
        with torch.no_grad():
            self.flat.copy_(self.host, non_blocking=False)

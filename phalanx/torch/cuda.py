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
faster, unpinned copies still work) and unregistered when the tensor that was pinned is
freed (a stale registration over an address range that is later mapped again would make
copies miss the new pages). A failed registration's error is cleared at once: the CUDA
runtime keeps it as its "last error", and torch's next kernel launch check would raise
it as if that kernel had failed. :class:`StagingPool` keeps pinned host twins for the
``torch.distributed`` collectives that run in place on a device tensor. Nothing outside
this module knows about CUDA streams. This module must never be imported on the CPU path
(the manager imports it only when a tensor is on a device).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from phalanx.local import shm

__all__ = ["DeviceBucket", "Mirror", "StagingPool", "pin"]

log = logging.getLogger(__name__)

_pinned: set[int] = set()
_pin_lock = threading.Lock()
_cudart_lib: ctypes.CDLL | None = None


def _clear_last_error() -> None:
    """Reset the CUDA runtime's last error (``cudaGetLastError``) after a failed
    ``cudaHostRegister``; torch's bindings do not expose it, so the runtime torch
    already loaded is looked up by name (never loaded anew)."""
    global _cudart_lib
    if _cudart_lib is None:
        mode = getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
            try:
                _cudart_lib = ctypes.CDLL(name, mode=mode)
                break
            except OSError:
                continue
    if _cudart_lib is not None:
        _cudart_lib.cudaGetLastError()


def _unpin(ptr: int) -> None:
    with _pin_lock:
        if ptr not in _pinned:
            return
        _pinned.discard(ptr)
    shm.unmark_pinned(ptr)
    with contextlib.suppress(Exception):  # the process may be shutting down
        torch.cuda.cudart().cudaHostUnregister(ptr)  # type: ignore[no-untyped-call]


def pin(host: torch.Tensor) -> bool:
    """Page-lock ``host`` (a CPU tensor over shared memory) for fast DMA; True if it is.
    Idempotent per address; unregistered when ``host`` is freed; failures are logged
    and ignored (the copies then go through pageable memory)."""
    ptr = host.data_ptr()
    with _pin_lock:
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
    code = 0 if rc is None else int(rc)
    if code != 0:
        _clear_last_error()
        log.warning("event=pin_failed bytes=%d cuda_error=%d", nbytes, code)
        return False
    with _pin_lock:
        _pinned.add(ptr)
    shm.mark_pinned(ptr, nbytes)  # never exchange these pages (twin regions)
    weakref.finalize(host, _unpin, ptr)
    return True


def unpin(host: torch.Tensor) -> None:
    """Undo :func:`pin` now (before ``host``'s memory is unmapped); idempotent."""
    _unpin(host.data_ptr())


def pinned(host: torch.Tensor) -> bool:
    """Whether ``host``'s memory was page-locked by :func:`pin`."""
    with _pin_lock:
        return host.data_ptr() in _pinned


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


class StagingPool:
    """Pinned, daemon-shared host twins for collectives that run in place on a device
    tensor (``dist.all_reduce``/``broadcast`` of a CUDA tensor): :meth:`out` fills a
    twin from the device tensor (waiting for the kernels that produced it), the op runs
    on the twin with zero copies, :meth:`back` copies the result into the device tensor
    and returns the twin to the pool. Twins are kept per (dtype, element count), so a
    training loop's repeated collectives pin once."""

    def __init__(self, alloc: Callable[[int, torch.dtype], torch.Tensor]) -> None:
        self._alloc = alloc
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def out(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.dtype, t.numel())
        with self._lock:
            free = self._free.get(key)
            host = free.pop() if free else None
        if host is None:
            host = self._alloc(t.numel(), t.dtype)
            pin(host)
        with torch.no_grad():
            host.copy_(t.detach().reshape(-1), non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host

    def back(self, t: torch.Tensor, host: torch.Tensor, *, copy: bool = True) -> None:
        try:
            if copy:
                with torch.no_grad():
                    t.copy_(host.view(t.shape), non_blocking=False)
                torch.cuda.current_stream(t.device).synchronize()
        finally:
            with self._lock:
                self._free.setdefault((host.dtype, host.numel()), []).append(host)

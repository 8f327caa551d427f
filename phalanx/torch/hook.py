"""The DDP communication hook over phalanx, and shared-memory tensors.

The older, static way to use phalanx from ``torch.nn.parallel.DistributedDataParallel``:
DDP keeps its own ``torch.distributed`` group (gloo) for its bookkeeping and the hook
sends the gradients through phalanx. That group dies with a peer; for training that
survives one use :class:`phalanx.torch.Manager` instead (docs/torch.md). Example::

    import phalanx, phalanx.torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    pg = phalanx.connect()                       # or phalanx.start(...)
    torch.distributed.init_process_group("gloo", ...)   # DDP's own bookkeeping only
    model = DDP(net)
    state = phalanx.torch.register_hook(model, pg)      # gradients now go through phalanx
    ...
    state.close()

* :func:`allreduce_hook` is what ``model.register_comm_hook(state, hook)`` accepts: it
  averages the bucket's flattened gradient over the phalanx view (``op="avg"``,
  optional ``codec``) and returns a ``torch.futures.Future`` that completes when the
  daemon is done, so communication overlaps with the rest of the backward pass. DDP
  still needs a ``torch.distributed`` process group for its own bookkeeping (the
  initial parameter broadcast, bucket order): gloo on 127.0.0.1 is enough; no gradient
  goes through it.
* CPU buckets are viewed as numpy without a copy; because DDP allocates bucket memory
  itself, the client moves it to the daemon through one memcpy into shared staging
  memory and one back (tensors from :func:`empty` need none: they live in memory the
  daemon shares, and collectives on them are zero-copy).
* CUDA buckets are staged through a persistent host buffer per bucket, allocated from
  the daemon's shared memory and pinned by :func:`phalanx.torch.cuda.pin` (fast DMA; the
  client then never swaps its pages with a twin region): device to host, all-reduce on
  the host pages (zero-copy), host to device; unpinned and unmapped when the bucket
  changes size and at :meth:`HookState.close`. This path is written
  but **not tested**: the project's machines have no GPU.

The hook averages over the members of the phalanx view the op runs in; with
``retry=False`` (the default) a view change mid-backward fails the future (the backward
raises ``ViewChanged``/``PeerFailure``), because DDP's world is fixed. This module must
never import torch at phalanx import time (it is only imported on request) nor touch
the network: it talks to the daemon through :class:`phalanx.Client`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed

from phalanx.client import Client, Handle, OpResult
from phalanx.errors import ConfigError

__all__ = ["HookState", "allreduce_hook", "empty", "register_hook"]

log = logging.getLogger(__name__)

_STOP = object()


def empty(client: Client, shape: int | tuple[int, ...], dtype: Any = None) -> torch.Tensor:
    """A zero-filled CPU tensor in memory shared with the daemon: collectives on it (and
    on contiguous slices of it) are zero-copy. ``dtype``: a ``torch.dtype`` (default
    float32)."""
    dt = torch.float32 if dtype is None else dtype
    name = str(dt).removeprefix("torch.")
    arr = client.empty(shape, name)
    if dt == torch.bfloat16:
        return torch.from_numpy(arr.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(arr)


class HookState:
    """What :func:`allreduce_hook` needs: the client, the codec, a deadline, and one
    completion thread that settles the futures in the order the buckets were sent.

    ``ops``/``nbytes`` count what went through phalanx; ``last`` is the last
    :class:`~phalanx.client.OpResult`. Call :meth:`close` when training ends."""

    def __init__(
        self,
        client: Client,
        *,
        codec: str = "none",
        timeout: float | None = None,
        retry: bool = False,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ConfigError("timeout must be > 0")
        self.client = client
        self.codec = codec
        self.timeout = timeout
        self.retry = retry
        self.ops = 0
        self.nbytes = 0
        self.last: OpResult | None = None
        self._host: dict[int, torch.Tensor] = {}  # CUDA staging, per bucket index
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _check_open(self) -> None:
        with self._lock:
            if self._closed:
                raise ConfigError("the hook state is closed")

    def _enqueue(self, item: tuple[Handle, torch.futures.Future[torch.Tensor],
                                   torch.Tensor, Callable[[], None] | None]) -> None:  # fmt: skip
        with self._lock:
            if self._closed:
                raise ConfigError("the hook state is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._complete, name="phalanx-ddp-hook", daemon=True
                )
                self._thread.start()
        self._queue.put(item)

    def _complete(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            handle, fut, out, after = item
            try:
                res = handle.wait()  # bounded by the op's deadline
                if after is not None:
                    after()
                self.ops += 1
                self.nbytes += out.numel() * out.element_size()
                self.last = res
                fut.set_result(out)
            except BaseException as exc:
                fut.set_exception(exc)

    def host_buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """The pinned, daemon-shared host buffer of bucket ``index`` (CUDA staging),
        page-locked by :func:`phalanx.torch.cuda.pin`, which tells the client so
        (``shm.mark_pinned``): it never gives such a buffer a twin region, whose page
        exchange would leave the GPU's registration on the old pages. A bucket that
        changed size gets a new buffer; the old one is unpinned and unmapped (its op
        ended: DDP waited for its future before this backward)."""
        buf = self._host.get(index)
        if buf is None or buf.numel() != like.numel() or buf.dtype != like.dtype:
            from phalanx.torch.cuda import pin  # the CUDA path only

            if buf is not None:
                del self._host[index]
                self._drop(buf)
            buf = empty(self.client, (like.numel(),), like.dtype)
            pin(buf)  # best effort: an unpinned buffer still works, through pageable memory
            self._host[index] = buf
        return buf

    def _drop(self, buf: torch.Tensor) -> None:
        """Unpin a staging buffer, then unmap it here and in the daemon."""
        from phalanx.torch.cuda import unpin

        unpin(buf)
        self.client._release(buf.view(torch.uint8).numpy())

    def close(self, timeout: float = 10.0) -> None:
        """Settle what is queued, stop the completion thread, unpin and unmap the
        staging buffers (idempotent). Buffers are kept mapped if an op may still run
        on them (the thread did not stop in ``timeout``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)
            if thread.is_alive():
                log.error("event=hook_thread_not_joined")
                return
        host, self._host = self._host, {}
        for buf in host.values():
            self._drop(buf)


def allreduce_hook(state: HookState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket's gradient over the phalanx view.

    ``bucket`` is a ``torch.distributed.GradBucket`` (typed ``Any``: torch's stubs do
    not export the name)."""
    state._check_open()  # before the op is submitted: never an op nobody waits for
    grad = bucket.buffer()
    if grad.device.type == "cuda":
        host = state.host_buffer(bucket.index(), grad)
        host.copy_(grad.reshape(-1))  # waits for the gradient kernels on this stream
        device = grad.device

        def back() -> None:
            with torch.cuda.device(device):
                grad.copy_(host.view_as(grad))

        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=[device])
        handle = state.client.all_reduce(
            host, "avg", state.codec, async_op=True, retry=state.retry, timeout=state.timeout
        )
        state._enqueue((handle, fut, grad, back))
        return fut
    fut = torch.futures.Future()
    handle = state.client.all_reduce(
        grad, "avg", state.codec, async_op=True, retry=state.retry, timeout=state.timeout
    )
    state._enqueue((handle, fut, grad, None))
    return fut


# DDP's register_comm_hook compares the hook's annotations with the real objects
# (dist.GradBucket, Future[Tensor]); under ``from __future__ import annotations`` they
# are strings, so the objects are put back here.
allreduce_hook.__annotations__ = {
    "state": HookState,
    "bucket": torch.distributed.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[torch.Tensor],
}


def register_hook(
    model: torch.nn.parallel.DistributedDataParallel,
    client: Client,
    *,
    codec: str = "none",
    timeout: float | None = None,
    retry: bool = False,
) -> HookState:
    """``model.register_comm_hook`` with :func:`allreduce_hook` on a new :class:`HookState`."""
    state = HookState(client, codec=codec, timeout=timeout, retry=retry)
    model.register_comm_hook(state, allreduce_hook)
    return state

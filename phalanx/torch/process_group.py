"""``torch.distributed`` over phalanx: a ``ProcessGroup`` and the ``"phalanx"`` backend.

Code written against ``torch.distributed`` (``dist.all_reduce``, ``broadcast``,
``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``barrier``, with
``async_op`` or not) runs over the local phalanx daemon::

    import phalanx, phalanx.torch
    pg = phalanx.connect()
    phalanx.torch.init_process_group(pg)        # registers backend "phalanx" and inits
    dist.all_reduce(t)                          # over the daemon's current view

or ``dist.init_process_group(backend="phalanx", store=dist.HashStore(), rank=0,
world_size=1)`` after :func:`register_backend` (the daemon is found through
``$PHALANX_SOCKET``; ``rank``/``world_size`` are placeholders: the view decides).

**Rank and world size follow the view.** ``dist.get_rank()`` / ``get_world_size()``
(``ProcessGroup.rank()`` / ``size()``) return this member's rank and the size of the
daemon's *current* view (kept up to date by a view-change callback), so they change when
a peer dies or joins; a collective runs over the view current when the daemon executes
it. A collective that a view change interrupts raises phalanx's typed error
(``ViewChanged``, a ``PeerFailure``; ``Work.wait()`` raises it too) unless the group was
made with ``retry=True``, which reruns it in the next view (exact: the input was
restored). Gathers and reduce-scatters are laid out for the world and rank read when
they are called: they are never rerun, and one that ran in any other view than that
(a member left or joined between the call and the op) raises ``ViewChanged`` with the
output untouched, never bytes laid out for another world. The members also agree on
the layout before any byte moves: each op carries its layout's epoch as the client's
``layout_epoch`` tag, part of the op's descriptor, so if a view change lands between
one member's layout and its submit while a peer laid out for the new view, the op
fails on *every* member (``OpMismatch`` naming ``layout``, raised here as
``ViewChanged``) instead of a peer accepting the stale member's chunk in the wrong
slot. Objects that read the rank
or size once (``DistributedSampler``, DDP's reducer) keep what they read: use
:class:`phalanx.torch.Manager` for training that must follow the view. Point-to-point ops, ``gather``, ``scatter``, ``all_to_all`` and
``reduce`` raise ``UnsupportedError``; ops: SUM, AVG, MIN, MAX, PRODUCT. CUDA tensors
are staged through pinned, daemon-shared host memory (:mod:`phalanx.torch.cuda`); the
result is on the device when the work is waited for.

Investigated (torch 2.13): a Python subclass of ``torch.distributed.ProcessGroup``
overriding ``allreduce``/``broadcast``/``allgather``/``all_gather_single``/
``reduce_scatter_single``/``barrier``/``rank``/``size``/``getBackendName`` is called by
``torch.distributed``'s functions, exceptions raised from them keep their class, and
``Backend.register_backend(name, creator, devices=["cpu"])`` makes ``init_process_group``
build it. This module must never hold the GIL while waiting on the daemon beyond the
client's own calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from phalanx.client import Client, Handle, OpResult, ViewInfo
from phalanx.errors import ConfigError, OpMismatch, UnsupportedError, ViewChanged
from phalanx.torch.state import shared_tensor

__all__ = ["ProcessGroup", "init_process_group", "register_backend"]

BACKEND = "phalanx"

_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.PRODUCT: "prod",
}


def _op_name(op: Any) -> str:
    for k, v in _OPS.items():
        if op == k:
            return v
    raise UnsupportedError(f"reduce op {op} is not supported over phalanx")


class _Work(dist._Work):  # type: ignore[misc,name-defined]
    """Collectives in flight; :meth:`wait` raises phalanx's typed errors."""

    def __init__(self, handles: Sequence[Handle], after: Callable[[], None] | None,
                 result: list[torch.Tensor],
                 release: Callable[[], None] | None = None,
                 translate: Callable[[BaseException], BaseException] | None = None,
                 ) -> None:  # fmt: skip
        super().__init__()
        self._handles = list(handles)
        self._after = after
        self._release = release  # on failure instead of after (staging twins back)
        self._translate = translate  # the error a handle's error is raised as
        self._result = result
        self._done = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def _settle(self) -> None:
        with self._lock:
            if self._done:
                return
            try:
                # every handle settled (a failed first one must not leave the others'
                # ops unwaited), then the first error
                errors = []
                for h in self._handles:
                    try:
                        h.wait()
                    except BaseException as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0] if self._translate is None else self._translate(errors[0])
                if self._after is not None:
                    self._after()
            except BaseException as exc:
                self._error = exc
                if self._release is not None:
                    self._release()
            self._done = True

    def wait(self, timeout: timedelta | None = None) -> bool:
        del timeout  # every phalanx op has its own deadline
        self._settle()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._done or all(h.done() for h in self._handles)

    def is_success(self) -> bool:
        self._settle()
        return self._error is None

    def exception(self) -> BaseException | None:
        self._settle()
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._result

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        self._settle()
        if self._error is not None:
            fut.set_exception(self._error)  # type: ignore[arg-type]
        else:
            fut.set_result(self._result)
        return fut


class ProcessGroup(dist.ProcessGroup):
    """A ``torch.distributed`` process group whose collectives run over ``client``'s
    daemon (see the module docstring). ``retry``: rerun an all-reduce, broadcast or
    barrier that a view change interrupted (never a gather or reduce-scatter: their
    layout is the view's); ``timeout``: per collective (default the client's)."""

    def __init__(self, client: Client, *, retry: bool = False,
                 timeout: float | None = None) -> None:  # fmt: skip
        v = client.view()
        super().__init__(v.rank or 0, max(1, v.world))  # type: ignore[call-arg]
        self.client = client
        self.retry = retry
        self.timeout = timeout
        self._view: ViewInfo = v
        self._staging: Any = None  # phalanx.torch.cuda.StagingPool, made at first use
        # shared buffers of gathers and reduce-scatters, per (dtype, elements): a
        # training loop's repeated calls map one each instead of one per call
        self._bufs: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._bufs_lock = threading.Lock()
        client.on_view_change(self._on_view)

    def _take_buf(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self._bufs_lock:
            free = self._bufs.get((dtype, numel))
            if free:
                return free.pop()
        return shared_tensor(self.client, numel, dtype)

    def _on_buf(
        self,
        buf: torch.Tensor,
        submit: Callable[..., Handle],
        copy_out: Callable[[], object],
        result: torch.Tensor,
        layout: ViewInfo,
    ) -> _Work:
        """Run ``submit(buf)`` (a pooled buffer laid out for ``layout``'s world and
        rank, tagged with its epoch; never retried: a rerun would run in another view);
        ``copy_out`` once it succeeded in that very view, then the buffer goes back to
        the pool -- or is unmapped if the op failed. An op that ran in another view, or
        that members laid out for different views (the tags differ), raises
        ``ViewChanged`` and leaves the output untouched."""
        try:
            h = submit(buf, layout_epoch=layout.epoch, **self._kw(retry=False))
        except BaseException:
            self._give_buf(buf, False)
            raise

        def after() -> None:
            _check_layout(h.wait(), layout, self.client.member_id)
            copy_out()
            self._give_buf(buf, True)

        def translate(exc: BaseException) -> BaseException:
            return _layout_disagreed(exc, layout, self._view.epoch)

        return _Work([h], after, [result], lambda: self._give_buf(buf, False), translate)

    def _give_buf(self, buf: torch.Tensor, ok: bool) -> None:
        """Back to the pool after a success; unmapped after a failure (an op given
        up on may still write it: never handed out again)."""
        if ok:
            with self._bufs_lock:
                self._bufs.setdefault((buf.dtype, buf.numel()), []).append(buf)
        else:
            self.client._release(buf.view(torch.uint8).numpy())

    def _on_view(self, v: ViewInfo) -> None:
        self._view = v

    def _refresh(self) -> ViewInfo:
        self._view = self.client.view()
        return self._view

    # -------------------------------------------------------------- identity
    def rank(self) -> int:
        r = self._view.rank
        return -1 if r is None else r

    def size(self) -> int:
        return self._view.world

    def getBackendName(self) -> str:  # torch's name
        return BACKEND

    def name(self) -> str:
        return BACKEND

    # -------------------------------------------------------------- helpers
    def _kw(self, retry: bool | None = None) -> dict[str, Any]:
        """Submit arguments; ``retry``: None for the group's (layout-free ops only)."""
        return {"async_op": True, "retry": self.retry if retry is None else retry,
                "timeout": self.timeout}  # fmt: skip

    @staticmethod
    def _cpu(tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if t.device.type not in ("cpu", "cuda"):
                raise UnsupportedError(
                    f"the phalanx backend takes CPU and CUDA tensors, not {t.device.type}"
                )

    def _staged(
        self, tensors: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Callable[[], None] | None, Callable[[], None] | None]:
        """What the daemon works on in place: CPU tensors themselves, CUDA tensors
        through pinned shared host twins (:class:`phalanx.torch.cuda.StagingPool`),
        copied back by the first callback once the ops are done (the second gives the
        twins back without copying, after a failure)."""
        self._cpu(tensors)
        if all(t.device.type == "cpu" for t in tensors):
            return tensors, None, None
        if self._staging is None:
            from phalanx.torch.cuda import StagingPool

            client = self.client
            self._staging = StagingPool(lambda n, dt: shared_tensor(client, n, dt))
        pool = self._staging
        pairs = [(t, pool.out(t)) for t in tensors if t.device.type != "cpu"]
        hosts = [dict((id(t), h) for t, h in pairs).get(id(t), t) for t in tensors]

        def back() -> None:
            for t, h in pairs:
                pool.back(t, h)

        def release() -> None:
            for t, h in pairs:
                pool.back(t, h, copy=False)

        return hosts, back, release

    # -------------------------------------------------------------- collectives
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> _Work:  # type: ignore[override]
        op = _op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        hosts, back, release = self._staged(tensors)
        hs = [self.client.all_reduce(t, op, **self._kw()) for t in hosts]
        return _Work(hs, back, tensors, release)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> _Work:  # type: ignore[override]
        root = int(opts.rootRank) if opts is not None else 0
        hosts, back, release = self._staged(tensors)
        hs = [self.client.broadcast(t, root, **self._kw()) for t in hosts]
        return _Work(hs, back, tensors, release)

    def barrier(self, opts: Any = None) -> _Work:
        del opts
        return _Work([self.client.barrier(**self._kw())], None, [])

    def _layout(self) -> tuple[ViewInfo, int]:
        """The view a gather/reduce-scatter is laid out for, and this member's rank."""
        v = self._refresh()
        if v.rank is None:
            raise ViewChanged(op="layout", seq=-1, old_epoch=v.epoch, epoch=v.epoch,
                              detail="this member is not in the daemon's view")  # fmt: skip
        return v, v.rank

    def _gather_into(self, out: torch.Tensor, inp: torch.Tensor) -> _Work:
        """all_gather of ``inp`` (one per member, rank order) into flat ``out``."""
        self._cpu([out, inp])
        v, r = self._layout()
        world = v.world
        n = inp.numel()
        if out.numel() != n * world:
            raise ConfigError(f"all_gather output holds {out.numel()} elements; the view "
                              f"has {world} members x {n}")  # fmt: skip
        buf = self._take_buf(n * world, inp.dtype)
        buf[r * n : (r + 1) * n].copy_(inp.reshape(-1))
        return self._on_buf(buf, self.client.all_gather,
                            lambda: out.reshape(-1).copy_(buf), out, v)  # fmt: skip

    def allgather(  # type: ignore[override]
        self,
        output_tensors: list[list[torch.Tensor]],
        input_tensors: list[torch.Tensor],
        opts: Any = None,
    ) -> _Work:
        del opts
        if len(input_tensors) != 1:
            raise UnsupportedError("all_gather takes one input tensor per call over phalanx")
        inp, outs = input_tensors[0], output_tensors[0]
        flat = torch.empty(inp.numel() * len(outs), dtype=inp.dtype)
        work = self._gather_into(flat, inp)
        base_after = work._after
        n = inp.numel()

        def after() -> None:
            if base_after is not None:
                base_after()
            for i, o in enumerate(outs):
                o.copy_(flat[i * n : (i + 1) * n].view_as(o))

        work._after = after
        work._result = outs
        return work

    def _allgather_base(self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None) -> _Work:
        del opts
        return self._gather_into(output, inp)

    def all_gather_single(self, output: torch.Tensor, inp: torch.Tensor,
                          opts: Any = None) -> _Work:  # fmt: skip
        """``dist.all_gather_into_tensor`` / ``all_gather_single`` (torch 2.13)."""
        del opts
        return self._gather_into(output, inp)

    def reduce_scatter_single(self, output: torch.Tensor, inp: torch.Tensor,
                              opts: Any = None) -> _Work:  # fmt: skip
        """``dist.reduce_scatter_tensor`` / ``reduce_scatter_single`` (torch 2.13)."""
        return self._reduce_scatter_base(output, inp, opts)

    def _reduce_scatter_base(self, output: torch.Tensor, inp: torch.Tensor,
                             opts: Any = None) -> _Work:  # fmt: skip
        self._cpu([output, inp])
        op = _op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        v, r = self._layout()
        world = v.world
        n = output.numel()
        if inp.numel() != n * world:
            raise ConfigError(f"reduce_scatter input holds {inp.numel()} elements; the view "
                              f"has {world} members x {n}")  # fmt: skip
        buf = self._take_buf(n * world, inp.dtype)
        buf.copy_(inp.reshape(-1))
        return self._on_buf(
            buf,
            lambda b, **kw: self.client.reduce_scatter(b, op, **kw),
            lambda: output.reshape(-1).copy_(buf[r * n : (r + 1) * n]),
            output,
            v,
        )

    def _unsupported(self, *args: Any, **kwargs: Any) -> _Work:
        raise UnsupportedError("this collective is not available over phalanx (see "
                               "phalanx.torch.process_group)")  # fmt: skip

    send = recv = recv_anysource = gather = scatter = alltoall = alltoall_base = _unsupported
    reduce = allreduce_coalesced = _unsupported


def _layout_disagreed(exc: BaseException, layout: ViewInfo, now: int) -> BaseException:
    """``exc``, or the ``ViewChanged`` it means: an ``OpMismatch`` on ``layout`` says
    the members laid this op out for different views (a view change landed between
    one member's layout and its submit); ``now``: the newest epoch this member knows."""
    if not isinstance(exc, OpMismatch) or "layout" not in exc.fields:
        return exc
    err = ViewChanged(
        op=exc.op, seq=exc.seq, old_epoch=layout.epoch, epoch=max(now, layout.epoch),
        detail=f"laid out for {layout.world} members (rank {layout.rank}, epoch "
        f"{layout.epoch}); members laid this op out for different views, so it ran on "
        f"none: {exc}",
    )  # fmt: skip
    err.__cause__ = exc
    return err


def _check_layout(res: OpResult, layout: ViewInfo, member_id: str) -> None:
    """A gather/reduce-scatter's result counts only if it ran in the view its buffer
    was laid out for (same epoch and world, this member at the same rank)."""
    rank = layout.rank
    if res.contributors and member_id in res.contributors:
        rank = res.contributors.index(member_id)
    if res.epoch != layout.epoch or res.world != layout.world or rank != layout.rank:
        raise ViewChanged(
            op=res.op, seq=res.seq, old_epoch=layout.epoch, epoch=res.epoch,
            detail=f"laid out for {layout.world} members (rank {layout.rank}, epoch "
            f"{layout.epoch}); the op ran among {res.world} (rank {rank}, epoch "
            f"{res.epoch}): its result is not returned",
        )  # fmt: skip


_pending: list[tuple[Client, bool, float | None]] = []
_registered = False
_reg_lock = threading.Lock()


def _create(store: Any, rank: int, size: int, timeout: Any) -> ProcessGroup:
    del store, rank, size, timeout  # phalanx's view decides
    if _pending:
        client, retry, t = _pending.pop()
        return ProcessGroup(client, retry=retry, timeout=t)
    import phalanx

    return ProcessGroup(phalanx.connect())


def register_backend() -> None:
    """Register ``backend="phalanx"`` with ``torch.distributed`` (idempotent)."""
    global _registered
    with _reg_lock:
        if not _registered:
            dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
            _registered = True


def init_process_group(client: Client, *, retry: bool = False,
                       timeout: float | None = None) -> ProcessGroup:  # fmt: skip
    """Make the default ``torch.distributed`` group a phalanx group over ``client``."""
    register_backend()
    _pending.append((client, retry, timeout))
    try:
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group(BACKEND, store=store, rank=0, world_size=1)
    finally:
        _pending.clear()
    pg = dist.distributed_c10d._get_default_group()
    if not isinstance(pg, ProcessGroup):
        raise ConfigError("torch.distributed did not build the phalanx group")
    return pg

"""The phalanx client: what a training loop imports to talk to its local daemon.

Example (a daemon runs beside the training process, or use ``phalanx.start()``)::

    import numpy as np
    import phalanx

    pg = phalanx.connect()                       # or phalanx.start() (embedded mode)
    params = pg.empty((1024,), "float32")        # daemon-shared memory: zero-copy
    params[:] = init()
    pg.attach_state({"params": params}, step=0)  # step=None: receive the group's state
    grads = pg.empty((1024,), "float32")
    while True:
        info = pg.begin_step()                   # maybe a new view; state synced in place
        grads[:] = compute(params, info.step)
        try:
            pg.all_reduce(grads, op="avg", retry=True)
        except phalanx.StepAborted:              # a view change mid-step: redo the step
            continue
        if pg.commit(info.step):                 # the same answer on every member
            params -= 0.1 * grads
            pg.update_state(info.step + 1)
    pg.close()

Every collective works in place on a numpy array or a PyTorch tensor and has a
synchronous form (returns :class:`OpResult`) and ``async_op=True`` (returns a
:class:`Handle`; ``handle.wait()``); all of them are one request, an
:class:`~phalanx.ops.OpSpec` plus where the array lives. Arrays from :meth:`Client.empty` (and tensors over
them, ``torch.from_numpy``) are reduced with **zero copies**: the daemon runs the
collective on those very pages. Any other array is copied into shared staging memory
and back once (the copy back happens only on success: after a failure the array holds
its input, promise 2). CPU tensors are used through ``tensor.numpy()`` (zero-copy when
contiguous); CUDA tensors are staged through host memory (pinned with
``cudaHostRegister`` when available) — that path is written but not tested on the
project's CPU-only machines.

Snapshots (promise 5): :meth:`Client.snapshot` hands a (nested) mapping of arrays to
the daemon's snapshot service and returns a :class:`SnapshotHandle` once the bytes are
in daemon memory; ``handle.wait()`` returns a :class:`SealResult` once the generation
is sealed (erasure-coded and acknowledged by every holder) or raises
``SnapshotAbandoned``. Arrays from :meth:`Client.empty` are copied exactly once, by
the daemon, from the shared pages into its own buffer; any other array is first copied
into a pooled shared staging region (a second memcpy, and the staging memory stays
mapped for reuse). :meth:`Client.restore` (this member, also after the training
process was killed and restarted: the daemon kept the snapshots) and
:meth:`Client.restore_peer` (a gone member's state, rebuilt from its holders) return
``(step, state)`` with the same nesting, dtypes and shapes as numpy arrays (torch
tensors come back as numpy: ``torch.from_numpy`` them), in memory the daemon filled
and this process owns.

Deadlines: every call has one. It travels with the request to the daemon, which ends
the work by then (into the data plane: the op is aborted there, the array restored)
and answers. A client that still has no answer a moment later sends ``CANCEL`` and
touches the memory the request named — a staging copy, or the caller's own array —
only after the daemon acknowledged that the request is over: ``TimeoutError`` then
means "over, and your array holds its input". A daemon that cannot stop it in time is
treated as gone (``DaemonUnavailable``; the staging memory is never reused).

Errors: the promises' typed exceptions (:class:`~phalanx.errors.PeerFailure`,
``ViewChanged``, ``Evicted``, ``StepAborted``, ``CommitUnknown``, ...) reach the caller
as the same classes (:mod:`phalanx.errors`); :class:`~phalanx.errors.DaemonUnavailable`
when the daemon is not there or died (within a second, never a hang).

This module must never touch the network or the data plane itself: it talks only to
the daemon's local API (:mod:`phalanx.local`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from phalanx.errors import (
    ConfigError,
    DaemonUnavailable,
    LayoutError,
    PhalanxError,
    UnsupportedError,
)
from phalanx.local.conn import Connection, NoReply
from phalanx.local.protocol import (
    Attached,
    AttachState,
    BeginStep,
    BufRef,
    Bye,
    CancelState,
    ClientHello,
    Commit,
    Committed,
    GetView,
    Map,
    NamedBuf,
    Op,
    Request,
    Restore,
    RestoreLayout,
    SealResult,
    SealStatus,
    SnapshotArray,
    SnapshotTaken,
    SnapshotWait,
    TakeSnapshot,
    Unmap,
    UpdateState,
    Watch,
    Welcome,
    WireFrame,
    row_of,
)
from phalanx.local.shm import Region, exchange, pinned
from phalanx.ops import Handle, OpResult, OpSpec, StepInfo, ViewInfo, layout_tag

_ALIGN = 64

if TYPE_CHECKING:
    from phalanx.config import PhalanxConfig
    from phalanx.daemon import Daemon
    from phalanx.membership.coordinator import Coordinator

__all__ = [
    "Client",
    "Handle",
    "OpResult",
    "SealResult",
    "SnapshotHandle",
    "StepInfo",
    "ViewInfo",
    "connect",
    "start",
]

log = logging.getLogger(__name__)

#: what the collectives accept: a numpy array or a torch.Tensor
Array = Any

_DEFAULT_OP_TIMEOUT = 120.0
#: all-reduces of this many bytes and more in shared memory go through a twin region
#: (docs/daemon.md); ``PHALANX_TWIN_MIN_BYTES`` overrides it, 0 turns twins off
_TWIN_MIN_BYTES = 4 << 20
_CONTROL_TIMEOUT = 10.0
_GRACE_S = 1.0  # past its deadline, how long a request may take to answer before CANCEL
_ACK_S = 5.0  # how long the daemon has to acknowledge a CANCEL
_MAX_TIMEOUT_S = 86400.0 * 7  # the protocol's bound on a request's timeout


def _check_timeout(t: float) -> float:
    """``t`` if a request may carry it (NaN and negatives too: ConfigError)."""
    if not 0 < t <= _MAX_TIMEOUT_S:
        raise ConfigError(f"timeout must be in (0, {_MAX_TIMEOUT_S:g}] seconds, got {t}")
    return t


_STAGING_KEEP = 4


class SnapshotHandle:
    """A snapshot whose bytes are in daemon memory (:meth:`Client.snapshot`).

    ``stall_s``: the daemon's copy (the one memcpy); ``call_s``: the whole call as the
    caller saw it (staging copy, if any, + round trip + the copy); ``zero_copy``: every
    array came from shared memory (no staging copy); ``changes``: names added, removed
    or reshaped since the previous snapshot. :meth:`wait` returns when the generation
    is sealed."""

    def __init__(self, client: Client, taken: SnapshotTaken, call_s: float, zero_copy: bool):
        self._client = client
        self.generation = taken.generation
        self.step = taken.step
        self.nbytes = taken.nbytes
        self.stall_s = taken.stall_s
        self.changes = taken.changes
        self.call_s = call_s
        self.zero_copy = zero_copy
        self._result: SealResult | None = None
        self._error: BaseException | None = None

    def _poll(self, timeout: float) -> bool:
        if self._result is not None or self._error is not None:
            return True
        req = SnapshotWait(self.generation, timeout)
        try:
            status = self._client._conn.call(req, timeout + _GRACE_S + _ACK_S)
        except (DaemonUnavailable, TimeoutError):
            raise
        except Exception as exc:  # SnapshotAbandoned and friends: final
            self._error = exc
            return True
        assert isinstance(status, SealStatus)
        if status.seal is None:
            return False
        self._result = status.seal
        return True

    def done(self) -> bool:
        """True once the generation sealed or was abandoned (one quick round trip)."""
        return self._poll(0.0)

    def wait(self, timeout: float | None = None) -> SealResult:
        """Block until sealed (at most ``timeout``, default the daemon's seal timeout;
        ``TimeoutError`` then, the seal goes on). Raises ``SnapshotAbandoned`` (with
        ``reason``: budget, unavailable, timeout, closed, ...) if it never will; the
        previous sealed generation is then still the one restored. While it waits, this
        client's connection serves no other call."""
        t = self._client._seal_timeout if timeout is None else max(0.0, float(timeout))
        if not self._poll(t):
            raise TimeoutError(f"snapshot generation {self.generation} not sealed after {t}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _Staging:
    """Shared staging regions for arrays that do not live in shared memory."""

    def __init__(self) -> None:
        self.free: list[Region] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> Region | None:
        with self.lock:
            fits = [r for r in self.free if r.size >= nbytes]
            if not fits:
                return None
            best = min(fits, key=lambda r: r.size)
            self.free.remove(best)
            return best

    def give(self, region: Region) -> list[Region]:
        """Return a region; the ones to unmap (beyond the kept few, smallest first)."""
        with self.lock:
            self.free.append(region)
            self.free.sort(key=lambda r: r.size, reverse=True)
            extra = self.free[_STAGING_KEEP:]
            del self.free[_STAGING_KEEP:]
            return extra


class Client:
    """A connection to one daemon; made by :func:`connect` or :func:`start`.

    Thread-safe; collectives are executed by the daemon in the order they were issued.
    """

    def __init__(self, conn: Connection, *, op_timeout: float = _DEFAULT_OP_TIMEOUT) -> None:
        self._conn = conn
        self.op_timeout = op_timeout
        self._regions: dict[int, Region] = {}
        self._next_region = 1
        self._rlock = threading.Lock()
        self._staging = _Staging()
        self._callbacks: list[Callable[[ViewInfo], None]] = []
        self._watch: Connection | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._owned: list[Callable[[], None]] = []  # embedded mode: what close() stops
        # twin regions (docs/daemon.md): region id -> its twin (None: could not map one)
        self.twin_min_bytes = int(os.environ.get("PHALANX_TWIN_MIN_BYTES", _TWIN_MIN_BYTES))
        self._twins: dict[int, Region | None] = {}
        self._twin_ops: dict[int, tuple[Region, Region, BufRef]] = {}  # rid -> where
        # twins an op failed on: the daemon may have given them fresh (small) pages
        self._twins_worn: set[int] = set()
        self._twin_broken: str | None = None
        # replies that came after a failed exchange: their results cannot be trusted
        self._twin_lost: set[int] = set()
        conn.on_reply = self._on_reply
        self.coordinator_address: str | None = None  # embedded mode: where peers join
        self.daemon: Daemon | None = None  # embedded mode: the daemon in this process
        welcome = conn.call(ClientHello(os.getpid(), time.monotonic()), _CONTROL_TIMEOUT)
        assert isinstance(welcome, Welcome)
        self._session = welcome.session
        self.daemon_pid = welcome.daemon_pid
        self._seal_timeout = welcome.seal_timeout
        # ATTACH_STATE / UPDATE_STATE queue behind whatever the daemon is finishing: a
        # step's op or commit (a restarted trainer's first calls); wait as long as
        # those may take
        self._state_timeout = self.op_timeout + welcome.join_timeout
        self._member_id = welcome.member_id

    @property
    def socket(self) -> str:
        return self._conn.path

    @property
    def member_id(self) -> str:
        return self._member_id

    # ------------------------------------------------------------------ requests
    def _call(
        self,
        request: Request,
        timeout: float,
        *,
        fd: int | None = None,
        unsafe: Callable[[], None] | None = None,
    ) -> Any:
        """One request and its reply within ``timeout`` (+ a grace for the answer to
        come back); see :meth:`_await`."""
        return self._await(self._conn.send(request, fd), request, timeout + _GRACE_S, unsafe)

    def _await(
        self, rid: int, request: Request, wait: float, unsafe: Callable[[], None] | None
    ) -> Any:
        """The reply to ``rid``. A request that names this process's memory and has no
        answer in time is cancelled, and this returns (or raises) only once the daemon
        said it is over. If it cannot say so, ``unsafe()`` runs (that memory must not
        be reused), the connection is closed and DaemonUnavailable raised."""
        try:
            return self._conn.wait(rid, wait)
        except NoReply:
            row = row_of(request)
            if not row.memory:
                self._abandon(rid)
                raise TimeoutError(
                    f"{row.kind.name} got no answer within {wait - _GRACE_S:g}s"
                ) from None
        name = row_of(request).kind.name
        try:
            state: CancelState | None = self._conn.cancel(self._session, rid, _ACK_S)
        except (NoReply, DaemonUnavailable, OSError):
            state = None
        if state is CancelState.WILL_NOT_RUN:
            self._abandon(rid)  # its answer (a TimeoutError) is dropped when it comes
            raise TimeoutError(f"{name} passed its deadline before the daemon ran it (cancelled)")
        if state in (CancelState.FINISHED, CancelState.STOPPED):
            # its answer is in: a result or its error (kept, not abandoned, if it is
            # late: an op's reply may carry a twin exchange this process must make)
            return self._conn.wait(rid, _ACK_S)
        if unsafe is not None:
            unsafe()
        self._conn.close()
        raise DaemonUnavailable(
            f"the daemon did not stop {name} after its deadline: the connection is closed, "
            "and memory that request named may still change",
            socket=self._conn.path,
        )

    def _abandon(self, rid: int) -> None:
        """Nobody waits for request ``rid``'s reply any more: it is dropped on arrival
        (with a descriptor it carries); an op of it never gets a twin exchange here (it
        did not run: the daemon made none)."""
        self._twin_ops.pop(rid, None)
        self._conn.abandon(rid)

    # ------------------------------------------------------------------ memory
    def _map_timeout(self) -> float:
        """How long a MAP waits for its answer: the control timeout, and while earlier
        requests are in the daemon's hands (answered in order: an async op waiting for
        a slow peer), as long as they may still take, CANCEL included."""
        if not self._conn.busy:
            return _CONTROL_TIMEOUT
        return _CONTROL_TIMEOUT + self._conn.backlog() + _GRACE_S + _ACK_S

    def _new_region(self, nbytes: int, prefix: str) -> Region:
        """A new shared region of ``nbytes``, mapped by the daemon too. A MAP that gets
        no answer in time is undone: its late reply is dropped and an UNMAP follows
        it, so the daemon unmaps the region right after it maps it (it would otherwise
        stay charged to this session, unknown to the client, for the session's life)."""
        with self._rlock:
            rid = self._next_region
            self._next_region += 1
        region = Region.create(rid, nbytes, f"{prefix}-{rid}")
        try:
            wait = self._map_timeout()
            sent = self._conn.send(Map(rid), region.fd)
        finally:
            region.close_fd()  # the mapping keeps the memory; the daemon has its own fd
        try:
            self._conn.wait(sent, wait)
        except NoReply:
            self._conn.abandon(sent)
            with contextlib.suppress(DaemonUnavailable, TimeoutError):
                self._conn.send(Unmap(rid), discard=True)
            raise TimeoutError(
                f"MAP got no answer within {wait:g}s (the daemon is busy with earlier "
                "requests); the region is unmapped there as soon as it is mapped"
            ) from None
        return region

    def _map(self, nbytes: int) -> Region:
        region = self._new_region(nbytes, "phalanx")
        with self._rlock:
            self._regions[region.rid] = region
        return region

    def _unmap(self, region: Region) -> None:
        with self._rlock:
            self._regions.pop(region.rid, None)
            twin = self._twins.pop(region.rid, None)
            self._twins_worn.discard(region.rid)
        if twin is not None:
            self._unmap(twin)
        # nobody waits for the answer: a daemon busy with a long op would otherwise
        # hold up the caller (Handle.done(), which gives staging memory back, blocked
        # for up to 10 s); the daemon unmaps in request order, before any later use
        with contextlib.suppress(DaemonUnavailable, TimeoutError):
            self._conn.send(Unmap(region.rid), discard=True)

    def _release(self, arr: np.ndarray) -> None:
        """Unmap the region ``arr`` (from :meth:`empty`) lies in: nothing may use it after."""
        ref = self._locate(arr)
        if ref is not None:
            with self._rlock:
                region = self._regions.get(ref.region)
            if region is not None:
                self._unmap(region)

    def _forget(self, region: Region) -> None:
        """Never hand this region out again (an op it was given may still write it)."""
        with self._rlock:
            self._regions.pop(region.rid, None)
        log.warning("event=staging_quarantined region=%d bytes=%d", region.rid, region.size)

    def _twin_for(self, ref: BufRef) -> Region | None:
        """The twin of the region ``ref`` lies in (mapped on first use), or None."""
        with self._rlock:
            region = self._regions.get(ref.region)
            if region is None or pinned(region.base, region.size):
                return None  # pinned by physical page: an exchange would detach it
            known = ref.region in self._twins
            if not known and self._conn.busy:
                # its MAP would wait behind the request the daemon is running (an async
                # op waiting for a slow peer): this op goes without; a later one maps it
                return None
            twin = self._twins.get(ref.region)
            worn = twin is not None and ref.region in self._twins_worn
            self._twins_worn.discard(ref.region)
            if not known:
                self._twins[ref.region] = None  # one try per region
        if known:
            if worn:
                # an op on it failed after its pages were sent without a copy, so the
                # daemon gave it fresh pages (comm/zerocopy.py, detach): small ones,
                # until collapsed again (~1.5 ms per MiB; quick if none were punched)
                assert twin is not None
                twin.collapse(again=True)
            return twin
        try:
            twin = self._map_twin(region.size)
        except (DaemonUnavailable, TimeoutError):
            raise
        except PhalanxError as exc:  # e.g. the daemon's shared-memory limit
            log.info("event=twin_refused region=%d why=%s", ref.region, exc)
            return None
        # both on huge pages, once (phalanx/local/shm.py): every op on them runs faster
        huge = region.collapse(), twin.collapse()
        log.debug("event=twin_mapped region=%d bytes=%d huge=%s", ref.region, region.size, huge)
        with self._rlock:
            self._twins[ref.region] = twin
        return twin

    def _map_twin(self, nbytes: int) -> Region:
        # not in _regions: never handed out, never located
        return self._new_region(nbytes, "phalanx-twin")

    def _on_reply(self, frame: WireFrame) -> None:
        """Every reply, in order, before anyone sees it: an all-reduce the daemon left
        in the twin gets the same page exchange here that the daemon made."""
        if self._twin_broken is not None:
            # this process's mappings and the daemon's differ since an exchange
            # failed: nothing sent before that may be exchanged or trusted
            self._twin_ops.pop(frame.rid, None)
            self._twin_lost.add(frame.rid)
            return
        if not self._twin_ops:
            return
        where = self._twin_ops.pop(frame.rid, None)
        msg = frame.message
        if where is not None and (not isinstance(msg, OpResult) or msg.failed_attempts):
            # it failed (or failed before its retry succeeded): the daemon may have
            # given the twin fresh small pages (see _twin_for)
            with self._rlock:
                self._twins_worn.add(where[2].region)
        if where is None or not isinstance(msg, OpResult) or not msg.in_twin:
            return
        region, twin, ref = where
        try:
            ok = exchange(region, twin, ref.offset, ref.nbytes, edges=False)
        except Exception as exc:  # the reader must go on; later ops fail
            ok, why, damaged = False, str(exc), True  # a mapping may have a hole now
        else:
            why, damaged = "the kernel refused to move the pages", False
        if not ok:
            # the two processes' mappings of the region now differ: no later request
            # may trust it. With nothing else in flight the result is copied (right);
            # with more ops sent, the daemon may be writing these pages: lost too
            self._twin_broken = why
            log.error("event=twin_exchange_failed region=%d why=%s", ref.region, why)
            if damaged or self._twin_ops or self._conn.busy:
                self._twin_lost.add(frame.rid)
            else:
                np.copyto(region.array(ref.offset, ref.dtype, ref.shape),
                          twin.array(ref.offset, ref.dtype, ref.shape))  # fmt: skip

    def empty(
        self, shape: int | tuple[int, ...], dtype: str | np.dtype[Any] = "float32"
    ) -> np.ndarray:
        """A new array in memory shared with the daemon: collectives on it (or on any
        C-contiguous slice of it, or ``torch.from_numpy`` of it) are zero-copy.
        Contents are zero."""
        shp = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        dt = _dtype(dtype)
        nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
        region = self._map(max(nbytes, 1))
        return region.array(0, dt, shp)

    def _locate(self, arr: np.ndarray) -> BufRef | None:
        if not arr.flags.c_contiguous:
            return None
        addr = int(arr.__array_interface__["data"][0])
        with self._rlock:
            regions = list(self._regions.values())
        for r in regions:
            off = r.offset_of(addr, arr.nbytes)
            if off is not None:
                return BufRef(r.rid, off, _dtype_name(arr.dtype), tuple(arr.shape))
        return None

    # ------------------------------------------------------------------ collectives
    def _submit(
        self, spec: OpSpec, x: Array | None, *, retry: bool, timeout: float | None,
        async_op: bool,
    ) -> OpResult | Handle:  # fmt: skip
        """Every collective: one OP request for ``spec`` on where ``x`` lives."""
        t = _check_timeout(self.op_timeout if timeout is None else float(timeout))
        release: Callable[[bool], None] = _nothing
        unsafe: Callable[[], None] | None = None
        ref: BufRef | None = None
        zero_copy = True
        if self._twin_broken is not None:
            self._conn.close()
            raise DaemonUnavailable(
                f"a twin region exchange failed ({self._twin_broken}): the connection is "
                "closed", socket=self._conn.path,
            )  # fmt: skip
        if x is not None:
            ref, release, unsafe, zero_copy = self._prepare(x)
        twin = None
        if (
            ref is not None and zero_copy and spec.kind == "all_reduce"
            and spec.codec == "none" and 0 < self.twin_min_bytes <= ref.nbytes
        ):  # fmt: skip
            twin = self._twin_for(ref)
        at = time.monotonic() + t
        req = Op(spec, ref, retry, t, at, twin.rid if twin is not None else 0)

        def note(rid: int) -> None:
            if twin is not None and ref is not None:
                self._twin_ops[rid] = (self._regions[ref.region], twin, ref)

        try:
            rid = self._conn.send(req, before=note)
        except BaseException:
            release(False)
            raise

        def settle(wait: float | None) -> OpResult | None:
            left = at + _GRACE_S - time.monotonic()
            try:
                if wait is not None and wait < left:
                    try:
                        reply = self._conn.wait(rid, wait)
                    except NoReply:
                        return None  # the caller's own wait: the op goes on
                else:
                    reply = self._await(rid, req, max(left, 0.0), unsafe)
            except BaseException:
                release(False)
                raise
            if rid in self._twin_lost:
                self._twin_lost.discard(rid)
                release(False)
                self._conn.close()
                raise DaemonUnavailable(
                    f"a twin region exchange failed ({self._twin_broken}) while this op "
                    "was under way: its result did not reliably reach the array, whose "
                    "contents are undefined; the connection is closed",
                    socket=self._conn.path,
                )
            release(True)  # copy back (staged arrays), staging memory back to the pool
            assert isinstance(reply, OpResult)
            return reply if zero_copy else replace(reply, zero_copy=False)

        handle = Handle(settle)
        return handle if async_op else handle.wait()

    def _prepare(
        self, x: Array
    ) -> tuple[BufRef, Callable[[bool], None], Callable[[], None] | None, bool]:
        """(where the daemon finds the data, what to do when the op ends, what to do if
        its memory can never be trusted again, zero-copy?)."""
        arr, back = _as_numpy(x, self)
        if not isinstance(arr, np.ndarray):
            raise UnsupportedError(f"expected a numpy array or a torch tensor, got {type(x)}")
        if not arr.flags.writeable:
            raise UnsupportedError("the array is read-only; collectives work in place")
        ref = self._locate(arr)
        if ref is not None:
            return ref, back, None, back is _nothing
        # copy in once, out once (on success only): staging memory from the pool
        nbytes = max(arr.nbytes, 1)
        region = self._staging.take(nbytes) or self._map(max(nbytes, 1 << 20))
        view = region.array(0, arr.dtype, arr.shape)
        np.copyto(view, arr)
        ref = BufRef(region.rid, 0, _dtype_name(arr.dtype), tuple(arr.shape))
        lost = False

        def release(ok: bool) -> None:
            if ok:
                np.copyto(arr, view)
                back(True)
            if not lost:  # the daemon is done with it: reuse
                for extra in self._staging.give(region):
                    self._unmap(extra)

        def unsafe() -> None:
            nonlocal lost
            lost = True
            self._forget(region)

        return ref, release, unsafe, False

    @overload
    def all_reduce(self, x: Array, op: str = ..., codec: str = ..., *,
                   async_op: Literal[False] = ..., retry: bool = ...,
                   timeout: float | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def all_reduce(self, x: Array, op: str = ..., codec: str = ..., *,
                   async_op: Literal[True], retry: bool = ...,
                   timeout: float | None = ...) -> Handle: ...  # fmt: skip
    def all_reduce(
        self, x: Array, op: str = "sum", codec: str = "none", *, async_op: bool = False,
        retry: bool = False, timeout: float | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Reduce ``x`` in place over the current view (``op``: sum, avg, min, max,
        prod; ``codec``: none, zstd, fp16, bf16, int8). ``retry=True``: if the view
        changes under the op (or its data-plane group must be rebuilt), run it again
        (exact: the input was restored) instead of raising ``ViewChanged``.
        ``timeout``: deadline in seconds for the whole call, retries included (default
        ``op_timeout``); ``TimeoutError`` after it, with ``x`` holding its input."""
        return self._submit(OpSpec("all_reduce", op, codec), x, retry=retry, timeout=timeout,
                            async_op=async_op)  # fmt: skip

    @overload
    def reduce_scatter(self, x: Array, op: str = ..., codec: str = ..., *,
                       async_op: Literal[False] = ..., retry: bool = ...,
                       timeout: float | None = ...,
                       layout_epoch: int | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def reduce_scatter(self, x: Array, op: str = ..., codec: str = ..., *,
                       async_op: Literal[True], retry: bool = ...,
                       timeout: float | None = ...,
                       layout_epoch: int | None = ...) -> Handle: ...  # fmt: skip
    def reduce_scatter(
        self, x: Array, op: str = "sum", codec: str = "none", *, async_op: bool = False,
        retry: bool = False, timeout: float | None = None, layout_epoch: int | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Reduce over the view; only this member's chunk of ``x`` (flat, see
        :meth:`chunk`) is written with the result, the rest keeps its values.

        ``layout_epoch``: the epoch of the view ``x`` was laid out for (whose rank and
        world chose this member's chunk). It is part of what every member must call
        identically: if members pass different tags (one read the view before a change,
        one after), the op fails on every member with ``OpMismatch`` naming ``layout``,
        every ``x`` holding its input. The daemon runs it in its current view as any op;
        ``OpResult.epoch`` says which (compare it with the tag). None: untagged."""
        spec = OpSpec("reduce_scatter", op, codec, layout=layout_tag(layout_epoch))
        return self._submit(spec, x, retry=retry, timeout=timeout, async_op=async_op)

    @overload
    def all_gather(self, x: Array, codec: str = ..., *, async_op: Literal[False] = ...,
                   retry: bool = ..., timeout: float | None = ...,
                   layout_epoch: int | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def all_gather(self, x: Array, codec: str = ..., *, async_op: Literal[True],
                   retry: bool = ..., timeout: float | None = ...,
                   layout_epoch: int | None = ...) -> Handle: ...  # fmt: skip
    def all_gather(
        self, x: Array, codec: str = "none", *, async_op: bool = False, retry: bool = False,
        timeout: float | None = None, layout_epoch: int | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Each member contributes its chunk of ``x`` (flat, :meth:`chunk`); afterwards
        every member's ``x`` holds every chunk. ``layout_epoch``: the layout tag, as in
        :meth:`reduce_scatter`."""
        spec = OpSpec("all_gather", codec=codec, layout=layout_tag(layout_epoch))
        return self._submit(spec, x, retry=retry, timeout=timeout, async_op=async_op)

    @overload
    def broadcast(self, x: Array, root: int = ..., codec: str = ..., *,
                  async_op: Literal[False] = ..., retry: bool = ...,
                  timeout: float | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def broadcast(self, x: Array, root: int = ..., codec: str = ..., *,
                  async_op: Literal[True], retry: bool = ...,
                  timeout: float | None = ...) -> Handle: ...  # fmt: skip
    def broadcast(
        self, x: Array, root: int = 0, codec: str = "none", *, async_op: bool = False,
        retry: bool = False, timeout: float | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Copy the ``x`` of the member at rank ``root`` (in the view the op runs in)
        into every member's ``x``."""
        if root < 0:
            raise ConfigError(f"root must be >= 0, got {root}")
        return self._submit(OpSpec("broadcast", codec=codec, root=root), x, retry=retry,
                            timeout=timeout, async_op=async_op)  # fmt: skip

    @overload
    def barrier(self, *, async_op: Literal[False] = ..., retry: bool = ...,
                timeout: float | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def barrier(self, *, async_op: Literal[True], retry: bool = ...,
                timeout: float | None = ...) -> Handle: ...  # fmt: skip
    def barrier(
        self, *, async_op: bool = False, retry: bool = False, timeout: float | None = None
    ) -> OpResult | Handle:
        """Return once every member of the view has entered the barrier."""
        return self._submit(OpSpec("barrier"), None, retry=retry, timeout=timeout,
                            async_op=async_op)  # fmt: skip

    def chunk(self, size: int) -> slice:
        """The flat slice of a ``size``-element array this member owns in
        reduce_scatter / contributes in all_gather, in the current view."""
        v = self.view()
        if v.rank is None:
            return slice(0, 0)
        base, extra = divmod(size, v.world)
        start = v.rank * base + min(v.rank, extra)
        return slice(start, start + base + (1 if v.rank < extra else 0))

    # ------------------------------------------------------------------ steps and state
    def begin_step(
        self, step: int | None = None, *, timeout: float | None = None,
        allow_partial: bool = False,
    ) -> StepInfo:  # fmt: skip
        """Mark a step boundary: a pending view is installed and, if this member's state
        differs from the group's, the group's state is received (verified by hash)
        **in place** into the attached arrays (``StepInfo.synced``: by this call).
        ``step`` defaults to the state's step.

        No silent wrong step: a collective of this step that would run over other
        members than ``StepInfo.members`` (the view changed: a retry on a smaller
        view, a member joined) raises ``StepAborted`` without running (the array holds
        its input), and ``commit`` of this step is then False on every member: begin
        the step again with the new members. ``allow_partial=True`` lets such
        collectives run, for loops that weigh contributions themselves
        (``OpResult.contributors``)."""
        t = _check_timeout(self.op_timeout if timeout is None else float(timeout))
        req = BeginStep(step, t, time.monotonic() + t, allow_partial)
        info = self._call(req, t)
        assert isinstance(info, StepInfo)
        return info

    def commit(self, step: int, ok: bool = True, *, timeout: float | None = None) -> bool:
        """Vote on ``step``; the group's decision, the same on every member (promise 4).
        Apply the step only on True. ``CommitUnknown`` if no decision came in time."""
        t = _check_timeout(self.op_timeout if timeout is None else float(timeout))
        reply = self._call(Commit(int(step), bool(ok), t, time.monotonic() + t), t)
        assert isinstance(reply, Committed)
        return reply.committed

    def attach_state(self, arrays: Mapping[str, Array], step: int | None = None) -> int:
        """Make ``arrays`` (from :meth:`empty`, or tensors over them) the state the
        group keeps identical on its members. ``step``: the step they hold; ``None``
        means "I hold nothing valid": if the daemon still has this member's state (the
        training process restarted) it is copied into ``arrays`` at once, otherwise the
        group's state arrives at the next :meth:`begin_step`. Returns the step the
        arrays now hold (-1: not yet)."""
        entries = []
        for name, x in arrays.items():
            arr, back = _as_numpy(x, self)
            ref = self._locate(arr) if back is _nothing else None
            if ref is None:
                raise UnsupportedError(
                    f"state entry {name!r} must live in shared memory: allocate it with "
                    "client.empty() (or torch.from_numpy of such an array)"
                )
            entries.append(NamedBuf(name, ref))
        t = self._state_timeout
        req = AttachState(tuple(entries), None if step is None else int(step), t,
                          time.monotonic() + t)  # fmt: skip
        reply = self._call(req, t)
        assert isinstance(reply, Attached)
        return reply.step

    def update_state(self, step: int, changed: list[str] | None = None) -> None:
        """The attached arrays (all, or those named) now hold ``step``'s values."""
        names = None if changed is None else tuple(str(c) for c in changed)
        t = self._state_timeout
        self._call(UpdateState(int(step), names, t, time.monotonic() + t), t)

    # ------------------------------------------------------------------ snapshots
    def snapshot(
        self, state: Mapping[str, Any], step: int, *, timeout: float | None = None
    ) -> SnapshotHandle:
        """Snapshot ``state`` (a nested mapping of str -> numpy array / CPU torch
        tensor) as ``step``; returns once the bytes are in daemon memory. Arrays from
        :meth:`empty` are copied once (daemon side); others are staged through shared
        memory first (one more copy). Refused with ``LayoutError`` (a ``ValueError``
        and ``TypeError``) before anything is copied: object/structured dtypes,
        non-contiguous arrays, non-CPU tensors, bad keys. If the previous generation is
        still sealing, the call waits for it (bounded by the seal timeout).
        ``timeout``: deadline of the call (default: the daemon's seal timeout)."""
        t0 = time.perf_counter()
        leaves: list[tuple[list[str], np.ndarray]] = []
        _snapshot_leaves(state, [], leaves)
        refs: list[BufRef | None] = []
        staged: list[tuple[int, np.ndarray]] = []  # (entry index, array)
        total = 0
        for _path, arr in leaves:
            ref = self._locate(arr) if arr.nbytes else None
            if ref is None:
                staged.append((len(refs), arr))
                total += -(-arr.nbytes // _ALIGN) * _ALIGN
            refs.append(ref)
        region: Region | None = None
        lost = False
        if staged:
            region = self._staging.take(max(total, 1)) or self._map(max(total, 1 << 20))
            off = 0
            for i, arr in staged:
                dst = region.bytes[off : off + arr.nbytes]
                np.copyto(dst, arr.reshape(-1).view(np.uint8))  # the staging copy
                refs[i] = BufRef(region.rid, off, _dtype_name(arr.dtype), tuple(arr.shape))
                off += -(-arr.nbytes // _ALIGN) * _ALIGN
        entries = []
        for (path, _arr), ref in zip(leaves, refs, strict=True):
            assert ref is not None
            entries.append(SnapshotArray(tuple(path), ref))

        def unsafe() -> None:
            nonlocal lost
            lost = True
            if region is not None:
                self._forget(region)

        t = _check_timeout(self._seal_timeout if timeout is None else float(timeout))
        try:
            req = TakeSnapshot(tuple(entries), int(step), t, time.monotonic() + t)
            taken = self._call(req, t, unsafe=unsafe)
        finally:
            if region is not None and not lost:
                for extra in self._staging.give(region):
                    self._unmap(extra)
        assert isinstance(taken, SnapshotTaken)
        return SnapshotHandle(self, taken, time.perf_counter() - t0, not staged)

    def restore(
        self, step: int | None = None, *, timeout: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(step, state) of this member's newest sealed generation (of ``step`` if
        given): the daemon's own copy, else its holders, else the disk tier. Works
        after this training process was killed and restarted (the daemon kept it).
        Raises ``SnapshotNotFound`` if nothing sealed is held, ``RestoreError`` if it
        cannot be rebuilt. Arrays come back as numpy arrays (see the module docs)."""
        return self._restore(None, step, timeout)

    def restore_peer(
        self, member_id: str, step: int | None = None, *, timeout: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(step, state) of ``member_id``'s newest sealed generation (of ``step`` if
        given), rebuilt from the live holders (any k checked pieces per stripe): how a
        replacement takes over a gone peer's state."""
        return self._restore(str(member_id), step, timeout)

    def _restore(
        self, member: str | None, step: int | None, timeout: float | None
    ) -> tuple[int, dict[str, Any]]:
        t = _check_timeout(self._seal_timeout if timeout is None else float(timeout))
        if not t > 0:
            raise ConfigError("timeout must be > 0")
        req = Restore(member, None if step is None else int(step), t, time.monotonic() + t)
        rid = self._conn.send(req)
        try:
            frame = self._conn.wait_frame(rid, t + _GRACE_S + _ACK_S)
        except NoReply:
            self._conn.abandon(rid)  # a late reply's memfd would pin the whole state
            raise
        layout = frame.message
        if frame.fd is None or not isinstance(layout, RestoreLayout):
            raise DaemonUnavailable("the daemon's restore reply carried no memory")
        region = Region.adopt(-1, frame.fd, layout.size + mmap_page())  # closes the fd
        state: dict[str, Any] = {}
        for e in layout.entries:
            arr = region.array(e.offset, _restored_dtype(e.dtype), e.shape)
            node = state
            for key in e.path[:-1]:
                node = node.setdefault(key, {})
            node[e.path[-1]] = arr
        return layout.step, state

    # ------------------------------------------------------------------ views
    def view(self) -> ViewInfo:
        """The daemon's current view."""
        view = self._conn.call(GetView(), _CONTROL_TIMEOUT)
        assert isinstance(view, ViewInfo)
        return view

    def on_view_change(self, fn: Callable[[ViewInfo], None]) -> None:
        """Call ``fn(view)`` on every new view (from a client thread; keep it short).
        The first call opens an event connection to the daemon."""
        self._callbacks.append(fn)
        if self._watch is not None:
            return
        watch = Connection(self._conn.path)
        watch.call(Watch(), _CONTROL_TIMEOUT)
        self._watch = watch
        self._watcher = threading.Thread(
            target=self._watch_loop, args=(watch,), name="phalanx-client-watch", daemon=True
        )
        self._watcher.start()

    def _watch_loop(self, watch: Connection) -> None:
        while not self._stop.is_set():
            try:
                event = watch.next_event(0.25)
            except DaemonUnavailable:
                if not self._stop.is_set():
                    log.warning("event=watch_lost socket=%s", watch.path)
                return
            if event is None:
                continue
            for fn in list(self._callbacks):
                try:
                    fn(event.view)
                except Exception:
                    log.exception("event=view_callback_failed epoch=%d", event.view.epoch)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Say goodbye and close (idempotent). In embedded mode this also stops the
        daemon (leaving the group) and the coordinator started with it."""
        self._stop.set()
        if self._conn.alive:
            with contextlib.suppress(DaemonUnavailable, TimeoutError, OSError):
                self._conn.call(Bye(), 2.0)
        self._conn.close()
        if self._watch is not None:
            self._watch.close()
        if self._watcher is not None:
            self._watcher.join(2.0)
        while self._owned:
            stop = self._owned.pop()
            try:
                stop()
            except Exception:
                log.exception("event=embedded_stop_failed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


def _dtype_name(dt: np.dtype[Any]) -> str:
    """A dtype as the local protocol names it: byte order kept, ml_dtypes by name."""
    return dt.name if dt.kind == "V" else dt.str


def _restored_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return dt


def _layout_error(reason: str, detail: str, path: str) -> Exception:
    return LayoutError(reason, detail, path)


def _snapshot_leaves(
    node: Mapping[str, Any], prefix: list[str], out: list[tuple[list[str], np.ndarray]]
) -> None:
    """The arrays of a state, checked (nothing copied yet): what the service would
    refuse is refused here, so a bad state never costs a staging copy."""
    if not isinstance(node, Mapping):
        raise _layout_error("bad-state", f"state must be a mapping, got {type(node).__name__}", "")
    for key, value in node.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise _layout_error(
                "bad-key", f"keys must be non-empty str without '/', got {key!r}", "/".join(prefix)
            )
        path = [*prefix, key]
        name = "/".join(path)
        if isinstance(value, Mapping):
            _snapshot_leaves(value, path, out)
            continue
        if isinstance(value, np.ndarray):
            arr = value
        elif type(value).__module__.startswith("torch"):
            if value.device.type != "cpu":
                raise _layout_error("device", f"tensor is on {value.device}; move it to CPU", name)
            if not value.is_contiguous():
                raise _layout_error(
                    "non-contiguous", "tensor is not contiguous; .contiguous()", name
                )
            arr = _tensor_view(value.detach())
        else:
            raise _layout_error(
                "bad-type", f"{type(value).__name__} is not a numpy array or CPU torch tensor", name
            )
        dt = arr.dtype
        if (
            dt.hasobject
            or dt.fields is not None
            or (dt.kind == "V" and not dt.type.__module__.startswith("ml_dtypes"))
        ):
            raise _layout_error(
                "object-dtype",
                f"dtype {dt} cannot be snapshotted (object/structured arrays hold references, "
                "not bytes)",
                name,
            )
        if not arr.flags.c_contiguous:
            raise _layout_error(
                "non-contiguous", "array is not C-contiguous; pass np.ascontiguousarray(a)", name
            )
        out.append((path, arr))


def _nothing(ok: bool) -> None:
    del ok


def _dtype(dtype: str | np.dtype[Any]) -> np.dtype[Any]:
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(dtype)


def _as_numpy(x: Array, client: Client) -> tuple[np.ndarray, Callable[[bool], None]]:
    """A numpy view of ``x`` and what to do after the op (copy back for tensors that
    could not be viewed in place). Zero-copy views return ``_nothing``."""
    if isinstance(x, np.ndarray):
        return x, _nothing
    mod = type(x).__module__
    if mod.startswith("torch"):
        return _torch_numpy(x, client)
    raise UnsupportedError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def _torch_numpy(t: Any, client: Client) -> tuple[np.ndarray, Callable[[bool], None]]:
    import torch

    if t.requires_grad:
        t = t.detach()
    if t.device.type == "cuda":
        # Staged through host memory that the daemon shares: device -> host copy,
        # zero-copy collective on the host pages, host -> device copy on success;
        # then the staging region goes. Page-locked with cuda.pin, which records the
        # pages as pinned: a twin exchange would leave the device copying from the
        # old ones (the input) after the op. Not exercised on CPU-only machines.
        from phalanx.torch import cuda

        staged = client.empty(tuple(t.shape), _torch_dtype_name(t.dtype))
        host = torch.from_numpy(staged)
        cuda.pin(host)
        host.copy_(t)

        def back_cuda(ok: bool) -> None:
            try:
                if ok:
                    t.copy_(host, non_blocking=False)
            finally:
                cuda.unpin(host)
                client._release(staged)

        return _tensor_view(host), back_cuda
    if t.device.type != "cpu":
        raise UnsupportedError(f"tensors on {t.device.type} are not supported")
    if t.is_contiguous():
        return _tensor_view(t), _nothing
    tmp = t.contiguous()

    def back(ok: bool) -> None:
        if ok:
            t.copy_(tmp)

    return _tensor_view(tmp), back


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_view(t: Any) -> np.ndarray:
    """A numpy array over a contiguous CPU tensor's memory (bfloat16 included)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        arr: np.ndarray = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return arr
    out: np.ndarray = t.numpy()
    return out


# ----------------------------------------------------------------------------- entry points


def socket_path(socket: str | None = None, member_id: str | None = None) -> str:
    """Where :func:`connect` looks: ``socket``; else ``$PHALANX_SOCKET``; else where a
    daemon listens by default (:func:`phalanx.config.default_socket_path`) when started
    with ``--id member_id`` (``$PHALANX_ID`` when no id is given here — the variable
    the daemon reads its id from too; ``daemon.sock`` for a daemon without an id)."""
    if socket:
        return socket
    env = os.environ.get("PHALANX_SOCKET")
    if env:
        return env
    from phalanx.config import default_socket_path

    return default_socket_path(member_id or os.environ.get("PHALANX_ID", ""))


def connect(
    socket: str | None = None,
    *,
    member_id: str | None = None,
    timeout: float = 5.0,
    op_timeout: float | None = None,
) -> Client:
    """Connect to the local daemon (where: :func:`socket_path`). A daemon that is still
    starting is waited for, up to ``timeout`` seconds; then
    :class:`~phalanx.errors.DaemonUnavailable` (naming the sockets that do exist
    there, when the default path was used)."""
    path = socket_path(socket, member_id)
    try:
        conn = Connection(path, timeout, wait=timeout)
    except DaemonUnavailable as exc:
        if socket or os.environ.get("PHALANX_SOCKET"):
            raise
        raise DaemonUnavailable(f"{exc}{_others(path)}", socket=path) from None
    try:
        return Client(conn, op_timeout=op_timeout or _DEFAULT_OP_TIMEOUT)
    except BaseException:
        conn.close()
        raise


def _others(path: str) -> str:
    """A hint naming the daemons' sockets next to ``path`` (another --id)."""
    folder = os.path.dirname(path)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".sock"))
    except OSError:
        return ""
    if not names:
        return ""
    ids = ", ".join(repr(n.removesuffix(".sock")) for n in names[:8])
    return f"; daemons listen in {folder} as {ids}: pass member_id= (or set PHALANX_ID)"


def start(
    *,
    coordinator: str | None = None,
    secret: bytes | str | None = None,
    insecure: bool = False,
    member_id: str | None = None,
    listen: str = "127.0.0.1:0",
    metrics_port: int = -1,
    config: PhalanxConfig | None = None,
) -> Client:
    """Embedded mode: run a daemon (and, with ``coordinator=None``, a coordinator) in
    this process's threads and return a client connected to it — the same API as
    :func:`connect`. ``client.close()`` stops both.

    ``secret``: the cluster secret (>= 16 bytes); generated when this call also runs
    the coordinator. Other members join with ``start(coordinator=
    client.coordinator_address, secret=the same secret)`` (or a ``phalanx daemon``).
    """
    from phalanx.config import PhalanxConfig
    from phalanx.daemon import INSECURE_SECRET, Daemon
    from phalanx.membership.coordinator import Coordinator

    cfg = config or PhalanxConfig()
    raw: bytes | None = secret.encode() if isinstance(secret, str) else secret
    coord: Coordinator | None = None
    if coordinator is None:
        if raw is None and not insecure:
            raw = os.urandom(32)
        coord = Coordinator(
            "127.0.0.1:0", secret=None if insecure else raw, insecure=insecure,
            config=cfg.membership, recover=False,
        )  # fmt: skip
        coordinator = coord.start()
    elif raw is None and not insecure:
        raise ConfigError("joining an existing coordinator needs the cluster secret")
    tmp = _socket_dir()
    mid = member_id or cfg.id or f"embedded-{os.getpid()}-{os.path.basename(tmp)[-6:]}"
    from dataclasses import replace

    cfg = replace(
        cfg, coordinator=coordinator, listen=listen, metrics_port=metrics_port, id=mid,
        socket=os.path.join(tmp, "daemon.sock"), insecure=insecure,
    )  # fmt: skip
    daemon: Daemon | None = None
    try:
        daemon = Daemon(cfg, raw if raw is not None else INSECURE_SECRET)
        daemon.start()
        client = connect(cfg.socket, op_timeout=cfg.op_timeout)
    except BaseException:
        if daemon is not None:
            daemon.stop(leave=False)
        if coord is not None:
            coord.stop(0.5)
        _rmdir(tmp)
        raise
    d = daemon
    client.coordinator_address = coordinator
    client._owned.append(lambda: _rmdir(tmp))
    if coord is not None:
        c = coord
        client._owned.append(lambda: c.stop(0.5))
    client._owned.append(lambda: d.stop(leave=True))
    client.daemon = d
    return client


def _rmdir(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


#: an embedded daemon's socket folder: phalanx-<pid of its process>-<random>
_EMBEDDED_DIR = re.compile(r"phalanx-([0-9]+)-[A-Za-z0-9_]+")


def _socket_dir() -> str:
    """A new folder for an embedded daemon's socket, named after this process. A
    process killed with SIGKILL never removes its own (the examples' and the tests'
    kills left one per victim in /tmp, with a dead socket in it): the folders of
    embedded daemons whose process is gone are removed here first."""
    import tempfile

    base = tempfile.gettempdir()
    _sweep_dead(base)
    return tempfile.mkdtemp(prefix=f"phalanx-{os.getpid()}-", dir=base)


def _sweep_dead(base: str) -> list[str]:
    """Remove ``base``'s embedded-daemon folders (see :data:`_EMBEDDED_DIR`) of this
    user whose process no longer exists and that hold nothing but a socket; returns
    what it removed. Never raises: a folder it cannot judge or remove is left."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for e in entries:
        m = _EMBEDDED_DIR.fullmatch(e.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat().st_uid != os.getuid():
                continue
            if _alive(int(m.group(1))) or set(os.listdir(e.path)) - {"daemon.sock"}:
                continue
        except OSError:
            continue
        _rmdir(e.path)
        removed.append(e.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True

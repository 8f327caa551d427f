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
:class:`Handle`; ``handle.wait()``). Arrays from :meth:`Client.empty` (and tensors over
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

Errors: the promises' typed exceptions (:class:`~phalanx.errors.PeerFailure`,
``ViewChanged``, ``Evicted``, ``StepAborted``, ``CommitUnknown``, ...) reach the caller
as the same classes; :class:`~phalanx.errors.DaemonUnavailable` when the daemon is not
there or died (within a second, never a hang); ``TimeoutError`` when a call's deadline
passes. Every call has a deadline.

This module must never touch the network or the data plane itself: it talks only to
the daemon's local API (:mod:`phalanx.local`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from phalanx.errors import ConfigError, DaemonUnavailable, UnsupportedError
from phalanx.local.conn import Connection
from phalanx.local.shm import Region
from phalanx.local.wire import BufRef, Kind, OpRequest

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

_MARGIN_S = 5.0  # the client waits this much longer than the daemon's own deadline
_DEFAULT_OP_TIMEOUT = 120.0
_CONTROL_TIMEOUT = 10.0
_STAGING_KEEP = 4


@dataclass(frozen=True)
class ViewInfo:
    """The daemon's current view: ``epoch``, member ids in rank order, this member's
    ``rank`` (None while not in a view) and id."""

    epoch: int
    members: tuple[str, ...]
    rank: int | None
    member_id: str

    @property
    def world(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class OpResult:
    """A completed collective: the epoch it ran in, the member ids that contributed
    (rank order), its sequence number, failed attempts before it (``retry=True``),
    the algorithm, the daemon-side duration, and whether it ran on the caller's memory
    (``zero_copy``) or through a staging copy."""

    op: str
    epoch: int
    seq: int
    contributors: tuple[str, ...]
    failed_attempts: int
    algorithm: str
    duration_s: float
    zero_copy: bool


@dataclass(frozen=True)
class StepInfo:
    """What :meth:`Client.begin_step` found: the view, the step the state is at, and
    whether state was received (``synced``, ``sync_bytes``) in place into the attached
    arrays."""

    epoch: int
    members: tuple[str, ...]
    step: int
    synced: bool
    sync_bytes: int


@dataclass(frozen=True)
class SealResult:
    """A sealed snapshot generation: its id, step, state bytes, the erasure code
    (``k`` data + ``m`` parity pieces per stripe), the holders in piece order, the time
    from ``snapshot()`` to the seal and the time spent encoding."""

    generation: int
    step: int
    nbytes: int
    k: int
    m: int
    holders: tuple[str, ...]
    seal_s: float
    encode_s: float


class SnapshotHandle:
    """A snapshot whose bytes are in daemon memory (:meth:`Client.snapshot`).

    ``stall_s``: the daemon's copy (the one memcpy); ``call_s``: the whole call as the
    caller saw it (staging copy, if any, + round trip + the copy); ``zero_copy``: every
    array came from shared memory (no staging copy); ``changes``: names added, removed
    or reshaped since the previous snapshot. :meth:`wait` returns when the generation
    is sealed."""

    def __init__(self, client: Client, body: Mapping[str, Any], call_s: float, zero_copy: bool):
        self._client = client
        self.generation = int(body["generation"])
        self.step = int(body["step"])
        self.nbytes = int(body["nbytes"])
        self.stall_s = float(body["stall_s"])
        self.changes = tuple(str(c) for c in body.get("changes", ()))
        self.call_s = call_s
        self.zero_copy = zero_copy
        self._result: SealResult | None = None
        self._error: BaseException | None = None

    def _poll(self, timeout: float) -> bool:
        if self._result is not None or self._error is not None:
            return True
        body = {"generation": self.generation, "timeout": timeout}
        try:
            b = self._client._conn.call(Kind.SNAPSHOT_WAIT, body, timeout + _MARGIN_S)
        except (DaemonUnavailable, TimeoutError):
            raise
        except Exception as exc:  # SnapshotAbandoned and friends: final
            self._error = exc
            return True
        if not b.get("sealed"):
            return False
        self._result = SealResult(
            int(b["generation"]), int(b["step"]), int(b["nbytes"]), int(b["k"]), int(b["m"]),
            tuple(str(h) for h in b["holders"]), float(b["seal_s"]), float(b["encode_s"]),
        )  # fmt: skip
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


def _view(body: Mapping[str, Any]) -> ViewInfo:
    rank = body.get("rank")
    return ViewInfo(
        int(body["epoch"]),
        tuple(str(m) for m in body["members"]),
        int(rank) if rank is not None else None,
        str(body["member"]),
    )


class Handle:
    """A collective in flight (``async_op=True``). :meth:`wait` returns its
    :class:`OpResult` or raises its error; the array must not be touched before."""

    def __init__(
        self, conn: Connection, rid: int, finish: Callable[[dict[str, Any] | None], OpResult | None],
        timeout: float,
    ) -> None:  # fmt: skip
        self._conn = conn
        self._rid = rid
        self._finish = finish
        self._deadline = time.monotonic() + timeout
        self._result: OpResult | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def _settle(self, timeout: float | None) -> bool:
        with self._lock:
            if self._result is not None or self._error is not None:
                return True
            left = self._deadline - time.monotonic()
            wait = left if timeout is None else min(timeout, left)
            try:
                body = self._conn.wait(self._rid, max(0.0, wait))
            except TimeoutError:
                if timeout is not None and timeout < left:
                    return False  # the caller's own timeout, not the op's deadline
                self._error = TimeoutError("the collective passed its deadline")
                self._finish(None)
                return True
            except BaseException as exc:
                self._error = exc
                self._finish(None)
                return True
            result = self._finish(body)
            assert result is not None
            self._result = result
            return True

    def done(self) -> bool:
        """True once the result (or error) is in; never blocks."""
        return self._settle(0.0)

    def wait(self, timeout: float | None = None) -> OpResult:
        """Block until the op ends (at most its deadline); ``timeout``: give up waiting
        sooner (``TimeoutError``; the op goes on, wait again later)."""
        if not self._settle(timeout):
            raise TimeoutError(f"collective still running after {timeout}s")
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
        self.coordinator_address: str | None = None  # embedded mode: where peers join
        self.daemon: Daemon | None = None  # embedded mode: the daemon in this process
        hello = conn.call(Kind.HELLO, {"pid": os.getpid()}, _CONTROL_TIMEOUT)
        self.daemon_pid = int(hello.get("daemon_pid", 0))
        self._seal_timeout = float(hello.get("seal_timeout", 300.0))
        # STATE_ATTACH / STATE_UPDATE queue behind whatever the daemon is finishing: a
        # step's op or commit, or leaving and rejoining after a client lost mid-step
        # (a restarted trainer's first calls); wait as long as those may take
        self._state_timeout = (
            max(self.op_timeout, float(hello.get("rejoin_timeout", 30.0))) + _MARGIN_S
        )
        self._member_id = str(hello["view"]["member"])

    @property
    def socket(self) -> str:
        return self._conn.path

    @property
    def member_id(self) -> str:
        return self._member_id

    # ------------------------------------------------------------------ memory
    def _map(self, nbytes: int) -> Region:
        with self._rlock:
            rid = self._next_region
            self._next_region += 1
        region = Region.create(rid, nbytes, f"phalanx-{rid}")
        try:
            self._conn.call(Kind.MAP, {"region": rid}, _CONTROL_TIMEOUT, fd=region.fd)
        finally:
            region.close_fd()  # the mapping keeps the memory; the daemon has its own fd
        with self._rlock:
            self._regions[rid] = region
        return region

    def _unmap(self, region: Region) -> None:
        with self._rlock:
            self._regions.pop(region.rid, None)
        with contextlib.suppress(DaemonUnavailable, TimeoutError):
            self._conn.call(Kind.UNMAP, {"region": region.rid}, _CONTROL_TIMEOUT)

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
                return BufRef(r.rid, off, arr.dtype.name, tuple(arr.shape))
        return None

    # ------------------------------------------------------------------ collectives
    def _submit(
        self, op: str, x: Array | None, *, reduce: str = "sum", codec: str = "none",
        root: int = 0, retry: bool, timeout: float | None, async_op: bool,
    ) -> OpResult | Handle:  # fmt: skip
        t = self.op_timeout if timeout is None else float(timeout)
        if not t > 0:
            raise ConfigError("timeout must be > 0")
        done: Callable[[bool], None] = _nothing
        ref: BufRef | None = None
        zero_copy = True
        if x is not None:
            ref, done, zero_copy = self._prepare(x)
        req = OpRequest(op, ref, reduce, codec, root, retry, t)
        try:
            rid = self._conn.send(Kind.OP, req.to_body())
        except BaseException:
            done(False)
            raise

        def finish(body: dict[str, Any] | None) -> OpResult | None:
            done(body is not None)  # copy back only on success; staging back to the pool
            if body is None:
                return None
            return OpResult(
                op=op,
                epoch=int(body["epoch"]),
                seq=int(body["seq"]),
                contributors=tuple(body["contributors"]),
                failed_attempts=int(body["failed_attempts"]),
                algorithm=str(body["algorithm"]),
                duration_s=float(body["duration_s"]),
                zero_copy=zero_copy,
            )

        handle = Handle(self._conn, rid, finish, t + _MARGIN_S)
        return handle if async_op else handle.wait()

    def _prepare(self, x: Array) -> tuple[BufRef, Callable[[bool], None], bool]:
        """(where the daemon finds the data, what to do when the op ends, zero-copy?)."""
        arr, back = _as_numpy(x, self)
        if not isinstance(arr, np.ndarray):
            raise UnsupportedError(f"expected a numpy array or a torch tensor, got {type(x)}")
        if not arr.flags.writeable:
            raise UnsupportedError("the array is read-only; collectives work in place")
        ref = self._locate(arr)
        if ref is not None:
            return ref, back, back is _nothing
        # copy in once, out once (on success only): staging memory from the pool
        nbytes = max(arr.nbytes, 1)
        region = self._staging.take(nbytes) or self._map(max(nbytes, 1 << 20))
        view = region.array(0, arr.dtype, arr.shape)
        np.copyto(view, arr)
        ref = BufRef(region.rid, 0, arr.dtype.name, tuple(arr.shape))

        def done(ok: bool) -> None:
            if ok:
                np.copyto(arr, view)
                back(True)
            for extra in self._staging.give(region):
                self._unmap(extra)

        return ref, done, False

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
        changes under the op, run it again in the next view (exact: the input was
        restored) instead of raising ``ViewChanged``. ``timeout``: deadline in seconds
        for the whole call, retries included (default ``op_timeout``)."""
        return self._submit("all_reduce", x, reduce=op, codec=codec, retry=retry,
                            timeout=timeout, async_op=async_op)  # fmt: skip

    @overload
    def reduce_scatter(self, x: Array, op: str = ..., codec: str = ..., *,
                       async_op: Literal[False] = ..., retry: bool = ...,
                       timeout: float | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def reduce_scatter(self, x: Array, op: str = ..., codec: str = ..., *,
                       async_op: Literal[True], retry: bool = ...,
                       timeout: float | None = ...) -> Handle: ...  # fmt: skip
    def reduce_scatter(
        self, x: Array, op: str = "sum", codec: str = "none", *, async_op: bool = False,
        retry: bool = False, timeout: float | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Reduce over the view; only this member's chunk of ``x`` (flat, see
        :meth:`chunk`) is written with the result, the rest keeps its values."""
        return self._submit("reduce_scatter", x, reduce=op, codec=codec, retry=retry,
                            timeout=timeout, async_op=async_op)  # fmt: skip

    @overload
    def all_gather(self, x: Array, codec: str = ..., *, async_op: Literal[False] = ...,
                   retry: bool = ..., timeout: float | None = ...) -> OpResult: ...  # fmt: skip
    @overload
    def all_gather(self, x: Array, codec: str = ..., *, async_op: Literal[True],
                   retry: bool = ..., timeout: float | None = ...) -> Handle: ...  # fmt: skip
    def all_gather(
        self, x: Array, codec: str = "none", *, async_op: bool = False, retry: bool = False,
        timeout: float | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Each member contributes its chunk of ``x`` (flat, :meth:`chunk`); afterwards
        every member's ``x`` holds every chunk."""
        return self._submit("all_gather", x, codec=codec, retry=retry, timeout=timeout,
                            async_op=async_op)  # fmt: skip

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
        return self._submit("broadcast", x, codec=codec, root=root, retry=retry,
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
        return self._submit("barrier", None, retry=retry, timeout=timeout, async_op=async_op)

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
    def begin_step(self, step: int | None = None, *, timeout: float | None = None) -> StepInfo:
        """Mark a step boundary: a pending view is installed and, if this member's state
        differs from the group's, the group's state is received (verified by hash)
        **in place** into the attached arrays. ``step`` defaults to the state's step."""
        t = self.op_timeout if timeout is None else timeout
        b = self._conn.call(Kind.BEGIN_STEP, {"step": step, "timeout": t}, t + _MARGIN_S)
        return StepInfo(
            int(b["epoch"]), tuple(b["members"]), int(b["step"]), bool(b["synced"]),
            int(b["sync_bytes"]),
        )  # fmt: skip

    def commit(self, step: int, ok: bool = True, *, timeout: float | None = None) -> bool:
        """Vote on ``step``; the group's decision, the same on every member (promise 4).
        Apply the step only on True. ``CommitUnknown`` if no decision came in time."""
        t = self.op_timeout if timeout is None else timeout
        body = {"step": int(step), "ok": bool(ok), "timeout": t}
        return bool(self._conn.call(Kind.COMMIT, body, t + _MARGIN_S)["committed"])

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
            entries.append({"name": name, "buf": ref.to_body()})
        body = {"entries": entries, "step": step}
        return int(self._conn.call(Kind.STATE_ATTACH, body, self._state_timeout)["step"])

    def update_state(self, step: int, changed: list[str] | None = None) -> None:
        """The attached arrays (all, or those named) now hold ``step``'s values."""
        self._conn.call(Kind.STATE_UPDATE, {"step": int(step), "changed": changed},
                        self._state_timeout)  # fmt: skip

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
        entries: list[dict[str, Any]] = []
        staged: list[tuple[int, np.ndarray]] = []  # (entry index, array)
        total = 0
        for path, arr in leaves:
            ref = self._locate(arr) if arr.nbytes else None
            if ref is None:
                staged.append((len(entries), arr))
                entries.append({"path": path, "buf": None})
                total += -(-arr.nbytes // _ALIGN) * _ALIGN
            else:
                ref = BufRef(ref.region, ref.offset, _dtype_str(arr.dtype), ref.shape)
                entries.append({"path": path, "buf": ref.to_body()})
        region: Region | None = None
        if staged:
            region = self._staging.take(max(total, 1)) or self._map(max(total, 1 << 20))
            off = 0
            for i, arr in staged:
                dst = region.bytes[off : off + arr.nbytes]
                np.copyto(dst, arr.reshape(-1).view(np.uint8))  # the staging copy
                ref = BufRef(region.rid, off, _dtype_str(arr.dtype), tuple(arr.shape))
                entries[i]["buf"] = ref.to_body()
                off += -(-arr.nbytes // _ALIGN) * _ALIGN
        t = self._seal_timeout if timeout is None else float(timeout)
        try:
            body = self._conn.call(Kind.SNAPSHOT, {"entries": entries, "step": step}, t + _MARGIN_S)
        finally:
            if region is not None:
                for extra in self._staging.give(region):
                    self._unmap(extra)
        return SnapshotHandle(self, body, time.perf_counter() - t0, not staged)

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
        t = self._seal_timeout if timeout is None else float(timeout)
        if not t > 0:
            raise ConfigError("timeout must be > 0")
        body = {"member": member, "step": None if step is None else int(step), "timeout": t}
        frame = self._conn.wait_frame(self._conn.send(Kind.RESTORE, body), t + 2 * _MARGIN_S)
        if frame.fd is None:
            raise DaemonUnavailable("the daemon's restore reply carried no memory")
        size = int(frame.body["size"])
        region = Region.adopt(-1, frame.fd, size + mmap_page())  # closes the fd
        state: dict[str, Any] = {}
        for e in frame.body["entries"]:
            arr = region.array(int(e["offset"]), _restored_dtype(str(e["dtype"])),
                               tuple(int(d) for d in e["shape"]))  # fmt: skip
            node = state
            path = [str(p) for p in e["path"]]
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = arr
        return int(frame.body["step"]), state

    # ------------------------------------------------------------------ views
    def view(self) -> ViewInfo:
        """The daemon's current view."""
        return _view(self._conn.call(Kind.VIEW, {}, _CONTROL_TIMEOUT))

    def on_view_change(self, fn: Callable[[ViewInfo], None]) -> None:
        """Call ``fn(view)`` on every new view (from a client thread; keep it short).
        The first call opens an event connection to the daemon."""
        self._callbacks.append(fn)
        if self._watch is not None:
            return
        watch = Connection(self._conn.path)
        watch.call(Kind.WATCH, {}, _CONTROL_TIMEOUT)
        self._watch = watch
        self._watcher = threading.Thread(
            target=self._watch_loop, args=(watch,), name="phalanx-client-watch", daemon=True
        )
        self._watcher.start()

    def _watch_loop(self, watch: Connection) -> None:
        while not self._stop.is_set():
            try:
                body = watch.next_event(0.25)
            except DaemonUnavailable:
                if not self._stop.is_set():
                    log.warning("event=watch_lost socket=%s", watch.path)
                return
            if body is None or "view" not in body:
                continue
            info = _view(body["view"])
            for fn in list(self._callbacks):
                try:
                    fn(info)
                except Exception:
                    log.exception("event=view_callback_failed epoch=%d", info.epoch)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Say goodbye and close (idempotent). In embedded mode this also stops the
        daemon (leaving the group) and the coordinator started with it."""
        self._stop.set()
        if self._conn.alive:
            with contextlib.suppress(DaemonUnavailable, TimeoutError, OSError):
                self._conn.call(Kind.BYE, {}, 2.0)
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


def _dtype_str(dt: np.dtype[Any]) -> str:
    return dt.name if dt.kind == "V" else dt.str


def _restored_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return dt


def _layout_error(reason: str, detail: str, path: str) -> Exception:
    from phalanx.checkpoint.layout import LayoutError

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
        # zero-copy collective on the host pages, host -> device copy on success.
        # Not exercised on CPU-only machines (see the module docstring).
        host = torch.from_numpy(client.empty(tuple(t.shape), _torch_dtype_name(t.dtype)))
        with contextlib.suppress(Exception):  # pin the shared pages for fast DMA
            torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
                host.data_ptr(), host.numel() * host.element_size(), 0
            )
        host.copy_(t)

        def back_cuda(ok: bool) -> None:
            if ok:
                t.copy_(host, non_blocking=False)

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


def connect(
    socket: str | None = None, *, timeout: float = 5.0, op_timeout: float | None = None
) -> Client:
    """Connect to the local daemon at ``socket`` (default: ``$PHALANX_SOCKET``, else the
    daemon's default path, :func:`phalanx.config.default_socket_path`).
    Raises :class:`DaemonUnavailable` if none answers."""
    path = socket or os.environ.get("PHALANX_SOCKET")
    if not path:
        from phalanx.config import default_socket_path

        path = default_socket_path()
    conn = Connection(path, timeout)
    try:
        return Client(conn, op_timeout=op_timeout or _DEFAULT_OP_TIMEOUT)
    except BaseException:
        conn.close()
        raise


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
    import tempfile

    tmp = tempfile.mkdtemp(prefix="phalanx-")
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

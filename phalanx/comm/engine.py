"""The progress engine: one I/O thread per group that runs collectives as dataflow plans.

A collective is compiled (by :mod:`phalanx.comm.collectives`) into a :class:`Plan`: per
link an ordered list of frames to send and an ordered list of frames to receive, plus
compute steps (reduce, decode, finalize), tied together by dependency counts. The engine
owns every socket of the group; its thread waits in ``epoll`` on all links at once,
receives each frame's payload straight into the buffer its receive node names, runs
the compute that the arrival unlocks, and sends whatever became ready — so receiving,
reducing and sending overlap piece by piece without a thread per link.

Between operations the thread keeps answering liveness probes (PING) and noticing
peers that leave, so a failure is known before the next operation starts. An op that
follows another closely starts on its caller's thread (:meth:`Engine.submit`): one
lock, ``_state``, guards the engine's state, held by the engine thread between polls
and taken by a caller only when free. Starting reads the frames that arrived early,
and an op whose frames are all in by then (or that needs none, or fails at once) ends
there, on the caller's thread; everything after the start runs on the engine thread.

Failure handling lives here too: a closed link, a malformed or foreign-epoch frame, an
ABORT from a peer, no progress for ``timeout_s`` (after a PING probe to find out who
is actually silent), or the caller's deadline (``plan.deadline``: passed or cancelled,
reason ``aborted``) fails the operation with :class:`~phalanx.errors.PeerFailure`,
tells every peer (ABORT naming the suspects), and breaks the group: later operations
raise at once, and the plan's undo steps put the caller's array back (promise 2; the
page-swapped ring has none: it writes the array only once it has succeeded).

A caller's mistake is not a failure: every DATA frame carries the digest of its op's
descriptor (comm/descriptor.py), checked before its payload may land in a plan's
buffer. A foreign digest (or a peer's MISMATCH frame) stops the plan, and the ranks
swap their full descriptors (MISMATCH frames); once every rank's is in, and no frame
of the op is still half sent or half received, the op fails with
:class:`~phalanx.errors.OpMismatch` on every rank, the input is restored, and the next
op runs as usual. Frames of that op still on their way are read and dropped.

What it must never do: block on a socket, allocate a receive buffer from a length
field it has not checked, or leave a caller waiting past its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, cast

from phalanx.comm import pageswap, zerocopy
from phalanx.comm.buffers import BufferPool
from phalanx.comm.descriptor import (
    OpDescriptor,
    decode_mismatch,
    encode_mismatch,
    mismatch_error,
)
from phalanx.comm.frames import FLAG_RECEIPT, FrameHeader, FrameKind, encode_header
from phalanx.comm.observer import CommObserver, LinkSample, OpSample
from phalanx.comm.options import CommOptions
from phalanx.comm.plan import ComputeNode, Node, Plan, RecvNode, SendNode
from phalanx.comm.transport import Buffer, Channel, tcp_info
from phalanx.errors import CommError, FrameError, GroupClosed, PeerFailure
from phalanx.ops import OpResult

__all__ = ["Engine", "FrameHook", "LinkStats"]

log = logging.getLogger(__name__)

# reason code, detecting rank + 1 (0: unknown), number of suspects; then u32 per suspect
_ABORT = struct.Struct("<BIH")
_ABORT_REASONS = (
    "aborted",
    "disconnected",
    "timeout",
    "protocol",
    "foreign-epoch",
    "closed",
    "view-change",
)
_MAX_CONTROL_PAYLOAD = 4096
#: ops that ended in a mismatch whose late DATA frames are still read and dropped
_STALE_SEQS = 64
# control frames (PONG, RECEIPT, MISMATCH) waiting on one link for the socket: a peer
# has at most a few unanswered (one PING per probe, one RECEIPT per op); one that
# sends PINGs without reading the PONGs would grow the queue without bound
_MAX_QUEUED_CONTROL = 1024
#: how far ahead of this rank a peer's MISMATCH frame may be (seqs); farther is a
#: protocol error (a peer can be one or two ops ahead at most: see docs/comm.md)
_EARLY_SEQS = 64
_SINK_KEEP_BYTES = 4 << 20
#: longest sleep in epoll while no op runs: every event an idle engine acts on (a
#: submitted plan, abort, close, a peer's frame or EOF) wakes it through a socket,
#: so this is only a backstop; a short one cost an idle daemon ~20 wake-ups a second
_IDLE_POLL_S = 1.0
#: longest sleep while an op runs (progress checks and probes are due on this clock)
_BUSY_POLL_S = 0.05
#: for this long after an op ends the idle engine still sleeps at most _BUSY_POLL_S:
#: the next op of a training loop may then start on its caller's thread (see
#: Engine.submit), and the engine thread still looks at it within _BUSY_POLL_S
_ACTIVE_S = 0.25
#: at most this many plans are kept for reuse (each keeps its work array and one per
#: exchange step, ~log2(world), of at most options.small_bytes each): a loop of small
#: ops of a few shapes reuses them all
_REUSABLE_PLANS = 16


class FrameHook(Protocol):
    """Fault injection (tests and ``phalanx stress``): sees every outgoing DATA frame.

    Return ``None`` to send the frame unchanged, or the (header, payload) to send
    instead — corrupted, re-epoched, with a lying length field. It runs on the engine
    thread (or, for the first frames of an op started inline, on its caller's thread
    with the engine's state held), so sleeping in it makes this rank slow, as a
    straggler would be.
    """

    def outgoing(
        self, peer: int, seq: int, ordinal: int, header: bytes, payload: Buffer
    ) -> tuple[bytes, Buffer] | None: ...


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Running totals of one link (one stream to one peer) and its kernel's view."""

    peer: int
    stream: int
    bytes_sent: int
    bytes_recv: int
    rtt_s: float | None
    retransmits: int | None


# ----------------------------------------------------------------------------- per-link state


class _Link:
    """Engine-side state of one channel: queues of the running plan, control frames."""

    __slots__ = (
        "blocked",
        "blocked_since",
        "channel",
        "ctrl",
        "current",
        "draining",
        "first",
        "frames",
        "landing",
        "last",
        "paused",
        "peer",
        "recv0",
        "recvs",
        "sends",
        "sent0",
        "want_write",
    )

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.peer = channel.peer
        self.ctrl: deque[bytes] = deque()
        self.current: SendNode | None = None
        self.sends: deque[SendNode] = deque()
        self.recvs: deque[RecvNode] = deque()
        self.want_write = False
        # not reading: a frame of an operation this rank has not started is parked
        self.paused = False
        # a DATA frame's payload is being received into the running plan's memory
        self.landing = False
        # after a failure: our side is shut down, the peer's bytes are read and dropped
        # until it closes too (closing with unread bytes would send a reset that can
        # destroy the ABORT we just sent)
        self.draining = False
        # measurements of the running operation (see observer.LinkSample)
        self.sent0 = self.recv0 = self.frames = 0
        self.first: float | None = None
        self.last: float | None = None
        self.blocked = 0.0
        self.blocked_since: float | None = None


@dataclass
class _Probe:
    waited: frozenset[int]
    deadline: float
    answered: set[int] = field(default_factory=set)


class _PeerLeft(Exception):
    """A peer said BYE: it closed the group on purpose."""


class _OpFailed(Exception):
    def __init__(
        self,
        suspects: Iterable[int],
        reason: str,
        detail: str,
        detected_by: int | None,
        *,
        relayed: bool = False,
    ) -> None:
        self.relayed = relayed
        super().__init__(detail)
        self.suspects = frozenset(suspects)
        self.reason = reason
        self.detail = detail
        self.detected_by = detected_by


# ----------------------------------------------------------------------------- engine


class Engine:
    """Owns the group's channels and runs submitted plans in submission order."""

    def __init__(
        self,
        *,
        rank: int,
        world: int,
        epoch: int,
        channels: Sequence[Channel],
        options: CommOptions,
        name: str = "phalanx-engine",
        frame_hook: FrameHook | None = None,
        observer: CommObserver | None = None,
        names: Sequence[str] | None = None,
        on_break: Callable[[], None] | None = None,
    ) -> None:
        self.rank = rank
        #: what OpResult.contributors calls each rank (default: "0", "1", ...)
        self.names = tuple(names) if names is not None else tuple(str(r) for r in range(world))
        self.observer = observer
        self.frame_hook = frame_hook
        # told once, with no engine lock held, when the group breaks: whoever owns the
        # group learns of a break that reached an idle engine without polling for it
        self._on_break = on_break
        self._break_told = False
        self.pool = BufferPool()
        # twins of page-swapped all-reduces (comm/pageswap.py): mapped memory of their own
        self.twins = BufferPool(alloc=pageswap.new_arena)
        self.world = world
        self.epoch = epoch
        self.options = options
        self.links: dict[int, list[_Link]] = {}
        for ch in sorted(channels, key=lambda c: (c.peer, c.stream)):
            self.links.setdefault(ch.peer, []).append(_Link(ch))
        self._by_fd: dict[int, _Link] = {
            link.channel.fd: link for streams in self.links.values() for link in streams
        }
        self._lock = threading.Lock()
        # held while the engine's state is worked on: by the engine thread between
        # polls, or by a caller starting its plan inline (submit); never across a poll
        self._state = threading.Lock()
        # when the engine thread's current poll ends at the latest, and when the
        # newest op ended (the idle poll stays short for _ACTIVE_S after it)
        self._sleep_until = 0.0
        self._ended = 0.0
        # a bug met while starting a plan inline: the engine thread raises it (its
        # crash handler fails every waiting caller), as if it had met it itself
        self._crash: BaseException | None = None
        #: ops started on their caller's thread (see submit)
        self.inline_starts = 0
        #: plans that can run again (Plan.freeze), by their reuse key: a builder takes
        #: one out (dict.pop: two callers never get the same), the engine puts it back
        #: once the plan ended well and nothing of the engine still reads it
        self.reusable: dict[Hashable, Plan] = {}
        # the plan a caller is starting inline, and whether it ended well meanwhile
        # (its put-back waits until that caller no longer reads it)
        self._starting: Plan | None = None
        self._keep_after_start = False
        self._queue: deque[Plan] = deque()
        self._next_seq = 0
        self._closing = False
        self._broken: PeerFailure | GroupClosed | None = None
        self._current: Plan | None = None
        self._started = 0.0
        self._bytes0 = (0, 0)
        self._last_progress = 0.0
        self._probe: _Probe | None = None
        self._patience = 0
        self._probe_id = 0
        self._dirty: set[_Link] = set()
        # zero-copy sends: a plan that spliced ends once its receivers' RECEIPTs are in
        self._zero_copy = options.zero_copy_min_bytes > 0 and zerocopy.available()
        self._receipted: dict[int, int] = {}  # peer -> newest op it confirmed reading
        # peers with a link gone (BYE or error): ops that still need such a link fail
        self._departed: dict[int, _OpFailed] = {}
        # a failure that belongs to a later op than the running one (see _later_op):
        # the running op may still finish; the group breaks right after it
        self._deferred: _OpFailed | None = None
        self._drain_deadline = 0.0
        self._abort_request: tuple[str, str] | None = None
        # op descriptors (comm/descriptor.py): seqs that ended in a mismatch (their late
        # frames are dropped), MISMATCH frames of ops not started yet, and the buffer
        # that dropped payloads are read into (contents never looked at)
        self._stale: deque[int] = deque(maxlen=_STALE_SEQS)
        self._early: dict[int, dict[int, tuple[OpDescriptor, int | None]]] = {}
        self._sink = bytearray()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        for fd in self._by_fd:
            self._epoll.register(fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def plan(self, kind: str, *, algorithm: str, nbytes: int, codec: str) -> Plan:
        return Plan(self, kind, algorithm=algorithm, nbytes=nbytes, codec=codec)

    def reserve_seq(self) -> int:
        """Sequence number the next submitted plan will get (plans are built with it)."""
        with self._lock:
            return self._next_seq

    def submit(self, plan: Plan) -> Future[OpResult]:
        """Queue ``plan`` (ops run in submission order); its future settles when it ends.

        When the engine is idle and its thread will look again within _BUSY_POLL_S (it
        ended an op less than _ACTIVE_S ago), the plan starts here, on the caller's
        thread: its first frames leave without a wake-up of the engine thread, whose
        poll then sees the peers' frames (frames that came early are read here, and an
        op whose frames are all in ends here). Otherwise the engine thread is woken to
        start it. Either way the engine thread runs what is left and the checks."""
        # taken now: once the op ended, a kept plan (Plan.freeze) may already be
        # another caller's, rearmed with a future of its own
        future = plan.future
        state = self._state.acquire(blocking=False)
        inline = wake = False
        try:
            with self._lock:
                if self._broken is not None or self._closing:
                    err = self._failure_for(plan)
                    plan.release()
                    future.set_exception(err)
                    return future
                plan.seq = self._next_seq
                self._next_seq += 1
                inline = state and self._idle_and_watched()
                if not inline:
                    self._queue.append(plan)
                    wake = True
            if inline:
                wake = self._start_inline(plan)
        finally:
            if state:
                self._state.release()
            if wake:
                self._wake()
        return future

    def _start_inline(self, plan: Plan) -> bool:
        """Start ``plan`` on the caller's thread (``_state`` held); whether the engine
        thread must be woken (something went wrong that it has to act on). A kept plan
        that ended well here goes back to ``reusable`` only once this is done with it."""
        self._starting = plan
        keep = False
        try:
            self.inline_starts += 1
            try:
                self._start(plan)
                self._flush()
            except _OpFailed as exc:
                self._fail_current(exc)
            keep = self._keep_after_start
        except Exception as exc:  # pragma: no cover - a bug
            log.exception("event=engine-inline-start-crash rank=%d", self.rank)
            self._crash = exc  # the engine thread raises it: its crash handler runs
            if not plan.future.done():
                plan.future.set_exception(CommError(f"phalanx engine crashed: {exc!r}"))
            return True
        except BaseException:
            self._interrupted(plan)
            self._wake()
            raise
        finally:
            self._starting = None
            self._keep_after_start = False
        if keep:
            self._keep(plan)
        return False

    def _interrupted(self, plan: Plan) -> None:
        """KeyboardInterrupt (signals reach the main thread, which may be the caller)
        while ``plan`` was being started inline (``_state`` still held). An op that
        already ended is left as it is; otherwise it fails as abort() fails one --
        input restored, peers told (ABORT for its seq), the group broken -- by the
        engine thread before it reads another frame. One not yet made current goes
        back to the head of the queue for that; one whose failure this thread was in
        the middle of is finished here (undo steps put the saved input back, so
        running them again is harmless)."""
        if plan.future.done():
            return
        if self._broken is None:
            with self._lock:
                if self._current is not plan:
                    self._queue.appendleft(plan)
                if self._abort_request is None:
                    self._abort_request = (
                        "aborted",
                        "interrupted while the op was being started on the caller's thread",
                    )
            return
        if self._current is plan:
            self._current = None
        self._settle_failed(plan, self._failure_for(plan))
        self._fail_queued(None)

    def _idle_and_watched(self) -> bool:
        """No op runs or waits, nothing is to be delivered, and the engine thread's
        poll ends within _BUSY_POLL_S (callers hold ``_state`` and ``_lock``)."""
        return (
            self._current is None
            and not self._queue
            and self._broken is None
            and self._crash is None
            and self._deferred is None
            and self._abort_request is None
            and self._sleep_until - time.monotonic() <= _BUSY_POLL_S
        )

    def abort(self, reason: str = "view-change", detail: str = "") -> None:
        """Fail the running op (and every later one) from any thread, at once: the
        caller's buffers are restored and peers are told (ABORT). Used when the
        membership layer installs a new view."""
        with self._lock:
            if self._abort_request is None:
                self._abort_request = (reason, detail or "aborted by this rank")
        self._wake()

    @property
    def broken(self) -> PeerFailure | GroupClosed | None:
        return self._broken

    def close(self, timeout: float = 5.0) -> None:
        """Say BYE to every peer, fail queued work with GroupClosed, join the thread.
        An op still in flight is aborted (reason ``closed``; its input restored)."""
        with self._lock:
            self._closing = True
            if self._current is not None and self._abort_request is None:
                self._abort_request = ("closed", "the group was closed under this operation")
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - the wake above ends its sleep at once
            log.error("event=engine-join-timeout rank=%d", self.rank)
        for streams in self.links.values():
            for link in streams:
                link.channel.close()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _failure_for(self, plan: Plan) -> PeerFailure | GroupClosed:
        broken = self._broken
        if isinstance(broken, PeerFailure):
            return PeerFailure(
                op=plan.kind,
                seq=plan.seq if plan.seq >= 0 else self._next_seq,
                epoch=self.epoch,
                suspects=broken.suspects,
                reason=broken.reason,
                detected_by=broken.detected_by,
                detail=f"the group broke earlier: {broken}",
            )
        return GroupClosed(f"group (rank {self.rank}, epoch {self.epoch}) is closed")

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug; never leave callers hanging
            log.exception("event=engine-crash rank=%d", self.rank)
            err = CommError(f"phalanx engine crashed: {exc!r}")
            # under _state: no caller starts a plan inline while (or after) this runs
            with self._state:
                self._sleep_until = math.inf
                with self._lock:
                    self._broken = GroupClosed(str(err))
                    plans = list(self._queue)
                    self._queue.clear()
                if self._current is not None:
                    plans.insert(0, self._current)
                for plan in plans:
                    if not plan.future.done():
                        plan.future.set_exception(err)
            self._tell_broken()
        finally:
            self._shutdown_links()

    def _loop(self) -> None:
        poll = self._epoll.poll
        while True:
            self._tell_broken()
            with self._state:
                if not self._between_polls():
                    return
                timeout = self._poll_timeout()
                self._sleep_until = time.monotonic() + timeout
            events = poll(timeout)
            with self._state:
                self._sleep_until = 0.0
                # what a caller's inline start left: acted on before any frame is read
                self._requested()
                self._handle(events)

    def _tell_broken(self) -> None:
        """(Engine thread, no lock held.) Call ``on_break`` once the group has broken."""
        if self._broken is None or self._break_told or self._on_break is None:
            return
        self._break_told = True
        try:
            self._on_break()
        except Exception:  # its owner's bug must not take the engine down
            log.exception("event=on-break-error rank=%d", self.rank)

    def _requested(self) -> None:
        """Raise a crash a caller met starting a plan inline; fail the current op for
        an abort requested (abort(), close(), an interrupted inline start)."""
        if self._crash is not None:
            raise self._crash
        if self._abort_request is not None and self._broken is None:
            reason, detail = self._abort_request
            self._fail_current(_OpFailed((), reason, detail, self.rank))

    def _between_polls(self) -> bool:
        """Deliver verdicts and start the next queued plan; False once closed."""
        if self._closing and self._current is not None and self._abort_request is None:
            # close() found no op running, but one was being started: abort it too
            with self._lock:
                if self._abort_request is None:
                    self._abort_request = (
                        "closed",
                        "the group was closed under this operation",
                    )
        self._requested()
        if self._deferred is not None and self._current is None:
            # the running op ended; the group broke in a later one: tell everyone
            self._fail_current(self._deferred)
        if self._current is None:
            with self._lock:
                closing = self._closing
                # closing: queued plans fail (below), none starts (close() would
                # otherwise shut the links under it once its join timed out)
                ready = self._queue and self._broken is None and not closing
                nxt = self._queue.popleft() if ready else None
            if nxt is not None:
                self._start(nxt)
                try:
                    self._flush()
                except _OpFailed as exc:
                    self._fail_current(exc)
            elif closing:
                self._fail_queued(GroupClosed("group closed"))
                return False
        return True

    def _handle(self, events: list[tuple[int, int]]) -> None:
        """Act on what one poll returned, then send what became ready and check
        progress."""
        now = time.monotonic()
        wake_fd = self._wake_r.fileno()
        for fd, mask in events:
            if fd == wake_fd:
                # one read: more than 4096 wake bytes between two polls cannot
                # happen, and any left would only report the fd ready again
                with contextlib.suppress(BlockingIOError, OSError):
                    self._wake_r.recv(4096)
                continue
            link = self._by_fd.get(fd)
            if link is None or link.channel.closed:
                continue
            if link.draining:
                self._drain(link)
                continue
            try:
                if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self._pump_in(link)
                if mask & select.EPOLLOUT:
                    self._dirty.add(link)
            except _OpFailed as exc:
                self._fail_current(exc)
        try:
            self._flush()
        except _OpFailed as exc:
            self._fail_current(exc)
        if self._current is not None:
            self._check_progress(now)
        elif self._drain_deadline:
            self._expire_drains(now)

    def _poll_timeout(self) -> float:
        if self._dirty:
            return 0.0
        now = time.monotonic()
        if self._current is None:
            if self._broken is None and (
                self._queue or self._deferred is not None or self._abort_request is not None
            ):
                return 0.0  # the loop's top has work: a queued plan, a verdict to deliver
            idle = _BUSY_POLL_S if now - self._ended < _ACTIVE_S else _IDLE_POLL_S
            if self._drain_deadline:
                return max(0.0, min(self._drain_deadline - now, idle))
            return idle
        if self._probe is not None:
            left = self._probe.deadline - now
        else:
            left = self._last_progress + self.options.timeout_s - now
        return max(0.0, min(left, _BUSY_POLL_S))

    # ---- starting and finishing plans
    def _start(self, plan: Plan) -> None:
        started = time.monotonic()
        # what inflight() reads from other threads is written before _current: a hang
        # check never pairs this op with the previous op's progress time
        self._started = self._last_progress = started
        self._probe = None
        self._patience = 0
        # the links' counters start over first: an op that fails at once (below) must
        # not report the previous op's bytes as its own
        for streams in self.links.values():
            for link in streams:
                link.sent0 = link.channel.bytes_sent
                link.recv0 = link.channel.bytes_recv
                link.frames = 0
                link.first = link.last = None
                link.blocked = 0.0
                link.blocked_since = started if link.want_write else None
        self._current = plan
        if self._expired(plan, started):
            return  # given up before it started: it must not pair with the next op
        if self.observer is not None:
            try:
                self.observer.op_started(plan.kind, plan.seq, self.epoch, plan.nbytes)
            except Exception:
                log.exception("event=observer-error rank=%d", self.rank)
        for key, sends in plan.sends.items():
            link = cast(_Link, key)
            link.sends = sends
            self._dirty.add(link)
        for key, recvs in plan.recvs.items():
            cast(_Link, key).recvs = recvs
        try:
            if plan.seq in self._early:
                # a peer already told us the ranks disagree on this op: send nothing
                first = next(iter(self._early[plan.seq].values()))
                self._mismatched(plan, first[1])
            else:
                ready, plan.ready = plan.ready, []
                for node in ready:
                    self._activate(node)
            # frames that arrived before this plan started wait parked on their link
            for streams in self.links.values():
                for link in streams:
                    if self._current is plan and link.paused:
                        self._resume(link)
            if self._current is plan:
                for peer, failure in self._departed.items():
                    if self._needs_dead_link(peer):
                        raise failure
        except _OpFailed as exc:
            self._fail_current(exc)
            return
        if self._current is plan and plan.mismatch is not None:
            self._maybe_end_mismatch()
        elif self._current is plan and plan.pending == 0:
            self._seal()

    def _expired(self, plan: Plan, now: float) -> bool:
        """Fail ``plan`` if its caller's deadline passed (or was cancelled): nobody is
        to blame, so no suspects; peers learn it from the ABORT and fail too (an op
        this rank gives up on must never pair with its next one)."""
        deadline = plan.deadline
        if deadline is None or now < deadline.at:
            return False
        why = "cancelled by the caller" if deadline.cancelled else "the caller's deadline passed"
        late = sorted(self._waited_peers())
        self._fail_current(_OpFailed((), "aborted", f"{why} (waiting on ranks {late})", self.rank))
        return True

    def _queued_expired(self, now: float) -> bool:
        """A plan queued behind the running one reached its deadline (or was
        cancelled): it can only be given up on with the group (its seq is taken, and
        peers would pair it with this rank's next op), so the running op fails now,
        reason ``aborted``, and every queued plan with it. Without this a queued
        plan's deadline waited for the op ahead, however long that took."""
        with self._lock:
            late = next(
                (p for p in self._queue if p.deadline is not None and now >= p.deadline.at), None
            )
        if late is None:
            return False
        assert late.deadline is not None
        why = "was cancelled" if late.deadline.cancelled else "reached its deadline"
        detail = f"{late.kind} #{late.seq}, queued behind this op, {why}"
        self._fail_current(_OpFailed((), "aborted", detail, self.rank))
        return True

    def _resume(self, link: _Link) -> None:
        link.paused = False
        self._set_mask(link)
        self._pump_in(link)

    def _pump_in(self, link: _Link) -> None:
        """Read what the link has; a broken link becomes a link failure (an ABORT or a
        plan's own failure propagates as _OpFailed to the caller)."""
        channel = link.channel
        before = channel.bytes_recv
        try:
            channel.pump_recv(self)
        except FrameError as exc:
            reason = "foreign-epoch" if exc.reason == "foreign-epoch" else "protocol"
            self._link_failed(link, reason, f"bad frame from rank {link.peer}: {exc}")
        except _PeerLeft as exc:
            self._link_failed(link, "closed", str(exc))
        except OSError as exc:
            self._link_failed(link, "disconnected", f"link to rank {link.peer}: {exc}")
        else:
            if channel.mid_frame and channel.bytes_recv != before:
                # part of a frame came in: a slow wire, not a silent peer (a whole
                # frame slower than timeout_s must not fail the op: see _check_progress)
                self._last_progress = time.monotonic()
                self._patience = 0

    def _activate(self, node: Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, ComputeNode):
                n.fn()
                stack.extend(self._complete(n))
            elif isinstance(n, SendNode):
                self._dirty.add(cast(_Link, n.state))
            # RecvNodes need no activation: they wait for their frame

    def _complete(self, node: Node) -> list[Node]:
        node.done = True
        plan = self._current
        assert plan is not None
        plan.pending -= 1
        ready = []
        for child in node.children:
            child.waiting -= 1
            if child.waiting == 0:
                ready.append(child)
        return ready

    def _complete_and_activate(self, node: Node) -> None:
        for child in self._complete(node):
            self._activate(child)
        plan = self._current
        if plan is not None and plan.pending == 0:
            self._seal()

    def _seal(self) -> None:
        """Every node of the current plan is done. A plan that spliced frames (sent
        pages, not copies: comm/zerocopy.py) ends only once each of those receivers
        confirmed it has read them (a RECEIPT): until then writing the memory they came
        from -- the caller's array, once a twin's pages are exchanged into it -- would
        change bytes in flight. Its own RECEIPTs go out first: two ranks that spliced
        to each other would otherwise wait for each other."""
        plan = self._current
        assert plan is not None
        if plan.spliced:
            if not plan.receipts_sent:
                plan.receipts_sent = True
                self._send_receipts(plan)
            awaited = self._receipts_awaited()
            for peer in awaited:
                if self._needs_dead_link(peer):  # gone already: no RECEIPT will come
                    failure = self._departed.get(peer) or _OpFailed(
                        {peer}, "disconnected", f"link to rank {peer} closed", self.rank
                    )
                    self._fail_current(failure)
                    return
            if awaited:
                return  # frame_done finishes it when the last RECEIPT comes
        self._finish()

    def _finish(self) -> None:
        plan = self._current
        assert plan is not None
        try:
            for fn in plan.success:
                fn()
        except Exception as exc:  # pragma: no cover - a bug in a plan's finalizer
            self._current = None
            if plan.spliced:
                plan.borrowed = []
            plan.release()
            plan.future.set_exception(exc)
            return
        if not plan.receipts_sent:
            self._send_receipts(plan)
        if len(self._sink) > _SINK_KEEP_BYTES:  # a big dropped frame once: do not keep it
            self._sink = bytearray()
        plan.release()  # spliced memory too: _seal waited for the RECEIPTs
        now = time.monotonic()
        samples = self._link_samples(now)
        sent = sum(sample.bytes_sent for sample in samples)
        recv = sum(sample.bytes_recv for sample in samples)
        info = OpResult(
            op=plan.kind,
            seq=plan.seq,
            epoch=self.epoch,
            algorithm=plan.algorithm,
            nbytes=plan.nbytes,
            codec=plan.codec,
            world=self.world,
            wire_bytes_sent=sent,
            wire_bytes_recv=recv,
            duration_s=now - self._started,
            contributors=self.names,
            in_twin=plan.into_used,
        )
        self._current = None
        self._ended = now
        self._probe = None
        plan.future.set_result(info)  # the caller first, then the observer
        self._observe(plan, True, now, samples, "", frozenset())
        if plan.reuse_key is not None:
            # its success step named the caller's array: kept, it would keep that
            # memory mapped (a client's region the daemon was told to unmap)
            plan.success = []
            if plan is self._starting:
                self._keep_after_start = True  # submit still reads it: kept after
            else:
                self._keep(plan)

    def _keep(self, plan: Plan) -> None:
        """Put a kept plan that ended well back for the next op of its shape; when
        _REUSABLE_PLANS are kept, the one unused longest goes (a plan taken and put
        back moves to the end: dicts keep insertion order)."""
        kept, key = self.reusable, plan.reuse_key
        if key in kept:
            return  # two ops of one shape ran at once: one plan is enough
        while len(kept) >= _REUSABLE_PLANS:
            try:
                kept.pop(next(iter(kept)), None)
            except (RuntimeError, StopIteration):  # a builder took one meanwhile
                break
        kept.setdefault(key, plan)

    # ---- zero-copy bookkeeping: RECEIPTs (a plan that spliced ends once they are in)
    def _send_receipts(self, plan: Plan) -> None:
        """Tell every peer that asked: all its frames of ``plan`` have been read."""
        for peer in plan.receipts:
            link = self.links[peer][0]
            if link.channel.closed or link.draining:
                continue
            link.ctrl.append(
                encode_header(FrameKind.RECEIPT, epoch=self.epoch, seq=plan.seq, chunk=0, length=0)
            )
            self._dirty.add(link)

    def _link_samples(self, now: float) -> list[LinkSample]:
        samples = []
        for peer, streams in self.links.items():
            sent = recv = frames = 0
            first: float | None = None
            last: float | None = None
            blocked = 0.0
            for link in streams:
                sent += link.channel.bytes_sent - link.sent0
                recv += link.channel.bytes_recv - link.recv0
                frames += link.frames
                if link.first is not None:
                    first = link.first if first is None else min(first, link.first)
                if link.last is not None:
                    last = link.last if last is None else max(last, link.last)
                blocked += link.blocked
                if link.blocked_since is not None:
                    blocked += now - link.blocked_since
            t0 = self._started
            samples.append(
                LinkSample(
                    peer=peer,
                    bytes_sent=sent,
                    bytes_recv=recv,
                    frames_recv=frames,
                    first_byte_s=None if first is None else first - t0,
                    last_byte_s=None if last is None else last - t0,
                    send_blocked_s=blocked,
                )
            )
        return samples

    def _observe(
        self,
        plan: Plan,
        ok: bool,
        now: float,
        samples: list[LinkSample],
        reason: str,
        suspects: frozenset[int],
    ) -> None:
        if self.observer is None:
            return
        sample = OpSample(
            op=plan.kind,
            seq=plan.seq,
            epoch=self.epoch,
            algorithm=plan.algorithm,
            codec=plan.codec,
            nbytes=plan.nbytes,
            world=self.world,
            rank=self.rank,
            ok=ok,
            duration_s=now - self._started,
            reason=reason,
            suspects=suspects,
            links=tuple(samples),
            started=self._started,
            patient=plan.patient,
        )
        try:
            self.observer.op_finished(sample)
        except Exception:
            log.exception("event=observer-error rank=%d", self.rank)

    def receipted(self, peer: int) -> int:
        """The newest op ``peer`` confirmed it has read all our frames of (-1: none)."""
        return self._receipted.get(peer, -1)

    def inflight(self) -> tuple[str, int, float, float] | None:
        """(op, seq, started, last progress) of the running operation, monotonic
        seconds; ``None`` when idle. Safe to call from any thread (a snapshot).

        A patient op (with a deadline: it waits by design, e.g. the state transfer's
        verdict while the receivers take the bytes) reports progress now until its
        deadline: a hang detector must not take that wait, which may last the whole
        transfer, for a hang. Its peers are checked by the engine itself: one that
        does not answer the probe (``timeout_s`` + ``probe_s`` without progress)
        fails the op, and the deadline fails the rest -- one still running past it
        means this engine is stuck, and then it is a hang again. (It used to report
        progress now only once a probe had been answered, so every wait longer than
        the hang floor, 1 s, was a hang until ``timeout_s`` + ``probe_s``: a critical
        alert and a 503 on /healthz on the source and the bystanders of every state
        transfer that long.)"""
        plan, started, progress = self._current, self._started, self._last_progress
        if plan is None:
            return None
        deadline = plan.deadline
        if plan.patient and deadline is not None:  # (a patient plan has one: Group.run)
            now = time.monotonic()
            if now < deadline.at:
                progress = now
        return plan.kind, plan.seq, started, progress

    def waiting_on(self) -> frozenset[int]:
        """Peers the running op still expects frames from or cannot send to (a
        snapshot; empty when idle). Lets a hang verdict name a peer."""
        if self._current is None:
            return frozenset()
        try:
            return frozenset(self._waited_peers())
        except RuntimeError:  # the engine thread changed a queue under us: try later
            return frozenset()

    def link_stats(self) -> list[LinkStats]:
        """Totals and TCP_INFO of every link (any thread; closed links are skipped)."""
        out = []
        for peer, streams in self.links.items():
            for link in streams:
                ch = link.channel
                if ch.closed:
                    continue
                info = tcp_info(ch.sock)
                out.append(
                    LinkStats(
                        peer=peer,
                        stream=ch.stream,
                        bytes_sent=ch.bytes_sent,
                        bytes_recv=ch.bytes_recv,
                        rtt_s=info.rtt_s if info else None,
                        retransmits=info.total_retrans if info else None,
                    )
                )
        return out

    # ---- the FrameSink interface used by Channel.pump_recv
    def frame_dest(self, channel: Channel, header: FrameHeader) -> memoryview | None:
        link = self._by_fd[channel.fd]
        if header.kind != FrameKind.DATA:
            if header.length > _MAX_CONTROL_PAYLOAD:
                raise FrameError("too-large", f"{header.kind.name} frame of {header.length} bytes")
            return memoryview(bytearray(header.length))
        if header.epoch != self.epoch:
            raise FrameError(
                "foreign-epoch", f"frame of epoch {header.epoch} in epoch {self.epoch}"
            )
        plan = self._current
        if plan is not None and header.seq == plan.seq:
            if plan.mismatch is not None:
                return self._dropped(header.length)  # the ranks disagree: nothing lands
            if header.desc != plan.digest:
                self._mismatched(plan, self.rank)
                return self._dropped(header.length)
            if not link.recvs:
                raise FrameError(
                    "unexpected-frame", f"op #{header.seq} expects no more frames here"
                )
            node = link.recvs[0]
            if header.chunk != node.ordinal:
                raise FrameError(
                    "unexpected-frame", f"got piece {header.chunk}, expected {node.ordinal}"
                )
            if link.first is None:
                link.first = time.monotonic()
            if header.flags & FLAG_RECEIPT:
                plan.receipts.add(link.peer)
            if node.prepare is not None:
                node.prepare()
            if header.codec == 0 and node.direct is not None:
                if header.length != len(node.direct):
                    raise FrameError(
                        "bad-payload",
                        f"raw piece of {header.length} bytes, expected {len(node.direct)}",
                    )
                link.landing = True
                return node.direct
            if node.max_encoded == 0 and node.direct is not None and len(node.direct):
                # a receive that takes raw bytes only (an empty piece may come encoded):
                # an encoded frame, even an empty one, would complete it with nothing
                # written -- stale memory reduced into the result, no error
                raise FrameError("bad-codec", f"codec {header.codec} where raw bytes are due")
            if header.length > node.max_encoded:
                raise FrameError(
                    "bad-payload",
                    f"encoded piece of {header.length} bytes, at most {node.max_encoded}",
                )
            link.landing = True
            return memoryview(bytearray(header.length))
        if header.seq in self._stale:
            return self._dropped(header.length)  # sent before its sender heard of the mismatch
        if header.seq < self._next_seq_started():
            raise FrameError("unexpected-frame", f"frame of finished op #{header.seq}")
        # an op this rank has not started yet: park the link until it starts
        if not link.paused:
            link.paused = True
            self._set_mask(link)
        return None

    # ---- mismatched calls (comm/descriptor.py, docs/comm.md "Mismatched calls")
    def _dropped(self, length: int) -> memoryview:
        """Where a payload that must not land anywhere is read to (and forgotten).
        ``length`` was checked against ``max_frame_bytes`` by the header decoder."""
        if len(self._sink) < length:
            self._sink = bytearray(length)
        return memoryview(self._sink)[:length]

    def _mismatched(self, plan: Plan, detected_by: int | None) -> None:
        """The ranks disagree on ``plan``'s op: stop it (nothing more is sent, nothing
        more lands), tell every peer our descriptor, and wait for theirs."""
        if plan.mismatch is not None:
            return
        assert plan.descriptor is not None  # every plan of collectives.py has one
        plan.mismatch = {self.rank: plan.descriptor}
        plan.mismatch_by = detected_by
        for peer, (desc, by) in self._early.pop(plan.seq, {}).items():
            plan.mismatch[peer] = desc
            if plan.mismatch_by is None:
                plan.mismatch_by = by
        self._stale.append(plan.seq)
        self._probe = None
        self._patience = 0
        self._last_progress = time.monotonic()
        for streams in self.links.values():
            for link in streams:
                # a frame half in the kernel (link.current) is finished; the rest never go
                link.sends = deque()
                link.recvs = deque()
        payload = encode_mismatch(plan.descriptor, plan.mismatch_by)
        frame = (
            encode_header(
                FrameKind.MISMATCH,
                epoch=self.epoch,
                seq=plan.seq,
                chunk=0,
                length=len(payload),
                desc=plan.digest,
            )
            + payload
        )
        for streams in self.links.values():
            link = streams[0]
            if link.channel.closed or link.draining:
                continue
            link.ctrl.append(frame)
            self._dirty.add(link)
        log.debug(
            "event=op-mismatch-seen rank=%d epoch=%d op=%s seq=%d detected_by=%s mine=%r",
            self.rank,
            self.epoch,
            plan.kind,
            plan.seq,
            plan.mismatch_by,
            plan.descriptor.describe(),
        )

    def _peer_mismatch(
        self, peer: int, seq: int, desc: OpDescriptor, detected_by: int | None
    ) -> None:
        """A peer's MISMATCH frame: its descriptor for op ``seq``."""
        plan = self._current
        if plan is not None and seq == plan.seq:
            self._mismatched(plan, detected_by)
            assert plan.mismatch is not None
            plan.mismatch[peer] = desc
            self._last_progress = time.monotonic()
            self._maybe_end_mismatch()
            return
        first = self._next_seq_started()
        if seq >= first and (plan is None or seq > plan.seq):
            # an op this rank has not started: remember it until it does
            if seq - first >= _EARLY_SEQS:
                raise FrameError("unexpected-frame", f"MISMATCH for op #{seq}, far ahead")
            self._early.setdefault(seq, {})[peer] = (desc, detected_by)
            return
        raise FrameError("unexpected-frame", f"MISMATCH for finished op #{seq}")

    def _maybe_end_mismatch(self) -> None:
        """End the mismatched op once every rank's descriptor is in and no frame of
        it is half sent or half received (the caller's memory is then ours alone)."""
        plan = self._current
        if plan is None or plan.mismatch is None or len(plan.mismatch) < self.world:
            return
        for streams in self.links.values():
            for link in streams:
                if not link.channel.closed and (link.current is not None or link.landing):
                    return
        assert plan.descriptor is not None
        err = mismatch_error(
            op=plan.kind,
            seq=plan.seq,
            epoch=self.epoch,
            descriptors=plan.mismatch,
            detected_by=plan.mismatch_by,
        )
        self._current = None
        self._ended = time.monotonic()
        self._probe = None
        for streams in self.links.values():
            for link in streams:
                link.current = None
                link.landing = False
        now = time.monotonic()
        self._observe(plan, False, now, self._link_samples(now), "mismatch", frozenset())
        log.warning(
            "event=op-mismatch rank=%d epoch=%d op=%s seq=%d fields=%s detected_by=%s ranks=%r",
            self.rank,
            self.epoch,
            plan.kind,
            plan.seq,
            ",".join(err.fields),
            plan.mismatch_by,
            err.descriptors,
        )
        self._settle_failed(plan, err)

    def _next_seq_started(self) -> int:
        plan = self._current
        if plan is not None:
            return plan.seq
        with self._lock:
            return self._next_seq - len(self._queue)

    def frame_done(self, channel: Channel, header: FrameHeader, payload: memoryview) -> None:
        link = self._by_fd[channel.fd]
        kind = header.kind
        if kind == FrameKind.DATA:
            link.landing = False
            plan = self._current
            if plan is not None and header.seq == plan.seq and plan.mismatch is None:
                self._deliver(link, header, payload)
            elif plan is not None and plan.mismatch is not None:
                self._maybe_end_mismatch()  # a dropped frame: maybe the op's last one
            return
        if kind == FrameKind.PING:
            if len(link.ctrl) >= _MAX_QUEUED_CONTROL:
                raise FrameError(
                    "unexpected-frame",
                    f"PINGs faster than it reads the answers ({len(link.ctrl)} queued)",
                )
            link.ctrl.append(
                encode_header(
                    FrameKind.PONG, epoch=self.epoch, seq=header.seq, chunk=header.chunk, length=0
                )
            )
            self._dirty.add(link)
        elif kind == FrameKind.PONG:
            # only an answer to the probe running now: a late PONG of an earlier one
            # says nothing about whether the peer is alive today
            probe, plan = self._probe, self._current
            if (
                probe is not None
                and plan is not None
                and (header.seq, header.chunk) == (plan.seq, self._probe_id)
            ):
                probe.answered.add(link.peer)
        elif kind == FrameKind.ABORT:
            suspects, reason, by = _decode_abort(bytes(payload))
            failure = _OpFailed(
                suspects, reason, f"rank {link.peer} aborted op #{header.seq}", by, relayed=True
            )
            plan = self._current
            if plan is not None and header.seq > plan.seq:
                # The peer aborts a later op, so it finished this one and sent all of
                # its frames of it before the ABORT: this op may still complete here
                # (an ABORT of op N+1 read before the last frame of op N from another
                # peer failed op N on this rank only -- test_corrupt_frame's rare
                # "assert 2 == 3": ranks disagreed on which op the group broke in).
                self._later_op(failure)
                return
            raise failure
        elif kind == FrameKind.RECEIPT:
            # ops end in order: a RECEIPT for op N confirms every earlier one too
            if header.seq > self.receipted(link.peer):
                self._receipted[link.peer] = header.seq
            plan = self._current
            if plan is not None and plan.receipts_sent and plan.mismatch is None:
                self._seal()  # maybe the RECEIPT it waited for
        elif kind == FrameKind.MISMATCH:
            desc, by = decode_mismatch(payload)
            self._peer_mismatch(link.peer, header.seq, desc, by)
        elif kind == FrameKind.BYE:
            log.debug("event=bye rank=%d peer=%d", self.rank, link.peer)
            raise _PeerLeft(f"rank {link.peer} left the group")
        else:
            raise FrameError("unexpected-frame", f"{kind.name} frame on an established link")

    def _deliver(self, link: _Link, header: FrameHeader, payload: memoryview) -> None:
        if not link.recvs:
            raise FrameError(
                "unexpected-frame", f"op #{header.seq} expects no more frames from here"
            )
        node = link.recvs[0]
        link.recvs.popleft()
        self._last_progress = link.last = time.monotonic()
        link.frames += 1
        self._patience = 0
        if node.then is not None:
            direct = node.direct is not None and payload is node.direct
            try:
                node.then(header.codec, payload, direct)
            except FrameError:
                raise
            except (ValueError, TypeError) as exc:
                raise FrameError("bad-payload", str(exc)) from None
        self._complete_and_activate(node)

    # ---- sending
    def _flush(self) -> None:
        while self._dirty:
            link = self._dirty.pop()
            # a draining link is shut for writing (or its peer broke the protocol):
            # writing now fails with EPIPE, and treating that as a dead peer would
            # close the socket with unread bytes -- a reset that can destroy the
            # ABORT just sent (see _quiesce_links)
            if link.channel.closed or link.draining:
                continue
            try:
                self._pump_out(link)
            except OSError as exc:
                self._link_failed(link, "disconnected", f"link to rank {link.peer}: {exc}")

    def _pump_out(self, link: _Link) -> None:
        channel = link.channel
        while True:
            if channel.sending:
                before = channel.bytes_sent
                if not channel.pump_send():
                    if channel.bytes_sent != before:
                        self._last_progress = time.monotonic()  # part of a frame went out
                        self._patience = 0
                    self._want_write(link, True)
                    return
                node = link.current
                if node is not None:
                    link.current = None
                    self._last_progress = time.monotonic()
                    if self._current is not None and self._current.mismatch is not None:
                        self._maybe_end_mismatch()  # that frame was the op's last word
                    else:
                        self._complete_and_activate(node)
            if link.ctrl:
                channel.queue(link.ctrl.popleft())
                continue
            sends = link.sends
            if sends and sends[0].waiting == 0 and self._current is not None:
                node = sends.popleft()
                codec, payload = node.produce()
                nbytes = len(memoryview(payload).cast("B")) if len(payload) else 0
                zero_copy = (
                    node.zero_copy
                    and self._zero_copy
                    and codec == 0
                    and nbytes >= self.options.zero_copy_min_bytes
                )
                header = encode_header(
                    FrameKind.DATA,
                    epoch=self.epoch,
                    seq=self._current.seq,
                    chunk=node.ordinal,
                    length=nbytes,
                    codec=codec,
                    flags=FLAG_RECEIPT if zero_copy else 0,
                    desc=self._current.digest,
                )
                if self.frame_hook is not None:
                    swapped = self.frame_hook.outgoing(
                        link.peer, self._current.seq, node.ordinal, header, payload
                    )
                    if swapped is not None:
                        header, payload = swapped
                        zero_copy = False
                channel.queue(header, payload, zero_copy=zero_copy)
                if zero_copy:
                    self._current.spliced.add(link.peer)
                link.current = node
                continue
            self._want_write(link, False)
            return

    def _want_write(self, link: _Link, on: bool) -> None:
        if link.want_write != on:
            link.want_write = on
            now = time.monotonic()
            if on:
                link.blocked_since = now
            elif link.blocked_since is not None:
                link.blocked += now - link.blocked_since
                link.blocked_since = None
            self._set_mask(link)

    def _set_mask(self, link: _Link) -> None:
        if link.channel.closed:
            return
        mask = (0 if link.paused else select.EPOLLIN) | (select.EPOLLOUT if link.want_write else 0)
        self._epoll.modify(link.channel.fd, mask)

    # ---- failure detection
    def _check_progress(self, now: float) -> None:
        plan = self._current
        assert plan is not None
        if self._expired(plan, now) or self._queued_expired(now):
            return
        probe = self._probe
        if probe is None:
            if now - self._last_progress < self.options.timeout_s:
                return
            waited = self._waited_peers()
            if not waited:
                return
            self._probe_id += 1
            for peer in waited:
                for link in self.links[peer][:1]:
                    link.ctrl.append(
                        encode_header(
                            FrameKind.PING,
                            epoch=self.epoch,
                            seq=plan.seq,
                            chunk=self._probe_id,
                            length=0,
                        )
                    )
                    self._dirty.add(link)
            self._probe = _Probe(frozenset(waited), now + self.options.probe_s)
            self._flush()
            return
        if now < probe.deadline and not probe.waited <= probe.answered:
            return
        self._probe = None
        silent = probe.waited - probe.answered
        if silent:
            self._fail_current(
                _OpFailed(
                    silent,
                    "timeout",
                    f"no progress for {self.options.timeout_s:g}s and no answer to a probe",
                    self.rank,
                )
            )
            return
        self._patience += 1
        if self._patience >= 2 and not plan.patient:
            self._fail_current(
                _OpFailed(
                    probe.waited,
                    "timeout",
                    "peers alive but the operation made no progress",
                    self.rank,
                )
            )
            return
        # everyone we wait on is alive: they wait on someone else, whose neighbour will
        # tell us (ABORT); give it one more period
        self._last_progress = now

    def _waited_peers(self) -> set[int]:
        plan = self._current
        if plan is not None and plan.mismatch is not None:
            # the MISMATCH exchange: peers whose descriptor is missing, and links that
            # still carry a frame of the op
            waiting = {p for p in self.links if p not in plan.mismatch}
            for peer, streams in self.links.items():
                if any(lk.current is not None or lk.landing for lk in streams):
                    waiting.add(peer)
            return waiting
        waited: set[int] = set()
        for peer, streams in self.links.items():
            for link in streams:
                if link.recvs or (link.want_write and (link.sends or link.current is not None)):
                    waited.add(peer)
        return waited | self._receipts_awaited()

    def _receipts_awaited(self) -> set[int]:
        """Peers whose RECEIPT the running plan waits for (see :meth:`_seal`)."""
        plan = self._current
        if plan is None or not plan.receipts_sent:
            return set()
        return {peer for peer in plan.spliced if self.receipted(peer) < plan.seq}

    def _link_failed(self, link: _Link, reason: str, detail: str) -> None:
        """A link is gone: BYE (``closed``) ends just that stream — frames the peer
        sent before it on its other streams are still read — while an error ends
        every stream to that peer. An op that still needs a dead stream fails."""
        level = logging.INFO if reason == "closed" else logging.WARNING
        log.log(
            level,
            "event=link-down rank=%d peer=%d stream=%d reason=%s detail=%r",
            self.rank,
            link.peer,
            link.channel.stream,
            reason,
            detail,
        )
        graceful = reason == "closed"
        failure = _OpFailed({link.peer}, reason, detail, None if graceful else self.rank)
        if reason in ("protocol", "foreign-epoch"):
            # the peer is alive but broke the contract: stop parsing its bytes, keep the
            # socket so the ABORT tells it why, and break the group now -- or right
            # after the running op when that op needs nothing more of this peer (the bad
            # frame then belongs to a later op: all of this op's frames from the peer
            # arrived, and a frame whose header fails its check says nothing else)
            link.draining = True
            self._want_write(link, False)  # never written again: no EPOLLOUT wake-ups
            self._set_mask(link)
            self._departed.setdefault(link.peer, failure)
            if self._current is not None and not self._needs_peer(link.peer):
                self._later_op(failure)
                return
            self._fail_current(failure)
            return
        streams = self.links.get(link.peer, [])
        for victim in [link] if graceful else streams:
            self._drop(victim)
        self._departed.setdefault(link.peer, failure)
        if self._current is not None and self._needs_dead_link(link.peer):
            self._fail_current(failure)

    def _drop(self, link: _Link) -> None:
        if not link.channel.closed:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(link.channel.fd)
            link.channel.close()

    def _needs_peer(self, peer: int) -> bool:
        """The running op still has frames to receive from, or send to, ``peer``, or
        will wait for its RECEIPT (it spliced frames to it: from the seal on, or
        already now while other peers' frames are still due)."""
        plan = self._current
        if plan is not None and peer in plan.spliced and self.receipted(peer) < plan.seq:
            return True
        return any(
            link.recvs or link.sends or link.current is not None
            for link in self.links.get(peer, ())
        )

    def _later_op(self, failure: _OpFailed) -> None:
        """Break the group once the running op ends (first verdict kept)."""
        if self._deferred is None:
            self._deferred = failure

    def _needs_dead_link(self, peer: int) -> bool:
        plan = self._current
        if plan is not None and plan.mismatch is not None:
            # its MISMATCH frame comes on stream 0, and only while that is open
            return peer not in plan.mismatch and self.links[peer][0].channel.closed
        streams = self.links.get(peer, ())
        if peer in self._receipts_awaited() and streams and streams[0].channel.closed:
            return True  # its RECEIPT comes on stream 0
        return any(
            link.channel.closed and (link.recvs or link.sends or link.current is not None)
            for link in streams
        )

    def _fail_current(self, exc: _OpFailed) -> None:
        plan = self._current
        seq = plan.seq if plan is not None else self._next_seq_started()
        detail = exc.detail
        if plan is not None and not plan.preserves_input:
            detail += "; input NOT preserved (preserve_input=False)"
        failure = PeerFailure(
            op=plan.kind if plan is not None else "idle",
            seq=seq,
            epoch=self.epoch,
            suspects=exc.suspects,
            reason=exc.reason,
            detected_by=exc.detected_by,
            detail=detail,
        )
        self._deferred = None
        first = self._broken is None
        if first:
            self._broken = failure
            log.warning(
                "event=op-failed rank=%d epoch=%d op=%s seq=%d reason=%s suspects=%s detected_by=%s",
                self.rank,
                self.epoch,
                failure.op,
                seq,
                exc.reason,
                sorted(exc.suspects),
                exc.detected_by,
            )
            # every rank that fails passes the verdict on before it shuts its links,
            # so a peer never reads our FIN before the reason for it
            try:
                self._broadcast_abort(seq, exc.suspects, exc.reason, exc.detected_by)
            except Exception:  # pragma: no cover - a bug: the undo steps below must run
                log.exception("event=abort-broadcast-failed rank=%d seq=%d", self.rank, seq)
        self._current = None
        self._probe = None
        if first:
            # nothing more may land in any plan's buffers: the group is over
            self._quiesce_links()
        if plan is not None:
            now = time.monotonic()
            self._observe(plan, False, now, self._link_samples(now), exc.reason, exc.suspects)
            self._settle_failed(plan, failure)
        self._fail_queued(None)

    def _settle_failed(self, plan: Plan, failure: CommError) -> None:
        """Put the caller's input back (undo steps), free the plan's buffers and fail
        its future, if not done yet."""
        for undo in plan.failure:
            try:
                undo()
            except Exception:  # pragma: no cover - keep failing cleanly
                log.exception("event=undo-failed rank=%d seq=%d", self.rank, plan.seq)
        if plan.spliced:  # peers may still read it: never back into the pool
            plan.borrowed = []
        plan.release()
        if not plan.future.done():
            plan.future.set_exception(failure)

    def _quiesce_links(self) -> None:
        """After a failure: FIN every link (after the ABORT already queued) and keep
        reading, discarding, until the peer closes or a short deadline passes."""
        for streams in self.links.values():
            for link in streams:
                ch = link.channel
                if ch.closed:
                    continue
                link.draining = True
                link.paused = False
                link.want_write = False
                with contextlib.suppress(OSError):
                    ch.sock.shutdown(socket.SHUT_WR)
                self._set_mask(link)
        self._drain_deadline = time.monotonic() + max(1.0, 2 * self.options.probe_s)

    def _drain(self, link: _Link) -> None:
        try:
            done = link.channel.discard()
        except OSError:
            done = True
        if done:
            self._drop(link)

    def _expire_drains(self, now: float) -> None:
        if self._drain_deadline and now >= self._drain_deadline:
            self._drain_deadline = 0.0
            for streams in self.links.values():
                for link in streams:
                    if link.draining:
                        self._drop(link)

    def _fail_queued(self, err: PeerFailure | GroupClosed | None) -> None:
        with self._lock:
            if err is not None and self._broken is None:
                self._broken = err
            plans = list(self._queue)
            self._queue.clear()
        for plan in plans:
            plan.release()
            if not plan.future.done():
                plan.future.set_exception(self._failure_for(plan))

    def _broadcast_abort(
        self, seq: int, suspects: frozenset[int], reason: str, detected_by: int | None
    ) -> None:
        """Tell every reachable peer, so that everyone fails fast with the same suspects."""
        payload = _encode_abort(suspects, reason, detected_by)
        header = encode_header(
            FrameKind.ABORT, epoch=self.epoch, seq=seq, chunk=0, length=len(payload)
        )
        deadline = time.monotonic() + min(0.2, self.options.probe_s)
        # the innocent first; then the suspects, so a live culprit learns why
        order = sorted(self.links, key=lambda p: (p in suspects, p))
        for peer in order:
            streams = self.links[peer]
            link = streams[0]
            channel = link.channel
            if channel.closed:
                continue
            # the frame in flight, then the control frames queued before the verdict
            # (a RECEIPT of the op that just ended here: without it the peer would
            # fail that op while this rank succeeded it), then the ABORT -- each
            # bounded by the deadline
            frames = [*link.ctrl, header + payload]
            link.ctrl.clear()
            try:
                for frame in frames:
                    while channel.sending and time.monotonic() < deadline:
                        if not channel.pump_send():
                            _wait_writable(channel.fd, deadline - time.monotonic())
                    if channel.sending:
                        break
                    channel.queue(frame)
                while channel.sending and time.monotonic() < deadline:
                    if not channel.pump_send():
                        _wait_writable(channel.fd, deadline - time.monotonic())
                if channel.sending:
                    channel.close()
            except OSError:
                channel.close()

    def _shutdown_links(self) -> None:
        bye = encode_header(FrameKind.BYE, epoch=self.epoch, seq=0, chunk=0, length=0)
        for streams in self.links.values():
            for link in streams:
                ch = link.channel
                if ch.closed or ch.sending:
                    continue
                with contextlib.suppress(OSError):
                    ch.sock.send(bye)


def _wait_writable(fd: int, timeout: float) -> None:
    """Until ``fd`` takes more bytes or ``timeout`` seconds pass. ``poll``, not
    ``select``: a process with many files open gives its sockets numbers past select's
    limit of 1024 (``ValueError``, which crashed the engine mid-failure)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll(max(0.0, timeout) * 1000.0)


def _encode_abort(suspects: Iterable[int], reason: str, detected_by: int | None) -> bytes:
    ranks = sorted(suspects)[:256]
    code = _ABORT_REASONS.index(reason) if reason in _ABORT_REASONS else 0
    by = 0 if detected_by is None else detected_by + 1
    return _ABORT.pack(code, by, len(ranks)) + b"".join(struct.pack("<I", r) for r in ranks)


def _decode_abort(payload: bytes) -> tuple[frozenset[int], str, int | None]:
    if len(payload) < _ABORT.size:
        raise FrameError("bad-payload", "ABORT too short")
    code, by, count = _ABORT.unpack_from(payload, 0)
    if len(payload) != _ABORT.size + 4 * count:
        raise FrameError("bad-payload", "ABORT length does not match its suspect count")
    ranks = struct.unpack_from(f"<{count}I", payload, _ABORT.size)
    reason = _ABORT_REASONS[code] if code < len(_ABORT_REASONS) else "aborted"
    return frozenset(ranks), reason, (by - 1 if by else None)

"""The daemon's end of the local API: a Unix socket, a thread per connection, one table.

:class:`LocalServer` binds the socket (its directory 0700, the socket 0600, and only
processes of the daemon's own user are served: ``SO_PEERCRED``), accepts connections
and runs, per connection, a thread that reads frames (:mod:`phalanx.local.protocol`),
receives memfds (SCM_RIGHTS; a RESTORE reply sends one back), and answers each request
through **one dispatch table**, :data:`HANDLERS` (request class -> handler), in order.
Running the request on the connection's own thread keeps the round trip to one thread
hop in the daemon; async requests from a client queue in the socket until the previous
one is answered. The handlers are thin: collectives, steps, votes and state go to the
:class:`~phalanx.membership.elastic.ElasticGroup` (which keeps the step lifecycle),
snapshots to :mod:`phalanx.local.snapshots`, memory to the connection's session.

**Deadlines and CANCEL.** A request's deadline is the client's (its monotonic clock is
this one's when HELLO showed they agree; else the seconds it sent, from arrival), and
travels into the elastic group and the data plane. A client that has no answer by
then sends ``CANCEL`` on a second connection (the first is busy with the request): the
request, if running, has its :class:`~phalanx.deadline.Deadline` cancelled, which
stops it wherever it waits; the CANCEL is answered only once the request is over (or
will never run), so the client reuses no memory an op could still touch.

**Sessions and client loss.** A connection whose HELLO was accepted is a client
session; until then it may send only HELLO, CANCEL or WATCH (anything else closes it
as a protocol error). When a session ends without BYE (the training process died) the
elastic group is told (:meth:`ElasticGroup.client_lost`: its step lifecycle decides
what that costs).
Connections that sent WATCH only receive view EVENTs.

One lock serializes every request that drives the group, so two connections never
interleave a collective; it is taken bounded by the request's deadline. Malformed
input closes that connection with an ``event=local_protocol_error`` line; it never
stops the daemon. A stale socket file is replaced; a live one (another daemon) is
refused. An accept() error (descriptors used up, ...) or a thread that cannot start
costs one connection, never the acceptor. A session maps at most :data:`_MAX_REGIONS`
regions, each charged whole pages against ``max_client_shm_bytes``. :meth:`close`
stops accepting, shuts every connection down and joins every thread.

This module must never hold the group lock while it waits for a client, nor block a
connection thread without a deadline.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import math
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phalanx.comm.pageswap import SwapError
from phalanx.deadline import Deadline
from phalanx.errors import (
    ConfigError,
    GroupClosed,
    LimitExceeded,
    PhalanxError,
    ProtocolError,
    describe,
)
from phalanx.local import snapshots
from phalanx.local._codec import MAX_STR
from phalanx.local.protocol import (
    PROTOCOL_VERSION,
    REQUESTS,
    Attached,
    AttachState,
    BeginStep,
    BufRef,
    Bye,
    Cancel,
    Cancelled,
    CancelState,
    ClientHello,
    Commit,
    Committed,
    Decoder,
    Done,
    Event,
    GetView,
    Map,
    Mapped,
    Op,
    Request,
    Restore,
    SnapshotWait,
    TakeSnapshot,
    Unmap,
    UpdateState,
    Watch,
    Welcome,
    WireFrame,
    encode,
    row_of,
)
from phalanx.local.shm import Region, exchange
from phalanx.logthrottle import LogThrottle
from phalanx.ops import OpResult, StepInfo, ViewInfo

if TYPE_CHECKING:
    from phalanx.checkpoint.snapshot import PendingSeal, SnapshotService
    from phalanx.membership.elastic import ElasticGroup
    from phalanx.membership.view import View

__all__ = ["HANDLERS", "LocalServer", "Session", "view_info"]

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.local")

_POLL_S = 0.25
_RECV = 1 << 16
_SEND_TIMEOUT_S = 5.0
_MAX_CONNECTIONS = 64
_MAX_REGIONS = 4096  # shared regions mapped per session (each one a mapping here)
_ACCEPT_PAUSE_S = 0.1  # after an accept() error (EMFILE, ...): pause, then go on
_ACCEPT_LOG_S = 10.0  # such errors are logged at most this often
_CONTROL_TIMEOUT_S = 10.0  # requests that carry no deadline of their own
_CLOCK_SKEW_S = 0.05  # HELLO: the client's monotonic clock is ours if this close
_CANCEL_WAIT_S = 5.0  # how long a CANCEL waits for its request to stop
_MAX_CANCELLED = 4096  # CANCELs of requests not read yet, per session (pipelining bound)
_KEEP_HANDLES = 16  # snapshot generations kept for SNAPSHOT_WAIT (newest first)


def view_info(view: View, member_id: str) -> ViewInfo:
    rank = view.rank(member_id) if member_id in view else None
    return ViewInfo(view.epoch, view.ids, rank, member_id)


@dataclass
class Session:
    """One connection: its client process (``SO_PEERCRED``), mapped regions, and the
    request it runs (for CANCEL)."""

    sid: int
    peer_pid: int
    regions: dict[int, Region] = field(default_factory=dict)
    shm_bytes: int = 0
    hello: bool = False  # a client session (not a WATCH or CANCEL connection)
    closed_cleanly: bool = False
    watching: bool = False
    shared_clock: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    running: int = 0  # rid of the request being handled (0: none)
    deadline: Deadline | None = None  # its deadline (CANCEL cancels it)
    answered: int = 0  # highest rid answered
    cancelled: set[int] = field(default_factory=set)  # rids cancelled before they ran
    ended: bool = False  # its connection is closed (its thread is finishing)
    queued: int = 0  # requests read from the socket, not yet answered
    loss_counted: bool = False  # its end was told to the group (once, see _lose)

    def array(self, ref: BufRef) -> np.ndarray:
        region = self.regions.get(ref.region)
        if region is None:
            raise ProtocolError(f"unknown region {ref.region}")
        return region.array(ref.offset, ref.dtype, ref.shape)


class _Conn:
    def __init__(self, sock: socket.socket, session: Session) -> None:
        self.sock = sock
        self.session = session
        self.send_lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def send(self, data: bytes | bytearray, fd: int | None = None) -> None:
        with self.send_lock:
            if fd is None:
                self.sock.sendall(data)
                return
            sent = socket.send_fds(self.sock, [data], [fd])  # fd attached to the first byte
            if sent < len(data):
                self.sock.sendall(data[sent:])


class LocalServer:
    """Serves ``group`` (and ``snapshots``) on the Unix socket ``path``."""

    def __init__(
        self,
        path: str,
        group: ElasticGroup,
        *,
        max_client_shm_bytes: int,
        op_timeout: float,
        join_timeout: float = 30.0,
        snapshots: SnapshotService | None = None,
        seal_timeout: float = 300.0,
    ) -> None:
        self.path = path
        self.group = group
        self.snapshots = snapshots
        self.max_shm = max_client_shm_bytes
        self.op_timeout = op_timeout
        self.join_timeout = join_timeout
        self.seal_timeout = seal_timeout
        self.seals: dict[int, PendingSeal] = {}  # generation -> its seal, for SNAPSHOT_WAIT
        self.snapshot_lock = threading.Lock()  # one generation at a time
        self._group_lock = threading.Lock()
        self._closing = False
        self._held = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._sessions: dict[int, Session] = {}
        self._next_sid = 1
        self._accept_log = LogThrottle(log, _ACCEPT_LOG_S)
        self._sock = _bind(path)
        # a blocking accept(), no poll: stop_accepting() wakes it by shutting the socket
        # down (a blocking accept() then fails with EINVAL; a non-blocking one, as
        # with a timeout, would get EAGAIN and spin). An idle acceptor polling every
        # 0.25 s cost a daemon ~0.3 ms of CPU a second
        self._sock.settimeout(None)
        # a handle on our socket file's inode: while it is open the number cannot be
        # reused, so close() can tell our file from a replacement's of the same name
        self._pin = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="phalanx-local-accept", daemon=True
        )
        self._acceptor.start()
        log.info("event=local_api_listening socket=%s", path)

    # ------------------------------------------------------------------ accept
    def _accept_loop(self) -> None:
        """Accept connections until :meth:`stop_accepting`. An accept() error
        (``EMFILE``/``ENFILE`` with the descriptors used up, ``ENOBUFS``,
        ``ECONNABORTED``) or a thread that cannot start costs that one connection,
        never the acceptor: it pauses briefly (the pending connection waits in the
        backlog) and goes on."""
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set() or self._sock.fileno() < 0:
                    return  # closed by stop_accepting
                self._accept_trouble("accept", exc)
                continue
            try:
                self._admit(sock)
            except Exception as exc:  # a thread that cannot start: that connection only
                sock.close()
                self._accept_trouble("connection", exc)

    def _admit(self, sock: socket.socket) -> None:
        """Serve the accepted ``sock`` on a thread of its own (or refuse it)."""
        pid = _peer_pid(sock)
        if pid is None:
            log.warning("event=local_refused reason=foreign-user")
            sock.close()
            return
        with self._lock:
            self._conns = [c for c in self._conns if c.thread is None or c.thread.is_alive()]
            if len(self._conns) >= _MAX_CONNECTIONS:
                log.warning("event=local_refused reason=too-many-connections")
                sock.close()
                return
            session = Session(self._next_sid, pid)
            self._next_sid += 1
            conn = _Conn(sock, session)
            t = threading.Thread(
                target=self._serve, args=(conn,), name="phalanx-local-conn", daemon=True
            )
            conn.thread = t
            self._conns.append(conn)
            self._sessions[session.sid] = session
        try:
            t.start()
        except BaseException:
            with self._lock:  # never served: no trace of it (close() would join it)
                if conn in self._conns:
                    self._conns.remove(conn)
                self._sessions.pop(session.sid, None)
            raise

    def _accept_trouble(self, what: str, exc: BaseException) -> None:
        """Log (at most once per :data:`_ACCEPT_LOG_S`) and pause before accepting again."""
        self._accept_log.error("accept", "event=local_accept_failed stage=%s error=%r", what,
                               str(exc))  # fmt: skip
        self._stop.wait(_ACCEPT_PAUSE_S)

    # ------------------------------------------------------------------ one connection
    def _serve(self, conn: _Conn) -> None:
        sock, s = conn.sock, conn.session
        # the timeout is for replies: a client reads them when it waits, which may be
        # after a long stretch of compute with many async ops queued (0.25 s, the
        # read poll's, dropped such a session); reads poll first
        sock.settimeout(max(_SEND_TIMEOUT_S, self.op_timeout + _CONTROL_TIMEOUT_S))
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        decoder = Decoder()
        fds: list[int] = []
        try:
            while not self._stop.is_set():
                try:
                    if not poller.poll(int(_POLL_S * 1000)):
                        continue
                    data, anc, _flags, _ = sock.recvmsg(_RECV, socket.CMSG_SPACE(4 * 4))
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    break
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds_in = array.array("i")
                        fds_in.frombytes(payload[: len(payload) - len(payload) % 4])
                        fds.extend(fds_in)
                if not data:
                    break  # EOF: the client closed or died
                frames = decoder.feed(data)
                for i, frame in enumerate(frames):
                    s.queued = len(frames) - i - 1  # read, not answered yet (see _reap_dead)
                    fd = fds.pop(0) if frame.flags and fds else None
                    self._answer(conn, frame, fd)
                s.queued = 0
                if fds and decoder.pending == 0:
                    raise ProtocolError("a file descriptor came without a MAP request")
        except ProtocolError as exc:
            log.warning("event=local_protocol_error session=%d error=%r", s.sid, str(exc))
        except OSError as exc:  # the client went away while we answered
            log.info("event=local_send_failed session=%d error=%r", s.sid, str(exc))
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with self._lock:
                s.ended = True
            with contextlib.suppress(OSError):
                sock.close()
            try:
                self._session_ended(s)  # listed until told: another session's reap sees it
            finally:
                with self._lock:
                    if conn in self._conns:
                        self._conns.remove(conn)
                    self._sessions.pop(s.sid, None)

    def _answer(self, conn: _Conn, frame: WireFrame, fd: int | None) -> None:
        s, req = conn.session, frame.message
        if not isinstance(req, Request):
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"a {type(req).__name__} is not a request")
        row = row_of(req)
        if row.fd_in != (fd is not None):
            if fd is not None:
                os.close(fd)
            raise ProtocolError(
                f"{row.kind.name} {'needs' if row.fd_in else 'must not carry'} a file descriptor"
            )
        if not s.hello and type(req) not in _WITHOUT_HELLO:
            # a client session starts with an accepted HELLO (its end is then told to
            # the group); CANCEL and WATCH connections send only their own request
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"{row.kind.name} before an accepted HELLO")
        deadline = self._deadline(s, req)
        with s.cond:
            if frame.rid in s.cancelled:  # the client gave up before it ran
                s.cancelled.discard(frame.rid)
                s.answered = max(s.answered, frame.rid)
                s.cond.notify_all()
                cancelled = True
            else:
                s.running, s.deadline = frame.rid, deadline
                cancelled = False
        if cancelled:
            if fd is not None:  # a MAP's descriptor: never adopted
                os.close(fd)
            err = TimeoutError(f"{row.kind.name} was cancelled before it ran")
            conn.send(encode(describe(err), frame.rid))
            return
        out_fd: int | None = None
        try:
            try:
                reply = HANDLERS[type(req)](self, s, req, fd, deadline)
            except ProtocolError:
                raise
            except Exception as exc:  # typed errors travel to the client
                if isinstance(exc, PhalanxError | TimeoutError):
                    log.debug("event=local_request_error kind=%s error=%r", row.kind.name, str(exc))
                else:  # a bug on our side: keep the traceback
                    log.exception("event=local_request_failed kind=%s", row.kind.name)
                conn.send(_encode_error(exc, frame.rid))
                return
            if isinstance(reply, snapshots.WithFd):
                out_fd, reply = reply.fd, reply.layout
            try:
                data = encode(reply, frame.rid, reply_to=type(req))
            except ProtocolError as exc:  # a field over the wire's limits: say so
                log.warning("event=local_reply_unencodable kind=%s error=%s", row.kind.name, exc)
                why = f"the daemon's {row.kind.name} reply could not be sent: {exc}"
                conn.send(_encode_error(PhalanxError(why), frame.rid))
                return
            conn.send(data, out_fd)
        finally:
            if out_fd is not None:
                os.close(out_fd)
            with s.cond:
                s.running, s.deadline = 0, None
                s.answered = max(s.answered, frame.rid)
                if s.cancelled:  # requests are answered in order: older rids never come
                    s.cancelled = {r for r in s.cancelled if r > s.answered}
                s.cond.notify_all()

    def _deadline(self, s: Session, req: Request) -> Deadline:
        timeout = getattr(req, "timeout", None)
        if timeout is None:
            return Deadline.after(_CONTROL_TIMEOUT_S)
        at = getattr(req, "at", None)
        if s.shared_clock and at is not None and math.isfinite(at):
            # never later than its timeout from now (a NaN or far-off `at` would make
            # a wait that cannot end, nor be cancelled)
            return Deadline(min(at, time.monotonic() + timeout))
        return Deadline.after(timeout)

    def _session_ended(self, s: Session) -> None:
        s.regions.clear()  # arrays the state holds keep their pages mapped
        if not s.hello or s.watching:
            return
        if self._closing:  # the daemon leaves the group: nothing to tell it
            audit.info("event=client_closed session=%d pid=%d", s.sid, s.peer_pid)
            return
        # under the group lock, never without it: a loss told while another session
        # drives the group would void (or miss) that session's step instead of this
        # one's, and two tellers could count it twice. The wait ends when the lock
        # comes (a long request of another session: its next _driving reaps this one
        # first, since it is still listed) or when the daemon closes.
        held = False
        while not (held or self._closing):
            held = self._group_lock.acquire(timeout=_POLL_S)
        if not held:
            return
        try:
            self._lose(s)
        finally:
            self._group_lock.release()

    def _reap_dead(self, current: Session) -> None:
        """(holding the group lock) Tell the group of every client that died before
        ``current`` drives it: a session thread notices its client's death only once
        its request in flight ends, and a replacement client that drove the group
        first was handed state the dead one was changing (soak, stop 30: a commit
        held behind a coordinator restart; the new client got the pre-update arrays
        and the old client's loss was then counted against the new client's step)."""
        with self._lock:
            others = [
                c
                for c in self._conns
                if c.session is not current
                and c.session.hello
                and not c.session.watching
                and not c.session.loss_counted
            ]
        for c in others:
            # a session with requests read but not answered is its thread's to finish
            # (a goodbye may be among them): only an empty one is reaped here
            if c.session.ended or (c.session.queued == 0 and _hung_up(c.sock)):
                self._lose(c.session)

    def _lose(self, s: Session) -> None:
        """(holding the group lock) Tell the group that ``s`` ended, once."""
        if s.loss_counted:
            return
        s.loss_counted = True
        if s.closed_cleanly:
            audit.info("event=client_closed session=%d pid=%d", s.sid, s.peer_pid)
            try:
                self.group.client_closed()  # may leave and rejoin (a state mid-update)
            except Exception as exc:  # the next client call will see the group's error
                log.error("event=client_closed_failed error=%r", str(exc))
            return
        epoch = self.group.view.epoch
        try:
            loss = self.group.client_lost().value
        except Exception as exc:  # the next client call will see the group's error
            log.error("event=client_lost_failed error=%r", str(exc))
            loss = "unknown"
        # loss: nothing (at a step boundary), cycle (mid-step: left and rejoins),
        # cycle-and-resync (mid-update: the state is received again, not handed back)
        audit.warning(
            "event=client_lost session=%d pid=%d epoch=%d loss=%s", s.sid, s.peer_pid, epoch, loss
        )

    # ------------------------------------------------------------------ the group lock
    @contextlib.contextmanager
    def _driving(self, s: Session, deadline: Deadline) -> Any:
        """Hold the group lock (bounded by ``deadline``, cancellable) for ``s``, after
        telling the group of clients that died (:meth:`_reap_dead`)."""
        if self._closing:
            raise GroupClosed("the daemon is shutting down")
        if not deadline.acquire(self._group_lock):
            why = "cancelled" if deadline.cancelled else "its deadline passed"
            raise TimeoutError(f"the request {why} while another one drove the group")
        try:
            if self._closing:
                raise GroupClosed("the daemon is shutting down")
            self._reap_dead(s)
            if s.loss_counted:  # its client died (reaped above, or by another session)
                raise GroupClosed("this client's connection is gone; its request is void")
            yield
        finally:
            self._group_lock.release()

    # ------------------------------------------------------------------ handlers
    def _hello(self, s: Session, req: ClientHello, fd: int | None, dl: Deadline) -> Welcome:
        if req.version != PROTOCOL_VERSION:
            # a typed answer, not a closed connection: the client learns why
            raise ConfigError(
                f"client speaks local protocol {req.version}, not {PROTOCOL_VERSION}: "
                "the client and the daemon must come from the same phalanx release"
            )
        s.hello = True
        s.shared_clock = abs(req.clock - time.monotonic()) < _CLOCK_SKEW_S
        audit.info("event=client_connected session=%d pid=%d", s.sid, s.peer_pid)
        return Welcome(PROTOCOL_VERSION, s.sid, os.getpid(), self.group.member_id, self.view(),
                       self.seal_timeout, self.join_timeout)  # fmt: skip

    def _map(self, s: Session, req: Map, fd: int | None, dl: Deadline) -> Mapped:
        assert fd is not None
        if req.region in s.regions:
            os.close(fd)
            raise ProtocolError(f"duplicate region id {req.region}")
        if len(s.regions) >= _MAX_REGIONS:
            # each region is a mapping of the daemon's (vm.max_map_count is shared by
            # every session and the data plane): tiny ones are bounded by count
            os.close(fd)
            raise LimitExceeded(
                f"this client already has {len(s.regions)} shared regions mapped, the "
                f"most a session may have ({_MAX_REGIONS}): allocate fewer, larger "
                "arrays (client.empty) or release some"
            )
        region = Region.adopt(req.region, fd, self.max_shm - s.shm_bytes, sealed=True)
        s.regions[req.region] = region
        s.shm_bytes += region.charge
        return Mapped(region.size)

    def _unmap(self, s: Session, req: Unmap, fd: int | None, dl: Deadline) -> Done:
        region = s.regions.pop(req.region, None)
        if region is not None:
            s.shm_bytes -= region.charge
        return Done()

    def _op(self, s: Session, req: Op, fd: int | None, dl: Deadline) -> OpResult:
        x = None if req.buf is None else s.array(req.buf)
        if not req.twin:
            with self._driving(s, dl):
                return self.group.run(req.spec, x, retry=req.retry, deadline=dl)
        # twin regions (docs/daemon.md): reduce into the twin, never writing x; on
        # success exchange the pages in this process, the client does the same when
        # it reads the reply (in_twin). A failure leaves both processes' x untouched.
        assert req.buf is not None and x is not None
        ref = req.buf
        region, twin = s.regions[ref.region], s.regions.get(req.twin)
        if twin is None or twin.size != region.size:
            raise ProtocolError(
                f"twin region {req.twin} is unknown or not region {ref.region}'s size"
            )
        into = twin.array(ref.offset, ref.dtype, ref.shape)
        with self._driving(s, dl):
            res = self.group.run(req.spec, x, retry=req.retry, deadline=dl, into=into)
        if not res.in_twin:
            return res
        try:
            swapped = exchange(region, twin, ref.offset, ref.nbytes, edges=True)
        except SwapError as exc:  # not expected: the kernel refused to undo a move
            s.regions.pop(ref.region, None)
            s.regions.pop(req.twin, None)
            raise ProtocolError(f"regions {ref.region}/{req.twin} damaged: {exc}") from None
        if swapped:
            return res
        log.warning("event=twin_exchange_refused session=%d region=%d", s.sid, ref.region)
        np.copyto(x, into)  # visible to the client through the shared pages
        return replace(res, in_twin=False)

    def _commit(self, s: Session, req: Commit, fd: int | None, dl: Deadline) -> Committed:
        with self._driving(s, dl):
            return Committed(self.group.commit(req.step, req.ok, timeout=max(dl.left(), 0.001)))

    def _begin_step(self, s: Session, req: BeginStep, fd: int | None, dl: Deadline) -> StepInfo:
        with self._driving(s, dl):
            return self.group.begin_step(req.step, deadline=dl, allow_partial=req.allow_partial)

    def _view(self, s: Session, req: GetView, fd: int | None, dl: Deadline) -> ViewInfo:
        return self.view()

    def _attach(self, s: Session, req: AttachState, fd: int | None, dl: Deadline) -> Attached:
        arrays = {e.name: s.array(e.buf) for e in req.entries}
        with self._driving(s, dl):
            step, how = self.group.attach_state(arrays, req.step)
        audit.info(
            "event=state_attached session=%d step=%d entries=%d bytes=%d source=%s",
            s.sid, step, len(arrays), sum(a.nbytes for a in arrays.values()), how,
        )  # fmt: skip
        return Attached(step, how)

    def _update(self, s: Session, req: UpdateState, fd: int | None, dl: Deadline) -> Done:
        with self._driving(s, dl):
            self.group.update_state(req.step, None if req.changed is None else list(req.changed))
        return Done()

    def _watch(self, s: Session, req: Watch, fd: int | None, dl: Deadline) -> ViewInfo:
        s.watching = True
        return self.view()

    def _bye(self, s: Session, req: Bye, fd: int | None, dl: Deadline) -> Done:
        s.closed_cleanly = True
        return Done()

    def _cancel(self, s: Session, req: Cancel, fd: int | None, dl: Deadline) -> Cancelled:
        with self._lock:
            target = self._sessions.get(req.session)
        if target is None:  # its connection is gone: its thread finished every request
            return Cancelled(CancelState.FINISHED.value)
        if target.peer_pid != s.peer_pid:
            raise ProtocolError("a process may only cancel its own requests")
        with target.cond:
            if req.rid <= target.answered:
                return Cancelled(CancelState.FINISHED.value)
            if target.running != req.rid:
                if len(target.cancelled) >= _MAX_CANCELLED:  # rids never sent, say
                    raise ProtocolError(f"over {_MAX_CANCELLED} requests cancelled ahead")
                target.cancelled.add(req.rid)  # not read yet: it never runs
                return Cancelled(CancelState.WILL_NOT_RUN.value)
            if target.deadline is not None:
                target.deadline.cancel()
            audit.info("event=request_cancelled session=%d rid=%d", target.sid, req.rid)
            end = time.monotonic() + _CANCEL_WAIT_S
            while target.answered < req.rid:
                left = end - time.monotonic()
                if left <= 0:
                    log.error("event=cancel_timeout session=%d rid=%d", target.sid, req.rid)
                    return Cancelled(CancelState.STILL_RUNNING.value)
                target.cond.wait(left)
        return Cancelled(CancelState.STOPPED.value)

    def view(self) -> ViewInfo:
        return view_info(self.group.view, self.group.member_id)

    # ------------------------------------------------------------------ events
    def publish(self, view: View) -> None:
        """Send the view to every watching connection (drops one that cannot keep up)."""
        data = encode(Event(view_info(view, self.group.member_id)), 0)
        with self._lock:
            watchers = [c for c in self._conns if c.session.watching]
        for c in watchers:
            try:
                c.sock.settimeout(_SEND_TIMEOUT_S)
                c.send(data)
            except OSError:
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)

    @property
    def clients(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if c.session.hello and not c.session.watching)

    # ------------------------------------------------------------------ lifecycle
    def stop_accepting(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes a blocked accept() (EINVAL); close() won't
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._acceptor.join(2 * _POLL_S + 1.0)

    def drain(self, timeout: float) -> bool:
        """Refuse new group calls; wait up to ``timeout`` for the one in flight, then
        hold the group lock until :meth:`release`. True if it drained in time."""
        self._closing = True
        self._held = self._group_lock.acquire(timeout=timeout)
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._group_lock.release()

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, shut every connection down, join every thread. Idempotent."""
        self._closing = True
        self.stop_accepting()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout)
                if c.thread.is_alive():
                    log.error("event=thread_not_joined name=%s", c.thread.name)
        if self._pin < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            st, mine = os.lstat(self.path), os.fstat(self._pin)
            # a daemon with our id that started while we drained has found our socket
            # dead, removed it and bound its own: that one is not ours to remove
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        os.close(self._pin)
        self._pin = -1


_Handler = Callable[[LocalServer, Session, Any, "int | None", Deadline], Any]

#: request class -> what answers it (the daemon's one dispatch table)
HANDLERS: dict[type[Request], _Handler] = {
    ClientHello: LocalServer._hello,
    Map: LocalServer._map,
    Unmap: LocalServer._unmap,
    Op: LocalServer._op,
    Commit: LocalServer._commit,
    BeginStep: LocalServer._begin_step,
    GetView: LocalServer._view,
    AttachState: LocalServer._attach,
    UpdateState: LocalServer._update,
    Watch: LocalServer._watch,
    Bye: LocalServer._bye,
    TakeSnapshot: snapshots.snapshot,
    SnapshotWait: snapshots.snapshot_wait,
    Restore: snapshots.restore,
    Cancel: LocalServer._cancel,
}
#: what a connection may send without an accepted HELLO (the client's CANCEL and WATCH
#: connections); anything else closes it
_WITHOUT_HELLO: frozenset[type[Request]] = frozenset({ClientHello, Cancel, Watch})

if set(HANDLERS) != {r.request for r in REQUESTS}:  # pragma: no cover - caught at import
    raise ConfigError("every request of protocol.REQUESTS needs exactly one handler")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _bind(path: str) -> socket.socket:
    p = Path(path)
    if len(os.fsencode(path)) >= 108:
        raise ConfigError(f"socket path is too long for a Unix socket (max 107 bytes): {path}")
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        if not _is_socket(path):
            raise ConfigError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(f"cannot check socket {path}: {exc}") from None
            os.unlink(path)  # stale: its daemon is gone
            log.info("event=stale_socket_removed socket=%s", path)
        else:
            raise ConfigError(f"another daemon is serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {path}: {exc}") from None
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _hung_up(sock: socket.socket) -> bool:
    """Has the client at the other end of ``sock`` gone, leaving no request unread
    (unread requests -- a goodbye among them -- are its session thread's to answer)?"""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        events = poller.poll(0)
        if not events or not events[0][1] & (select.POLLHUP | select.POLLERR):
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # closed under us: its thread ends it
        return True


def _peer_pid(sock: socket.socket) -> int | None:
    """The connecting process's pid if it runs as our user (SO_PEERCRED), else None."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid) if uid == os.getuid() else None


def _encode_error(exc: BaseException, rid: int) -> bytes | bytearray:
    """The error reply for ``exc``; one whose text or fields are over the wire's limits
    (a 4 KiB string) goes with its message cut and no fields rather than breaking the
    connection."""
    info = describe(exc)
    try:
        return encode(info, rid)
    except ProtocolError:
        text = info.message.encode()[: MAX_STR // 2].decode(errors="ignore")
        return encode(replace(info, message=text + " [cut]", fields=()), rid)

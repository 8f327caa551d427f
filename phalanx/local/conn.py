"""The client side of the local API socket: send requests, wait for their replies.

:class:`Connection` owns one Unix socket to the daemon. :meth:`Connection.send` writes
a request message (with a memfd for ``MAP``) and returns its id; :meth:`Connection.wait`
reads replies until that id's arrives (replies to other requests are kept for their
waiters), on the caller's thread: no background thread, so a synchronous call costs
one round trip and no thread hand-off. Any number of threads may wait; one reads at a
time. A reply flagged ``FLAG_FD`` carries a descriptor (received with SCM_RIGHTS,
handed out by :meth:`Connection.wait_frame`; the caller owns it).

:meth:`Connection.cancel` asks the daemon, on a second connection (the first one's
daemon thread is busy with the request), to stop a request; it returns the daemon's
acknowledgement: the request is over (or will never run) — or that it could not be
stopped in time.

Every wait has a deadline (:class:`NoReply`, a ``TimeoutError``). End of file, a reset, or a refused
connect raise :class:`~phalanx.errors.DaemonUnavailable` at once: when the daemon dies
the kernel closes its end, so a blocked caller learns it within one poll slice.
Connecting waits (bounded by ``wait``) for a daemon that is still starting.

This module must never interpret a reply beyond its frame (ERROR frames become the
typed exceptions of :func:`phalanx.errors.rebuild`), nor block without a deadline.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from phalanx.errors import DaemonUnavailable, ErrorInfo, ProtocolError, rebuild
from phalanx.local.protocol import (
    FLAG_FD,
    Cancel,
    Cancelled,
    CancelState,
    Decoder,
    Event,
    Kind,
    Request,
    WireFrame,
    encode,
)

__all__ = ["Connection", "NoReply"]

_POLL_S = 0.2
_SEND_TIMEOUT_S = 5.0
_SEND_POLL_S = 0.005  # a full socket: how long each look for replies (or room) lasts
_RECV = 1 << 16
_CONNECT_RETRY_S = 0.05


class NoReply(TimeoutError):
    """No reply came within the wait (the request may still be running). Distinct
    from a TimeoutError the daemon sent as the request's answer."""


def _open(path: str, timeout: float, wait: float) -> socket.socket:
    """A connected socket to ``path``; retries for ``wait`` seconds while nothing
    listens there yet (a daemon still starting)."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() + _CONNECT_RETRY_S >= deadline:
                waited = f" (waited {wait:g}s)" if wait > 0 else ""
                raise DaemonUnavailable(
                    f"no phalanx daemon is listening on {path} ({exc.strerror}){waited}; "
                    "start one with 'phalanx daemon ...' or use phalanx.start() for "
                    "embedded mode",
                    socket=path,
                ) from None
            time.sleep(_CONNECT_RETRY_S)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot connect to {path}: {exc}", socket=path) from None


class Connection:
    """One connection to the daemon at ``path`` (see the module docstring)."""

    def __init__(self, path: str, timeout: float = 5.0, *, wait: float = 0.0) -> None:
        self.path = path
        sock = _open(path, timeout, wait)
        sock.setblocking(False)  # reads poll first; sends wait in _send_all
        self.sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._replies: dict[int, WireFrame] = {}
        # requests sent whose reply has not come -> when their deadline ends
        self._unanswered: dict[int, float] = {}
        self._discard: set[int] = set()  # requests whose reply nobody waits for
        self._events: list[WireFrame] = []
        self._decoder = Decoder()
        self._fds: list[int] = []  # received, not yet matched to a FLAG_FD frame
        self._dead: DaemonUnavailable | None = None
        self._closed = False
        self._side: Connection | None = None  # for CANCEL
        self._side_lock = threading.Lock()
        #: called with every reply frame, in the order the daemon sent them, by the
        #: thread that read it, before any waiter can see it (the client's twin
        #: exchanges: phalanx/client.py); it must not raise
        self.on_reply: Callable[[WireFrame], None] | None = None

    # ------------------------------------------------------------------ sending
    def send(
        self,
        request: Request,
        fd: int | None = None,
        *,
        before: Callable[[int], None] | None = None,
        discard: bool = False,
    ) -> int:
        """Write one request; its id (pass it to :meth:`wait`). ``before(rid)`` runs
        before the request leaves (so that :attr:`on_reply` can know of it).
        ``discard``: nobody waits for the reply (an UNMAP): it is dropped on arrival."""
        self._check()
        # the daemon reads requests one after the other: while it runs a long one
        # (a slow peer), a client that queued many async ops waits here for room --
        # as long as this request may take, not a fixed 5 s that called a busy
        # daemon gone
        wait = max(_SEND_TIMEOUT_S, float(getattr(request, "timeout", 0.0)))
        try:
            # ids go out in the order they are taken: the daemon's CANCEL answers
            # "finished" for any id up to the highest it has answered
            with self._send_lock:
                rid = next(self._ids)
                data = encode(request, rid)
                if before is not None:
                    before(rid)
                due = float(getattr(request, "timeout", 0.0) or 0.0)
                self._unanswered[rid] = time.monotonic() + due
                if discard:
                    self._discard.add(rid)
                self._send_all(data, fd, time.monotonic() + wait)
        except OSError as exc:
            err = self._die(
                f"the daemon went away or took no request for {wait:g}s ({exc}); requests "
                "sent before may still run and write the memory they named"
            )
            # nothing half-sent may be read as a request: the connection is over
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            raise err from None
        return rid

    def _send_all(self, data: bytes | bytearray, fd: int | None, deadline: float) -> None:
        """Write ``data`` (``fd`` with its first byte) by ``deadline`` (TimeoutError).
        While the socket is full, read replies: the daemon answers each request
        before it reads the next, so with nobody reading its answers, it would stop
        reading requests, and both sides would wait for ever."""
        view = memoryview(data)
        while view:
            try:
                if fd is not None:
                    n = socket.send_fds(self.sock, [view], [fd])
                    fd = None  # it went with the first byte
                else:
                    n = self.sock.send(view)
                view = view[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no room to send before the deadline")
            with self._cond:
                if self._dead is not None:
                    raise OSError(str(self._dead))
                self._read_or_wait(min(left, _SEND_POLL_S))

    def call(self, request: Request, timeout: float, fd: int | None = None) -> Any:
        """send + wait: the reply message, or the typed error the daemon sent. After
        :class:`NoReply` the reply is dropped when it comes (:meth:`abandon`)."""
        rid = self.send(request, fd)
        try:
            return self.wait(rid, timeout)
        except NoReply:
            self.abandon(rid)
            raise

    def abandon(self, rid: int) -> None:
        """Nobody will wait for request ``rid``'s reply (its caller got
        :class:`NoReply`, or it was cancelled before it ran): drop the reply, closing a
        descriptor that came with it (a RESTORE's memfd holds a whole state), now if it
        came, else when it comes. Without this a late reply stayed here for good."""
        with self._cond:
            frame = self._replies.pop(rid, None)
            if frame is None:
                self._discard.add(rid)  # _read_once drops it (checked under the condition)
        if frame is not None and frame.fd is not None:
            with contextlib.suppress(OSError):
                os.close(frame.fd)

    def backlog(self) -> float:
        """Seconds until the deadline of every request sent and not answered yet has
        passed (0.0 when none is in the daemon's hands): how long a request sent now
        may wait behind them (the daemon answers a connection's requests in order)."""
        last = max(self._unanswered.values(), default=0.0)
        return max(0.0, last - time.monotonic())

    def cancel(self, session: int, rid: int, timeout: float) -> CancelState:
        """Ask the daemon to stop request ``rid`` of ``session`` (this process's own),
        on a second connection; its answer (the request is over unless it says
        ``STILL_RUNNING``). ``TimeoutError`` if it does not answer in time."""
        with self._side_lock:
            if self._side is None or not self._side.alive:
                self._side = Connection(self.path, timeout)
            side = self._side
        reply = side.call(Cancel(session, rid), timeout)
        assert isinstance(reply, Cancelled)
        return CancelState(reply.state)

    @property
    def busy(self) -> bool:
        """Whether a request sent on this connection has not been answered yet: the
        daemon answers a connection's requests in order, so a new one would wait.
        Requests whose reply nobody waits for (a discarded UNMAP) do not count: they
        are answered at once, and counting them made the client skip twin regions and
        misread a twin exchange's failure as hitting a request in flight."""
        return bool(self._unanswered.keys() - self._discard)

    # ------------------------------------------------------------------ receiving
    def wait(self, rid: int, timeout: float | None) -> Any:
        """The reply message for request ``rid``; raises its typed error, TimeoutError
        at the deadline, DaemonUnavailable if the daemon is gone."""
        frame = self.wait_frame(rid, timeout)
        if frame.fd is not None:  # nobody asked for it
            os.close(frame.fd)
        return frame.message

    def wait_frame(self, rid: int, timeout: float | None) -> WireFrame:
        """:meth:`wait`, returning the reply frame (with its ``fd``, owned by the caller)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        read = False
        with self._cond:
            while True:
                frame = self._replies.pop(rid, None)
                if frame is not None:
                    break
                if self._dead is not None:
                    raise self._dead
                if self._closed:
                    raise DaemonUnavailable("the connection was closed", socket=self.path)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if read:
                        raise NoReply(f"no answer from the daemon within {timeout}s")
                    left = 0.0  # a timeout of 0 (Handle.done) still reads what came
                read = True
                self._read_or_wait(_POLL_S if left is None else min(left, _POLL_S))
        if frame.kind == Kind.ERROR:
            assert isinstance(frame.message, ErrorInfo)
            raise rebuild(frame.message)
        return frame

    def next_event(self, timeout: float) -> Event | None:
        """The next view EVENT (watch connections), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._events:
                if self._dead is not None:
                    raise self._dead
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._read_or_wait(min(left, _POLL_S))
            event = self._events.pop(0).message
            assert isinstance(event, Event)
            return event

    def _read_or_wait(self, timeout: float) -> None:
        """With the condition held: read once (if nobody else is) or wait for the
        reader to hand frames out."""
        if self._reading:
            self._cond.wait(timeout)
            return
        self._reading = True
        self._cond.release()
        try:
            self._read_once(timeout)
        finally:
            self._cond.acquire()
            self._reading = False
            self._cond.notify_all()

    def _read_once(self, timeout: float) -> None:
        """One recv (without the condition held); frames go to their slots."""
        try:
            if not self._poll.poll(0 if timeout <= 0 else max(1, int(timeout * 1000))):
                return
            data, anc, _flags, _ = self.sock.recvmsg(_RECV, socket.CMSG_SPACE(4 * 4))
        except (TimeoutError, BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            with self._cond:
                self._die(f"the daemon went away ({exc})")
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % 4])
                self._fds.extend(fds)
        if not data:
            with self._cond:
                self._die("the daemon closed the connection (it stopped or died)")
            return
        try:
            frames = self._decoder.feed(data)
            for i, f in enumerate(frames):
                if f.flags & FLAG_FD:
                    if not self._fds:
                        raise ProtocolError("a reply announced a descriptor that did not come")
                    frames[i] = dataclasses.replace(f, fd=self._fds.pop(0))
        except ProtocolError as exc:
            with self._cond:
                self._die(f"garbled data from the daemon: {exc}")
            return
        for f in frames:
            if f.kind != Kind.EVENT:
                self._unanswered.pop(f.rid, None)
        hook = self.on_reply
        if hook is not None:
            for f in frames:
                if f.kind != Kind.EVENT and f.rid not in self._discard:
                    hook(f)
        with self._cond:
            for f in frames:
                if f.kind == Kind.EVENT:
                    self._events.append(f)
                elif f.rid in self._discard:
                    self._discard.discard(f.rid)
                    if f.fd is not None:
                        os.close(f.fd)
                else:
                    self._replies[f.rid] = f

    def _die(self, why: str) -> DaemonUnavailable:
        if self._dead is None:
            self._dead = DaemonUnavailable(f"{why} [socket {self.path}]", socket=self.path)
        return self._dead

    def _check(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise DaemonUnavailable("the connection was closed", socket=self.path)

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed

    def close(self) -> None:
        """Close the socket (idempotent); waiters get DaemonUnavailable."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._cond:
            left = [f.fd for f in self._replies.values() if f.fd is not None] + self._fds
            self._fds = []
        for fd in left:
            with contextlib.suppress(OSError):
                os.close(fd)
        side = self._side
        if side is not None:
            side.close()

"""One data-plane port for every epoch: accepted connections are routed by epoch.

A member advertises one data-plane address for its whole incarnation (it is part of
its :class:`~phalanx.membership.view.Member`), but :class:`phalanx.comm.Group` is
built per view, owns its listener, and refuses links of another epoch. Peers do not
switch views at the same instant: a fast peer connects for epoch E+1 while this
member's epoch-E group still accepts, and that group would refuse the link. The
:class:`Door` owns the real listening socket, reads (``MSG_PEEK``, nothing consumed)
the fixed-size header of the first frame of each new connection — the HELLO, which names
its epoch — and hands the connection to the listener of that epoch
(:meth:`Door.listener`), holding it briefly if that epoch's group is not built yet.
Connections for an older epoch, garbage, and probes that close without a word (the
coordinator's reachability check) are closed with a DEBUG/WARNING line.

Everything the door reads comes before any proof of the secret (the handshake runs in
the group it hands the connection to), so anyone who reaches the port can open
connections and name any epoch. What a stranger can take is bounded: a connection must
deliver its header within ``header_s`` (2 s; a connector sends its HELLO right after
``connect()``), at most ``per_source`` (32) connections from one source address wait
for a header, at most 4 x ``per_source`` from one address are held for their epoch (a
full mesh of peers behind one address holds one link each per stream), and all of
them together at most 256. A
stranger reopening idle sockets from one address therefore never blocks a member
connecting from another. Members sharing a host share its quota: one group build
dials one link at a time (each link's handshake completes before the next), so a
host's members hold about one waiting connection each per build in progress
(loopback is not exempt: the test clusters, every member on 127.0.0.1 and at most a
handful of members, stay far below 32).

Epochs here are data-plane group ids (:func:`~phalanx.membership.lifecycle.
data_epoch`): a view epoch, the generation of its rebuilt group, and a side-group
bit; "older" compares them as that tuple. A connection held for a group that is not
open yet is reported to ``on_ahead`` (a peer already runs a newer generation of this
view: the member's own group is stale and must be rebuilt there).

This module must never consume a byte of a connection it hands over, hold a
connection past its deadline, or leave its thread running after :meth:`Door.close`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

from phalanx.comm.frames import HEADER_SIZE, FrameKind, decode_header
from phalanx.comm.transport import Listener, bind
from phalanx.errors import FrameError
from phalanx.membership.lifecycle import split_epoch

__all__ = ["Door", "EpochListener"]

log = logging.getLogger(__name__)

_MAX_PENDING = 256  # connections waiting for a header or for their epoch
#: of those, from one source address (a stranger must not take every slot)
_PER_SOURCE = 32
#: a new connection's first header must be in within this (the connector sends its
#: HELLO right after connect(); an idle socket must not hold a slot for hold_s)
_HELD_PER_SOURCE_FACTOR = 4  # held connections per source: 4 x per_source (128)
_HEADER_S = 2.0  # generous: a loaded 2-core host can stall a connector that long
#: longest sleep of the door thread with nothing to time out (a backstop: close()
#: and connections wake it; a 50 ms poll woke an idle daemon 20 times a second)
_IDLE_S = 1.0
_PARK_S = 0.01  # a connection with part of its first header in is looked at again after this


class _EpochSocket:
    """What :class:`phalanx.comm.Group`'s accept loop sees: ``accept()`` pops the
    connections routed to one epoch; ``close()`` ends that loop at once."""

    def __init__(self, epoch: int, address: tuple[str, int]) -> None:
        self.epoch = epoch
        self._address = address
        self._q: queue.Queue[socket.socket | None] = queue.Queue()
        self._timeout: float | None = None
        self.closed = False

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def getsockname(self) -> tuple[str, int]:
        return self._address

    def put(self, conn: socket.socket) -> None:
        self._q.put(conn)

    def accept(self) -> tuple[socket.socket, object]:
        if self.closed:
            raise OSError("listener closed")
        try:
            conn = self._q.get(timeout=self._timeout)
        except queue.Empty:
            raise TimeoutError("no connection") from None
        if conn is None:
            raise OSError("listener closed")
        return conn, None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while True:  # connections nobody accepted
            try:
                conn = self._q.get_nowait()
            except queue.Empty:
                break
            if conn is not None:
                conn.close()
        self._q.put(None)  # wakes an accept() waiting right now


class EpochListener(Listener):
    """A :class:`Listener` whose socket is one epoch's share of a :class:`Door`."""

    def __init__(self, door: Door, sock: _EpochSocket) -> None:  # no super(): no real socket
        self.sock = cast(socket.socket, sock)
        self.address = door.address
        self._door = door
        self._epoch_sock = sock

    def close(self) -> None:
        self._door._retire(self._epoch_sock)


class Door:
    """Owns this member's data-plane listening socket; see the module docstring."""

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        hold_s: float = 5.0,
        header_s: float = _HEADER_S,
        per_source: int = _PER_SOURCE,
        on_ahead: Callable[[int], None] | None = None,
    ) -> None:
        self._listener = bind(address)
        self.address = self._listener.address
        self._hold_s = hold_s
        self._header_s = min(header_s, hold_s)
        self._per_source = per_source
        self._on_ahead = on_ahead
        self._lock = threading.Lock()
        self._open: dict[int, _EpochSocket] = {}
        self._floor = (0, 0, False)  # connections for groups below this are refused
        self._held: list[tuple[socket.socket, int, float]] = []  # (conn, epoch, deadline)
        # source address of every connection waiting (peeked or held), and their count
        # per address: the per-source quota (under _lock: listener() releases held ones)
        self._origin: dict[socket.socket, str] = {}
        self._by_source: Counter[str] = Counter()  # connections waiting for a header
        self._held_origin: dict[socket.socket, str] = {}
        self._held_by: Counter[str] = Counter()  # held connections, per source
        # connections with part of a header in, out of the selector until their next look
        self._parked: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._listener.sock.setblocking(False)
        self._sel.register(self._listener.sock, selectors.EVENT_READ, None)
        # close() wakes the thread through this pair: it sleeps until an event or
        # the next deadline of a connection it holds, not on a short poll
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="phalanx-door", daemon=True)
        self._thread.start()

    def listener(self, epoch: int, *, advance: bool = True) -> EpochListener:
        """The listener for ``epoch``'s group. With ``advance`` (a view's group) older
        epochs are refused from now on; without (a side group, e.g. a state transfer
        under an epoch id of its own) nothing else changes."""
        es = _EpochSocket(epoch, cast(tuple[str, int], self._listener.sock.getsockname()))
        key = split_epoch(epoch)
        with self._lock:
            if advance:
                self._floor = max(self._floor, key)
                for old in [e for e in self._open if split_epoch(e) < key]:
                    self._open.pop(old).close()
            self._open[epoch] = es
            keep = []
            for conn, ep, deadline in self._held:
                if ep == epoch:
                    self._release(conn)
                    es.put(conn)
                elif advance and split_epoch(ep) < key:
                    self._release(conn)
                    conn.close()
                else:
                    keep.append((conn, ep, deadline))
            self._held = keep
        return EpochListener(self, es)

    def _release(self, conn: socket.socket) -> None:
        """(Under _lock.) ``conn`` no longer waits here: its source's quota frees."""
        for origin, count in ((self._origin, self._by_source), (self._held_origin, self._held_by)):
            source = origin.pop(conn, None)
            if source is not None:
                count[source] -= 1
                if count[source] <= 0:
                    del count[source]

    def _retire(self, es: _EpochSocket) -> None:
        with self._lock:
            if self._open.get(es.epoch) is es:
                del self._open[es.epoch]
        es.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(5.0)
        with self._lock:
            for es in self._open.values():
                es.close()
            self._open.clear()
            for conn, _, _ in self._held:
                conn.close()
            self._held.clear()
            self._origin.clear()
            self._by_source.clear()
            self._held_origin.clear()
            self._held_by.clear()
        for key in list(self._sel.get_map().values()):
            if key.fileobj is not self._listener.sock:
                cast(socket.socket, key.fileobj).close()
        for conn in self._parked:
            conn.close()
        self._parked.clear()
        self._sel.close()
        self._wake_w.close()
        self._listener.close()

    # -- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        peeking: dict[socket.socket, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            for conn, at in list(self._parked.items()):
                if now >= at:  # part of a header was in: look again
                    del self._parked[conn]
                    self._peek(conn, peeking)
            for key, _ in self._sel.select(self._sleep_s(peeking)):
                if key.fileobj is self._listener.sock:
                    self._accept(peeking)
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                else:
                    self._peek(cast(socket.socket, key.fileobj), peeking)
            now = time.monotonic()
            for conn, deadline in list(peeking.items()):
                if now > deadline:
                    log.debug("event=door_drop reason=no-header")
                    self._forget(conn, peeking)
                    self._drop(conn)
            with self._lock:
                keep = []
                for conn, ep, deadline in self._held:
                    if now > deadline:
                        log.warning("event=door_drop reason=epoch-never-opened epoch=%d", ep)
                        self._release(conn)
                        conn.close()
                    else:
                        keep.append((conn, ep, deadline))
                self._held = keep

    def _sleep_s(self, peeking: dict[socket.socket, float]) -> float:
        """Until the first held or peeked connection's deadline, at most _IDLE_S."""
        with self._lock:
            deadlines = [deadline for _, _, deadline in self._held]
        deadlines.extend(peeking.values())
        deadlines.extend(self._parked.values())
        if not deadlines:
            return _IDLE_S
        return max(0.0, min(min(deadlines) - time.monotonic(), _IDLE_S))

    def _accept(self, peeking: dict[socket.socket, float]) -> None:
        while True:
            try:
                conn, peer = self._listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            with self._lock:
                if len(peeking) + len(self._held) >= _MAX_PENDING:
                    why = "too-many-pending"
                elif self._by_source[source] >= self._per_source:
                    why = "too-many-pending-from-source"
                else:
                    why = ""
                    self._origin[conn] = source
                    self._by_source[source] += 1
            if why:
                conn.close()
                log.warning("event=door_drop reason=%s source=%s", why, source)
                continue
            conn.setblocking(False)
            peeking[conn] = time.monotonic() + self._header_s
            self._sel.register(conn, selectors.EVENT_READ, None)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._release(conn)
        conn.close()

    def _forget(self, conn: socket.socket, peeking: dict[socket.socket, float]) -> None:
        peeking.pop(conn, None)
        self._parked.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn)

    def _peek(self, conn: socket.socket, peeking: dict[socket.socket, float]) -> None:
        try:
            data = conn.recv(HEADER_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if len(data) == 0:  # closed without a word: a reachability probe
            self._forget(conn, peeking)
            self._drop(conn)
            return
        if len(data) < HEADER_SIZE:
            # wait for the rest of the header -- not in the selector, which would
            # report the unread bytes again at once: one stalled connection (anyone
            # can open one) spun this thread until its deadline
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn)
            self._parked[conn] = time.monotonic() + _PARK_S
            return
        self._forget(conn, peeking)
        try:
            header = decode_header(data, 1 << 20)
            if header.kind != FrameKind.HELLO:
                raise FrameError("unexpected-frame", f"first frame is {header.kind.name}")
        except FrameError as exc:
            log.warning("event=door_drop reason=bad-header detail=%r", str(exc))
            self._drop(conn)
            return
        conn.setblocking(True)
        ahead = False
        with self._lock:
            es = self._open.get(header.epoch)
            if es is not None:
                self._release(conn)
                es.put(conn)
            elif split_epoch(header.epoch) > self._floor:
                # a well-formed header for a group not built yet: held, under a larger
                # quota of its own (a full mesh of peers behind one address -- a NAT,
                # many members on one host -- holds one link each per stream while
                # the group here is not up); still unauthenticated, so still bounded
                source = self._origin.get(conn, "?")
                self._release(conn)
                if self._held_by[source] >= _HELD_PER_SOURCE_FACTOR * self._per_source:
                    log.warning("event=door_drop reason=too-many-held source=%s", source)
                    conn.close()
                else:
                    self._held_origin[conn] = source
                    self._held_by[source] += 1
                    self._held.append((conn, header.epoch, time.monotonic() + self._hold_s))
                    ahead = True
            else:
                log.debug("event=door_drop reason=old-epoch epoch=%d", header.epoch)
                self._release(conn)
                conn.close()
        if ahead and self._on_ahead is not None:  # a hint, unauthenticated (see above)
            try:
                self._on_ahead(header.epoch)
            except Exception:
                log.exception("event=door_callback_failed epoch=%d", header.epoch)

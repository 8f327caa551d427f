"""Shard links over TCP: a :class:`ShardServer` serving a member's
:class:`~phalanx.checkpoint.store.ShardStore`, and :class:`TcpShardChannel`, the
:class:`~phalanx.checkpoint.channel.ShardChannel` the daemon hands the snapshot service.

This is the only module of :mod:`phalanx.checkpoint` that touches sockets, and it does
so through :mod:`phalanx.comm.transport`: every connection starts with the data plane's
HMAC handshake (``connect_link``/``accept_link``, cluster secret proved both ways) on
the fixed shard-plane epoch 0 and stream marker :data:`SHARD_STREAM`, so a stranger
never stores or reads a shard. After the handshake each request and each response is
one data-plane frame (``frames.encode_header``/``decode_header``: magic, version, CRC of
the header) whose ``seq`` is the request id and ``chunk`` the opcode (request) or status
(response). Payloads (little-endian)::

    key      = u16 owner_len, owner utf-8, i64 generation, i32 stripe, u16 index
    PUT      = key, u32 crc, shard bytes         -> OK | BUDGET | CORRUPT
    GET      = key                               -> OK u32 crc, bytes | MISSING | CORRUPT
    DELETE   = u32 count, count x key            -> OK
    LIST     = u16 owner_len, owner (0: all)     -> OK u32 count, count x key
    errors   : status != 0, payload = utf-8 text (at most 1 KiB)

Every call has a deadline (socket timeouts from one monotonic deadline); every length is
checked against ``max_message`` before a byte is allocated; a malformed request closes
that connection with a log line, never the server. The server reserves a PUT's bytes
in the store's budget before it allocates them, then reads them straight into the array
the store keeps (``recv_into``, no copy). Connections are capped (see
:class:`ShardServer`). LIST answers are one message of at most 4 MiB (no paging).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint._nice import DEFAULT_IO_NICE, check_increment, lower_own_priority
from phalanx.checkpoint.channel import ShardChannel
from phalanx.checkpoint.store import (
    MAX_OWNER_LEN,
    BudgetExceeded,
    HolderUnavailable,
    ShardCorrupt,
    ShardError,
    ShardKey,
    ShardMissing,
    ShardStore,
)
from phalanx.comm import handshake as hs
from phalanx.comm.frames import HEADER_SIZE, FrameKind, decode_header, encode_header
from phalanx.comm.transport import Listener, accept_link, bind, connect_link
from phalanx.errors import FrameError, HandshakeError
from phalanx.logthrottle import LogThrottle

__all__ = [
    "DEFAULT_MAX_CONNS",
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_MESSAGE",
    "SHARD_STREAM",
    "ShardServer",
    "TcpShardChannel",
    "decode_key",
    "encode_key",
]

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]

#: The shard plane's handshake: epoch 0 (no data-plane view uses it), world 2, the
#: connector is rank 1, the acceptor rank 0, stream SHARD_STREAM of SHARD_STREAMS.
SHARD_EPOCH = 0
SHARD_STREAMS = 0xFFFF
SHARD_STREAM = 0xFFFE
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024
#: ShardServer's caps: connections still in their handshake, authenticated ones
DEFAULT_MAX_HANDSHAKES = 64
DEFAULT_MAX_CONNS = 1024
_MAX_CONTROL = 4 * 1024 * 1024  # non-PUT requests and non-GET answers
_MAX_TEXT = 1024
#: the shard server's acceptor waits at most this long (close() wakes it sooner)
_ACCEPT_BACKSTOP_S = 30.0

OP_PUT, OP_GET, OP_DELETE, OP_LIST = 1, 2, 3, 4
ST_OK, ST_MISSING, ST_CORRUPT, ST_BUDGET, ST_BAD = 0, 1, 2, 3, 4
_ERRORS: dict[int, type[ShardError]] = {
    ST_MISSING: ShardMissing,
    ST_CORRUPT: ShardCorrupt,
    ST_BUDGET: BudgetExceeded,
}
_KEY_TAIL = struct.Struct("<qiH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def encode_key(key: ShardKey) -> bytes:
    owner = key.owner.encode()
    return _U16.pack(len(owner)) + owner + _KEY_TAIL.pack(key.generation, key.stripe, key.index)


def decode_key(data: bytes | memoryview, offset: int = 0) -> tuple[ShardKey, int]:
    """(key, offset after it); raises FrameError ``bad-payload`` on malformed bytes."""
    try:
        (n,) = _U16.unpack_from(data, offset)
        if n > MAX_OWNER_LEN:
            raise FrameError("bad-payload", f"owner of {n} bytes")
        owner = bytes(data[offset + 2 : offset + 2 + n]).decode()
        gen, stripe, index = _KEY_TAIL.unpack_from(data, offset + 2 + n)
        return ShardKey(owner, gen, stripe, index), offset + 2 + n + _KEY_TAIL.size
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, FrameError):
            raise
        raise FrameError("bad-payload", f"bad shard key: {exc}") from None


# --------------------------------------------------------------------------- socket I/O


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        sock.settimeout(_left(deadline))
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("connection closed")
        got += n


def _recv(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def _send(sock: socket.socket, parts: Sequence[bytes | memoryview], deadline: float) -> None:
    for part in parts:
        if len(part):
            sock.settimeout(_left(deadline))
            sock.sendall(part)


def _frame(seq: int, code: int, length: int) -> bytes:
    return encode_header(FrameKind.DATA, epoch=SHARD_EPOCH, seq=seq, chunk=code, length=length)


# --------------------------------------------------------------------------- server


class ShardServer:
    """Serves ``store`` to authenticated peers on ``listener`` (or a new listener on
    ``address``). One accept thread plus one thread per connection; :meth:`close`
    shuts every socket and joins every thread.

    Connections are capped: at most ``max_handshakes`` still proving the secret (a
    stranger gets no more than that many threads) and ``max_conns`` authenticated
    ones; one over either cap is closed at once (a rate-limited log line). A
    connection whose thread cannot start is closed and the accept loop backs off
    briefly; it never stops accepting. Each connection's thread runs ``io_nice``
    nicer than the process (:mod:`phalanx.checkpoint._nice`; the same default as
    :class:`~phalanx.checkpoint.SnapshotConfig`, and the daemon passes ``[snapshot]
    io_nice``): taking in peers' pieces, and serving them to a restore, is background
    work."""

    def __init__(
        self,
        store: ShardStore,
        *,
        secret: bytes,
        listener: Listener | None = None,
        address: str = "127.0.0.1:0",
        max_message: int = DEFAULT_MAX_MESSAGE,
        io_timeout: float = 30.0,
        handshake_timeout: float = 5.0,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        max_conns: int = DEFAULT_MAX_CONNS,
        io_nice: int = DEFAULT_IO_NICE,
    ) -> None:
        if not secret:
            raise ValueError("a shard server needs the cluster secret")
        if max_handshakes < 1 or max_conns < 1:
            raise ValueError("max_handshakes and max_conns must be >= 1")
        check_increment(io_nice)
        self._store = store
        self._secret = secret
        self._listener = listener or bind(address)
        self.address = self._listener.address
        self._max = max_message
        self._io_timeout = io_timeout
        self._hs_timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        self._max_conns = max_conns
        self._io_nice = io_nice
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # every connection whose thread runs; _authed: those past the handshake
        self._conns: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._authed: set[int] = set()
        self._ids = itertools.count()
        self._throttle = LogThrottle(log)
        # a backstop only: close() wakes the acceptor at once (it shuts the listening
        # socket down), so an idle one does not poll
        self._listener.sock.settimeout(_ACCEPT_BACKSTOP_S)
        self._thread = threading.Thread(target=self._accept, name="shard-accept", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._listener.close()  # shuts the socket down first: a waiting accept() wakes
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            conns = list(self._conns.values())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, t in conns:
            if t.ident is not None and t is not threading.current_thread():
                t.join(timeout)

    def __enter__(self) -> ShardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with self._lock:
                pending = len(self._conns) - len(self._authed)
                full = pending >= self._max_handshakes
            if full:
                self._throttle.warning(
                    "handshakes",
                    "shard connection refused: %d connections already in their handshake",
                    pending,
                )
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            cid = next(self._ids)
            t = threading.Thread(
                target=self._serve, args=(cid, sock), name="shard-conn", daemon=True
            )
            try:
                # under the lock: the thread's own cleanup (which takes it) runs only
                # after its entry exists, and no entry exists for a thread never started
                with self._lock:
                    t.start()
                    self._conns[cid] = (sock, t)
            except RuntimeError as exc:  # no thread to be had: this connection only
                self._throttle.warning("start", "shard connection dropped: %s", exc)
                with contextlib.suppress(OSError):
                    sock.close()
                self._stop.wait(0.1)

    def _serve(self, cid: int, sock: socket.socket) -> None:
        try:
            lower_own_priority(self._io_nice)
            sock.setblocking(True)

            def claim(hello: hs.Hello) -> hs.LinkRefusal | None:
                if hello.stream != SHARD_STREAM or hello.streams != SHARD_STREAMS:
                    return hs.LinkRefusal.UNEXPECTED
                with self._lock:  # the secret is proven: move to the authenticated
                    if len(self._authed) >= self._max_conns:
                        full = len(self._authed)
                    else:
                        self._authed.add(cid)
                        return None
                self._throttle.warning(
                    "conns", "shard link refused: %d authenticated links already", full
                )
                return hs.LinkRefusal.UNEXPECTED

            accept_link(
                sock,
                secret=self._secret,
                epoch=SHARD_EPOCH,
                world=2,
                rank=0,
                claim=claim,
                buffer_bytes=0,
                deadline=time.monotonic() + self._hs_timeout,
            )
            while not self._stop.is_set():
                if not self._one(sock):
                    return
        except HandshakeError as exc:
            self._throttle.warning("refused", "shard link refused: %s", exc)
        except (FrameError, ConnectionError, TimeoutError, OSError) as exc:
            if not self._stop.is_set():
                log.warning("shard link closed: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._conns.pop(cid, None)
                self._authed.discard(cid)

    def _one(self, sock: socket.socket) -> bool:
        """Serve one request; False when the peer closed the link between requests."""
        head = bytearray(HEADER_SIZE)
        view = memoryview(head)
        got = 0
        while got < HEADER_SIZE:  # idle wait: poll so close() is prompt
            sock.settimeout(0.5 if got == 0 else self._io_timeout)
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                if got == 0 and not self._stop.is_set():
                    continue
                raise
            if n == 0:
                if got == 0:
                    return False
                raise ConnectionError("connection closed mid-header")
            got += n
        header = decode_header(head, self._max)
        deadline = time.monotonic() + self._io_timeout
        if header.kind != FrameKind.DATA or header.epoch != SHARD_EPOCH:
            raise FrameError("unexpected-frame", f"{header.kind.name} epoch {header.epoch}")
        op, seq, length = header.chunk, header.seq, header.length
        if op == OP_PUT:
            self._put(sock, seq, length, deadline)
            return True
        if length > _MAX_CONTROL:
            raise FrameError("too-large", f"request of {length} bytes")
        body = _recv(sock, length, deadline)
        try:
            status, parts = self._control(op, body)
        except ShardError as exc:
            status, parts = _status(exc), [exc.detail.encode()[:_MAX_TEXT]]
        total = sum(len(p) for p in parts)
        _send(sock, [_frame(seq, status, total), *parts], deadline)
        return True

    def _put(self, sock: socket.socket, seq: int, length: int, deadline: float) -> None:
        first = _recv(sock, min(length, 2 + MAX_OWNER_LEN + _KEY_TAIL.size + 4), deadline)
        key, off = decode_key(first)
        if off + 4 > len(first):
            raise FrameError("bad-payload", "short PUT")
        (crc,) = _U32.unpack_from(first, off)
        off += 4
        n = length - off
        have = len(first) - off
        try:
            # set the bytes aside first: concurrent PUTs never allocate past the budget
            reservation = self._store.reserve(key, n)
        except BudgetExceeded as e:
            # Drain the bytes in small pieces: never allocate what we will not keep.
            left = n - have
            scratch = memoryview(bytearray(min(left, 1 << 20) or 1))
            while left:
                step = min(left, len(scratch))
                _recv_into(sock, scratch[:step], deadline)
                left -= step
            exc: ShardError = e
        else:
            try:  # a timeout, a disconnect, a bad CRC: the reservation goes back
                data = np.empty(n, np.uint8)  # only now: the budget has room for it
                data[:have] = np.frombuffer(first, np.uint8, have, off)
                _recv_into(sock, data.data[have:], deadline)
                try:
                    self._store.put(key, data, crc, reservation=reservation)
                except ShardError as e:
                    exc = e
                else:
                    _send(sock, [_frame(seq, ST_OK, 0)], deadline)
                    return
            finally:
                reservation.release()
        text = exc.detail.encode()[:_MAX_TEXT]
        _send(sock, [_frame(seq, _status(exc), len(text)), text], deadline)

    def _control(self, op: int, body: bytes) -> tuple[int, list[bytes | memoryview]]:
        try:
            return self._control_op(op, body)
        except (struct.error, UnicodeDecodeError) as exc:  # a malformed body: its peer's bug
            raise FrameError("bad-payload", f"opcode {op}: {exc}") from None

    def _control_op(self, op: int, body: bytes) -> tuple[int, list[bytes | memoryview]]:
        if op == OP_GET:
            key, _ = decode_key(body)
            data, crc = self._store.get(key)
            return ST_OK, [_U32.pack(crc), data.data]
        if op == OP_DELETE:
            (count,) = _U32.unpack_from(body, 0)
            off, keys = 4, []
            for _ in range(count):
                key, off = decode_key(body, off)
                keys.append(key)
            self._store.delete(keys)
            return ST_OK, []
        if op == OP_LIST:
            (n,) = _U16.unpack_from(body, 0)
            owner = body[2 : 2 + n].decode() if n else None
            keys = self._store.keys(owner)
            out = [_U32.pack(len(keys))] + [encode_key(k) for k in keys]
            return ST_OK, [b"".join(out)]
        raise FrameError("bad-payload", f"unknown opcode {op}")


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle link's peer closed it (EOF or an error waiting), without
    blocking; an idle link has nothing else to read."""
    try:
        sock.setblocking(False)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        finally:
            sock.setblocking(True)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _status(exc: ShardError) -> int:
    for code, cls in _ERRORS.items():
        if isinstance(exc, cls):
            return code
    return ST_BAD


# --------------------------------------------------------------------------- channel


class TcpShardChannel(ShardChannel):
    """Shard calls to holders by member id. ``addresses`` maps member id -> the
    holder's shard address (``set_addresses`` replaces it, e.g. on a view change).
    Up to ``max_conns`` pooled connections per holder; a connection that saw any error
    is dropped, never reused."""

    def __init__(
        self,
        *,
        secret: bytes,
        addresses: Mapping[str, str] | Callable[[str], str | None] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_conns: int = 4,
        handshake_timeout: float = 5.0,
    ) -> None:
        if not secret:
            raise ValueError("a shard channel needs the cluster secret")
        self._secret = secret
        self._resolve: Callable[[str], str | None]
        self.set_addresses(addresses)
        self._max = max_message
        self._max_conns = max_conns
        self._hs_timeout = handshake_timeout
        # idle links per holder, with the address each was opened to
        self._idle: dict[str, list[tuple[str, socket.socket]]] = {}
        # links in use -> the address each was opened to (back to _idle with it)
        self._opened_to: weakref.WeakKeyDictionary[socket.socket, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._closed = False

    def set_addresses(
        self, addresses: Mapping[str, str] | Callable[[str], str | None] | None
    ) -> None:
        """Where holders listen: a mapping or a function of the member id."""
        if addresses is None:
            addresses = {}
        if callable(addresses):
            self._resolve = addresses
        else:
            table = dict(addresses)
            self._resolve = table.get

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [s for lst in self._idle.values() for _, s in lst]
            self._idle.clear()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    # -- connections
    def _take(self, holder: str, deadline: float) -> socket.socket:
        address = self._resolve(holder)
        while True:
            with self._lock:
                if self._closed:
                    raise HolderUnavailable("channel closed", holder=holder)
                idle = self._idle.get(holder)
                if not idle:
                    break
                opened_to, sock = idle.pop()
            # a holder restarted with the same id (its address may be new) closed the
            # links of its old process: such a link would fail the next call -- and a
            # failed put abandons the whole generation
            # (an unknown address -- a holder between views -- keeps a live link usable)
            if address in (None, opened_to) and not _closed_by_peer(sock):
                with self._lock:
                    self._opened_to[sock] = opened_to
                return sock
            with contextlib.suppress(OSError):
                sock.close()
        if not address:
            raise HolderUnavailable("no known shard address", holder=holder)
        try:
            link = connect_link(
                address,
                secret=self._secret,
                epoch=SHARD_EPOCH,
                world=2,
                rank=1,
                peer=0,
                stream=SHARD_STREAM,
                streams=SHARD_STREAMS,
                buffer_bytes=0,
                deadline=min(deadline, time.monotonic() + self._hs_timeout),
                handshake_timeout=self._hs_timeout,
            )
        except HandshakeError as exc:
            raise HolderUnavailable(f"cannot link to {address}: {exc}", holder=holder) from None
        with self._lock:
            self._opened_to[link.sock] = address
        return link.sock

    def _give(self, holder: str, sock: socket.socket) -> None:
        with self._lock:
            address = self._opened_to.pop(sock, None)
            idle = self._idle.setdefault(holder, [])
            if address is not None and not self._closed and len(idle) < self._max_conns:
                idle.append((address, sock))
                return
        sock.close()

    def _call(
        self,
        holder: str,
        op: int,
        parts: Sequence[bytes | memoryview],
        timeout: float,
        key: ShardKey | None = None,
        want_data: bool = False,
    ) -> tuple[bytes, U8 | None]:
        deadline = time.monotonic() + timeout
        sock = self._take(holder, deadline)
        ok = False
        try:
            seq = next(self._seq) % 2**63
            total = sum(len(p) for p in parts)
            _send(sock, [_frame(seq, op, total), *parts], deadline)
            header = decode_header(_recv(sock, HEADER_SIZE, deadline), self._max)
            if header.kind != FrameKind.DATA or header.seq != seq:
                raise FrameError("unexpected-frame", f"answer to request {header.seq}")
            if header.chunk != ST_OK:
                text = _recv(sock, min(header.length, _MAX_TEXT), deadline)
                if header.length > _MAX_TEXT:
                    raise FrameError("too-large", "error text")
                ok = True
                cls = _ERRORS.get(header.chunk)
                if cls is None:
                    raise HolderUnavailable(
                        f"holder refused: {text.decode(errors='replace')}", holder=holder, key=key
                    )
                raise cls(text.decode(errors="replace"), holder=holder, key=key)
            if want_data:
                if header.length < 4:
                    raise FrameError("bad-payload", "short GET answer")
                (crc,) = _U32.unpack(_recv(sock, 4, deadline))
                data = np.empty(header.length - 4, np.uint8)
                _recv_into(sock, data.data, deadline)
                ok = True
                return _U32.pack(crc), data
            if header.length > _MAX_CONTROL:
                raise FrameError("too-large", f"answer of {header.length} bytes")
            body = _recv(sock, header.length, deadline)
            ok = True
            return body, None
        except (OSError, TimeoutError, FrameError) as exc:
            raise HolderUnavailable(
                f"{type(exc).__name__}: {exc}", holder=holder, key=key
            ) from None
        finally:
            if ok:
                self._give(holder, sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()

    # -- ShardChannel
    def put(self, holder: str, key: ShardKey, data: U8, crc: int, *, timeout: float) -> None:
        if data.nbytes + 512 > self._max:
            raise ValueError(f"shard of {data.nbytes} bytes exceeds max_message")
        head = encode_key(key) + _U32.pack(crc)
        self._call(holder, OP_PUT, [head, data.data], timeout, key)

    def get(self, holder: str, key: ShardKey, *, timeout: float) -> tuple[U8, int]:
        head, data = self._call(holder, OP_GET, [encode_key(key)], timeout, key, want_data=True)
        assert data is not None
        (crc,) = _U32.unpack(head)
        if crc32(data) != crc:
            raise ShardCorrupt("bytes changed in transit", holder=holder, key=key)
        return data, crc

    def delete(self, holder: str, keys: Sequence[ShardKey], *, timeout: float) -> None:
        for i in range(0, len(keys), 10000):
            part = keys[i : i + 10000]
            body = _U32.pack(len(part)) + b"".join(encode_key(k) for k in part)
            self._call(holder, OP_DELETE, [body], timeout)

    def list(self, holder: str, owner: str | None = None, *, timeout: float) -> list[ShardKey]:
        o = (owner or "").encode()
        body, _ = self._call(holder, OP_LIST, [_U16.pack(len(o)) + o], timeout)
        try:
            (count,) = _U32.unpack_from(body, 0)
            off, keys = 4, []
            for _ in range(count):
                key, off = decode_key(body, off)
                keys.append(key)
        except (struct.error, FrameError) as exc:
            raise HolderUnavailable(f"bad LIST answer: {exc}", holder=holder) from None
        return sorted(keys)

"""TCP for the data plane: listeners, authenticated links, and non-blocking channels.

This is the only module of :mod:`phalanx.comm` that touches sockets (with
:mod:`phalanx.comm.zerocopy`, whose pipes it drives). It

* binds listeners (``bind("127.0.0.1:0")``),
* establishes a link to a peer and runs the handshake of
  :mod:`phalanx.comm.handshake` on it, blocking, with a deadline on every read and write,
* wraps an established link in a :class:`Channel`: a non-blocking socket plus the
  state of the frame being sent and the frame being received, so that the engine's
  single I/O thread can move many links forward at once with ``recv_into`` into
  preallocated buffers and ``sendmsg`` of (header, memoryview) pairs, or the header
  followed by the payload's pages spliced in (``queue(..., zero_copy=True)``) —
  tensor bytes are never copied by Python on their way to or from the kernel.

It knows nothing about collectives: what a frame means is the engine's business.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from phalanx.comm import handshake as hs
from phalanx.comm import zerocopy
from phalanx.comm.frames import FrameDecoder, FrameHeader, FrameKind, encode_header
from phalanx.errors import AuthError, ConfigError, FrameError, HandshakeError

__all__ = [
    "Channel",
    "FrameSink",
    "Link",
    "Listener",
    "TcpInfo",
    "accept_link",
    "bind",
    "connect_link",
    "parse_address",
    "tcp_info",
]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> (host, port), with a clear error."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in address {address!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in address {address!r}")
    return host, port


def _tune(sock: socket.socket, buffer_bytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes:  # 0: leave the sizes to the kernel's autotuning
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Listener:
    """A bound, listening TCP socket; ``address`` is what peers connect to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        """Stop listening; a thread blocked in ``accept()`` wakes now (shutdown wakes
        it on Linux, where close alone would leave it to its next timeout)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bind(address: str = "127.0.0.1:0", *, backlog: int = 128) -> Listener:
    """Bind and listen on ``address`` (port 0 picks a free port)."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock)


# --------------------------------------------------------------------------- blocking I/O
# used only during handshakes, every call bounded by the handshake deadline


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("handshake deadline passed")
    return left


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(data)


def _read_frame(sock: socket.socket, deadline: float) -> tuple[FrameHeader, bytes]:
    """One whole frame, read with the data plane's decoder (blocking, bounded)."""
    decoder = FrameDecoder(hs.MAX_HANDSHAKE_PAYLOAD)
    while True:
        if decoder.needs_dest:
            assert decoder.header is not None
            decoder.place(memoryview(bytearray(decoder.header.length)))
        if decoder.complete:
            header, payload = decoder.pop()
            return header, bytes(payload)
        sock.settimeout(_remaining(deadline))
        n = sock.recv_into(decoder.window())
        if n == 0:
            raise ConnectionError("connection closed during handshake")
        decoder.advance(n)


def _send_frame(
    sock: socket.socket, kind: FrameKind, epoch: int, payload: bytes, deadline: float
) -> None:
    head = encode_header(kind, epoch=epoch, seq=0, chunk=0, length=len(payload))
    _send_all(sock, head + payload, deadline)


def _tell(
    sock: socket.socket, reason: hs.LinkRefusal, text: str, epoch: int, deadline: float
) -> None:
    """Best effort: say why this side refuses, so the other side's error is precise."""
    with contextlib.suppress(OSError, TimeoutError):
        _send_frame(sock, FrameKind.REJECT, epoch, hs.encode_reject(reason, text), deadline)


def _reject_error(payload: bytes, peer: int | None) -> HandshakeError:
    reason, text = hs.decode_reject(payload)
    name = (
        reason.name.lower().replace("_", "-") if isinstance(reason, hs.LinkRefusal) else str(reason)
    )
    if reason == hs.LinkRefusal.BAD_AUTH:
        return AuthError("bad-auth", f"peer refused our proof: {text}", peer=peer)
    return HandshakeError(name, f"peer rejected the link: {text}", peer=peer)


class Link:
    """An established, authenticated connection to ``peer`` (blocking socket)."""

    def __init__(self, sock: socket.socket, peer: int, stream: int) -> None:
        self.sock = sock
        self.peer = peer
        self.stream = stream


def connect_link(
    address: str,
    *,
    secret: bytes,
    epoch: int,
    world: int,
    rank: int,
    peer: int,
    stream: int,
    streams: int,
    buffer_bytes: int,
    deadline: float,
    handshake_timeout: float,
) -> Link:
    """Connect to ``peer`` at ``address`` and run the connector side of the handshake.

    Retries refused connections until ``deadline`` (the peer may not listen yet).
    Raises :class:`AuthError` if the peer cannot prove the secret or refuses ours,
    :class:`HandshakeError` for any other refusal or a passed deadline.
    """
    host, port = parse_address(address)
    try:
        hello = hs.Hello(world, rank, peer, stream, streams, hs.new_nonce())
    except ValueError as exc:
        raise ConfigError(f"bad link arguments: {exc}") from None
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            _tune(sock, buffer_bytes)
            sock.settimeout(max(0.001, min(deadline - time.monotonic(), handshake_timeout)))
            sock.connect((host, port))
            break
        except (ConnectionRefusedError, TimeoutError, OSError) as exc:
            sock.close()
            retryable = isinstance(exc, ConnectionRefusedError | TimeoutError) or exc.errno in (
                errno.ECONNREFUSED,
                errno.ECONNRESET,
                errno.EAGAIN,
            )
            if not retryable or time.monotonic() + delay >= deadline:
                raise HandshakeError(
                    "unreachable", f"cannot connect to {address}: {exc}", peer=peer
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    hs_deadline = min(deadline, time.monotonic() + handshake_timeout)
    try:
        hello_payload = hs.encode_hello(hello)
        _send_frame(sock, FrameKind.HELLO, epoch, hello_payload, hs_deadline)
        header, payload = _read_frame(sock, hs_deadline)
        if header.kind == FrameKind.REJECT:
            raise _reject_error(payload, peer)
        if header.kind != FrameKind.CHALLENGE:
            raise HandshakeError(
                "malformed", f"expected CHALLENGE, got {header.kind.name}", peer=peer
            )
        challenge = hs.decode_challenge(payload)
        try:
            hs.check_mac(
                hs.accept_mac(secret, hello_payload, challenge.nonce, epoch, challenge.rank),
                challenge.mac,
                who=f"peer at {address}",
                peer=peer,
            )
        except AuthError:
            _tell(
                sock,
                hs.LinkRefusal.BAD_AUTH,
                "your proof of the cluster secret failed",
                epoch,
                hs_deadline,
            )
            raise
        if header.epoch != epoch:
            _tell(
                sock,
                hs.LinkRefusal.WRONG_EPOCH,
                f"this rank is in epoch {epoch}",
                epoch,
                hs_deadline,
            )
            raise HandshakeError("wrong-epoch", f"peer is in epoch {header.epoch}", peer=peer)
        if challenge.rank != peer:
            _tell(sock, hs.LinkRefusal.WRONG_RANK, f"expected rank {peer}", epoch, hs_deadline)
            raise HandshakeError("wrong-rank", f"{address} is rank {challenge.rank}", peer=peer)
        proof = hs.connect_mac(secret, hello_payload, challenge.nonce, epoch)
        _send_frame(sock, FrameKind.PROOF, epoch, proof, hs_deadline)
        header, payload = _read_frame(sock, hs_deadline)
        if header.kind == FrameKind.REJECT:
            raise _reject_error(payload, peer)
        if header.kind != FrameKind.WELCOME:
            raise HandshakeError(
                "malformed", f"expected WELCOME, got {header.kind.name}", peer=peer
            )
    except (HandshakeError, FrameError, OSError) as exc:
        sock.close()
        if isinstance(exc, HandshakeError):
            raise
        if isinstance(exc, TimeoutError):
            raise HandshakeError(
                "timeout", f"handshake with {address} timed out", peer=peer
            ) from None
        raise HandshakeError("io", f"handshake with {address}: {exc}", peer=peer) from None
    return Link(sock, peer, stream)


Claim = Callable[[hs.Hello], "hs.LinkRefusal | None"]


def accept_link(
    sock: socket.socket,
    *,
    secret: bytes,
    epoch: int,
    world: int,
    rank: int,
    claim: Claim,
    buffer_bytes: int,
    deadline: float,
) -> Link:
    """Run the acceptor side of the handshake on an accepted socket.

    ``claim(hello)`` is called only after the connector proved the secret; it returns
    ``None`` to take the link or a :class:`LinkRefusal`. On any failure a REJECT is
    sent when possible, the socket is closed and the error raised.
    """

    def reject(reason: hs.LinkRefusal, text: str) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            _send_frame(sock, FrameKind.REJECT, epoch, hs.encode_reject(reason, text), deadline)

    peer: int | None = None
    try:
        _tune(sock, buffer_bytes)
        try:
            header, payload = _read_frame(sock, deadline)
        except FrameError as exc:
            reason = (
                hs.LinkRefusal.BAD_VERSION
                if exc.reason == "bad-version"
                else hs.LinkRefusal.MALFORMED
            )
            reject(reason, str(exc))
            raise HandshakeError(exc.reason, str(exc)) from None
        if header.kind != FrameKind.HELLO:
            reject(hs.LinkRefusal.MALFORMED, f"expected HELLO, got {header.kind.name}")
            raise HandshakeError("malformed", f"expected HELLO, got {header.kind.name}")
        try:
            hello = hs.decode_hello(payload)
        except HandshakeError as exc:
            reject(hs.LinkRefusal.MALFORMED, str(exc))
            raise
        peer = hello.from_rank
        nonce_s = hs.new_nonce()
        mac = hs.accept_mac(secret, payload, nonce_s, header.epoch, rank)
        _send_frame(
            sock,
            FrameKind.CHALLENGE,
            epoch,
            hs.encode_challenge(hs.Challenge(rank, nonce_s, mac)),
            deadline,
        )
        header2, proof_payload = _read_frame(sock, deadline)
        if header2.kind == FrameKind.REJECT:
            raise _reject_error(proof_payload, peer)
        if header2.kind != FrameKind.PROOF:
            reject(hs.LinkRefusal.MALFORMED, f"expected PROOF, got {header2.kind.name}")
            raise HandshakeError("malformed", f"expected PROOF, got {header2.kind.name}", peer=peer)
        try:
            hs.check_mac(
                hs.connect_mac(secret, payload, nonce_s, header.epoch),
                hs.decode_proof(proof_payload),
                who=f"connector claiming rank {peer}",
                peer=peer,
            )
        except HandshakeError:
            reject(hs.LinkRefusal.BAD_AUTH, "proof of the cluster secret failed")
            raise
        if header.epoch != epoch:
            reject(hs.LinkRefusal.WRONG_EPOCH, f"this group is epoch {epoch}")
            raise HandshakeError(
                "wrong-epoch", f"peer is in epoch {header.epoch}, we are in {epoch}", peer=peer
            )
        if hello.world != world:
            reject(hs.LinkRefusal.WORLD_MISMATCH, f"this group has world {world}")
            raise HandshakeError("world-mismatch", f"peer says world {hello.world}", peer=peer)
        if hello.to_rank != rank or hello.from_rank >= world or hello.from_rank == rank:
            reject(hs.LinkRefusal.WRONG_RANK, f"this is rank {rank} of {world}")
            raise HandshakeError(
                "wrong-rank", f"HELLO from {hello.from_rank} to {hello.to_rank}", peer=peer
            )
        verdict = claim(hello)
        if verdict is not None:
            reject(verdict, f"link from rank {peer} stream {hello.stream} refused")
            raise HandshakeError(
                verdict.name.lower().replace("_", "-"), f"link from rank {peer} refused", peer=peer
            )
        _send_frame(sock, FrameKind.WELCOME, epoch, b"", deadline)
    except (OSError, TimeoutError, FrameError) as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            raise HandshakeError("timeout", "handshake timed out", peer=peer) from None
        raise HandshakeError("io", str(exc), peer=peer) from None
    except BaseException:
        sock.close()
        raise
    return Link(sock, hello.from_rank, hello.stream)


# --------------------------------------------------------------------------- TCP_INFO

_TCP_INFO = struct.Struct("<8x36x16x8xII16x8xI")  # rtt, rttvar (usec) @68, total_retrans @100


class TcpInfo(NamedTuple):
    rtt_s: float
    rttvar_s: float
    total_retrans: int


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    """Round-trip time and retransmissions the kernel knows for ``sock`` (Linux);
    ``None`` where TCP_INFO is not available or the socket is closed."""
    opt = getattr(socket, "TCP_INFO", None)
    if opt is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, opt, _TCP_INFO.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO.size:
        return None
    rtt, rttvar, retrans = _TCP_INFO.unpack_from(raw)
    return TcpInfo(rtt / 1e6, rttvar / 1e6, retrans)


# --------------------------------------------------------------------------- channels

_MSG_MORE = getattr(socket, "MSG_MORE", 0)  # the spliced payload follows the header


class FrameSink(Protocol):
    """What a :class:`Channel` calls as frames arrive (implemented by the engine)."""

    def frame_dest(self, channel: Channel, header: FrameHeader) -> memoryview | None:
        """Where the payload of ``header`` goes (exactly ``header.length`` bytes), or
        ``None`` to park: the channel stops reading, keeps the header, and asks again
        on the next ``pump_recv`` (the frame belongs to work not started yet)."""
        ...

    def frame_done(self, channel: Channel, header: FrameHeader, payload: memoryview) -> None:
        """The whole frame is in; ``payload`` is the view returned by frame_dest."""
        ...


class Channel:
    """One established link, non-blocking, with its in-flight send and receive frames.

    The engine is its only user (its thread, or a caller's thread starting an op
    inline, with the engine's state held: one at a time). ``pump_recv`` reads as much
    as the kernel has with the data plane's :class:`~phalanx.comm.frames.FrameDecoder`
    (header first, then the payload straight into the buffer the sink chooses);
    ``pump_send`` writes as much of the queued frame as the kernel takes.
    """

    __slots__ = (
        "_decoder",
        "_out",
        "_pipe",
        "_zc_addr",
        "_zc_left",
        "_zc_ref",
        "bytes_recv",
        "bytes_sent",
        "bytes_zero_copy",
        "closed",
        "fd",
        "max_payload",
        "peer",
        "sock",
        "stream",
    )

    def __init__(self, link: Link, max_payload: int) -> None:
        self.sock = link.sock
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.peer = link.peer
        self.stream = link.stream
        self.max_payload = max_payload
        self._decoder = FrameDecoder(max_payload)
        self._out: list[memoryview] = []
        # zero-copy payload in flight: address and bytes not yet in the pipe
        self._pipe: zerocopy.SplicePipe | None = None
        self._zc_addr = 0
        self._zc_left = 0
        self._zc_ref: memoryview | None = None  # keeps the payload's memory alive
        self.bytes_sent = 0
        self.bytes_zero_copy = 0  # of bytes_sent: payload pages handed over, not copied
        self.bytes_recv = 0
        self.closed = False

    # -- sending
    @property
    def sending(self) -> bool:
        return bool(self._out) or self._zc_ref is not None

    def queue(self, header: bytes, payload: Buffer = b"", *, zero_copy: bool = False) -> None:
        """Start sending one frame; the previous one must be finished.

        ``zero_copy``: hand the payload's pages to the kernel instead of copying them
        (see :mod:`phalanx.comm.zerocopy`; the caller guarantees the memory stays
        unchanged until the receiver has read it). Ignored where unavailable.
        """
        if self.sending:
            raise RuntimeError("a frame is already being sent on this channel")
        out = [memoryview(header)]
        if len(payload):
            view = memoryview(payload).cast("B")
            if zero_copy and view.contiguous and zerocopy.available():
                if self._pipe is None:
                    self._pipe = zerocopy.SplicePipe()
                self._zc_ref = view
                self._zc_addr = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
                self._zc_left = view.nbytes
            else:
                out.append(view)
        self._out = out

    def pump_send(self) -> bool:
        """Write what the kernel takes; True once the queued frame is completely sent."""
        out = self._out
        while out:
            try:
                n = self.sock.sendmsg(out, (), _MSG_MORE if self._zc_ref is not None else 0)
            except (BlockingIOError, InterruptedError):
                return False
            self.bytes_sent += n
            while n:
                first = out[0]
                if n >= len(first):
                    n -= len(first)
                    out.pop(0)
                else:
                    out[0] = first[n:]
                    n = 0
        pipe = self._pipe
        if self._zc_ref is None or pipe is None:
            return True
        while self._zc_left or pipe.fill:
            if pipe.fill:
                try:
                    moved = pipe.drain(self.fd, more=self._zc_left > 0)
                except (BlockingIOError, InterruptedError):
                    return False
                self.bytes_sent += moved
                self.bytes_zero_copy += moved
                continue
            taken = pipe.feed(self._zc_addr, self._zc_left)
            if not taken:  # cannot happen with an empty pipe; never spin
                raise OSError(errno.EIO, "vmsplice took nothing into an empty pipe")
            self._zc_addr += taken
            self._zc_left -= taken
        self._zc_ref = None
        return True

    # -- receiving
    @property
    def mid_frame(self) -> bool:
        """A frame's payload is being received (its destination placed, not all in)."""
        return self._decoder.in_payload

    @property
    def parked(self) -> bool:
        """A header is in but the sink has no place for its payload yet."""
        return self._decoder.needs_dest

    def pump_recv(self, sink: FrameSink) -> None:
        """Read until the kernel has nothing more or the sink parks a frame; hand
        complete frames to ``sink``.

        Raises ConnectionError on EOF, FrameError on a bad header, and whatever the
        sink raises.
        """
        recv_into = self.sock.recv_into
        decoder = self._decoder
        while True:
            if decoder.needs_dest:
                header = decoder.header
                assert header is not None
                dest = sink.frame_dest(self, header)
                if dest is None:
                    return  # parked: asked again on the next pump
                decoder.place(dest)
            if decoder.complete:
                header, payload = decoder.pop()
                sink.frame_done(self, header, payload)
                continue
            try:
                n = recv_into(decoder.window())
            except (BlockingIOError, InterruptedError):
                return
            if n == 0:
                raise ConnectionResetError(f"rank {self.peer} closed the connection")
            self.bytes_recv += n
            decoder.advance(n)

    def discard(self) -> bool:
        """Read and drop whatever the kernel holds (after a failure); True at EOF."""
        sink = bytearray(65536)
        while True:
            try:
                n = self.sock.recv_into(sink)
            except (BlockingIOError, InterruptedError):
                return False
            if n == 0:
                return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            if self._pipe is not None:
                self._pipe.close()
            self._zc_ref = None

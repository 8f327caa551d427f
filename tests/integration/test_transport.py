"""TCP links over real sockets on 127.0.0.1: listeners, the handshake from both ends
(well-behaved peers, strangers with the wrong secret, refused claims, wrong epoch,
rank or world), raw clients that send garbage, a lying length or nothing at all,
unreachable peers, and Channel's non-blocking pumps over a socketpair.

Every wait is bounded; every test joins its threads and must leave no socket open
(the sockets in /proc/self/fd are compared around each test, and a socket closed only
by the garbage collector is caught through its ResourceWarning)."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import threading
import time
import tracemalloc
import warnings
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from phalanx.comm import handshake as hs
from phalanx.comm.frames import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameHeader,
    FrameKind,
    encode_frame,
    encode_header,
)
from phalanx.comm.transport import (
    Channel,
    Link,
    Listener,
    accept_link,
    bind,
    connect_link,
    parse_address,
)
from phalanx.errors import AuthError, FrameError, HandshakeError

BUF = 1 << 16
JOIN_S = 10.0  # no handshake here may take anywhere near this long
SLACK_S = 1.5  # scheduling slack on a loaded 2-core machine

# --------------------------------------------------------------------------- fixtures


def _open_sockets() -> set[str]:
    """The sockets this process holds, by inode ("socket:[1234]"), from /proc/self/fd."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                out.add(target)
    return out


@pytest.fixture(autouse=True)
def _no_leaked_sockets(request: pytest.FixtureRequest) -> Iterator[None]:
    gc.collect()
    before = _open_sockets()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaked = _open_sockets() - before
    assert not leaked, f"the test left sockets open: {sorted(leaked)}"
    if request.node.get_closest_marker("xfail") is None:
        unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not unclosed, f"sockets closed only by the garbage collector: {unclosed}"


@pytest.fixture
def listener() -> Iterator[Listener]:
    with bind("127.0.0.1:0") as lst:
        yield lst


# --------------------------------------------------------------------------- helpers


@dataclass
class Acceptor:
    """``accept_link`` on the next connection to ``listener``, in a joined thread."""

    listener: Listener
    secret: bytes
    epoch: int = 1
    world: int = 4
    rank: int = 2
    verdict: hs.LinkRefusal | None = None
    deadline_s: float = 5.0
    claimed: list[hs.Hello] = field(default_factory=list)
    link: Link | None = None
    error: BaseException | None = None
    elapsed: float = 0.0
    _thread: threading.Thread | None = None

    def claim(self, hello: hs.Hello) -> hs.LinkRefusal | None:
        self.claimed.append(hello)
        return self.verdict

    def _run(self) -> None:
        start = time.monotonic()
        deadline = start + self.deadline_s
        try:
            self.listener.sock.settimeout(self.deadline_s)
            conn, _ = self.listener.sock.accept()
            self.link = accept_link(
                conn,
                secret=self.secret,
                epoch=self.epoch,
                world=self.world,
                rank=self.rank,
                claim=self.claim,
                buffer_bytes=BUF,
                deadline=deadline,
            )
        except BaseException as exc:
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - start

    def __enter__(self) -> Acceptor:
        self._thread = threading.Thread(target=self._run, name="acceptor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()
        if self.link is not None:
            self.link.sock.close()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(JOIN_S)
        assert not self._thread.is_alive(), "accept_link did not return (hang)"

    def failure(self) -> HandshakeError:
        self.join()
        assert self.link is None, "the acceptor established a link it should have refused"
        assert isinstance(self.error, HandshakeError), repr(self.error)
        return self.error


def connect(
    address: str,
    secret: bytes,
    *,
    epoch: int = 1,
    world: int = 4,
    rank: int = 1,
    peer: int = 2,
    stream: int = 0,
    streams: int = 1,
    deadline_s: float = 5.0,
    handshake_timeout: float = 5.0,
) -> Link:
    return connect_link(
        address,
        secret=secret,
        epoch=epoch,
        world=world,
        rank=rank,
        peer=peer,
        stream=stream,
        streams=streams,
        buffer_bytes=BUF,
        deadline=time.monotonic() + deadline_s,
        handshake_timeout=handshake_timeout,
    )


def connect_fails(address: str, secret: bytes, **kwargs: object) -> HandshakeError:
    """Run connect() expecting a HandshakeError; close the link if one came back."""
    try:
        link = connect(address, secret, **kwargs)  # type: ignore[arg-type]
    except HandshakeError as exc:
        return exc
    link.sock.close()
    raise AssertionError("connect_link succeeded where it should have failed")


def raw_client(address: str) -> socket.socket:
    host, port = parse_address(address)
    sock = socket.create_connection((host, port), timeout=JOIN_S)
    return sock


def send_frame(sock: socket.socket, kind: FrameKind, payload: bytes = b"", epoch: int = 1) -> None:
    sock.sendall(encode_header(kind, epoch=epoch, seq=0, chunk=0, length=len(payload)) + payload)


def read_frames(sock: socket.socket, *, until_eof: bool = True, count: int = 0) -> list[Frame]:
    """Frames from ``sock`` until EOF (or until ``count`` frames), within JOIN_S."""
    decoder = FrameDecoder(max_payload=hs.MAX_HANDSHAKE_PAYLOAD)
    frames: list[Frame] = []
    deadline = time.monotonic() + JOIN_S
    while True:
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
        if count and len(frames) >= count:
            return frames
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            data = b""
        if not data:
            assert until_eof, "EOF before the expected frames"
            return frames
        decoder.feed(data)


def reject_of(frames: list[Frame]) -> hs.LinkRefusal | int:
    assert frames, "no REJECT before the connection closed"
    assert frames[-1].header.kind == FrameKind.REJECT, [f.header.kind for f in frames]
    reason, _ = hs.decode_reject(frames[-1].payload)
    return reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("10.1.2.3:65535", ("10.1.2.3", 65535)),
        ("node-7.cluster:29500", ("node-7.cluster", 29500)),
        ("[::1]:80", ("::1", 80)),
        ("[fe80::1:2]:1", ("fe80::1:2", 1)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("", "HOST:PORT"),
        ("localhost", "HOST:PORT"),
        (":80", "HOST:PORT"),
        ("host:", "bad port"),
        ("host:http", "bad port"),
        ("host:1.5", "bad port"),
        ("host:65536", "out of range"),
        ("host:-1", "out of range"),
    ],
)
def test_parse_address_errors(address: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_address(address)


def test_bind_gives_a_usable_address(listener: Listener) -> None:
    host, port = parse_address(listener.address)
    assert host == "127.0.0.1"
    assert 0 < port < 65536
    with socket.create_connection((host, port), timeout=5) as client:
        conn, peer = listener.sock.accept()
        with conn:
            assert peer == client.getsockname()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"


def test_bind_ipv6_address_round_trips() -> None:
    try:
        lst = bind("[::1]:0")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with lst:
        assert lst.address.startswith("[::1]:")
        host, port = parse_address(lst.address)
        with socket.create_connection((host, port), timeout=5):
            conn, _ = lst.sock.accept()
            conn.close()


def test_bind_to_a_port_in_use_fails_without_leaking(listener: Listener) -> None:
    with pytest.raises(OSError):
        bind(listener.address)


# --------------------------------------------------------------------------- handshake ok


def test_link_established(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret, epoch=9, world=4, rank=2) as acc:
        link = connect(
            listener.address, secret, epoch=9, world=4, rank=1, peer=2, stream=1, streams=3
        )
        with link.sock:
            acc.join()
            assert acc.error is None, repr(acc.error)
            assert acc.link is not None
            assert (link.peer, link.stream) == (2, 1)
            assert (acc.link.peer, acc.link.stream) == (1, 1)
            [hello] = acc.claimed
            assert (hello.world, hello.from_rank, hello.to_rank) == (4, 1, 2)
            assert (hello.stream, hello.streams) == (1, 3)
            # The handshake consumed exactly its own frames: data flows both ways next.
            frame = FrameHeader(FrameKind.DATA, 9, 1, 0, 5)
            link.sock.sendall(encode_frame(frame, b"hello"))
            [got] = read_frames(acc.link.sock, until_eof=False, count=1)
            assert got == Frame(frame, b"hello")
            acc.link.sock.sendall(encode_frame(FrameHeader(FrameKind.BYE, 9, 0, 0, 0)))
            [bye] = read_frames(link.sock, until_eof=False, count=1)
            assert bye.header.kind == FrameKind.BYE


def test_several_links_on_one_listener(listener: Listener, secret: bytes) -> None:
    for stream in range(3):
        with Acceptor(listener, secret) as acc:
            link = connect(listener.address, secret, stream=stream, streams=3)
            link.sock.close()
            acc.join()
            assert acc.link is not None
            assert acc.link.stream == stream


def test_connector_waits_for_a_listener_that_comes_up_late(secret: bytes) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    result: dict[str, Link | BaseException] = {}

    def run() -> None:
        try:
            result["link"] = connect(address, secret, deadline_s=5.0)
        except BaseException as exc:
            result["link"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.2)  # the connector is retrying refused connections meanwhile
    try:
        lst = bind(address)
    except OSError:
        thread.join(JOIN_S)
        pytest.skip("the free port was taken meanwhile")
    with lst, Acceptor(lst, secret) as acc:
        thread.join(JOIN_S)
        assert not thread.is_alive()
        link = result["link"]
        assert isinstance(link, Link), repr(link)
        link.sock.close()
        acc.join()
        assert acc.link is not None


# --------------------------------------------------------------------------- refusals


def test_wrong_secret_fails_on_both_sides(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret) as acc:
        err = connect_fails(listener.address, os.urandom(32))
        assert isinstance(err, AuthError)
        assert err.reason == "bad-auth"
        assert err.peer == 2
        acc.failure()  # a HandshakeError, no link
        assert acc.elapsed < 3.0  # told at once, not left to its deadline
        assert acc.claimed == []  # nothing about the group before the proof


def test_wrong_secret_acceptor_reports_bad_auth(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret) as acc:
        connect_fails(listener.address, os.urandom(32))
        assert acc.failure().reason == "bad-auth"


def test_bad_proof_is_refused_by_the_acceptor(listener: Listener, secret: bytes) -> None:
    # A scripted connector: a real HELLO, then a PROOF that does not know the secret.
    with Acceptor(listener, secret) as acc, raw_client(listener.address) as client:
        hello_payload = hs.encode_hello(hs.Hello(4, 1, 2, 0, 1, hs.new_nonce()))
        send_frame(client, FrameKind.HELLO, hello_payload)
        [challenge_frame] = read_frames(client, until_eof=False, count=1)
        assert challenge_frame.header.kind == FrameKind.CHALLENGE
        challenge = hs.decode_challenge(challenge_frame.payload)
        # The acceptor proved the secret over our HELLO and its nonce.
        hs.check_mac(
            hs.accept_mac(secret, hello_payload, challenge.nonce, 1, challenge.rank),
            challenge.mac,
            who="test",
        )
        wrong = hs.connect_mac(os.urandom(32), hello_payload, challenge.nonce, 1)
        send_frame(client, FrameKind.PROOF, wrong)
        assert reject_of(read_frames(client)) == hs.LinkRefusal.BAD_AUTH
        err = acc.failure()
        assert isinstance(err, AuthError)
        assert err.reason == "bad-auth"
        assert err.peer == 1
        assert acc.claimed == []


def test_reflected_accept_mac_is_not_a_proof(listener: Listener, secret: bytes) -> None:
    # Sending the acceptor's own MAC back must not pass for the connector's proof.
    with Acceptor(listener, secret) as acc, raw_client(listener.address) as client:
        send_frame(
            client, FrameKind.HELLO, hs.encode_hello(hs.Hello(4, 1, 2, 0, 1, hs.new_nonce()))
        )
        [frame] = read_frames(client, until_eof=False, count=1)
        send_frame(client, FrameKind.PROOF, hs.decode_challenge(frame.payload).mac)
        assert reject_of(read_frames(client)) == hs.LinkRefusal.BAD_AUTH
        assert acc.failure().reason == "bad-auth"


def test_a_reflected_hello_cannot_impersonate_a_peer(listener: Listener, secret: bytes) -> None:
    """A stranger without the secret holds the address rank 1 dials for rank 2. It
    reflects rank 1's HELLO into rank 1's own listener (which signs any HELLO before
    it says anything), relabels that CHALLENGE as rank 2's and hands it back: the proof
    used to pass, so rank 1 took the stranger for rank 2 and read its data."""
    stranger = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{stranger.getsockname()[1]}"
    outcome: list[BaseException | Link] = []

    def victim() -> None:
        try:
            outcome.append(connect(address, secret, rank=1, peer=2, deadline_s=5.0))
        except BaseException as exc:
            outcome.append(exc)

    with Acceptor(listener, secret, rank=1), stranger:
        thread = threading.Thread(target=victim)
        thread.start()
        stranger.settimeout(JOIN_S)
        conn, _ = stranger.accept()
        with conn, raw_client(listener.address) as oracle:
            [hello] = read_frames(conn, until_eof=False, count=1)
            send_frame(oracle, FrameKind.HELLO, hello.payload, epoch=hello.header.epoch)
            [signed] = read_frames(oracle, until_eof=False, count=1)
            challenge = hs.decode_challenge(signed.payload)
            assert challenge.rank == 1
            relabeled = hs.encode_challenge(hs.Challenge(2, challenge.nonce, challenge.mac))
            send_frame(conn, FrameKind.CHALLENGE, relabeled, epoch=hello.header.epoch)
            answer = read_frames(conn)
        thread.join(JOIN_S)
    assert [f.header.kind for f in answer] == [FrameKind.REJECT], "rank 1 sent its PROOF"
    assert reject_of(answer) == hs.LinkRefusal.BAD_AUTH
    assert len(outcome) == 1 and isinstance(outcome[0], AuthError), outcome


@pytest.mark.parametrize(
    ("verdict", "reason"),
    [(hs.LinkRefusal.DUPLICATE, "duplicate"), (hs.LinkRefusal.UNEXPECTED, "unexpected")],
)
def test_claim_refusal_reaches_the_connector(
    listener: Listener, secret: bytes, verdict: hs.LinkRefusal, reason: str
) -> None:
    with Acceptor(listener, secret, verdict=verdict) as acc:
        err = connect_fails(listener.address, secret, stream=0, streams=2)
        assert err.reason == reason
        assert not isinstance(err, AuthError)
        assert err.peer == 2
        assert len(acc.claimed) == 1
        acc_err = acc.failure()
        assert acc_err.reason == reason
        assert acc_err.peer == 1


def test_wrong_epoch(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret, epoch=7) as acc:
        err = connect_fails(listener.address, secret, epoch=5)
        assert err.reason == "wrong-epoch"
        assert err.peer == 2
        acc.failure()
        assert acc.claimed == []


def test_wrong_epoch_seen_by_the_acceptor(listener: Listener, secret: bytes) -> None:
    # A connector that carries on past the CHALLENGE's epoch meets the acceptor's check.
    with Acceptor(listener, secret, epoch=7) as acc, raw_client(listener.address) as client:
        hello_payload = hs.encode_hello(hs.Hello(4, 1, 2, 0, 1, hs.new_nonce()))
        send_frame(client, FrameKind.HELLO, hello_payload, epoch=5)
        [frame] = read_frames(client, until_eof=False, count=1)
        assert frame.header.epoch == 7
        nonce_s = hs.decode_challenge(frame.payload).nonce
        send_frame(client, FrameKind.PROOF, hs.connect_mac(secret, hello_payload, nonce_s, 5), 5)
        assert reject_of(read_frames(client)) == hs.LinkRefusal.WRONG_EPOCH
        assert acc.failure().reason == "wrong-epoch"
        assert acc.claimed == []


def test_wrong_target_rank(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret, rank=2) as acc:
        err = connect_fails(listener.address, secret, peer=3)
        assert err.reason == "wrong-rank"
        assert err.peer == 3
        acc.failure()
        assert acc.claimed == []


@pytest.mark.parametrize(
    ("rank", "world"), [(7, 4), (4, 4), (2, 4)], ids=["outside", "edge", "self"]
)
def test_connector_rank_refused_by_the_acceptor(
    listener: Listener, secret: bytes, rank: int, world: int
) -> None:
    with Acceptor(listener, secret, rank=2, world=world) as acc:
        err = connect_fails(listener.address, secret, rank=rank, world=world, peer=2)
        assert err.reason == "wrong-rank"
        assert acc.failure().reason == "wrong-rank"
        assert acc.claimed == []


def test_world_mismatch(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret, world=4) as acc:
        err = connect_fails(listener.address, secret, world=5)
        assert err.reason == "world-mismatch"
        acc_err = acc.failure()
        assert acc_err.reason == "world-mismatch"
        assert acc_err.peer == 1
        assert acc.claimed == []


# --------------------------------------------------------------------------- raw clients


@pytest.mark.parametrize(
    ("data", "reason", "reply"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: example\r\nUser-Agent: x\r\n\r\n",
            "bad-magic",
            hs.LinkRefusal.MALFORMED,
        ),
        (bytes(HEADER_SIZE), "bad-magic", hs.LinkRefusal.MALFORMED),
        (
            b"PHLX" + bytes([PROTOCOL_VERSION]) + bytes(HEADER_SIZE - 5),
            "bad-crc",
            hs.LinkRefusal.MALFORMED,
        ),
        (
            b"PHLX" + bytes([PROTOCOL_VERSION + 1]) + bytes(HEADER_SIZE - 5),
            "bad-version",
            hs.LinkRefusal.BAD_VERSION,
        ),
    ],
    ids=["http", "zeros", "bad-crc", "version"],
)
def test_garbage_is_rejected(
    listener: Listener, secret: bytes, data: bytes, reason: str, reply: hs.LinkRefusal
) -> None:
    with Acceptor(listener, secret) as acc, raw_client(listener.address) as client:
        client.sendall(data)
        assert reject_of(read_frames(client)) == reply
        assert acc.failure().reason == reason
        assert acc.elapsed < 3.0


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (FrameKind.DATA, b"x" * 48),
        (FrameKind.PROOF, b"x" * 32),
        (FrameKind.HELLO, b"x" * 47),
        (FrameKind.HELLO, b""),
        (FrameKind.HELLO, b"\0" * 48),  # world 0, streams 0
    ],
    ids=["data", "proof-first", "hello-47", "hello-empty", "hello-zeros"],
)
def test_malformed_first_frame(
    listener: Listener, secret: bytes, kind: FrameKind, payload: bytes
) -> None:
    with Acceptor(listener, secret) as acc, raw_client(listener.address) as client:
        send_frame(client, kind, payload)
        assert reject_of(read_frames(client)) == hs.LinkRefusal.MALFORMED
        assert acc.failure().reason == "malformed"


@pytest.mark.parametrize("length", [2**40, 2**64 - 1, hs.MAX_HANDSHAKE_PAYLOAD + 1])
def test_hello_with_a_huge_length_is_refused_without_allocating(
    listener: Listener, secret: bytes, length: int
) -> None:
    # accept_link runs here, in this thread, under tracemalloc; the client's bytes are
    # already in the kernel buffer.
    with raw_client(listener.address) as client:
        client.sendall(encode_header(FrameKind.HELLO, epoch=1, seq=0, chunk=0, length=length))
        conn, _ = listener.sock.accept()
        tracemalloc.start()
        try:
            with pytest.raises(HandshakeError) as info:
                accept_link(
                    conn,
                    secret=secret,
                    epoch=1,
                    world=4,
                    rank=2,
                    claim=lambda h: None,
                    buffer_bytes=BUF,
                    deadline=time.monotonic() + 5.0,
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.value.reason == "too-large"
        assert peak < 256 * 1024, f"refusing a lying HELLO allocated {peak} bytes"
        assert reject_of(read_frames(client)) == hs.LinkRefusal.MALFORMED


def test_silent_client_meets_the_acceptor_deadline(listener: Listener, secret: bytes) -> None:
    with raw_client(listener.address) as client, Acceptor(listener, secret, deadline_s=0.4) as acc:
        err = acc.failure()
        assert err.reason == "timeout"
        assert 0.3 <= acc.elapsed <= 0.4 + SLACK_S, acc.elapsed
        # The acceptor closed its end: the client sees EOF (a late REJECT at most).
        frames = read_frames(client)
        assert all(f.header.kind == FrameKind.REJECT for f in frames)


def test_client_stalling_mid_header_meets_the_deadline(listener: Listener, secret: bytes) -> None:
    with raw_client(listener.address) as client, Acceptor(listener, secret, deadline_s=0.4) as acc:
        client.sendall(encode_header(FrameKind.HELLO, epoch=1, seq=0, chunk=0, length=48)[:20])
        assert acc.failure().reason == "timeout"
        assert acc.elapsed <= 0.4 + SLACK_S


def test_client_stalling_mid_payload_meets_the_deadline(listener: Listener, secret: bytes) -> None:
    with raw_client(listener.address) as client, Acceptor(listener, secret, deadline_s=0.4) as acc:
        head = encode_header(FrameKind.HELLO, epoch=1, seq=0, chunk=0, length=48)
        client.sendall(head + b"\0" * 10)
        assert acc.failure().reason == "timeout"
        assert acc.elapsed <= 0.4 + SLACK_S


def test_client_hanging_up_early_is_an_error_not_a_hang(listener: Listener, secret: bytes) -> None:
    with Acceptor(listener, secret) as acc:
        with raw_client(listener.address) as client:
            client.sendall(b"PHLX\x01")
        acc.failure()
        assert acc.elapsed < 3.0


# --------------------------------------------------------------------------- connector side


def test_nobody_listening_is_unreachable_after_the_deadline(secret: bytes) -> None:
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    err = connect_fails(address, secret, deadline_s=0.3)
    elapsed = time.monotonic() - start
    assert err.reason == "unreachable"
    assert err.peer == 2
    assert 0.1 <= elapsed <= 0.3 + SLACK_S, elapsed  # it retried, then gave up in time


def test_listener_that_never_accepts_times_out(listener: Listener, secret: bytes) -> None:
    # The kernel completes the TCP handshake into the backlog; nobody answers HELLO.
    start = time.monotonic()
    err = connect_fails(listener.address, secret, handshake_timeout=0.3)
    elapsed = time.monotonic() - start
    assert err.reason == "timeout"
    assert elapsed <= 0.3 + SLACK_S
    conn, _ = listener.sock.accept()
    conn.close()


def _serve_once(listener: Listener, reply: bytes) -> threading.Thread:
    def run() -> None:
        listener.sock.settimeout(JOIN_S)
        conn, _ = listener.sock.accept()
        with conn:
            conn.settimeout(JOIN_S)
            with contextlib.suppress(OSError):
                conn.recv(HEADER_SIZE + 48)
                conn.sendall(reply)
                conn.recv(1)  # until the connector hangs up

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(40),
        encode_header(FrameKind.WELCOME, epoch=1, seq=0, chunk=0, length=0),
        encode_header(FrameKind.CHALLENGE, epoch=1, seq=0, chunk=0, length=3) + b"abc",
        encode_header(FrameKind.CHALLENGE, epoch=1, seq=0, chunk=0, length=2**40),
    ],
    ids=["ssh", "welcome-first", "short-challenge", "huge-challenge"],
)
def test_connector_refuses_a_bad_server(listener: Listener, secret: bytes, reply: bytes) -> None:
    thread = _serve_once(listener, reply)
    start = time.monotonic()
    tracemalloc.start()
    try:
        err = connect_fails(listener.address, secret)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert time.monotonic() - start < 3.0
    assert not isinstance(err, AuthError)
    assert peak < 256 * 1024, peak


def test_connector_reports_the_servers_reject(listener: Listener, secret: bytes) -> None:
    reply = encode_header(FrameKind.REJECT, epoch=1, seq=0, chunk=0, length=4) + b"\x63why"
    thread = _serve_once(listener, reply)
    err = connect_fails(listener.address, secret)
    thread.join(JOIN_S)
    assert err.reason == "99"  # an unknown code is passed through, not invented


def test_invalid_connect_arguments_leave_no_socket(listener: Listener, secret: bytes) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(ValueError):
            connect(listener.address, secret, stream=1, streams=1)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    listener.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        conn, _ = listener.sock.accept()
        conn.close()
        raise AssertionError("connect_link opened a connection for invalid arguments")


# --------------------------------------------------------------------------- Channel


class Sink:
    """A FrameSink that records whole frames; payloads go into fresh buffers."""

    def __init__(self, dest: Callable[[FrameHeader], memoryview] | None = None) -> None:
        self.frames: list[Frame] = []
        self.dest_calls = 0
        self._dest = dest

    def frame_dest(self, channel: Channel, header: FrameHeader) -> memoryview:
        self.dest_calls += 1
        if self._dest is not None:
            return self._dest(header)
        return memoryview(bytearray(header.length))

    def frame_done(self, channel: Channel, header: FrameHeader, payload: memoryview) -> None:
        assert len(payload) == header.length
        self.frames.append(Frame(header, bytes(payload)))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def _frames() -> list[Frame]:
    out = []
    for i, size in enumerate([0, 1, 39, 40, 41, 1000, 0, 5000]):
        payload = bytes((i + j) % 251 for j in range(size))
        out.append(Frame(FrameHeader(FrameKind.DATA, 3, 100 + i, i, size, i % 3), payload))
    return out


def test_pump_recv_one_byte_at_a_time(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    channel = Channel(Link(a, peer=5, stream=1), max_payload=8192)
    assert (channel.peer, channel.stream) == (5, 1)
    sink = Sink()
    frames = _frames()
    data = b"".join(encode_frame(f.header, f.payload) for f in frames)
    ends = set()
    pos = 0
    for f in frames:
        pos += HEADER_SIZE + f.header.length
        ends.add(pos)
    for i in range(len(data)):
        b.send(data[i : i + 1])
        before = len(sink.frames)
        channel.pump_recv(sink)
        # Handed over exactly when the last byte is in; never a partial frame.
        assert len(sink.frames) - before == (1 if i + 1 in ends else 0), i
    assert sink.frames == frames
    assert channel.bytes_recv == len(data)
    channel.pump_recv(sink)  # nothing more in the kernel: returns, does not block


def test_pump_recv_whole_stream_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    channel = Channel(Link(a, 1, 0), max_payload=8192)
    sink = Sink()
    frames = _frames()
    b.sendall(b"".join(encode_frame(f.header, f.payload) for f in frames))
    channel.pump_recv(sink)
    assert sink.frames == frames
    assert sink.dest_calls == len(frames)


def test_pump_send_partial_sends_arrive_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sender = Channel(Link(a, 1, 0), max_payload=1 << 20)
    receiver = Channel(Link(b, 0, 0), max_payload=1 << 20)
    sink = Sink()
    big = array("d", (float(i) for i in range(40_000)))  # 320 kB, a non-byte buffer
    sent = [
        (FrameHeader(FrameKind.DATA, 1, 1, 0, len(big) * 8), memoryview(big)),
        (FrameHeader(FrameKind.PING, 1, 2, 0, 0), memoryview(b"")),
        (FrameHeader(FrameKind.DATA, 1, 3, 1, 3), memoryview(b"end")),
    ]
    partial = 0
    deadline = time.monotonic() + JOIN_S
    for header, payload in sent:
        head = encode_header(
            header.kind,
            epoch=header.epoch,
            seq=header.seq,
            chunk=header.chunk,
            length=header.length,
        )
        sender.queue(head, payload)
        assert sender.sending
        with pytest.raises(RuntimeError):
            sender.queue(head, payload)
        while not sender.pump_send():
            partial += 1
            receiver.pump_recv(sink)
            assert time.monotonic() < deadline
        assert not sender.sending
    while len(sink.frames) < len(sent):
        receiver.pump_recv(sink)
        assert time.monotonic() < deadline
    assert partial > 0, "the kernel took 320 kB at once: partial sends were not exercised"
    assert sink.frames == [Frame(h, bytes(p)) for h, p in sent]
    assert sender.bytes_sent == receiver.bytes_recv == sum(HEADER_SIZE + h.length for h, _ in sent)


def test_pump_send_with_nothing_queued_is_done(pair: tuple[socket.socket, socket.socket]) -> None:
    channel = Channel(Link(pair[0], 1, 0), max_payload=16)
    assert not channel.sending
    assert channel.pump_send()
    assert channel.bytes_sent == 0


@pytest.mark.parametrize("cut", [0, 10, HEADER_SIZE, HEADER_SIZE + 3])
def test_pump_recv_eof_raises_connection_error(
    pair: tuple[socket.socket, socket.socket], cut: int
) -> None:
    a, b = pair
    channel = Channel(Link(a, 4, 0), max_payload=64)
    sink = Sink()
    b.sendall(encode_frame(FrameHeader(FrameKind.DATA, 0, 0, 0, 8), b"01234567")[:cut])
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError, match="rank 4"):
        channel.pump_recv(sink)
    assert sink.frames == []


def test_pump_recv_corrupt_header_raises_frame_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    channel = Channel(Link(a, 1, 0), max_payload=64)
    sink = Sink()
    good = encode_frame(FrameHeader(FrameKind.DATA, 0, 0, 0, 2), b"ok")
    bad = bytearray(good)
    bad[20] ^= 0x01
    b.sendall(good + bytes(bad))
    with pytest.raises(FrameError) as info:
        channel.pump_recv(sink)
    assert info.value.reason == "bad-crc"
    assert [f.payload for f in sink.frames] == [b"ok"]
    assert sink.dest_calls == 1  # no buffer was asked for the corrupt frame


def test_pump_recv_oversized_frame_is_refused_before_a_buffer_is_asked(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    channel = Channel(Link(a, 1, 0), max_payload=64)
    sink = Sink()
    b.sendall(encode_header(FrameKind.DATA, epoch=0, seq=0, chunk=0, length=2**40))
    with pytest.raises(FrameError) as info:
        channel.pump_recv(sink)
    assert info.value.reason == "too-large"
    assert sink.dest_calls == 0


def test_pump_recv_refuses_a_sink_buffer_of_the_wrong_size(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    channel = Channel(Link(a, 1, 0), max_payload=64)
    sink = Sink(dest=lambda header: memoryview(bytearray(header.length + 1)))
    b.sendall(encode_frame(FrameHeader(FrameKind.DATA, 0, 0, 0, 4), b"abcd"))
    with pytest.raises(FrameError) as info:
        channel.pump_recv(sink)
    assert info.value.reason == "bad-payload"


def test_pump_recv_writes_into_the_sinks_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    # Zero copy: the payload lands in the buffer the sink chose.
    a, b = pair
    target = bytearray(16)
    channel = Channel(Link(a, 1, 0), max_payload=64)
    sink = Sink(dest=lambda header: memoryview(target)[4 : 4 + header.length])
    b.sendall(encode_frame(FrameHeader(FrameKind.DATA, 0, 0, 0, 6), b"abcdef"))
    channel.pump_recv(sink)
    assert bytes(target) == bytes(4) + b"abcdef" + bytes(6)


def test_channel_close_is_idempotent(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    channel = Channel(Link(a, 1, 0), max_payload=64)
    assert channel.fd == a.fileno()
    channel.close()
    channel.close()
    assert channel.closed
    assert a.fileno() == -1

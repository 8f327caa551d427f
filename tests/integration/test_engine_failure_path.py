"""The engine's failure path, frame by frame, against a peer that the test plays.

Rank 0 is a real :class:`~phalanx.comm.engine.Engine` on a real loopback TCP socket;
rank 1 is this test, which writes exactly the frames a scenario needs (in one write
when their order within a single read matters) and reads back what the engine sends.
That makes orderings deterministic which two real engines produce only by chance:
a PING queued just before an ABORT, a RECEIPT owed just before a broken frame, a PONG
of an older probe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np
import pytest

from phalanx.comm import collectives, zerocopy
from phalanx.comm.codecs import parse_codec
from phalanx.comm.engine import Engine, _encode_abort
from phalanx.comm.frames import (
    FLAG_RECEIPT,
    HEADER_SIZE,
    FrameHeader,
    FrameKind,
    decode_header,
    encode_header,
)
from phalanx.comm.options import CommOptions
from phalanx.comm.reduce import parse_op
from phalanx.comm.transport import Channel, Link
from phalanx.errors import PeerFailure
from phalanx.ops import OpResult

EPOCH = 1
MAX_PAYLOAD = 16 << 20


class FakePeer:
    """Rank 1, played by the test over a blocking socket with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(5.0)

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def read(self) -> tuple[FrameHeader, bytes]:
        header = decode_header(self._exact(HEADER_SIZE), MAX_PAYLOAD)
        return header, self._exact(header.length) if header.length else b""

    def read_until_eof(self) -> list[tuple[str, int]]:
        """(kind, seq) of every frame until the engine's FIN; a reset raises."""
        frames: list[tuple[str, int]] = []
        while True:
            try:
                header, _ = self.read()
            except EOFError:
                return frames
            frames.append((header.kind.name, header.seq))


@pytest.fixture
def engine_and_peer() -> Iterator[tuple[Engine, FakePeer]]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        theirs = socket.create_connection(listener.getsockname()[:2], timeout=5.0)
        ours, _ = listener.accept()
    options = CommOptions(timeout_s=1.0, probe_s=0.5)
    engine = Engine(
        rank=0,
        world=2,
        epoch=EPOCH,
        channels=[Channel(Link(ours, peer=1, stream=0), MAX_PAYLOAD)],
        options=options,
    )
    try:
        yield engine, FakePeer(theirs)
    finally:
        engine.close()
        theirs.close()


def _start_all_reduce(
    engine: Engine, peer: FakePeer
) -> tuple[Future[OpResult], FrameHeader, bytes]:
    """Submit a small all-reduce on rank 0; return its future and rank 0's frame."""
    x = np.arange(16, dtype=np.float32)
    plan = collectives.build_all_reduce(engine, x, parse_op("sum"), parse_codec("none"))
    future = engine.submit(plan)
    header, payload = peer.read()
    assert header.kind == FrameKind.DATA and header.seq == 0
    return future, header, payload


@pytest.mark.parametrize(
    ("id_offset", "verdict"),
    [
        # the id of an older probe (a PONG that was late) is no answer: rank 1 is silent
        (-1, "no answer to a probe"),
        # the running probe's own id: rank 1 is alive, the op just makes no progress
        (0, "peers alive"),
    ],
)
def test_only_a_pong_of_the_running_probe_counts_a_peer_alive(
    engine_and_peer: tuple[Engine, FakePeer], id_offset: int, verdict: str
) -> None:
    engine, peer = engine_and_peer
    future, _, _ = _start_all_reduce(engine, peer)
    # rank 1 never sends its data; it answers each PING with a PONG
    while True:
        header, _ = peer.read()
        if header.kind == FrameKind.ABORT:
            break
        assert header.kind == FrameKind.PING
        pong = encode_header(
            FrameKind.PONG, epoch=EPOCH, seq=header.seq, chunk=header.chunk + id_offset, length=0
        )
        peer.sock.sendall(pong)
    with pytest.raises(PeerFailure) as info:
        future.result(5.0)
    assert info.value.suspects == frozenset({1})
    assert verdict in str(info.value), info.value


def test_an_abort_read_after_a_ping_leaves_the_link_draining_not_reset(
    engine_and_peer: tuple[Engine, FakePeer], caplog: pytest.LogCaptureFixture
) -> None:
    engine, peer = engine_and_peer
    future, header, _ = _start_all_reduce(engine, peer)
    abort = _encode_abort([1], "timeout", 1)
    # one write: the PING's PONG is queued, then the ABORT fails the op in the same
    # read, and bytes the engine has not read follow
    peer.sock.sendall(
        encode_header(FrameKind.PING, epoch=EPOCH, seq=header.seq, chunk=7, length=0)
        + encode_header(FrameKind.ABORT, epoch=EPOCH, seq=header.seq, chunk=0, length=len(abort))
        + abort
        + bytes(64 * 1024)
    )
    caplog.set_level(logging.INFO, logger="phalanx.comm.engine")
    with pytest.raises(PeerFailure) as info:
        future.result(5.0)
    assert info.value.detected_by == 1
    # the engine answered the PING, passed the verdict on, and shut its side: a FIN
    # after the ABORT, not a reset that can cost the peer the ABORT
    assert peer.read_until_eof() == [("PONG", 0), ("ABORT", 0)]
    assert not any("reason=disconnected" in r.getMessage() for r in caplog.records)
    # still draining what rank 1 sends until rank 1 closes (then the socket goes)
    assert not engine.links[1][0].channel.closed
    peer.sock.sendall(bytes(64 * 1024))
    peer.sock.close()
    deadline = time.monotonic() + 5.0
    while not engine.links[1][0].channel.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.links[1][0].channel.closed


def test_a_receipt_owed_goes_out_before_the_abort(
    engine_and_peer: tuple[Engine, FakePeer],
) -> None:
    engine, peer = engine_and_peer
    future, header, payload = _start_all_reduce(engine, peer)
    # rank 1's frame of op 0 asks for a RECEIPT (it was spliced); a broken header
    # follows in the same write, so op 0 ends and the group breaks in one read
    answer = encode_header(
        FrameKind.DATA,
        epoch=EPOCH,
        seq=header.seq,
        chunk=header.chunk,
        length=header.length,
        flags=FLAG_RECEIPT,
        desc=header.desc,
    )
    peer.sock.sendall(answer + payload + b"\xff" * HEADER_SIZE)
    result = future.result(5.0)
    assert result.seq == 0
    # op 0 succeeded here, so rank 1 must hear so (or it fails op 0 for want of the
    # RECEIPT while this rank succeeded it), and only then that op 1 is aborted
    assert peer.read_until_eof() == [("RECEIPT", 0), ("ABORT", 1)]


def test_a_peer_flooding_pings_without_reading_the_answers_is_cut_off(
    engine_and_peer: tuple[Engine, FakePeer],
) -> None:
    engine, peer = engine_and_peer
    future, header, _ = _start_all_reduce(engine, peer)
    ping = encode_header(FrameKind.PING, epoch=EPOCH, seq=header.seq, chunk=1, length=0)
    peer.sock.settimeout(0.05)
    with contextlib.suppress(TimeoutError, BlockingIOError, OSError):
        for _ in range(2_000):  # up to 100,000 PINGs; never a PONG read
            peer.sock.sendall(ping * 50)
    with pytest.raises(PeerFailure) as info:
        future.result(5.0)
    assert info.value.reason == "protocol", info.value
    assert info.value.suspects == frozenset({1})
    assert len(engine.links[1][0].ctrl) <= 1024


@contextlib.contextmanager
def world_of_three(
    options: CommOptions, buffer_bytes: int = 0
) -> Iterator[tuple[Engine, dict[int, FakePeer]]]:
    """Rank 0's engine and ranks 1 and 2 played by the test (``buffer_bytes``: small
    fixed socket buffers on both ends, so that a peer that stops reading blocks
    rank 0 soon)."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours: dict[int, socket.socket] = {}
    peers: dict[int, FakePeer] = {}
    with listener:
        for rank in (1, 2):
            theirs = socket.socket()
            if buffer_bytes:
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            theirs.settimeout(5.0)
            theirs.connect(listener.getsockname()[:2])
            peers[rank] = FakePeer(theirs)
            ours[rank], _ = listener.accept()
            if buffer_bytes:
                ours[rank].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    engine = Engine(
        rank=0,
        world=3,
        epoch=EPOCH,
        channels=[Channel(Link(ours[r], peer=r, stream=0), MAX_PAYLOAD) for r in (1, 2)],
        options=options,
    )
    try:
        yield engine, peers
    finally:
        engine.close()
        for peer in peers.values():
            peer.sock.close()


def _ring_to_the_last_frame(
    engine: Engine, peers: dict[int, FakePeer], x: np.ndarray
) -> tuple[Future[OpResult], list[FrameHeader], bytes]:
    """Start a ring all-reduce on rank 0 (it sends only to rank 1 and receives only
    from rank 2); rank 2 sends all but its last frame, rank 1 reads every frame rank 0
    sends. Returns the future, those frames' headers, and rank 2's last frame."""
    plan = collectives.build_all_reduce(engine, x, parse_op("sum"), parse_codec("none"))
    assert plan.algorithm.startswith("ring"), plan.algorithm
    (from_2,) = [nodes for link, nodes in plan.recvs.items() if link is engine.links[2][0]]
    frames = []
    for node in from_2:
        assert node.direct is not None
        length = len(node.direct)
        head = encode_header(
            FrameKind.DATA, epoch=EPOCH, seq=0, chunk=node.ordinal, length=length,
            desc=plan.digest,
        )  # fmt: skip
        frames.append(head + np.ones(length // x.itemsize, dtype=x.dtype).tobytes())
    future = engine.submit(plan)
    for frame in frames[:-1]:
        peers[2].sock.sendall(frame)
    to_1 = [peers[1].read()[0] for _ in frames]  # a ring sends as many as it receives
    assert not future.done()
    return future, to_1, frames[-1]


def test_a_broken_frame_from_a_peer_still_owing_a_receipt_fails_the_op_at_once() -> None:
    """Once rank 1 has read every (spliced) frame, the op still needs it -- for its
    RECEIPT -- so a broken frame from rank 1 must fail the op then, not leave it
    waiting for a RECEIPT that can no longer be read until the no-progress timeout."""
    if not zerocopy.available():
        pytest.skip("no vmsplice/splice here: nothing is spliced, no RECEIPT is owed")
    options = CommOptions(timeout_s=5.0, probe_s=0.5, zero_copy_min_bytes=256 << 10)
    with world_of_three(options) as (engine, peers):
        x = np.ones(2 << 20, dtype=np.float32)  # 8 MiB: the page-swapped ring
        before = x.copy()
        future, to_1, _ = _ring_to_the_last_frame(engine, peers, x)
        assert any(h.flags & FLAG_RECEIPT for h in to_1), "nothing was spliced"
        # rank 1 now breaks the protocol; rank 0 still waits for rank 2's last frame
        peers[1].sock.sendall(b"\xff" * HEADER_SIZE)
        with pytest.raises(PeerFailure) as info:
            future.result(3.0)
        assert info.value.reason == "protocol", info.value
        assert info.value.suspects == frozenset({1})
        assert np.array_equal(x, before)  # promise 2


def _thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_peer_that_breaks_the_protocol_while_its_link_is_blocked_costs_no_cpu() -> None:
    """Rank 1 floods PINGs without reading the PONGs (rank 0's socket to it fills up
    and waits to be writable), sends a broken frame, then reads. The running op needs
    nothing more of rank 1, so it goes on with rank 2 -- and rank 1's link, writable
    now but never written again, must not wake the engine on every poll meanwhile."""
    options = CommOptions(timeout_s=10.0, probe_s=0.5, zero_copy_min_bytes=0)
    with world_of_three(options, buffer_bytes=32 * 1024) as (engine, peers):
        x = np.ones(1 << 20, dtype=np.float32)
        future, _, last = _ring_to_the_last_frame(engine, peers, x)
        ping = encode_header(FrameKind.PING, epoch=EPOCH, seq=0, chunk=1, length=0)
        link = engine.links[1][0]
        sent = link.channel.bytes_recv
        deadline = time.monotonic() + 10.0
        while not link.want_write and time.monotonic() < deadline:
            # a few at a time, each batch read before the next: a flood is cut off
            peers[1].sock.sendall(ping * 64)
            sent += len(ping) * 64
            while link.channel.bytes_recv < sent and time.monotonic() < deadline:
                time.sleep(0.001)
        assert link.want_write, "rank 0's PONGs never filled the socket"
        # every PING read (their PONGs wait in rank 0's queue), then the broken frame
        while link.channel.bytes_recv < sent and time.monotonic() < deadline:
            time.sleep(0.01)
        peers[1].sock.sendall(b"\xff" * HEADER_SIZE)
        while not link.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.draining, "the broken frame was not read"
        # rank 1 now reads what it was sent, so rank 0's socket becomes writable
        peers[1].sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            while peers[1].sock.recv(1 << 20):
                pass
        tid = engine._thread.native_id
        assert tid is not None
        cpu0 = _thread_cpu_s(tid)
        time.sleep(1.0)
        burnt = _thread_cpu_s(tid) - cpu0
        assert burnt < 0.3, f"the engine thread spun: {burnt:.2f} s of CPU in 1 s"
        # the op still completes with rank 2's last frame; the group breaks after it
        assert not future.done()
        peers[2].sock.sendall(last)
        assert future.result(5.0).seq == 0


def test_an_encoded_frame_where_raw_bytes_are_due_is_a_protocol_error(
    engine_and_peer: tuple[Engine, FakePeer],
) -> None:
    """A receive that takes raw bytes only accepted a frame with another codec id and
    no payload: the op completed with nothing written there, reducing stale memory
    into the result with no error."""
    engine, peer = engine_and_peer
    x = np.arange(16, dtype=np.float32)
    before = x.copy()
    plan = collectives.build_all_reduce(engine, x, parse_op("sum"), parse_codec("none"))
    future = engine.submit(plan)
    header, _ = peer.read()
    empty = encode_header(
        FrameKind.DATA, epoch=EPOCH, seq=header.seq, chunk=header.chunk, length=0, codec=2,
        desc=header.desc,
    )  # fmt: skip
    peer.sock.sendall(empty)
    with pytest.raises(PeerFailure) as info:
        future.result(5.0)
    assert info.value.reason == "protocol" and "bad-codec" in str(info.value), info.value
    assert np.array_equal(x, before)

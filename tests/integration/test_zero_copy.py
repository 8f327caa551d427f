"""Zero-copy sends (vmsplice + splice): exact results, scratch reused only after the
receiver's RECEIPT, and a channel that keeps the frame whole through a full socket."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, zerocopy
from phalanx.comm.engine import Engine
from phalanx.comm.frames import HEADER_SIZE, FrameKind, decode_header, encode_header
from phalanx.comm.transport import Channel, Link
from tests.integration._pairs import pair

pytestmark = pytest.mark.skipif(
    not zerocopy.available(), reason="vmsplice/splice are Linux-only; sendmsg is used instead"
)


def _engine(g: Group) -> Engine:
    engine = g._engine
    assert engine is not None
    return engine


def _zero_copied(g: Group) -> int:
    return sum(link.channel.bytes_zero_copy for s in _engine(g).links.values() for link in s)


def _run_pair(groups: tuple[Group, Group], xs: list[np.ndarray]) -> None:
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            groups[rank].all_reduce(xs[rank])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


@pytest.mark.parametrize("zero_copy", [True, False])
def test_back_to_back_all_reduces_are_exact(zero_copy: bool) -> None:
    """New data every round: a scratch buffer reused while the peer still reads its
    pages would show up as a wrong sum in a later round."""
    # page swap off: zero-copy sends come from the saving ring's scratch
    opts = CommOptions(
        zero_copy_min_bytes=256 << 10 if zero_copy else 0, page_swap_min_bytes=0, timeout_s=30.0
    )
    groups = pair(options=opts)
    rng = np.random.default_rng(7)
    try:
        for _ in range(12):
            xs = [rng.standard_normal(3 << 20).astype(np.float32) for _ in range(2)]
            want = xs[0] + xs[1]
            _run_pair(groups, xs)
            for x in xs:
                assert np.array_equal(x, want)
        for g in groups:
            moved = _zero_copied(g)
            assert (moved > 0) == zero_copy, moved
            assert len(_engine(g).held) <= _engine(g).held.max_held
    finally:
        for g in groups:
            g.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_scratch_is_held_until_the_receipt_then_pooled() -> None:
    fds = _open_fds()
    opts = CommOptions(zero_copy_min_bytes=256 << 10, page_swap_min_bytes=0, timeout_s=30.0)
    groups = pair(options=opts)
    try:
        xs = [np.ones(4 << 20, dtype=np.float32) for _ in range(2)]
        _run_pair(groups, xs)
        assert np.array_equal(xs[0], np.full(4 << 20, 2, np.float32))
        # both sides sent RECEIPTs at the end; a barrier later, they have been read
        # (control frames are handled as they arrive) and nothing stays held
        barrier = [threading.Thread(target=g.barrier) for g in groups]
        for t in barrier:
            t.start()
        for t in barrier:
            t.join(30)
        for g in groups:
            engine = _engine(g)
            assert engine.held.receipted(1 - g.rank) >= 0
            assert not len(engine.held)
            assert engine.pool.cached_bytes > 0  # the scratch went back to the pool
    finally:
        for g in groups:
            g.close()
    assert _open_fds() <= fds  # the channels' splice pipes are closed with them


def _tcp_pair(bufsize: int) -> tuple[socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    a.connect(lst.getsockname())
    b, _ = lst.accept()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    lst.close()
    return a, b


def test_a_zero_copy_frame_survives_a_full_socket() -> None:
    a, b = _tcp_pair(64 << 10)
    ch = Channel(Link(a, 1, 0), max_payload=8 << 20)
    try:
        payload = np.random.default_rng(3).integers(0, 255, 3 << 20, dtype=np.uint8)
        header = encode_header(FrameKind.DATA, epoch=1, seq=2, chunk=0, length=payload.size)
        ch.queue(header, payload.data, zero_copy=True)
        got = bytearray()
        stalls = 0
        b.settimeout(10)
        while ch.sending:
            if not ch.pump_send():
                stalls += 1
                got += b.recv(1 << 20)
        while len(got) < HEADER_SIZE + payload.size:
            got += b.recv(1 << 20)
        assert stalls > 0  # the socket really filled up on the way
        assert decode_header(got[:HEADER_SIZE], 8 << 20).length == payload.size
        assert bytes(got[HEADER_SIZE:]) == payload.tobytes()
        assert ch.bytes_zero_copy == payload.size
        assert ch.bytes_sent == HEADER_SIZE + payload.size
    finally:
        ch.close()
        b.close()


def test_a_closed_peer_is_an_error_not_a_hang() -> None:
    a, b = _tcp_pair(64 << 10)
    ch = Channel(Link(a, 1, 0), max_payload=8 << 20)
    try:
        payload = np.zeros(4 << 20, dtype=np.uint8)
        header = encode_header(FrameKind.DATA, epoch=1, seq=2, chunk=0, length=payload.size)
        ch.queue(header, payload.data, zero_copy=True)
        b.close()
        with pytest.raises(OSError):
            for _ in range(10_000):
                if ch.pump_send():
                    break
    finally:
        ch.close()

"""Zero-copy sends (vmsplice + splice): exact results; an op that spliced returns only
once its receivers confirmed reading (RECEIPT), so the caller may write its array the
moment it has it; and a channel that keeps the frame whole through a full socket.

What leaves spliced is the page-swapped ring's twin (partial sums and the all-gather),
whose pages the caller's array gets on success (comm/collectives.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, zerocopy
from phalanx.comm.engine import Engine
from phalanx.comm.frames import HEADER_SIZE, FrameKind, decode_header, encode_header
from phalanx.comm.transport import Channel, Link
from phalanx.deadline import Deadline
from phalanx.errors import PeerFailure
from phalanx.ops import OpResult, OpSpec
from tests.integration._pairs import on_both, pair

pytestmark = pytest.mark.skipif(
    not zerocopy.available(), reason="vmsplice/splice are Linux-only; sendmsg is used instead"
)

N = 3 << 20  # float32 elements: 12 MiB, above page_swap_min_bytes (the twin ring)


def _engine(g: Group) -> Engine:
    engine = g._engine
    assert engine is not None
    return engine


def _zero_copied(g: Group) -> int:
    return sum(link.channel.bytes_zero_copy for s in _engine(g).links.values() for link in s)


def _run_pair(
    groups: tuple[Group, Group],
    xs: list[np.ndarray],
    then: Callable[[int, OpResult], None] | None = None,
) -> None:
    """Both ranks all-reduce their array; ``then(rank, result)`` runs on the rank's
    thread the instant its call returns."""

    def run(rank: int) -> None:
        res = groups[rank].all_reduce(xs[rank])
        if then is not None:
            then(rank, res)

    on_both(run)


@pytest.mark.parametrize("zero_copy", [True, False])
def test_back_to_back_all_reduces_are_exact(zero_copy: bool) -> None:
    """New data every round, and each rank overwrites its result the instant it has
    it (after keeping a copy): an op that returned while its peer still read the
    pages it spliced -- the twin's, now the caller's array -- would hand the peer the
    overwritten bytes, a wrong sum."""
    opts = CommOptions(zero_copy_min_bytes=256 << 10 if zero_copy else 0, timeout_s=30.0)
    groups = pair(options=opts)
    rng = np.random.default_rng(7)
    got: list[np.ndarray] = [np.empty(0), np.empty(0)]

    def keep_then_scribble(rank: int, res: OpResult) -> None:
        got[rank] = xs[rank].copy()
        xs[rank][:] = np.nan

    try:
        for i in range(12):
            xs = [rng.standard_normal(N).astype(np.float32) for _ in range(2)]
            want = xs[0] + xs[1]
            _run_pair(groups, xs, keep_then_scribble)
            for rank in range(2):
                assert np.array_equal(got[rank], want), f"round {i}, rank {rank}"
        for g in groups:
            moved = _zero_copied(g)
            assert (moved > 0) == zero_copy, moved
    finally:
        for g in groups:
            g.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_op_that_spliced_returns_only_after_the_receipt() -> None:
    fds = _open_fds()
    groups = pair(options=CommOptions(zero_copy_min_bytes=256 << 10, timeout_s=30.0))
    seen: list[tuple[int, int, int]] = []  # (rank, op, newest op the peer confirmed)

    def check(rank: int, res: OpResult) -> None:
        seen.append((rank, res.seq, _engine(groups[rank]).receipted(1 - rank)))

    try:
        for _ in range(10):
            xs = [np.ones(N, dtype=np.float32) for _ in range(2)]
            _run_pair(groups, xs, check)
            assert np.array_equal(xs[0], np.full(N, 2, np.float32))
        assert len(seen) == 20
        for rank, seq, confirmed in seen:
            assert confirmed >= seq, f"rank {rank} returned op {seq} before its RECEIPT"
        assert all(_zero_copied(g) > 0 for g in groups)
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


def test_a_peer_that_leaves_before_its_receipt_fails_the_op_not_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 1 reads everything but never confirms (its RECEIPTs are swallowed), then
    closes: rank 0, which waits for that RECEIPT before it may hand the twin's pages
    to its caller, fails the op at the BYE -- its array holding its input -- instead
    of waiting for its progress timeout."""
    groups = pair(options=CommOptions(zero_copy_min_bytes=256 << 10, timeout_s=60.0))
    e1 = _engine(groups[1])
    monkeypatch.setattr(e1, "_send_receipts", lambda plan: None)
    xs = [np.ones(N, dtype=np.float32), np.full(N, 2.0, dtype=np.float32)]
    before = xs[0].copy()
    outcome: list[BaseException | OpResult] = []

    def rank0() -> None:
        try:
            outcome.append(groups[0].all_reduce(xs[0]))
        except BaseException as exc:  # examined below
            outcome.append(exc)

    t = threading.Thread(target=rank0)
    t.start()
    try:
        # rank 1 cannot finish either (rank 0's RECEIPT comes, but rank 0 waits):
        # give it its frames' worth of time, then leave
        t1 = threading.Thread(target=lambda: _swallow(lambda: groups[1].all_reduce(xs[1])))
        t1.start()
        t1.join(5.0)
        groups[1].close()
        t.join(10.0)
        assert not t.is_alive(), "rank 0 still waits for a RECEIPT from a closed peer"
    finally:
        for g in groups:
            g.close()
    assert len(outcome) == 1 and isinstance(outcome[0], PeerFailure), outcome
    assert 1 in outcome[0].suspects
    assert np.array_equal(xs[0], before), "a failed op changed the caller's array"


def _swallow(fn: Callable[[], object]) -> None:
    with contextlib.suppress(BaseException):  # either outcome is fine for that rank
        fn()


def test_a_failed_op_into_a_callers_buffer_leaves_the_memory_around_it_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Group.run(into=buf)`` whose ``buf`` shares its first and last pages with the
    caller's other data (here the array itself and a guard after it): after a failure
    that spliced, only whole pages of ``buf`` may get fresh (zeroed) memory. All of
    them did, which zeroed the tail of the array and the head of the guard."""
    groups = pair(options=CommOptions(zero_copy_min_bytes=256 << 10, timeout_s=30.0))
    monkeypatch.setattr(_engine(groups[1]), "_send_receipts", lambda plan: None)
    n = N + 5  # not a whole number of pages
    mem = np.full(2 * n + 7, 3.0, dtype=np.float32)
    x, into, guard = mem[:n], mem[n : 2 * n], mem[2 * n :]
    keep_x, keep_guard = x.copy(), guard.copy()
    outcome: list[BaseException | object] = []

    def run(rank: int) -> None:
        try:
            if rank == 0:  # rank 1 never confirms: rank 0 waits, then its deadline ends it
                outcome.append(groups[0].run(OpSpec("all_reduce"), x, into=into,
                                             deadline=Deadline.after(2.0)))  # fmt: skip
            else:
                groups[1].all_reduce(
                    np.full(n, 2.0, dtype=np.float32), deadline=Deadline.after(2.0)
                )
        except BaseException as exc:  # examined below
            if rank == 0:
                outcome.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
    finally:
        for g in groups:
            g.close()
    assert len(outcome) == 1 and isinstance(outcome[0], PeerFailure), outcome
    assert _zero_copied(groups[0]) > 0, "nothing left spliced: the test proves nothing"
    assert np.array_equal(x, keep_x), "a failed op changed the caller's array"
    assert np.array_equal(guard, keep_guard), "a failed op changed memory next to into"

"""The door's "a peer is ahead" hint comes before any proof of the secret (in-process:
a real coordinator, two elastic members, real data-plane groups on loopback).

The door peeks the epoch of a new connection's first header and tells its member when
that names a group not built yet. The member aborted its working group and jumped to
whatever generation the stranger named: a raw TCP connection sending one HELLO header
for ``data_epoch(view, MAX_GENERATION)`` moved it to generation 16383, and the next
rebuild (16384) raised in the builder thread, so the view never got a group again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from phalanx.comm.frames import FrameKind, encode_header
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.elastic import ElasticGroup
from phalanx.membership.lifecycle import MAX_GENERATION, data_epoch

pytestmark = pytest.mark.timeout(90)

SECRET = b"coord-door-hint-test-secret-0123456789"


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(secret=SECRET, config=MembershipConfig(recovery_grace=0.0))
    c.start()
    yield c
    c.stop(grace=0.5)


def _wait(pred: object, timeout: float) -> bool:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _sum_pair(a: ElasticGroup, b: ElasticGroup) -> None:
    x, y = np.ones(8, np.float32), np.full(8, 2.0, np.float32)
    t = threading.Thread(target=lambda: b.all_reduce(y, retry=True, timeout=15))
    t.start()
    a.all_reduce(x, retry=True, timeout=15)
    t.join(20)
    assert np.allclose(x, 3.0) and np.allclose(y, 3.0)


@contextlib.contextmanager
def _pair(coordinator: Coordinator) -> Iterator[tuple[ElasticGroup, ElasticGroup]]:
    a = ElasticGroup(coordinator.address, "a", SECRET, join_timeout=10.0)
    b = ElasticGroup(coordinator.address, "b", SECRET, join_timeout=10.0)
    try:
        a.join(10)
        b.join(10)
        assert _wait(lambda: a.view.size == 2 and b.view.size == 2, 10)
        _sum_pair(a, b)
        yield a, b
    finally:
        a.close()
        b.close()


def _hint(member: ElasticGroup, epoch: int) -> None:
    """A stranger's raw TCP connection to ``member``'s door: one HELLO header, no
    handshake. Returns once the door has told the member."""
    told = threading.Event()
    real = member._door._on_ahead
    assert real is not None

    def spy(e: int) -> None:
        try:
            real(e)
        finally:
            if e == epoch:
                told.set()

    member._door._on_ahead = spy
    host, port = member.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2.0) as s:
            s.sendall(encode_header(FrameKind.HELLO, epoch=epoch, seq=0, chunk=0, length=0))
            assert told.wait(5.0), "the door never reported the connection"
    finally:
        member._door._on_ahead = real


def test_a_strangers_hello_neither_breaks_the_group_nor_moves_its_generation(
    coordinator: Coordinator,
) -> None:
    with _pair(coordinator) as (a, b):
        view = a.view
        g = a._generation
        for generation in (MAX_GENERATION, g + 1, g + 2):
            _hint(a, data_epoch(view.epoch, generation))
            with a._cond:
                assert a._generation == g, generation  # was: the generation named
                assert a._rebuild is None
            _sum_pair(a, b)  # the group still works (was: never built again)
        assert a._generation == g and a.view == view


def test_a_member_backing_off_moves_one_generation_at_most(
    coordinator: Coordinator,
) -> None:
    """After its own build failed, a member backs off; a link for a newer generation
    moves it on at once -- one generation, whatever the link names."""
    with _pair(coordinator) as (a, b):
        view = a._view
        assert view is not None
        with a._cond:  # a's build failed: its next generation is due in a minute
            g = a._generation + 1
            a._generation, a._rebuild = g, (view, g)
            a._rebuild_at = time.monotonic() + 60.0
        _hint(a, data_epoch(view.epoch, MAX_GENERATION))
        with a._cond:
            assert a._generation == g + 1  # was: MAX_GENERATION
        _sum_pair(a, b)  # b follows (a's old links closed): the pair works again
        with a._cond, b._cond:
            assert a._generation == b._generation < MAX_GENERATION

"""The coordinator's detector thread and its vote waits (gRPC server on 127.0.0.1).

* A tick that raises must not end failure detection: the detector thread had no
  guard, died on the first exception, and no member was ever failed again.
* A vote whose round is decided between its own call and its first wait (the other
  member's vote lands there) must not wait out a whole wait slice for a wake-up that
  came before it waited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from phalanx.membership import _rpc
from phalanx.membership._group import GroupState
from phalanx.membership._proto import membership_pb2 as pb
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator, _Servicer
from phalanx.membership.view import Member, View

pytestmark = pytest.mark.timeout(60)

SECRET = b"coord-detector-test-secret-0123456789"
CFG = MembershipConfig(recovery_grace=0.0, probe_addresses=False, join_batch=0.0)


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(secret=SECRET, config=CFG, recover=False)
    c.start()
    yield c
    c.stop(grace=0.5)


def _until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_tick_that_raises_does_not_end_failure_detection(
    coordinator: Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    group = coordinator._group()
    real = group.tick
    calls: list[float] = []

    def flaky(now: float) -> None:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("a bug in one tick")
        real(now)

    with caplog.at_level(logging.ERROR, logger="phalanx.membership.coordinator"):
        group.tick = flaky  # type: ignore[method-assign]
        assert _until(lambda: len(calls) >= 3, 10), calls
    assert coordinator._detector is not None and coordinator._detector.is_alive()
    assert any("event=detector_error" in r.getMessage() for r in caplog.records)
    # and it still fails a member that goes silent
    member = Member("m", ("127.0.0.1:9",), 1)
    coordinator._locked(lambda g, now: g.join(member, View(0), None, now))
    assert coordinator.view.ids == ("m",)
    coordinator.wait_for(lambda v: "m" not in v, 10)


def test_a_vote_decided_before_its_first_wait_is_answered_without_waiting(
    coordinator: Coordinator,
) -> None:
    for name in "ab":
        member = Member(name, ("127.0.0.1:9",), 1)

        def join(g: GroupState, now: float, member: Member = member) -> object:
            return g.join(member, View(0), None, now)

        coordinator._locked(join)
    view = coordinator.wait_for(lambda v: v.ids == ("a", "b"), 5)
    epoch = view.epoch

    waits: list[float | None] = []
    cond = coordinator._cond
    real_wait = cond.wait
    me = threading.get_ident()

    def counting_wait(timeout: float | None = None) -> bool:
        if threading.get_ident() == me:
            waits.append(timeout)
        return real_wait(timeout)

    req = pb.CommitRequest(step=1, ok=True)
    method = _rpc.SERVICE + "Commit"
    _rpc.Signer(SECRET).sign(req, method, "request", sender_id="a", incarnation=1, epoch=epoch)
    real_locked = coordinator._locked

    def locked_then_b_votes(fn: Any) -> Any:  # a's vote, then b's, then a's wait
        out = real_locked(fn)
        real_locked(lambda g, now: g.vote("b", 1, epoch, 1, True, now))
        return out

    cond.wait = counting_wait  # type: ignore[method-assign]
    coordinator._locked = locked_then_b_votes  # type: ignore[method-assign]
    try:
        until = time.monotonic() + 10.0
        resp = _Servicer(coordinator)._commit(req, method, until, threading.Event())
    finally:
        del cond.wait
        del coordinator._locked
    assert (resp.epoch, resp.step, resp.committed) == (epoch, 1, True)
    assert waits == []  # it waited for a wake-up that had already come (0.5 s)

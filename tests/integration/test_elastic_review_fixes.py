"""Elastic members at the edges a review found (in-process: a real coordinator, real
agents, real data-plane groups on loopback): a vote that timed out while the group
committed, a newcomer's step position, an eviction right after admission, a rejoin
after close."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.errors import CommitUnknown, Evicted, GroupClosed, StateSyncError
from phalanx.membership.agent import Agent
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.elastic import ElasticGroup
from phalanx.membership.lifecycle import Presence
from phalanx.membership.statesync import SyncOutcome, SyncState
from phalanx.membership.view import View
from phalanx.ops import OpResult
from tests.integration._waits import until

pytestmark = pytest.mark.timeout(90)

SECRET = b"elastic-review-fixes-secret-0123456789"


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(secret=SECRET, config=MembershipConfig(recovery_grace=0.0))
    c.start()
    yield c
    c.stop(grace=0.5)


@pytest.fixture
def steady_coordinator() -> Iterator[Coordinator]:
    """For tests whose subject is a vote or a rebuild, not failure detection: a
    heartbeat timeout that CI's load does not trip, so no member is evicted for beats
    that lagged (what broke a test of test_torch_grad_rules.py in CI; test_steps.py's
    _steady does the same)."""
    config = MembershipConfig(recovery_grace=0.0, heartbeat_timeout=2.5, confirm_window=1.0)
    c = Coordinator(secret=SECRET, config=config)
    c.start()
    yield c
    c.stop(grace=0.5)


def _both_rebuilt(a: ElasticGroup, b: ElasticGroup, generation: int) -> None:
    """Wait until both members run the generation that b's CommitUnknown rebuilt.
    b rebuilds at once; a learns of it when b's abort reaches its engine. Under load
    a's begin_step could come first and start the step on the old generation (its
    exchange is done, so nothing there waits for b): then b's exchange waits for a,
    which only a's next collective would bring (it fails on the old generation and
    runs the exchange in the new one). These tests are about the new generation's
    exchange, so they start the step once both are in it."""
    assert until(lambda: a._generation == b._generation > generation, 10.0), (
        a._generation,
        b._generation,
        generation,
    )


def _member(c: Coordinator, mid: str, state: SyncState | None, **kw: Any) -> ElasticGroup:
    return ElasticGroup(c.address, mid, SECRET, state=state, join_timeout=10.0, **kw)


def _parallel(*fns: Callable[[], Any], timeout: float = 30.0) -> list[Any]:
    """Each fn on a thread of its own; its result, or the exception it raised."""
    out: list[Any] = [None] * len(fns)

    def run(i: int, f: Callable[[], Any]) -> None:
        try:
            out[i] = f()
        except BaseException as exc:  # reported to the test as a value
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a member's call did not return in time"
    return out


def _join_all(members: tuple[ElasticGroup, ...]) -> None:
    _parallel(*(lambda m=m: m.join(10) for m in members))
    n = len(members)
    assert until(lambda: all(m.view.size == n for m in members), 10)


# ----------------------------------------------------------------------------- 1


def test_a_member_whose_vote_timed_out_receives_the_committed_state_at_its_next_step(
    steady_coordinator: Coordinator,
) -> None:
    """b voted yes and gave up waiting (CommitUnknown: its deadline passed); a voted
    after it and the round committed with b's yes. a applied the step, b must not.
    There is no view change, and the group was exchanged: before, the next
    begin_step ran no exchange, b trained its redo of step 0 beside a's step 1 and
    the two ended at the same step with different states. Now the group is rebuilt
    as the next generation and its exchange gives b the committed step-1 state."""
    a = _member(steady_coordinator, "a", SyncState({"w": np.zeros(4, np.float32)}, 0))
    b = _member(steady_coordinator, "b", SyncState({"w": np.zeros(4, np.float32)}, 0))
    try:
        _join_all((a, b))
        infos = _parallel(lambda: a.begin_step(timeout=15), lambda: b.begin_step(timeout=15))
        assert [i.step for i in infos] == [0, 0], infos
        ga, gb = np.ones(4, np.float32), np.ones(4, np.float32)
        res = _parallel(lambda: a.all_reduce(ga, timeout=15), lambda: b.all_reduce(gb, timeout=15))
        assert all(isinstance(r, OpResult) for r in res), res
        generation = a._generation
        with pytest.raises(CommitUnknown):
            b.commit(0, True, timeout=0.5)
        assert a.commit(0, True, timeout=10) is True  # b's yes was kept: committed
        assert a.state is not None and b.state is not None
        a.state.arrays["w"] += ga
        a.update_state(1)
        _both_rebuilt(a, b, generation)

        t0 = time.monotonic()
        ia, ib = _parallel(lambda: a.begin_step(timeout=15), lambda: b.begin_step(timeout=15))
        assert time.monotonic() - t0 < 15
        assert not isinstance(ia, BaseException) and not isinstance(ib, BaseException), (ia, ib)
        # b was re-synced to the committed step, in the same view, a new generation
        assert ib.synced and ib.step == 1 and ia.step == 1, (ia, ib)
        assert ia.epoch == ib.epoch and a._generation == b._generation > generation
        assert b.state.step == 1 and b.state.digest() == a.state.digest()
        assert np.all(b.state.arrays["w"] == 2.0), b.state.arrays["w"]
        # and step 1 runs and commits over both members as usual
        ga, gb = np.full(4, 10.0, np.float32), np.full(4, 1.0, np.float32)
        res = _parallel(lambda: a.all_reduce(ga, timeout=15), lambda: b.all_reduce(gb, timeout=15))
        assert all(isinstance(r, OpResult) for r in res), res
        assert np.all(ga == 11.0) and np.all(gb == 11.0)
        votes = _parallel(
            lambda: a.commit(1, True, timeout=15), lambda: b.commit(1, True, timeout=15)
        )
        assert votes == [True, True], votes
    finally:
        a.close()
        b.close()


def test_a_vote_that_timed_out_on_a_round_decided_false_moves_no_state(
    steady_coordinator: Coordinator,
) -> None:
    """The same, but a votes no: the round is False, nobody applies it. The rebuilt
    generation's exchange finds one state everywhere and moves nothing; both redo
    step 0 over it."""
    a = _member(steady_coordinator, "a", SyncState({"w": np.zeros(4, np.float32)}, 0))
    b = _member(steady_coordinator, "b", SyncState({"w": np.zeros(4, np.float32)}, 0))
    try:
        _join_all((a, b))
        _parallel(lambda: a.begin_step(timeout=15), lambda: b.begin_step(timeout=15))
        ga, gb = np.ones(4, np.float32), np.ones(4, np.float32)
        _parallel(lambda: a.all_reduce(ga, timeout=15), lambda: b.all_reduce(gb, timeout=15))
        generation = a._generation
        with pytest.raises(CommitUnknown):
            b.commit(0, True, timeout=0.5)
        assert a.commit(0, False, timeout=10) is False
        _both_rebuilt(a, b, generation)
        ia, ib = _parallel(lambda: a.begin_step(timeout=15), lambda: b.begin_step(timeout=15))
        assert not isinstance(ia, BaseException) and not isinstance(ib, BaseException), (ia, ib)
        assert (ia.step, ia.synced, ib.step, ib.synced) == (0, False, 0, False), (ia, ib)
        assert a._generation == b._generation > generation
        ga, gb = np.ones(4, np.float32), np.ones(4, np.float32)
        res = _parallel(lambda: a.all_reduce(ga, timeout=15), lambda: b.all_reduce(gb, timeout=15))
        assert all(isinstance(r, OpResult) for r in res), res
        assert a.state is not None and b.state is not None
        assert a.state.digest() == b.state.digest() and a.state.step == 0
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- 2


def test_a_newcomers_step_position_is_the_step_it_received(coordinator: Coordinator) -> None:
    """c joins with an empty state and begin_step(step=None) receives step 5. Its
    position in the step was left at -1 (its empty state's step): when the group
    broke later in the step (c's own deadline, every member alive) the rebuilt
    generation's exchange saw positions -1 and 5 and every member's retry raised
    StepAborted -- where founders at one point simply go on."""

    def w() -> np.ndarray:
        return np.arange(4, dtype=np.float32)

    a = _member(coordinator, "a", SyncState({"w": w()}, 5))
    b = _member(coordinator, "b", SyncState({"w": w()}, 5))
    c = _member(coordinator, "c", SyncState.empty())
    ms = (a, b, c)
    try:
        _join_all(ms)
        infos = _parallel(*(lambda m=m: m.begin_step(timeout=15) for m in ms))
        assert [(i.step, i.synced) for i in infos] == [(5, False), (5, False), (5, True)], infos
        xs = [np.ones(4, np.float32) for _ in ms]
        res = _parallel(
            *(lambda m=m, x=x: m.all_reduce(x, timeout=15) for m, x in zip(ms, xs, strict=True))
        )
        assert all(isinstance(r, OpResult) for r in res), res
        # c calls the step's second collective first, with a short deadline: the group
        # breaks with every member alive and heals into the next generation
        xs = [np.ones(4, np.float32) for _ in ms]
        with pytest.raises(TimeoutError):
            c.all_reduce(xs[2], timeout=0.2)
        res = _parallel(
            *(
                lambda m=m, x=x: m.all_reduce(x, retry=True, timeout=15)
                for m, x in zip(ms, xs, strict=True)
            )
        )
        assert all(isinstance(r, OpResult) for r in res), res
        assert all(np.all(x == 3.0) for x in xs), xs
    finally:
        for m in ms:
            m.close()


# ----------------------------------------------------------------------------- 3


def _removed_right_after_admission(
    coordinator: Coordinator,
    a: ElasticGroup,
    b: ElasticGroup,
    then: Callable[[], None],
) -> Callable[[float], View]:
    """a's agent join, held after its return until the group removed the new member
    (its Watch stream "drops" and a peer reports it: two signals) and the agent
    learnt it; ``then`` runs before it returns. Only the first join is held."""
    real = a.agent.join
    calls: list[int] = []

    def join(timeout: float = 15.0) -> View:
        calls.append(1)
        view = real(timeout)
        if len(calls) > 1:
            return view
        inc = a.agent.member.incarnation
        coordinator._locked(lambda g, now: g.stream_lost("a", inc, now))
        b.agent.report_failure(["a"], view.epoch, "test")
        assert until(lambda: a.agent.evicted, 10), "a's agent never learnt of its removal"
        then()
        return view

    return join


def test_join_raises_evicted_when_the_group_removed_the_member_right_after_admission(
    coordinator: Coordinator,
) -> None:
    """Before, join() fed "joined" to a presence already evicted: IllegalTransition."""
    b = _member(coordinator, "b", None)
    a = _member(coordinator, "a", None)
    try:
        b.join(10)

        def until_evicted() -> None:  # the agent's callback ran: presence is evicted
            assert until(lambda: a.presence is Presence.EVICTED, 10), a.presence

        a.agent.join = _removed_right_after_admission(  # type: ignore[method-assign,assignment]
            coordinator, a, b, until_evicted
        )
        with pytest.raises(Evicted, match="removed right after its admission"):
            a.join(10)
        assert a.presence is Presence.EVICTED and a.evicted
        assert until(lambda: "a" not in coordinator.view.ids, 5), coordinator.view
        # the ordinary way back works
        a.rejoin(10)
        assert until(lambda: a.view.size == 2 and b.view.size == 2, 10)
        x, y = np.ones(4, np.float32), np.full(4, 2.0, np.float32)
        res = _parallel(
            lambda: a.all_reduce(x, retry=True, timeout=15),
            lambda: b.all_reduce(y, retry=True, timeout=15),
        )
        assert all(isinstance(r, OpResult) for r in res), res
        assert np.all(x == 3.0) and np.all(y == 3.0)
    finally:
        a.close()
        b.close()


def test_join_with_auto_rejoin_is_not_marked_a_member_while_its_rejoin_runs(
    coordinator: Coordinator,
) -> None:
    """With auto_rejoin the policy starts a rejoin as soon as the eviction lands; a
    join() that came back then marked the member MEMBER while it was still out. Here
    the policy's rejoin is held until join() answered: join() returns (a daemon's
    start must not fail on a removal the policy undoes) without marking the member,
    and the policy then brings it back."""
    b = _member(coordinator, "b", None)
    a = _member(coordinator, "a", None, auto_rejoin=True)
    release = threading.Event()
    real_rejoin = a.agent.rejoin

    def held_rejoin(timeout: float = 15.0, *, incarnation: int | None = None) -> View:
        release.wait(20)
        return real_rejoin(timeout, incarnation=incarnation)

    def until_rejoining() -> None:
        assert until(lambda: a.presence is Presence.REJOINING, 10), a.presence

    try:
        b.join(10)
        a.agent.rejoin = held_rejoin  # type: ignore[method-assign]
        a.agent.join = _removed_right_after_admission(  # type: ignore[method-assign,assignment]
            coordinator, a, b, until_rejoining
        )
        try:
            a.join(10)
            assert a.presence is Presence.REJOINING, a.presence
        finally:
            release.set()
        assert until(
            lambda: (
                a.presence is Presence.MEMBER
                and coordinator.view.has(a.agent.member)
                and a.view.size == 2
            ),
            20,
        ), (a.presence, coordinator.view)
        assert a.agent.member.incarnation >= 2
    finally:
        release.set()
        a.close()
        b.close()


# ----------------------------------------------------------------------------- 4


def test_rejoin_on_a_closed_group_raises_group_closed(coordinator: Coordinator) -> None:
    a = _member(coordinator, "a", None)
    try:
        a.join(10)
        a.close()
        with pytest.raises(GroupClosed):
            a.rejoin(timeout=1)
        with pytest.raises(GroupClosed):
            a.barrier(timeout=1)
        assert a.presence is Presence.CLOSED
    finally:
        a.close()


def test_a_daemon_removed_right_after_admission_still_starts_and_comes_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon's group has auto_rejoin: a removal that lands right after its
    admission (the agent hears of it, then a stall) must not fail ``phalanx.start`` --
    the rejoin policy is already bringing it back. Review of the day's diff: join()
    raised Evicted there, and the daemon's start tore it down."""
    real_join = Agent.join
    done: list[int] = []

    def join(self: Agent, timeout: float = 15.0) -> View:
        view = real_join(self, timeout)
        if self.member.id == "b" and not done:
            done.append(1)
            self._handle_evicted(self.member.incarnation)  # the removal lands now
            time.sleep(0.05)  # a stall: the policy's rejoin starts meanwhile
        return view

    monkeypatch.setattr(Agent, "join", join)
    caplog.set_level(logging.INFO, logger="phalanx.audit.daemon")
    _start_b_and_reduce_with_a(lambda: bool(done))
    started = {
        r.getMessage().split(" member=")[1].split()[0]: r.getMessage()
        for r in caplog.records
        if "event=daemon_started" in r.getMessage()
    }
    # the start-up line says where each daemon stood: b's depends on the race with
    # its rejoin, a's does not
    assert "presence=member epoch=" in started["a"], started
    assert re.search(r"presence=(member|evicted|rejoining) epoch=", started["b"]), started


@pytest.mark.parametrize("first", ["join", "rejoin"])
def test_a_daemon_removed_while_its_join_waits_still_starts(
    monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The removal lands while the join waits for its admission. Either the join sees
    it first (the agent raises Evicted "removed before admission") or the rejoin
    policy's new incarnation comes up first (the agent says the join was replaced by a
    rejoin, MembershipError): ``phalanx.start`` failed on both -- a daemon that would
    not start while its policy was bringing it back. Now the daemon starts, and it is
    a working member once the policy's rejoin is through (until then its collectives
    raise Evicted, as after any removal)."""
    real = Agent._start_threads
    removed: list[int] = []

    def start_threads(self: Agent) -> None:  # inside join(), before the admission wait
        real(self)
        if self.member.id == "b" and not removed:
            removed.append(self.member.incarnation)
            self._handle_evicted(self.member.incarnation)
            if first == "rejoin":
                assert until(lambda: self.member.incarnation > removed[0], 10), "no rejoin"

    monkeypatch.setattr(Agent, "_start_threads", start_threads)
    _start_b_and_reduce_with_a(lambda: bool(removed))


def _start_b_and_reduce_with_a(injected: Callable[[], bool]) -> None:
    """Start daemons ``a`` and ``b`` (b's start meets the injected removal), then one
    all-reduce between them, exact. b's collectives raise Evicted until the rejoin
    policy's new incarnation is through (as after any removal): b retries them, for
    10 s at most (the policy's rejoin is due at once)."""
    secret = os.urandom(32)
    a = phalanx.start(secret=secret, member_id="a")
    try:
        b = phalanx.start(coordinator=a.coordinator_address, secret=secret, member_id="b")
        try:
            assert injected(), "the removal was not injected"
            assert until(lambda: a.view().world == 2 and b.view().world == 2, 20), (
                a.view(),
                b.view(),
            )
            x, y = np.ones(4, np.float32), np.ones(4, np.float32)
            errors: list[BaseException] = []

            def b_reduce() -> None:
                deadline = time.monotonic() + 10  # the rejoin is due at once
                while True:
                    try:
                        b.all_reduce(y)
                        return
                    except Evicted as exc:
                        if time.monotonic() >= deadline:
                            errors.append(exc)  # b never became a member
                            return
                        time.sleep(0.05)
                    except BaseException as exc:
                        errors.append(exc)
                        return

            t = threading.Thread(target=b_reduce)
            t.start()
            a.all_reduce(x)
            t.join(30)
            assert not t.is_alive() and not errors, errors
            np.testing.assert_array_equal(x, 2.0)
            np.testing.assert_array_equal(y, 2.0)
        finally:
            b.close()
    finally:
        a.close()


def _stale_source_and_receiver(
    coordinator: Coordinator,
) -> tuple[int, SyncState, ElasticGroup, ElasticGroup]:
    """Source ``a`` (step 3) whose array was changed in place without update() after
    it was hashed, so its cached hashes are stale; receiver ``b``, a newcomer under
    auto_rejoin (as a daemon's group). The array's length comes first."""
    n = 1 << 14
    src = SyncState({"w": np.arange(n, dtype=np.float32)}, 3)
    src.digest()  # the hashes are cached now
    src.arrays["w"][:] += 1.0  # changed in place without update()
    a = _member(coordinator, "a", src)
    b = _member(coordinator, "b", SyncState.empty(), auto_rejoin=True)
    return n, src, a, b


def test_a_daemon_whose_received_state_fails_verification_comes_back(
    coordinator: Coordinator,
) -> None:
    """A receiver whose state fails verification steps out (it never contributes
    unverified state). Under auto_rejoin (a daemon) it used to leave for good: its
    client got GroupClosed until the daemon restarted. It now comes back by the rejoin
    policy, later after each failure in a row, and receives the state once the source
    hashes again. The source here changed its array in place without update(): its
    manifest carried stale hashes (it now hashes again after the first failure by
    itself, see the next test; here its owner's update() does it as well)."""
    n, src, a, b = _stale_source_and_receiver(coordinator)
    sent: list[SyncOutcome] = []
    received: list[SyncOutcome] = []
    a.on_state_sync, b.on_state_sync = sent.append, received.append  # (the metrics')
    try:
        _join_all((a, b))
        first = _parallel(lambda: a.begin_step(timeout=10), lambda: b.begin_step(timeout=10))
        assert all(isinstance(r, StateSyncError) for r in first), first
        assert b.presence is not Presence.LEFT, b.presence  # on its way back
        assert [(o.role, o.ok, o.failures_in_row) for o in received] == [("received", False, 1)]
        assert b.sync_failures_in_row == 1  # (what the daemon's gauge reads)
        assert [(o.role, o.ok) for o in sent] == [("sent", False)]
        src.update()  # the source hashes again
        deadline = time.monotonic() + 40
        while not (b.state is not None and b.state.valid):
            assert time.monotonic() < deadline, (b.presence, b.view)
            _parallel(lambda: a.begin_step(timeout=5), lambda: b.begin_step(timeout=5))
        assert b.presence is Presence.MEMBER, b.presence
        assert b.state is not None and b.state.step == 3
        np.testing.assert_array_equal(b.state.arrays["w"], src.arrays["w"])
        # every try that failed counted in the row; the one that went through ends it
        fails = [o.failures_in_row for o in received if not o.ok]
        assert fails == list(range(1, len(fails) + 1)), received
        last = received[-1]
        assert (last.role, last.ok, last.failures_in_row, last.nbytes) == (
            "received", True, 0, n * 4,
        ), received  # fmt: skip
        assert (sent[-1].role, sent[-1].ok, sent[-1].nbytes) == ("sent", True, n * 4), sent
        assert b.sync_failures_in_row == 0
    finally:
        a.close()
        b.close()


def test_a_source_whose_arrays_changed_without_update_hashes_them_again(
    coordinator: Coordinator,
) -> None:
    """The source changed its array in place without update(), so its manifest carried
    stale hashes and the receiver's check failed. Every later try sent the same stale
    hashes and failed the same way until the source's owner happened to call update():
    the receiver cycled out and back with a growing delay. The source now hashes its
    arrays again after a failed transfer, so the receiver's next try gets the arrays as
    they are, without anyone calling update()."""
    n, src, a, b = _stale_source_and_receiver(coordinator)
    received: list[SyncOutcome] = []
    b.on_state_sync = received.append
    try:
        _join_all((a, b))
        first = _parallel(lambda: a.begin_step(timeout=10), lambda: b.begin_step(timeout=10))
        assert all(isinstance(r, StateSyncError) for r in first), first
        deadline = time.monotonic() + 20
        while not (b.state is not None and b.state.valid):
            assert time.monotonic() < deadline, (received, b.presence)
            _parallel(lambda: a.begin_step(timeout=5), lambda: b.begin_step(timeout=5))
        assert [o.ok for o in received] == [False, True], received  # the next try went through
        assert b.state.step == 3
        # the source's arrays as they are (changed), not as they were hashed
        np.testing.assert_array_equal(b.state.arrays["w"], src.arrays["w"])
        np.testing.assert_array_equal(b.state.arrays["w"], np.arange(n, dtype=np.float32) + 1)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("when", ["before", "after", "waiting"])
def test_leave_during_join_ends_the_join_with_group_closed_and_leaves_no_member(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """leave() while join() runs (a shutdown racing the start): join() fed "joined" to
    a member that had LEFT and raised IllegalTransition, and a Leave that came before
    the Join's registration was refused, so the member stayed in the group until its
    missing heartbeats evicted it. Now join() raises GroupClosed and the member is out
    of the view -- whether the leave lands before or after the registration, or while
    the join waits for its admission."""
    member = _member(coordinator, "m", None)
    real, real_start = Agent._register, Agent._start_threads
    left: list[BaseException | None] = []

    def register(self: Agent) -> Any:
        if when == "before":
            left.append(_parallel(member.leave)[0])
            return real(self)
        out = real(self)
        if when == "after":
            left.append(_parallel(member.leave)[0])
        return out

    def start_threads(self: Agent) -> None:  # "waiting": the join waits for admission
        real_start(self)
        if when == "waiting" and not left:
            left.append(_parallel(member.leave)[0])

    monkeypatch.setattr(Agent, "_register", register)
    monkeypatch.setattr(Agent, "_start_threads", start_threads)
    try:
        with pytest.raises(GroupClosed, match="left"):
            member.join(10)
        assert left == [None], left  # leave() itself went through
        assert member.presence is Presence.LEFT
        # nobody stays behind in the coordinator's view (at most a heartbeat timeout)
        assert until(lambda: "m" not in coordinator.view.ids, 5), coordinator.view
        with pytest.raises(GroupClosed):  # as after any leave
            member.begin_step(timeout=2)
    finally:
        member.close()


# ----------------------------------------------------------------------------- 5


@pytest.mark.parametrize("error", [RuntimeError, TimeoutError])
def test_a_recover_hook_that_raises_costs_its_member_the_state_not_the_group_its_step(
    coordinator: Coordinator, caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    """Every member that held the state is gone, so the exchange asks each member
    waiting for it to recover it (``recover_state``: the daemon restores a snapshot),
    then all exchange once more. a's hook raised: before, that ended a's call while b
    went on to the second exchange and waited there for a until its deadline. Now a's
    failure counts as "nothing recovered" (logged), and both go on at once -- a
    TimeoutError of the hook's own too, while the call's deadline is far."""
    a, b = _member(coordinator, "a", None), _member(coordinator, "b", None)
    for m in (a, b):  # a client attached arrays that wait for the group's state
        assert m.attach_state({"w": np.zeros(4, np.float32)}, None) == (-1, "to-receive")
    calls: list[str] = []

    def broken(state: SyncState, deadline: Any) -> None:
        calls.append("a")
        raise error("the snapshot disk is on fire")

    def nothing(state: SyncState, deadline: Any) -> None:
        calls.append("b")

    a.recover_state, b.recover_state = broken, nothing
    try:
        _join_all((a, b))
        t0 = time.monotonic()
        got = _parallel(lambda: a.begin_step(timeout=20), lambda: b.begin_step(timeout=20))
        took = time.monotonic() - t0
        assert not any(isinstance(g, BaseException) for g in got), got
        assert took < 10, f"a member waited {took:.1f} s for the one whose hook raised"
        assert sorted(calls) == ["a", "b"], calls  # each hook ran once
        assert a.state is not None and not a.state.valid  # nothing was recovered
        assert any(
            "event=recover_state_failed" in r.getMessage() and "on fire" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        # the step runs over both members
        ga, gb = np.ones(4, np.float32), np.full(4, 2.0, np.float32)
        res = _parallel(lambda: a.all_reduce(ga, timeout=15), lambda: b.all_reduce(gb, timeout=15))
        assert all(isinstance(r, OpResult) for r in res), res
        assert np.all(ga == 3.0) and np.all(gb == 3.0)
    finally:
        b.close()
        a.close()

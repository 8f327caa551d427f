"""Elastic members between groups: a rejoin that races the removal of its new
incarnation, a rebuild a peer starts while this member backs off, a vote on a round
this member already carried, a view whose generations ran out, a stranger's "peer
ahead" hint (in-process: a real coordinator, real agents, real data-plane groups on
loopback)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from phalanx.comm.frames import FrameKind, encode_header
from phalanx.errors import Evicted, GroupClosed
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.elastic import ElasticGroup
from phalanx.membership.lifecycle import MAX_GENERATION, Presence, data_epoch
from phalanx.membership.view import View
from tests.integration._waits import until

pytestmark = pytest.mark.timeout(90)

SECRET = b"elastic-rejoin-test-secret-0123456789"


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(secret=SECRET, config=MembershipConfig(recovery_grace=0.0))
    c.start()
    yield c
    c.stop(grace=0.5)


@contextlib.contextmanager
def _joined_pair(coordinator: Coordinator) -> Iterator[tuple[ElasticGroup, ElasticGroup]]:
    """Members a and b in one view, a collective run between them; closed after."""
    a = ElasticGroup(coordinator.address, "a", SECRET, join_timeout=10.0)
    b = ElasticGroup(coordinator.address, "b", SECRET, join_timeout=10.0)
    try:
        a.join(10)
        b.join(10)
        assert until(lambda: a.view.size == 2 and b.view.size == 2, 10)
        _sum_pair(a, b)
        yield a, b
    finally:
        a.close()
        b.close()


def _sum_pair(a: ElasticGroup, b: ElasticGroup) -> None:
    """One all-reduce of the pair (b on a thread of its own), its sums checked."""
    x, y = np.ones(8, np.float32), np.full(8, 2.0, np.float32)
    t = threading.Thread(target=lambda: b.all_reduce(y, retry=True, timeout=15))
    t.start()
    a.all_reduce(x, retry=True, timeout=15)
    t.join(20)
    assert np.allclose(x, 3.0) and np.allclose(y, 3.0)


def test_a_new_incarnation_removed_before_its_join_returns_rejoins_again(
    coordinator: Coordinator,
) -> None:
    """Soak, stop 22: a daemon evicted while stopped rejoined as incarnation 2; before
    that join came back, the coordinator had removed incarnation 2 as well (the
    process was stopped again). The eviction arrived first and was taken for the old
    incarnation's, then the join's return marked it a member: it rebuilt groups nobody
    else had, thousands of times, for 20 s, and never rejoined. Here the coordinator
    removes the new incarnation while its rejoin is in flight; the member must come
    back as a later incarnation by itself and run collectives again."""
    a = ElasticGroup(coordinator.address, "a", SECRET, auto_rejoin=True, join_timeout=10.0)
    b = ElasticGroup(coordinator.address, "b", SECRET, join_timeout=10.0)
    real = a.agent.rejoin

    def rejoin_then_removed(timeout: float = 15.0) -> View:
        view = real(timeout)
        inc = a.agent.member.incarnation
        # the coordinator removes the new incarnation before the join "returns" ...
        coordinator._locked(lambda g, now: g.leave("a", inc, "", now))
        assert until(lambda: not coordinator.view.has(a.agent.member), 5)
        # ... and the agent hears of it first, as its watch thread did in the soak
        a.agent._handle_evicted(inc)
        return view

    try:
        a.join(10)
        b.join(10)
        assert until(lambda: a.view.size == 2 and b.view.size == 2, 10)
        a.agent.rejoin = rejoin_then_removed  # type: ignore[method-assign,assignment]
        with pytest.raises(Evicted, match="removed before its join returned"):
            a.rejoin(10)
        a.agent.rejoin = real  # type: ignore[method-assign]
        # the policy brings it back as a later incarnation, and the pair works again
        assert until(lambda: a.presence is Presence.MEMBER
                     and coordinator.view.has(a.agent.member) and a.view.size == 2, 20), (
            a.presence, coordinator.view)  # fmt: skip
        assert a.agent.member.incarnation >= 3
        _sum_pair(a, b)
    finally:
        a.close()
        b.close()


def test_a_member_backing_off_builds_at_once_when_a_peer_is_already_building(
    coordinator: Coordinator,
) -> None:
    """After failed builds a member waits before the next (``rebuild_delay``, up to
    1 s). When the peer it failed with is already waiting in that generation (its
    links arrive at this member's door), waiting longer only stalls both: the member
    must build at once. Here a's backoff is set to a minute: on a member that ignored
    the peer, the all-reduce below times out."""
    with _joined_pair(coordinator) as (a, b):
        assert a.view.rank("a") == 0  # the higher rank connects to the lower one's door
        with a._cond:  # a's build failed: the next generation is due in a minute
            g, view = a._generation + 1, a._view
            assert view is not None
            a._generation, a._rebuild = g, (view, g)
            a._rebuild_at = time.monotonic() + 60.0
        with b._cond:  # b builds that generation now
            assert b._generation == g - 1
            assert b._view is not None
            b._generation, b._rebuild, b._rebuild_at = g, (b._view, g), 0.0
            b._cond.notify_all()
        t0 = time.monotonic()
        _sum_pair(a, b)
        assert time.monotonic() - t0 < 10.0
        assert a._generation == b._generation == g


def test_a_view_callback_that_arrives_late_is_not_taken_over_a_newer_one(
    coordinator: Coordinator,
) -> None:
    """The agent installs views from several threads, so the callback of an older view
    could run after the newer one's. The elastic group replaced its pending newer view
    with the older one and built a view its agent had left: every op then timed out
    while the peers waited for it. Here the older view's callback comes last, while
    the installer has not taken the newer one yet."""
    with _joined_pair(coordinator) as (a, _):
        newest = a.agent.view
        older = View(newest.epoch - 1, newest.members)
        newer = View(newest.epoch + 1, newest.members)  # as if just published
        with a._cond:  # the installer cannot take anything before both callbacks ran
            a._on_view(newer)
            a._on_view(older)
            assert a._pending is newer


def test_a_leave_during_a_rejoin_leaves_the_member_out(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """leave() while a rejoin is under way: when the agent's leave ran first, the rejoin
    then brought the member back (a new incarnation in the view, beating) while the
    elastic group said "left" and refused every op -- a member nobody drives. Now the
    leave waits for the rejoin and wins."""
    import phalanx.membership.agent as agent_module

    a = ElasticGroup(coordinator.address, "a", SECRET, join_timeout=10.0)
    gate = threading.Event()
    real = agent_module.Agent.rejoin

    def slow_rejoin(self: agent_module.Agent, *args: object, **kwargs: object) -> View:
        gate.wait(5)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    try:
        a.join(10)
        monkeypatch.setattr(agent_module.Agent, "rejoin", slow_rejoin)
        out: list[object] = []
        rejoin = threading.Thread(target=lambda: out.append(a.rejoin(timeout=5.0)))
        rejoin.start()
        time.sleep(0.1)  # the rejoin is under way (held at the gate)
        threading.Timer(0.3, gate.set).start()
        a.leave()
        rejoin.join(10)
        assert a.presence is Presence.LEFT
        assert until(lambda: "a" not in coordinator.view, 5), coordinator.view
    finally:
        gate.set()
        a.close()


def test_close_during_a_rejoin_ends_it_with_group_closed(coordinator: Coordinator) -> None:
    """The rejoin (coordinator away, so it retries) used to run on to its own timeout
    and then fail with IllegalTransition (no rule for a rejoin failing once closed)."""
    a = ElasticGroup(coordinator.address, "a", SECRET, join_timeout=10.0)
    try:
        a.join(10)
        coordinator.stop(grace=0.1)
        out: list[BaseException] = []

        def rejoin() -> None:
            try:
                a.rejoin(timeout=8.0)
            except BaseException as exc:
                out.append(exc)

        thread = threading.Thread(target=rejoin)
        thread.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        a.close()
        thread.join(10)
        assert time.monotonic() - t0 < 3.0
        assert len(out) == 1 and isinstance(out[0], GroupClosed), out
    finally:
        a.close()


def test_a_no_vote_on_a_round_this_member_already_carried_is_not_reported_committed(
    coordinator: Coordinator,
) -> None:
    """Soak, stop 30: a trainer voted yes and died; the round committed; its
    replacement, whose collectives had failed, voted no on the same step and was told
    "committed" -- the coordinator answers a decided round with its decision. It then
    applied an update it never computed. A member told "committed" after voting no
    is behind the group: it is told False and receives the group's state again."""
    with _joined_pair(coordinator) as (a, b):
        wa, wb = np.ones(8, np.float32), np.ones(8, np.float32)
        a.attach_state({"w": wa}, 0)
        b.attach_state({"w": wb}, 0)
        for g in (a, b):
            threading.Thread(target=lambda g=g: g.begin_step(0, timeout=15)).start()
        assert until(lambda: a._life.step == 0 and b._life.step == 0, 15)
        _sum_pair(a, b)
        votes: list[bool] = []
        t = threading.Thread(target=lambda: votes.append(b.commit(0, True, timeout=15)))
        t.start()
        assert a.commit(0, True, timeout=15) is True
        t.join(20)
        assert votes == [True]
        wb += 10.0
        b.update_state(1)
        assert a.commit(0, False, timeout=15) is False  # "the replacement's" vote
        assert a.state is not None and not a.state.valid
        # a left and comes back; its first step boundary receives b's state
        assert until(lambda: a.view.size == 2 and a.agent.member.incarnation > 1, 20)
        t = threading.Thread(target=lambda: b.begin_step(timeout=30))
        t.start()
        info = a.begin_step(timeout=30)
        t.join(35)
        assert info.synced and info.step == 1 and np.all(wa == 11.0), (info, wa)


def test_a_view_whose_last_generation_broke_is_left_and_rejoined(
    coordinator: Coordinator,
) -> None:
    """Review, stop 31: a group id holds 14 bits of generation; the rebuild after the
    last one computed a generation data_epoch refuses, in the builder thread, so that
    view never got a group again. The member leaves and comes back instead: the new
    view starts at generation 0."""
    with _joined_pair(coordinator) as (a, b):
        before = a.agent.member.incarnation
        with a._cond:
            cur = a._current
            assert cur is not None
            cur.generation = a._generation = MAX_GENERATION  # as if rebuilt that often
            a._heal(cur)
        assert until(lambda: a.agent.member.incarnation > before and a.view.size == 2, 20)
        _sum_pair(a, b)  # the pair works again, in a view of generation 0
        assert a._generation == 0


# ------------------------------------------------------------ the door's "peer ahead" hint
# The door peeks the epoch of a new connection's first header and tells its member when
# that names a group not built yet -- before any proof of the secret. The member used to
# abort its working group and jump to whatever generation the stranger named: one raw
# HELLO for data_epoch(view, MAX_GENERATION) moved it to 16383, and the next rebuild
# (16384) raised in the builder thread, so the view never got a group again.


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
    with _joined_pair(coordinator) as (a, b):
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
    with _joined_pair(coordinator) as (a, b):
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


def test_a_stream_of_hints_moves_a_backing_off_member_once(coordinator: Coordinator) -> None:
    """Review, stop 31: every stranger's HELLO for a newer generation moved a member
    that backs off one generation on, with no backoff: a stream of them marched the
    group towards its last generation. One hint per backoff step counts."""
    with _joined_pair(coordinator) as (a, b):
        view = a._view
        assert view is not None
        with a._cond:
            g = a._generation + 1
            a._generation, a._rebuild = g, (view, g)
            a._rebuild_at = time.monotonic() + 60.0
        for _ in range(5):
            _hint(a, data_epoch(view.epoch, MAX_GENERATION))
        with a._cond:
            assert a._generation == g + 1  # was: g + 5
        _sum_pair(a, b)

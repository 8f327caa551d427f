"""ElasticGroup's installer thread sleeps while nothing is due and is woken by what
is: a break of its group that reaches an idle engine comes through the group's
``on_break``, not through a poll (in-process: a real coordinator, real agents, real
data-plane groups on loopback)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

import phalanx.membership.elastic as elastic_module
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.elastic import ElasticGroup
from phalanx.membership.lifecycle import GroupPhase, Presence
from tests.integration._waits import until

pytestmark = pytest.mark.timeout(90)

SECRET = b"elastic-installer-secret-0123456789abc"


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    # a heartbeat timeout CI's load does not trip: nobody is evicted in this test
    config = MembershipConfig(recovery_grace=0.0, heartbeat_timeout=2.5, confirm_window=1.0)
    c = Coordinator(secret=SECRET, config=config)
    c.start()
    yield c
    c.stop(grace=0.5)


def _switches(m: ElasticGroup) -> int:
    tid = next(t.native_id for t in m._threads if t.name == "phalanx-elastic-install")
    with open(f"/proc/self/task/{tid}/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))


def _built(m: ElasticGroup) -> bool:
    cur = m._current
    return cur is not None and cur.usable and cur.view.size == 2


@contextlib.contextmanager
def _built_pair(coordinator: Coordinator) -> Iterator[tuple[ElasticGroup, ElasticGroup]]:
    """Members a and b, joined, their group built; closed afterwards."""
    a = ElasticGroup(coordinator.address, "a", SECRET, join_timeout=10.0)
    b = ElasticGroup(coordinator.address, "b", SECRET, join_timeout=10.0)
    try:
        a.join(10)
        b.join(10)
        assert until(lambda: _built(a) and _built(b), 15), "the pair's group was not built"
        yield a, b
    finally:
        a.close()
        b.close()


def test_the_installer_sleeps_while_idle_and_a_break_wakes_it(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # its fallback look pushed out of the test's reach: only on_break can wake it --
    # and no door hint either (b dialling a for the next generation would tell a)
    monkeypatch.setattr(elastic_module, "_LOOK_S", 60.0)
    monkeypatch.setattr(ElasticGroup, "_on_ahead", lambda self, *args, **kwargs: None)
    with _built_pair(coordinator) as (a, b):
        time.sleep(0.5)
        before = _switches(a)
        time.sleep(2.0)
        woke = _switches(a) - before
        assert woke <= 4, f"an idle installer woke {woke} times in 2 s (a 0.1 s poll: ~20)"

        # b's group gives up while a runs nothing: b's ABORT reaches a's idle engine
        generation = a._generation
        cur = b._current
        assert cur is not None and cur.group is not None
        cur.group.abort("view-change", "test: b breaks the group while a is idle")
        assert until(lambda: a._generation > generation, 10), (
            "a's installer never noticed its group's break (its look is 60 s away)"
        )
        assert until(lambda: _built(a) and _built(b) and a._generation == b._generation, 15)


def test_a_group_that_broke_while_its_member_rejoined_is_rebuilt_once_it_is_back(
    coordinator: Coordinator,
) -> None:
    """A break seen while the member is rejoining (a caller's ``rejoin()``: the new
    view's group came up before ``joined()``) waits for the join, by the rule
    (``after_break``: rejoin); the group stays marked broken. Before, nothing rebuilt
    it after the join: calls waited for the next view while the peer rebuilt and
    waited for us. ``_joined`` heals it."""
    with _built_pair(coordinator) as (a, b):
        generation = a._generation
        with a._cond:  # where a's rejoin stands just before its joined()
            a._life.evicted(time.monotonic())
            a._life.rejoin_started()
            assert a._life.presence is Presence.REJOINING
        cur = b._current
        assert cur is not None and cur.group is not None
        cur.group.abort("view-change", "test: b breaks the group while a rejoins")

        def marked() -> bool:
            plane = a._current
            return plane is not None and plane.phase is GroupPhase.BROKEN

        assert until(marked, 10), "a never saw its group break"
        time.sleep(0.5)
        assert a._generation == generation and a._rebuild is None  # waiting for the join
        with a._cond:
            a._joined()
        assert until(
            lambda: (
                a._generation > generation
                and _built(a)
                and _built(b)
                and a._generation == b._generation
            ),
            20,
        ), (a._generation, b._generation)

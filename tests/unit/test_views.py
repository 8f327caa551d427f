"""Views, the member-state table, and the coordinator's group rules on a fake clock.

No sockets, no threads: phalanx.membership.view and phalanx.membership._group are
pure and take the time as an argument.
"""

from __future__ import annotations

import itertools

import pytest

from phalanx.membership._group import Decision, GroupState, Outcome, ViewCause
from phalanx.membership.config import MembershipConfig
from phalanx.membership.errors import Evicted, IllegalTransition, Rejected, RejectReason
from phalanx.membership.view import (
    TRANSITIONS,
    Change,
    ChangeKind,
    Member,
    MemberEvent,
    MemberState,
    View,
    adopt_reported,
    next_view,
    parse_address,
    recovery_epoch,
    transition,
)


def m(name: str, inc: int = 1) -> Member:
    return Member(name, (f"127.0.0.1:{1000 + (sum(map(ord, name)) % 5000)}",), inc)


def view_of(epoch: int, *names: str) -> View:
    return View(epoch, tuple(m(n) for n in names))


# -- dataclasses ---------------------------------------------------------------------


def test_member_and_view_validate() -> None:
    with pytest.raises(ValueError):
        Member("", ("h:1",), 0)
    with pytest.raises(ValueError):
        Member("a b", ("h:1",), 0)
    with pytest.raises(ValueError):
        Member("a", (), 0)
    with pytest.raises(ValueError):
        Member("a", ("nohostport",), 0)
    with pytest.raises(ValueError):
        Member("a", ("h:70000",), 0)
    with pytest.raises(ValueError):
        Member("a", ("h:1",), -1)
    with pytest.raises(ValueError):
        View(-1)
    with pytest.raises(ValueError):
        View(3, (m("a"), m("a", 2)))
    with pytest.raises(ValueError):
        View(0, (m("a"),))
    v = view_of(4, "a", "b", "c")
    assert v.rank("c") == 2 and "b" in v and "z" not in v and v.ids == ("a", "b", "c")
    assert v.has(m("a")) and not v.has(m("a", 2))


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("::1:9", "host:", ":80", "host:0", "h ost:1", "[::1:9"):
        with pytest.raises(ValueError):
            parse_address(bad)


# -- the state table -----------------------------------------------------------------


def test_every_transition_in_the_table() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert transition(state, event) is target


def test_illegal_transitions_refused() -> None:
    states: list[MemberState | None] = [None, *MemberState]
    illegal = [
        (s, e) for s, e in itertools.product(states, MemberEvent) if (s, e) not in TRANSITIONS
    ]
    assert len(illegal) > 30
    for state, event in illegal:
        with pytest.raises(IllegalTransition):
            transition(state, event)
    for terminal in (MemberState.LEFT, MemberState.FAILED, MemberState.EVICTED):
        for event in MemberEvent:
            with pytest.raises(IllegalTransition):
                transition(terminal, event)


# -- view changes --------------------------------------------------------------------


def test_next_view_keeps_survivor_order_and_appends_joiners() -> None:
    v = view_of(5, "a", "b", "c", "d")
    nv = next_view(
        v,
        [
            Change(ChangeKind.ADMIT, m("e")),
            Change(ChangeKind.FAIL, m("b")),
            Change(ChangeKind.LEAVE, m("d")),
            Change(ChangeKind.ADMIT, m("f")),
        ],
    )
    assert nv.epoch == 6 and nv.ids == ("a", "c", "e", "f")
    assert next_view(nv, []) is nv


def test_next_view_refuses_bad_changes() -> None:
    v = view_of(2, "a", "b")
    with pytest.raises(IllegalTransition):
        next_view(v, [Change(ChangeKind.FAIL, m("z"))])
    with pytest.raises(IllegalTransition):
        next_view(v, [Change(ChangeKind.FAIL, m("a", 7))])  # wrong incarnation
    with pytest.raises(IllegalTransition):
        next_view(v, [Change(ChangeKind.ADMIT, m("a", 2))])  # id still present
    with pytest.raises(IllegalTransition):
        next_view(v, [Change(ChangeKind.ADMIT, m("c")), Change(ChangeKind.ADMIT, m("c"))])
    with pytest.raises(IllegalTransition):
        next_view(v, [Change(ChangeKind.LEAVE, m("a")), Change(ChangeKind.FAIL, m("a"))])
    # replacement in one batch: the new incarnation goes to the end
    nv = next_view(v, [Change(ChangeKind.FAIL, m("a")), Change(ChangeKind.ADMIT, m("a", 2))])
    assert nv.ids == ("b", "a") and nv.get("a") == m("a", 2)


def test_ring_order_stable_and_epochs_strictly_increase_over_random_churn() -> None:
    import random

    rng = random.Random(7)
    v = View(0)
    counter = itertools.count()
    for _ in range(300):
        changes: list[Change] = []
        for member in v.members:
            if rng.random() < 0.2:
                changes.append(Change(rng.choice(list(ChangeKind)[1:]), member))
        for _ in range(rng.randrange(3)):
            changes.append(Change(ChangeKind.ADMIT, m(f"p{next(counter)}")))
        nv = next_view(v, changes)
        if changes:
            assert nv.epoch == v.epoch + 1
        survivors = [i for i in v.ids if i in nv]
        assert list(nv.ids[: len(survivors)]) == survivors  # relative order kept, first
        v = nv


def test_recovery_epoch_and_adoption() -> None:
    cur = view_of(7, "a", "b")
    assert recovery_epoch(cur, view_of(6, "a")) is None
    assert recovery_epoch(cur, cur) is None
    assert recovery_epoch(cur, view_of(7, "a")) == 8  # conflicting view, same epoch
    assert recovery_epoch(cur, view_of(9, "a", "b")) == 10
    assert adopt_reported([view_of(3, "a"), view_of(9, "b"), view_of(4, "c")]) == view_of(9, "b")
    assert adopt_reported([]) is None


# -- the group rules ----------------------------------------------------------------------

# join_batch=0: these tests drive admission one join at a time on a fake clock
FAST = MembershipConfig(recovery_grace=0.0, probe_addresses=False, join_batch=0.0)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self, dt: float = 0.0) -> float:
        self.t += dt
        return self.t


def formed(names: str = "abc", config: MembershipConfig = FAST) -> tuple[GroupState, Clock]:
    clock = Clock()
    g = GroupState(config, clock(), recovering=config.recovery_grace > 0)
    for n in names:
        g.join(m(n), View(0), None, clock())
    assert ids(g) == tuple(names)
    return g, clock


def ids(g: GroupState) -> tuple[str, ...]:
    return g.view.ids


def beat_all(g: GroupState, clock: Clock, names: str, dt: float = 0.1) -> None:
    now = clock(dt)
    for n in names:
        g.heartbeat(n, 1, now)
    g.tick(now)


def test_heartbeat_timeout_fails_member() -> None:
    g, clock = formed()
    e0 = g.view.epoch
    for _ in range(5):
        beat_all(g, clock, "ab")
    assert g.view.epoch == e0  # 0.5 s < 0.6 s
    beat_all(g, clock, "ab", 0.15)
    assert ids(g) == ("a", "b") and g.view.epoch == e0 + 1
    assert g.published.cause is ViewCause.FAILURE
    with pytest.raises(Evicted):
        g.heartbeat("c", 1, clock())
    with pytest.raises(Evicted):
        g.join(m("c"), View(0), None, clock())
    g.join(m("c", 2), View(0), None, clock())  # a new incarnation may rejoin
    assert ids(g) == ("a", "b", "c")


def test_most_of_the_view_silent_at_once_gets_one_more_timeout() -> None:
    """Four of four members silent in one tick (soak seed 20261206: the coordinator
    starved, their heartbeats queued) were all failed at once, and the view went to
    newcomers without the training state. Now they get one more heartbeat timeout:
    those whose beats arrive meanwhile stay, those still silent then are removed."""
    g, clock = formed("abcd")
    e0 = g.view.epoch
    beat_all(g, clock, "abcd")
    now = clock(0.7)  # nobody heard from for 0.7 s > 0.6 s
    g.tick(now)
    assert ids(g) == ("a", "b", "c", "d") and g.view.epoch == e0  # held, not failed
    now = clock(0.1)  # the queued beats of a, b, c arrive; d really is gone
    for n in "abc":
        g.heartbeat(n, 1, now)
    g.tick(now)
    assert g.view.epoch == e0
    beat_all(g, clock, "abc", 0.3)
    beat_all(g, clock, "abc", 0.25)  # the hold (0.6 s) is over: d, silent all along, goes
    assert ids(g) == ("a", "b", "c") and g.published.removed == (("d", "heartbeat-timeout"),)
    # the whole group silent for good: removed one timeout later, not never
    now = clock(0.7)
    g.tick(now)
    assert ids(g) == ("a", "b", "c")
    g.tick(clock(0.61))
    assert ids(g) == ()
    # a minority falling silent is failed at the first timeout, as before
    g2, clock2 = formed("abcde")
    beat_all(g2, clock2, "abcde")
    for _ in range(6):
        beat_all(g2, clock2, "abc", 0.11)
    assert ids(g2) == ("a", "b", "c")


def test_a_burst_of_joins_enters_in_one_view() -> None:
    """The first join after a quiet while is admitted at once; joins within join_batch
    of it wait for the next tick and enter together (a cluster of N starting at once
    made N views, each sent to every member: N^2 watch events at the coordinator)."""
    cfg = MembershipConfig(recovery_grace=0.0, probe_addresses=False, join_batch=0.05)
    clock = Clock()
    g = GroupState(cfg, clock(), recovering=False)
    g.join(m("a"), View(0), None, clock())
    assert ids(g) == ("a",)
    e = g.view.epoch
    for n in "bcdef":
        g.join(m(n), View(0), None, clock(0.001))
    assert ids(g) == ("a",) and g.view.epoch == e  # waiting for the tick
    g.tick(clock(0.01))
    assert ids(g) == tuple("abcdef") and g.view.epoch == e + 1  # one view for five
    g.join(m("g"), View(0), None, clock(1.0))  # quiet again: at once
    assert ids(g)[-1] == "g"


def test_report_confirmed_quickly_but_refuted_by_heartbeat() -> None:
    g, clock = formed()
    e = g.view.epoch
    assert g.report("a", 1, e, ["b"], "disconnected", clock()) == ["b"]
    beat_all(g, clock, "abc", 0.1)  # b beats: refuted
    beat_all(g, clock, "abc", 0.3)
    assert g.view.epoch == e and ids(g) == ("a", "b", "c")
    g.report("a", 1, e, ["b"], "disconnected", clock())
    beat_all(g, clock, "ac", 0.15)
    assert g.view.epoch == e
    beat_all(g, clock, "ac", 0.16)  # 0.31 s >= confirm window
    assert ids(g) == ("a", "c") and g.published.removed[0][0] == "b"


def test_report_with_stale_epoch_and_from_stranger() -> None:
    g, clock = formed()
    with pytest.raises(Rejected) as info:
        g.report("a", 1, g.view.epoch - 1, ["b"], "", clock())
    assert info.value.reason is RejectReason.STALE_EPOCH
    with pytest.raises(Rejected) as info:
        g.report("zz", 1, g.view.epoch, ["b"], "", clock())
    assert info.value.reason is RejectReason.NOT_MEMBER


def test_leave_is_immediate() -> None:
    g, clock = formed()
    e = g.view.epoch
    v = g.leave("b", 1, "done", clock())
    assert v.ids == ("a", "c") and v.epoch == e + 1 and g.published.cause is ViewCause.LEAVE
    assert g.state_of("b", 1) is MemberState.LEFT


def test_duplicate_id_and_stale_incarnation() -> None:
    g, clock = formed()
    with pytest.raises(Rejected) as info:
        g.join(m("b", 2), View(0), None, clock())
    assert info.value.reason is RejectReason.DUPLICATE_ID
    with pytest.raises(Rejected) as info:
        g.join(Member("b", ("127.0.0.1:1",), 1), View(0), None, clock())  # same inc, other addr
    assert info.value.reason is RejectReason.DUPLICATE_ID
    with pytest.raises(Rejected) as info:
        g.join(m("b", 0), View(0), None, clock())
    assert info.value.reason is RejectReason.STALE_INCARNATION
    # the higher incarnation made b suspect; b keeps beating, so it stays
    beat_all(g, clock, "abc", 0.35)
    assert ids(g) == ("a", "b", "c")
    # if the old b is really dead, the suspicion is confirmed and the new b gets in
    with pytest.raises(Rejected):
        g.join(m("b", 2), View(0), None, clock())
    beat_all(g, clock, "ac", 0.35)
    assert ids(g) == ("a", "c")
    g.join(m("b", 2), View(0), None, clock())
    assert ids(g) == ("a", "c", "b")


def test_joiner_waits_for_commit_boundary() -> None:
    g, clock = formed("ab")
    e = g.view.epoch
    g.vote("a", 1, e, 1, True, clock())
    assert g.vote("b", 1, e, 1, True, clock()) == Decision(e, 1, True, Outcome.ALL_OK)
    # the group is stepping: a joiner waits for the next decision
    g.vote("a", 1, e, 2, True, clock(0.1))
    g.join(m("c"), View(0), None, clock())
    assert ids(g) == ("a", "b") and g.pending_ids() == ("c",)
    beat_all(g, clock, "abc", 0.1)
    assert g.view.epoch == e
    d = g.vote("b", 1, e, 2, True, clock())
    assert d is not None and d.committed  # decided in the old view...
    assert ids(g) == ("a", "b", "c") and g.view.epoch == e + 1  # ...then admitted


def test_joiner_admitted_at_once_when_group_idle_and_after_deadline() -> None:
    g, clock = formed("ab")
    g.join(m("c"), View(0), None, clock())
    assert ids(g) == ("a", "b", "c")
    e = g.view.epoch
    g.vote("a", 1, e, 1, True, clock())  # a round stays open: c-less joiners wait
    g.join(m("d"), View(0), None, clock())
    assert "d" not in g.view
    t = 0.0
    while "d" not in g.view and t < 6:
        beat_all(g, clock, "abcd", 0.1)
        t += 0.1
    assert "d" in g.view and 4.9 < t < 5.3
    assert g.decision(e, 1) == Decision(e, 1, False, Outcome.VIEW_CHANGED)


def test_commit_agreement_rules() -> None:
    g, clock = formed()
    e = g.view.epoch
    assert g.vote("a", 1, e, 1, True, clock()) is None
    assert g.vote("b", 1, e, 1, False, clock()) == Decision(e, 1, False, Outcome.MEMBER_FAILED)
    assert g.vote("c", 1, e, 1, True, clock()) == Decision(e, 1, False, Outcome.MEMBER_FAILED)
    # view change mid-vote
    assert g.vote("a", 1, e, 2, True, clock()) is None
    g.leave("c", 1, "", clock())
    assert g.decision(e, 2) == Decision(e, 2, False, Outcome.VIEW_CHANGED)
    assert g.vote("b", 1, e, 2, True, clock()) == Decision(e, 2, False, Outcome.VIEW_CHANGED)
    # a vote for a round never opened in an old epoch is "no"
    assert g.vote("b", 1, e, 3, True, clock()) == Decision(e, 3, False, Outcome.VIEW_CHANGED)
    # repeated votes return the same decision
    e2 = g.view.epoch
    g.vote("a", 1, e2, 4, True, clock())
    d = g.vote("b", 1, e2, 4, True, clock())
    assert d == Decision(e2, 4, True, Outcome.ALL_OK) == g.vote("a", 1, e2, 4, True, clock())


def test_commit_round_times_out() -> None:
    cfg = MembershipConfig(
        recovery_grace=0.0, probe_addresses=False, commit_timeout=1.0, join_batch=0.0
    )
    g, clock = formed("ab", cfg)
    e = g.view.epoch
    g.vote("a", 1, e, 1, True, clock())
    for _ in range(11):
        beat_all(g, clock, "ab", 0.1)
    assert g.decision(e, 1) == Decision(e, 1, False, Outcome.TIMEOUT)


def test_restart_recovery_adopts_reported_view_without_change() -> None:
    old, clock = formed()
    old.leave("c", 1, "", clock())
    old.join(m("d"), View(0), None, clock())
    reported = old.view
    assert reported.ids == ("a", "b", "d")
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=1.5, join_batch=0.0)
    new = GroupState(cfg, clock(), recovering=True)
    new.join(m("e"), View(0), None, clock())  # a fresh joiner waits for recovery
    for name in ("d", "a", "b"):
        view, admitted = new.join(reported.get(name) or m(name), reported, None, clock(0.05))
        assert admitted and view == reported
    assert not new.recovering  # everyone re-registered: recovery ends early
    assert new.view == reported  # no spurious view change...
    new.tick(clock(0.01))
    assert new.view.epoch == reported.epoch + 1 and ids(new) == ("a", "b", "d", "e")


def test_restart_recovery_takes_highest_and_fails_missing() -> None:
    clock = Clock()
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=1.0, join_batch=0.0)
    g = GroupState(cfg, clock(), recovering=True)
    v4 = view_of(4, "a", "b", "c")
    v5 = view_of(5, "a", "b")  # c was removed in 5, a saw it, b did not
    g.join(m("b"), v4, None, clock())
    assert g.view == v4
    g.join(m("a"), v5, Decision(4, 9, True), clock())
    assert g.view == v5
    with pytest.raises(Evicted):
        g.join(m("c"), v4, None, clock())
    # a vote in the old epoch waits until recovery ends; history says True
    assert g.vote("b", 1, 4, 9, True, clock()) == Decision(4, 9, True, Outcome.ALL_OK)
    assert not g.recovering and g.view == v5


def test_restart_recovery_window_expires() -> None:
    clock = Clock()
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=1.0, join_batch=0.0)
    g = GroupState(cfg, clock(), recovering=True)
    v = view_of(6, "a", "b", "c")
    g.join(m("a"), v, None, clock())
    g.join(m("b"), v, None, clock())
    assert g.vote("a", 1, 6, 1, True, clock()) is None
    assert g.vote("b", 1, 6, 1, True, clock()) is None  # waits: recovering
    for _ in range(12):
        beat_all(g, clock, "ab", 0.1)
    assert ids(g) == ("a", "b") and g.view.epoch == 7
    # epoch 6 was adopted, not run from its start here: its predecessor may have
    # decided round 1 (with c's vote) before dying, so "no" would be a guess
    assert g.decision(6, 1) == Decision(6, 1, False, Outcome.UNKNOWN)
    # a late peer with a view at or above the current epoch pushes the epoch up
    with pytest.raises(Evicted):
        g.join(m("x"), view_of(9, "a", "b", "x"), None, clock())
    assert g.view.epoch == 10 and ids(g) == ("a", "b")


def test_a_restart_that_recovers_nothing_never_reuses_an_epoch() -> None:
    """Regression (churn soak, seed 20261126): two coordinator kills in a row, no old
    member re-registered within the grace, and a brand-new peer was admitted alone as
    epoch 1 -- an epoch that had run ops with the first five members. The first view
    a restarted instance publishes is numbered from its floor instead."""
    old, clock = formed("abc")
    for n in "de":
        old.join(m(n), View(0), None, clock())
    old_epoch = old.view.epoch
    assert old_epoch >= 2
    floor = 1_795_000_000_000  # what the coordinator passes: the wall clock in ms
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=1.0, join_batch=0.0)
    new = GroupState(cfg, clock(), recovering=True, epoch_floor=floor)
    new.tick(clock(1.5))  # nobody re-registered: recovery ends with nothing adopted
    assert not new.recovering and new.view == View(0)
    view, admitted = new.join(m("p"), View(0), None, clock())
    assert admitted and view.epoch == floor and view.ids == ("p",)  # was epoch 1
    # an old member that comes back later holds a lower epoch: it was left behind
    with pytest.raises(Evicted):
        new.join(m("a"), old.view, None, clock())
    new.join(m("q"), View(0), None, clock())
    new.tick(clock(0.01))
    assert new.view.epoch == floor + 1  # then it counts up as usual


def test_after_adopting_a_view_the_next_epoch_comes_from_the_floor() -> None:
    """Peers may re-register with a view older than the last one the predecessor
    published; counting up from it could repeat an epoch that already ran ops."""
    old, clock = formed("abc")
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=1.0, join_batch=0.0)
    new = GroupState(cfg, clock(), recovering=True, epoch_floor=10_000)
    for n in "ab":
        new.join(m(n), old.view, None, clock())
    assert new.view == old.view  # adopted as is: ops in flight are not disturbed
    for _ in range(12):  # c never comes back: recovery ends and fails it
        beat_all(new, clock, "ab", 0.1)
    assert ids(new) == ("a", "b") and new.view.epoch == 10_000  # not old epoch + 1


def test_restarted_coordinator_does_not_guess_an_old_round() -> None:
    """Regression (churn soak, seed 20261122, epoch 969 step 47092): a member whose
    commit answer was lost in a partition re-voted after the coordinator restarted;
    the new one, which never saw that epoch, answered "view changed, not committed"
    while every other member had applied the step."""
    old, clock = formed("abp")
    e = old.view.epoch
    for n in "abp":
        old.vote(n, 1, e, 41, True, clock())
    committed = old.decision(e, 41)
    assert committed == Decision(e, 41, True, Outcome.ALL_OK)  # a, b apply; p's answer is lost
    old.leave("p", 1, "", clock())  # p drops out of the view (evicted in the soak)
    e1 = old.view.epoch
    for n in "ab":
        old.vote(n, 1, e1, 42, True, clock())
    # the coordinator dies; a new one recovers from a and b
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=1.0, join_batch=0.0)
    new = GroupState(cfg, clock(), recovering=True)
    for n in "ab":
        new.join(m(n), old.view, old.decision(e1, 42), clock())
    assert not new.recovering and new.view == old.view
    # p is unknown here: re-registering with the view it last saw is refused...
    with pytest.raises(Evicted):
        new.join(m("p"), view_of(e, "a", "b", "p"), None, clock())
    # ... its daemon rejoins as p#2, and the vote still in flight arrives as p#2
    new.join(m("p", 2), View(0), None, clock())
    d = new.vote("p", 2, e, 41, True, clock())
    assert d == Decision(e, 41, False, Outcome.UNKNOWN)  # was VIEW_CHANGED: "no"
    assert new.decision(e, 41) is None  # not remembered: the real answer may still come
    new.join(m("a"), old.view, committed, clock())  # ... e.g. from a member that has it
    assert new.vote("p", 2, e, 41, True, clock()) == committed
    # rounds of epochs it ran itself keep the plain rule
    new.tick(clock(0.01))
    e2 = new.view.epoch
    assert e2 > e1
    new.join(m("q"), View(0), None, clock())
    new.tick(clock(0.01))
    assert new.view.epoch > e2
    assert new.vote("a", 1, e2, 7, True, clock()) == Decision(e2, 7, False, Outcome.VIEW_CHANGED)


def test_stream_loss_is_a_suspicion() -> None:
    g, clock = formed()
    g.stream_lost("c", 1, clock())
    beat_all(g, clock, "ab", 0.31)
    assert ids(g) == ("a", "b")
    g.stream_lost("zz", 1, clock())  # unknown: ignored

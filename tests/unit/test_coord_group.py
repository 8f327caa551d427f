"""The coordinator's rules (GroupState) on a fake clock: commit rounds while a restarted
coordinator recovers, and the epoch floor of a coordinator that does not wait for
re-registrations."""

from __future__ import annotations

from phalanx.membership._group import Decision, GroupState, Outcome
from phalanx.membership.config import MembershipConfig
from phalanx.membership.view import Member, View


def m(name: str) -> Member:
    return Member(name, (f"127.0.0.1:{1000 + ord(name)}",), 1)


def test_no_round_times_out_while_the_coordinator_recovers() -> None:
    """recovery_grace 40 s > commit_timeout 30 s: b re-voted step 5 at once after the
    restart, and 30 s later the round timed out (False). a re-registered after that with
    the old coordinator's decision (7, 5, True), and the seed was ignored: a had
    committed, b had not. No round may time out before recovery ends."""
    cfg = MembershipConfig(
        probe_addresses=False, recovery_grace=40.0, commit_timeout=30.0, join_batch=0.0
    )
    t = 100.0
    g = GroupState(cfg, t, recovering=True, epoch_floor=10_000)
    v7 = View(7, (m("a"), m("b")))
    g.join(m("b"), v7, None, t)
    assert g.view == v7 and g.recovering
    assert g.vote("b", 1, 7, 5, True, t + 1) is None  # waits: recovering
    for i in range(4, 144):  # every 0.25 s up to t + 36
        now = t + i / 4
        g.heartbeat("b", 1, now)
        g.tick(now)
        assert g.decision(7, 5) is None, now  # was (7, 5, False, TIMEOUT) from t + 31
    assert g.recovering and g.view == v7
    # a comes back with what the old coordinator told it
    g.join(m("a"), v7, Decision(7, 5, True), t + 36)  # within the 40 s grace
    assert not g.recovering  # everyone re-registered
    assert g.decision(7, 5) == Decision(7, 5, True, Outcome.ALL_OK)
    assert g.vote("b", 1, 7, 5, True, t + 36) == Decision(7, 5, True, Outcome.ALL_OK)


def test_a_round_opened_in_recovery_gets_its_whole_timeout_after_it() -> None:
    cfg = MembershipConfig(
        probe_addresses=False, recovery_grace=10.0, commit_timeout=5.0, join_batch=0.0
    )
    t = 0.0
    g = GroupState(cfg, t, recovering=True, epoch_floor=10_000)
    v7 = View(7, (m("a"), m("b")))
    g.join(m("a"), v7, None, t)
    g.join(m("b"), v7, None, t)  # recovery ends here: every member re-registered
    assert not g.recovering
    assert g.vote("a", 1, 7, 1, True, t + 1) is None
    # a round of an adopted epoch that times out: the predecessor may have decided it
    # True (with b's vote) before dying, so the answer is UNKNOWN, not a guessed False
    for now in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 5.9, 6.1):
        g.heartbeat("a", 1, now)
        g.heartbeat("b", 1, now)
        g.tick(now)
        if now < 6.0:
            assert g.decision(7, 1) is None
    assert g.view == v7
    assert g.decision(7, 1) == Decision(7, 1, False, Outcome.UNKNOWN)


def test_a_round_of_an_epoch_this_instance_published_times_out_as_before() -> None:
    cfg = MembershipConfig(
        probe_addresses=False, recovery_grace=0.0, commit_timeout=5.0, join_batch=0.0
    )
    g = GroupState(cfg, 0.0, recovering=False)
    g.join(m("a"), View(0), None, 0.0)
    g.join(m("b"), View(0), None, 0.0)
    e = g.view.epoch
    assert g.view.ids == ("a", "b")
    assert g.vote("a", 1, e, 3, True, 1.0) is None
    for now in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 5.9, 6.1):
        g.heartbeat("a", 1, now)
        g.heartbeat("b", 1, now)
        g.tick(now)
        if now < 6.0:
            assert g.decision(e, 3) is None
    assert g.view.epoch == e
    assert g.decision(e, 3) == Decision(e, 3, False, Outcome.TIMEOUT)


def test_a_coordinator_without_a_recovery_grace_still_numbers_from_its_floor() -> None:
    """recovery_grace 0 (``--recovery-grace 0``) only skips the wait for members to
    re-register; it dropped the epoch floor too, so such a coordinator, restarted under
    a running group, admitted a lone newcomer as epoch 1 again. Only a group known to
    be new (``recovering=False``, the library's ``recover=False``) counts from 1."""
    cfg = MembershipConfig(probe_addresses=False, recovery_grace=0.0, join_batch=0.0)
    floor = 1_795_000_000_000
    g = GroupState(cfg, 0.0, recovering=True, epoch_floor=floor)
    assert not g.recovering  # nothing to wait for
    view, admitted = g.join(m("p"), View(0), None, 0.0)
    assert admitted and view.epoch == floor and view.ids == ("p",)  # was epoch 1
    g.join(m("q"), View(0), None, 0.1)
    g.tick(0.2)
    assert g.view.epoch == floor + 1
    new = GroupState(cfg, 0.0, recovering=False, epoch_floor=floor)
    assert new.join(m("p"), View(0), None, 0.0)[0].epoch == 1

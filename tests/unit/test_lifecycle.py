"""The member lifecycle tables (membership/lifecycle.py), driven with plain values and a
fake clock: no sockets, no threads."""

from __future__ import annotations

import itertools

import pytest

from phalanx.errors import IllegalTransition
from phalanx.membership.lifecycle import (
    GROUP_TRANSITIONS,
    ON_CLIENT_LOST,
    PRESENCE_TRANSITIONS,
    REBUILD_MAX_DELAY_S,
    REJOIN_FIRST_DELAY_S,
    REJOIN_MAX_DELAY_S,
    STEP_TRANSITIONS,
    GroupEvent,
    GroupPhase,
    Heal,
    Lifecycle,
    Loss,
    Presence,
    PresenceEvent,
    StepEvent,
    StepPhase,
    after_break,
    data_epoch,
    group_transition,
    rebuild_delay,
    rejoin_delay,
    split_epoch,
)

ABC = ("a", "b", "c")
AB = ("a", "b")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def presence(life: Lifecycle) -> Presence:
    return life.presence  # read through a call: no narrowing across the calls between


def phase(life: Lifecycle) -> StepPhase:
    return life.step_phase


def member(auto_rejoin: bool = True) -> Lifecycle:
    life = Lifecycle(auto_rejoin=auto_rejoin)
    life.joined()
    return life


# ----------------------------------------------------------------------------- the tables


def test_every_phase_answers_every_loss_and_tables_name_only_known_states() -> None:
    assert set(ON_CLIENT_LOST) == set(StepPhase)
    for table, phases, events in (
        (STEP_TRANSITIONS, StepPhase, StepEvent),
        (GROUP_TRANSITIONS, GroupPhase, GroupEvent),
        (PRESENCE_TRANSITIONS, Presence, PresenceEvent),
    ):
        for (state, event), nxt in table.items():
            assert state in phases and event in events and nxt in phases
    # closed is final; retired is final
    assert {n for (p, _), n in PRESENCE_TRANSITIONS.items() if p is Presence.CLOSED} == {
        Presence.CLOSED
    }
    assert {n for (p, _), n in GROUP_TRANSITIONS.items() if p is GroupPhase.RETIRED} == {
        GroupPhase.RETIRED
    }


def test_a_group_goes_built_exchanged_broken_retired_and_nothing_else() -> None:
    phase = GroupPhase.BUILDING
    for event, want in (
        (GroupEvent.BUILT, GroupPhase.READY),
        (GroupEvent.EXCHANGED, GroupPhase.EXCHANGED),
        (GroupEvent.OP_FAILED, GroupPhase.BROKEN),
        (GroupEvent.RETIRE, GroupPhase.RETIRED),
    ):
        phase = group_transition(phase, event)
        assert phase is want
    with pytest.raises(IllegalTransition):
        group_transition(GroupPhase.BROKEN, GroupEvent.EXCHANGED)  # never usable again
    with pytest.raises(IllegalTransition):
        group_transition(GroupPhase.FAILED, GroupEvent.BUILT)


def test_what_follows_a_broken_group() -> None:
    assert after_break(Presence.MEMBER, newer_view=False) is Heal.REBUILD
    assert after_break(Presence.MEMBER, newer_view=True) is Heal.WAIT_VIEW
    assert after_break(Presence.EVICTED, newer_view=False) is Heal.REJOIN
    assert after_break(Presence.CYCLING, newer_view=True) is Heal.REJOIN
    assert after_break(Presence.LEFT, newer_view=False) is Heal.NOTHING
    assert after_break(Presence.CLOSED, newer_view=False) is Heal.NOTHING


def test_generations_keep_the_first_build_and_order_like_tuples() -> None:
    assert data_epoch(7, 0) == 7  # a group that never broke is what it always was
    ids = [data_epoch(e, g) for e, g in itertools.product((5, 6), (0, 1, 3))]
    keys = [split_epoch(i) for i in ids]
    assert keys == sorted(keys) and keys[0] == (5, 0, False) and keys[-1] == (6, 3, False)
    wall_clock_epoch = 1_780_000_000_000  # coordinators number views from the clock, in ms
    assert split_epoch(data_epoch(wall_clock_epoch, 9)) == (wall_clock_epoch, 9, False)
    assert split_epoch(data_epoch(5, 1) | (1 << 62)) == (5, 1, True)
    with pytest.raises(ValueError):
        data_epoch(1 << 48, 0)


# ----------------------------------------------------------------------------- the step


def test_the_readme_loop_walks_the_step_table() -> None:
    life = member()
    assert life.begin(0, ABC, allow_partial=False) is False
    life.begin_members(ABC, 4)
    assert phase(life) is StepPhase.BEGUN
    life.op_started()
    assert phase(life) is StepPhase.RUNNING and life.admits(ABC)
    life.op_succeeded(4, ABC)
    assert life.done == 1 and life.step_epoch == 4
    v = life.vote(0, True, current_epoch=5)
    assert (v.ok, v.epoch) == (True, 4)  # the epoch of the first successful collective
    life.decided(True, state_attached=True)
    assert phase(life) is StepPhase.APPLYING
    life.updated()
    assert phase(life) is StepPhase.NONE


def test_a_collective_over_other_members_aborts_the_step_and_its_vote_is_false() -> None:
    life = member()
    life.begin(7, ABC, allow_partial=False)
    life.begin_members(ABC, 4)
    life.op_started()
    # c was killed: the retry would run on view 5 = (a, b)
    assert not life.admits(AB)
    life.abort_step()
    assert phase(life) is StepPhase.NONE
    v = life.vote(7, True, current_epoch=5)
    assert v.ok is False and v.epoch == 4 and "aborted" in v.why  # cast in the old round
    life.decided(False, state_attached=True)
    # the redo of step 7 in view 5 votes normally, in a round nobody used
    life.begin(7, AB, allow_partial=False)
    life.begin_members(AB, 5)
    life.op_started()
    assert life.admits(AB)
    life.op_succeeded(5, AB)
    v = life.vote(7, True, current_epoch=5)
    assert (v.ok, v.epoch) == (True, 5)


def test_allow_partial_lets_the_collective_run_and_the_step_commit() -> None:
    life = member()
    life.begin(3, ABC, allow_partial=True)
    life.begin_members(ABC, 4)
    life.op_started()
    assert life.admits(AB)
    life.op_succeeded(5, AB)
    assert life.partial
    v = life.vote(3, True, current_epoch=5)
    assert v.ok is True and v.epoch == 5


def test_collectives_outside_steps_cost_nothing_when_the_client_goes() -> None:
    """Issue 18.6(a): a client that never used steps, then went away."""
    life = member()
    for _ in range(3):
        life.op_started()
        life.op_succeeded(4, ABC)
    assert phase(life) is StepPhase.NONE and life.admits(AB)
    assert life.client_lost() is Loss.NOTHING


@pytest.mark.parametrize(
    ("setup", "loss"),
    [
        ("boundary", Loss.NOTHING),
        ("begun", Loss.NOTHING),
        ("running", Loss.CYCLE),
        ("applying", Loss.CYCLE_AND_RESYNC),
        ("false-commit", Loss.NOTHING),
    ],
)
def test_losing_the_client_costs_what_the_table_says(setup: str, loss: Loss) -> None:
    life = member()
    life.begin(0, ABC, allow_partial=False)
    life.begin_members(ABC, 4)
    life.updated()  # boundary: a step, then update_state
    if setup != "boundary":
        life.begin(1, ABC, allow_partial=False)
    if setup in ("running", "applying", "false-commit"):
        life.op_started()
        life.op_succeeded(4, ABC)
    if setup == "applying":
        life.decided(True, state_attached=True)
    if setup == "false-commit":
        life.decided(False, state_attached=True)
    assert life.client_lost() is loss
    assert phase(life) is StepPhase.NONE and not life.steps_used


def test_begin_step_before_update_state_drops_the_state_hashes() -> None:
    life = member()
    life.begin(0, ABC, allow_partial=False)
    life.op_started()
    life.decided(True, state_attached=True)
    assert life.begin(1, ABC, allow_partial=False) is True
    # a step in use never takes a collective outside steps
    assert (StepPhase.BEGUN, StepEvent.FREE_OP) not in STEP_TRANSITIONS


def test_a_clean_goodbye_mid_apply_means_the_state_is_received_again() -> None:
    life = member()
    life.begin(0, ABC, allow_partial=False)
    life.op_started()
    life.decided(True, state_attached=True)
    assert life.client_closed() is True
    assert phase(life) is StepPhase.NONE
    life.begin(0, ABC, allow_partial=False)
    assert life.client_closed() is False


# ----------------------------------------------------------------------------- presence


def test_one_rejoin_policy_with_backoff_on_a_fake_clock() -> None:
    clock = Clock()
    life = member(auto_rejoin=True)
    assert life.evicted(clock()) is True
    assert life.rejoin_due(clock()) and not life.coming_back()  # calls see Evicted
    delays: list[float] = []
    for _ in range(7):
        life.rejoin_started()
        assert presence(life) == Presence.REJOINING and not life.rejoin_due(clock())
        at = life.rejoin_failed(clock())
        assert at is not None and presence(life) == Presence.EVICTED
        delays.append(round(at - clock(), 3))
        assert not life.rejoin_due(clock())
        assert life.rejoin_wait(clock()) == pytest.approx(at - clock())  # the installer sleeps that
        clock.t = at
        assert life.rejoin_due(clock()) and life.rejoin_wait(clock()) == 0.0
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert [rejoin_delay(n) for n in range(3)] == [0.0, 0.2, 0.4]
    life.rejoin_started()
    life.joined()
    assert presence(life) is Presence.MEMBER and life.failed_rejoins == 0


def test_without_auto_rejoin_an_eviction_waits_for_the_caller() -> None:
    clock = Clock()
    life = member(auto_rejoin=False)
    assert life.evicted(clock()) is False
    clock.t += 100
    assert not life.rejoin_due(clock()) and not life.coming_back()
    assert life.rejoin_wait(clock()) is None  # nothing to wake the installer for
    life.rejoin_started()  # the caller's rejoin()
    assert life.rejoin_failed(clock()) is None


def test_a_client_lost_mid_step_cycles_and_a_deliberate_leave_stays_out() -> None:
    clock = Clock()
    life = member(auto_rejoin=False)  # cycling comes back regardless of auto_rejoin
    life.begin(0, ABC, allow_partial=False)
    life.op_started()
    assert life.client_lost() is Loss.CYCLE
    life.cycle()
    # no rejoin while the leave is in flight: it would race the leave's clean-up
    assert presence(life) == Presence.CYCLING and not life.rejoin_due(clock())
    assert life.rejoin_wait(clock()) is None
    life.cycle_left(clock())
    assert life.rejoin_due(clock())
    assert life.coming_back()  # a restarted client's calls wait for it
    life.rejoin_started()
    assert life.rejoin_failed(clock()) is not None  # cycles retry even without auto
    life.rejoin_started()
    life.joined()
    assert not life.coming_back()
    life.leave()
    assert presence(life) == Presence.LEFT
    assert life.evicted(clock()) is False  # the removal of a member that left on purpose
    clock.t += 100
    assert not life.rejoin_due(clock())
    life.close()
    with pytest.raises(IllegalTransition):
        life.rejoin_started()


def test_failed_builds_back_off_and_an_op_that_broke_does_not() -> None:
    assert rebuild_delay(0) == 0.0  # a group that broke mid-op is rebuilt at once
    assert [rebuild_delay(n) for n in (1, 2, 3)] == [0.05, 0.1, 0.2]
    assert rebuild_delay(50) == 1.0  # capped: a rejoin or a new view gets its turn


def test_the_backoff_delays_stay_finite_for_any_count() -> None:
    """A count that grows for hours (a coordinator away, a source that never hashes
    again) made ``2 ** n`` too large for a float: OverflowError from n = 1025, raised
    where the rejoin or rebuild was to be scheduled."""
    for n in (1, 2, 10, 1025, 10**6):
        assert 0.0 < rejoin_delay(n) <= REJOIN_MAX_DELAY_S
        assert 0.0 < rebuild_delay(n) <= REBUILD_MAX_DELAY_S
    assert rejoin_delay(10**6) == REJOIN_MAX_DELAY_S
    assert rebuild_delay(10**6) == REBUILD_MAX_DELAY_S
    assert rejoin_delay(1) == REJOIN_FIRST_DELAY_S

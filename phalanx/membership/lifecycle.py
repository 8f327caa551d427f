"""One member's life in an elastic group, as tables: its training step, each data-plane
group it builds, and its presence in the group (including the one rejoin policy).

Three small state machines, each a table in the style of :data:`~phalanx.membership.
view.TRANSITIONS` (anything absent is an :class:`~phalanx.errors.IllegalTransition`):

* **the step** (:data:`STEP_TRANSITIONS`): ``none`` (no step open; collectives outside
  steps) → ``begun`` (``begin_step`` returned) → ``running`` (a collective ran) →
  ``applying`` (commit said True with state attached: the client changes the state in
  place until ``update_state``) → ``none``. :data:`ON_CLIENT_LOST` says what losing
  the client costs in each phase. **No silent wrong step**: a collective of a step
  runs only over the members the step began with (:meth:`Lifecycle.admits`; a retry
  on a smaller or larger view would mix contributions computed for another member
  set) — otherwise the step is aborted (``StepAborted``, nothing ran) and a vote on
  it is False (:meth:`Lifecycle.vote`), unless ``begin_step(allow_partial=True)``;
* **a data-plane group** (:data:`GROUP_TRANSITIONS`, one per view and rebuild):
  ``building`` → ``ready`` → ``exchanged`` (state exchange done: collectives may run)
  → ``broken`` (a collective failed) → ``retired``; or ``building`` → ``failed``.
  :func:`after_break` decides what follows a broken or failed group: wait for the newer
  view, rejoin, or rebuild the same view as the next *generation* (a peer that broke
  the contract is alive: the group must be usable again without a view change);
* **presence** (:data:`PRESENCE_TRANSITIONS`): ``joining`` → ``member`` → ``evicted``
  / ``left`` / ``cycling`` (a client lost mid-step: leave, then join again) →
  ``rejoining`` → ``member``; ``closed`` from anywhere. One rejoin policy for every
  way back: attempts ``join_timeout`` long, spaced by :func:`rejoin_delay`.

:class:`Lifecycle` holds one member's current phases and the facts the rules need
(step number, the members the step began with, contributors seen, the epoch to vote
with, the state sync this ``begin_step`` received). Threads only feed it events — the
caller's thread (steps, collectives, votes), the agent's (views, eviction), the
installer (builds), the daemon's (client lost) — under the elastic group's lock, and
carry out the actions it returns. It is driven in tests with a fake clock and no
sockets.

This module must never do I/O, read a clock of its own, start threads or import the
data plane.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from phalanx.errors import IllegalTransition

__all__ = [
    "GROUP_TRANSITIONS",
    "ON_CLIENT_LOST",
    "PRESENCE_TRANSITIONS",
    "STEP_TRANSITIONS",
    "GroupEvent",
    "GroupPhase",
    "Heal",
    "Lifecycle",
    "Loss",
    "Presence",
    "PresenceEvent",
    "StepEvent",
    "StepPhase",
    "after_break",
    "data_epoch",
    "rejoin_delay",
    "split_epoch",
]


# ----------------------------------------------------------------------------- the step


class StepPhase(enum.Enum):
    NONE = "none"  # no step open: collectives outside steps cost nothing if the client goes
    BEGUN = "begun"  # begin_step returned; no collective in this step yet
    RUNNING = "running"  # a collective ran (or runs) in this step: nobody can finish it alone
    APPLYING = "applying"  # committed True with state attached: being changed in place


class StepEvent(enum.Enum):
    BEGIN = "begin"  # begin_step
    OP = "op"  # a collective starts while steps are in use
    FREE_OP = "free-op"  # a collective starts and this client never used steps
    COMMIT_APPLY = "commit-apply"  # commit returned True and state is attached
    COMMIT_DONE = "commit-done"  # commit returned False, or True with no state attached
    UPDATE = "update"  # update_state: the attached arrays hold the new step
    VOID = "void"  # the step is gone: StepAborted, the member left/rejoined, client lost


_S, _SE = StepPhase, StepEvent

#: (phase, event) -> next phase
STEP_TRANSITIONS: Mapping[tuple[StepPhase, StepEvent], StepPhase] = MappingProxyType(
    {
        (_S.NONE, _SE.BEGIN): _S.BEGUN,
        (_S.NONE, _SE.OP): _S.RUNNING,
        (_S.NONE, _SE.FREE_OP): _S.NONE,
        (_S.NONE, _SE.COMMIT_APPLY): _S.APPLYING,
        (_S.NONE, _SE.COMMIT_DONE): _S.NONE,
        (_S.NONE, _SE.UPDATE): _S.NONE,
        (_S.NONE, _SE.VOID): _S.NONE,
        (_S.BEGUN, _SE.BEGIN): _S.BEGUN,
        (_S.BEGUN, _SE.OP): _S.RUNNING,
        (_S.BEGUN, _SE.COMMIT_APPLY): _S.APPLYING,
        (_S.BEGUN, _SE.COMMIT_DONE): _S.NONE,
        (_S.BEGUN, _SE.UPDATE): _S.NONE,
        (_S.BEGUN, _SE.VOID): _S.NONE,
        # a new begin_step without a vote abandons the step (StepAborted, ViewChanged)
        (_S.RUNNING, _SE.BEGIN): _S.BEGUN,
        (_S.RUNNING, _SE.OP): _S.RUNNING,
        (_S.RUNNING, _SE.COMMIT_APPLY): _S.APPLYING,
        (_S.RUNNING, _SE.COMMIT_DONE): _S.NONE,
        (_S.RUNNING, _SE.UPDATE): _S.NONE,
        (_S.RUNNING, _SE.VOID): _S.NONE,
        # until update_state the arrays are half-changed: collectives and votes keep it so
        (_S.APPLYING, _SE.OP): _S.APPLYING,
        (_S.APPLYING, _SE.COMMIT_APPLY): _S.APPLYING,
        (_S.APPLYING, _SE.COMMIT_DONE): _S.APPLYING,
        (_S.APPLYING, _SE.UPDATE): _S.NONE,
        (_S.APPLYING, _SE.VOID): _S.NONE,
        # begin_step without update_state: the state's hashes are dropped (see begin)
        (_S.APPLYING, _SE.BEGIN): _S.BEGUN,
    }
)


class Loss(enum.Enum):
    """What losing the client (its connection closed without a goodbye) costs."""

    NOTHING = "nothing"  # at a boundary: the restarted process simply goes on
    CYCLE = "cycle"  # mid-step: leave and rejoin, so the others' ops and votes fail over
    CYCLE_AND_RESYNC = "cycle-and-resync"  # as above; the state was half-changed: receive it


#: step phase -> what losing the client costs
ON_CLIENT_LOST: Mapping[StepPhase, Loss] = MappingProxyType(
    {
        _S.NONE: Loss.NOTHING,
        _S.BEGUN: Loss.NOTHING,
        _S.RUNNING: Loss.CYCLE,
        _S.APPLYING: Loss.CYCLE_AND_RESYNC,
    }
)


# ----------------------------------------------------------------------------- a data-plane group


class GroupPhase(enum.Enum):
    BUILDING = "building"
    READY = "ready"  # links up; the state exchange has not run
    EXCHANGED = "exchanged"  # collectives may run
    BROKEN = "broken"  # a collective (or the exchange) failed here
    FAILED = "failed"  # the build failed
    RETIRED = "retired"  # closed: a newer view or generation replaced it


class GroupEvent(enum.Enum):
    BUILT = "built"
    BUILD_FAILED = "build-failed"
    EXCHANGED = "exchanged"
    OP_FAILED = "op-failed"
    RETIRE = "retire"


_G, _GE = GroupPhase, GroupEvent

#: (phase, event) -> next phase
GROUP_TRANSITIONS: Mapping[tuple[GroupPhase, GroupEvent], GroupPhase] = MappingProxyType(
    {
        (_G.BUILDING, _GE.BUILT): _G.READY,
        (_G.BUILDING, _GE.BUILD_FAILED): _G.FAILED,
        (_G.BUILDING, _GE.RETIRE): _G.RETIRED,
        (_G.READY, _GE.EXCHANGED): _G.EXCHANGED,
        (_G.READY, _GE.OP_FAILED): _G.BROKEN,
        (_G.READY, _GE.RETIRE): _G.RETIRED,
        (_G.EXCHANGED, _GE.OP_FAILED): _G.BROKEN,
        (_G.EXCHANGED, _GE.RETIRE): _G.RETIRED,
        (_G.BROKEN, _GE.OP_FAILED): _G.BROKEN,
        (_G.BROKEN, _GE.RETIRE): _G.RETIRED,
        (_G.FAILED, _GE.RETIRE): _G.RETIRED,
        (_G.RETIRED, _GE.RETIRE): _G.RETIRED,
        (_G.RETIRED, _GE.OP_FAILED): _G.RETIRED,
    }
)


class Heal(enum.Enum):
    """What follows a broken or failed data-plane group."""

    NOTHING = "nothing"  # closed, or left on purpose
    WAIT_VIEW = "wait-view"  # a newer view is known: its group replaces this one
    REJOIN = "rejoin"  # evicted: the presence table's rejoin policy brings us back
    REBUILD = "rebuild"  # same view, next generation: every member rebuilds


def after_break(presence: Presence, *, newer_view: bool) -> Heal:
    """The rule for a group that broke (an op failed) or failed to build."""
    if presence in (Presence.CLOSED, Presence.LEFT, Presence.JOINING):
        return Heal.NOTHING
    if presence in (Presence.EVICTED, Presence.REJOINING, Presence.CYCLING):
        return Heal.REJOIN
    if newer_view:
        return Heal.WAIT_VIEW
    return Heal.REBUILD


#: a data-plane group's id on the wire: the view epoch below bit 48, the generation
#: (rebuilds of that view) in bits 48..61; bit 62 marks a state-transfer side group
GENERATION_SHIFT = 48
MAX_GENERATION = (1 << 14) - 1
SIDE_BIT = 1 << 62
_VIEW_MASK = (1 << GENERATION_SHIFT) - 1


def data_epoch(view_epoch: int, generation: int) -> int:
    """The wire epoch of ``view_epoch``'s group, rebuilt ``generation`` times (the view
    epoch itself for the first build, so a group that never broke is what it was)."""
    if not 0 <= view_epoch <= _VIEW_MASK:
        raise ValueError(f"view epoch {view_epoch} does not fit in {GENERATION_SHIFT} bits")
    if not 0 <= generation <= MAX_GENERATION:
        raise ValueError(f"generation {generation} out of range")
    return view_epoch | (generation << GENERATION_SHIFT)


def split_epoch(epoch: int) -> tuple[int, int, bool]:
    """(view epoch, generation, side group?) of a wire epoch; ordered like the tuple."""
    return (
        epoch & _VIEW_MASK,
        (epoch >> GENERATION_SHIFT) & MAX_GENERATION,
        bool(epoch & SIDE_BIT),
    )


# ----------------------------------------------------------------------------- presence


class Presence(enum.Enum):
    JOINING = "joining"  # not in the group yet (before the first join)
    MEMBER = "member"
    EVICTED = "evicted"  # removed by the group; the rejoin policy may bring us back
    LEFT = "left"  # left on purpose: no automatic return (rejoin() brings us back)
    CYCLING = "cycling"  # leaving on purpose to come back (client lost mid-step, a state
    # that failed verification: see ElasticGroup._cycle)
    REJOINING = "rejoining"  # a join attempt of a new incarnation is under way
    CLOSED = "closed"


class PresenceEvent(enum.Enum):
    JOINED = "joined"
    EVICTED = "evicted"
    LEAVE = "leave"
    CYCLE = "cycle"
    REJOIN = "rejoin"  # an attempt starts
    REJOIN_FAILED = "rejoin-failed"
    CLOSE = "close"


_P, _PE = Presence, PresenceEvent

#: (presence, event) -> next presence
PRESENCE_TRANSITIONS: Mapping[tuple[Presence, PresenceEvent], Presence] = MappingProxyType(
    {
        (_P.JOINING, _PE.JOINED): _P.MEMBER,
        (_P.JOINING, _PE.CLOSE): _P.CLOSED,
        (_P.JOINING, _PE.LEAVE): _P.LEFT,
        (_P.JOINING, _PE.EVICTED): _P.EVICTED,  # removed before admission
        (_P.JOINING, _PE.REJOIN): _P.REJOINING,
        (_P.MEMBER, _PE.EVICTED): _P.EVICTED,
        (_P.MEMBER, _PE.LEAVE): _P.LEFT,
        (_P.MEMBER, _PE.CYCLE): _P.CYCLING,
        (_P.MEMBER, _PE.CLOSE): _P.CLOSED,
        (_P.MEMBER, _PE.JOINED): _P.MEMBER,
        (_P.MEMBER, _PE.REJOIN): _P.REJOINING,  # a new incarnation on purpose
        (_P.EVICTED, _PE.EVICTED): _P.EVICTED,
        (_P.EVICTED, _PE.REJOIN): _P.REJOINING,
        (_P.EVICTED, _PE.LEAVE): _P.LEFT,
        (_P.EVICTED, _PE.CLOSE): _P.CLOSED,
        (_P.LEFT, _PE.REJOIN): _P.REJOINING,
        (_P.LEFT, _PE.EVICTED): _P.LEFT,
        (_P.LEFT, _PE.LEAVE): _P.LEFT,
        (_P.LEFT, _PE.CLOSE): _P.CLOSED,
        (_P.CYCLING, _PE.REJOIN): _P.REJOINING,
        (_P.CYCLING, _PE.EVICTED): _P.CYCLING,
        (_P.CYCLING, _PE.LEAVE): _P.LEFT,
        (_P.CYCLING, _PE.CLOSE): _P.CLOSED,
        (_P.REJOINING, _PE.JOINED): _P.MEMBER,
        (_P.REJOINING, _PE.REJOIN_FAILED): _P.EVICTED,
        (_P.REJOINING, _PE.EVICTED): _P.REJOINING,  # the old incarnation's removal, late
        (_P.REJOINING, _PE.LEAVE): _P.LEFT,
        (_P.REJOINING, _PE.CLOSE): _P.CLOSED,
        (_P.CLOSED, _PE.CLOSE): _P.CLOSED,
        (_P.CLOSED, _PE.EVICTED): _P.CLOSED,
        (_P.CLOSED, _PE.LEAVE): _P.CLOSED,
    }
)

#: first wait between rejoin attempts, doubling per failed attempt up to the cap
REJOIN_FIRST_DELAY_S = 0.2
REJOIN_MAX_DELAY_S = 5.0


#: a data-plane group that failed to *build* is rebuilt after this, doubling per
#: consecutive failure up to REBUILD_MAX_DELAY_S (an op that broke is rebuilt at once)
REBUILD_FIRST_DELAY_S = 0.05
REBUILD_MAX_DELAY_S = 1.0


def rebuild_delay(failed_builds: int) -> float:
    """Seconds to wait before building a view's next generation after ``failed_builds``
    consecutive builds of it failed (0 when none did). A build fails when a peer does not
    answer the handshake -- it is gone, or not in this view -- and trying again at once
    repeated it thousands of times in 20 s (30-minute soak, stop 22), sending a refused
    failure report each time and keeping the installer from the rejoin it owed."""
    if failed_builds <= 0:
        return 0.0
    return _doubling(REBUILD_FIRST_DELAY_S, failed_builds, REBUILD_MAX_DELAY_S)


def rejoin_delay(failed_attempts: int) -> float:
    """Seconds to wait before the next rejoin attempt (0 for the first)."""
    if failed_attempts <= 0:
        return 0.0
    return _doubling(REJOIN_FIRST_DELAY_S, failed_attempts, REJOIN_MAX_DELAY_S)


def _doubling(first: float, n: int, most: float) -> float:
    """``first`` doubled ``n - 1`` times, at most ``most``. The exponent is capped: a
    count that grows for hours (a coordinator away, a source that never hashes
    again) would otherwise make ``2 ** n`` too large for a float (OverflowError from
    n = 1025)."""
    return float(min(first * 2.0 ** min(n - 1, 60), most))


_K = TypeVar("_K", StepPhase, GroupPhase, Presence)
_E = TypeVar("_E", StepEvent, GroupEvent, PresenceEvent)


def _move(table: Mapping[tuple[_K, _E], _K], phase: _K, event: _E) -> _K:
    try:
        return table[(phase, event)]
    except KeyError:
        raise IllegalTransition(f"no transition from {phase.value} on {event.value}") from None


def group_transition(phase: GroupPhase, event: GroupEvent) -> GroupPhase:
    return _move(GROUP_TRANSITIONS, phase, event)


# ----------------------------------------------------------------------------- one member


@dataclass(frozen=True)
class Vote:
    """What to vote for a step: ``ok`` and the ``epoch`` to vote in; ``why`` a False
    the caller did not ask for."""

    ok: bool
    epoch: int
    why: str = ""


class Lifecycle:
    """One member's step and presence (see the module docstring). Not thread-safe:
    the owner feeds it under its own lock; ``now`` values come from the owner's clock.
    """

    def __init__(self, *, auto_rejoin: bool) -> None:
        self.auto_rejoin = auto_rejoin
        self.presence = Presence.JOINING
        self.failed_rejoins = 0
        self.next_rejoin_at: float | None = None  # when the rejoin policy tries again
        self.cycled = False  # out because a client was lost mid-step (not evicted)
        self.step_phase = StepPhase.NONE
        self.step = -1  # the step begin_step opened (-1: none yet)
        self.members: tuple[str, ...] | None = None  # whom the step began with
        self.begin_epoch: int | None = None  # the view it began in
        self.step_epoch: int | None = None  # epoch of the step's first successful op
        self.done = 0  # collectives finished in this step
        self.partial = False  # an op of this step ran over other contributors (allowed)
        self.allow_partial = False
        self.aborted: tuple[int, int] | None = None  # (step, epoch it began in) aborted
        self.steps_used = False  # this client called begin_step or commit
        self.synced_bytes: int | None = None  # state received by the running begin_step

    # -- the step --------------------------------------------------------------------
    def _step(self, event: StepEvent) -> None:
        self.step_phase = _move(STEP_TRANSITIONS, self.step_phase, event)

    def begin(self, step: int, members: tuple[str, ...], *, allow_partial: bool) -> bool:
        """A ``begin_step``: a new step over ``members``. True when the state's cached
        hashes must be dropped (begin_step came before ``update_state``)."""
        stale = self.step_phase is StepPhase.APPLYING
        self._step(StepEvent.BEGIN)
        self.steps_used = True
        self.step = step
        self.members = members
        self.begin_epoch = None
        self.aborted = None
        self.step_epoch = None
        self.done = 0
        self.partial = False
        self.allow_partial = allow_partial
        self.synced_bytes = None
        return stale

    def begin_members(
        self, members: tuple[str, ...], epoch: int, *, step: int | None = None
    ) -> None:
        """The view ``begin_step`` ends in (it may install a newer one than it began in).
        ``step``: the step of the state its exchange left here, when the caller let the
        state name the step (a newcomer began at its empty state's -1 and received the
        group's): the position later exchanges of this step compare, and the step an
        abort of it forces a False vote on."""
        self.members = members
        self.begin_epoch = epoch
        if step is not None:
            self.step = step

    def admits(self, members: tuple[str, ...]) -> bool:
        """May a collective of the open step run over ``members`` (the view's)? Not
        when the step began with other members, unless partial steps are allowed."""
        if self.step_phase not in (StepPhase.BEGUN, StepPhase.RUNNING):
            return True
        return self.members is None or self.members == members or self.allow_partial

    def abort_step(self) -> None:
        """The open step cannot go on (StepAborted): it is void, and a vote on it is
        False, cast in the view it began in (a round the redo never uses)."""
        if self.step_phase in (StepPhase.BEGUN, StepPhase.RUNNING):
            self.aborted = (self.step, self.begin_epoch if self.begin_epoch is not None else -1)
        self.void()

    def op_started(self) -> None:
        self._step(StepEvent.OP if self.steps_used else StepEvent.FREE_OP)

    def op_succeeded(self, epoch: int, contributors: tuple[str, ...]) -> None:
        """A collective completed over ``contributors`` in the view of ``epoch``."""
        if self.step_phase is StepPhase.NONE:
            return  # outside steps: nothing to remember
        self.done += 1
        if self.step_epoch is None:
            self.step_epoch = epoch
        if self.members is None:
            self.members = contributors  # a step opened by its first collective
        elif contributors != self.members:
            self.partial = True

    def vote(self, step: int, ok: bool, current_epoch: int) -> Vote:
        """The vote for ``step``: in the epoch of its first successful collective (a
        step whose collectives ran in two views is then never committed); False —
        whatever the caller says — for a step that was aborted, cast in the epoch it
        began in (see :meth:`abort_step`), so that the step's redo gets a fresh round."""
        self.steps_used = True
        if self.aborted is not None and self.aborted[0] == step:
            epoch = self.aborted[1] if self.aborted[1] >= 0 else current_epoch
            return Vote(False, epoch, "the step was aborted: it never ran over its members")
        epoch = self.step_epoch if self.step_epoch is not None else current_epoch
        return Vote(ok, epoch)

    def decided(self, committed: bool, *, state_attached: bool) -> None:
        self.aborted = None
        apply = committed and state_attached
        self._step(StepEvent.COMMIT_APPLY if apply else StepEvent.COMMIT_DONE)
        self._reset_step()

    def updated(self) -> None:
        self._step(StepEvent.UPDATE)

    def void(self) -> None:
        """The step is gone (StepAborted; left; rejoined): no vote, begin again."""
        self._step(StepEvent.VOID)
        self._reset_step()

    def _reset_step(self) -> None:
        self.members = None
        self.step_epoch = None
        self.done = 0
        self.partial = False

    def client_lost(self) -> Loss:
        """The client's connection closed without a goodbye: what it costs (the step
        is void from now on; a fresh client starts outside steps)."""
        loss = ON_CLIENT_LOST[self.step_phase]
        self.void()
        self.steps_used = False
        return loss

    def client_closed(self) -> bool:
        """The client said goodbye: the step (if any) is void and a fresh client
        starts outside steps. True when the state was left half-changed (committed,
        not updated): it must be received again."""
        half = self.step_phase is StepPhase.APPLYING
        self.void()
        self.steps_used = False
        return half

    def coming_back(self) -> bool:
        """Out of the group because a client was lost mid-step, and on the way back
        (a restarted client's calls wait for it; an eviction is reported instead)."""
        return self.cycled and self.presence in (
            Presence.CYCLING,
            Presence.REJOINING,
            Presence.EVICTED,
        )

    # -- presence --------------------------------------------------------------------
    def _presence(self, event: PresenceEvent) -> None:
        self.presence = _move(PRESENCE_TRANSITIONS, self.presence, event)

    def joined(self) -> None:
        self._presence(PresenceEvent.JOINED)
        self.failed_rejoins = 0
        self.next_rejoin_at = None
        self.cycled = False

    def evicted(self, now: float) -> bool:
        """The group removed this incarnation. True when the rejoin policy should
        start a rejoin (at :attr:`next_rejoin_at`)."""
        before = self.presence
        self._presence(PresenceEvent.EVICTED)
        self.void()
        if (
            self.presence is Presence.EVICTED
            and before is not Presence.EVICTED
            and self.auto_rejoin
        ):
            self.next_rejoin_at = now
            return True
        return False

    def leave(self) -> None:
        """Leaving on purpose: no automatic return."""
        self._presence(PresenceEvent.LEAVE)
        self.next_rejoin_at = None
        self.void()

    def cycle(self) -> None:
        """Leave to come back (a client lost mid-step): the rejoin is due once the
        leave is through (:meth:`cycle_left`), never while it is still in flight."""
        self._presence(PresenceEvent.CYCLE)
        self.next_rejoin_at = None
        self.cycled = True

    def cycle_left(self, now: float) -> None:
        """The leave of a :meth:`cycle` is through: come back at ``now`` (the caller's
        clock plus any delay it chose)."""
        if self.presence is Presence.CYCLING:
            self.next_rejoin_at = now

    def rejoin_started(self) -> None:
        self._presence(PresenceEvent.REJOIN)
        self.next_rejoin_at = None
        self.void()

    def rejoin_failed(self, now: float) -> float | None:
        """An attempt failed; when to try again (None: no automatic retry)."""
        self._presence(PresenceEvent.REJOIN_FAILED)
        self.failed_rejoins += 1
        if not (self.auto_rejoin or self.cycled):
            return None
        self.next_rejoin_at = now + rejoin_delay(self.failed_rejoins)
        return self.next_rejoin_at

    def close(self) -> None:
        self._presence(PresenceEvent.CLOSE)
        self.next_rejoin_at = None

    def rejoin_due(self, now: float) -> bool:
        """The rejoin policy: is an attempt due now?"""
        return self.rejoin_wait(now) == 0.0

    def rejoin_wait(self, now: float) -> float | None:
        """Seconds until the next rejoin attempt is due (0.0: now); None while none is
        scheduled (a member, a leave in flight, no automatic retry)."""
        if self.presence not in (Presence.EVICTED, Presence.CYCLING):
            return None
        if self.next_rejoin_at is None:
            return None
        return max(0.0, self.next_rejoin_at - now)

"""The coordinator's bookkeeping: members, heartbeats, suspicions, joins, commit rounds.

:class:`GroupState` is a plain object driven by method calls that pass the current
(monotonic) time in; it never reads clocks, sleeps, locks or touches the network, so
every rule here is testable with a fake clock. The gRPC servicer in
``coordinator.py`` owns one instance behind a lock and turns refusals
(:class:`Rejected`) into gRPC statuses.

Rules (docs/membership.md explains them):
  * failure: no heartbeat for ``heartbeat_timeout``; or a suspicion (peer report,
    lost Watch stream, a higher incarnation asking to join) not refuted by a
    heartbeat within ``confirm_window``. Both, and the heartbeat interval, are those
    of the group's pace (``pacing.py``): doubled as often as a large group needs to
    keep its beats within ``max_beat_rate``. When more than half of the view (two or
    more) falls silent in the same tick, the likelier cause is on this side (the
    coordinator starved of CPU, its host's network) rather than that many deaths at
    once: they get one more ``heartbeat_timeout`` and only those still silent then
    are removed (soak, seed 20261206: four of four members failed in one tick, the
    view was left to newcomers without the training state).
  * admission: joiners enter the view right after a commit decision (the operation
    boundary), or at once when the group is not stepping (no decision within
    ``step_window`` and no round open), or at the latest after ``admit_deadline``.
    Joins that arrive within ``join_batch`` of the last admission (in a group past the
    first pace level: one heartbeat interval) wait for a later tick and enter
    together: a cluster of N starting at once is a handful of views, not N views each
    sent to every member (N^2 watch events).
  * commit: one decision per (epoch, step), remembered; a vote for an epoch that is
    not current is answered "not committed" unless that round was already decided --
    but only for epochs this instance published itself. For an older epoch (one a
    restarted coordinator adopted, or whose decisions were dropped from memory) a
    predecessor may have decided either way, so the answer is UNKNOWN (not committed,
    and the caller must not treat it as "no": found by the churn soak, seed 20261122);
    so is a round of such an epoch that times out (``commit_timeout``).
  * restart: the coordinator starts in recovery; the highest view peers report is
    adopted without an epoch change; members that do not re-register within
    ``recovery_grace`` are failed; votes wait until recovery ends (no round times
    out meanwhile; their ``commit_timeout`` counts from its end). The first view it
    publishes is numbered at least ``epoch_floor`` (the coordinator passes the wall
    clock in milliseconds): a restarted coordinator cannot know every epoch its
    predecessors used -- when no peer re-registers in time it knows none -- and
    counting up again from what it adopted (or from 1) reused epochs that had run
    ops (found by the churn soak, seed 20261126: a lone joiner got epoch 1 again).

It must never raise anything but :class:`Rejected` / :class:`IllegalTransition` to
its caller, and never publish two different views with one epoch.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from phalanx.membership.config import MembershipConfig
from phalanx.membership.errors import Evicted, Rejected, RejectReason
from phalanx.membership.pacing import Pace, Pacer
from phalanx.membership.view import (
    IN_VIEW_STATES,
    Change,
    ChangeKind,
    Member,
    MemberEvent,
    MemberState,
    View,
    next_view,
    recovery_epoch,
    transition,
)

__all__ = ["Decision", "GroupState", "Outcome", "Published", "ViewCause"]

log = logging.getLogger(__name__)

_MAX_TOMBSTONES = 4096
_MAX_DECISIONS = 4096


class Outcome(enum.Enum):
    ALL_OK = 1
    MEMBER_FAILED = 2
    VIEW_CHANGED = 3
    TIMEOUT = 4
    UNKNOWN = 5  # a round of an epoch this instance did not witness; see vote()


class ViewCause(enum.Enum):
    SNAPSHOT = 1
    JOIN = 2
    LEAVE = 3
    FAILURE = 4
    RECOVERY = 5


@dataclass(frozen=True)
class Decision:
    """The group's answer for one (epoch, step)."""

    epoch: int
    step: int
    committed: bool
    outcome: Outcome = Outcome.ALL_OK


@dataclass(frozen=True)
class Published:
    """A view as published, with why it changed."""

    view: View
    cause: ViewCause
    removed: tuple[tuple[str, str], ...] = ()  # (id, cause)
    seq: int = 0


@dataclass
class _Entry:
    member: Member
    state: MemberState
    last_beat: float | None  # None: adopted from a reported view, not re-registered yet
    since: float  # when it joined (JOINING) or entered its current state
    suspected_at: float | None = None
    suspicion: str = ""
    removal_cause: str = ""
    # independent signals behind the current suspicion: "stream" and "report:<id>"
    signals: set[str] = field(default_factory=set)


@dataclass
class _Round:
    epoch: int
    step: int
    opened: float
    votes: dict[str, bool] = field(default_factory=dict)


class GroupState:
    """See the module docstring. Not thread-safe: the caller serializes calls."""

    def __init__(
        self,
        config: MembershipConfig,
        now: float,
        *,
        recovering: bool = True,
        epoch_floor: int = 0,
    ) -> None:
        self.config = config
        self._recovering = recovering and config.recovery_grace > 0
        #: the lowest epoch this instance may publish (see the module docstring); a
        #: group known to be new (``recovering=False``) counts from 1 whatever it is
        #: given. A recovery grace of 0 only skips the wait for re-registrations: the
        #: floor stays (it dropped with it, and a coordinator restarted with
        #: ``--recovery-grace 0`` numbered a lone newcomer's view 1 again)
        self.epoch_floor = epoch_floor if recovering else 0
        self._entries: dict[str, _Entry] = {}
        self._tombstones: OrderedDict[str, tuple[int, MemberState]] = OrderedDict()
        self._decisions: OrderedDict[tuple[int, int], Decision] = OrderedDict()
        self._rounds: dict[tuple[int, int], _Round] = {}
        # Epochs this instance published itself (bounded; oldest dropped): only for
        # those does it know every decision. Epochs <= _forgotten_upto lost some.
        self._witnessed: OrderedDict[int, None] = OrderedDict()
        self._forgotten_upto = 0
        self._last_decision_at: float | None = None
        self._last_admit_at: float | None = None
        self._published = Published(View(0), ViewCause.SNAPSHOT)
        self._published_anything = False
        self._recovery_deadline = now + config.recovery_grace
        # a mass silence being waited out: (since, until) -- see tick()
        self._silence: tuple[float, float] | None = None
        self._pacer = Pacer(config)
        #: Grows on every publication, adoption or decision (waiters compare it).
        self.revision = 0

    # -- read side ---------------------------------------------------------------

    @property
    def view(self) -> View:
        return self._published.view

    @property
    def pace(self) -> Pace:
        """The heartbeat pace members are told now (``pacing.py``)."""
        return self._pacer.told

    @property
    def published(self) -> Published:
        return self._published

    @property
    def recovering(self) -> bool:
        return self._recovering

    def state_of(self, member_id: str, incarnation: int) -> MemberState | None:
        """The state of that incarnation; terminal states come from tombstones."""
        entry = self._entries.get(member_id)
        if entry is not None and entry.member.incarnation == incarnation:
            return entry.state
        tomb = self._tombstones.get(member_id)
        if tomb is not None and incarnation <= tomb[0]:
            return tomb[1] if incarnation == tomb[0] else MemberState.EVICTED
        return None

    def pending_ids(self) -> tuple[str, ...]:
        return tuple(e.member.id for e in self._entries.values() if e.state is MemberState.JOINING)

    def decision(self, epoch: int, step: int) -> Decision | None:
        return self._decisions.get((epoch, step))

    # -- sender checks ---------------------------------------------------------------

    def check_sender(self, member_id: str, incarnation: int) -> _Entry:
        """The live entry of (id, incarnation), or the matching refusal."""
        entry = self._entries.get(member_id)
        if entry is not None and entry.member.incarnation == incarnation:
            return entry
        state = self.state_of(member_id, incarnation)
        if state is not None and state is not MemberState.LEFT:
            raise Evicted(f"{member_id}#{incarnation} was removed ({state.value})")
        if state is MemberState.LEFT:
            raise Rejected(RejectReason.NOT_MEMBER, f"{member_id}#{incarnation} left the group")
        if entry is not None and entry.member.incarnation > incarnation:
            raise Rejected(
                RejectReason.STALE_INCARNATION,
                f"{member_id} is at incarnation {entry.member.incarnation} > {incarnation}",
            )
        raise Rejected(RejectReason.NOT_MEMBER, f"{member_id}#{incarnation} is not known here")

    # -- join / leave ------------------------------------------------------------

    def join(
        self,
        member: Member,
        known_view: View,
        last_decision: Decision | None,
        now: float,
    ) -> tuple[View, bool]:
        """Fresh join or re-registration; returns (current view, admitted?)."""
        if last_decision is not None:
            self._seed_decision(last_decision, now)
        tomb = self._tombstones.get(member.id)
        if tomb is not None and member.incarnation <= tomb[0]:
            if tomb[1] is MemberState.LEFT and member.incarnation == tomb[0]:
                raise Rejected(
                    RejectReason.STALE_INCARNATION,
                    f"{member.id}#{member.incarnation} left; rejoin with a higher incarnation",
                )
            raise Evicted(f"{member.id}#{member.incarnation} was removed; rejoin with a higher one")
        entry = self._entries.get(member.id)
        if entry is not None:
            old = entry.member
            if old.incarnation == member.incarnation:
                if old != member:
                    raise Rejected(
                        RejectReason.DUPLICATE_ID,
                        f"{member.id}#{member.incarnation} already joined with other addresses",
                    )
                if entry.last_beat is None:
                    log.info("event=reregistered member=%s epoch=%d", member.id, self.view.epoch)
                entry.last_beat = now
                self._maybe_reported_view(member, known_view, now)
                self._maybe_end_recovery(now)
                return self.view, entry.state in IN_VIEW_STATES
            if old.incarnation > member.incarnation:
                raise Rejected(
                    RejectReason.STALE_INCARNATION,
                    f"{member.id} is at incarnation {old.incarnation} > {member.incarnation}",
                )
            # A higher incarnation of a live id: the old process probably restarted.
            if entry.state is MemberState.JOINING:
                self._bury(entry, MemberState.EVICTED, "replaced")
                del self._entries[member.id]
            else:
                if entry.state is MemberState.ACTIVE:
                    self._suspect(entry, now, "replaced-by-higher-incarnation")
                raise Rejected(
                    RejectReason.DUPLICATE_ID,
                    f"{member.id} is held by live incarnation {old.incarnation}; "
                    "retry once it is confirmed dead",
                )
        # Unknown id (or a replaced joiner).
        if known_view.epoch > 0 and self._handle_reregistration(member, known_view, now):
            self._repace(now)
            self._maybe_end_recovery(now)
            return self.view, True
        if len(self._entries) >= self.config.max_members:
            raise Rejected(RejectReason.GROUP_FULL, f"{len(self._entries)} members and joiners")
        state = transition(None, MemberEvent.JOIN)
        self._entries[member.id] = _Entry(member, state, now, now)
        self._repace(now)
        log.info(
            "event=join_requested member=%s incarnation=%d epoch=%d",
            member.id,
            member.incarnation,
            self.view.epoch,
        )
        if not self._admitted_lately(now):  # else a later tick admits it with the others
            self._maybe_admit(now, boundary=False)
        entry = self._entries[member.id]
        return self.view, entry.state in IN_VIEW_STATES

    def _handle_reregistration(self, member: Member, known: View, now: float) -> bool:
        """A peer we do not know reports a view it holds. True if it is now a member."""
        if not known.has(member):
            return False
        if self._recovering and not self._published_anything:
            if known.epoch > self.view.epoch:
                self._adopt(known, now)
        elif known.epoch >= self.view.epoch:
            new_epoch = recovery_epoch(self.view, known)
            if new_epoch is not None and known.epoch >= self.view.epoch:
                self._bump_epoch(new_epoch, now)
        entry = self._entries.get(member.id)
        if entry is not None and entry.member == member and entry.state in IN_VIEW_STATES:
            entry.last_beat = now
            log.info("event=reregistered member=%s epoch=%d", member.id, self.view.epoch)
            return True
        if known.epoch < self.view.epoch or self._published_anything:
            # It held a view in which it was a member, and the group has moved on
            # without it: it was removed in a view it never saw.
            raise Evicted(
                f"{member.id}#{member.incarnation} is not in view {self.view.epoch} "
                f"(it reported view {known.epoch})",
                epoch=self.view.epoch,
            )
        return False

    def _adopt(self, known: View, now: float) -> None:
        """Recovery: take a reported view as the current one, without an epoch change."""
        for member_id in list(self._entries):
            entry = self._entries[member_id]
            if entry.state is not MemberState.JOINING and not known.has(entry.member):
                self._bury(entry, MemberState.EVICTED, "absent-from-adopted-view")
                del self._entries[member_id]
        for m in known.members:
            current = self._entries.get(m.id)
            if current is not None and current.member != m:
                if current.state is MemberState.JOINING:
                    del self._entries[m.id]  # a joiner that claims an adopted member's id
                    self._bury(current, MemberState.EVICTED, "id-in-adopted-view")
                else:
                    del self._entries[m.id]
                current = None
            if current is None:
                self._entries[m.id] = _Entry(m, MemberState.ACTIVE, None, now)
            elif current.state is MemberState.JOINING:
                current.state = transition(current.state, MemberEvent.ADMIT)
        self._published = Published(known, ViewCause.RECOVERY, (), self._published.seq + 1)
        self.revision += 1
        log.info("event=view_adopted epoch=%d members=%s", known.epoch, ",".join(known.ids))

    def _bump_epoch(self, epoch: int, now: float) -> None:
        view = View(epoch, self.view.members)
        self._install(view, ViewCause.RECOVERY, (), now)

    def leave(self, member_id: str, incarnation: int, reason: str, now: float) -> View:
        entry = self.check_sender(member_id, incarnation)
        entry.state = transition(entry.state, MemberEvent.LEAVE)
        log.info("event=leave member=%s reason=%s", member_id, reason or "-")
        if entry.state is MemberState.LEFT:  # it was only joining
            self._bury(entry, MemberState.LEFT, "left")
            del self._entries[member_id]
            return self.view
        self._publish([Change(ChangeKind.LEAVE, entry.member, "left")], ViewCause.LEAVE, now)
        return self.view

    # -- liveness -------------------------------------------------------------------

    def heartbeat(self, member_id: str, incarnation: int, now: float) -> int:
        entry = self.check_sender(member_id, incarnation)
        entry.last_beat = now
        # Only a beat that arrives a while after the suspicion refutes it: one that was
        # already in flight when the peer died must not (it would cost a full timeout).
        pace = self._pacer.judging(now)
        settled = now - (entry.suspected_at or now) >= pace.interval / 2
        if entry.state is MemberState.SUSPECTED and settled:
            entry.state = transition(entry.state, MemberEvent.REFUTE)
            log.info(
                "event=suspicion_refuted member=%s suspicion=%s after_s=%.3f",
                member_id,
                entry.suspicion,
                now - (entry.suspected_at or now),
            )
            entry.suspected_at = None
            entry.suspicion = ""
            entry.signals.clear()
        self._maybe_end_recovery(now)
        return self.view.epoch

    def report(
        self,
        reporter: str,
        incarnation: int,
        epoch: int,
        suspects: Iterable[str],
        reason: str,
        now: float,
    ) -> list[str]:
        entry = self.check_sender(reporter, incarnation)
        if entry.state not in IN_VIEW_STATES:
            raise Rejected(RejectReason.NOT_MEMBER, f"{reporter} is not in view {self.view.epoch}")
        if epoch != self.view.epoch:
            raise Rejected(
                RejectReason.STALE_EPOCH,
                f"report names epoch {epoch}, current is {self.view.epoch}",
            )
        entry.last_beat = now
        out = []
        for suspect_id in suspects:
            if suspect_id == reporter:
                continue
            target = self._entries.get(suspect_id)
            if target is None or target.state not in IN_VIEW_STATES:
                continue
            if target.state is MemberState.LEAVING:
                continue
            self._suspect(target, now, f"report:{reporter}:{reason or '-'}", f"report:{reporter}")
            out.append(suspect_id)
        return out

    def stream_lost(self, member_id: str, incarnation: int, now: float) -> None:
        """The member's Watch stream ended without a goodbye: suspect it."""
        entry = self._entries.get(member_id)
        if entry is None or entry.member.incarnation != incarnation:
            return
        if entry.state in (MemberState.ACTIVE, MemberState.SUSPECTED):
            self._suspect(entry, now, "watch-stream-lost", "stream")

    def _suspect(self, entry: _Entry, now: float, why: str, signal: str = "") -> None:
        first = entry.state is not MemberState.SUSPECTED
        entry.state = transition(entry.state, MemberEvent.SUSPECT)
        if first:
            entry.suspected_at = now
            entry.suspicion = why
            entry.signals.clear()
            log.info("event=suspected member=%s why=%s", entry.member.id, why)
        if signal:
            entry.signals.add(signal)

    @staticmethod
    def _corroborated(entry: _Entry) -> bool:
        """The coordinator saw the member's Watch stream die AND a peer lost its
        data-plane links to it: two independent signals that its process (or its
        network) is gone — confirmed without waiting out the window."""
        return "stream" in entry.signals and any(s.startswith("report:") for s in entry.signals)

    # -- the clock ------------------------------------------------------------------

    def _hold_mass_silence(self, now: float) -> bool:
        """True while heartbeat timeouts are held because most of the view fell silent
        at once (see the module docstring); starts such a hold when it applies."""
        timeout = self._pacer.judging(now).timeout
        if self._silence is not None:
            if now < self._silence[1]:
                return True
            self._silence = None  # waited out: whoever is still silent goes now
            return False
        in_view = [e for e in self._entries.values() if e.state in IN_VIEW_STATES]
        silent = [e for e in in_view
                  if e.last_beat is not None and now - e.last_beat >= timeout]  # fmt: skip
        if len(silent) < 2 or 2 * len(silent) <= len(in_view):
            return False
        self._silence = (now, now + timeout)
        log.warning(
            "event=mass_silence members=%s of=%d hold_s=%.3f",
            ",".join(sorted(e.member.id for e in silent)),
            len(in_view),
            timeout,
        )
        return True

    def tick(self, now: float) -> None:
        """Detect failures, confirm suspicions, end recovery, admit joiners, time out rounds."""
        cfg = self.config
        self._repace(now)
        pace = self._pacer.judging(now)
        removals: list[Change] = []
        hold = self._hold_mass_silence(now)
        for member_id in list(self._entries):
            entry = self._entries[member_id]
            if entry.last_beat is None:
                if self._recovering:
                    continue
                age = now - entry.since
            else:
                age = now - entry.last_beat
            if (
                entry.state is MemberState.SUSPECTED
                and entry.suspected_at is not None
                and (now - entry.suspected_at >= pace.confirm_window or self._corroborated(entry))
            ):
                entry.state = transition(entry.state, MemberEvent.CONFIRM)
                entry.removal_cause = f"confirmed:{entry.suspicion}"
                if now - entry.suspected_at < pace.confirm_window:
                    entry.removal_cause += "+corroborated"
                removals.append(Change(ChangeKind.FAIL, entry.member, entry.removal_cause))
                continue
            if age >= pace.timeout and not (hold and entry.state in IN_VIEW_STATES):
                was_joining = entry.state is MemberState.JOINING
                entry.state = transition(entry.state, MemberEvent.TIMEOUT)
                cause = "heartbeat-timeout" if entry.last_beat is not None else "no-reregistration"
                entry.removal_cause = cause
                if was_joining:
                    log.info("event=joiner_failed member=%s cause=%s", member_id, cause)
                    self._bury(entry, MemberState.FAILED, cause)
                    del self._entries[member_id]
                else:
                    removals.append(Change(ChangeKind.FAIL, entry.member, cause))
        if removals:
            self._publish(removals, ViewCause.FAILURE, now)
        if self._recovering and now >= self._recovery_deadline:
            self._end_recovery(now)
        # No round times out while recovering: a member that has not re-registered yet
        # may hold the predecessor's decision of it (a timeout decided False first, and
        # the seed of a True that came later was ignored: one member committed, one
        # not). A round of an epoch this instance did not witness that times out is
        # UNKNOWN, not False: the predecessor may have decided it True.
        for key, rnd in list(self._rounds.items()):
            if self._recovering:
                break
            if key in self._rounds and now - rnd.opened >= cfg.commit_timeout:
                outcome = Outcome.TIMEOUT if self._knows_all(rnd.epoch) else Outcome.UNKNOWN
                self._decide(rnd, False, outcome, now)
        if self._pacer.told.level == 0 or not self._admitted_lately(now):  # ticks batch
            self._maybe_admit(now, boundary=False)

    def _maybe_end_recovery(self, now: float) -> None:
        if not self._recovering or not self.view.members:
            return
        if all(e.last_beat is not None for e in self._entries.values()):
            self._end_recovery(now)

    def _end_recovery(self, now: float) -> None:
        self._recovering = False
        missing = [e for e in self._entries.values() if e.last_beat is None]
        log.info(
            "event=recovery_done epoch=%d members=%d missing=%s",
            self.view.epoch,
            self.view.size,
            ",".join(e.member.id for e in missing) or "-",
        )
        if missing:
            changes = []
            for entry in missing:
                entry.state = transition(entry.state, MemberEvent.TIMEOUT)
                changes.append(Change(ChangeKind.FAIL, entry.member, "no-reregistration"))
            self._publish(changes, ViewCause.FAILURE, now)
        for rnd in list(self._rounds.values()):
            # votes cast during recovery waited for it: their commit_timeout starts now
            rnd.opened = max(rnd.opened, now)
            if (rnd.epoch, rnd.step) in self._rounds:
                self._evaluate(rnd, now)

    # -- commit -------------------------------------------------------------------

    def vote(
        self,
        member_id: str,
        incarnation: int,
        epoch: int,
        step: int,
        ok: bool,
        now: float,
        last_decision: Decision | None = None,
    ) -> Decision | None:
        """Record a vote; the decision if there is one already, else None (wait)."""
        if last_decision is not None:
            self._seed_decision(last_decision, now)
        known = self._decisions.get((epoch, step))
        if known is not None:
            return known
        entry = self.check_sender(member_id, incarnation)
        if epoch == self.view.epoch and entry.state not in IN_VIEW_STATES:
            raise Rejected(RejectReason.NOT_MEMBER, f"{member_id} is not in view {epoch}")
        if epoch > self.view.epoch:
            raise Rejected(
                RejectReason.STALE_EPOCH, f"vote names epoch {epoch} > current {self.view.epoch}"
            )
        key = (epoch, step)
        rnd = self._rounds.get(key)
        if rnd is None:
            if epoch < self.view.epoch and not self._recovering and not self._knows_all(epoch):
                # Not remembered: a later seed of the real decision must still win.
                log.info(
                    "event=commit_unknown member=%s epoch=%d step=%d current=%d",
                    member_id,
                    epoch,
                    step,
                    self.view.epoch,
                )
                return Decision(epoch, step, False, Outcome.UNKNOWN)
            rnd = self._rounds[key] = _Round(epoch, step, now)
        rnd.votes[member_id] = rnd.votes.get(member_id, True) and ok
        return self._evaluate(rnd, now)

    def _evaluate(self, rnd: _Round, now: float) -> Decision | None:
        if self._recovering:
            return None  # the history may still be incomplete
        if rnd.epoch != self.view.epoch:
            return self._decide(rnd, False, self._moved_on(rnd.epoch), now)
        if not all(rnd.votes.values()):
            return self._decide(rnd, False, Outcome.MEMBER_FAILED, now)
        if all(m.id in rnd.votes for m in self.view.members):
            return self._decide(rnd, True, Outcome.ALL_OK, now)
        return None

    def _knows_all(self, epoch: int) -> bool:
        """Does this instance know every decision made in ``epoch``?"""
        return epoch in self._witnessed and epoch > self._forgotten_upto

    def _moved_on(self, epoch: int) -> Outcome:
        """The outcome of an open round of ``epoch`` once the view left that epoch."""
        return Outcome.VIEW_CHANGED if self._knows_all(epoch) else Outcome.UNKNOWN

    def _decide(self, rnd: _Round, committed: bool, outcome: Outcome, now: float) -> Decision:
        decision = Decision(rnd.epoch, rnd.step, committed, outcome)
        self._rounds.pop((rnd.epoch, rnd.step), None)
        self._remember(decision)
        self._last_decision_at = now
        log.info(
            "event=commit_decided epoch=%d step=%d committed=%s outcome=%s voters=%s",
            rnd.epoch,
            rnd.step,
            committed,
            outcome.name,
            ",".join(sorted(rnd.votes)) or "-",
        )
        self._maybe_admit(now, boundary=True)
        return decision

    def _remember(self, decision: Decision) -> None:
        self._decisions[(decision.epoch, decision.step)] = decision
        self.revision += 1
        while len(self._decisions) > _MAX_DECISIONS:
            (epoch, _), _ = self._decisions.popitem(last=False)
            self._forgotten_upto = max(self._forgotten_upto, epoch)

    def _seed_decision(self, decision: Decision, now: float) -> None:
        key = (decision.epoch, decision.step)
        known = self._decisions.get(key)
        if known is not None and known.outcome is not Outcome.UNKNOWN:
            return
        self._remember(decision)
        rnd = self._rounds.pop(key, None)
        log.info(
            "event=commit_decision_learned epoch=%d step=%d committed=%s open_round=%s",
            decision.epoch,
            decision.step,
            decision.committed,
            rnd is not None,
        )

    # -- admission and publication ----------------------------------------------------

    def _admitted_lately(self, now: float) -> bool:
        """Whether an admission was published within the batching window: ``join_batch``,
        and for a group past the first pace level one heartbeat interval -- each view
        goes to every member, and a thousand joiners admitted one tick (50 ms) apart
        made the coordinator send ~20 views of 1,000 members a second, starve its
        heartbeat handlers and fail the members by timeout (bench coordinator)."""
        if self._last_admit_at is None:
            return False
        pace = self._pacer.told
        gap = self.config.join_batch if pace.level == 0 else max(self.config.join_batch,
                                                                   pace.interval)  # fmt: skip
        return now - self._last_admit_at < gap

    def _maybe_admit(self, now: float, *, boundary: bool) -> None:
        if self._recovering:
            return
        joiners = [e for e in self._entries.values() if e.state is MemberState.JOINING]
        if not joiners:
            return
        if not boundary and self.view.members:
            oldest = min(e.since for e in joiners)
            overdue = now - oldest >= self.config.admit_deadline
            round_open = any(r.epoch == self.view.epoch for r in self._rounds.values())
            stepping = (
                self._last_decision_at is not None
                and now - self._last_decision_at < self.config.step_window
            )
            if (round_open or stepping) and not overdue:
                return
        changes = [Change(ChangeKind.ADMIT, e.member, "join") for e in joiners]
        self._publish(changes, ViewCause.JOIN, now)
        self._last_admit_at = now

    def _publish(self, changes: list[Change], cause: ViewCause, now: float) -> None:
        if not self._recovering and any(c.removes for c in changes):
            # A view change is an operation boundary anyway: let waiting joiners in
            # with it instead of causing a second change right after.
            named = {c.member.id for c in changes}
            changes = changes + [
                Change(ChangeKind.ADMIT, e.member, "join")
                for e in self._entries.values()
                if e.state is MemberState.JOINING and e.member.id not in named
            ]
        view = next_view(self.view, changes)
        removed = tuple((c.member.id, c.cause) for c in changes if c.removes)
        for change in changes:
            entry = self._entries[change.member.id]
            if change.kind is ChangeKind.ADMIT:
                entry.state = transition(entry.state, MemberEvent.ADMIT)
                entry.since = now
                entry.last_beat = entry.last_beat if entry.last_beat is not None else now
            else:
                if entry.state is MemberState.LEAVING:
                    entry.state = transition(entry.state, MemberEvent.REMOVE)
                elif entry.state in IN_VIEW_STATES:
                    entry.state = transition(entry.state, MemberEvent.EVICT)
                self._bury(entry, entry.state, change.cause)
                del self._entries[change.member.id]
        self._install(view, cause, removed, now)

    def _install(
        self, view: View, cause: ViewCause, removed: tuple[tuple[str, str], ...], now: float
    ) -> None:
        if view.epoch < self.epoch_floor:  # only ever the first view this instance publishes
            view = View(self.epoch_floor, view.members)
        self._published = Published(view, cause, removed, self._published.seq + 1)
        self._published_anything = True
        self._witnessed[view.epoch] = None
        while len(self._witnessed) > _MAX_DECISIONS:
            self._witnessed.popitem(last=False)
        self.revision += 1
        log.info(
            "event=view_changed epoch=%d cause=%s members=%s removed=%s",
            view.epoch,
            cause.name,
            ",".join(view.ids) or "-",
            ",".join(f"{i}:{c}" for i, c in removed) or "-",
        )
        if self._recovering:
            return
        for key, rnd in list(self._rounds.items()):
            if rnd.epoch != view.epoch and key in self._rounds:
                self._decide(rnd, False, self._moved_on(rnd.epoch), now)

    def _repace(self, now: float) -> None:
        if self._pacer.update(len(self._entries), now):
            pace = self._pacer.told
            log.info("event=heartbeat_pace entries=%d level=%d interval_s=%.3f timeout_s=%.3f",
                     len(self._entries), pace.level, pace.interval, pace.timeout)  # fmt: skip

    def _bury(self, entry: _Entry, state: MemberState, cause: str) -> None:
        member = entry.member
        self._tombstones[member.id] = (member.incarnation, state)
        self._tombstones.move_to_end(member.id)
        while len(self._tombstones) > _MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        log.debug(
            "event=tombstone member=%s incarnation=%d state=%s cause=%s",
            member.id,
            member.incarnation,
            state.value,
            cause,
        )

    def _maybe_reported_view(self, member: Member, known: View, now: float) -> None:
        """A known member re-registers with a view: raise the epoch if it is ahead."""
        if known.epoch == 0 or not known.has(member):
            return
        if self._recovering and not self._published_anything:
            if known.epoch > self.view.epoch:
                self._adopt(known, now)
                entry = self._entries.get(member.id)
                if entry is not None:
                    entry.last_beat = now
            return
        new_epoch = recovery_epoch(self.view, known)
        if new_epoch is not None:
            self._bump_epoch(new_epoch, now)

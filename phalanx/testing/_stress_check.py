"""The churn harness's verdicts: every trainer event in, counters and findings out.

:class:`Checker` consumes the events trainers send (see
:mod:`phalanx.testing._stress_trainer`) as they arrive and keeps the counts the final
JSON line reports. What it checks:

* every completed op: the result's digest equals the digest of the exact result
  recomputed from ``(seed, step, contributors)`` (:mod:`._stress_model`); for lossy
  codecs the error is within :func:`~._stress_model.tolerance` and the bytes are
  identical on every member; members that report the same op (view epoch, step, op
  index) name the same contributors (ops never mix views), and at the same seq the same
  bytes. A collective that mixed steps fails the digest check (contributions carry a
  non-periodic per-step offset); ``(epoch, seq)`` alone names no collective, since each
  data-plane generation rebuilt within a view restarts its seq at 0;
* after every ``begin_step`` the synced state equals its closed form for that step
  (every committed step applied exactly once, newcomers synced byte-exact);
* ``commit(step)``: one definite answer per ``(epoch of the step's first op, step)``
  across members (a member none of whose ops completed: the epoch its ``begin_step``
  installed), and True only for a step whose ops all ran in one epoch;
* restores byte-exact and never older than the newest seal the owner reported; a
  restore that fails is a lost snapshot unless more than ``m`` of that generation's
  holders (the trainer reports them with the seal) could not be read: gone (killed,
  left, replaced), stopped, partitioned or evicted now, or out of the restorer's view
  (restores read holders through it) -- ``lost_beyond_m``, the code promises nothing
  then. Without the holders (an older trainer) the rule is the coarse one: more than
  ``m`` (of the default ``k + m`` for the view size) other peers went away since the
  seal event;
* hangs: any call that ran ``hang_s`` or longer, or hit its deadline (ops and steps:
  any ``TimeoutError``; snapshots and restores: the daemon did not answer by their
  deadline, the seal timeout -- one that answered "deadline passed", like a seal it
  abandoned, failed cleanly: :func:`deadline_hang`); an evicted member that did not
  rejoin within ``hang_s`` (``rejoin_timeout``); and a stall
  (:meth:`Checker.stalled`): no step committed for ``hang_s`` while at least two
  peers ran, counted once per stretch as it happens.

Every clean failure is kept too: :attr:`Checker.failure_reasons` counts them by
reason (the call and the error with numbers masked, so one cause is one key), and
``on_failure`` is told each one (the harness writes them to ``failures.log``) — a
run that stalls can be read from what it keeps.

This module must never start a process or wait: it only counts.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phalanx.checkpoint.placement import default_km
from phalanx.testing import _stress_model as model

__all__ = ["Checker"]

_OP_KINDS = frozenset({"all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"})
_SAME_BYTES = frozenset({"all_reduce", "all_gather", "broadcast"})
_MAX_DETAILS = 20
_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?")
# a request the daemon never answered (the client gave up waiting past its deadline)
_NO_ANSWER = ("got no answer within", "before the daemon ran it")


def deadline_hang(call: str, error: str) -> bool:
    """Whether a failed call ended at its deadline in a way that is a hang. Ops and
    steps: any ``TimeoutError``. Snapshots and restores run to the daemons' seal
    timeout (the harness sets it to hang_s / 2 so that a generation that cannot seal
    under churn is given up cleanly, docs/stress.md): the daemon answering that its
    deadline passed (e.g. "while another snapshot ran") is such a clean failure; a
    daemon that did not answer at all by then (+ the client's grace) is a hang."""
    if call in ("snapshot", "restore"):
        return error.startswith("NoReply") or (
            error.startswith("TimeoutError") and any(m in error for m in _NO_ANSWER)
        )
    return error.startswith("TimeoutError")


def failure_reason(call: str, error: str) -> str:
    """A failure's histogram key: the call and the error with its numbers masked (so
    "epoch 1234 ... in 3.0s" and "epoch 1240 ... in 3.1s" are one reason), and member
    ids kept apart from numbers ("p17" stays "p#")."""
    return f"{call}: {_NUMBERS.sub('#', error)[:160]}"


@dataclass
class Checker:
    """Online verdicts over trainer events (see the module docstring)."""

    seed: int
    hang_s: float
    ops: int = 0
    ops_ok: int = 0
    ops_failed_clean: int = 0
    retried_attempts: int = 0
    wrong_results: int = 0
    hangs: int = 0
    steps_committed: int = 0
    steps_failed_clean: int = 0
    commit_unknown: int = 0
    state_syncs: int = 0
    snapshots_sealed: int = 0
    snapshot_failures: int = 0
    restores_ok: int = 0
    lost_snapshots: int = 0
    lost_beyond_m: int = 0  # restores that failed after more than m holders went away
    lost_by_old_rule: int = 0  # of those, the ones departures-since-the-seal called lost
    crashes: int = 0
    state_lost: int = 0  # begin_step answered step -1: no member of the view held the state
    _lost_epochs: set[int] = field(default_factory=set)
    evictions: int = 0
    max_rejoin_s: float = 0.0
    on_finding: Callable[[str], None] | None = None  # told each finding as it happens
    on_failure: Callable[[str, float, dict[str, Any]], None] | None = None  # each clean failure
    failure_reasons: Counter[str] = field(default_factory=Counter)
    stalls: int = 0  # stretches of hang_s without a committed step (each also a hang)
    longest_stall_s: float = 0.0
    last_commit_t: float | None = None  # monotonic time of the newest committed step
    _stall_from: float | None = None  # start of the stretch now being watched
    _stall_counted: bool = False
    _reasons_since_commit: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    beyond_m_details: list[str] = field(default_factory=list)  # why each was beyond m
    # (view epoch, step, op index) -> (contributors, {seq: shared digest}). Not keyed by
    # (epoch, seq) alone: OpResult.epoch is the VIEW epoch (elastic.run), and every
    # data-plane generation rebuilt within one view (a stop, a net fault) is a new
    # Engine whose seq restarts at 0, so a later step reuses the (epoch, seq) of an
    # earlier one. The plan position is generation-independent.
    _by_op: dict[tuple[int, int, int], tuple[tuple[str, ...], dict[int, str]]] = field(
        default_factory=dict
    )
    _answers: dict[tuple[int, int], dict[str, bool]] = field(default_factory=dict)
    _sealed: dict[str, int] = field(default_factory=dict)
    _seal_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # (t, world)
    # the newest sealed generation's holders (piece order) and m, per owner
    _holders: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    _retired: set[str] = field(default_factory=set)  # killed, left or replaced: for good
    last_unreadable: dict[str, str] = field(default_factory=dict)  # of the last _beyond_m
    last_old_rule_lost: bool = False
    _departed: list[tuple[float, str]] = field(default_factory=list)
    unavailable: set[str] = field(default_factory=set)  # stopped / partitioned now
    # evicted and not seen in a view since (cleared by back, ready or begin from it)
    evicted_now: set[str] = field(default_factory=set)
    _last_begin: dict[str, float] = field(default_factory=dict)
    _pending_faults: list[tuple[float, str]] = field(default_factory=list)
    max_step: int = 0
    max_resume_s: float = 0.0
    resume_by_fault: dict[str, float] = field(default_factory=dict)  # max per fault kind
    resumes: int = 0

    def note(self, what: str) -> None:
        if len(self.details) < _MAX_DETAILS:
            self.details.append(what[:400])
        if self.on_finding is not None:
            self.on_finding(what[:400])

    def last_sealed(self, member: str) -> int | None:
        return self._sealed.get(member)

    def departed(self, t: float, member: str) -> None:
        """``member`` left the group for good at ``t`` (killed, left, replaced)."""
        self._departed.append((t, member))
        self._retired.add(member)

    def _beyond_m(self, owner: str, view: list[str] | None = None) -> bool:
        """More of the holders of ``owner``'s newest sealed generation could not be
        read than its code tolerates (m), so a failed restore breaks no promise.

        A holder counts as unreadable when it is gone for good, unavailable now
        (stopped, partitioned, evicted), or missing from ``view`` (the restorer's view
        around the restore). Counting holders rather than departures since the seal
        event matters: a holder killed (or told to leave) while the owner's seal was
        still in flight -- after its piece was acknowledged, before the trainer
        reported the seal -- is one of the generation's holders although it "departed
        before the seal"; the old rule missed it and called the next single loss of a
        1+m code a lost snapshot."""
        held = self._holders.get(owner)
        if held is None:
            return self._beyond_m_since_seal(owner)
        holders, m = held
        seen = set(view) if view else None
        why = {}
        for h in holders:
            if h in self._retired:
                why[h] = "gone"
            elif h in self.unavailable or h in self.evicted_now:
                why[h] = "unavailable"
            elif seen is not None and h not in seen:
                why[h] = "not-in-view"
        self.last_unreadable = why
        beyond = len(why) > m
        self.last_old_rule_lost = beyond and not self._beyond_m_since_seal(owner)
        if self.last_old_rule_lost:
            # the old rule (departures since the seal event) would have called this
            # a lost snapshot: counted, to show what the holder accounting changed
            self.lost_by_old_rule += 1
        return beyond

    def _beyond_m_since_seal(self, owner: str) -> bool:
        """The coarse rule, for trainers that do not report holders: more than m
        (default k + m for the view size) other peers departed since the seal event
        or are unavailable now."""
        t_seal, world = self._seal_at.get(owner, (0.0, 1))
        gone = {m for t, m in self._departed if t >= t_seal} | self.unavailable | self.evicted_now
        gone.discard(owner)
        return len(gone) > default_km(world)[1]

    def fault(self, t: float, what: str) -> None:
        """A disruptive fault at ``t``: resolved by the first step that begins after it
        and commits (its duration is a resume time)."""
        self._pending_faults.append((t, what))

    def unresolved(self, now: float, older_than: float) -> list[str]:
        return [f"{w}@{now - t:.1f}s ago" for t, w in self._pending_faults if now - t > older_than]

    # ------------------------------------------------------------------ events
    def event(self, ev: tuple[str, str, float, dict[str, Any]]) -> None:
        kind, member, t, p = ev
        secs = p.get("secs")
        if isinstance(secs, float) and secs >= self.hang_s:
            self.hangs += 1
            self.note(
                f"hang: {member} {kind} {p.get('call', '')} took {secs:.1f}s step={p.get('step')}"
            )
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(member, t, p)

    def _on_op(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.ops += 1
        step, i = int(p["step"]), int(p["op"])
        spec = model.plan(self.seed, step)[i]
        contrib = tuple(p["contributors"])
        self.retried_attempts += int(p["failed"])
        bad = []
        if me not in contrib:
            bad.append(f"{me} not among contributors {contrib}")
        # Cross-member checks, keyed by (view epoch, step, op index): one view has one
        # member set, so every run of that op in it (any member, any generation) names
        # the same contributors; the result bytes are compared only between runs at the
        # same seq too (the same collective as far as the reports can tell). Which step
        # a collective ran is not compared by (epoch, seq): without a generation in
        # OpResult, a rebuilt generation's (epoch, seq) legitimately names other steps.
        # A collective that mixed steps is caught by the digest check below instead
        # (contributions carry a non-periodic per-step offset).
        epoch, seq = int(p["epoch"]), int(p["seq"])
        shared = p["digest"] if spec.kind in _SAME_BYTES else ""
        seen_contrib, digests = self._by_op.setdefault((epoch, step, i), (contrib, {}))
        if seen_contrib != contrib:
            bad.append(f"contributors {contrib} differ from another member's {seen_contrib}")
        if shared:
            first = digests.setdefault(seq, shared)
            if first != shared:
                bad.append("result bytes differ between members")
        if spec.kind != "barrier" and not bad:
            if spec.lossy:
                exact = _expected(spec, step, contrib, me)
                tol = model.tolerance(spec, exact, len(contrib))
                if p["err"] is None or p["err"] > tol:
                    bad.append(f"{spec.codec} error {p['err']} > {tol}")
            elif p["digest"] != _expected_digest(
                spec, step, contrib, me if spec.kind == "reduce_scatter" else ""
            ):
                bad.append("result differs from the exact value")
        if bad:
            self.wrong_results += 1
            self.note(f"wrong: {me} step={step} op={i} {spec} epoch={epoch} seq={seq}: "
                      + "; ".join(bad))  # fmt: skip
        else:
            self.ops_ok += 1

    def stalled(self, now: float, live: int) -> bool:
        """Watch for a stall: no step committed for ``hang_s`` while ``live`` >= 2
        peers ran. Counts one hang per stretch, as soon as it passes ``hang_s`` (the
        soak of seed 20261205 committed nothing for 360 s while the progress line said
        ``hangs=0``); True the moment it is counted."""
        if live < 2:  # nobody to commit with: the stretch starts again later
            self._stall_from = None
            return False
        if self._stall_from is None:
            self._stall_from, self._stall_counted = now, False
        if self.last_commit_t is not None and self.last_commit_t > self._stall_from:
            self._stall_from, self._stall_counted = self.last_commit_t, False
        quiet = now - self._stall_from
        if self._stall_counted:  # how long the stall counted already lasted
            self.longest_stall_s = max(self.longest_stall_s, quiet)
        if quiet < self.hang_s or self._stall_counted:
            return False
        self._stall_counted = True
        self.stalls += 1
        self.hangs += 1
        self.longest_stall_s = max(self.longest_stall_s, quiet)
        top = "; ".join(f"{n}x {r}" for r, n in self._reasons_since_commit.most_common(3))
        self.note(f"hang: no step committed for {quiet:.1f}s with {live} live peers"
                  + (f" (failures since the last commit: {top})" if top else ""))  # fmt: skip
        return True

    def _failed(self, me: str, t: float, call: str, p: dict[str, Any]) -> None:
        err = str(p.get("error", ""))
        why = failure_reason(call, err)
        self.failure_reasons[why] += 1
        self._reasons_since_commit[why] += 1
        if self.on_failure is not None:
            self.on_failure(me, t, {**p, "call": call})
        # a call that ended at its deadline (one that ran hang_s is counted by event()
        # already); a seal the daemons give up at their seal timeout is
        # SnapshotAbandoned: a clean failure (see deadline_hang)
        if deadline_hang(call, err) and not (p.get("secs", 0.0) >= self.hang_s):
            self.hangs += 1
            self.note(f"hang: {me} {call} hit its deadline: {err}")

    def since_commit(self, now: float) -> float | None:
        return None if self.last_commit_t is None else now - self.last_commit_t

    def _on_fail(self, me: str, t: float, p: dict[str, Any]) -> None:
        self._failed(me, t, str(p.get("call", "")), p)
        if p.get("call") in _OP_KINDS:
            self.ops += 1
            self.ops_failed_clean += 1
        else:
            self.steps_failed_clean += 1

    def _on_ready(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.evicted_now.discard(me)  # attach_state worked: its daemon is in a view

    def _on_begin(self, me: str, t: float, p: dict[str, Any]) -> None:
        self._last_begin[me] = t - float(p["secs"])
        # a begin_step that worked: back in the view (a trainer restarted while its
        # daemon was evicted never says "back")
        self.evicted_now.discard(me)
        if int(p["step"]) < 0:
            # begin_step syncs the state from any member that holds it: a step of -1
            # means nobody in this view holds the training state any more (every member
            # that held it is gone); no step can commit until it is recovered
            self.state_lost += 1
            epoch = int(p["epoch"])
            if epoch not in self._lost_epochs:
                self._lost_epochs.add(epoch)
                if len(self._lost_epochs) <= 3:
                    self.note(f"state lost: {me} began a step with no state in its view "
                              f"(epoch {epoch}, members {','.join(p.get('members', ()))})")  # fmt: skip
        self.max_step = max(self.max_step, int(p["step"]))
        if p.get("synced"):
            self.state_syncs += 1
        if not p["state_ok"]:
            self.wrong_results += 1
            self.note(f"wrong: {me} state after begin_step(step={p['step']}) is not the "
                      f"closed form (synced={p.get('synced')})")  # fmt: skip

    def _on_commit(self, me: str, t: float, p: dict[str, Any]) -> None:
        step, answer, epochs = int(p["step"]), p["answer"], list(p["epochs"])
        if answer is None:
            self.commit_unknown += 1
            return
        if answer and len(set(epochs)) > 1:
            self.wrong_results += 1
            self.note(f"wrong: {me} step={step} committed with ops in epochs {epochs}")
        if answer and not p["ok"]:
            self.wrong_results += 1
            self.note(f"wrong: {me} step={step} committed although it voted not ok")
        # the round: the epoch of the step's first op; a member none of whose ops
        # completed (its first one failed: it votes not ok) ran the step in the view
        # its begin_step installed
        epoch = epochs[0] if epochs else p.get("epoch")
        if epoch is not None:
            votes = self._answers.setdefault((int(epoch), step), {})
            votes[me] = bool(answer)
            if len(set(votes.values())) > 1:
                self.wrong_results += 1
                self.note(f"wrong: commit answers differ for epoch={epoch} step={step}: {votes}")
        if answer:
            self.steps_committed += 1
            self.last_commit_t = max(self.last_commit_t or t, t)
            self._reasons_since_commit.clear()
            begun = self._last_begin.get(me, t)
            left = []
            for tf, what in self._pending_faults:
                if tf <= begun:
                    self.max_resume_s = max(self.max_resume_s, t - tf)
                    kind = what.split(" ")[0]
                    self.resume_by_fault[kind] = max(self.resume_by_fault.get(kind, 0.0), t - tf)
                    self.resumes += 1
                else:
                    left.append((tf, what))
            self._pending_faults = left

    def _on_sealed(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.snapshots_sealed += 1
        if int(p["step"]) >= self._sealed.get(me, -1):
            self._sealed[me] = int(p["step"])
            self._seal_at[me] = (t, int(p.get("world", 1)))
            if "holders" in p:
                self._holders[me] = (tuple(str(h) for h in p["holders"]), int(p["m"]))
            else:
                self._holders.pop(me, None)

    def _on_snapshot_failed(self, me: str, t: float, p: dict[str, Any]) -> None:
        # clean: a generation that cannot seal (a holder died) is never offered; counted
        self.snapshot_failures += 1
        self._failed(me, t, "snapshot", p)

    def _on_restored(self, me: str, t: float, p: dict[str, Any]) -> None:
        owner, step = str(p["owner"]), int(p["step"])
        newest = self._sealed.get(owner)
        if not p["exact"]:
            self.wrong_results += 1
            self.note(f"wrong: {me} restored {owner} step={step}: bytes differ")
        elif newest is not None and step < newest:
            if self._beyond_m(owner, p.get("view")):
                self.lost_beyond_m += 1
            else:
                self.lost_snapshots += 1
                self.note(f"lost: {me} restored {owner} step={step} < newest sealed {newest}")
        else:
            self.restores_ok += 1

    def _on_restore_failed(self, me: str, t: float, p: dict[str, Any]) -> None:
        owner = str(p["owner"])
        self._failed(me, t, "restore", p)
        if self._sealed.get(owner) is not None and self._beyond_m(owner, p.get("view")):
            self.lost_beyond_m += 1
            held = self._holders.get(owner)
            if held is not None:
                self.beyond_m_details.append(
                    f"{me} could not restore {owner} (sealed {self._sealed[owner]}, holders "
                    f"{','.join(held[0])}, m={held[1]}): unreadable {self.last_unreadable}"
                    + (" [the old rule: lost]" if self.last_old_rule_lost else "")
                )
        elif self._sealed.get(owner) is not None:
            self.lost_snapshots += 1
            held = self._holders.get(owner)
            who = f" holders={','.join(held[0])} m={held[1]}" if held else ""
            self.note(f"lost: {me} could not restore {owner} (sealed "
                      f"{self._sealed[owner]}{who}): {p.get('error')}")  # fmt: skip

    def _on_evicted(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.evictions += 1
        # out of the view until it rejoined: restores read holders through the current
        # view, so its shards cannot be read meanwhile
        self.evicted_now.add(me)
        self._departed.append((t, me))

    def _on_back(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.max_rejoin_s = max(self.max_rejoin_s, float(p["secs"]))
        self.evicted_now.discard(me)

    def _on_rejoin_timeout(self, me: str, t: float, p: dict[str, Any]) -> None:
        # the trainer gave up waiting for its evicted daemon to rejoin (the peer is
        # then replaced): a hang, counted in event() when its secs reached hang_s
        secs = float(p["secs"])
        self.max_rejoin_s = max(self.max_rejoin_s, secs)
        if secs < self.hang_s:
            self.hangs += 1
            self.note(f"hang: {me} was not back in a view after {secs:.1f}s")

    def _on_done(self, me: str, t: float, p: dict[str, Any]) -> None:
        why = str(p.get("why", ""))
        if why.startswith("crashed"):
            self.crashes += 1
            self.note(f"crash: trainer {me}: {why}")


@functools.lru_cache(maxsize=256)
def _expected_digest(spec: model.OpSpec, step: int, contrib: tuple[str, ...], me: str) -> str:
    # ``me`` matters only for reduce_scatter (callers pass "" otherwise: one entry per op)
    return model.digest(model.expected(spec, step, contrib, me or contrib[0]))


def _expected(spec: model.OpSpec, step: int, contrib: tuple[str, ...], me: str) -> np.ndarray:
    return model.expected(spec, step, contrib, me)

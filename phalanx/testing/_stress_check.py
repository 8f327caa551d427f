"""The churn harness's verdicts: every trainer event in, counters and findings out.

:class:`Checker` consumes the events trainers send (see
:mod:`phalanx.testing._stress_trainer`) as they arrive and keeps the counts the final
JSON line reports. What it checks:

* every completed op: the result's digest equals the digest of the exact result
  recomputed from ``(seed, step, contributors)`` (:mod:`._stress_model`); for lossy
  codecs the error is within :func:`~._stress_model.tolerance` and the bytes are
  identical on every member; members that report the same ``(epoch, seq)`` name the
  same contributors (ops never mix views);
* after every ``begin_step`` the synced state equals its closed form for that step
  (every committed step applied exactly once, newcomers synced byte-exact);
* ``commit(step)``: one definite answer per ``(epoch of the step's first op, step)``
  across members, and True only for a step whose ops all ran in one epoch;
* restores byte-exact and never older than the newest seal the owner reported; a
  restore that fails is a lost snapshot unless more than ``m`` (of the default
  ``k + m`` for the view size at the seal) other peers went away, were evicted, or
  were unreachable since that seal (``lost_beyond_m``: the code promises nothing then);
* hangs: any call that ran ``hang_s`` or longer, or hit its deadline.

This module must never start a process or wait: it only counts.
"""

from __future__ import annotations

import functools
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
    crashes: int = 0
    evictions: int = 0
    max_rejoin_s: float = 0.0
    on_finding: Callable[[str], None] | None = None  # told each finding as it happens
    details: list[str] = field(default_factory=list)
    _by_op: dict[tuple[int, int], tuple[tuple[str, ...], str, str]] = field(default_factory=dict)
    _answers: dict[tuple[int, int], dict[str, bool]] = field(default_factory=dict)
    _sealed: dict[str, int] = field(default_factory=dict)
    _seal_at: dict[str, tuple[float, int]] = field(default_factory=dict)  # (t, world)
    _departed: list[tuple[float, str]] = field(default_factory=list)
    unavailable: set[str] = field(default_factory=set)  # stopped / partitioned now
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
        """``member`` left the group at ``t`` (killed, left, evicted): a holder fewer."""
        self._departed.append((t, member))

    def _beyond_m(self, owner: str) -> bool:
        """More of ``owner``'s possible shard holders went away since its newest seal
        than its code tolerates (m), so a failed restore breaks no promise."""
        t_seal, world = self._seal_at.get(owner, (0.0, 1))
        gone = {m for t, m in self._departed if t >= t_seal} | self.unavailable
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
        key = (int(p["epoch"]), int(p["seq"]))
        shared = p["digest"] if spec.kind in _SAME_BYTES else ""
        seen = self._by_op.setdefault(key, (contrib, shared, spec.kind))
        if seen[0] != contrib:
            bad.append(f"contributors {contrib} differ from another member's {seen[0]}")
        if seen[2] == spec.kind and shared and seen[1] and seen[1] != shared:
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
            self.note(f"wrong: {me} step={step} op={i} {spec} epoch={key[0]} seq={key[1]}: "
                      + "; ".join(bad))  # fmt: skip
        else:
            self.ops_ok += 1

    def _on_fail(self, me: str, t: float, p: dict[str, Any]) -> None:
        err = str(p.get("error", ""))
        if p.get("call") in _OP_KINDS:
            self.ops += 1
            self.ops_failed_clean += 1
        else:
            self.steps_failed_clean += 1
        if err.startswith("TimeoutError") and not (p.get("secs", 0.0) >= self.hang_s):
            self.hangs += 1
            self.note(f"hang: {me} {p.get('call')} hit its deadline: {err}")

    def _on_begin(self, me: str, t: float, p: dict[str, Any]) -> None:
        self._last_begin[me] = t - float(p["secs"])
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
        if epochs:
            votes = self._answers.setdefault((epochs[0], step), {})
            votes[me] = bool(answer)
            if len(set(votes.values())) > 1:
                self.wrong_results += 1
                self.note(
                    f"wrong: commit answers differ for epoch={epochs[0]} step={step}: {votes}"
                )
        if answer:
            self.steps_committed += 1
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

    def _on_snapshot_failed(self, me: str, t: float, p: dict[str, Any]) -> None:
        # clean: a generation that cannot seal (a holder died) is never offered; counted
        self.snapshot_failures += 1

    def _on_restored(self, me: str, t: float, p: dict[str, Any]) -> None:
        owner, step = str(p["owner"]), int(p["step"])
        newest = self._sealed.get(owner)
        if not p["exact"]:
            self.wrong_results += 1
            self.note(f"wrong: {me} restored {owner} step={step}: bytes differ")
        elif newest is not None and step < newest:
            if self._beyond_m(owner):
                self.lost_beyond_m += 1
            else:
                self.lost_snapshots += 1
                self.note(f"lost: {me} restored {owner} step={step} < newest sealed {newest}")
        else:
            self.restores_ok += 1

    def _on_restore_failed(self, me: str, t: float, p: dict[str, Any]) -> None:
        owner = str(p["owner"])
        if self._sealed.get(owner) is not None and self._beyond_m(owner):
            self.lost_beyond_m += 1
        elif self._sealed.get(owner) is not None:
            self.lost_snapshots += 1
            self.note(f"lost: {me} could not restore {owner} (sealed "
                      f"{self._sealed[owner]}): {p.get('error')}")  # fmt: skip

    def _on_evicted(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.evictions += 1
        # out of the view until it rejoined: restores read holders through the current
        # view, so its shards cannot be read meanwhile
        self.unavailable.add(me)
        self._departed.append((t, me))

    def _on_back(self, me: str, t: float, p: dict[str, Any]) -> None:
        self.max_rejoin_s = max(self.max_rejoin_s, float(p["secs"]))
        self.unavailable.discard(me)

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

"""The failover bench's commit check: members that know a round's decision agree, and
only the fault's victim (frozen in its vote, then evicted) may answer "unknown"."""

from __future__ import annotations

from typing import Any

from phalanx.bench.failover import Scenario, _Run, _summarize


def _op(member: str, step: int, ok: bool | None, epoch: int = 3) -> tuple[Any, ...]:
    # (t, member, step, epoch, contributors, failed attempts, t_end, correct, commit, x)
    return (0.0, member, step, epoch, ("a", "b", "c"), 0, 1.0, True, ok, None)


def _row(ops: list[tuple[Any, ...]], victim: str | None = "c") -> dict[str, Any]:
    run = _Run(Scenario(fault="stop"), b"s" * 32, None)
    run.ops = ops
    row: dict[str, Any] = {"resume_s": 0.5}
    _summarize(run, row, victim)
    return row


def test_the_victims_unknown_is_not_a_disagreement() -> None:
    row = _row([_op("a", 3, False), _op("b", 3, False), _op("c", 3, None)])
    assert row["commit_agree"] is True and row["ok"] is True


def test_a_survivor_that_does_not_know_fails_the_check() -> None:
    assert (
        _row([_op("a", 3, False), _op("b", 3, None), _op("c", 3, False)])["commit_agree"] is False
    )


def test_members_that_know_must_agree_victim_or_not() -> None:
    assert _row([_op("a", 3, True), _op("b", 3, True), _op("c", 3, False)])["commit_agree"] is False
    assert _row([_op("a", 3, True), _op("b", 3, False)], victim=None)["commit_agree"] is False

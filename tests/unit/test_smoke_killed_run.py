"""deploy/docker/smoke.py's reading of a killed container's log: which snapshots the
killed run took. CI once failed because the smoke counted only the snapshots logged
before it *asked* docker to kill the peer, while the peer trained on for 3 s and
took three more; the restarted peer rightly restored the newest (step 40)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.unit._deploy import load


@pytest.fixture(scope="module")
def smoke() -> ModuleType:
    return load("smoke")


def _log(t_kill_lands: float) -> list[dict[str, Any]]:
    """A peer snapshotting every second from t=10, killed at ``t_kill_lands``, then
    restarted at t=30, restoring, and snapshotting again."""
    out: list[dict[str, Any]] = [{"ev": "ready", "t": 1.0}]
    for i, t in enumerate(range(10, 20)):
        if t < t_kill_lands:
            out.append({"ev": "commit", "t": t - 0.5, "step": i * 10 + 9})
            out.append({"ev": "snapshot", "t": float(t), "step": i * 10 + 10, "sha256": f"s{i}"})
            if i:  # a snapshot's seal is logged at a later step
                out.append({"ev": "sealed", "t": t + 0.2, "step": i * 10})
    out.append({"ev": "ready", "t": 30.0})
    # a restarted trainer that failed before its restore (the supervisor restarts it)
    out.append({"ev": "error", "t": 30.1, "error": "daemon gone"})
    out.append({"ev": "ready", "t": 30.3})
    out.append({"ev": "restore", "t": 30.5, "step": 40, "sha256": "s3"})
    out.append({"ev": "snapshot", "t": 32.0, "step": 50, "sha256": "new"})
    return out


def test_snapshots_taken_after_the_kill_was_asked_still_count(smoke: ModuleType) -> None:
    events = _log(t_kill_lands=13.5)  # asked at 10.2, landed 3.3 s later
    restore = next(e for e in events if e["ev"] == "restore")
    snaps, last, sealed = smoke.killed_run(events, restore, 10.2)
    assert snaps == {10: "s0", 20: "s1", 30: "s2", 40: "s3"}
    assert snaps[restore["step"]] == restore["sha256"]
    assert sealed == 30 and restore["step"] >= sealed
    assert last == 13.2  # the killed run's last line, not the restarted run's error


def test_the_restarted_runs_snapshots_are_not_the_killed_runs(smoke: ModuleType) -> None:
    events = _log(t_kill_lands=11.5)
    restore = {"ev": "restore", "t": 30.5, "step": 50, "sha256": "new"}
    snaps, _, _ = smoke.killed_run(events, restore, 10.2)
    assert 50 not in snaps and restore["step"] not in snaps


def test_no_snapshot_before_the_restore(smoke: ModuleType) -> None:
    events = [{"ev": "ready", "t": 1.0}, {"ev": "restore", "t": 2.0, "step": 0, "sha256": "x"}]
    snaps, last, sealed = smoke.killed_run(events, events[1], 0.5)
    assert snaps == {} and last is None and sealed is None

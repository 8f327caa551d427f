"""LogThrottle: one line per interval per kind, the dropped ones counted on the next."""

from __future__ import annotations

import logging

import pytest

from phalanx.logthrottle import LogThrottle


def test_one_line_per_kind_per_interval_and_the_dropped_ones_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("phalanx.logthrottle.time.monotonic", lambda: now[0])
    log = logging.getLogger("test.logthrottle")
    t = LogThrottle(log, 10.0)
    with caplog.at_level(logging.WARNING, logger="test.logthrottle"):
        for _ in range(5):
            t.warning("a", "holder %s failed", "a")
        t.error("b", "stage %s", "b")  # another kind is not held back
        now[0] += 10.0
        t.warning("a", "holder %s failed", "a")
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert msgs == [
        (logging.WARNING, "holder a failed"),
        (logging.ERROR, "stage b"),
        (logging.WARNING, "holder a failed (and 4 more not logged)"),
    ]


def test_kinds_that_come_and_go_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("phalanx.logthrottle.time.monotonic", lambda: now[0])
    t = LogThrottle(logging.getLogger("test.logthrottle"), 1.0, max_kinds=8)
    for i in range(100):
        now[0] += 0.5
        t.warning(f"holder-{i}", "x")
    assert len(t._next) <= 8 + 1

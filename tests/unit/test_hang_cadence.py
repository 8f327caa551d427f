"""The monitor's hang thread checks an op in flight when it could first count as hung
(its last progress + the threshold), not every ``hang_check_s``; a stalled op is still
reported on time, and its verdict ends soon after it progresses again."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from phalanx.monitor import Monitor
from phalanx.monitor.detectors import DetectorConfig
from phalanx.monitor.monitor import MonitorConfig


class _Engine:
    """An op in flight whose last progress the test moves (real monotonic clock)."""

    def __init__(self) -> None:
        self.progress = time.monotonic()
        self.running = True

    def inflight(self) -> tuple[str, int, float, float] | None:
        return ("all_reduce", 7, self.progress, self.progress) if self.running else None

    def link_stats(self) -> Sequence[object]:
        return ()


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []
    real = Monitor.check_hang

    def counted(self: Monitor) -> object:
        calls.append(time.monotonic())
        return real(self)

    monkeypatch.setattr(Monitor, "check_hang", counted)
    return calls


def _monitor(engine: _Engine) -> Monitor:
    cfg = MonitorConfig(detectors=DetectorConfig(hang_floor_s=0.8), hang_check_s=0.05)
    mon = Monitor(0, config=cfg)
    mon.attach(engine)
    mon.start()
    return mon


def test_an_op_that_progresses_is_not_checked_every_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting(monkeypatch)
    engine = _Engine()
    mon = _monitor(engine)
    stop = threading.Event()

    def progress() -> None:  # an op that keeps making progress
        while not stop.wait(0.02):
            engine.progress = time.monotonic()

    t = threading.Thread(target=progress, daemon=True)
    t.start()
    try:
        time.sleep(1.6)
    finally:
        stop.set()
        t.join(5.0)
        mon.close()
    # every 0.05 s would be ~32 checks; by the due time, one per 0.8 s at most
    assert 1 <= len(calls) <= 5, len(calls)
    assert not [v for v in mon.verdicts() if v.kind == "hang"]


def test_a_stalled_op_is_still_reported_on_time_and_cleared_on_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _Engine()
    mon = _monitor(engine)
    try:
        deadline = time.monotonic() + 10.0
        while not [v for v in mon.verdicts() if v.kind == "hang"]:
            assert time.monotonic() < deadline, "no hang verdict within 10 s"
            time.sleep(0.02)
        # the threshold is 0.8 s after the last progress; generous for a busy machine
        assert time.monotonic() - engine.progress < 5.0
        assert mon.metrics.anomaly_active.labels("hang", "any")._value.get() == 1
        engine.progress = time.monotonic()  # it moves again: the verdict ends soon
        deadline = time.monotonic() + 10.0
        while mon.metrics.anomaly_active.labels("hang", "any")._value.get() != 0:
            assert time.monotonic() < deadline, "the hang verdict did not end"
            time.sleep(0.02)
    finally:
        mon.close()

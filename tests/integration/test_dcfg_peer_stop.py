"""``phalanx peer``'s stop with real child processes: the training process and the
daemon are stopped within ``--stop-timeout`` in all (it was up to that for each, twice
the budget, past compose's stop_grace_period), and one that ignores SIGTERM is
SIGKILLed at its deadline."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from phalanx.container.peer import _Child, _stop_both

pytestmark = pytest.mark.timeout(60)


def _stubborn(ready: Path) -> list[str]:
    """A child that ignores SIGTERM (a step or a drain that will not end); ``ready``
    appears once it does."""
    code = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)")  # fmt: skip
    return [sys.executable, "-c", code, str(ready)]


def test_both_children_are_stopped_within_the_one_budget(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    trainer = _Child("trainer", _stubborn(tmp_path / "t"), env)
    daemon = _Child("daemon", _stubborn(tmp_path / "d"), env)
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "t").exists() and (tmp_path / "d").exists()):
            assert time.monotonic() < deadline, "the children did not start"
            time.sleep(0.05)
        total = 4.0
        t0 = time.monotonic()
        _stop_both(trainer, daemon, total)
        took = time.monotonic() - t0
        assert not trainer.running and not daemon.running
        assert trainer.proc.returncode == -9 and daemon.proc.returncode == -9
        # 2 x 4 s before; a deadline, with a second of slack for the kills and reaps
        assert took < total + 1.0, took
    finally:
        for c in (trainer, daemon):
            if c.running:
                c.proc.kill()
                c.proc.wait(5)

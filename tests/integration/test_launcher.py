"""The launcher's children die with their parent, and start without running the
parent's code between fork and exec (phalanx/_parent.py says why that matters)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phalanx._parent import ENV, child_env

pytestmark = pytest.mark.timeout(60)

_PARENT = r"""
import sys, time
from pathlib import Path
from phalanx.testing.launcher import Launcher
launcher = Launcher(Path(sys.argv[1]))
proc = launcher.start_coordinator()
launcher.wait_ready(proc, 30.0)
print(proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_dies_with_its_sigkilled_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10.0
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the coordinator outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_the_variable_stops_at_the_child() -> None:
    """``import phalanx`` drops PHALANX_PARENT_PID: the child's own children do not
    inherit a parent pid that is not theirs."""
    code = f"import os, phalanx; print(os.environ.get({ENV!r}, 'gone'))"
    env = child_env({k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gone"

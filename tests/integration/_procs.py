"""Stopping the child processes a test started: SIGTERM, a grace period, SIGKILL."""

from __future__ import annotations

import subprocess
import time
from typing import Any


def stop(*procs: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM every one still running, wait up to ``grace`` seconds for all of them,
    SIGKILL what is left, and reap it."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5.0)

"""Waiting in a test for something another thread or process brings about."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(pred: Callable[[], object], timeout: float, every: float = 0.05) -> bool:
    """Whether ``pred()`` became truthy within ``timeout`` seconds (looked at every
    ``every`` seconds)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True

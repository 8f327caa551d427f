"""Lowering a background thread's CPU priority (its nice value), Linux only.

Sending pieces to holders and taking in peers' pieces is background work on a
training host: when cores are short it should yield to the training loop and to the
erasure coder, whose output those threads wait for anyway; when a core is free, a
nicer thread runs just as fast. On Linux the nice value belongs to each thread, so a
thread can lower its own without touching the rest of the process; elsewhere the same
call would change the whole process, so it is not made there."""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["MAX_NICE", "lower_own_priority"]

log = logging.getLogger(__name__)

#: the highest nice value (the lowest priority) Linux has
MAX_NICE = 19


def lower_own_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (at most to
    :data:`MAX_NICE`). No-op for 0 and off Linux; a refusal (a sandbox without the
    syscall) leaves the thread as it was, with a debug line."""
    if increment < 0:
        raise ValueError(f"a nice increment is >= 0, not {increment}")
    if not increment or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, now + increment))
    except OSError as exc:
        log.debug("thread %s keeps its priority: %s", threading.current_thread().name, exc)

"""Lowering a background thread's CPU priority (its nice value), Linux only.

Sending pieces to holders and taking in peers' pieces is background work: when cores
are short it should yield to the erasure coder, whose output those threads wait for
anyway, and to the rest of the process (the daemon's data plane); when a core is
free, a nicer thread runs just as fast. On Linux the nice value belongs to each
thread, so a thread can lower its own without touching the rest of the process;
elsewhere the same call would change the whole process, so it is not made there.

Nice values order threads only against others in the same CPU cgroup (and, on
desktops, the same autogroup): a daemon in a container of its own gains the coder's
head start over its senders, not a lead over a trainer in another container."""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["DEFAULT_IO_NICE", "MAX_NICE", "check_increment", "lower_own_priority"]

log = logging.getLogger(__name__)

#: the highest nice value (the lowest priority) Linux has
MAX_NICE = 19

#: how much nicer the snapshot's I/O threads run by default (SnapshotConfig.io_nice,
#: ShardServer(io_nice=), the daemon's [snapshot] io_nice)
DEFAULT_IO_NICE = 10


def check_increment(value: object, name: str = "io_nice") -> int:
    """``value`` if it is a nice increment (an int from 0 to :data:`MAX_NICE`), else
    ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_NICE:
        raise ValueError(f"{name} must be from 0 to {MAX_NICE}, not {value}")
    return value


def lower_own_priority(increment: int) -> None:
    """Run the calling thread at the process's nice value plus ``increment`` (at
    most :data:`MAX_NICE`); never raise its priority. The base is the process's, as
    ``nice`` or ``renice -p PID`` set it (Linux reads its main thread's), not the
    caller's, so a thread started from a thread already lowered does not sink
    further. No-op for ``increment <= 0`` (the thread keeps what it inherited from
    the thread that started it) and off Linux.

    Never raises: it runs as a thread pool's initializer, where an exception would
    break the pool for good; a refusal (a sandbox without the syscall) leaves the
    thread as it was, with a debug line."""
    if increment <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + increment)
        if target > os.getpriority(os.PRIO_PROCESS, tid):
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except (OSError, TypeError, ValueError) as exc:
        log.debug("thread %s keeps its priority: %s", threading.current_thread().name, exc)

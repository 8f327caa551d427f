"""Children that die with the process that started them (Linux ``PR_SET_PDEATHSIG``).

A harness (tests, ``phalanx stress``, the demo, the benchmarks) starts its children with
``PHALANX_PARENT_PID`` set (:func:`child_env`) instead of a ``preexec_fn``: Python code
between fork and exec runs in a copy of a parent whose gRPC threads are live, gRPC's
fork handlers restart its poller there, and the close of every inherited fd before exec
then aborted the child ("epoll_wait error: Bad file descriptor", status -6: 1 daemon
start in 6 under load). Without a ``preexec_fn`` the child is spawned without running
any code of the parent; importing :mod:`phalanx` (every phalanx child does) calls
:func:`from_env`, which asks Linux for the signal and drops the variable, so the
child's own children do not inherit it.

No imports beyond the standard library: this runs at ``import phalanx``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

__all__ = ["ENV", "child_env", "die_with_parent", "from_env"]

ENV = "PHALANX_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort elsewhere).

    Call it first thing in a child (a multiprocessing target, a process started with
    :func:`child_env`). ``parent_pid``: exit at once if that process is already gone
    (it died before the request took effect)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: rely on pipe EOF
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid and not _alive(parent_pid):
        os._exit(1)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child that must die with this process."""
    return {**env, ENV: str(os.getpid())}


def from_env() -> None:
    """If this process was started by :func:`child_env`'s caller: die with it."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return
    try:
        parent = int(raw)
    except ValueError:
        return
    die_with_parent(parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

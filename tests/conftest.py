"""Fixtures for every test: no test may leave a child process behind.

* Each test is fenced (autouse): the child processes of this pytest process are listed
  before and after it (from ``/proc/self/task/*/children``, no psutil). Children the
  test started and left running are killed (SIGKILL, by PID), reaped, and the test
  fails. Exited-but-unreaped children (zombies) are reaped quietly.
* The pytest process becomes a *child subreaper* for the session, so a grandchild
  orphaned by a test (a killed ``phalanx bench`` leaves its ranks) is re-parented to
  us, seen, and killed too.
* multiprocessing's helper processes (resource tracker, forkserver) live for the whole
  session once started; they are never counted as leaks.
* ``secret``: a fresh random cluster secret per test.
* ``launcher``: a :class:`phalanx.testing.launcher.Launcher` in the test's ``tmp_path``
  (coordinator, daemon and worker processes by PID, closed after the test);
  ``daemons``: ``with daemons(n, *daemon_flags) as cl:`` an in-process coordinator and
  ``n`` daemon processes in one view (:func:`phalanx.testing.launcher.local_cluster`)
  -- the one launcher that tests, ``phalanx stress``, the demo and the benchmarks share.

To run rank processes in a test use :func:`phalanx.testing.procs.run_ranks`.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from phalanx.testing.launcher import Launcher, LocalCluster, local_cluster

_PR_SET_CHILD_SUBREAPER = 36
_EXIT_GRACE_S = 2.0  # children that are already on their way out get this long


def child_pids() -> set[int]:
    """PIDs of this process's children (all threads'), live or zombie."""
    paths = glob.glob(f"/proc/{os.getpid()}/task/*/children")
    pids: set[int] = set()
    if paths:
        for path in paths:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(path) as f:
                pids.update(int(p) for p in f.read().split())
        return pids
    # Kernels without CONFIG_PROC_CHILDREN: scan every process's parent.
    me = os.getpid()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            pids.add(int(stat.split("/")[2]))
    return pids


def _state(pid: int) -> str | None:
    """The one-letter state of ``pid`` ("Z" for a zombie), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def _is_helper(pid: int) -> bool:
    """multiprocessing's session-long helpers (ours, or a grandchild's we adopted)."""
    known = {
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
    }
    if pid in known:
        return True
    cmd = _cmdline(pid)
    return "multiprocessing.resource_tracker" in cmd or "multiprocessing.forkserver" in cmd


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def reap_new_children(before: set[int]) -> list[str]:
    """Kill (SIGKILL, by PID) and reap children not in ``before``; reap new zombies.

    Returns a description of each child that was still running (a leak)."""
    deadline = time.monotonic() + _EXIT_GRACE_S
    while True:
        new = {p for p in child_pids() - before if not _is_helper(p)}
        live = [p for p in new if _state(p) not in (None, "Z")]
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    leaked = [f"pid {p}: {_cmdline(p)}" for p in sorted(live)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in new:
        if pid in live:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # SIGKILLed: returns at once
        else:
            _reap(pid)
    return leaked


@pytest.fixture(scope="session", autouse=True)
def _session_children() -> Iterator[None]:
    """Adopt orphaned grandchildren for the session; kill whatever is left at the end."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    before = child_pids()
    yield
    reap_new_children(before)


@pytest.fixture(autouse=True)
def _no_leaked_children() -> Iterator[None]:
    before = child_pids()
    yield
    leaked = reap_new_children(before)
    if leaked:
        pytest.fail(
            f"the test left {len(leaked)} child process(es) running (now killed):\n"
            + "\n".join(leaked),
            pytrace=False,
        )


@pytest.fixture
def secret() -> bytes:
    """A fresh random cluster secret (32 bytes)."""
    return os.urandom(32)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Processes started in the test's tmp_path (secret file there); all stopped after."""
    with Launcher(tmp_path / "cluster") as lc:
        yield lc


@pytest.fixture
def daemons(secret: bytes, tmp_path: Path) -> Callable[..., AbstractContextManager[LocalCluster]]:
    """``with daemons(n, *daemon_flags, **kw) as cl:`` -- an in-process coordinator and
    ``n`` daemon processes ``d0..`` in one view, stopped when the block ends."""

    def make(n: int, *extra: str, **kw: Any) -> AbstractContextManager[LocalCluster]:
        return local_cluster(n, secret, tmp_path, *extra, **kw)

    return make

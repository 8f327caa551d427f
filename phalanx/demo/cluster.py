"""The demo's local cluster: a coordinator, daemons and training processes, by PID.

A thin layer over :class:`phalanx.testing.launcher.Launcher` (the one launcher tests,
``phalanx stress``, the demo and the benchmarks share): :class:`Cluster` starts real
processes on 127.0.0.1 (``phalanx coordinator``, ``phalanx daemon``, ``python -m
phalanx.demo.worker``) under one temporary directory that holds the generated cluster
secret (0600), the daemons' Unix sockets and every process's log files; it waits for
each one's "ready" line with a deadline, kills one on request (SIGKILL, by PID), and
:meth:`Cluster.close` stops everything it started (SIGTERM, then SIGKILL by PID after a
grace period) and reaps it. Children die with the demo (``PR_SET_PDEATHSIG``).

The public methods (``start_coordinator``, ``start_daemon``, ``await_daemon``,
``daemon_ready``, ``socket_of``, ``start_worker``, ``close``) are what other demos build
on; keep them. This module must never signal a process it did not start, nor wait
without a deadline.
"""

from __future__ import annotations

import os
import sys
import time

from phalanx.testing.launcher import Launcher, LaunchError, Proc

__all__ = ["Cluster", "DemoError", "Proc"]


class DemoError(RuntimeError):
    """Something in the demo went wrong (a process did not start, a check failed)."""


class Cluster:
    """Processes of one demo run; see the module docstring. Use as a context manager."""

    def __init__(self, *, log_level: str = "INFO") -> None:
        # the user's environment as it is (PHALANX_* settings included): it is their demo
        self._launcher = Launcher(prefix="phalanx-demo-", log_level=log_level,
                                  env=dict(os.environ))  # fmt: skip
        self.dir = self._launcher.dir
        self.secret_file = self._launcher.secret_file
        self.log_level = log_level
        self.coordinator = ""

    @property
    def procs(self) -> list[Proc]:
        return self._launcher.procs

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ready(self, proc: Proc) -> bool:
        try:
            return self._launcher.ready(proc)
        except LaunchError as exc:
            raise DemoError(str(exc)) from None

    def _await(self, proc: Proc, deadline: float) -> None:
        while not self._ready(proc):
            if time.monotonic() > deadline:
                raise DemoError(f"{proc.name} was not ready in time (log: {proc.err_path})")
            time.sleep(0.02)

    # ------------------------------------------------------------------ starting
    def start_coordinator(self, deadline: float) -> str:
        """Start ``phalanx coordinator`` (a new group: no recovery grace)."""
        proc = self._launcher.start_coordinator("--recovery-grace", "0")
        self._await(proc, deadline)
        self.coordinator = proc.info["address"]
        return self.coordinator

    def start_daemon(self, member: str) -> Proc:
        """Start ``phalanx daemon`` for ``member`` (returns at once; see :meth:`await_daemon`)."""
        return self._launcher.start_daemon(member, name=f"daemon-{member}")

    def await_daemon(self, proc: Proc, deadline: float) -> None:
        """Wait for the daemon's ready line; record its data and /metrics addresses."""
        self._await(proc, deadline)

    def daemon_ready(self, proc: Proc) -> bool:
        """Non-blocking :meth:`await_daemon`: True once the ready line is there.
        Raises :class:`DemoError` if the daemon exited first."""
        return self._ready(proc)

    def socket_of(self, member: str) -> str:
        return self._launcher.socket_of(member)

    def start_worker(
        self, member: str, args: list[str], *, module: str = "phalanx.demo.worker"
    ) -> Proc:
        """Start a training process (``python -m module``) for ``member``; its stdout
        (JSON lines) is a pipe."""
        argv = [sys.executable, "-m", module, "--socket", self.socket_of(member),
                *args]  # fmt: skip
        return self._launcher.spawn(f"worker-{member}", "worker", argv, pipe_out=True)

    # ------------------------------------------------------------------ stopping
    def close(self, grace: float = 5.0, *, keep_dir: bool = False) -> None:
        """SIGTERM what still runs (workers first, coordinator last), SIGKILL what is
        left after ``grace``, reap everything; remove the directory unless ``keep_dir``."""
        self._launcher.close(grace)
        if not keep_dir:
            self._launcher.remove_dir()

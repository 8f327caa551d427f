"""The demo's local cluster: a coordinator, daemons and training processes, by PID.

:class:`Cluster` starts real processes on 127.0.0.1 (``phalanx coordinator``,
``phalanx daemon``, ``python -m phalanx.demo.worker``) under one temporary directory
that holds the generated cluster secret (0600), the daemons' Unix sockets and every
process's log files. It waits for each one's "ready" line with a deadline, kills one
on request (SIGKILL, by PID), and :meth:`Cluster.close` stops everything it started
(SIGTERM, then SIGKILL by PID after a grace period) and reaps it. Children also get
``PR_SET_PDEATHSIG`` so that a SIGKILLed demo leaves nothing behind.

This module must never signal a process it did not start, nor wait without a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["Cluster", "DemoError", "Proc"]

_PR_SET_PDEATHSIG = 1
_READY = r"phalanx daemon ready (.*)$"


class DemoError(RuntimeError):
    """Something in the demo went wrong (a process did not start, a check failed)."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _parse_ready(proc: Proc, m: re.Match[str]) -> None:
    for word in m.group(1).split():
        key, _, value = word.partition("=")
        proc.info[key] = value


@dataclass
class Proc:
    """One child process: what it is, its ``Popen``, its log files, facts it printed."""

    name: str
    kind: str  # coordinator | daemon | worker
    popen: subprocess.Popen[bytes]
    out_path: Path | None
    err_path: Path
    info: dict[str, str] = field(default_factory=dict)
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> IO[bytes]:
        assert self.popen.stdout is not None
        return self.popen.stdout

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL (the fault the demo injects) and reap."""
        self.killed = True
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5.0)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Cluster:
    """Processes of one demo run; see the module docstring. Use as a context manager."""

    def __init__(self, *, log_level: str = "INFO") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="phalanx-demo-"))
        self.secret_file = self.dir / "secret"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        self.log_level = log_level
        self.procs: list[Proc] = []
        self.coordinator = ""

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, kind: str, argv: list[str], *, pipe_out: bool) -> Proc:
        err = self.dir / f"{name}.log"
        out = None if pipe_out else self.dir / f"{name}.out"
        with open(err, "wb") as ferr:
            if out is None:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=ferr,
                    preexec_fn=_die_with_parent,
                )  # fmt: skip
            else:
                with open(out, "wb") as fout:
                    popen = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                        preexec_fn=_die_with_parent,
                    )  # fmt: skip
        proc = Proc(name, kind, popen, out, err)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _find_line(proc: Proc, pattern: str) -> re.Match[str] | None:
        """The first line of ``proc``'s stdout file that matches ``pattern``, if any."""
        assert proc.out_path is not None
        rx = re.compile(pattern)
        with contextlib.suppress(OSError):
            for line in proc.out_path.read_text(errors="replace").splitlines():
                m = rx.search(line)
                if m:
                    return m
        return None

    def _await_line(self, proc: Proc, pattern: str, deadline: float) -> re.Match[str]:
        """Poll ``proc``'s stdout file for a line matching ``pattern``."""
        while True:
            m = self._find_line(proc, pattern)
            if m:
                return m
            if not proc.alive():
                raise DemoError(
                    f"{proc.name} exited with status {proc.popen.returncode} before it was "
                    f"ready:\n{proc.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(f"{proc.name} was not ready in time (log: {proc.err_path})")
            time.sleep(0.02)

    def _phalanx(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "phalanx", "--log-level", self.log_level, *args]

    # ------------------------------------------------------------------ starting
    def start_coordinator(self, deadline: float) -> str:
        """Start ``phalanx coordinator`` (a new group: no recovery grace)."""
        argv = self._phalanx(
            "coordinator", "--listen", "127.0.0.1:0", "--secret-file", str(self.secret_file),
            "--recovery-grace", "0",
        )  # fmt: skip
        proc = self._spawn("coordinator", "coordinator", argv, pipe_out=False)
        m = self._await_line(proc, r"listening on (\S+)", deadline)
        self.coordinator = m.group(1)
        return self.coordinator

    def start_daemon(self, member: str) -> Proc:
        """Start ``phalanx daemon`` for ``member`` (returns at once; see :meth:`await_daemon`)."""
        argv = self._phalanx(
            "daemon", "--coordinator", self.coordinator, "--secret-file", str(self.secret_file),
            "--id", member, "--socket", self.socket_of(member), "--metrics-port", "0",
        )  # fmt: skip
        return self._spawn(f"daemon-{member}", "daemon", argv, pipe_out=False)

    def await_daemon(self, proc: Proc, deadline: float) -> None:
        """Wait for the daemon's ready line; record its data and /metrics addresses."""
        _parse_ready(proc, self._await_line(proc, _READY, deadline))

    def daemon_ready(self, proc: Proc) -> bool:
        """Non-blocking :meth:`await_daemon`: True once the ready line is there.
        Raises :class:`DemoError` if the daemon exited first."""
        if proc.info:
            return True
        m = self._find_line(proc, _READY)
        if m is None:
            if not proc.alive():
                raise DemoError(
                    f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.log_tail()}"
                )
            return False
        _parse_ready(proc, m)
        return True

    def socket_of(self, member: str) -> str:
        return str(self.dir / f"{member}.sock")

    def start_worker(
        self, member: str, args: list[str], *, module: str = "phalanx.demo.worker"
    ) -> Proc:
        """Start a training process (``python -m module``) for ``member``; its stdout
        (JSON lines) is a pipe."""
        argv = [sys.executable, "-m", module, "--socket", self.socket_of(member),
                *args]  # fmt: skip
        return self._spawn(f"worker-{member}", "worker", argv, pipe_out=True)

    # ------------------------------------------------------------------ stopping
    def close(self, grace: float = 5.0, *, keep_dir: bool = False) -> None:
        """SIGTERM what still runs (workers first, coordinator last), SIGKILL what is
        left after ``grace``, reap everything; remove the directory unless ``keep_dir``."""
        for kinds in (("worker",), ("daemon",), ("coordinator",)):
            group = [p for p in self.procs if p.kind in kinds and p.alive()]
            for p in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
            end = time.monotonic() + grace
            for p in group:
                try:
                    p.popen.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.popen.wait(2.0)
        for p in self.procs:
            if p.popen.stdout is not None:
                p.popen.stdout.close()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

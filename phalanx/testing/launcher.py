"""One launcher for local clusters: coordinator, daemon and worker processes, by PID.

Tests (through the fixtures in tests/conftest.py), ``phalanx stress``, ``phalanx demo``
and the benchmarks start the same processes; this module is the one place that knows
how, and the one place that makes children die with their parent.

* :func:`die_with_parent` -- ``PR_SET_PDEATHSIG`` (SIGKILL), called first thing in a
  multiprocessing child; processes this launcher starts get it through
  ``PHALANX_PARENT_PID`` (:mod:`phalanx._parent`: never a ``preexec_fn``, which runs
  Python in a forked copy of a gRPC process). A SIGKILLed parent leaves nothing behind.
* :class:`Launcher` -- a private directory (the generated cluster secret, 0600; the
  daemons' Unix sockets; every process's ``.out``/``.err`` files) and the processes
  started in it: ``phalanx coordinator``, ``phalanx daemon``, any command (a training
  process). Readiness is polled from a process's stdout file, never by blocking on a
  pipe, so a harness loop keeps running while processes start (:meth:`Launcher.ready`);
  :meth:`Launcher.wait_ready` is the blocking form with a deadline.
  :meth:`Launcher.close` SIGCONTs and SIGTERMs what still runs (workers first, the
  coordinator last), SIGKILLs what is left after a grace period and reaps everything.
* :func:`local_cluster` -- an in-process :class:`~phalanx.membership.coordinator.
  Coordinator` (tests use its Python API: ``wait_for``, ``view``, ``stop``) and N
  daemon processes in one view; the fixture ``daemons`` in tests/conftest.py wraps it.

This module must never signal a process it did not start (always by PID), nor wait
without a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from phalanx._parent import child_env, die_with_parent

if TYPE_CHECKING:
    from phalanx.membership.config import MembershipConfig
    from phalanx.membership.coordinator import Coordinator

__all__ = [
    "LaunchError",
    "Launcher",
    "LocalCluster",
    "Proc",
    "die_with_parent",
    "local_cluster",
    "phalanx_argv",
]

DAEMON_READY = r"phalanx daemon ready(.*)$"
COORDINATOR_READY = r"listening on (\S+)"
_ORDER = ("worker", "daemon", "coordinator")  # the order close() stops them in


class LaunchError(RuntimeError):
    """A process did not start (it exited first, or missed its deadline)."""


def phalanx_argv(*args: str, log_level: str | None = None) -> list[str]:
    """``python -m phalanx [--log-level L] ARGS`` with this interpreter."""
    level = ["--log-level", log_level] if log_level else []
    return [sys.executable, "-m", "phalanx", *level, *args]


@dataclass
class Proc:
    """One child process: what it is, its ``Popen``, its log files, facts it printed."""

    name: str
    kind: str  # coordinator | daemon | worker
    popen: subprocess.Popen[bytes]
    out_path: Path | None  # None: stdout is a pipe (popen.stdout)
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

    def signal(self, sig: int) -> None:
        """Send ``sig`` by PID if the process still runs (never to a reaped PID)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, sig)

    def kill(self, wait: float = 5.0) -> None:
        """SIGKILL and reap."""
        self.killed = True
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(wait)

    def text(self) -> str:
        """What the process wrote to its stdout file so far."""
        if self.out_path is None:
            return ""
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def find(self, pattern: str) -> re.Match[str] | None:
        """The first stdout line matching ``pattern``, if any."""
        rx = re.compile(pattern)
        for line in self.text().splitlines():
            m = rx.search(line)
            if m:
                return m
        return None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Launcher:
    """Processes under one private directory; see the module docstring.

    ``directory``: use it (created if needed) instead of a fresh temporary one;
    ``log_level``: passed to every ``phalanx`` command; ``env``: the environment of
    the children (default: this one without ``PHALANX_*``, so a developer's settings
    do not leak in); ``secret``: the cluster secret (default: 32 random bytes, hex)."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        prefix: str = "phalanx-",
        log_level: str | None = None,
        env: dict[str, str] | None = None,
        secret: bytes | None = None,
    ) -> None:
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix=prefix))
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.secret = secret if secret is not None else os.urandom(32).hex().encode()
        self.secret_file = self.dir / "secret"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.secret)
        self.log_level = log_level
        self.env = env if env is not None else {
            k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")
        }  # fmt: skip
        self.procs: list[Proc] = []
        self.coordinator_address = ""

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ starting
    def spawn(
        self,
        name: str,
        kind: str,
        argv: Sequence[str],
        *,
        pipe_out: bool = False,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start ``argv`` (dies with this process); stdout to ``NAME.out`` (or a pipe),
        stderr to ``NAME.err``. Returns at once."""
        err = self.dir / f"{name}.err"
        out = None if pipe_out else self.dir / f"{name}.out"
        with contextlib.ExitStack() as stack:
            ferr = stack.enter_context(open(err, "wb"))
            fout: IO[bytes] | int = (
                subprocess.PIPE if out is None else stack.enter_context(open(out, "wb"))
            )
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                env=child_env(env if env is not None else self.env),
            )  # fmt: skip
        proc = Proc(name, kind, popen, out, err)
        self.procs.append(proc)
        return proc

    def start_coordinator(
        self, *extra: str, listen: str = "127.0.0.1:0", name: str = "coordinator"
    ) -> Proc:
        """``phalanx coordinator`` (returns at once; see :meth:`ready`). ``extra``: more
        flags, e.g. ``--recovery-grace 0`` for a group known to be new."""
        argv = phalanx_argv("coordinator", "--listen", listen,
                            "--secret-file", str(self.secret_file), *extra,
                            log_level=self.log_level)  # fmt: skip
        return self.spawn(name, "coordinator", argv)

    def socket_of(self, member: str) -> str:
        return str(self.dir / f"{member}.sock")

    def start_daemon(
        self,
        member: str,
        *extra: str,
        coordinator: str | None = None,
        listen: str = "127.0.0.1:0",
        metrics_port: int = 0,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> Proc:
        """``phalanx daemon --id MEMBER`` on this directory's socket for it (returns at
        once). ``prefix``: a command to run it under (``ip netns exec NS``)."""
        argv = [*prefix, *phalanx_argv(
            "daemon", "--coordinator", coordinator or self.coordinator_address,
            "--secret-file", str(self.secret_file), "--socket", self.socket_of(member),
            "--id", member, "--listen", listen, "--metrics-port", str(metrics_port), *extra,
            log_level=self.log_level,
        )]  # fmt: skip
        return self.spawn(name or member, "daemon", argv, env=env)

    # ------------------------------------------------------------------ readiness
    def ready(self, proc: Proc) -> bool:
        """Non-blocking: True once ``proc`` printed its ready line (a coordinator's
        address and a daemon's ``key=value`` facts go to ``proc.info``). Raises
        :class:`LaunchError` if it exited first."""
        if proc.info:
            return True
        pattern = COORDINATOR_READY if proc.kind == "coordinator" else DAEMON_READY
        m = proc.find(pattern)
        if m is None:
            if not proc.alive():
                raise LaunchError(
                    f"{proc.name} exited with status {proc.popen.returncode} before it was "
                    f"ready:\n{proc.log_tail(20)}"
                )
            return False
        if proc.kind == "coordinator":
            proc.info["address"] = m.group(1)
            self.coordinator_address = m.group(1)
        else:
            proc.info["ready"] = "1"
            for word in m.group(1).split():
                key, _, value = word.partition("=")
                if value:
                    proc.info[key] = value
        return True

    def wait_ready(self, proc: Proc, timeout: float = 30.0) -> Proc:
        """Block until :meth:`ready` (polling); LaunchError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.ready(proc):
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{proc.name} was not ready within {timeout:.0f} s (log: {proc.err_path})"
                )
            time.sleep(0.02)
        return proc

    # ------------------------------------------------------------------ stopping
    def close(self, grace: float = 10.0) -> None:
        """SIGCONT + SIGTERM what still runs (workers, then daemons, then the
        coordinator), SIGKILL what is left after ``grace`` s, reap all. Idempotent."""
        for kind in _ORDER:
            group = [p for p in self.procs if p.kind == kind and p.alive()]
            for p in group:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
            end = time.monotonic() + grace
            for p in group:
                try:
                    p.popen.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill(5.0)
        for p in self.procs:
            if p.alive():  # an unknown kind, or a SIGKILL that has not landed yet
                p.kill(5.0)
            if p.popen.stdout is not None:
                p.popen.stdout.close()

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------- tests' cluster


@dataclass
class LocalCluster:
    """What :func:`local_cluster` yields: the in-process coordinator, the launcher and
    the daemons (``procs[i]`` is member ``d{i}``; ``sockets``/``outs`` in that order)."""

    coordinator: Coordinator
    launcher: Launcher
    daemons: list[Proc]

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [p.popen for p in self.daemons]

    @property
    def sockets(self) -> list[str]:
        return [self.launcher.socket_of(p.name) for p in self.daemons]

    @property
    def outs(self) -> list[Path]:
        return [p.out_path for p in self.daemons if p.out_path is not None]

    @property
    def secret_file(self) -> Path:
        return self.launcher.secret_file

    def add_daemon(self, *extra: str, member: str | None = None) -> Proc:
        """Start one more daemon (``d{n}`` by default) against this coordinator."""
        member = member or f"d{len(self.daemons)}"
        proc = self.launcher.start_daemon(member, *extra, coordinator=self.coordinator.address)
        self.daemons.append(proc)
        return proc

    def ready_line(self, i: int, timeout: float = 30.0) -> str:
        """Daemon ``i``'s ready line (waits for it)."""
        proc = self.launcher.wait_ready(self.daemons[i], timeout)
        m = proc.find(DAEMON_READY)
        assert m is not None
        return m.group(0)


@contextlib.contextmanager
def local_cluster(
    n: int,
    secret: bytes,
    directory: Path,
    *extra: str,
    grace: float = 15.0,
    ready_timeout: float = 30.0,
    config: MembershipConfig | None = None,
) -> Iterator[LocalCluster]:
    """An in-process coordinator (a new group: no recovery) and ``n`` daemon processes
    ``d0 .. d{n-1}`` in one view; ``extra``: flags for every daemon; ``config``: the
    coordinator's membership settings (default: the defaults). Stops everything in
    ``finally`` (daemons SIGTERMed, SIGKILL after ``grace``)."""
    from phalanx.membership.config import MembershipConfig
    from phalanx.membership.coordinator import Coordinator

    launcher = Launcher(directory, secret=secret.hex().encode())
    coord = Coordinator(
        "127.0.0.1:0", secret=launcher.secret, config=config or MembershipConfig(),
        recover=False,
    )  # fmt: skip
    coord.start()
    cl = LocalCluster(coord, launcher, [])
    try:
        for _ in range(n):
            cl.add_daemon(*extra)
        for i in range(n):
            cl.ready_line(i, ready_timeout)
        coord.wait_for(lambda v: v.size == n, 20.0)
        yield cl
    finally:
        launcher.close(grace)
        coord.stop(0.5)

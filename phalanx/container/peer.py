"""``phalanx peer``: one container = one peer: a daemon and its training process, supervised.

A compose service scales with ``--scale``, which copies one container; a peer is two
processes that share a Unix socket and shared memory. So the container runs this
small supervisor (it may be PID 1: it reaps every child), which starts

* ``phalanx daemon``, configured by the environment (``PHALANX_*``); the defaults it
  fills in when they are not set are derived from the container, so N copies need no
  hand edits (:func:`peer_env`): the member id is the hostname (a container's is
  unique), the incarnation is ``0`` (the wall clock at start: a restarted container
  keeps its hostname and must come back newer), the data plane listens on the
  hostname's address, ``/metrics`` on ``0.0.0.0:9464``;
* the training command given after ``--`` (default ``phalanx train``), with the same
  environment (``PHALANX_SOCKET`` tells it where the daemon listens).

What happens when a child exits is the table :data:`ON_EXIT`: the training process is
restarted (with a growing delay, :func:`restart_delay`) when it failed or was killed —
the daemon kept its state and snapshots, so it restores and goes on; when the daemon
exits, or the training process finished (exit 0), everything stops and the
supervisor exits with the daemon's status (0 for a finished job), leaving a restart to
the container's policy. SIGTERM/SIGINT: the training process gets SIGTERM (it finishes
its step), then the daemon (it drains and leaves the group, so the others get a view
without it at once); the whole stop takes at most ``--stop-timeout`` (20 s), of which
the training process gets at most half (:func:`stop_budget`), so the daemon always has
time left to leave. Whatever still runs at its deadline gets SIGKILL. Keep the
container's grace period (compose ``stop_grace_period``, 30 s) above ``--stop-timeout``:
the runtime SIGKILLs everything at its end.

This module must never leave a child behind, nor signal a process it did not start.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

__all__ = [
    "ON_EXIT",
    "Backoff",
    "Exit",
    "OnExit",
    "classify",
    "peer_env",
    "register",
    "restart_delay",
    "run",
    "stop_budget",
    "trainer_command",
]

log = logging.getLogger(__name__)

DATA_PORT = 7100
METRICS_PORT = 9464
#: ``--stop-timeout`` default: the whole stop, both children (below compose's 30 s
#: ``stop_grace_period``)
STOP_TIMEOUT_S = 20.0
#: the most of the stop budget the training process may take before its SIGKILL
TRAINER_STOP_SHARE = 0.5


class Exit(enum.Enum):
    """How a child ended."""

    DONE = "done"  # exit status 0
    FAILED = "failed"  # a non-zero exit status
    KILLED = "killed"  # a signal


class OnExit(enum.Enum):
    RESTART = "restart"  # start the training process again, after the backoff delay
    STOP = "stop"  # stop everything and exit


#: (child, how it ended) -> what the supervisor does
ON_EXIT: Mapping[tuple[str, Exit], OnExit] = {
    ("daemon", Exit.DONE): OnExit.STOP,
    ("daemon", Exit.FAILED): OnExit.STOP,
    ("daemon", Exit.KILLED): OnExit.STOP,
    ("trainer", Exit.DONE): OnExit.STOP,
    ("trainer", Exit.FAILED): OnExit.RESTART,
    ("trainer", Exit.KILLED): OnExit.RESTART,
}


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial``, doubled after each quick failure up to ``maximum``;
    back to ``initial`` once a run lasted ``reset_after`` seconds."""

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0


def classify(returncode: int) -> Exit:
    """A ``Popen.returncode`` (negative: killed by that signal) as an :class:`Exit`."""
    if returncode == 0:
        return Exit.DONE
    return Exit.KILLED if returncode < 0 else Exit.FAILED


def restart_delay(previous: float, ran_s: float, policy: Backoff) -> float:
    """The delay before the next start, given the last delay and how long the run lasted."""
    if ran_s >= policy.reset_after or previous <= 0:
        return policy.initial
    return min(policy.maximum, previous * 2)


def stop_budget(total_s: float, trainer_took_s: float) -> tuple[float, float]:
    """(the training process's wait before SIGKILL, then the daemon's) in a stop that
    takes at most ``total_s`` in all: the training process gets at most
    :data:`TRAINER_STOP_SHARE` of it, the daemon whatever the training process left
    (``trainer_took_s``: how long its stop took). Pure."""
    trainer = total_s * TRAINER_STOP_SHARE
    return trainer, max(0.0, total_s - min(trainer_took_s, trainer))


def trainer_command(words: Sequence[str]) -> list[str]:
    """The training command from the words after ``phalanx peer``'s options: one
    leading ``--`` separator dropped (argparse keeps it when options came before it),
    every later word kept as it is (a ``--`` of the training command's own included);
    ``phalanx train`` when empty. Pure."""
    cmd = list(words[1:] if words and words[0] == "--" else words)
    return cmd or [sys.executable, "-m", "phalanx", "train"]


def peer_env(environ: Mapping[str, str], hostname: str, address: str) -> dict[str, str]:
    """``environ`` with the peer's defaults filled in where unset (pure).

    ``address``: what ``hostname`` resolves to (the data plane must advertise an
    address the other peers can reach, never ``0.0.0.0``)."""
    from phalanx.config import default_socket_path

    env = dict(environ)
    member = env.setdefault("PHALANX_ID", hostname)
    env.setdefault("PHALANX_INCARNATION", "0")
    env.setdefault("PHALANX_LISTEN", f"{address}:{DATA_PORT}")
    env.setdefault("PHALANX_METRICS_HOST", "0.0.0.0")
    env.setdefault("PHALANX_METRICS_PORT", str(METRICS_PORT))
    env.setdefault("PHALANX_SOCKET", default_socket_path(member))
    return env


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``phalanx peer``'s options; return the function that runs it."""
    parser.description = (
        "One container = one peer: runs `phalanx daemon` (configured by PHALANX_* "
        "variables; id, incarnation, listen address and metrics default from the "
        "container) and a training command (after --, default `phalanx train`) that "
        "talks to it; restarts the training process when it dies; stops both on SIGTERM."
    )
    b = Backoff()
    a = parser.add_argument
    a(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        metavar="S",
        help="on SIGTERM, stop both children within S seconds in all, the training "
        f"process in at most half of it, before SIGKILL (default {STOP_TIMEOUT_S:g}; "
        "keep it below the container's grace period)",
    )
    a(
        "--restart-delay",
        type=float,
        default=b.initial,
        metavar="S",
        help=f"first delay before restarting a failed training process (default {b.initial})",
    )
    a(
        "--max-restart-delay",
        type=float,
        default=b.maximum,
        metavar="S",
        help=f"longest such delay (default {b.maximum})",
    )
    a("trainer", nargs=argparse.REMAINDER, metavar="-- COMMAND",
      help="the training command (default: phalanx train)")  # fmt: skip
    parser.set_defaults(default_log_level="INFO")
    return run


class _Child:
    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(list(cmd), env=dict(env), stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        log.info("event=started child=%s pid=%d cmd=%r", name, self.proc.pid, " ".join(cmd))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)


def _reap(children: Sequence[_Child | None]) -> list[_Child]:
    """Reap every exited child (PID 1 also adopts orphans); return ours that ended."""
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        for c in children:
            if c is not None and c.pid == pid:
                c.proc.returncode = os.waitstatus_to_exitcode(status)
                ended.append(c)
    return ended


def _stop(child: _Child | None, others: Sequence[_Child | None], timeout: float) -> None:
    if child is None or not child.running:
        return
    child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while child.running and time.monotonic() < deadline:
        _reap([child, *others])
        time.sleep(0.05)
    if child.running:
        log.warning("event=kill child=%s pid=%d after_s=%.1f", child.name, child.pid, timeout)
        child.signal(signal.SIGKILL)
        while child.running:
            _reap([child, *others])
            time.sleep(0.02)


def _stop_both(trainer: _Child | None, daemon: _Child, total_s: float) -> None:
    """The training process, then the daemon, all within ``total_s`` (see
    :func:`stop_budget`)."""
    t0 = time.monotonic()
    trainer_s, _ = stop_budget(total_s, 0.0)
    _stop(trainer, [daemon], trainer_s)
    _, daemon_s = stop_budget(total_s, time.monotonic() - t0)
    _stop(daemon, [trainer], daemon_s)


def run(args: argparse.Namespace) -> int:
    """Supervise until a child ends for good or SIGTERM/SIGINT; see the module docstring."""
    trainer_cmd = trainer_command(args.trainer or [])
    policy = Backoff(args.restart_delay, args.max_restart_delay)
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        address = "127.0.0.1"
    env = peer_env(os.environ, hostname, address)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    daemon = _Child("daemon", [sys.executable, "-m", "phalanx", "daemon"], env)
    trainer: _Child | None = _Child("trainer", trainer_cmd, env)
    delay, restart_at, status = 0.0, 0.0, 0
    try:
        while not stop.wait(0.1):
            for c in _reap([daemon, trainer]):
                how = classify(c.proc.returncode or 0)
                action = ON_EXIT[(c.name, how)]
                ran = time.monotonic() - c.started
                log.info("event=exited child=%s pid=%d status=%s how=%s ran_s=%.1f action=%s",
                         c.name, c.pid, c.proc.returncode, how.value, ran,
                         action.value)  # fmt: skip
                if action is OnExit.STOP:
                    stop.set()
                    code = c.proc.returncode or 0
                    if c is daemon:  # its status is the container's (-N: signal N)
                        status = 128 - code if code < 0 else code
                else:
                    delay = restart_delay(delay, ran, policy)
                    restart_at = time.monotonic() + delay
                    trainer = None
                    log.info("event=restart_scheduled child=trainer in_s=%.1f", delay)
            if trainer is None and not stop.is_set() and time.monotonic() >= restart_at:
                trainer = _Child("trainer", trainer_cmd, env)
    finally:
        _stop_both(trainer, daemon, args.stop_timeout)
        _reap([])
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("event=peer_stopped status=%d", status)
    return status

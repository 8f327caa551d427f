"""Run one Python function as N real processes ("ranks"), with hard deadlines.

Tests, the benchmarks and the churn harness need the same plumbing: start N fresh
interpreters (multiprocessing's *spawn* context, so no lock or thread of the parent
leaks into a child), let the ranks swap small facts such as their listening addresses,
talk to them, and never wait forever on any of them.

Two entry points:

* :func:`run_ranks` runs ``fn(ctx, *args)`` in ``world`` processes and returns the
  per-rank results, or raises :class:`RanksFailed` with every rank's traceback.
* :class:`RankPool` keeps the ranks alive and lets the parent send them commands
  (``request_all``) -- what a benchmark that alternates two implementations needs.

Inside a rank, ``ctx`` is a :class:`RankContext`: ``ctx.rank``, ``ctx.world``,
``ctx.exchange(obj)`` (all-gather of a small picklable object through the parent, e.g.
listener addresses), and ``ctx.recv()``/``ctx.reply(obj)`` for pool commands.

This module never kills anything but the processes it started, always by PID, and
reaps each one. It holds no global state.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from phalanx.testing.launcher import die_with_parent

__all__ = ["RankContext", "RankPool", "RanksFailed", "run_ranks"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Messages on the parent<->rank pipe are (kind, payload) tuples.
_MSG = "msg"  # rank -> parent: reply to a command
_XCHG = "xchg"  # rank -> parent: contribution to an exchange; parent -> rank: the list
_CMD = "cmd"  # parent -> rank: a command for ctx.recv()
_OK = "ok"  # rank -> parent: fn returned (payload: its result)
_ERR = "err"  # rank -> parent: fn raised (payload: formatted traceback)

_KILL_GRACE_S = 5.0  # how long the other ranks may take to report after one failed


class RanksFailed(RuntimeError):
    """One or more ranks failed, died or missed their deadline.

    ``failures`` maps rank -> what happened to it (a traceback, an exit status, or
    "killed: deadline passed"); ranks that succeeded are absent.
    """

    def __init__(self, what: str, failures: dict[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        parts = [what]
        for rank, detail in self.failures.items():
            parts.append(f"--- rank {rank} ---\n{detail.rstrip()}")
        super().__init__("\n".join(parts))


class RankContext:
    """What a rank's function sees of the harness (lives in the child process)."""

    def __init__(self, rank: int, world: int, conn: Connection) -> None:
        self.rank = rank
        self.world = world
        self._conn = conn
        self._stashed: collections.deque[Any] = collections.deque()

    def exchange(self, obj: Any, timeout: float = 120.0) -> list[Any]:
        """All-gather ``obj`` over every rank (through the parent); returns the list
        indexed by rank. Every rank must call it the same number of times."""
        self._conn.send((_XCHG, obj))
        deadline = time.monotonic() + timeout
        while True:
            kind, payload = self._recv(max(0.0, deadline - time.monotonic()), "exchange")
            if kind == _XCHG:
                return list(payload)
            # The parent may send the first command before the exchange completes.
            self._stashed.append(payload)

    def recv(self, timeout: float | None = None) -> Any:
        """The next command the parent sent with :meth:`RankPool.request_all`
        (``None`` means: return from your function)."""
        if self._stashed:
            return self._stashed.popleft()
        kind, payload = self._recv(timeout, "command")
        if kind != _CMD:
            raise RuntimeError(f"rank {self.rank}: expected a command, got {kind!r}")
        return payload

    def reply(self, obj: Any) -> None:
        """Answer the current command; the parent's ``request_all`` returns it."""
        self._conn.send((_MSG, obj))

    def _recv(self, timeout: float | None, what: str) -> tuple[str, Any]:
        if timeout is not None and not self._conn.poll(timeout):
            raise TimeoutError(f"rank {self.rank}: no {what} from the parent in {timeout:.1f}s")
        msg: tuple[str, Any] = self._conn.recv()  # EOFError when the parent is gone
        return msg


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    conn: Connection,
    args: tuple[Any, ...],
    parent: int | None = None,
) -> None:
    """Entry point of every rank process."""
    die_with_parent(parent)
    # Ctrl-C goes to the whole foreground process group; the parent decides what the
    # ranks do (it kills them), so a rank must not die half-way on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = RankContext(rank, world, conn)
    try:
        result = fn(ctx, *args)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            conn.send((_ERR, traceback.format_exc()))
        conn.close()
        os._exit(1)
    try:
        conn.send((_OK, result))
    except Exception:
        with contextlib.suppress(OSError, ValueError):
            conn.send((_ERR, "could not send the result back:\n" + traceback.format_exc()))
        conn.close()
        os._exit(1)
    conn.close()


class RankPool(Generic[T]):
    """``world`` live rank processes running ``fn(ctx, *args)``; use as a context
    manager (``close()`` kills and reaps whatever is still running).

    The parent drives the ranks with :meth:`request_all`; exchanges (``ctx.exchange``)
    are served while the parent waits in :meth:`request_all` or :meth:`join`.
    """

    def __init__(
        self,
        fn: Callable[..., T],
        world: int,
        *args: Any,
        name: str = "rank",
    ) -> None:
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        self.world = world
        self._fn = fn
        self._args = args
        self._name = name
        self._mp = multiprocessing.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._results: dict[int, T] = {}
        self._failures: dict[int, str] = {}
        self._xchg: dict[int, Any] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> RankPool[T]:
        for rank in range(self.world):
            parent_end, child_end = self._mp.Pipe(duplex=True)
            proc = self._mp.Process(
                target=_rank_main,
                args=(self._fn, rank, self.world, child_end, self._args, os.getpid()),
                name=f"{self._name}-{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        log.debug("started %s ranks pids=%s", self._name, self.pids)
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def __enter__(self) -> RankPool[T]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Tell live ranks to finish (a ``None`` command), wait up to ``timeout``,
        then SIGKILL (by PID) and reap what is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for rank, conn in enumerate(self._conns):
            if rank not in self._results and rank not in self._failures:
                with contextlib.suppress(OSError, ValueError):
                    conn.send((_CMD, None))
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGKILL every rank still alive (by PID) and reap all of them."""
        for proc in self._procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            proc.join(10.0)
            if proc.exitcode is None:  # pragma: no cover - SIGKILL cannot be ignored
                log.error("rank process %s (pid %s) did not die", proc.name, proc.pid)
        for conn in self._conns:
            conn.close()
        self._closed = True

    # -- talking to the ranks --------------------------------------------------------

    def request_all(self, cmd: Any, timeout: float) -> list[Any]:
        """Send ``cmd`` to every rank and return their replies, indexed by rank.

        Raises :class:`RanksFailed` (after killing every rank) if a rank raised, died,
        or not all replies came within ``timeout`` seconds."""
        for conn in self._conns:
            conn.send((_CMD, cmd))
        return self._collect(_MSG, timeout, f"command {cmd!r}")

    def join(self, timeout: float) -> list[T]:
        """Wait for every rank's function to return; its results indexed by rank."""
        self._collect(_OK, timeout, "run")
        return [self._results[r] for r in range(self.world)]

    def _collect(self, want: str, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        replies: dict[int, Any] = {}
        pending = set(range(self.world))
        if want == _OK:
            pending -= set(self._results)
        by_conn = {id(conn): rank for rank, conn in enumerate(self._conns)}
        while pending and not self._failures:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready = multiprocessing.connection.wait([self._conns[r] for r in pending], left)
            for conn in ready:
                assert isinstance(conn, Connection)
                rank = by_conn[id(conn)]
                self._handle(rank, conn, want, replies)
                if rank in replies or rank in self._failures:
                    pending.discard(rank)
        if self._failures:
            # Give the others a moment to report their own view of the failure, then
            # kill everyone: a rank whose peer died usually hangs until its deadline.
            self._drain(pending, min(_KILL_GRACE_S, max(0.0, deadline - time.monotonic())))
            failures = dict(self._failures)
            self.kill()
            raise RanksFailed(f"{self._name}: {what} failed", failures)
        if pending:
            self._drain(pending, 0.0)
            failures = dict(self._failures)
            for rank in pending:
                failures.setdefault(rank, f"killed: no answer within {timeout:.1f}s ({what})")
            self.kill()
            raise RanksFailed(f"{self._name}: {what} timed out after {timeout:.1f}s", failures)
        return [replies[r] for r in range(self.world)]

    def _drain(self, pending: set[int], grace: float) -> None:
        """Collect error reports from ``pending`` ranks for up to ``grace`` seconds."""
        end = time.monotonic() + grace
        left = {id(self._conns[r]): r for r in pending if r not in self._failures}
        while left:
            conns = [self._conns[r] for r in left.values()]
            ready = multiprocessing.connection.wait(conns, max(0.0, end - time.monotonic()))
            if not ready:
                return
            for conn in ready:
                rank = left.pop(id(conn))
                assert isinstance(conn, Connection)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    continue
                if kind == _ERR:
                    self._failures[rank] = payload
                else:  # still talking (e.g. an exchange): it has not failed yet
                    left[id(conn)] = rank

    def _handle(self, rank: int, conn: Connection, want: str, replies: dict[int, Any]) -> None:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            proc = self._procs[rank]
            proc.join(1.0)
            self._failures[rank] = f"process died (exit status {proc.exitcode})"
            return
        if kind == _ERR:
            self._failures[rank] = payload
        elif kind == _XCHG:
            self._xchg[rank] = payload
            if len(self._xchg) == self.world:
                gathered = [self._xchg[r] for r in range(self.world)]
                self._xchg.clear()
                for c in self._conns:
                    c.send((_XCHG, gathered))
        elif kind == _OK:
            self._results[rank] = payload
            if want == _OK:
                replies[rank] = payload
            else:
                self._failures[rank] = f"returned while the parent expected a reply ({want})"
        elif kind == want:
            replies[rank] = payload
        else:
            self._failures[rank] = f"unexpected message {kind!r}"


def run_ranks(
    fn: Callable[..., T], world: int, *args: Any, timeout: float = 60.0, name: str = "rank"
) -> list[T]:
    """Run ``fn(ctx, *args)`` in ``world`` spawned processes; return the results by rank.

    ``fn`` must be importable (a module-level function) and its arguments and result
    picklable. Raises :class:`RanksFailed` with per-rank tracebacks if any rank raises,
    dies, or the whole run takes longer than ``timeout`` seconds; every process is
    killed (by PID) and reaped before this returns or raises.
    """
    pool: RankPool[T] = RankPool(fn, world, *args, name=name)
    with pool:
        return pool.join(timeout)

"""Faults over real processes: every survivor fails cleanly, inputs intact, nothing leaks.

Each test starts its own small set of rank processes (world 3) with a harness of its
own (:class:`_Ranks`): unlike :func:`run_ranks` it lets the parent signal one rank
(SIGKILL, SIGSTOP) by PID and still collect the survivors' reports. Each rank:

* records its thread and fd baseline before it binds anything,
* builds a group (epoch 5, ``timeout_s=1``, ``probe_s=0.3``) and runs all-reduces in a
  loop, saving a copy of its input before each call,
* on :class:`PeerFailure` records the error's fields, the time it was raised
  (``time.monotonic()`` is system-wide, so the parent subtracts its signal time), and
  whether the input still holds exactly its original bytes; then checks that a second
  op on the broken group fails at once, closes the group (timed), and waits for its
  threads and fds to return to the baseline.

Frame faults come from :mod:`phalanx.testing.faults` on the misbehaving rank. The
conftest fixture fails any test that leaves a child process behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, bind, pageswap
from phalanx.comm.transport import connect_link
from phalanx.errors import AuthError, GroupClosed, HandshakeError, PeerFailure
from phalanx.testing.faults import (
    FaultInjector,
    corrupt_header,
    foreign_epoch,
    oversize_length,
)
from phalanx.testing.launcher import die_with_parent

WORLD = 3
EPOCH = 5
SECRET = b"phalanx-fault-tests-secret-32byt"
FAST = CommOptions(timeout_s=1.0, probe_s=0.3, connect_timeout_s=10.0, handshake_timeout_s=2.0)
SLACK_S = 3.0  # scheduling slack on a shared 2-core machine
STARTUP_S = 120.0  # spawning the ranks and building their group, on a loaded machine

# ----------------------------------------------------------------------------- harness


class _Ctx:
    """What a rank sees of the parent: exchange, progress messages, commands."""

    def __init__(self, rank: int, conn: Connection) -> None:
        self.rank = rank
        self.conn = conn

    def exchange(self, obj: Any) -> list[Any]:
        self.conn.send(("xchg", obj))
        if not self.conn.poll(30):
            raise TimeoutError("no exchange from the parent in 30 s")
        kind, payload = self.conn.recv()
        assert kind == "xchg", kind
        return list(payload)

    def progress(self, obj: Any) -> None:
        self.conn.send(("progress", obj))

    def wait_go(self) -> None:
        if not self.conn.poll(30):
            raise TimeoutError("no go from the parent in 30 s")
        kind, _ = self.conn.recv()
        assert kind == "go", kind


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _baseline() -> tuple[int, int]:
    return threading.active_count(), _fd_count()


def _settled(base: tuple[int, int], within: float = 2.0) -> dict[str, Any]:
    """Wait until threads and fds are back to ``base``; report what is left."""
    deadline = time.monotonic() + within
    while True:
        threads, fds = _baseline()
        if (threads, fds) == base or time.monotonic() > deadline:
            return {
                "threads_left": threads - base[0],
                "fds_left": fds - base[1],
                "thread_names": [t.name for t in threading.enumerate()],
            }
        time.sleep(0.02)


def _child(
    fn: Callable[..., dict[str, Any]], rank: int, conn: Connection, args: tuple[Any, ...]
) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="rank" + str(rank) + " %(message)s")
    try:
        result = fn(_Ctx(rank, conn), *args)
        conn.send(("result", result))
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", traceback.format_exc()))
    conn.close()


class _Ranks:
    """``WORLD`` spawned ranks running ``fn(ctx, *args)``; killed and reaped on exit."""

    def __init__(self, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        mp = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        for rank in range(WORLD):
            parent, child = mp.Pipe()
            p = mp.Process(target=_child, args=(fn, rank, child, args), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.progress: dict[int, list[Any]] = {r: [] for r in range(WORLD)}
        self.results: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, str] = {}
        self._xchg: dict[int, Any] = {}
        self.last_exchange: list[Any] = []
        self.dead: set[int] = set()

    def pid(self, rank: int) -> int:
        pid = self.procs[rank].pid
        assert pid is not None
        return pid

    def signal(self, rank: int, sig: signal.Signals) -> float:
        os.kill(self.pid(rank), sig)
        if sig == signal.SIGKILL:
            self.dead.add(rank)
        return time.monotonic()

    def pump(self, until: Callable[[], bool], timeout: float) -> None:
        """Serve messages until ``until()`` holds; fail the test past ``timeout``."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.errors:
                pytest.fail("a rank raised:\n" + "\n".join(self.errors.values()))
            live = [
                c for r, c in enumerate(self.conns) if r not in self.dead and r not in self.results
            ]
            left = deadline - time.monotonic()
            if left <= 0 or not live:
                pytest.fail(
                    f"ranks did not get there within {timeout}s: results {sorted(self.results)}"
                    f", progress { {r: p[-1:] for r, p in self.progress.items()} }"
                )
            for conn in multiprocessing.connection.wait(live, min(left, 0.5)):
                assert isinstance(conn, Connection)
                rank = self.conns.index(conn)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    self.dead.add(rank)
                    if rank not in self.results:
                        self.errors[rank] = f"rank {rank} died (exit {self.procs[rank].exitcode})"
                    continue
                if kind == "xchg":
                    self._xchg[rank] = payload
                    if len(self._xchg) == WORLD:
                        got = [self._xchg[r] for r in range(WORLD)]
                        self.last_exchange = got
                        self._xchg.clear()
                        for c in self.conns:
                            c.send(("xchg", got))
                elif kind == "progress":
                    self.progress[rank].append(payload)
                elif kind == "result":
                    self.results[rank] = payload
                else:
                    self.errors[rank] = payload

    def started(self, timeout: float = STARTUP_S) -> None:
        """Wait until every rank built its group and finished an op (or reported): on
        a loaded machine starting three interpreters alone can take tens of seconds,
        which the op phase's own deadline must not pay for (run 183 of a 200-run loop
        of test_corrupt_frame: no rank had finished an op after 30 s)."""
        self.pump(lambda: all(self.progress[r] or r in self.results for r in range(WORLD)), timeout)

    def go(self) -> None:
        for c in self.conns:
            c.send(("go", None))

    def wait_results(self, ranks: set[int], timeout: float) -> dict[int, dict[str, Any]]:
        self.pump(lambda: ranks <= self.results.keys(), timeout)
        return {r: self.results[r] for r in sorted(ranks)}

    def close(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.exitcode is None and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
            self.dead.add(rank)
        for p in self.procs:
            p.join(10)
        for c in self.conns:
            c.close()

    def __enter__(self) -> _Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- rank bodies


def _group(ctx: _Ctx, hook: FaultInjector | None, options: CommOptions = FAST) -> Group:
    listener = bind("127.0.0.1:0")
    addresses = ctx.exchange(listener.address)
    return Group(
        ctx.rank,
        addresses,
        SECRET,
        listener=listener,
        epoch=EPOCH,
        options=options,
        frame_hook=hook,
    )


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


class _LogTap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _loop_until_failure(
    ctx: _Ctx,
    hook: FaultInjector | None,
    n: int,
    max_s: float,
    ring: bool = True,
    options: CommOptions = FAST,
) -> dict[str, Any]:
    """All-reduce ``n`` float32 elements until the group fails; report the failure."""
    tap = _LogTap()
    logging.getLogger("phalanx").addHandler(tap)
    base = _baseline()
    g = _group(ctx, hook, options)
    out: dict[str, Any] = {"pid": os.getpid()}
    rng = np.random.default_rng(ctx.rank)
    pattern = rng.integers(-1000, 1000, n).astype(np.float32)
    x = pattern.copy()
    out["swappable"] = pageswap.eligible(x)  # which ring runs: see comm/pageswap.py
    done = 0
    end = time.monotonic() + max_s
    try:
        while time.monotonic() < end:
            before = x.copy()
            try:
                info = g.all_reduce(x, "sum")
            except PeerFailure as exc:
                out["t_raise"] = time.monotonic()
                out.update(
                    op=exc.op,
                    seq=exc.seq,
                    epoch=exc.epoch,
                    suspects=sorted(exc.suspects),
                    reason=exc.reason,
                    detected_by=exc.detected_by,
                    text=str(exc),
                    intact=x.tobytes() == before.tobytes(),
                    ops_done=done,
                )
                break
            if done == 0:
                out["algorithm"] = info.algorithm
            done += 1
            ctx.progress(done)
            x = before  # the next op gets a fresh (known) input
        else:
            out["no_failure"] = f"{done} ops in {max_s}s without a failure"
            return out
        # the group is broken: the next op fails at once, input untouched
        y = pattern.copy()
        t = time.monotonic()
        try:
            g.all_reduce(y, "sum")
            out["second"] = "succeeded"
        except (PeerFailure, GroupClosed) as exc:
            out["second"] = type(exc).__name__
        out["second_s"] = time.monotonic() - t
        out["second_intact"] = y.tobytes() == pattern.tobytes()
    finally:
        t = time.monotonic()
        g.close()
        out["close_s"] = time.monotonic() - t
    out.update(_settled(base))
    out["peak_rss_mib"] = _peak_rss_kib() / 1024
    out["log"] = [line for line in tap.lines if "link-down" in line or "op-failed" in line]
    if hook is not None:
        out["fired"] = [(f.peer, f.seq, f.ordinal, f.action) for f in hook.fired]
    return out


def _faulty_rank(
    ctx: _Ctx, hooks: dict[int, FaultInjector], n: int, options: CommOptions = FAST
) -> dict[str, Any]:
    return _loop_until_failure(ctx, hooks.get(ctx.rank), n, max_s=30.0, options=options)


def _survivor_checks(r: dict[str, Any], *, failed_after: float | None = None) -> None:
    assert "no_failure" not in r, r
    assert r["op"] == "all_reduce" and r["epoch"] == EPOCH, r
    assert r["intact"], f"input changed by the failed op: {r}"
    assert r["second"] in ("PeerFailure", "GroupClosed") and r["second_s"] < 0.5, r
    assert r["second_intact"], r
    assert r["close_s"] < 3.0, r
    assert r["threads_left"] == 0, f"leaked threads: {r['thread_names']}"
    assert r["fds_left"] == 0, f"leaked {r['fds_left']} fds"


# ----------------------------------------------------------------------------- tests

DETECTION: dict[str, dict[int, float]] = {}


@pytest.mark.parametrize("page_swap", [True, False], ids=["page-swap", "save"])
def test_sigkill_mid_op(page_swap: bool) -> None:
    """SIGKILL a rank in the middle of 32 MiB all-reduces: the others raise
    PeerFailure naming it, within a bounded time, with their input intact -- both
    when the ring works in a twin and swaps pages on success (the default at this
    size) and when it works in place and saves the input (page swap off)."""
    n = 8 * 1024 * 1024  # 32 MiB of float32: ring (pipelined where not crowded)
    options = dataclasses.replace(FAST, page_swap_min_bytes=4 << 20 if page_swap else 0)
    with _Ranks(_faulty_rank, {}, n, options) as ranks:
        ranks.pump(lambda: len(ranks.progress[0]) >= 2, 60)
        t_kill = ranks.signal(2, signal.SIGKILL)
        res = ranks.wait_results({0, 1}, 10 + SLACK_S)
    for rank, r in res.items():
        assert r["swappable"], "numpy's memory should be page-swappable on Linux"
        _survivor_checks(r)
        # the first survivor to notice passes its verdict on (ABORT before FIN, and it
        # drains instead of resetting), so both name the killed rank
        assert r["suspects"] == [2], r["text"]
        assert r["reason"] in ("disconnected", "aborted", "closed"), r
        DETECTION.setdefault(f"sigkill {page_swap=}", {})[rank] = r["t_raise"] - t_kill
        assert r["t_raise"] - t_kill < 10.0, r
    assert any(r["suspects"] == [2] for r in res.values()), res
    print("sigkill detection", DETECTION, "peak RSS MiB", res[0]["peak_rss_mib"])


def test_sigstop_past_the_deadline() -> None:
    """A frozen rank (SIGSTOP) is declared failed by timeout within timeout + probe."""
    n = 256 * 1024  # 1 MiB
    with _Ranks(_faulty_rank, {}, n) as ranks:
        ranks.pump(lambda: len(ranks.progress[0]) >= 3, 60)
        t_stop = ranks.signal(2, signal.SIGSTOP)
        try:
            res = ranks.wait_results({0, 1}, FAST.timeout_s + FAST.probe_s + 2 * SLACK_S)
        finally:
            ranks.signal(2, signal.SIGCONT)
            ranks.signal(2, signal.SIGKILL)
    bound = FAST.timeout_s + FAST.probe_s + SLACK_S
    for rank, r in res.items():
        _survivor_checks(r)
        assert r["suspects"] == [2], r
        assert r["reason"] == "timeout", r
        DETECTION.setdefault("sigstop", {})[rank] = r["t_raise"] - t_stop
        assert r["t_raise"] - t_stop < bound, r
    print("sigstop detection", DETECTION["sigstop"])


def _frame_fault(hook: FaultInjector, n: int = 300_000) -> dict[int, dict[str, Any]]:
    with _Ranks(_faulty_rank, {2: hook}, n) as ranks:
        ranks.started()
        res = ranks.wait_results({0, 1, 2}, 30)
    for r in res.values():
        _survivor_checks(r)
    assert res[2]["fired"] == [(0, 3, 0, res[2]["fired"][0][3])], res[2]
    # the receiver blames the sender of the bad frame and tells everyone, the culprit
    # included; every rank relays the verdict before it shuts its links, so all agree
    for r in res.values():
        assert r["suspects"] == [2] and r["detected_by"] == 0, r
        assert r["reason"] == res[0]["reason"], r
    print("rank 1 blamed", res[1]["suspects"], "culprit blamed", res[2]["suspects"])
    for r in res.values():
        assert r["ops_done"] == 3 and r["seq"] == 3, r
    return res


def test_corrupt_frame() -> None:
    """A DATA frame from rank 2 to rank 0 with a flipped header byte (stale CRC)."""
    res = _frame_fault(corrupt_header(peer=0, seq=3))
    assert res[0]["reason"] == "protocol", res[0]
    assert any("bad-crc" in line for line in res[0]["log"]), res[0]["log"]


def test_frame_from_another_epoch() -> None:
    """A well-formed DATA frame of epoch 4 in epoch 5 is refused as foreign."""
    res = _frame_fault(foreign_epoch(peer=0, seq=3, epoch=EPOCH - 1))
    assert res[0]["reason"] == "foreign-epoch", res[0]


def test_length_field_of_2_to_the_40() -> None:
    """A well-formed header announcing 1 TiB: link closed (too-large), nothing allocated."""
    res = _frame_fault(oversize_length(peer=0, seq=3, length=2**40))
    assert res[0]["reason"] == "protocol", res[0]
    assert any("too-large" in line for line in res[0]["log"]), res[0]["log"]
    for r in res.values():
        assert r["peak_rss_mib"] < 400, r  # a trusted length field would want 1 TiB


def test_the_culprit_is_told_why_it_was_expelled() -> None:
    """After rank 0 refuses rank 2's corrupt frame, rank 2 learns that it was expelled
    (suspects [2], detected by 0) instead of accusing rank 0, so no survivor can hear a
    wrong verdict first."""
    with _Ranks(_faulty_rank, {2: corrupt_header(peer=0, seq=3)}, 300_000) as ranks:
        ranks.started()
        res = ranks.wait_results({0, 1, 2}, 30)
    assert res[2]["suspects"] == [2] and res[2]["detected_by"] == 0, res[2]
    assert res[1]["suspects"] == [2], res[1]


def _wrong_secret_rank(ctx: _Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = _baseline()
    # 1. rank 2 has the wrong secret: it gets AuthError, the others time out
    listener = bind("127.0.0.1:0")
    addresses = ctx.exchange(listener.address)
    secret = b"x" * 32 if ctx.rank == 2 else SECRET
    opts = CommOptions(connect_timeout_s=2.0, handshake_timeout_s=1.0)
    t = time.monotonic()
    try:
        Group(ctx.rank, addresses, secret, listener=listener, epoch=EPOCH, options=opts).close()
        out["bad_group"] = "built"
    except HandshakeError as exc:
        out["bad_group"] = type(exc).__name__
        out["bad_reason"] = exc.reason
    out["bad_group_s"] = time.monotonic() - t
    out["after_bad"] = _settled(base)
    # 2. a legit group; a stranger (the parent) knocks with the wrong secret
    listener = bind("127.0.0.1:0")
    addresses = ctx.exchange(listener.address)
    with Group(ctx.rank, addresses, SECRET, listener=listener, epoch=EPOCH, options=FAST) as g:
        ctx.progress("up")
        ctx.wait_go()  # the parent has knocked now
        x = np.full(1000, ctx.rank + 1, dtype=np.int64)
        g.all_reduce(x, "sum")
        out["sum_ok"] = bool((x == sum(range(1, WORLD + 1))).all())
        deadline = time.monotonic() + 3  # rank 0's acceptor thread counts the refusal
        while g.rejected < 1 and ctx.rank == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        out["rejected"] = g.rejected
    out["after_good"] = _settled(base)
    return out


def test_wrong_secret() -> None:
    """Promise 7: a rank with the wrong secret gets AuthError, the others a
    HandshakeError on their connect deadline; a stranger knocking on a live group gets
    AuthError and the group keeps working."""
    with _Ranks(_wrong_secret_rank) as ranks:
        ranks.pump(lambda: all(ranks.progress[r] == ["up"] for r in range(WORLD)), 60)
        with pytest.raises(AuthError):
            connect_link(
                ranks.last_exchange[0],
                secret=b"y" * 32,
                epoch=EPOCH,
                world=WORLD,
                rank=2,
                peer=0,
                stream=0,
                streams=1,
                buffer_bytes=64 * 1024,
                deadline=time.monotonic() + 5,
                handshake_timeout=2.0,
            )
        ranks.go()
        res = ranks.wait_results({0, 1, 2}, 30)
    assert res[2]["bad_group"] == "AuthError", res[2]
    for rank in (0, 1):
        assert res[rank]["bad_group"] == "HandshakeError", res[rank]
        assert res[rank]["bad_group_s"] < 2.0 + 1.0 + SLACK_S, res[rank]
    for r in res.values():
        assert r["sum_ok"], r
        assert r["after_bad"]["threads_left"] == 0 and r["after_bad"]["fds_left"] == 0, r
        assert r["after_good"]["threads_left"] == 0 and r["after_good"]["fds_left"] == 0, r
    assert res[0]["rejected"] == 1, res[0]

"""``phalanx bench coordinator``: one coordinator process under N simulated members.

The parent starts ``phalanx coordinator`` as a process of its own and ``--procs`` load
processes (:mod:`phalanx.membership._loadgen`) that simulate the members with
asyncio over the gRPC API: every member joins, heartbeats at the pace the coordinator
asks for (``membership/pacing.py``: 0.15 s up to 300 members, doubled as often as it
takes to keep the beats within ``max_beat_rate``, 2,000/s) and keeps a Watch stream open. Once all are in the
view, for ``--window`` seconds it keeps the load on and adds churn: every
``--churn-every`` seconds a member joins or one leaves, and ``--failures`` times a
member fails as a SIGKILL looks to the coordinator (its heartbeats stop and its Watch
stream drops; a surviving member reports it at once, as the data plane would).

Output, one row per member count (JSON lines with ``--json``):

* ``coordinator_cores``: the coordinator process's CPU time (user + system, from
  /proc) over the window divided by the window -- the load processes' CPU is not in it;
* ``heartbeats_per_s`` and ``cpu_per_heartbeat_us`` (all of the coordinator's CPU,
  churn included, per heartbeat it acknowledged);
* ``failure_to_all_s``: per failure, the time from the failure to the moment the last
  surviving member's Watch delivered a view without the failed member (``median``,
  ``max``, ``samples``), and ``failure_member_median_s`` (the median member); a failure
  that did not reach every live member within ``_FAILURE_DEADLINE_S`` is a ``null``
  sample, counted in ``failures_incomplete`` and left out of median and max;
* ``ok``: median failure_to_all_s <= 0.1 s, coordinator_cores <= 1 and no incomplete
  failure.

``--members`` takes one count or a comma list (the curve: ``100,300,1000,3000``).
Every wait has a deadline; every process is stopped and reaped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from phalanx.bench._harness import print_json, progress
from phalanx.membership._loadgen import load_main
from phalanx.membership.config import MembershipConfig
from phalanx.testing.launcher import Launcher, Proc

__all__ = ["register", "run_bench"]

_MP = multiprocessing.get_context("spawn")
_TICKS = os.sysconf("SC_CLK_TCK")
_OK_MEDIAN_S = 0.1
_OK_CORES = 1.0
_FAILURE_DEADLINE_S = 10.0  # a failure must reach every live member within this


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


class _Loads:
    """The load processes and their pipes."""

    def __init__(self, address: str, secret: bytes, interval: float, ids: list[str],
                 procs: int, unary: bool = False) -> None:  # fmt: skip
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.owner: dict[str, int] = {}
        self.last_error = ""  # the first failed heartbeat's gRPC status, if any
        self.beat_latency: tuple[float | None, float | None] = (None, None)  # p50, p99
        self.alive = 0  # simulated members still in the group (at the last stats())
        self.rejoins = 0  # evicted members that came back (at the last stats())
        self.max_lag = 0.0  # the load processes' worst event-loop lag (they starve members)
        self.interval = interval  # the heartbeat pace the coordinator asked for (last stats())
        for p in range(procs):
            part = ids[p::procs]
            parent, child = _MP.Pipe()
            proc = _MP.Process(target=load_main,
                               args=(address, secret, interval, part, child, unary),
                               name=f"bench-load-{p}", daemon=True)  # fmt: skip
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
            for m in part:
                self.owner[m] = p

    def ask(self, p: int, msg: tuple[Any, ...], timeout: float = 60.0) -> tuple[Any, ...]:
        conn = self.conns[p]
        conn.send(msg)
        if not conn.poll(timeout):
            raise RuntimeError(f"load process {p} did not answer {msg[0]!r} in {timeout}s")
        reply = conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"load process {p}: {reply[1]}")
        return tuple(reply)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"load process {p}: members not joined within {timeout}s")
            reply = conn.recv()
            if reply[0] != "ready":
                raise RuntimeError(f"load process {p}: {reply}")

    def stats(self) -> tuple[int, int, int]:
        acked = failed = events = 0
        self.alive = 0
        self.rejoins = 0
        for p in range(len(self.conns)):
            reply = self.ask(p, ("stats",))
            _, a, f, e, alive, self.last_error, p50, p99, lag, rejoins, self.interval = reply[:11]
            self.max_lag = max(self.max_lag, lag)
            self.rejoins += rejoins
            self.beat_latency = (p50, p99)
            acked, failed, events = acked + a, failed + f, events + e
            self.alive += alive
        return acked, failed, events

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(10.0)
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.join(5.0)
        for conn in self.conns:
            conn.close()


def _start_coordinator(launcher: Launcher, members: int) -> tuple[Proc, str]:
    proc = launcher.start_coordinator("--no-probe", "--recovery-grace", "0",
                                      "--max-members", str(members + 64))  # fmt: skip
    launcher.wait_ready(proc, 30.0)
    return proc, proc.info["address"]


def run_bench(
    members: int,
    *,
    window: float = 20.0,
    failures: int = 5,
    churn_every: float = 2.0,
    procs: int = 0,
    log_level: str | None = None,
    keep: Path | None = None,
    unary: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """One member count (see the module docstring); returns the result row."""
    interval = MembershipConfig().heartbeat_interval
    procs = procs or max(1, min(4, members // 500 + 1))
    ids = [f"m{i}" for i in range(members)]
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-coord-") as d:
        launcher = Launcher(keep or Path(d), log_level=log_level)
        coord, address = _start_coordinator(launcher, members)
        secret = launcher.secret
        loads = None
        try:
            loads = _Loads(address, secret, interval, ids, procs, unary)
            t_join = time.monotonic()
            loads.wait_ready(60.0 + members / 20)
            say(f"{members} members joined after {time.monotonic() - t_join:.1f}s")
            time.sleep(2.0)  # every member's Watch is open and its beats are spread
            # members evicted during the join storm come back as agents do; the window
            # starts once all are in the group again (or after a bounded wait)
            settle_by = time.monotonic() + 30.0 + members / 50
            acked0, failed0, _ = loads.stats()
            while loads.alive < members and time.monotonic() < settle_by:
                time.sleep(0.5)
                acked0, failed0, _ = loads.stats()
            settled_s = time.monotonic() - t_join
            say(f"{loads.alive} of {members} members alive after {settled_s:.1f}s "
                f"({loads.rejoins} rejoined after an eviction)")  # fmt: skip
            alive0, rejoins0 = loads.alive, loads.rejoins
            cpu0, t0 = _cpu_s(coord.pid), time.monotonic()
            load_pids = [p.pid for p in loads.procs if p.pid is not None]
            load0 = sum(_cpu_s(pid) for pid in load_pids)
            samples: list[float | None] = []  # None: it did not reach every member
            medians: list[float] = []
            joins = leaves = 0
            fail_at = {t0 + window * (i + 1) / (failures + 1) for i in range(failures)}
            next_churn = t0 + churn_every / 2
            spare = members
            while time.monotonic() < t0 + window:
                now = time.monotonic()
                due = [t for t in fail_at if t <= now]
                if due:
                    fail_at -= set(due)
                    lat = _failure(loads, len(samples) % procs)
                    if lat is not None:
                        samples.append(lat[0])
                        if lat[1] is not None:
                            medians.append(lat[1])
                elif now >= next_churn:
                    next_churn += churn_every
                    if (joins + leaves) % 2 == 0:
                        new = f"m{spare}"
                        spare += 1
                        p = (joins + leaves) % procs
                        loads.owner[new] = p
                        loads.ask(p, ("join", new))
                        joins += 1
                    else:
                        p = (joins + leaves) % procs
                        live = loads.ask(p, ("live",))[1]
                        if live:
                            loads.ask(p, ("leave", live[-1]))
                            loads.owner.pop(live[-1], None)
                            leaves += 1
                else:
                    time.sleep(0.02)
            cpu1, t1 = _cpu_s(coord.pid), time.monotonic()
            load1 = sum(_cpu_s(pid) for pid in load_pids)
            acked1, failed1, events = loads.stats()
            beat_p50, beat_p99 = loads.beat_latency
        finally:
            if loads is not None:
                loads.close()
            launcher.close(10.0)
    span = t1 - t0
    cpu = cpu1 - cpu0
    beats = acked1 - acked0
    fails = _failure_fields(samples, medians)
    latencies = [x for x in samples if x is not None]
    med = statistics.median(latencies) if latencies else None
    return {
        "bench": "coordinator",
        "members": members,
        "load_procs": procs,
        "beats": "unary" if unary else "stream",
        # the pace the coordinator set for this many members (pacing.py), at the end
        "heartbeat_interval_s": loads.interval,
        "window_s": round(span, 2),
        "heartbeats_per_s": round(beats / span, 1),
        "heartbeats_failed": failed1 - failed0,
        # simulated members still in the group at the window's start and end (a member
        # the coordinator evicted stops, as an evicted agent would until it rejoins)
        "members_alive": [alive0, loads.alive],
        # evictions (then rejoins) while the members joined, and during the window
        "rejoins": [rejoins0, loads.rejoins - rejoins0],
        "settled_s": round(settled_s, 2),
        "coordinator_cores": round(cpu / span, 3),
        "load_cores": round((load1 - load0) / span, 3),  # the simulated members' processes
        "load_max_lag_s": round(loads.max_lag, 3),
        "heartbeat_rtt_s": {
            "p50": None if beat_p50 is None else round(beat_p50, 4),
            "p99": None if beat_p99 is None else round(beat_p99, 4),
        },
        "cpu_per_heartbeat_us": round(1e6 * cpu / beats, 1) if beats else None,
        **fails,
        "joins": joins,
        "leaves": leaves,
        "watch_events": events,
        # a run whose members missed beats measured a coordinator under less load than
        # asked (or evicted members): not ok, whatever the figures
        "ok": _ok(
            median=med,
            incomplete=fails["failures_incomplete"],
            cores=cpu / span,
            failed=failed1 - failed0,
            beats=beats,
            alive=alive0,
            members=members,
        ),
    }


def _failure_fields(samples: list[float | None], medians: list[float]) -> dict[str, Any]:
    """The row's failure fields; a ``None`` sample (the failure did not reach every live
    member in time) is kept as ``null`` and counted, never averaged in."""
    latencies = [x for x in samples if x is not None]
    med = statistics.median(latencies) if latencies else None
    return {
        "failure_to_all_s": {
            "median": None if med is None else round(med, 4),
            "max": round(max(latencies), 4) if latencies else None,
            "samples": [None if x is None else round(x, 4) for x in samples],
        },
        "failure_member_median_s": round(statistics.median(medians), 4) if medians else None,
        "failures": len(samples),
        "failures_incomplete": len(samples) - len(latencies),
    }


def _ok(*, median: float | None, incomplete: int, cores: float, failed: int, beats: int,
        alive: int, members: int) -> bool:  # fmt: skip
    """The row's verdict. A run whose members missed beats measured a coordinator
    under less load than asked (or evicted members), and one whose failure did not
    reach every member has no latency for it: not ok, whatever the figures."""
    return (
        median is not None
        and incomplete == 0
        and median <= _OK_MEDIAN_S
        and cores <= _OK_CORES
        and failed <= 0.01 * max(1, beats)
        and alive >= members
    )


def _failure(loads: _Loads, p: int) -> tuple[float | None, float | None] | None:
    """Fail a live member of load process ``p`` (another of its members reports it);
    (failure -> the last live member holds a view without it, the median member).
    ``None`` when no failure could be injected; ``(None, None)`` when it did not reach
    every live member within ``_FAILURE_DEADLINE_S`` (no latency from part of them)."""
    live = loads.ask(p, ("live",))[1]
    if len(live) < 2:
        return None
    victim, reporter = live[0], live[1]
    t_fail = loads.ask(p, ("fail", victim, reporter))[1]
    if t_fail is None:
        return None
    deadline = time.monotonic() + _FAILURE_DEADLINE_S
    arrivals: list[float] = []
    complete = False
    while True:
        arrivals, expected = [], 0
        for q in range(len(loads.conns)):
            _, got, n = loads.ask(q, ("arrivals", victim, t_fail))
            arrivals += got
            expected += n
        complete = bool(arrivals) and len(arrivals) >= expected
        if complete or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    loads.owner.pop(victim, None)
    if not complete:
        return None, None
    lat = [a - t_fail for a in arrivals]
    return max(lat), statistics.median(lat)


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add this benchmark's options to ``parser``; return the function that runs it."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--members", default="1000",
                        help="simulated members: a count or a comma list (100,300,1000,3000)")  # fmt: skip
    parser.add_argument("--window", type=float, default=20.0, help="seconds of steady load")
    parser.add_argument("--failures", type=int, default=5, help="failures in the window")
    parser.add_argument("--churn-every", type=float, default=2.0,
                        help="seconds between a join and a leave (alternating)")  # fmt: skip
    parser.add_argument("--procs", type=int, default=0, help="load processes (0: by size)")
    parser.add_argument("--unary-beats", action="store_true",
                        help="members send unary Heartbeat calls (an older agent) instead of "
                        "one Beats stream each")  # fmt: skip
    parser.add_argument("--keep-dir", metavar="DIR",
                        help="keep the coordinator's logs in DIR/<members>/")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON line per member count")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    def run(args: argparse.Namespace) -> int:
        try:
            counts = [int(x) for x in str(args.members).split(",") if x.strip()]
        except ValueError:
            parser.error(f"--members wants a count or a comma list, got {args.members!r}")
        if not counts or min(counts) < 3 or args.window <= 0 or args.failures < 1:
            parser.error("--members >= 3, --window > 0 and --failures >= 1")
        ok = True
        for n in counts:
            row = run_bench(n, window=args.window, failures=args.failures,
                            churn_every=args.churn_every, procs=args.procs,
                            log_level=getattr(args, "log_level", None),
                            unary=args.unary_beats,
                            keep=Path(args.keep_dir) / str(n) if args.keep_dir else None,
                            say=(lambda m: None) if args.quiet else progress)  # fmt: skip
            ok = ok and bool(row["ok"])
            if args.json:
                print_json(row)
            else:
                print(" ".join(f"{k}={v}" for k, v in row.items()))
            sys.stdout.flush()
        return 0 if ok else 1

    return run

"""``phalanx bench failover``: how fast a running group gets back to work after a fault.

The parent starts a coordinator process and ``--world`` peer processes (multiprocessing
*spawn*), each an :class:`~phalanx.membership.elastic.ElasticGroup` running a stream of
steps: ``begin_step`` (view install + state sync), one ``--size`` float32 all-reduce
with ``retry=True``, a check of the result, ``commit(step, correct)``. Peer ``peer-i``
contributes ``base * (i + 1) + step % 11`` with ``base[j] = 1 + j % 7`` (small integers:
float sums are exact), so the result of a step run by contributor set ``C`` must equal
``base * sum(i + 1 for i in C) + len(C) * (step % 11)`` bit for bit. The state kept in
sync is ``--state-size`` bytes of seeded random float32 plus a step marker.

After ``--warmup-ops`` steps the fault is injected:

* ``kill``: SIGKILL the last peer; ``stop``: SIGSTOP it, then SIGCONT once the others
  resumed (it must learn it was evicted, rejoin, sync state and contribute);
* ``leave``: the last peer leaves gracefully at a step boundary;
* ``join``: a new peer process is started (its start-up counts) and joins. With
  ``--joiner-state arrays`` (the default) it holds arrays of the state's shapes, filled
  but not valid, as a client that built its model and ``attach_state()``-ed it does,
  and the sync writes into them; with ``empty`` it holds nothing and the sync
  allocates the arrays (``SyncState.empty()``, the in-process API's newcomer);
* ``coordinator``: SIGKILL the coordinator and restart it on the same port.

Output: one JSON line (``--json``) or ``key=value`` pairs: ``fault``, ``world``,
``detect_s`` (fault -> every survivor holds the new view), ``resume_s`` (fault ->
every member completed an op in the new view; for ``join``: one the joiner contributed
to; for ``coordinator``, whose view does not change: a step committed after the fault),
``ops_failed`` (steps in which a surviving member saw a failed attempt), ``correct``
(every successful op equals the exact sum over the view that ran it, and members of a
view agree on its contributors), ``commit_agree`` (each (epoch, step) got the same
commit answer on every member; the fault's victim may answer "unknown" -- frozen in
its vote and evicted, it cannot learn the decision), plus details. Exit status 1 if a check failed.

Every wait has a deadline (``--timeout``); every child is killed by PID at the end.
Timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for all processes).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, cast

import numpy as np

from phalanx.bench._harness import parse_size, print_json, progress
from phalanx.testing.launcher import die_with_parent

__all__ = ["FAULTS", "Scenario", "register", "run_scenario"]

log = logging.getLogger(__name__)

FAULTS = ("kill", "stop", "leave", "join", "coordinator")
JOINER_STATES = ("arrays", "empty")
_MP = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Scenario:
    """One benchmark run's settings (picklable: children get parts of it)."""

    fault: str
    world: int = 3
    size: int = 16 << 20  # bytes per all-reduce
    state_size: int = 64 << 20  # bytes of synced state
    warmup_ops: int = 5
    after_ops: int = 5
    timeout: float = 60.0
    heartbeat_timeout: float | None = None  # None: the coordinator's default
    log_level: str = "WARNING"
    joiner_state: str = "arrays"  # JOINER_STATES

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}")
        if self.joiner_state not in JOINER_STATES:
            raise ValueError(f"joiner state must be one of {', '.join(JOINER_STATES)}")
        if self.world < 2 and self.fault != "join":
            raise ValueError("this fault needs --world >= 2")
        if self.world < 1 or self.size < 4 or self.state_size < 0 or self.timeout <= 0:
            raise ValueError("world >= 1, size >= 4 bytes, state size >= 0, timeout > 0")


# ----------------------------------------------------------------------------- children


def _child_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _coordinator_main(
    port: int, secret: bytes, recover: bool, hb_timeout: float | None, level: str, conn: Any
) -> None:
    from phalanx.membership.config import MembershipConfig
    from phalanx.membership.coordinator import Coordinator

    die_with_parent()
    _child_logging(level)
    cfg = MembershipConfig()
    if hb_timeout is not None:
        interval = min(cfg.heartbeat_interval, hb_timeout / 4)
        cfg = MembershipConfig(
            heartbeat_timeout=hb_timeout,
            heartbeat_interval=interval,
            confirm_window=max(interval, min(cfg.confirm_window, hb_timeout / 2)),
        )
    coord = Coordinator(f"127.0.0.1:{port}", secret=secret, config=cfg, recover=recover)
    conn.send(coord.start())
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # until the parent says stop or goes away
    coord.stop(0.5)


def _base(n: int) -> np.ndarray:
    return (1 + np.arange(n, dtype=np.int64) % 7).astype(np.float32)


def _index(member_id: str) -> int:
    return int(member_id.rsplit("-", 1)[1])


def _expected(base: np.ndarray, contributors: tuple[str, ...], step: int) -> np.ndarray:
    total = float(sum(_index(m) + 1 for m in contributors))
    out = base * np.float32(total)
    out += np.float32(len(contributors) * (step % 11))
    return out


def _initial_state(nbytes: int, fill: float | None = None) -> dict[str, np.ndarray]:
    """The state's arrays: seeded random (the initial group's), or ``fill`` everywhere
    (a joiner's freshly built model, which the sync overwrites)."""
    n = nbytes // 4
    if fill is None:
        params = np.random.default_rng(7).standard_normal(n, dtype=np.float32)
    else:
        params = np.full(n, fill, dtype=np.float32)
    return {"params": params, "marker": np.zeros(1, dtype=np.int64)}


class _Events:
    """A peer's own pipe to the parent (never a queue shared by all peers: a peer
    SIGKILLed while holding a shared queue's lock would silence every other one)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def put(self, event: tuple[Any, ...]) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._conn.send(event)


def _peer_main(
    member_id: str,
    coordinator: str,
    secret: bytes,
    scenario: Scenario,
    fresh: bool,
    conn: Any,
    stop_step: Any,
    leave_now: Any,
) -> None:
    from phalanx.membership.elastic import ElasticGroup
    from phalanx.membership.errors import CommitUnknown, Evicted
    from phalanx.membership.statesync import StepAborted, SyncState

    die_with_parent()
    _child_logging(scenario.log_level)
    events = _Events(conn)
    me = member_id
    if not fresh:
        state = SyncState(_initial_state(scenario.state_size), 0)
    elif scenario.joiner_state == "arrays":  # its model is built: the sync overwrites it
        state = SyncState(_initial_state(scenario.state_size, fill=3.0), -1, valid=False)
    else:
        state = SyncState.empty()
    n = scenario.size // 4
    base = _base(n)
    mine = np.float32(_index(me) + 1)

    def on_view(v: Any) -> None:
        events.put(("view", me, v.epoch, v.ids, time.monotonic()))

    eg = ElasticGroup(coordinator, me, secret, state=state, on_view=on_view)
    deadline = time.monotonic() + scenario.timeout
    try:
        eg.join(min(30.0, scenario.timeout))
        if not fresh:  # the initial group: start the stream once everybody is in
            eg.agent.wait_for_view(lambda v: v.size >= scenario.world, 30.0)
        events.put(("joined", me, time.monotonic()))
        run = eg.agent.coordinator_run
        while time.monotonic() < deadline:
            if leave_now.is_set():
                events.put(("leaving", me, time.monotonic()))
                eg.leave(reason="bench")
                break
            try:
                info = eg.begin_step(timeout=30.0)
                step = info.step
                if step >= stop_step.value:
                    break
                if info.synced:
                    events.put(("synced", me, time.monotonic(), info.sync_bytes, info.sync_s))
                x = base * mine
                x += np.float32(step % 11)
                r = eg.all_reduce(x, retry=True, timeout=30.0)
                t_done = time.monotonic()
                correct = bool(np.array_equal(x, _expected(base, r.contributors, step)))
                try:
                    ok: bool | None = eg.commit(step, correct, timeout=30.0)
                except CommitUnknown:
                    ok = None
                t_commit = time.monotonic()
            except StepAborted:
                events.put(("aborted", me, time.monotonic()))
                continue  # back to begin_step; no vote: the step never ran in this view
            except Evicted:
                events.put(("evicted", me, time.monotonic()))
                eg.rejoin(30.0)
                events.put(("rejoined", me, time.monotonic()))
                continue
            events.put(
                (
                    "op",
                    me,
                    step,
                    r.epoch,
                    r.contributors,
                    r.failed_attempts,
                    t_done,
                    correct,
                    ok,
                    t_commit,
                )
            )
            if ok:
                state.arrays["marker"][0] = step + 1
                state.update(step + 1, changed=("marker",))
            if eg.agent.coordinator_run != run:
                run = eg.agent.coordinator_run
                events.put(("coord_run", me, time.monotonic()))
        else:
            events.put(("error", me, "peer deadline passed"))
    except Exception as exc:  # report, then die: the parent decides what it means
        events.put(("error", me, f"{type(exc).__name__}: {exc}"))
    finally:
        with contextlib.suppress(Exception):
            if not leave_now.is_set():
                eg.leave(timeout=2.0, reason="bench-done")
        eg.close()
        events.put(("done", me, time.monotonic()))


# ----------------------------------------------------------------------------- parent


@dataclass
class _Run:
    sc: Scenario
    secret: bytes
    stop_step: Any
    conns: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, BaseProcess] = field(default_factory=dict)
    leave: dict[str, Any] = field(default_factory=dict)
    coord: BaseProcess | None = None
    coord_conn: Any = None
    address: str = ""
    t_fault: float = float("inf")
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    views: list[tuple[Any, ...]] = field(default_factory=list)
    other: list[tuple[Any, ...]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def start_coordinator(self, port: int, recover: bool) -> None:
        parent, child = _MP.Pipe()
        proc = _MP.Process(
            target=_coordinator_main,
            args=(port, self.secret, recover, self.sc.heartbeat_timeout, self.sc.log_level, child),
            name="bench-coordinator",
            daemon=True,
        )
        proc.start()
        child.close()
        if not parent.poll(30.0):
            raise RuntimeError("coordinator did not start within 30 s")
        self.address = parent.recv()
        self.coord, self.coord_conn = proc, parent

    def start_peer(self, member_id: str, fresh: bool) -> None:
        leave = _MP.Event()
        parent, child = _MP.Pipe(duplex=False)
        proc = _MP.Process(
            target=_peer_main,
            args=(
                member_id,
                self.address,
                self.secret,
                self.sc,
                fresh,
                child,
                self.stop_step,
                leave,
            ),
            name=member_id,
            daemon=True,
        )
        proc.start()
        child.close()
        self.conns[member_id] = parent
        self.procs[member_id] = proc
        self.leave[member_id] = leave

    def pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            self.drain(min(left, 0.05))

    def drain(self, timeout: float) -> None:
        """Read every event that arrives within ``timeout`` seconds."""
        live = list(self.conns.values())
        if not live:
            time.sleep(timeout)
            return
        for ready in multiprocessing.connection.wait(live, timeout):
            conn = cast(Connection, ready)
            try:
                ev = conn.recv()
            except (EOFError, OSError):
                self.conns = {k: c for k, c in self.conns.items() if c is not conn}
                continue
            self.record(ev)

    def record(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "op":
            self.ops.append(ev)
        elif kind == "view":
            self.views.append(ev)
        else:
            if kind == "error":
                self.errors.append(f"{ev[1]}: {ev[2]}")
            self.other.append(ev)

    def ops_of(self, member: str) -> list[tuple[Any, ...]]:
        return [o for o in self.ops if o[1] == member]

    def has(self, kind: str, member: str) -> bool:
        return any(e[0] == kind and e[1] == member for e in self.other)

    def t_of(self, kind: str, member: str) -> float | None:
        ts = [e[2] for e in self.other if e[0] == kind and e[1] == member]
        return ts[0] if ts else None

    def kill_all(self) -> None:
        for proc in [*self.procs.values(), *([self.coord] if self.coord else [])]:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in [*self.procs.values(), *([self.coord] if self.coord else [])]:
            proc.join(10.0)


def run_scenario(sc: Scenario, *, verbose: bool = False) -> dict[str, Any]:
    """Run one fault scenario; returns the result row (see the module docstring)."""
    # lock=False: a SIGKILLed peer must not be able to die holding a shared lock
    r = _Run(sc, os.urandom(24), _MP.Value("q", 1 << 62, lock=False))

    def say(msg: str) -> None:
        progress(msg, enabled=verbose)

    t_start = time.monotonic()
    members = [f"peer-{i}" for i in range(sc.world)]
    victim = members[-1] if sc.fault in ("kill", "stop", "leave") else None
    joiner = f"peer-{sc.world}" if sc.fault == "join" else None
    row: dict[str, Any] = {"fault": sc.fault, "world": sc.world}
    try:
        r.start_coordinator(0, recover=False)
        port = int(r.address.rpartition(":")[2])
        for m in members:
            r.start_peer(m, fresh=False)
        say(f"coordinator {r.address}, {sc.world} peers starting")
        budget = sc.timeout

        def left() -> float:
            return max(0.1, budget - (time.monotonic() - t_start))

        r.pump(
            lambda: all(len(r.ops_of(m)) >= sc.warmup_ops for m in members),
            left(),
            "warm-up ops",
        )
        epoch0 = max(o[3] for o in r.ops)
        say(f"warm: epoch {epoch0}; injecting {sc.fault}")
        t_fault = time.monotonic()
        if sc.fault in ("kill", "stop"):
            assert victim is not None
            pid = r.procs[victim].pid
            assert pid is not None
            t_fault = time.monotonic()
            os.kill(pid, signal.SIGKILL if sc.fault == "kill" else signal.SIGSTOP)
        elif sc.fault == "leave":
            assert victim is not None
            r.leave[victim].set()
            r.pump(lambda: r.has("leaving", victim), left(), "the leaver")
            t_fault = r.t_of("leaving", victim) or t_fault
        elif sc.fault == "join":
            assert joiner is not None
            t_fault = time.monotonic()
            r.start_peer(joiner, fresh=True)
        else:  # coordinator
            assert r.coord is not None and r.coord.pid is not None
            t_fault = time.monotonic()
            os.kill(r.coord.pid, signal.SIGKILL)
            r.coord.join(5.0)
            r.coord_conn.close()
            r.start_coordinator(port, recover=True)
            row["coordinator_restart_s"] = round(time.monotonic() - t_fault, 4)
        r.t_fault = t_fault
        survivors = [m for m in members if m != victim]
        everyone = survivors + ([joiner] if joiner else [])

        def new_view_ok(ids: tuple[str, ...]) -> bool:
            if victim is not None:
                return victim not in ids
            if joiner is not None:
                return joiner in ids
            return False

        def resumed_at() -> float | None:
            by_key: dict[tuple[int, int], dict[str, float]] = {}
            for o in r.ops:
                _, m, step, epoch, contrib, _, t_done, _, ok, t_commit = o
                if m not in everyone:
                    continue
                if sc.fault == "coordinator":
                    if ok and t_commit > t_fault:
                        by_key.setdefault((epoch, step), {})[m] = t_commit
                elif epoch > epoch0 and new_view_ok(contrib) and t_done > t_fault:
                    by_key.setdefault((epoch, step), {})[m] = t_done
            done = [max(v.values()) for v in by_key.values() if set(v) >= set(everyone)]
            return min(done) if done else None

        r.pump(lambda: resumed_at() is not None, left(), "the first op after the fault")
        t_resume = resumed_at()
        assert t_resume is not None
        row["resume_s"] = round(t_resume - t_fault, 4)
        # detection: every survivor (and the joiner) holds a view that reflects the fault
        if sc.fault != "coordinator":
            seen = {}
            for _, m, epoch, ids, t in r.views:
                if m in everyone and epoch > epoch0 and new_view_ok(ids) and m not in seen:
                    seen[m] = t
            row["detect_s"] = (
                round(max(seen.values()) - t_fault, 4) if len(seen) == len(everyone) else None
            )
        else:
            row["detect_s"] = None  # membership unchanged: nothing to detect
        say(f"resumed after {row['resume_s']}s")
        if sc.fault == "stop":
            assert victim is not None
            time.sleep(0.2)
            pid = r.procs[victim].pid
            assert pid is not None
            t_cont = time.monotonic()
            os.kill(pid, signal.SIGCONT)
            r.pump(lambda: r.has("rejoined", victim), left(), "the stopped peer to rejoin")
            t_ev = r.t_of("evicted", victim)
            row["evicted_learned_s"] = round(t_ev - t_cont, 4) if t_ev else None
            r.pump(
                lambda: any(o[2] > 0 and o[6] > t_cont for o in r.ops_of(victim)),
                left(),
                "the rejoined peer to contribute",
            )
            first = min(o[6] for o in r.ops_of(victim) if o[6] > t_cont)
            row["rejoin_contribute_s"] = round(first - t_cont, 4)
            row["rejoined"] = True
            everyone = members
        if sc.fault == "coordinator":
            r.pump(lambda: all(r.has("coord_run", m) for m in members), left(), "re-registration")
        if joiner is not None:
            t_sync = r.t_of("synced", joiner)
            sync = [e for e in r.other if e[0] == "synced" and e[1] == joiner]
            if sync:
                _, _, _, nbytes, secs = sync[0]
                row["sync_bytes"] = nbytes
                row["joiner_state"] = sc.joiner_state
                row["sync_s"] = round(secs, 4)
                row["sync_MBps"] = round(nbytes / secs / 1e6, 1) if secs > 0 else None
                row["synced_after_s"] = round(t_sync - t_fault, 4) if t_sync else None
            else:
                row["errors"] = [*r.errors, "the joiner never received state"]
        # a few more ops in the final view, then stop everyone at the same step
        n0 = {m: len(r.ops_of(m)) for m in everyone}
        r.pump(
            lambda: all(len(r.ops_of(m)) >= n0[m] + sc.after_ops for m in everyone),
            left(),
            "ops after the fault",
        )
        r.stop_step.value = max(o[2] for o in r.ops) + 3
        r.pump(lambda: all(r.has("done", m) for m in everyone), left(), "the peers to finish")
    except TimeoutError as exc:
        r.errors.append(str(exc))
    finally:
        r.kill_all()
        r.drain(0.05)  # whatever is still in the pipes
        for conn in r.conns.values():
            conn.close()
    _summarize(r, row, victim)
    row["wall_s"] = round(time.monotonic() - t_start, 2)
    return row


def _summarize(r: _Run, row: dict[str, Any], victim: str | None) -> None:
    # steps completed after the fault in which a surviving member saw a failed attempt
    # (start-up churn, while peers join one by one, is not the fault's doing)
    failed_steps = {o[2] for o in r.ops if o[5] > 0 and o[1] != victim and o[6] > r.t_fault}
    row["ops_failed"] = len(failed_steps)
    row["ops_failed_startup"] = len({o[2] for o in r.ops if o[5] > 0 and o[6] <= r.t_fault})
    by_op: dict[tuple[int, int], set[tuple[str, ...]]] = {}
    answers: dict[tuple[int, int], set[Any]] = {}
    for o in r.ops:
        _, member, step, epoch, contrib, _, _, _, ok, _ = o
        by_op.setdefault((epoch, step), set()).add(contrib)
        if ok is None and member == victim:
            # the member the fault froze voted, then was evicted before it could learn
            # the round's decision: "unknown" (CommitUnknown) is its true answer, not
            # a disagreement; every other member must know, and all who know agree
            continue
        answers.setdefault((epoch, step), set()).add(ok)
    row["ops"] = len({(o[3], o[2]) for o in r.ops})
    row["steps_committed"] = len({o[2] for o in r.ops if o[8]})
    row["correct"] = (
        bool(r.ops) and all(o[7] for o in r.ops) and all(len(c) == 1 for c in by_op.values())
    )
    row["commit_agree"] = bool(answers) and all(
        len(a) == 1 and None not in a for a in answers.values()
    )
    if r.errors:
        row["errors"] = sorted(set(r.errors + row.get("errors", [])))
    row["ok"] = (
        not r.errors and row["correct"] and row["commit_agree"] and row.get("resume_s") is not None
    )


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add this benchmark's options to ``parser``; return the function that runs it."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--fault", choices=FAULTS, help="the fault (required without --torch)")
    parser.add_argument(
        "--torch", action="store_true",
        help="PyTorch training through phalanx.torch instead: runs `phalanx bench torch` "
        "(kill -> next committed step, replacement latency, state transfer, DiLoCo bytes)",
    )  # fmt: skip
    parser.add_argument("--world", type=int, default=3, help="peers before the fault (default 3)")
    parser.add_argument("--size", type=parse_size, default=16 << 20, help="default 16MiB")
    parser.add_argument(
        "--state-size", type=parse_size, default=64 << 20, help="synced state (default 64MiB)"
    )
    parser.add_argument(
        "--joiner-state", choices=JOINER_STATES, default="arrays",
        help="join: the newcomer holds arrays to receive into (a client that attached its "
        "model; default) or nothing (the sync allocates them)",
    )  # fmt: skip
    parser.add_argument("--warmup-ops", type=int, default=5)
    parser.add_argument("--after-ops", type=int, default=5)
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=None, help="coordinator's (default 0.6 s)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="whole-run deadline (s)")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    def run(args: argparse.Namespace) -> int:
        if args.torch:
            from phalanx.bench.torchtrain import add_options, run_parts

            sub = argparse.ArgumentParser(add_help=False)
            add_options(sub)
            targs = sub.parse_args(["--world", str(args.world), "--timeout", "600"])
            targs.json, targs.quiet = args.json, args.quiet
            return run_parts(targs)
        if args.fault is None:
            parser.error("--fault is required (or --torch)")
        try:
            sc = Scenario(
                fault=args.fault,
                world=args.world,
                size=args.size,
                state_size=args.state_size,
                warmup_ops=args.warmup_ops,
                after_ops=args.after_ops,
                timeout=args.timeout,
                heartbeat_timeout=args.heartbeat_timeout,
                log_level=getattr(args, "log_level", None) or "WARNING",
                joiner_state=args.joiner_state,
            )
        except ValueError as exc:
            parser.error(str(exc))
        row = run_scenario(sc, verbose=not args.quiet)
        if args.json:
            print_json(row)
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()))
        return 0 if row["ok"] else 1

    return run

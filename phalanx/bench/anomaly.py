"""``phalanx bench anomaly``: how fast the detectors find an injected fault, and how often
they cry wolf on a healthy run.

``--world`` rank processes (spawned, :mod:`phalanx.testing.procs`) build a static group,
each with a :class:`~phalanx.monitor.Monitor` (local detectors, hang thread, HTTP
endpoint). Every step is a short "compute" sleep and a small all-reduce (ring, several
frames per link). Rank 1 reaches rank 0 through a :class:`~phalanx.testing.throttle.LinkProxy`
from the start, so the slow link is a real slow wire, not a stalled sender.

1. Warm-up, then ``--healthy-ops`` steps with ``--hogs`` CPU-hog processes running the
   whole time: every verdict there is a false positive (cluster matrix and local).
2. The fault, from a known op on:
   * ``slow-link``: the proxy adds latency to 0 -> 1 so that link's latency is
     ``--factor`` (4) x its healthy median;
   * ``straggler``: rank ``world-1`` computes ``--factor`` (2) x the median step time;
   * ``hang``: rank ``world-1`` is SIGSTOPped mid-op; the others' /anomalies are polled.

Output: one JSON line (``--json``) or a short table: fault, detected, target, named,
ops_to_detect (seconds_to_detect for a hang), false_positives and the figures behind them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phalanx.bench._harness import print_json, print_table, progress
from phalanx.testing.launcher import die_with_parent
from phalanx.testing.procs import RankPool
from phalanx.testing.throttle import LinkProxy

if TYPE_CHECKING:
    from phalanx.comm.observer import OpSample
    from phalanx.testing.procs import RankContext

__all__ = ["register", "run"]

log = logging.getLogger(__name__)

FAULTS = ("slow-link", "straggler", "hang")


@dataclass(frozen=True)
class _Spec:
    secret: bytes
    elements: int
    compute_s: float
    log_level: str


@dataclass(frozen=True)
class _Block:
    ops: int
    straggle_s: float = 0.0  # extra compute on the last rank
    for_s: float = 0.0  # run until this many seconds pass (hang run), ops ignored


def _rank_main(ctx: RankContext, spec: _Spec) -> None:
    from phalanx.comm import CommOptions, Group, bind
    from phalanx.monitor import Monitor

    logging.basicConfig(level=spec.log_level, format=f"[rank {ctx.rank}] %(message)s")
    listener = bind("127.0.0.1:0")
    ctx.recv(timeout=60.0)  # "address"
    ctx.reply(listener.address)
    addresses = ctx.recv(timeout=60.0)[ctx.rank]  # this rank's list (ring links proxied)
    ctx.reply("ok")
    monitor = Monitor(ctx.rank)
    records: list[tuple[OpSample, float]] = []
    starts: dict[int, float] = {}

    class _Tee:
        def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
            starts[seq] = time.monotonic()
            monitor.observer.op_started(op, seq, epoch, nbytes)

        def op_finished(self, sample: OpSample) -> None:
            records.append((sample, starts.pop(sample.seq, 0.0)))
            monitor.observer.op_finished(sample)

    # many small frames per op, however many ranks share the host's CPUs
    opts = CommOptions(small_bytes=0, piece_bytes=4096, crowded_piece_bytes=0, timeout_s=10.0)
    group = Group(
        ctx.rank, addresses, spec.secret, listener=listener, options=opts, observer=_Tee()
    )
    monitor.attach(group.engine)
    monitor.start()
    host, port = monitor.serve("127.0.0.1", 0)
    x = np.ones(spec.elements, dtype=np.float32)
    try:
        while True:
            cmd = ctx.recv(timeout=600.0)
            if cmd is None:
                return
            if cmd == "hello":
                ctx.reply({"pid": os.getpid(), "metrics": f"{host}:{port}"})
                continue
            assert isinstance(cmd, _Block)
            records.clear()
            seen = len(monitor.verdicts())
            extra = cmd.straggle_s if ctx.rank == ctx.world - 1 else 0.0
            end = time.monotonic() + cmd.for_s
            i = 0
            while (i < cmd.ops) if cmd.for_s <= 0 else (time.monotonic() < end):
                time.sleep(spec.compute_s + extra)
                x.fill(1.0)
                group.all_reduce(x)
                i += 1
            local = [(v.kind, v.peer, v.src, v.dst, v.seq) for v in monitor.verdicts()[seen:]]
            ctx.reply({"records": list(records), "local": local})
    finally:
        group.close()
        monitor.close()


def _ring_proxies(
    real: list[str], latency_s: float
) -> tuple[dict[tuple[int, int], LinkProxy], list[list[str]]]:
    """One proxy per ring link r -> r+1 with ``latency_s`` each way (an emulated
    network); returns them and every rank's address list."""
    world = len(real)
    lists = [list(real) for _ in range(world)]
    proxies: dict[tuple[int, int], LinkProxy] = {}
    for r in range(world):
        a, b = r, (r + 1) % world
        lo, hi = min(a, b), max(a, b)
        p = LinkProxy(real[lo])
        p.set(down_delay_s=latency_s, up_delay_s=latency_s)
        proxies[(a, b)] = p
        lists[hi][lo] = p.address
    return proxies, lists


def _hog(stop_at: float) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    n = 0
    while time.time() < stop_at:
        n += 1


class _Cluster:
    """Feeds every op's samples from all ranks to the cluster detector, in op order."""

    def __init__(self) -> None:
        from phalanx.monitor import ClusterDetector, DetectorConfig

        self.detector = ClusterDetector(DetectorConfig())
        self.ops = 0
        self.latency: dict[tuple[int, int], list[float]] = {}
        self.steps: list[float] = []

    def feed(self, replies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
        by_seq: dict[int, dict[int, tuple[OpSample, float]]] = {}
        for reply in replies:
            for sample, start in reply["records"]:
                by_seq.setdefault(sample.seq, {})[sample.rank] = (sample, start)
        out: list[tuple[int, Any]] = []
        for seq in sorted(by_seq):
            recs = by_seq[seq]
            samples = [s for s, _ in recs.values()]
            starts = {r: t for r, (_, t) in recs.items()}
            for (_op, _b, src, dst), v in self.detector.cells(samples, starts).items():
                self.latency.setdefault((src, dst), []).append(v)
            self.steps.append(max(s.duration_s for s in samples))
            self.ops += 1
            for verdict in self.detector.observe(samples, starts, time.time()):
                out.append((self.ops, verdict))
        return out


def run(args: argparse.Namespace) -> int:
    world: int = args.world
    if world < 3:
        progress("anomaly: --world must be at least 3 (a matrix needs other cells)")
        return 2
    spec = _Spec(os.urandom(32), args.elements, args.compute_s, args.log_level)
    verbose = not args.quiet
    hogs: list[Any] = []
    mp = multiprocessing.get_context("spawn")
    result: dict[str, Any] = {"fault": args.fault, "world": world}
    proxies: dict[tuple[int, int], LinkProxy] = {}
    pool: RankPool[None] = RankPool(_rank_main, world, spec, name="anomaly")
    try:
        pool.start()
        real = pool.request_all("address", 60.0)
        proxies, lists = _ring_proxies(real, args.base_latency_s)
        pool.request_all(lists, 60.0)
        info = pool.request_all("hello", 60.0)
        for _ in range(args.hogs):
            h = mp.Process(target=_hog, args=(time.time() + 900,), daemon=True)
            h.start()
            hogs.append(h)
        cluster = _Cluster()

        def block(b: _Block, timeout: float = 300.0) -> tuple[list[tuple[int, Any]], list[Any]]:
            replies = pool.request_all(b, timeout)
            local = [v for r in replies for v in r["local"]]
            return cluster.feed(replies), local

        progress(f"warm-up {args.warmup} ops, hogs={args.hogs}", enabled=verbose)
        block(_Block(args.warmup))
        progress(f"healthy run: {args.healthy_ops} ops", enabled=verbose)
        fp_cluster, fp_local = [], []
        t0 = time.monotonic()
        done = 0
        while done < args.healthy_ops:
            n = min(100, args.healthy_ops - done)
            c, lo = block(_Block(n))
            fp_cluster += c
            fp_local += lo
            done += n
        healthy_s = time.monotonic() - t0
        med_step = statistics.median(cluster.steps) + args.compute_s
        # censored cells (the frame was there before the receiver started) read 0: the
        # link's latency is the median of the measurable ones
        measured = [v for v in cluster.latency.get((0, 1), [])[-args.healthy_ops :] if v > 0]
        base01 = statistics.median(measured) if measured else 0.0001
        result.update(
            healthy_ops=args.healthy_ops,
            healthy_s=round(healthy_s, 2),
            hogs=args.hogs,
            false_positives=len(fp_cluster),
            false_positives_local=len(fp_local),
            false_positive_kinds=sorted({v.kind for _, v in fp_cluster}),
            false_positive_details=[
                f"{v.kind} {v.src}->{v.dst} peer={v.peer} {v.detail}" for _, v in fp_cluster
            ][:4],
            false_positive_kinds_local=sorted({v[0] for v in fp_local}),
            median_step_s=round(med_step, 6),
            latency_measurable=len(measured),
        )
        if args.fault == "hang":
            result.update(_hang(pool, info, world))
        else:
            if args.fault == "slow-link":
                delay = (args.factor - 1.0) * base01
                result.update(
                    target="0->1", healthy_latency_s=round(base01, 6), added_delay_s=round(delay, 6)
                )
                proxies[(0, 1)].set(
                    down_delay_s=args.base_latency_s + delay, up_delay_s=args.base_latency_s
                )
                fault = _Block(5)

                def right(v: Any) -> bool:
                    return bool(v.kind == "slow_link" and v.src == 0 and v.dst == 1)

            else:
                extra = (args.factor - 1.0) * med_step
                target = world - 1
                result.update(target=str(target), added_compute_s=round(extra, 6))
                fault = _Block(5, straggle_s=extra)

                def right(v: Any) -> bool:
                    return bool(v.kind == "straggler" and v.peer == target)

            result.update(_until_detected(block, cluster, fault, right, args.max_ops))
            if os.environ.get("PHALANX_BENCH_DEBUG"):
                for key, st in cluster.detector.links._cells.items():
                    progress(f"{key} stats={st.baseline.stats()} hits={list(st.hits)}")
                for key2, vals in cluster.latency.items():
                    progress(f"{key2} last={[round(v * 1e3, 2) for v in vals[-12:]]}")
    finally:
        for h in hogs:
            if h.pid is not None and h.exitcode is None:
                os.kill(h.pid, signal.SIGKILL)
            h.join(5.0)
        pool.close(timeout=5.0)
        for proxy in proxies.values():
            proxy.close()
    if args.json:
        print_json(result)
    else:
        cols = [(k, k, "str") for k in result]
        print_table([result], cols)
    return 0 if result.get("detected") and result.get("false_positives") == 0 else 1


def _until_detected(
    block: Callable[[_Block], tuple[list[tuple[int, Any]], list[Any]]],
    cluster: _Cluster,
    fault: _Block,
    right: Callable[[Any], bool],
    max_ops: int,
) -> dict[str, Any]:
    first_op = cluster.ops + 1
    wrong: list[str] = []
    local_hit: list[Any] = []
    while cluster.ops - first_op + 1 < max_ops:
        verdicts, local = block(fault)
        local_hit += local
        for op_index, v in verdicts:
            if right(v):
                return {
                    "detected": True,
                    "named": f"{v.kind} {v.src}->{v.dst}"
                    if v.src is not None
                    else f"{v.kind} {v.peer}",
                    "ops_to_detect": op_index - first_op + 1,
                    "wrong_verdicts": wrong,
                    "local_verdicts": [list(x) for x in local_hit][:8],
                }
            wrong.append(f"{v.kind} peer={v.peer} {v.src}->{v.dst}")
    return {"detected": False, "ops_to_detect": None, "wrong_verdicts": wrong,
            "local_verdicts": [list(x) for x in local_hit][:8]}  # fmt: skip


def _hang(pool: RankPool[None], info: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """SIGSTOP the last rank while the others are in an op; poll their /anomalies."""
    victim = world - 1
    pid = int(info[victim]["pid"])

    def drive() -> None:
        try:  # the ranks fail (engine timeout) or are killed: either way it ends
            pool.request_all(_Block(0, for_s=30.0), 40.0)
        except Exception as exc:
            log.debug("hang run ended: %s", exc)

    driver = threading.Thread(target=drive, name="anomaly-hang-driver", daemon=True)
    driver.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.time()
    found: dict[str, Any] = {"detected": False, "target": f"rank {victim} frozen (SIGSTOP)"}
    try:
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and not found["detected"]:
            time.sleep(0.05)
            for r in range(world - 1):
                url = f"http://{info[r]['metrics']}/anomalies"
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    body = json.load(resp)
                hangs = [v for v in body["recent"] if v["kind"] == "hang" and v["at"] >= stopped]
                if hangs:
                    found.update(
                        detected=True,
                        seconds_to_detect=round(hangs[0]["at"] - stopped, 3),
                        named=f"hang seen by rank {r}",
                        detail=hangs[0]["detail"],
                    )
                    break
    finally:
        os.kill(pid, signal.SIGCONT)
        # end the run by killing the ranks (by PID); the driver thread, which owns the
        # pool's pipes while it waits, then reaps them itself
        for rank_pid in pool.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank_pid, signal.SIGKILL)
        driver.join(45.0)
    return found


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--fault", choices=FAULTS, required=True)
    parser.add_argument("--factor", type=float, default=None,
                        help="slow-link: latency x this (default 4); straggler: step x this (default 2)")  # fmt: skip
    parser.add_argument("--healthy-ops", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--max-ops", type=int, default=50)
    parser.add_argument("--base-latency-s", type=float, default=0.001,
                        help="latency each ring link's proxy adds (an emulated network)")  # fmt: skip
    parser.add_argument("--hogs", type=int, default=1, help="CPU-hog processes beside the ranks")
    parser.add_argument("--elements", type=int, default=4096, help="float32 elements per op")
    parser.add_argument("--compute-s", type=float, default=0.001, help="'compute' sleep per step")
    parser.set_defaults(default_log_level="ERROR")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")

    def main(args: argparse.Namespace) -> int:
        if args.factor is None:
            args.factor = 4.0 if args.fault == "slow-link" else 2.0
        if args.healthy_ops < 1:
            parser.error("--healthy-ops must be >= 1")
        return run(args)

    return main

"""``phalanx bench snapshot``: erasure-coded in-memory snapshots across real processes.

    phalanx bench snapshot --world 6 --k 4 --m 2 --size 256MiB [--json]

Starts ``world`` processes; each runs a SnapshotService with a ShardServer and TCP
shard links (HMAC handshake, fresh random secret) and a deterministic random state of
``size`` bytes (four float32 arrays; every element changes each generation: +1). All
ranks snapshot at once, ``--generations`` times, one rank after the other so that each
rank's memcpy baseline and stall are measured on an otherwise idle machine (stall and
memcpy: medians over every rank and every generation after the first, as is encode;
seal: the last generation). Then rank 0 restores locally, rank 0 and more of its holders are SIGKILLed so that exactly m
of its k+m shards are gone (with world = k+m rank 0 holds one of its own shards, so it
and m-1 other holders die; with more peers it and m holders die), and a fresh
replacement process rebuilds rank 0's state from the survivors and compares it byte for
byte with the state regenerated from its seed. Both restores must return the last
generation's step and exactly its state (a stale or mixed-generation restore fails).

One JSON line: ``stall_s`` (snapshot(), median over ranks and generations after the first),
``memcpy_s`` (np.copyto of the same bytes, same ranks, just before, into one of two
buffers faulted in with the service's pool and taken in turn as it takes its own, so
both copies write a buffer last written two generations ago; it runs first, so it is
the one that reads the state while the +1 has just left it in cache),
``memcpy_hot_s`` (the same copy into a buffer written just before, after the seal:
what the baseline was until stop 37: how much a destination left idle costs any
copy on the machine),
``stall_ratio``, ``seal_s``, ``encode_Bps`` (state bytes / wall time inside the erasure
coder, rank median), ``encode_cpu_Bps`` (state bytes / CPU time of the coder's thread
inside it: the coder's own speed, where ``encode_Bps`` also counts the waits for a core
while the pieces already encoded go out and the holders take them in), piece checksums
are ``checksum_Bps``, ``pipeline_Bps`` (state bytes / seal_s), ``restore_local_s``,
``restore_after_m_losses_s``, ``restore_Bps``, ``restored_step`` (the peer restore's
step; ``restore_local_step`` the local one's), ``restored_exact``, plus the setup.
This module prints only what the CLI asked for; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from phalanx.bench._harness import parse_size, print_json, progress
from phalanx.checkpoint._crc import crc32_backend
from phalanx.checkpoint._nice import check_increment
from phalanx.checkpoint.erasure import make_coder
from phalanx.checkpoint.snapshot import SnapshotConfig
from phalanx.config import DAEMON_SWITCH_INTERVAL_S
from phalanx.testing.launcher import die_with_parent

__all__ = ["register", "run_bench"]

_CMD_TIMEOUT = 300.0


def _state(rank: int, size: int, generation: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s state at ``generation`` (what it snapshots as step
    ``generation``): the seeded arrays, every element +1 per generation."""
    rng = np.random.default_rng(1000 + rank)
    n = size // 4
    parts = [n // 4] * 3 + [n - 3 * (n // 4)]
    state = {
        "model": {f"w{i}": rng.random(p, np.float32) for i, p in enumerate(parts[:3])},
        "opt": {"m": rng.random(parts[3], np.float32)},
    }
    _advance(state, generation)
    return state


def _advance(state: dict[str, Any], generations: int) -> None:
    """Move ``state`` on by ``generations`` (in place, one +1 each: the same float32
    operations as :func:`_state`, so bit for bit reproducible)."""
    for _ in range(generations):
        for a in _leaves(state):
            a += np.float32(1.0)


def _restore_ok(step: int | None, out: Any, want_step: int, expected: dict[str, Any]) -> bool:
    """A restore is right when it returned the last generation's step and exactly its
    state: a stale generation or a mix of two fails."""
    return step == want_step and _same(out, expected)


def _checksum_Bps(nbytes: int, k: int, m: int, checksum_s: float) -> float | None:
    """Checksummed bytes per second: the k data and m parity pieces of ``nbytes``."""
    return (k + m) / k * nbytes / checksum_s if checksum_s else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[x], b[x]) for x in a)
    return bool(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))


def _rank_main(rank: int, conn: Connection, secret: bytes, cfg: dict[str, Any]) -> None:
    die_with_parent()
    # like a daemon (PhalanxConfig.switch_interval_s): threads hand the GIL over quickly,
    # so the coder thread is not kept waiting behind the shard senders after each call
    sys.setswitchinterval(DAEMON_SWITCH_INTERVAL_S)
    from phalanx.checkpoint.snapshot import SnapshotService
    from phalanx.checkpoint.store import MemoryShardStore
    from phalanx.checkpoint.tcp import ShardServer, TcpShardChannel

    logging.basicConfig(level=cfg["log_level"], format=f"[r{rank}] %(name)s %(message)s")
    me = f"r{rank}" if rank >= 0 else "replacement"
    store = MemoryShardStore(cfg["budget"])
    server = ShardServer(
        store, secret=secret, max_message=cfg["shard_bytes"] + 4096, io_nice=cfg["io_nice"]
    )
    conn.send(("addr", server.address))
    addresses: dict[str, str] = conn.recv() if conn.poll(_CMD_TIMEOUT) else {}
    channel = TcpShardChannel(
        secret=secret, addresses=addresses, max_message=cfg["shard_bytes"] + 4096
    )
    svc = SnapshotService(
        me,
        channel,
        store,
        peers=sorted(addresses),
        config=SnapshotConfig(
            k=cfg["k"],
            m=cfg["m"],
            shard_bytes=cfg["shard_bytes"],
            io_threads=2 * (cfg["k"] + cfg["m"]),
            io_nice=cfg["io_nice"],
        ),
    )
    state = _state(rank, cfg["size"]) if rank >= 0 else {}
    generation = 0  # the one ``state`` is at
    baseline: list[np.ndarray] = []
    if rank >= 0:
        svc.reserve(cfg["size"])
        # the memcpy baseline's own pair of buffers, faulted in now as the service's
        # pool just was and taken in turn as it takes its own (one per generation:
        # the service alternates its two because generations here never overlap or
        # fail), so both copies write a buffer last written two generations ago; on
        # this machine one written just before copies 3-9 % faster at 256 MiB, up to
        # 1.6x at 1 GiB (docs/snapshots.md, "The stall's baseline")
        baseline = [np.empty(cfg["size"], np.uint8) for _ in range(2)]
        for b in baseline:
            b.fill(0)
    try:
        while conn.poll(_CMD_TIMEOUT):
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "snap":
                _advance(state, arg - generation)  # the state changes every generation
                generation = arg
                flat = [a.reshape(-1).view(np.uint8) for a in _leaves(state)]
                t0 = time.perf_counter()
                _copy(baseline[arg % 2], flat)
                memcpy_s = time.perf_counter() - t0
                h = svc.snapshot(state, arg)
                info = h.wait(_CMD_TIMEOUT)
                # the same copy into a buffer written just before (the old baseline),
                # after the seal so that it cannot touch the stall's conditions
                _copy(baseline[arg % 2], flat)
                t0 = time.perf_counter()
                _copy(baseline[arg % 2], flat)
                memcpy_hot_s = time.perf_counter() - t0
                conn.send(
                    (
                        "ok",
                        {
                            "memcpy_s": memcpy_s,
                            "memcpy_hot_s": memcpy_hot_s,
                            "stall_s": h.stall_s,
                            "seal_s": info.seal_s,
                            "encode_s": info.encode_s,
                            "encode_cpu_s": info.encode_cpu_s,
                            "checksum_s": info.checksum_s,
                            "holders": info.holders,
                            "nbytes": info.nbytes,
                        },
                    )
                )
            elif cmd == "restore_local":
                t0 = time.perf_counter()
                step, out = svc.restore()
                dt = time.perf_counter() - t0
                exact = generation == arg and _restore_ok(step, out, arg, state)
                conn.send(("ok", {"s": dt, "step": step, "exact": exact}))
            elif cmd == "restore_peer":
                owner, owner_rank, want = arg
                t0 = time.perf_counter()
                step, out = svc.restore_peer(owner)
                dt = time.perf_counter() - t0
                exact = _restore_ok(step, out, want, _state(owner_rank, cfg["size"], want))
                conn.send(("ok", {"s": dt, "step": step, "exact": exact}))
    finally:
        svc.close()
        channel.close()
        server.close()


def _leaves(state: dict[str, Any]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for v in state.values():
        out.extend(_leaves(v) if isinstance(v, dict) else [v])
    return out


def _copy(dst: np.ndarray, flat: list[np.ndarray]) -> None:
    off = 0
    for a in flat:
        np.copyto(dst[off : off + a.size], a)
        off += a.size


class _Proc:
    def __init__(self, ctx: Any, rank: int, secret: bytes, cfg: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_rank_main, args=(rank, child, secret, cfg), daemon=True)
        self.proc.start()
        child.close()

    def ask(self, what: str, timeout: float = _CMD_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"no {what} within {timeout:.0f}s")
        _kind, payload = self.conn.recv()
        return payload

    def kill(self) -> None:
        if self.proc.pid is not None and self.proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        self.conn.close()


def run_bench(
    world: int,
    k: int,
    m: int,
    size: int,
    *,
    generations: int = 4,
    shard_bytes: int = 4 << 20,
    io_nice: int = SnapshotConfig.io_nice,
    verbose: bool = True,
    log_level: str = "WARNING",
) -> dict[str, Any]:
    if world < 2 or k + m > world or m < 1:
        raise ValueError(f"need m >= 1 and k + m <= world; got {k}+{m} with world {world}")
    check_increment(io_nice, "io_nice")
    secret = os.urandom(32)
    cfg = {
        "k": k,
        "m": m,
        "size": size,
        "shard_bytes": shard_bytes,
        "io_nice": io_nice,
        "log_level": log_level,
        "budget": 4 * size,
    }
    ctx = multiprocessing.get_context("spawn")
    procs = [_Proc(ctx, r, secret, cfg) for r in range(world)]
    repl: _Proc | None = None
    try:
        addrs = {f"r{r}": p.ask("address", 60) for r, p in enumerate(procs)}
        for p in procs:
            p.conn.send(addrs)
        per_gen: list[list[dict[str, Any]]] = []
        for g in range(generations):
            # One rank at a time: its memcpy baseline and its stall are measured with
            # the other ranks idle (2 shared cores here), then it seals before the next.
            rows = []
            for p in procs:
                p.conn.send(("snap", g + 1))
                rows.append(p.ask("seal"))
            per_gen.append(rows)
            last = per_gen[-1]
            progress(
                f"generation {g + 1}: stall {statistics.median(r['stall_s'] for r in last):.4f}s "
                f"memcpy {statistics.median(r['memcpy_s'] for r in last):.4f}s "
                f"seal {max(r['seal_s'] for r in last):.2f}s",
                enabled=verbose,
            )
        last = per_gen[-1]
        procs[0].conn.send(("restore_local", generations))
        local = procs[0].ask("restore")
        holders = list(last[0]["holders"])
        others = [h for h in holders if h != "r0"]
        doomed = ["r0", *others[: m - (1 if "r0" in holders else 0)]]
        lost = sum(1 for h in holders if h in doomed)
        progress(f"killing {doomed} ({lost} of {k + m} shards of r0)", enabled=verbose)
        for name in doomed:
            procs[int(name[1:])].kill()
        survivors = {n: a for n, a in addrs.items() if n not in doomed}
        repl = _Proc(ctx, -1, secret, cfg)
        repl.ask("address", 60)
        repl.conn.send(survivors)
        repl.conn.send(("restore_peer", ("r0", 0, generations)))
        peer = repl.ask("restore")
        nbytes = last[0]["nbytes"]
        coder = make_coder(k, m).detail
        warm = [r for rows in per_gen[1:] or per_gen for r in rows]
        stall = statistics.median(r["stall_s"] for r in warm)
        memcpy = statistics.median(r["memcpy_s"] for r in warm)
        encode_s = statistics.median(r["encode_s"] for r in warm)
        encode_cpu_s = statistics.median(r["encode_cpu_s"] for r in warm)
        seal = statistics.median(r["seal_s"] for r in last)
        row = {
            "bench": "snapshot",
            "world": world,
            "k": k,
            "m": m,
            "size": size,
            "shard_bytes": shard_bytes,
            "io_nice": io_nice,
            "generations": generations,
            "stall_s": stall,
            "memcpy_s": memcpy,
            "memcpy_hot_s": statistics.median(r["memcpy_hot_s"] for r in warm),
            "stall_ratio": stall / memcpy,
            "stall_first_s": statistics.median(r["stall_s"] for r in per_gen[0]),
            "stall_max_s": max(r["stall_s"] for r in last),
            "seal_s": seal,
            "seal_max_s": max(r["seal_s"] for r in last),
            "encode_Bps": nbytes / encode_s if encode_s else None,
            "encode_cpu_Bps": nbytes / encode_cpu_s if encode_cpu_s else None,
            "pipeline_Bps": nbytes / seal,
            "checksum_Bps": _checksum_Bps(
                nbytes, k, m, statistics.median(r["checksum_s"] for r in last)
            ),
            "coder": coder,
            "checksum": crc32_backend(),
            "restore_local_s": local["s"],
            "restore_local_exact": local["exact"],
            "restore_local_step": local["step"],
            "killed": doomed,
            "shards_lost": lost,
            "restore_after_m_losses_s": peer["s"],
            "restore_Bps": nbytes / peer["s"],
            "restored_step": peer["step"],
            "restored_exact": bool(peer["exact"] and local["exact"]),
        }
        return row
    finally:
        for p in ([repl] if repl else []) + procs:
            if p.proc.exitcode is None:
                with contextlib.suppress(OSError, ValueError):
                    p.conn.send(("stop", None))
        for p in ([repl] if repl else []) + procs:
            p.proc.join(15)
            p.kill()


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add this benchmark's options to ``parser``; return the function that runs it."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--world", type=int, default=6)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--size", type=parse_size, default=256 << 20, help="state per rank")
    parser.add_argument("--shard-bytes", type=parse_size, default=4 << 20)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument(
        "--io-nice",
        type=int,
        default=SnapshotConfig.io_nice,
        help="nice increment of the threads that send and take in pieces "
        "(SnapshotConfig.io_nice, ShardServer(io_nice=); 0: as the threads that start them)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    def run(args: argparse.Namespace) -> int:
        try:
            row = run_bench(
                args.world,
                args.k,
                args.m,
                args.size,
                generations=max(1, args.generations),
                shard_bytes=args.shard_bytes,
                io_nice=args.io_nice,
                verbose=not args.quiet,
                log_level=getattr(args, "log_level", None) or "WARNING",
            )
        except ValueError as exc:
            parser.error(str(exc))
        if args.json:
            print_json(row)
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()))
        return 0 if row["restored_exact"] else 1

    return run

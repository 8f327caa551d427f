"""Measure the snapshot stall through a real daemon and the client (issue 5's bound).

``python -m tests.integration.bench_daemon_snapshot [--size 256] [--rounds 7]
[--world 1] [--staged]`` starts an in-process coordinator and ``world`` ``phalanx
daemon`` processes (k, m from the view size), connects to the first daemon, and per
round, alternating, measures

* ``memcpy_s``: ``np.copyto`` of the same bytes into a warm buffer in this process;
* ``call_s``: ``client.snapshot({"w": shm}, step)`` as the caller sees it (the daemon's
  copy + the Unix-socket round trip), ``shm`` from ``client.empty`` (``--staged``: a
  plain numpy array, staged through shared memory first);
* ``stall_s``: the daemon's own copy (``SnapshotHandle.stall_s``);

then waits for the seal before the next round. The first two rounds fault in the
daemon's two rotating buffers and are reported apart. Prints one JSON line. Not a
pytest module (no ``test_`` prefix): it takes ~1 GiB of memory per 256 MiB of state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import phalanx
from phalanx.testing.launcher import local_cluster


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="MiB of state")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--staged", action="store_true")
    args = ap.parse_args()
    nbytes = args.size << 20
    tmp = Path(tempfile.mkdtemp(prefix="phalanx-bench-"))
    with local_cluster(args.world, os.urandom(32), tmp) as cl:
        with phalanx.connect(cl.sockets[0]) as pg:
            w = np.empty(nbytes // 4, np.float32) if args.staged else pg.empty(nbytes // 4)
            w[:] = np.random.default_rng(0).standard_normal(w.size, dtype=np.float32)
            dst = np.empty_like(w)
            dst.fill(0)  # warm: the service's buffers are warm after two rounds too
            rows = []
            for r in range(args.rounds):
                t0 = time.perf_counter()
                np.copyto(dst, w)
                memcpy_s = time.perf_counter() - t0
                h = pg.snapshot({"w": w}, r)
                info = h.wait(300.0)
                rows.append((memcpy_s, h.call_s, h.stall_s, info.seal_s, h.zero_copy))
            step, state = pg.restore()
            exact = step == args.rounds - 1 and state["w"].tobytes() == w.tobytes()
        steady = rows[2:] or rows
        med = [statistics.median(x[i] for x in steady) for i in range(4)]
        print(
            json.dumps(
                {
                    "bench": "daemon-snapshot",
                    "world": args.world,
                    "size_bytes": nbytes,
                    "staged": args.staged,
                    "zero_copy": rows[-1][4],
                    "memcpy_s": round(med[0], 5),
                    "call_s": round(med[1], 5),
                    "stall_s": round(med[2], 5),
                    "call_ratio": round(med[1] / med[0], 3),
                    "stall_ratio": round(med[2] / med[0], 3),
                    "seal_s": round(med[3], 4),
                    "first_rounds_call_s": [round(x[1], 4) for x in rows[:2]],
                    "rounds": [[round(v, 5) for v in x[:3]] for x in rows],
                    "restored_exact": exact,
                }
            )
        )


if __name__ == "__main__":
    main()

"""``phalanx train``: a small, real, long-running training job through the local daemon.

What a container peer runs beside its ``phalanx daemon`` (``phalanx peer`` starts it),
and what operators watch to see that a deployment trains: the demo's MLP classifier
(:mod:`phalanx.demo.model`, numpy), data-parallel over whoever is in the view.

Start-up, in this order:

1. connect to the daemon (``--socket``, else ``$PHALANX_SOCKET``), retrying until
   ``--connect-timeout``; wait until the daemon is in a view;
2. ``attach_state(step=None)``: if the daemon still holds this member's live state
   (only the training process died and was restarted), it is handed back at once
   (``attached`` with ``source=daemon``). If the daemon holds nothing (it is new: the
   whole container restarted; or the process died between a commit and its
   ``update_state``, so the daemon's copy was half applied, and the daemon left and
   rejoined to receive the group's state), this member's newest sealed snapshot is
   rebuilt from its holders with ``restore()`` and attached at its step (``restore``
   event, with the SHA-256 of the restored bytes); a newer state in the group then
   arrives by sync at the first ``begin_step``. Restoring an older snapshot while the
   daemon still has the live state would put this member behind its group inside one
   view, where no state sync runs: never done;
3. each ``begin_step`` may bring the group's state (state sync, hash-verified): a
   newcomer or a restored member behind the group catches up there. If no member of
   the view holds any state (the very first start of a deployment), every member
   *founds* it: the deterministic initial parameters of ``--seed`` at step 0, the same
   bytes on every member.

One step (as :mod:`phalanx.demo.worker`): this member's shard of the step's global
batch (by its rank in the view), one lossless all-reduce (sum) of ``[gradient, loss
sum, 1, e, e**2]`` (e: the epoch's residue) whose last three slots prove the op ran among exactly the
members the shards were cut for, ``commit(step)``, and only on True the update and
``update_state(step + 1)``. Any failure: no vote, the same step again. Every
``--snapshot-every`` steps a snapshot of the parameters (never waited for in the
loop: its seal is polled at the next steps).

Output: one JSON object per line on stdout, ``{"ev": ..., "t": wall-clock seconds,
"member": id, ...}``: ``ready``, ``restore``, ``view``, ``sync``, ``found``, ``commit``
(every ``--log-every`` steps and the first after a start or a view change),
``snapshot``, ``sealed``, ``abandoned``, ``retry``, ``evicted``, ``stop``, ``error``.
Exit status: 0 after SIGTERM/SIGINT or ``--steps``, 3 on a deadline, 4 when the daemon
is gone, 5 when it stayed out of the group past ``--rejoin-timeout``.

This module must never write anything but JSON lines to stdout, wait without a
deadline, or apply a step the group did not commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np

from phalanx.demo.model import (
    Problem,
    batch_indices,
    check_slots,
    grad_sum,
    init_params,
    make_dataset,
    shard,
    verdict,
)
from phalanx.errors import CommError, DaemonUnavailable, PhalanxError
from phalanx.membership.errors import CommitUnknown, Evicted, MembershipError

__all__ = ["register", "run"]

#: exit statuses (see the module docstring)
EXIT_DEADLINE, EXIT_NO_DAEMON, EXIT_EVICTED = 3, 4, 5


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``phalanx train``'s options; return the function that runs it."""
    parser.description = (
        "A small real training job (the demo's MLP, numpy) through the local daemon: "
        "commits steps, snapshots every N steps, restores its snapshot after a restart, "
        "receives the group's state when it joins. JSON lines on stdout."
    )
    a = parser.add_argument
    a("--socket", metavar="PATH", help="the daemon's socket (default $PHALANX_SOCKET)")
    a("--seed", type=int, default=0, help="data and initial parameters (default 0)")
    a("--steps", type=int, default=0, help="stop after this step (default 0: run until SIGTERM)")
    a(
        "--step-time",
        type=float,
        default=0.1,
        metavar="S",
        help="seconds of 'compute' per step, standing for a real model's (default 0.1)",
    )
    a("--snapshot-every", type=int, default=20, metavar="N", help="0: never (default 20)")
    a("--log-every", type=int, default=50, metavar="N", help="commit lines (default 50)")
    a("--call-timeout", type=float, default=30.0, metavar="S", help="deadline of each call")
    a(
        "--connect-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="wait this long for the daemon and its first view (default 120)",
    )
    a("--rejoin-timeout", type=float, default=120.0, metavar="S",
      help="give up when evicted and not back in the group after S (default 120)")  # fmt: skip
    parser.set_defaults(default_log_level="WARNING")
    return run


class _Out:
    """JSON lines on stdout, one per event."""

    def __init__(self) -> None:
        self.member = ""

    def __call__(self, ev: str, **fields: Any) -> None:
        line = {"ev": ev, "t": round(time.time(), 3), "member": self.member, **fields}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _connect(socket: str | None, deadline: float) -> Any:
    import phalanx

    while True:
        try:
            return phalanx.connect(socket, timeout=2.0)
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    """Train until SIGTERM/SIGINT (or ``--steps``); see the module docstring."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    out = _Out()
    try:
        pg = _connect(args.socket, time.monotonic() + args.connect_timeout)
    except DaemonUnavailable as exc:
        out("error", error=f"no daemon: {exc}")
        return EXIT_NO_DAEMON
    try:
        out.member = pg.member_id
        return _train(pg, args, out, stop)
    except DaemonUnavailable as exc:
        out("error", error=f"daemon gone: {exc}")
        return EXIT_NO_DAEMON
    finally:
        pg.close()
        for s, h in previous.items():
            signal.signal(s, h)


def _train(pg: Any, args: argparse.Namespace, out: _Out, stop: threading.Event) -> int:
    from phalanx import SnapshotError, SnapshotNotFound

    pr = Problem()
    data = make_dataset(pr, args.seed)
    T = args.call_timeout
    deadline = time.monotonic() + args.connect_timeout
    while pg.view().rank is None:
        if stop.is_set():
            return 0
        if time.monotonic() > deadline:
            out("error", error=f"the daemon was not in a view after {args.connect_timeout}s")
            return EXIT_DEADLINE
        time.sleep(0.1)
    size = init_params(pr, args.seed).size
    params = pg.empty((size,), "float64")
    buf = pg.empty((size + 4,), "float64")  # gradient, loss sum, count, e, e**2
    grad, meta = buf[:size], buf[size:]
    out("ready", pid=os.getpid(), daemon_pid=pg.daemon_pid)
    at = pg.attach_state({"params": params}, step=None)
    if at >= 0:  # the daemon kept this member's live state: the newest there is
        out("attached", step=at, source="daemon", sha256=_sha(params))
    else:  # a fresh daemon: this member's newest sealed snapshot, from its holders
        try:
            step, state = pg.restore(timeout=T)
        except SnapshotNotFound:
            out("attached", step=-1, source="none")  # the group's state comes at begin_step
        except (SnapshotError, TimeoutError) as exc:
            out("restore_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            params[:] = state["params"]
            pg.attach_state({"params": params}, step=step)
            out("restore", step=step, sha256=_sha(params))
    pending: Any = None  # the snapshot being sealed
    last_epoch, fresh, evicted_at, done_step = -1, True, 0.0, -1
    while not stop.is_set():
        if pending is not None and _settled(pending, out):
            pending = None
        try:
            info = pg.begin_step(timeout=T)
        except Evicted:
            # the daemon rejoins by itself with a new incarnation; the state re-syncs
            evicted_at = evicted_at or time.monotonic()
            if time.monotonic() - evicted_at > args.rejoin_timeout:
                out("error", error=f"out of the group for {args.rejoin_timeout}s")
                return EXIT_EVICTED
            out("evicted")
            time.sleep(0.5)
            continue
        except (CommError, MembershipError, TimeoutError) as exc:
            out("retry", step=-1, why=f"begin_step: {type(exc).__name__}")
            time.sleep(0.1)  # the group is between views: do not spin
            continue
        evicted_at = 0.0
        if info.epoch != last_epoch:
            last_epoch, fresh = info.epoch, True
            out("view", epoch=info.epoch, members=list(info.members), step=info.step)
            if info.synced:
                out("sync", step=info.step, bytes=info.sync_bytes, sha256=_sha(params))
        if info.step < 0:  # nobody in this view holds a state: found it, same bytes everywhere
            params[:] = init_params(pr, args.seed)
            pg.update_state(0)
            out("found", step=0, sha256=_sha(params))
            continue
        step = info.step
        if args.steps and step >= args.steps:
            break
        members = info.members
        idx = shard(batch_indices(pr, args.seed, step), members.index(pg.member_id), len(members))
        g, lsum = grad_sum(pr, params, data.x[idx], data.y[idx])
        grad[:] = g
        meta[:] = (lsum, 1.0, *check_slots(info.epoch))
        if args.step_time > 0:
            time.sleep(args.step_time)  # stands for the forward/backward pass of a real model
        try:
            res = pg.all_reduce(buf, "sum", "none", timeout=T)
            why = verdict(meta, info.epoch, members, res.contributors)
        except (CommError, TimeoutError) as exc:
            out("retry", step=step, epoch=info.epoch, why=type(exc).__name__)
            continue
        if why:
            out("retry", step=step, epoch=info.epoch, why=why)
            continue
        try:
            committed = pg.commit(step, True, timeout=T)
        except (CommitUnknown, TimeoutError, Evicted) as exc:
            out("retry", step=step, epoch=info.epoch, why=type(exc).__name__)
            continue
        if not committed:
            out("retry", step=step, epoch=info.epoch, why="not committed")
            continue
        params -= pr.lr * (grad / pr.batch)
        pg.update_state(step + 1)
        done_step = step + 1
        if fresh or (args.log_every > 0 and step % args.log_every == 0):
            out("commit", step=step, epoch=info.epoch, world=len(members),
                loss=round(float(meta[0]) / pr.batch, 6))  # fmt: skip
            fresh = False
        if args.snapshot_every > 0 and (step + 1) % args.snapshot_every == 0 and pending is None:
            try:
                pending = pg.snapshot({"params": params}, step + 1, timeout=T)
                out("snapshot", step=step + 1, generation=pending.generation, sha256=_sha(params))
            except (PhalanxError, TimeoutError) as exc:
                out("abandoned", step=step + 1, why=f"{type(exc).__name__}: {exc}")
    out("stop", step=done_step)
    return 0


def _settled(handle: Any, out: _Out) -> bool:
    """True once ``handle``'s generation sealed or was abandoned (reported once)."""
    from phalanx import SnapshotError

    try:
        if not handle.done():
            return False
        res = handle.wait(0)
    except SnapshotError as exc:
        out("abandoned", generation=handle.generation, why=str(exc))
        return True
    except TimeoutError:
        return False
    out("sealed", generation=res.generation, step=res.step, holders=list(res.holders),
        k=res.k, m=res.m, seal_s=round(res.seal_s, 4))  # fmt: skip
    return True

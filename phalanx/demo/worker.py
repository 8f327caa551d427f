"""One training process of ``phalanx demo``: data-parallel SGD through its own daemon.

Run as ``python -m phalanx.demo.worker --socket S --steps N ...`` by the demo (never by
hand, though nothing stops you). It talks to its ``phalanx daemon`` through the client
(:func:`phalanx.connect`) and reports to the demo as JSON lines on stdout, one object
per event (``ready``, ``view``, ``sync``, ``commit``, ``retry``, ``done``, ``error``)
with ``t`` = ``time.monotonic()`` (CLOCK_MONOTONIC: comparable across processes on
one machine).

One step, with a world that may change under it:

1. ``begin_step()``: the view the step assumes (a pending view is installed here; a
   newcomer receives the group's parameters here, hash-verified, in place);
2. the step's global batch is fixed by (seed, step); this member takes the shard its
   rank in *that* view names and computes the **sum** of per-example gradients;
3. one all-reduce (sum) of ``[gradient, loss sum, 1, e, e**2]`` (e: the epoch modulo 2**20, :func:`~phalanx.demo.model.check_slots`: views may be numbered from the wall clock in ms). The last
   three slots prove that the op ran among exactly the members the shards were cut
   for: the count equals the world each member assumed, and ``sum(e**2) * n ==
   sum(e)**2`` holds only if every contributor assumed the same epoch. Every member
   sees the same reduced bytes, so they all reach the same verdict (with a lossy
   codec these slots go in a separate lossless all-reduce first);
4. on a good verdict, ``commit(step)``: the group's answer, the same on every member;
   on True, ``params -= lr * gradient / batch`` and ``update_state(step + 1)``.

With ``--hold-at H --hold-world W`` (the demo passes them when a replacement is to
join) a member that reaches step H in a view smaller than W waits there, once, until
the view has W members: a late replacement still trains before the end. Only timing
changes: the steps and their results are the same.

Any failure (a peer died, the view changed, the exchange aborted the step, a bad
verdict, a commit refused) means: no vote, back to 1 for the same step. A member never
votes against a step (a "no" would settle that (epoch, step) round for good, and the
retry in the same view could never commit); a step some members could not finish is
refused anyway, because its round cannot collect every member's vote before the view
changes. Nothing is ever half-applied: parameters change only after a commit.

This module must never write anything but JSON lines to stdout, nor run without a
deadline: it exits non-zero when ``--deadline`` passes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from phalanx.demo.model import (
    Problem,
    batch_indices,
    check_slots,
    grad_sum,
    init_params,
    loss,
    make_dataset,
    verdict,
)
from phalanx.demo.model import shard as cut
from phalanx.errors import CommError, DaemonUnavailable
from phalanx.membership.errors import CommitUnknown, Evicted, MembershipError

__all__ = ["LOSSLESS", "main"]

log = logging.getLogger(__name__)

#: codecs that reproduce the sum exactly; the others get a separate lossless check op
LOSSLESS = ("none", "zstd")


def _emit(ev: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": ev, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def _connect(socket: str, deadline: float) -> Any:
    import phalanx

    while True:
        try:
            return phalanx.connect(socket, timeout=2.0, op_timeout=20.0)
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run(args: argparse.Namespace) -> int:
    pr = Problem()
    seed, steps, codec = args.seed, args.steps, args.codec
    deadline = time.monotonic() + args.deadline
    data = make_dataset(pr, seed)
    pg = _connect(args.socket, deadline)
    try:
        me = pg.member_id
        # wait until our daemon is in a view (of the expected size, for the first group)
        while True:
            v = pg.view()
            if v.rank is not None and v.world >= args.expect_world:
                break
            if time.monotonic() > deadline:
                _emit("error", member=me, error=f"no view of {args.expect_world} members in time")
                return 3
            time.sleep(0.02)
        params = pg.empty((init_params(pr, seed).size,), "float64")
        if args.fresh:
            pg.attach_state({"params": params}, step=None)  # receive the group's state
        else:
            params[:] = init_params(pr, seed)
            pg.attach_state({"params": params}, step=0)
        size = params.size
        lossless = codec in LOSSLESS
        buf = pg.empty((size + 4,), "float64")  # gradient, loss sum, count, e, e**2 (check_slots)
        meta = buf[size:] if lossless else pg.empty((4,), "float64")
        grad = buf[:size]
        _emit("ready", member=me, pid=os.getpid(), daemon_pid=pg.daemon_pid)
        last_epoch = -1
        attempts = 0
        held = False
        while True:
            if time.monotonic() > deadline:
                _emit("error", member=me, error="deadline passed")
                return 3
            try:
                info = pg.begin_step(timeout=20.0)
            except Evicted:
                raise  # see main()
            except (CommError, MembershipError, TimeoutError) as exc:
                _emit("retry", member=me, step=-1, why=f"begin_step: {type(exc).__name__}")
                time.sleep(0.05)  # the group is between views: do not spin
                continue
            if info.epoch != last_epoch:  # (a view's sync runs once, at its start)
                last_epoch = info.epoch
                _emit(
                    "view", member=me, epoch=info.epoch, members=list(info.members), step=info.step
                )
                if info.synced:
                    _emit(
                        "sync", member=me, step=info.step, bytes=info.sync_bytes, epoch=info.epoch
                    )
            step = info.step
            if step >= steps:
                break
            if not held and step >= args.hold_at and len(info.members) < args.hold_world:
                # a replacement is on its way but not in yet: wait for it here, so that it
                # trains with us before the end (timing only: the math does not change)
                held = True
                t_hold = time.monotonic()
                while pg.view().world < args.hold_world:
                    if time.monotonic() > deadline:
                        _emit("error", member=me, error="the replacement never joined")
                        return 3
                    time.sleep(0.02)
                _emit("held", member=me, step=step, seconds=time.monotonic() - t_hold)
                continue  # begin_step again: installs the view with the replacement
            members = info.members
            idx = cut(batch_indices(pr, seed, step), members.index(me), len(members))
            g, lsum = grad_sum(pr, params, data.x[idx], data.y[idx])
            grad[:] = g
            meta[:] = (lsum, 1.0, *check_slots(info.epoch))
            if args.step_time > 0:
                time.sleep(args.step_time)  # stands for the forward/backward pass of a real model
            attempts += 1
            try:
                if lossless:
                    res = pg.all_reduce(buf, "sum", codec, timeout=20.0)
                    why = verdict(meta, info.epoch, members, res.contributors)
                else:
                    res = pg.all_reduce(meta, "sum", "none", timeout=20.0)
                    why = verdict(meta, info.epoch, members, res.contributors)
                    if not why:
                        res2 = pg.all_reduce(buf[:size], "sum", codec, timeout=20.0)
                        if res2.contributors != res.contributors:
                            why = "the view changed between the two all-reduces"
            except (CommError, TimeoutError) as exc:
                _emit("retry", member=me, step=step, epoch=info.epoch, why=type(exc).__name__)
                continue
            if why:
                _emit("retry", member=me, step=step, epoch=info.epoch, why=why)
                continue
            try:
                committed = pg.commit(step, True, timeout=20.0)
            except (CommitUnknown, TimeoutError) as exc:
                # not applied here; if the others did apply it, the next begin_step
                # finds our state differs from the majority's and syncs it (verified)
                _emit("retry", member=me, step=step, epoch=info.epoch, why=type(exc).__name__)
                continue
            if not committed:
                _emit("retry", member=me, step=step, epoch=info.epoch, why="not committed")
                continue
            params -= pr.lr * (grad / pr.batch)
            pg.update_state(step + 1)
            _emit(
                "commit", member=me, step=step, epoch=info.epoch, world=len(members),
                loss=float(meta[0]) / pr.batch, attempts=attempts,
            )  # fmt: skip
            attempts = 0
        final = np.array(params)
        _emit(
            "done", member=me, step=steps, loss=loss(pr, final, data),
            sha256=hashlib.sha256(final.tobytes()).hexdigest(),
            params=base64.b64encode(final.tobytes()).decode(),
        )  # fmt: skip
        return 0
    finally:
        pg.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phalanx.demo.worker")
    p.add_argument("--socket", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="none")
    p.add_argument("--step-time", type=float, default=0.0)
    p.add_argument("--expect-world", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="a newcomer: receive the state")
    p.add_argument("--hold-at", type=int, default=0, help="at this step, wait for ...")
    p.add_argument("--hold-world", type=int, default=0, help="... a view this large (once)")
    p.add_argument("--deadline", type=float, default=120.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        return run(args)
    except DaemonUnavailable as exc:
        _emit("error", error=f"daemon unavailable: {exc}")
        return 4
    except Evicted:
        # the daemon's incarnation was removed (it stalled past the heartbeat timeout);
        # the client has no call to rejoin, so this peer is out of the run
        _emit("error", error="evicted from the group")
        return 5


if __name__ == "__main__":
    sys.exit(main())

"""One training process of ``phalanx demo --torch``: a torch model through phalanx.torch.

Run as ``python -m phalanx.demo.torch_worker --socket S --steps N ...`` by the demo. It
talks to its ``phalanx daemon`` only through the client, and trains
:mod:`phalanx.demo.torch_model`'s network with the public API:

* elastic DDP (default): :class:`phalanx.torch.Manager` — ``begin_step`` (view, state
  for a newcomer, the opening check), this member's shard of the step's global batch,
  ``backward`` (gradient buckets all-reduced meanwhile), ``commit`` (vote, then the
  optimizer and LR-scheduler step; ``user_state["seen"]``, the data position, moves on);
* ``--diloco H``: :class:`phalanx.torch.DiLoCo` — inner SGD steps on its shard, an outer
  Nesterov step on the averaged pseudo-gradient every H steps.

It reports to the demo as JSON lines on stdout, the numpy worker's events
(:mod:`phalanx.demo.worker`: ``ready``, ``view``, ``sync``, ``commit``, ``retry``,
``held``, ``done``, ``error``) plus ``outer`` (DiLoCo: one per outer sync, with the
contributors and this member's weight, for the reference). ``done`` carries the final
parameters and buffers (base64 float64), their SHA-256 and the data position.

This module must never write anything but JSON lines to stdout, nor run without a
deadline.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import torch

_IMPORTED = time.monotonic()  # the replacement-latency benchmark measures from here

from phalanx.demo.torch_model import (  # noqa: E402
    TorchDemo,
    batch,
    evaluate,
    flat_state,
    make_data,
    make_inner,
    make_model,
    make_optimizer,
    make_outer,
    rows,
    state_sha256,
)
from phalanx.errors import DaemonUnavailable  # noqa: E402
from phalanx.membership.errors import Evicted  # noqa: E402
from phalanx.torch.errors import JobMismatch  # noqa: E402

__all__ = ["main"]

log = logging.getLogger(__name__)


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


def _hold(pg: Any, args: argparse.Namespace, step: int, deadline: float, me: str) -> bool:
    """At ``--hold-at``, wait (once) until the view has ``--hold-world`` members and,
    with ``--hold-file``, until that file exists (a test creates it once the newcomer's
    training process is ready: its daemon alone can be in the view seconds earlier)."""

    def waiting() -> bool:
        late_file = bool(args.hold_file) and not os.path.exists(args.hold_file)
        return pg.view().world < args.hold_world or late_file

    if step < args.hold_at or args.hold_world <= 0 or not waiting():
        return False
    t0 = time.monotonic()
    while waiting():
        if time.monotonic() > deadline:
            raise TimeoutError("the replacement never joined")
        time.sleep(0.02)
    _emit("held", member=me, step=step, seconds=time.monotonic() - t0)
    return True


FAULTS = ("die-in-backward", "leave-in-backward", "die-in-outer", "leave-in-outer")


def _faults(specs: list[str]) -> dict[str, int]:
    """``--fault KIND@STEP`` (the tests' injected faults) -> {kind: step}."""
    out = {}
    for spec in specs:
        kind, _, step = spec.partition("@")
        if kind not in FAULTS or not step.isdigit():
            raise SystemExit(f"bad --fault {spec!r}: KIND@STEP, KIND one of {', '.join(FAULTS)}")
        out[kind] = int(step)
    return out


def _go(pg: Any, kind: str, step: int) -> None:
    """Die (SIGKILL, the daemon first) or leave (SIGTERM to the daemon: it leaves the
    group gracefully; then exit) right now."""
    _emit("fault", member=pg.member_id, fault=kind, step=step)
    if kind.startswith("die"):
        os.kill(pg.daemon_pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(pg.daemon_pid, signal.SIGTERM)
    end = time.monotonic() + 15.0
    while time.monotonic() < end:
        try:
            pg.view()
        except DaemonUnavailable:
            break
        time.sleep(0.02)
    os._exit(0)


def _ddp(
    pg: Any, args: argparse.Namespace, deadline: float
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from phalanx.torch import Manager, StepTimeout

    me = pg.member_id
    x, y = make_data(args.seed, args.demo)
    model = make_model(args.seed, args.demo)
    opt, sched = make_optimizer(model, args.demo)
    user: dict[str, Any] = {"seen": 0}
    mgr = Manager(
        pg, model, opt, scheduler=sched, user_state=user, global_batch=64, join=args.fresh,
        job=args.job, codec=args.codec, timeout=20.0, op_timeout=20.0,
        bucket_cap_mb=args.bucket_cap_mb,
    )  # fmt: skip
    _emit("ready", member=me, pid=os.getpid(), daemon_pid=pg.daemon_pid)
    last_epoch, held = -1, False
    faults = _faults(args.fault)
    while mgr.step < args.steps:
        if time.monotonic() > deadline:
            raise TimeoutError("deadline passed")
        if not held and mgr.step >= 0:
            held = _hold(pg, args, mgr.step, deadline, me)
        failed = mgr.stats["attempts_failed"]
        try:
            s = mgr.begin_step()
        except StepTimeout as exc:
            _emit("retry", member=me, step=-1, why=f"begin_step: {exc}")
            continue
        for _ in range(mgr.stats["attempts_failed"] - failed):  # attempts begin_step redid
            _emit("retry", member=me, step=s.step, epoch=s.epoch, why=mgr.stats["last_failure"])
        if s.epoch != last_epoch:
            last_epoch = s.epoch
            _emit("view", member=me, epoch=s.epoch, members=list(s.members), step=s.step)
            if s.synced:
                _emit("sync", member=me, step=s.step, bytes=s.sync_bytes, epoch=s.epoch)
        if s.step >= args.steps:
            break
        idx = batch(args.seed, s.step)[s.shard()]
        loss = torch.nn.functional.cross_entropy(model(rows(x, idx)), rows(y, idx))
        if args.step_time > 0:
            time.sleep(args.step_time)  # stands for a bigger model's forward/backward
        for kind in ("die-in-backward", "leave-in-backward"):
            if faults.get(kind) == s.step:  # the first layer's gradient comes last
                first = next(model.parameters())
                first.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    lambda p, k=kind, st=s.step: _go(pg, k, st)
                )
        loss.backward()  # type: ignore[no-untyped-call]
        if mgr.commit(apply=lambda: user.__setitem__("seen", user["seen"] + 64)):
            _emit("commit", member=me, step=s.step, epoch=s.epoch, world=s.world,
                  loss=float(loss.detach()), attempts=s.attempt)  # fmt: skip
        else:
            _emit("retry", member=me, step=s.step, epoch=s.epoch, why=mgr.stats["last_failure"])
    stats = dict(mgr.stats, seen=user["seen"])
    mgr.close()
    return model, stats


def _diloco(pg: Any, args: argparse.Namespace, deadline: float
            ) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    from phalanx.torch import DiLoCo

    me = pg.member_id
    x, y = make_data(args.seed, args.demo)
    model = make_model(args.seed, args.demo)
    inner = make_inner(model, args.demo)
    user: dict[str, Any] = {"seen": 0}
    algo = DiLoCo(
        pg, model, inner, sync_every=args.diloco, outer_optimizer=make_outer(args.demo),
        codec=args.codec, global_batch=64, user_state=user, join=args.fresh,
        job=args.job, timeout=60.0, op_timeout=20.0,
    )  # fmt: skip
    faults = _faults(args.fault)
    _emit("ready", member=me, pid=os.getpid(), daemon_pid=pg.daemon_pid)
    last_epoch, held, reported, synced = -1, False, 0, 0

    def report() -> None:
        nonlocal last_epoch, reported, synced
        if algo.stats["state_syncs"] > synced:
            synced = algo.stats["state_syncs"]
            _emit("sync", member=me, step=algo.step, bytes=algo.stats["sync_bytes"],
                  epoch=algo.epoch)  # fmt: skip
        for rep in algo.reports[reported:]:
            for _ in range(rep.attempts - 1):  # failed attempts of this outer sync
                _emit("retry", member=me, step=rep.step - 1, epoch=rep.epoch,
                      why=algo.stats["last_failure"])  # fmt: skip
            _emit("outer", member=me, step=rep.step, epoch=rep.epoch,
                  contributors=list(rep.contributors), w=rep.mine,
                  round_members=list(rep.round_members), attempts=rep.attempts)  # fmt: skip
        reported = len(algo.reports)
        if algo.epoch != last_epoch:
            last_epoch = algo.epoch
            _emit("view", member=me, epoch=algo.epoch, members=list(algo.members),
                  step=algo.step)  # fmt: skip

    while algo.step < args.steps:
        if time.monotonic() > deadline:
            raise TimeoutError("deadline passed")
        if not held and algo.step >= 0:
            held = _hold(pg, args, algo.step, deadline, me)
        s = algo.begin_step()
        report()
        if s.step >= args.steps:
            break
        idx = batch(args.seed, s.step)[algo.shard()]
        inner.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(rows(x, idx)), rows(y, idx))
        if args.step_time > 0:
            time.sleep(args.step_time)
        loss.backward()  # type: ignore[no-untyped-call]
        inner.step()
        epoch, world = algo.epoch, len(algo.members)
        for kind in ("die-in-outer", "leave-in-outer"):
            if faults.get(kind) == s.step + 1:  # inside this outer sync, after the deltas
                algo._bufsync.reduce = lambda *a, k=kind, st=s.step + 1: _go(pg, k, st)
        algo.end_step()
        # an inner step is "committed" locally at once; the outer syncs are reported apart
        _emit("commit", member=me, step=s.step, epoch=epoch, world=world,
              loss=float(loss.detach()), attempts=1)  # fmt: skip
        report()
    stats = dict(algo.stats, seen=algo.step * 64)
    algo.close()
    return model, stats


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.deadline
    pg = _connect(args.socket, deadline)
    try:
        me = pg.member_id
        _emit("imported", member=me, t_imported=_IMPORTED)
        while True:
            v = pg.view()
            if v.rank is not None and v.world >= args.expect_world:
                break
            if time.monotonic() > deadline:
                _emit("error", member=me, error=f"no view of {args.expect_world} members in time")
                return 3
            time.sleep(0.02)
        _emit("attached", member=me)  # the daemon is in a view: its client may start
        try:
            model, stats = (_diloco if args.diloco else _ddp)(pg, args, deadline)
        except TimeoutError as exc:
            _emit("error", member=me, error=str(exc))
            return 3
        except JobMismatch as exc:
            _emit("foreign", member=me, epoch=exc.epoch, members=list(exc.members))
            return 6
        x, y = make_data(args.seed, args.demo)
        final = b"" if args.no_final else flat_state(model).tobytes()
        _emit(
            "done", member=me, step=args.steps, loss=evaluate(model, x, y),
            sha256=state_sha256(model), params=base64.b64encode(final).decode(),
            seen=stats["seen"], stats={k: v for k, v in stats.items() if k != "last_failure"},
        )  # fmt: skip
        return 0
    finally:
        pg.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phalanx.demo.torch_worker")
    p.add_argument("--socket", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="none")
    p.add_argument("--diloco", type=int, default=0, metavar="H")
    p.add_argument("--step-time", type=float, default=0.0)
    p.add_argument("--expect-world", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="a newcomer: receive the state")
    p.add_argument("--hold-at", type=int, default=0)
    p.add_argument("--hold-world", type=int, default=0)
    p.add_argument("--hold-file", default="", help="at --hold-at, also wait for this file")
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--hidden", type=int, default=TorchDemo().hidden, help="hidden width")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--inner-lr", type=float, default=TorchDemo().inner_lr)
    p.add_argument("--lr-step", type=int, default=TorchDemo().lr_step, help="StepLR period")
    p.add_argument("--no-final", action="store_true", help="skip the final report's state")
    p.add_argument("--job", default="phalanx-demo-torch", help="the job's name (identity)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--fault", action="append", default=[], metavar="KIND@STEP",
                   help=f"(tests) inject a fault: {', '.join(FAULTS)}")  # fmt: skip
    args = p.parse_args(argv)
    args.demo = TorchDemo(hidden=args.hidden, dtype=args.dtype, inner_lr=args.inner_lr,
                          lr_step=args.lr_step)  # fmt: skip
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # several training processes and their daemons share the machine's cores: one
    # intra-op thread each (the model is tiny; spinning OpenMP workers would starve
    # the daemons that carry the collectives)
    torch.set_num_threads(1)
    try:
        return run(args)
    except DaemonUnavailable as exc:
        _emit("error", error=f"daemon unavailable: {exc}")
        return 4
    except Evicted:
        _emit("error", error="evicted from the group")
        return 5


if __name__ == "__main__":
    sys.exit(main())

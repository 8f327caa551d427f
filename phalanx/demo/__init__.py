"""``phalanx demo``: a local cluster trains a model through a SIGKILL and a join.

``phalanx demo [--peers 4] [--steps 300] [--kill-at 100] [--join-at 180] [--codec C]
[--seed S]`` starts a coordinator, one ``phalanx daemon`` per peer and one training
process per daemon on 127.0.0.1 (a fresh cluster secret in a 0600 file), trains a
small MLP data-parallel in numpy, kills a peer and its daemon at ``--kill-at``, starts
a replacement at ``--join-at`` that receives the parameters (hash-verified) and joins,
and prints a summary: steps, view changes, steps retried, time lost per fault, each
daemon's /metrics URL, and the final loss against a single-process reference.

Exit status: 0 when every check passed, 1 when one failed (the logs are kept and
their directory named), 2 on bad options. docs/demo.md explains the design.

Parts: :mod:`~phalanx.demo.model` (data, model, reference; pure numpy),
:mod:`~phalanx.demo.worker` (one training process), :mod:`~phalanx.demo.cluster`
(processes by PID), :mod:`~phalanx.demo.scenario` (faults, checks, figures),
:mod:`~phalanx.demo.progress` (the bar on stderr). This module only parses options and
prints the summary on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from phalanx.demo.scenario import CODECS, DemoOptions, DemoResult, hold_at, run_demo

__all__ = ["format_summary", "register"]


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``phalanx demo``'s options; return the function that runs it."""
    d = DemoOptions()
    parser.description = (
        "Start a coordinator, N daemons and N training processes on this machine; train "
        "a small MLP data-parallel; SIGKILL a peer, start a replacement that syncs state "
        "and joins; check the final model against a single-process run."
    )
    a = parser.add_argument
    a("--peers", type=int, default=d.peers, help=f"training peers (default {d.peers})")
    a("--steps", type=int, default=d.steps, help=f"SGD steps (default {d.steps})")
    a(
        "--kill-at",
        type=int,
        default=d.kill_at,
        metavar="STEP",
        help=f"SIGKILL a peer and its daemon at this step; 0: never (default {d.kill_at})",
    )
    a(
        "--join-at",
        type=int,
        default=d.join_at,
        metavar="STEP",
        help=f"start a replacement peer at this step; 0: never (default {d.join_at})",
    )
    a(
        "--codec",
        choices=CODECS,
        default=d.codec,
        help="compression of the gradient all-reduce (default none)",
    )
    a("--seed", type=int, default=d.seed, help="dataset, initial weights and batches")
    a(
        "--step-time",
        type=float,
        default=d.step_time,
        metavar="S",
        help=f"seconds each step spends 'computing', standing in for a real model's "
        f"forward/backward pass (default {d.step_time})",
    )
    a("--timeout", type=float, default=d.timeout, metavar="S",
      help=f"fail if the run takes longer (default {d.timeout:.0f})")  # fmt: skip
    a("--torch", action="store_true",
      help="train a torch.nn model (with BatchNorm) through phalanx.torch instead of the "
           "numpy MLP (needs the torch extra)")  # fmt: skip
    a("--diloco", type=int, default=0, metavar="H",
      help="with --torch: DiLoCo, inner steps alone and an outer sync every H steps "
           "(H must divide --steps)")  # fmt: skip
    parser.set_defaults(default_log_level="WARNING")
    return run


def run(args: argparse.Namespace) -> int:
    opts = DemoOptions(
        peers=args.peers, steps=args.steps, kill_at=args.kill_at, join_at=args.join_at,
        codec=args.codec, seed=args.seed, step_time=args.step_time, timeout=args.timeout,
        log_level="INFO", torch=args.torch, diloco=args.diloco,
    )  # fmt: skip
    problems = opts.problems()
    if problems:
        for p in problems:
            sys.stderr.write(f"phalanx demo: {p}\n")
        return 2
    res = run_demo(opts)
    sys.stdout.write(format_summary(res))
    sys.stdout.flush()
    return 0 if res.ok else 1


def _s(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}s"


def format_summary(res: DemoResult) -> str:
    """The summary the demo prints (plain text, ends with a newline)."""
    o = res.options
    flavour = ""
    if o.torch:
        flavour = f"torch DiLoCo H={o.diloco}, " if o.diloco else "torch elastic DDP, "
    lines = [
        "",
        f"phalanx demo: {flavour}{o.peers} peers, {res.steps}/{o.steps} steps, codec {o.codec}, "
        f"seed {o.seed}",
        f"  wall time        {res.wall_s:.1f}s (start-up {res.startup_s:.1f}s, "
        f"median step {res.step_s * 1000:.1f} ms incl. {o.step_time * 1000:.0f} ms simulated compute)",
        f"  view changes     {res.view_changes} during training",
        f"  steps retried    {res.steps_retried} ({res.attempts_failed} failed attempts "
        "over all peers; none applied)",
    ]
    for fl in res.faults:
        if fl.kind == "kill":
            what = f"kill {fl.member} at step {fl.at_step}: new view after {_s(fl.view_after_s)}"
        else:
            what = (f"join {fl.member} started at step {fl.at_step}: admitted after "
                    f"{_s(fl.view_after_s)}, {fl.sync_bytes} bytes of state received "
                    "(verified)")  # fmt: skip
        lines.append(f"  fault            {what}")
        lines.append(
            f"                   resumed at step {fl.resumed_step}, time lost {_s(fl.lost_s)}, "
            f"retried steps {fl.retried_steps or 'none'}"
        )
    if res.held_s > 0:
        lines.append(
            f"  waited           {res.held_s:.2f}s at step {hold_at(o)} for the replacement "
            "(it was not in yet; see docs/demo.md)"
        )
    lines.append("  metrics          (each daemon's /metrics while it ran)")
    for member, url in res.metrics.items():
        got = res.scraped.get(member)
        extra = (f"  ops {got['ops']:.0f}, op failures {got['op_failures']:.0f}, "
                 f"view changes {got['view_changes']:.0f}") if got else "  (gone)"  # fmt: skip
        lines.append(f"    {member:<8} {url}{extra}")
    tol = res.tolerance
    if not res.members_final:  # nothing trained: no model to compare
        lines.append("FAILED:")
        lines += [f"  - {e}" for e in res.errors]
        if res.logs:
            lines.append(f"  logs kept in {res.logs}")
        return "\n".join(lines) + "\n"
    lines += [
        f"  final loss       {res.final_loss:.10f} (initial {res.initial_loss:.4f})",
        f"  reference loss   {res.reference_loss:.10f} (one process, whole batches, same steps)",
        f"  difference       {res.loss_diff:.3g} (tolerance {tol:g}); "
        f"max |param - reference| {res.param_diff:.3g}",
        f"  final members    {', '.join(res.members_final)}; parameters "
        f"{'bit-identical' if res.bit_identical else 'DIFFER'} on all of them",
    ]
    if res.ok:
        lines.append("OK: the model matches the single-process reference")
    else:
        lines.append("FAILED:")
        lines += [f"  - {e}" for e in res.errors]
        if res.logs:
            lines.append(f"  logs kept in {res.logs}")
    return "\n".join(lines) + "\n"

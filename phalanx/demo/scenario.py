"""What ``phalanx demo`` does: train through a kill and a join, then check and summarize.

:func:`run_demo` starts a :class:`~phalanx.demo.cluster.Cluster` (one coordinator, one
``phalanx daemon`` and one training process per peer), follows the training
processes' JSON lines (:mod:`phalanx.demo.worker`), injects the faults, and returns a
:class:`DemoResult`: the figures of the summary and the list of everything that went
wrong (empty: exit 0).

The faults, keyed by the group's step (the step its state is at):

* ``kill_at``: SIGKILL one training peer and its daemon (daemon first, so the daemon
  never sees its client vanish and leaves on its own);
* ``join_at``: start a replacement (daemon + training process with no state); it is
  admitted at a commit boundary, receives the parameters (verified) at its
  first ``begin_step``, and trains with the others to the end.

The checks: every training process ends at ``steps`` with bit-identical parameters;
those parameters and the final loss match a single-process reference run within
:data:`TOLERANCE`; the victim's death produced a view without it; the replacement
synced and committed steps; nothing passed the deadline.

Time lost per fault: the gap between the last step committed before the fault and the
first one committed after it, less one ordinary step (the median gap between commits
of the run). This module writes nothing to stdout: the caller prints the summary.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import selectors
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phalanx.demo.cluster import Cluster, DemoError, Proc
from phalanx.demo.model import Problem, init_params, loss, make_dataset, reference
from phalanx.demo.progress import Progress

__all__ = [
    "CODECS",
    "TOLERANCE",
    "DemoOptions",
    "DemoResult",
    "FaultReport",
    "hold_at",
    "run_demo",
]

CODECS = ("none", "zstd", "fp16", "bf16", "int8")

#: |final loss - reference loss| allowed, per codec (see docs/demo.md for the reasons):
#: lossless codecs differ from the reference only in the order of float64 additions;
#: lossy ones round every gradient element on the wire.
TOLERANCE: dict[str, float] = {
    "none": 1e-9,
    "zstd": 1e-9,
    "fp16": 1e-4,
    "bf16": 1e-3,
    "int8": 1e-3,
}
#: largest |parameter - reference parameter| allowed with a lossless codec
PARAM_TOLERANCE = 1e-8


@dataclass(frozen=True)
class DemoOptions:
    peers: int = 4
    steps: int = 300
    kill_at: int = 100
    join_at: int = 180
    codec: str = "none"
    seed: int = 0
    step_time: float = 0.03
    timeout: float = 120.0
    log_level: str = "INFO"
    torch: bool = False  # a torch.nn model through phalanx.torch (phalanx.demo.torch_worker)
    diloco: int = 0  # with torch: DiLoCo, an outer sync every this many steps (0: DDP)

    def problems(self) -> list[str]:
        """What is wrong with these options (empty: fine)."""
        out = []
        if not 1 <= self.peers <= 16:
            out.append("--peers must be in 1..16")
        if self.steps < 1:
            out.append("--steps must be >= 1")
        if self.kill_at and not 0 < self.kill_at < self.steps:
            out.append("--kill-at must be in 1..steps-1 (0: no kill)")
        if self.kill_at and self.peers < 2:
            out.append("--kill-at needs --peers >= 2 (someone must survive)")
        if self.join_at and not 0 < self.join_at < self.steps:
            out.append("--join-at must be in 1..steps-1 (0: no join)")
        if self.codec not in CODECS:
            out.append(f"--codec must be one of {', '.join(CODECS)}")
        if self.step_time < 0:
            out.append("--step-time must be >= 0")
        if self.diloco and not self.torch:
            out.append("--diloco needs --torch")
        if self.diloco < 0 or (self.diloco and self.steps % self.diloco):
            out.append("--diloco H must be > 0 and divide --steps")
        if self.diloco and self.join_at and self.join_at >= self.steps - 2 * self.diloco:
            out.append("with --diloco H, --join-at must leave two outer syncs after it")
        if not self.timeout > 0:
            out.append("--timeout must be > 0")
        return out


@dataclass
class FaultReport:
    kind: str  # kill | join
    member: str
    at_step: int  # the group's step when the fault was injected
    t: float
    view_epoch: int | None = None  # the view that followed it
    view_after_s: float | None = None  # fault -> first training process saw that view
    resumed_step: int | None = None  # first step committed in that view
    lost_s: float | None = None
    retried_steps: list[int] = field(default_factory=list)
    sync_bytes: int = 0


@dataclass
class DemoResult:
    options: DemoOptions
    steps: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0
    step_s: float = 0.0  # median time between commits
    view_changes: int = 0
    steps_retried: int = 0
    held_s: float = 0.0  # the group waited this long at hold_at() for a late replacement
    attempts_failed: int = 0
    faults: list[FaultReport] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)  # member -> /metrics URL
    scraped: dict[str, dict[str, float]] = field(default_factory=dict)
    final_loss: float = float("nan")
    reference_loss: float = float("nan")
    initial_loss: float = float("nan")
    loss_diff: float = float("nan")
    param_diff: float = float("nan")
    tolerance: float = 0.0
    members_final: list[str] = field(default_factory=list)
    bit_identical: bool = False
    errors: list[str] = field(default_factory=list)
    logs: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


class _Follower:
    """Reads the training processes' JSON lines and keeps what the summary needs."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.partial: dict[str, bytes] = {}
        self.workers: dict[str, Proc] = {}
        self.eof: set[str] = set()
        self.commit_t: dict[int, float] = {}  # step -> first commit report
        self.commit_epoch: dict[int, int] = {}
        self.loss: dict[int, float] = {}
        self.committers: dict[str, int] = {}  # member -> steps committed
        self.views: dict[int, tuple[float, tuple[str, ...]]] = {}  # epoch -> (t, members)
        self.retries: list[dict[str, Any]] = []
        self.syncs: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self.ignored: set[str] = set()  # members whose reports no longer count (killed)
        self.held = 0.0  # longest wait for a late replacement (see worker --hold-at)
        self.commit_world: dict[int, int] = {}  # step -> world it was committed in
        self.outer: dict[int, dict[str, Any]] = {}  # DiLoCo: sync step -> what members said

    def add(self, member: str, proc: Proc) -> None:
        self.workers[member] = proc
        os.set_blocking(proc.stdout.fileno(), False)
        self.sel.register(proc.stdout, selectors.EVENT_READ, member)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            member: str = key.data
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(key.fileobj)
                self.eof.add(member)
                continue
            data = self.partial.get(member, b"") + chunk
            *lines, self.partial[member] = data.split(b"\n")
            for line in lines:
                if line.strip():
                    self._event(member, line)

    def _event(self, member: str, line: bytes) -> None:
        if member in self.ignored:
            return
        try:
            ev = json.loads(line)
        except ValueError:
            self.errors.append(f"{member}: unreadable report {line[:100]!r}")
            return
        kind, t = ev.get("ev"), float(ev.get("t", 0.0))
        if kind == "commit":
            step = int(ev["step"])
            if step not in self.commit_t or t < self.commit_t[step]:
                self.commit_t[step] = t
            self.commit_epoch[step] = int(ev["epoch"])
            self.commit_world[step] = int(ev.get("world", 0))
            self.loss[step] = float(ev["loss"])
            self.committers[member] = self.committers.get(member, 0) + 1
        elif kind == "view":
            epoch = int(ev["epoch"])
            if epoch not in self.views or t < self.views[epoch][0]:
                self.views[epoch] = (t, tuple(ev["members"]))
        elif kind == "retry":
            self.retries.append(ev)
        elif kind == "outer":
            o = self.outer.setdefault(int(ev["step"]), {"contributors": tuple(ev["contributors"]),
                                                        "w": {}, "round": ()})  # fmt: skip
            o["w"][member] = float(ev["w"])
            if ev["w"] and ev.get("round_members"):
                o["round"] = tuple(ev["round_members"])
        elif kind == "sync":
            self.syncs.append(ev)
        elif kind == "held":
            self.held = max(self.held, float(ev["seconds"]))
        elif kind == "done":
            self.done[member] = ev
        elif kind == "error":
            self.errors.append(f"{member}: {ev.get('error')}")

    @property
    def state_step(self) -> int:
        """The step the group's state is at (one past the last committed step)."""
        return max(self.commit_t, default=-1) + 1

    def close(self) -> None:
        self.sel.close()


def _scrape(url: str) -> dict[str, float]:
    """A few totals from a daemon's /metrics (empty if it does not answer)."""
    out = {"ops": 0.0, "op_failures": 0.0, "view_changes": 0.0}
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        if base == "phalanx_op_duration_seconds_count":
            out["ops"] += v
        elif base == "phalanx_op_failures_total":
            out["op_failures"] += v
        elif base == "phalanx_view_changes_total":
            out["view_changes"] += v
    return out


def hold_at(o: DemoOptions) -> int:
    """The step at which the group waits for a replacement that is not in yet: the
    last tenth of the run (after ``join_at``)."""
    at = o.steps - max(1, o.steps // 10)
    if o.diloco:  # the replacement needs a sync to enter and a whole round to train
        at = min(at, o.steps - o.diloco - max(1, o.diloco // 5))
    return max(at, o.join_at + 1)


def _worker_args(o: DemoOptions, *, expect_world: int, fresh: bool) -> list[str]:
    args = [
        "--steps", str(o.steps), "--seed", str(o.seed), "--codec", o.codec,
        "--step-time", str(o.step_time), "--expect-world", str(expect_world),
        "--deadline", str(o.timeout),
    ]  # fmt: skip
    if o.diloco:
        args += ["--diloco", str(o.diloco)]
    if fresh:
        return [*args, "--fresh"]
    if o.join_at:
        final = o.peers - (1 if o.kill_at else 0) + 1
        args += ["--hold-at", str(hold_at(o)), "--hold-world", str(final)]
    return args


def _worker_module(o: DemoOptions) -> str:
    return "phalanx.demo.torch_worker" if o.torch else "phalanx.demo.worker"


def run_demo(o: DemoOptions, progress: Progress | None = None) -> DemoResult:
    """Run the demo; never raises for a failed run (see ``DemoResult.errors``)."""
    res = DemoResult(o)
    t0 = time.monotonic()
    deadline = t0 + o.timeout
    bar = progress or Progress(o.steps)
    follow = _Follower()
    cluster = Cluster(log_level=o.log_level)
    try:
        _train(o, res, cluster, follow, bar, deadline)
    except DemoError as exc:
        res.errors.append(str(exc))
    finally:
        bar.close()
        res.wall_s = time.monotonic() - t0
        # scrape while the daemons still run, then stop everything
        for member, url in res.metrics.items():
            d = next((p for p in cluster.procs if p.name == f"daemon-{member}"), None)
            if d is not None and d.alive():
                res.scraped[member] = _scrape(url)
        follow.close()
        cluster.close(keep_dir=bool(res.errors))
        if res.errors:
            res.logs = str(cluster.dir)
    return res


def _train(
    o: DemoOptions, res: DemoResult, cluster: Cluster, f: _Follower, bar: Progress,
    deadline: float,
) -> None:  # fmt: skip
    t0 = time.monotonic()
    members = [f"peer-{i}" for i in range(o.peers)]
    coord = cluster.start_coordinator(deadline)
    bar.event(f"coordinator on {coord}; starting {o.peers} daemons and training processes")
    daemons = {m: cluster.start_daemon(m) for m in members}
    for m, d in daemons.items():
        cluster.await_daemon(d, deadline)
        res.metrics[m] = f"http://{d.info.get('metrics', '?')}/metrics"
    for m in members:
        f.add(m, cluster.start_worker(m, _worker_args(o, expect_world=o.peers, fresh=False),
                                      module=_worker_module(o)))  # fmt: skip
    victim = f"peer-{o.peers // 2}" if o.kill_at else None
    joiner = f"peer-{o.peers}" if o.join_at else None
    expected = {m for m in members if m != victim} | ({joiner} if joiner else set())
    kill: FaultReport | None = None
    join: FaultReport | None = None
    join_daemon: Proc | None = None
    started = False
    last_ok: float | None = None  # when all but the replacement had finished
    while True:
        now = time.monotonic()
        if now > deadline:
            raise DemoError(
                f"deadline passed ({o.timeout:.0f}s) at step {f.state_step}/{o.steps}: "
                f"waiting for {sorted(expected - set(f.done))}"
            )
        f.pump(0.05)
        step = f.state_step
        if not started and f.commit_t:
            started = True
            res.startup_s = time.monotonic() - t0
        world = len(f.views[max(f.views)][1]) if f.views else 0
        lossv = f.loss.get(step - 1, float("nan"))
        retried = len({r["step"] for r in f.retries if r.get("step", -1) >= 0})
        shown = "-" if np.isnan(lossv) else f"{lossv:.4f}"
        bar.update(step, f"loss {shown} world {world} retried {retried}")
        if victim and kill is None and step >= o.kill_at:
            kill = FaultReport("kill", victim, step, time.monotonic())
            daemons[victim].kill()  # the daemon first: see the module docstring
            f.workers[victim].kill()
            f.ignored.add(victim)
            res.faults.append(kill)
            bar.event(
                f"step {step}: SIGKILL {victim}'s training process (pid "
                f"{f.workers[victim].pid}) and its daemon (pid {daemons[victim].pid})"
            )
        if joiner and join is None and step >= o.join_at:
            join = FaultReport("join", joiner, step, time.monotonic())
            res.faults.append(join)
            join_daemon = cluster.start_daemon(joiner)
            args = _worker_args(o, expect_world=1, fresh=True)
            f.add(joiner, cluster.start_worker(joiner, args, module=_worker_module(o)))
            bar.event(f"step {step}: starting replacement {joiner} (daemon + training process)")
        waiting = joiner is not None and joiner not in res.metrics
        if waiting and joiner and join_daemon is not None and cluster.daemon_ready(join_daemon):
            res.metrics[joiner] = f"http://{join_daemon.info.get('metrics', '?')}/metrics"
        _note_views(f, bar, kill, join)
        for m, p in f.workers.items():
            if m in f.eof and m not in f.done and m not in f.ignored:
                p.popen.wait(5.0)
                raise DemoError(
                    f"training process {m} exited with status {p.popen.returncode} "
                    f"before the end:\n{p.log_tail()}"
                )
        res.steps = f.state_step
        if expected <= set(f.done):
            break
        if joiner and joiner not in f.done and expected - {joiner} <= set(f.done):
            if last_ok is None:
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok > 3.0:
                raise DemoError(
                    f"training ended before the replacement {joiner} joined it "
                    f"(give it more time: a larger --steps or --step-time)"
                )
    for p in f.workers.values():
        if not p.killed:
            p.popen.wait(10.0)
    _summarize(o, res, f, kill, join, expected)


def _note_views(
    f: _Follower, bar: Progress, kill: FaultReport | None, join: FaultReport | None
) -> None:
    for fault in (kill, join):
        if fault is None or fault.view_epoch is not None:
            continue
        for epoch in sorted(f.views):
            t, members = f.views[epoch]
            gone = fault.kind == "kill" and fault.member not in members and t >= fault.t
            came = fault.kind == "join" and fault.member in members
            if gone or came:
                fault.view_epoch = epoch
                fault.view_after_s = max(0.0, t - fault.t)
                what = "without" if gone else "with"
                bar.event(
                    f"view {epoch}: {len(members)} members, {what} {fault.member} "
                    f"({fault.view_after_s:.2f}s after the {fault.kind})"
                )
                break


def _summarize(
    o: DemoOptions, res: DemoResult, f: _Follower, kill: FaultReport | None,
    join: FaultReport | None, expected: set[str],
) -> None:  # fmt: skip
    errors = res.errors
    errors.extend(f.errors)
    res.steps = f.state_step
    res.held_s = f.held
    times = [f.commit_t[s] for s in sorted(f.commit_t)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    res.step_s = statistics.median(gaps) if gaps else 0.0
    train_epochs = sorted(set(f.commit_epoch.values()))
    res.view_changes = len(train_epochs) - 1 if train_epochs else 0
    failed = [r for r in f.retries if r.get("step", -1) >= 0]
    res.attempts_failed = len(failed)
    res.steps_retried = len({r["step"] for r in failed})
    for fault in (kill, join):
        if fault is None:
            continue
        if fault.view_epoch is None:
            errors.append(f"no view {'without' if fault.kind == 'kill' else 'with'} "
                          f"{fault.member} after the {fault.kind}")  # fmt: skip
            continue
        after = [s for s in sorted(f.commit_epoch) if f.commit_epoch[s] >= fault.view_epoch]
        if not after:
            errors.append(f"no step committed after the {fault.kind} of {fault.member}")
            continue
        fault.resumed_step = after[0]
        before = [s for s in f.commit_t if s < after[0]]
        if before:
            gap = f.commit_t[after[0]] - f.commit_t[max(before)]
            fault.lost_s = max(0.0, gap - res.step_s)
        lo = fault.at_step - 1
        fault.retried_steps = sorted(
            {int(r["step"]) for r in failed if lo <= r["step"] <= after[0]}
        )
        if fault.kind == "join":
            got = [s for s in f.syncs if s.get("member") == fault.member]
            fault.sync_bytes = sum(int(s["bytes"]) for s in got)
            if not got or fault.sync_bytes <= 0:
                errors.append(f"{fault.member} never received the group's state")
            if f.committers.get(fault.member, 0) == 0:
                errors.append(f"{fault.member} joined but never committed a step")
    if res.steps != o.steps:
        errors.append(f"training stopped at step {res.steps}, not {o.steps}")
    # every training process ends with the same bytes...
    shas = {m: d["sha256"] for m, d in f.done.items()}
    res.members_final = sorted(f.done)
    res.bit_identical = len(set(shas.values())) == 1 and set(shas) == expected
    if not res.bit_identical:
        errors.append(f"final parameters differ between training processes: {shas}")
    if not f.done:
        return
    if o.torch:
        from phalanx.demo.torch_model import check

        tc = check(o, f.done, f.commit_world, f.outer)
        res.initial_loss, res.reference_loss, res.final_loss = tc.initial, tc.reference, tc.final
        res.loss_diff, res.param_diff, res.tolerance = tc.loss_diff, tc.param_diff, tc.tolerance
        errors.extend(tc.errors)
        return
    # ... and they match the single-process reference
    pr = Problem()
    data = make_dataset(pr, o.seed)
    ref = reference(pr, o.seed, o.steps)
    first = next(iter(f.done.values()))
    got_params = np.frombuffer(base64.b64decode(first["params"]), dtype=np.float64)
    res.initial_loss = loss(pr, init_params(pr, o.seed), data)
    res.reference_loss = loss(pr, ref, data)
    res.final_loss = float(first["loss"])
    res.loss_diff = abs(res.final_loss - res.reference_loss)
    res.param_diff = float(np.max(np.abs(got_params - ref)))
    res.tolerance = TOLERANCE[o.codec]
    if not res.loss_diff <= res.tolerance:
        errors.append(
            f"final loss {res.final_loss:.12f} is {res.loss_diff:.3g} away from the "
            f"reference's {res.reference_loss:.12f} (tolerance {res.tolerance:g})"
        )
    if TOLERANCE[o.codec] < 1e-6 and not res.param_diff <= PARAM_TOLERANCE:
        errors.append(
            f"parameters are {res.param_diff:.3g} away from the reference's "
            f"(tolerance {PARAM_TOLERANCE:g})"
        )

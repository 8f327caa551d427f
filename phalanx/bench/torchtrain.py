"""``phalanx bench torch`` (also ``phalanx bench failover --torch``): PyTorch training
through phalanx.torch under faults, every figure from real processes.

Each part starts a fresh local cluster (:class:`phalanx.demo.cluster.Cluster`: a
coordinator, one ``phalanx daemon`` and one ``python -m phalanx.demo.torch_worker`` per
member, a generated secret) and reads the training processes' JSON events:

* ``failover`` — elastic DDP (:class:`phalanx.torch.Manager`) of ``--world`` members on
  the demo model. ``--repeats`` times: SIGKILL one member (its daemon first, then its
  training process) and measure **kill -> the survivors' next committed step** (the
  first commit of a step in a view without the victim); then start a replacement and
  measure **import torch -> its first contribution** (its first committed step, from the
  moment its process finished ``import torch``) and kill -> back at full world.
* ``transfer`` — two members train a model whose synced state (parameters, BatchNorm
  buffers, SGD momentum) is ``--state-size`` (default 256 MiB, float32); a third joins:
  the state transfer's rate as its daemon measured it (manifest + bytes +
  verification; the ``event=state_synced`` line), and the joiner's import -> first
  contribution.
* ``diloco`` — the same task, ``--steps`` steps, three members, twice: elastic DDP, then
  DiLoCo (``--sync-every`` H, ``--codec``, float32): bytes every daemon sent on the data
  plane (its ``phalanx_link_sent_bytes`` metric) per step, their ratio, and both runs'
  final loss (the whole dataset, BatchNorm in eval mode).

Output: one JSON object per measurement and one ``summary`` per part (medians) with
``--json``, else ``key=value`` lines. Exit status 1 if a part failed (a process died, a
deadline passed). Every wait has a deadline; every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from phalanx.bench._harness import parse_size, print_json, progress
from phalanx.demo.cluster import Cluster, DemoError, Proc

__all__ = ["PARTS", "TrainRun", "register", "run_parts"]

PARTS = ("failover", "transfer", "diloco")
_WORKER = "phalanx.demo.torch_worker"
_SYNC_RE = re.compile(r"event=state_synced .*received=True .*bytes=(\d+) seconds=([\d.]+)")


@dataclass
class _Member:
    name: str
    daemon: Proc
    worker: Proc
    events: list[dict[str, Any]] = field(default_factory=list)
    partial: bytes = b""


class TrainRun:
    """One local cluster and its training processes' JSON events (also used by the
    tests of phalanx.torch)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cluster = Cluster(log_level="INFO")
        self.sel = selectors.DefaultSelector()
        self.members: dict[str, _Member] = {}
        self.next_id = 0

    def start(self, args: list[str], *, fresh: bool, expect: int) -> _Member:
        name = f"peer-{self.next_id}"
        self.next_id += 1
        d = self.cluster.start_daemon(name)
        argv = [*args, "--expect-world", str(expect), "--deadline",
                str(max(5.0, self.deadline - time.monotonic()))]  # fmt: skip
        if fresh:
            argv.append("--fresh")
        w = self.cluster.start_worker(name, argv, module=_WORKER)
        m = _Member(name, d, w)
        os.set_blocking(w.stdout.fileno(), False)
        self.sel.register(w.stdout, selectors.EVENT_READ, m)
        self.members[name] = m
        return m

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            m: _Member = key.data
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(key.fileobj)
                continue
            *lines, m.partial = (m.partial + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    ev = json.loads(line)
                    if ev.get("ev") == "error":
                        raise DemoError(f"{m.name}: {ev.get('error')}")
                    m.events.append(ev)

    def wait(self, what: str, until: Callable[[], bool]) -> None:
        while not until():
            if time.monotonic() > self.deadline:
                raise DemoError(f"deadline passed waiting for {what}")
            dead = [
                m
                for m in self.members.values()
                if not m.worker.killed and not m.worker.alive() and not self.finished(m)
            ]
            self.pump(0.02)  # (a process that just exited may still have lines in its pipe)
            for m in dead:
                if not self.finished(m):
                    raise DemoError(f"{m.name} exited ({m.worker.popen.returncode}):\n"
                                    f"{m.worker.log_tail()}")  # fmt: skip

    @staticmethod
    def done(m: _Member) -> bool:
        return any(e["ev"] == "done" for e in m.events)

    @staticmethod
    def finished(m: _Member) -> bool:
        """Done, or gone on purpose (an injected fault, a foreign job noticed)."""
        return any(e["ev"] in ("done", "fault", "foreign") for e in m.events)

    def commits(self, m: _Member) -> list[dict[str, Any]]:
        return [e for e in m.events if e["ev"] == "commit"]

    def kill(self, m: _Member) -> float:
        t = time.monotonic()
        m.daemon.kill()  # the daemon first: see phalanx.demo.scenario
        m.worker.kill()
        self.sel.unregister(m.worker.stdout)
        return t

    def sent_bytes(self) -> float:
        """The sum of every live daemon's phalanx_link_sent_bytes."""
        total = 0.0
        for m in self.members.values():
            if m.daemon.killed or not self.cluster.daemon_ready(m.daemon):
                continue
            url = f"http://{m.daemon.info['metrics']}/metrics"
            with urllib.request.urlopen(url, timeout=5.0) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("phalanx_link_sent_bytes_total"):
                        total += float(line.rpartition(" ")[2])
        return total

    def close(self) -> None:
        self.sel.close()
        self.cluster.close()


def _worker_args(steps: int, *, extra: list[str] | None = None, step_time: float = 0.0
                 ) -> list[str]:  # fmt: skip
    return ["--steps", str(steps), "--step-time", str(step_time), *(extra or [])]


# --------------------------------------------------------------------------- parts


def _failover(a: argparse.Namespace, emit: Callable[[dict[str, Any]], None],
              say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    r = TrainRun(time.monotonic() + a.timeout)
    rows: list[dict[str, Any]] = []
    try:
        r.cluster.start_coordinator(r.deadline)
        args = _worker_args(10**6, step_time=a.step_time, extra=["--no-final"])
        live = [r.start(args, fresh=False, expect=a.world) for _ in range(a.world)]
        for m in live:
            r.cluster.await_daemon(m.daemon, r.deadline)
        r.wait("the first steps", lambda: all(len(r.commits(m)) >= 10 for m in live))
        for i in range(a.repeats):
            victim = live[(i + 1) % len(live)]
            survivors = [m for m in live if m is not victim]
            t_kill = r.kill(victim)
            say(f"repeat {i + 1}: SIGKILL {victim.name}")

            def resumed(ms: list[_Member] = survivors, t0: float = t_kill) -> float | None:
                ts = [e["t"] for m in ms for e in r.commits(m)
                      if e["t"] > t0 and e["world"] == a.world - 1]  # fmt: skip
                return min(ts) if ts else None

            r.wait("a commit without the victim", lambda: resumed() is not None)
            t_resume = resumed()
            assert t_resume is not None
            t_start = time.monotonic()
            new = r.start(args, fresh=True, expect=1)
            live = [*survivors, new]

            def started(m: _Member = new) -> bool:
                return bool(r.commits(m))

            r.wait("the replacement's first step", started)
            imported = next(e["t_imported"] for e in new.events if e["ev"] == "imported")
            first = r.commits(new)[0]["t"]
            sync = next((e for e in new.events if e["ev"] == "sync"), {})
            row = {
                "bench": "torch", "part": "failover", "repeat": i + 1, "world": a.world,
                "kill_to_commit_s": round(t_resume - t_kill, 4),
                "import_to_contribution_s": round(first - imported, 4),
                "kill_to_full_world_s": round(first - t_kill, 4),
                "replacement_start_to_import_s": round(imported - t_start, 4),
                "state_bytes": int(sync.get("bytes", 0)),
                # where the replacement's time went, from its import of torch
                "phases_s": {e["ev"]: round(e["t"] - imported, 3) for e in new.events
                             if e["ev"] in ("imported", "attached", "ready", "view", "sync")},
            }  # fmt: skip
            rows.append(row)
            emit(row)

            def steady(ms: list[_Member] = live, t0: float = first) -> bool:
                return all(len([e for e in r.commits(m) if e["t"] > t0]) >= 10 for m in ms)

            r.wait("steady state", steady)
    finally:
        r.close()
    return _summary("failover", rows, ["kill_to_commit_s", "import_to_contribution_s",
                                       "kill_to_full_world_s"])  # fmt: skip


def _sync_figures(log_text: str) -> tuple[int, float]:
    """(bytes, seconds) of the joiner daemon's ``event=state_synced`` line; DemoError
    when there is none: a transfer that cannot be read is not a valid row."""
    m = _SYNC_RE.search(log_text)
    if m is None:
        raise DemoError("the joiner's daemon logged no 'event=state_synced ... "
                        "received=True' line: the state transfer cannot be measured")  # fmt: skip
    return int(m.group(1)), float(m.group(2))


def _hidden_for(state_bytes: int) -> int:
    """Hidden width whose float32 state (params + BN buffers + SGD momentum) is
    about ``state_bytes``: per hidden unit 16+1+4 weights and bias, 2 BN params, 3 BN
    buffers... counted twice for the momentum."""
    per_unit = 4 * (2 * (16 + 1 + 4 + 2) + 2)
    return max(32, state_bytes // per_unit)


def _transfer(a: argparse.Namespace, emit: Callable[[dict[str, Any]], None],
              say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    r = TrainRun(time.monotonic() + a.timeout)
    hidden = _hidden_for(a.state_size)
    extra = ["--hidden", str(hidden), "--dtype", "float32", "--no-final"]
    rows: list[dict[str, Any]] = []
    try:
        r.cluster.start_coordinator(r.deadline)
        args = _worker_args(10**6, extra=extra)
        live = [r.start(args, fresh=False, expect=2) for _ in range(2)]
        r.wait("the first steps", lambda: all(len(r.commits(m)) >= 2 for m in live))
        say(f"founders train (hidden {hidden}); starting the joiner")
        new = r.start(args, fresh=True, expect=1)
        r.wait("the joiner's first step", lambda: bool(r.commits(new)))
        imported = next(e["t_imported"] for e in new.events if e["ev"] == "imported")
        text = ""
        for _ in range(50):  # the daemon's log line may trail the event a little
            text = new.daemon.err_path.read_text(errors="replace")
            if _SYNC_RE.search(text):
                break
            time.sleep(0.05)
        nbytes, seconds = _sync_figures(text)
        row = {
            "bench": "torch", "part": "transfer", "state_bytes": nbytes,
            "transfer_s": seconds,
            "transfer_MBps": round(nbytes / seconds / 1e6, 1) if seconds else None,
            "import_to_contribution_s": round(r.commits(new)[0]["t"] - imported, 4),
            "hidden": hidden,
        }  # fmt: skip
        rows.append(row)
        emit(row)
    finally:
        r.close()
    return _summary("transfer", rows, ["transfer_MBps", "import_to_contribution_s"])


def _train_run(a: argparse.Namespace, extra: list[str]) -> tuple[float, float, dict[str, Any]]:
    r = TrainRun(time.monotonic() + a.timeout)
    try:
        r.cluster.start_coordinator(r.deadline)
        # no LR decay: the DDP baseline keeps learning for the whole run, as DiLoCo does
        args = _worker_args(a.steps, extra=[*extra, "--dtype", "float32", "--hidden",
                                            str(a.hidden), "--no-final", "--lr-step",
                                            "1000000000"])  # fmt: skip
        live = [r.start(args, fresh=False, expect=3) for _ in range(3)]
        r.wait("the end of training", lambda: all(r.done(m) for m in live))
        sent = r.sent_bytes()
        done = [next(e for e in m.events if e["ev"] == "done") for m in live]
        return sent, float(done[0]["loss"]), done[0].get("stats", {})
    finally:
        r.close()


def _diloco(a: argparse.Namespace, emit: Callable[[dict[str, Any]], None],
            say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    say(f"elastic DDP, {a.steps} steps")
    ddp_bytes, ddp_loss, _ = _train_run(a, ["--codec", "none"])
    say(f"DiLoCo H={a.sync_every} codec {a.codec}, {a.steps} steps")
    dl_bytes, dl_loss, dl_stats = _train_run(
        a, ["--diloco", str(a.sync_every), "--codec", a.codec, "--inner-lr", str(a.inner_lr)]
    )
    row = {
        "bench": "torch", "part": "diloco", "steps": a.steps, "sync_every": a.sync_every,
        "codec": a.codec, "ddp_wire_bytes_per_step": round(ddp_bytes / a.steps, 1),
        "diloco_wire_bytes_per_step": round(dl_bytes / a.steps, 1),
        "bytes_ratio": round(dl_bytes / ddp_bytes, 5) if ddp_bytes else None,
        "ddp_final_loss": round(ddp_loss, 6), "diloco_final_loss": round(dl_loss, 6),
        "loss_ratio": round(dl_loss / ddp_loss, 4) if ddp_loss else None,
        "diloco_outer_syncs": dl_stats.get("syncs"),
    }  # fmt: skip
    emit(row)
    return {"bench": "torch", "part": "diloco", "summary": True,
            "bytes_ratio": row["bytes_ratio"], "loss_ratio": row["loss_ratio"]}  # fmt: skip


def _summary(part: str, rows: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "torch", "part": part, "summary": True, "n": len(rows)}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]
        if vals:
            out[f"{k}_median"] = round(statistics.median(vals), 4)
            out[f"{k}_max"] = round(max(vals), 4)
    return out


_RUNNERS = {"failover": _failover, "transfer": _transfer, "diloco": _diloco}


def run_parts(a: argparse.Namespace) -> int:
    def emit(row: dict[str, Any]) -> None:
        if a.json:
            print_json(row)
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def say(msg: str) -> None:
        if not a.quiet:
            progress(f"bench torch: {msg}")

    status = 0
    for part in a.parts:
        try:
            emit(_RUNNERS[part](a, emit, say))
        except DemoError as exc:
            emit({"bench": "torch", "part": part, "ok": False, "error": str(exc)})
            status = 1
    return status


def add_options(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--parts", type=lambda s: [p for p in s.split(",") if p], default=list(PARTS),
      help=f"comma-separated subset of {','.join(PARTS)} (default all)")  # fmt: skip
    a("--world", type=int, default=3, help="failover: members (default 3)")
    a("--repeats", type=int, default=5, help="failover: kills (default 5)")
    a("--step-time", type=float, default=0.01, help="failover: simulated compute per step")
    a("--state-size", type=parse_size, default=256 << 20, help="transfer: state (256MiB)")
    a("--steps", type=int, default=500, help="diloco: steps of each run (default 500)")
    a("--sync-every", type=int, default=50, help="diloco: H (default 50)")
    a("--codec", default="int8", help="diloco: pseudo-gradient codec (default int8)")
    a("--inner-lr", type=float, default=0.05, help="diloco: inner SGD learning rate")
    a("--hidden", type=int, default=256, help="diloco: hidden width of the model")
    a("--timeout", type=float, default=600.0, help="deadline of each part (s)")
    a("--json", action="store_true", help="JSON lines")
    a("--quiet", action="store_true", help="no progress lines on stderr")


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_options(parser)

    def run(args: argparse.Namespace) -> int:
        bad = [p for p in args.parts if p not in PARTS]
        if bad:
            parser.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
        if args.world < 2 or args.repeats < 1:
            parser.error("--world must be >= 2 and --repeats >= 1")
        if args.steps % args.sync_every:
            parser.error("--sync-every must divide --steps")
        return run_parts(args)

    return run

"""Elastic data-parallel training with phalanx.torch: survives a dead peer, takes a new one.

Run it as a self-contained local job (every member is a process with an embedded phalanx
daemon; member 0 also runs the coordinator)::

    python examples/elastic_ddp.py --members 3 --steps 60 --kill-at 20 --join-at 35

It trains a small regression network with a BatchNorm layer; at ``--kill-at`` the last
member is SIGKILLed (process and daemon), at ``--join-at`` a replacement starts with no
state and receives the model, the optimizer, the LR scheduler and the user state from the
others before its first step. At the end every member prints a hash of its parameters
and buffers; the script checks they are all equal and prints ``OK``.

On a real cluster run one ``phalanx daemon`` per machine and call :func:`train` with
``phalanx.connect()`` instead of ``phalanx.start(...)`` (docs/torch.md).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import signal
import sys
import time
from typing import Any

GLOBAL_BATCH = 48


def make_model() -> Any:
    import torch

    torch.manual_seed(0)  # every member builds the same model (joiners get the state anyway)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
    )


def batch(step: int) -> tuple[Any, Any]:
    """The step's global batch: a function of the step only (a redone step, or a
    replacement, sees the same examples)."""
    import torch

    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def train(pg: Any, steps: int, join: bool, progress: Any, wait_for: int = 0) -> str:
    """The training loop: what a real job runs in each process."""
    import torch

    from phalanx.torch import Manager

    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    user = {"examples_seen": 0}  # identical on every member; a joiner receives it
    mgr = Manager(pg, model, opt, scheduler=sched, user_state=user,
                  global_batch=GLOBAL_BATCH, join=join, timeout=60)  # fmt: skip
    while mgr.step < steps:
        if mgr.step == steps - 10 and pg.view().world < wait_for:
            # (this script only) a replacement is on its way: let it join before the end
            while pg.view().world < wait_for:
                time.sleep(0.05)
        s = mgr.begin_step()  # a new view is installed and a joiner gets the state here
        x, y = batch(s.step)
        part = s.shard()  # this member's slice of the global batch, by its rank in the view
        loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
        loss.backward()  # gradient buckets are all-reduced while backward runs
        time.sleep(0.02)  # stands for a bigger model
        # the optimizer and scheduler step only if every member's vote says yes; the
        # data position moves with them. Not committed: nothing was applied anywhere
        # and begin_step redoes the same step (same global batch) in the new view.
        ok = mgr.commit(apply=lambda: user.update(examples_seen=user["examples_seen"] + 48))
        if ok and s.rank == 0:
            progress.value = s.step + 1
            if s.step % 10 == 0:
                print(f"step {s.step:3d} world {s.world} loss {loss.item():.4f}", flush=True)
    assert user["examples_seen"] == steps * GLOBAL_BATCH
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    mgr.close()
    return h.hexdigest()


def member(
    index: int, steps: int, join: bool, where: Any, results: Any, progress: Any, wait_for: int
) -> None:
    import phalanx

    if index == 0:
        secret = os.urandom(32)  # the cluster secret every member must prove
        pg = phalanx.start(secret=secret)  # coordinator + daemon in this process
        for _ in range(16):  # one for each member that may come
            where.put((pg.coordinator_address, secret))
    else:
        coordinator, secret = where.get(timeout=60)
        pg = phalanx.start(coordinator=coordinator, secret=secret)
    try:
        results.put((index, train(pg, steps, join, progress, wait_for)))
        if index == 0:  # keep the coordinator up until the others are done
            deadline = time.monotonic() + 30
            while pg.view().world > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        pg.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-at", type=int, default=20, help="0: no kill")
    p.add_argument("--join-at", type=int, default=35, help="0: no join (< steps - 10)")
    p.add_argument("--timeout", type=float, default=180)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    where, results, progress = ctx.Queue(), ctx.Queue(), ctx.Value("i", 0)
    final = a.members - (1 if a.kill_at else 0) + (1 if a.join_at else 0)
    wait_for = final if a.join_at else 0
    procs = [ctx.Process(target=member, args=(i, a.steps, False, where, results, progress,
                                              wait_for)) for i in range(a.members)]  # fmt: skip
    for pr in procs:
        pr.start()
    expected = set(range(a.members))
    killed = joined = False
    deadline = time.monotonic() + a.timeout
    hashes: dict[int, str] = {}
    try:
        while set(hashes) != expected:
            if time.monotonic() > deadline:
                print("FAILED: deadline passed", file=sys.stderr)
                return 1
            if a.kill_at and not killed and progress.value >= a.kill_at:
                victim = procs[-1]
                os.kill(victim.pid, signal.SIGKILL)  # the process and its embedded daemon
                expected.discard(a.members - 1)
                killed = True
                print(f"step {progress.value}: SIGKILL member {a.members - 1}", flush=True)
            if a.join_at and not joined and progress.value >= a.join_at:
                new = ctx.Process(target=member, args=(len(procs), a.steps, True, where, results,
                                                       progress, 0))  # fmt: skip
                new.start()
                procs.append(new)
                expected.add(len(procs) - 1)
                joined = True
                print(f"step {progress.value}: a replacement joins", flush=True)
            try:
                i, h = results.get(timeout=0.1)
                hashes[i] = h
            except Exception:
                pass
    finally:
        for pr in procs:
            pr.join(30)
            if pr.is_alive():
                pr.kill()
                pr.join(5)
    if len(set(hashes.values())) != 1:
        print(f"FAILED: members hold different parameters: {hashes}", file=sys.stderr)
        return 1
    print(
        f"OK: {len(hashes)} members hold bit-identical parameters {next(iter(hashes.values()))[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

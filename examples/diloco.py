"""DiLoCo (or LocalSGD) with phalanx.torch: inner steps alone, an outer sync every H steps.

Run it as a self-contained local job (every member is a process with an embedded phalanx
daemon; member 0 also runs the coordinator)::

    python examples/diloco.py --members 3 --steps 60 --sync-every 10 --codec int8 \
        --kill-at 23 --join-at 35 [--local-sgd]

Each member trains its own copy of a small regression network (BatchNorm included) with
AdamW for H steps; then the pseudo-gradients (global - local parameters) are averaged
with the chosen codec (int8: a quarter of float32's bytes, once every H steps) and an
outer Nesterov SGD step moves the global parameters (``--local-sgd``: plain averaging).
At ``--kill-at`` the last member is SIGKILLed: the survivors lose none of their inner
steps, the next outer sync averages theirs. At ``--join-at`` a replacement starts: it
receives the global parameters and the outer optimizer's state at the next outer sync
and trains the following rounds. At the end every member prints a hash of its model;
the script checks they are all equal and prints ``OK``.

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


class OPTS:  # the command line, for the members (spawned: they parse it too)
    sync_every = 10
    codec = "int8"
    local_sgd = False


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

    from phalanx.torch import DiLoCo, LocalSGD

    torch.set_num_threads(1)
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if OPTS.local_sgd:
        algo: DiLoCo = LocalSGD(pg, model, inner, sync_every=OPTS.sync_every,
                                global_batch=GLOBAL_BATCH, join=join, timeout=120)  # fmt: skip
    else:
        algo = DiLoCo(pg, model, inner, sync_every=OPTS.sync_every, codec=OPTS.codec,
                      global_batch=GLOBAL_BATCH, join=join, timeout=120)  # fmt: skip
    while algo.step < steps:
        if algo.step == steps - OPTS.sync_every - 5 and pg.view().world < wait_for:
            # (this script only) a replacement is on its way: let it in before the end
            while pg.view().world < wait_for:
                time.sleep(0.05)
        s = algo.begin_step()  # a joiner's first call waits for the next outer sync
        x, y = batch(s.step)
        part = algo.shard()
        inner.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
        loss.backward()
        inner.step()  # local: no communication at all
        time.sleep(0.02)  # stands for a bigger model
        rep = algo.end_step()  # every H-th call: the outer sync (survives a dead peer)
        if s.rank == 0:
            progress.value = s.step + 1
        if rep is not None and s.rank == 0:
            print(
                f"step {rep.step:3d} outer sync among {len(rep.contributors)} "
                f"({rep.attempts} attempt(s)) loss {loss.item():.4f}",
                flush=True,
            )
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    algo.close()
    return h.hexdigest()


def member(
    index: int,
    steps: int,
    join: bool,
    where: Any,
    results: Any,
    progress: Any,
    wait_for: int,
    opts: dict[str, Any],
) -> None:
    import phalanx

    for k, v in opts.items():
        setattr(OPTS, k, v)

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
    p.add_argument("--sync-every", type=int, default=10, help="H (divides --steps)")
    p.add_argument("--codec", default="int8", help="pseudo-gradient codec (default int8)")
    p.add_argument("--local-sgd", action="store_true", help="LocalSGD instead of DiLoCo")
    p.add_argument("--kill-at", type=int, default=23, help="0: no kill")
    p.add_argument("--join-at", type=int, default=35, help="0: no join (< steps - 2H)")
    p.add_argument("--timeout", type=float, default=180)
    a = p.parse_args()
    for k, v in vars(a).items():
        setattr(OPTS, k, v)
    ctx = mp.get_context("spawn")
    where, results, progress = ctx.Queue(), ctx.Queue(), ctx.Value("i", 0)
    final = a.members - (1 if a.kill_at else 0) + (1 if a.join_at else 0)
    wait_for = final if a.join_at else 0
    procs = [ctx.Process(target=member, args=(i, a.steps, False, where, results, progress,
                                              wait_for, vars(a))) for i in range(a.members)]  # fmt: skip
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
                                                       progress, 0, vars(a)))  # fmt: skip
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

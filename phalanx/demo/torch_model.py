"""``phalanx demo --torch``'s model, data and single-process references (pure torch).

The task is the numpy demo's (:mod:`phalanx.demo.model`: 2,048 synthetic examples, 16
features, 4 classes, a global batch of 64 fixed by ``(seed, step)``), the model a real
``torch.nn`` network with a BatchNorm layer: Linear(16, 32) -> BatchNorm1d(32) -> Tanh
-> Linear(32, 4), in float64, trained with SGD (momentum 0.9) under a StepLR schedule —
so the optimizer state, the LR scheduler and BatchNorm's running statistics all have to
survive the kill and the join.

The references replay, in one process, exactly the arithmetic the group agreed to do,
given the world history the training processes reported:

* :func:`reference_ddp` — each step's global batch is cut into the shards of that step's
  view; each shard's forward pass runs in train mode from the committed BatchNorm
  statistics (BatchNorm normalises by its *own* batch, as in any data-parallel run); the
  step's gradient is ``sum_i (n_i / N) grad_i``; the running statistics become the
  example-weighted mean of the members' (``Manager(buffers="average")``); then one
  optimizer and one scheduler step.
* :func:`reference_diloco` — every member's inner steps from the global parameters on
  its shard of each inner batch (its own inner optimizer, kept across rounds; a
  newcomer's is fresh), then the outer Nesterov step with the average pseudo-gradient
  of the members that contributed.

Nothing here talks to phalanx or reads a clock.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from phalanx.demo.model import Problem, batch_indices, make_dataset

__all__ = [
    "DEMO",
    "DILOCO_TOLERANCE",
    "TORCH_PARAM_TOLERANCE",
    "TORCH_TOLERANCE",
    "Check",
    "Round",
    "TorchDemo",
    "batch",
    "check",
    "evaluate",
    "flat_state",
    "make_data",
    "make_model",
    "make_optimizer",
    "reference_ddp",
    "reference_diloco",
    "rows",
    "state_sha256",
]


@dataclass(frozen=True)
class TorchDemo:
    """The torch demo's fixed sizes and hyper-parameters."""

    hidden: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    lr_step: int = 40  # StepLR: halve the LR every lr_step committed steps
    gamma: float = 0.5
    inner_lr: float = 0.05  # DiLoCo: inner SGD (momentum 0.9)
    outer_lr: float = 0.7  # DiLoCo: outer Nesterov SGD (momentum 0.9)
    dtype: str = "float64"  # the benchmarks also run it in float32
    problem: Problem = field(default_factory=Problem)


DEMO = TorchDemo()


def make_data(seed: int, demo: TorchDemo = DEMO) -> tuple[torch.Tensor, torch.Tensor]:
    data = make_dataset(demo.problem, seed)
    return torch.from_numpy(data.x).to(getattr(torch, demo.dtype)), torch.from_numpy(data.y)


def make_model(seed: int, demo: TorchDemo = DEMO) -> torch.nn.Module:
    """The network, initialised from ``seed`` alone (not the global RNG)."""
    pr = demo.problem
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    model = torch.nn.Sequential(
        torch.nn.Linear(pr.features, demo.hidden),
        torch.nn.BatchNorm1d(demo.hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(demo.hidden, pr.classes),
    ).to(getattr(torch, demo.dtype))
    with torch.no_grad():  # every parameter from the generator: the global RNG is not ours
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[1] ** 0.5)
            elif name.startswith("1."):  # BatchNorm's affine parameters
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def make_optimizer(
    model: torch.nn.Module, demo: TorchDemo = DEMO
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(model.parameters(), lr=demo.lr, momentum=demo.momentum)
    return opt, torch.optim.lr_scheduler.StepLR(opt, demo.lr_step, demo.gamma)


def make_inner(model: torch.nn.Module, demo: TorchDemo = DEMO) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=demo.inner_lr, momentum=demo.momentum)


def make_outer(demo: TorchDemo = DEMO):  # type: ignore[no-untyped-def]
    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=demo.outer_lr, momentum=0.9, nesterov=True)

    return build


def batch(seed: int, step: int, demo: TorchDemo = DEMO) -> np.ndarray:
    """The example indices of ``step``'s global batch."""
    return batch_indices(demo.problem, seed, step)


def _split(idx: np.ndarray, world: int) -> list[np.ndarray]:
    return list(np.array_split(idx, world))


def _buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    keys = set(model.state_dict(keep_vars=True))
    return [b for n, b in model.named_buffers() if n in keys]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def rows(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return x[torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))]


def reference_ddp(seed: int, worlds: list[int], demo: TorchDemo = DEMO) -> torch.nn.Module:
    """The model after ``len(worlds)`` steps, step ``s`` run by ``worlds[s]`` members."""
    x, y = make_data(seed, demo)
    model = make_model(seed, demo)
    opt, sched = make_optimizer(model, demo)
    n_total = demo.problem.batch
    params = list(model.parameters())
    for step, world in enumerate(worlds):
        committed = [b.detach().clone() for b in _buffers(model)]
        grad = [torch.zeros_like(p) for p in params]
        bufsum = [torch.zeros(b.shape, dtype=torch.float64) for b in committed]
        for shard in _split(batch(seed, step, demo), world):
            with torch.no_grad():
                for b, c in zip(_buffers(model), committed, strict=True):
                    b.copy_(c)
            for p in params:
                p.grad = None
            w = len(shard) / n_total
            _loss(model, rows(x, shard), rows(y, shard)).backward()  # type: ignore[no-untyped-call]
            for g, p in zip(grad, params, strict=True):
                assert p.grad is not None
                g += p.grad * w
            for s, b in zip(bufsum, _buffers(model), strict=True):
                s += b.detach().to(torch.float64) * len(shard)
        with torch.no_grad():
            for b, s in zip(_buffers(model), bufsum, strict=True):
                mean = s / n_total
                b.copy_(mean.to(b.dtype) if b.dtype.is_floating_point
                        else torch.round(mean).to(b.dtype))  # fmt: skip
        for p, g in zip(params, grad, strict=True):
            p.grad = g
        with torch.no_grad():
            opt.step()
        sched.step()
    return model


@dataclass(frozen=True)
class Round:
    """One DiLoCo outer sync as the members reported it: the step it ends, the members
    whose inner steps the round ran on (rank order), the contributors of the sync (rank
    order) and each contributor's weight (1: it ran the round's inner steps; 0: it had
    just joined)."""

    end: int
    inner_members: tuple[str, ...]
    contributors: tuple[str, ...]
    weights: tuple[float, ...]


def reference_diloco(
    seed: int, sync_every: int, rounds: list[Round], demo: TorchDemo = DEMO
) -> torch.nn.Module:
    """The global model after the given outer syncs (lossless codec)."""
    x, y = make_data(seed, demo)
    glob = make_model(seed, demo)
    gparams = [torch.nn.Parameter(p.detach().clone()) for p in glob.parameters()]
    outer = make_outer(demo)(gparams)
    gbuf = [b.detach().clone() for b in _buffers(glob)]
    locals_: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for r in rounds:
        start = r.end - sync_every
        W = sum(r.weights)
        deltas = [torch.zeros_like(g) for g in gparams]
        bsum = [torch.zeros(b.shape, dtype=torch.float64) for b in gbuf]
        for m, w in zip(r.contributors, r.weights, strict=True):
            if m not in locals_:
                lm = make_model(seed, demo)
                locals_[m] = (lm, make_inner(lm, demo))
            if not w:
                continue
            lm, inner = locals_[m]
            rank, world = r.inner_members.index(m), len(r.inner_members)
            for t in range(start, r.end):
                shard = _split(batch(seed, t, demo), world)[rank]
                inner.zero_grad()
                _loss(lm, rows(x, shard), rows(y, shard)).backward()  # type: ignore[no-untyped-call]
                inner.step()
            for d, g, p in zip(deltas, gparams, lm.parameters(), strict=True):
                d += (g.detach() - p.detach()) * (w / W)
            for s, b in zip(bsum, _buffers(lm), strict=True):
                s += b.detach().to(torch.float64) * w
        if W > 0:
            for g, d in zip(gparams, deltas, strict=True):
                g.grad = d
            with torch.no_grad():
                outer.step()
                for gb, s in zip(gbuf, bsum, strict=True):
                    mean = s / W
                    gb.copy_(mean.to(gb.dtype) if gb.dtype.is_floating_point
                             else torch.round(mean).to(gb.dtype))  # fmt: skip
        for m in r.contributors:
            lm, _ = locals_[m]
            with torch.no_grad():
                for p, g in zip(lm.parameters(), gparams, strict=True):
                    p.copy_(g)
                for b, gb in zip(_buffers(lm), gbuf, strict=True):
                    b.copy_(gb)
    with torch.no_grad():
        for p, g in zip(glob.parameters(), gparams, strict=True):
            p.copy_(g)
        for b, gb in zip(_buffers(glob), gbuf, strict=True):
            b.copy_(gb)
    return glob


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy over the whole dataset, BatchNorm in eval mode (its running
    statistics are used: the check covers them)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = float(_loss(model, x, y))
    model.train(was)
    return out


def flat_state(model: torch.nn.Module) -> np.ndarray:
    """Every parameter and buffer as one float64 vector (what the checks compare)."""
    parts = [t.detach().reshape(-1).to(torch.float64) for t in model.state_dict().values()]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: |final loss - reference loss| allowed per codec, and |parameter - reference| with a
#: lossless one (docs/demo.md, "The torch demo's tolerance", says why)
TORCH_TOLERANCE: dict[str, float] = {
    "none": 1e-9, "zstd": 1e-9, "fp16": 1e-4, "bf16": 1e-3, "int8": 1e-3,
}  # fmt: skip
#: DiLoCo rounds the pseudo-gradient (an H-step delta, then scaled by the outer Nesterov
#: step) instead of one step's gradient: lossy codecs move it further
DILOCO_TOLERANCE: dict[str, float] = {
    "none": 1e-9, "zstd": 1e-9, "fp16": 1e-3, "bf16": 5e-3, "int8": 5e-3,
}  # fmt: skip
TORCH_PARAM_TOLERANCE = 1e-7


@dataclass
class Check:
    """The torch demo's comparison with its single-process reference."""

    initial: float = float("nan")
    reference: float = float("nan")
    final: float = float("nan")
    loss_diff: float = float("nan")
    param_diff: float = float("nan")
    tolerance: float = 0.0
    errors: list[str] = field(default_factory=list)


def check(
    o: Any, done: dict[str, dict[str, Any]], worlds: dict[int, int],
    outer: dict[int, dict[str, Any]],
) -> Check:  # fmt: skip
    """Compare the members' final state (``done`` events) with the reference rebuilt
    from the world history: ``worlds`` (step -> world it committed in, DDP) or
    ``outer`` (sync step -> contributors, weights, round members; DiLoCo)."""
    out = Check(tolerance=(DILOCO_TOLERANCE if o.diloco else TORCH_TOLERANCE)[o.codec])
    x, y = make_data(o.seed)
    out.initial = evaluate(make_model(o.seed), x, y)
    if o.diloco:
        rounds = []
        for step in sorted(outer):
            ev = outer[step]
            cons, round_ = tuple(ev["contributors"]), tuple(ev["round"])
            # a member's weight as it reported it; a member killed right after the sync
            # reported nothing: it ran the round if it was one of the round's members
            ws = tuple(ev["w"].get(m, 1.0 if m in round_ else 0.0) for m in cons)
            rounds.append(Round(step, round_, cons, ws))
        ref = reference_diloco(o.seed, o.diloco, rounds)
    else:
        missing_steps = [s for s in range(o.steps) if s not in worlds]
        if missing_steps:
            out.errors.append(f"no commit reported for steps {missing_steps[:10]}")
            return out
        ref = reference_ddp(o.seed, [worlds[s] for s in range(o.steps)])
    first = next(iter(done.values()))
    got = np.frombuffer(base64.b64decode(first["params"]), dtype=np.float64)
    want = flat_state(ref)
    out.reference = evaluate(ref, x, y)
    out.final = float(first["loss"])
    out.loss_diff = abs(out.final - out.reference)
    out.param_diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    if not out.loss_diff <= out.tolerance:
        out.errors.append(
            f"final loss {out.final:.12f} is {out.loss_diff:.3g} away from the reference's "
            f"{out.reference:.12f} (tolerance {out.tolerance:g})"
        )
    if out.tolerance < 1e-6 and not out.param_diff <= TORCH_PARAM_TOLERANCE:
        out.errors.append(
            f"parameters and buffers are {out.param_diff:.3g} away from the reference's "
            f"(tolerance {TORCH_PARAM_TOLERANCE:g})"
        )
    seen = {m: d.get("seen") for m, d in done.items()}
    if not o.diloco and set(seen.values()) != {o.steps * 64}:
        out.errors.append(f"the data position (user state) differs: {seen}")
    return out

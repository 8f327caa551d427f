"""The demo's model and data: a small MLP classifier trained by plain SGD, in numpy.

Everything here is a pure function of its arguments (no I/O, no clocks, no globals),
so the training processes, the single-process reference and the tests compute the
very same numbers:

* :func:`make_dataset` — a synthetic 4-class problem drawn from a fixed random
  "teacher" network, generated deterministically from the seed;
* :func:`batch_indices` — the global batch of a step (a function of seed and step only,
  never of who is in the group);
* :func:`shard` — the part of that batch a member takes, by its rank in the view;
* :func:`grad_sum` — the **sum** (not the mean) of per-example gradients and losses
  over a shard: summed over every member's shard by an all-reduce and divided by the
  global batch size, it is the full batch's mean gradient whatever the world size;
* :func:`reference` — the same training in one process on the whole batch;
* :func:`check_slots` / :func:`verdict` — the count-check slots a member adds to its
  all-reduce and the check that the op ran among exactly the members its shards were
  cut for, all in one view.

Parameters travel as one flat float64 vector (:data:`Layout` names the pieces), which
is what the group keeps in sync and all-reduces. This module must never import
phalanx's client or touch the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "EPOCH_MOD",
    "Dataset",
    "Layout",
    "Problem",
    "batch_indices",
    "check_slots",
    "grad_sum",
    "init_params",
    "loss",
    "make_dataset",
    "reference",
    "shard",
    "verdict",
]


@dataclass(frozen=True)
class Problem:
    """The demo's fixed sizes and hyperparameters."""

    features: int = 16
    hidden: int = 32
    classes: int = 4
    examples: int = 2048
    batch: int = 64
    lr: float = 0.5


@dataclass(frozen=True)
class Layout:
    """Where W1 (features x hidden), b1, W2 (hidden x classes), b2 sit in the flat vector."""

    features: int
    hidden: int
    classes: int

    @property
    def size(self) -> int:
        f, h, c = self.features, self.hidden, self.classes
        return f * h + h + h * c + c

    def split(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views (no copies) of the four pieces of ``p``."""
        f, h, c = self.features, self.hidden, self.classes
        a = f * h
        b = a + h
        d = b + h * c
        return p[:a].reshape(f, h), p[a:b], p[b:d].reshape(h, c), p[d : d + c]


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (examples, features) float64
    y: np.ndarray  # (examples,) int64 labels


def _layout(pr: Problem) -> Layout:
    return Layout(pr.features, pr.hidden, pr.classes)


def make_dataset(pr: Problem, seed: int) -> Dataset:
    """Inputs from N(0, 1); labels: the argmax of a random teacher MLP's logits plus
    Gumbel noise (so the problem is learnable but not separable)."""
    rng = np.random.default_rng([seed, 1])
    x = rng.standard_normal((pr.examples, pr.features))
    w1 = rng.standard_normal((pr.features, 24)) / np.sqrt(pr.features)
    w2 = rng.standard_normal((24, pr.classes)) * 2.0
    logits = np.tanh(x @ w1) @ w2 + rng.gumbel(size=(pr.examples, pr.classes)) * 0.5
    return Dataset(x, np.argmax(logits, axis=1).astype(np.int64))


def init_params(pr: Problem, seed: int) -> np.ndarray:
    """Glorot-scaled weights, zero biases, as one flat float64 vector."""
    lay = _layout(pr)
    rng = np.random.default_rng([seed, 2])
    p = np.zeros(lay.size)
    w1, _, w2, _ = lay.split(p)
    w1[:] = rng.standard_normal(w1.shape) * np.sqrt(2.0 / (pr.features + pr.hidden))
    w2[:] = rng.standard_normal(w2.shape) * np.sqrt(2.0 / (pr.hidden + pr.classes))
    return p


def batch_indices(pr: Problem, seed: int, step: int) -> np.ndarray:
    """The example indices of ``step``'s global batch (depends on seed and step only)."""
    return np.random.default_rng([seed, 3, step]).permutation(pr.examples)[: pr.batch]


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous part of a global batch split over ``world`` members
    (sizes differ by at most one; every example goes to exactly one member)."""
    return np.array_split(indices, world)[rank]


def grad_sum(
    pr: Problem, params: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, float]:
    """(sum over the examples of the loss gradient, sum of the cross-entropy losses)."""
    lay = _layout(pr)
    w1, b1, w2, b2 = lay.split(params)
    g = np.zeros(lay.size)
    if len(y) == 0:
        return g, 0.0
    gw1, gb1, gw2, gb2 = lay.split(g)
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    ez = np.exp(z)
    s = ez.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    losses = np.log(s[:, 0]) - z[rows, y]
    dz = ez / s
    dz[rows, y] -= 1.0
    gw2[:] = h.T @ dz
    gb2[:] = dz.sum(axis=0)
    dh = (dz @ w2.T) * (1.0 - h * h)
    gw1[:] = x.T @ dh
    gb1[:] = dh.sum(axis=0)
    return g, float(losses.sum())


def loss(pr: Problem, params: np.ndarray, data: Dataset) -> float:
    """Mean cross-entropy over the whole dataset."""
    _, total = grad_sum(pr, params, data.x, data.y)
    return total / len(data.y)


def reference(pr: Problem, seed: int, steps: int) -> np.ndarray:
    """The parameters after ``steps`` SGD steps in one process, each on its whole
    global batch: what the data-parallel run must reproduce."""
    data = make_dataset(pr, seed)
    p = init_params(pr, seed)
    for step in range(steps):
        idx = batch_indices(pr, seed, step)
        g, _ = grad_sum(pr, p, data.x[idx], data.y[idx])
        p -= pr.lr * (g / pr.batch)
    return p


#: epochs are large (views are numbered from the wall clock in ms); their residue keeps
#: the sums of e and e**2 exact in float64 (2**20 squared times 1000 members < 2**53)
EPOCH_MOD = 1 << 20


def check_slots(epoch: int) -> tuple[float, float]:
    """What one member puts in the count-check slots: ``(e, e**2)`` of its epoch."""
    e = float(epoch % EPOCH_MOD)
    return e, e * e


def verdict(meta: np.ndarray, epoch: int, members: tuple[str, ...],
            contributors: tuple[str, ...]) -> str:  # fmt: skip
    """'' if the reduced ``[loss, count, e, e**2]`` slots (:func:`check_slots`) show the
    op ran among exactly ``members``, all in ``epoch``; else why not (pure):
    ``sum(e**2) * n == sum(e)**2`` holds only if every contributor had the same e."""
    n, s1, s2 = float(meta[1]), float(meta[2]), float(meta[3])
    e = float(epoch % EPOCH_MOD)
    if contributors != members:
        return f"ran among {len(contributors)} members, shards were cut for {len(members)}"
    if n != len(members) or s1 != n * e or s2 * n != s1 * s1:
        return "contributors assumed different views"
    return ""

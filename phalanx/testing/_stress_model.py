"""The churn harness's arithmetic: what each member contributes, what each op must yield.

Pure functions, no I/O: ``phalanx stress`` trainers use them to build their inputs and
the harness uses the *same* functions to recompute, from ``OpResult.contributors``
alone, the exact bytes every completed op must have produced on every member.

* A member ``p<i>`` contributes to step ``s`` an array that depends only on ``(i, s)``
  and the op's spec (:func:`contribution`); values are small integers, so float sums
  are exact in any order.
* Every member runs the same ops in the same order in a step: :func:`plan` derives
  them from ``(seed, step)`` only.
* The synced state ``w`` after step ``s`` is a closed form (:func:`expected_state`):
  each committed step adds :func:`state_delta` exactly once.

This module must never touch a socket, a process or a clock.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LOSSY",
    "STATE_LEN",
    "OpSpec",
    "chunk_of",
    "contribution",
    "digest",
    "expected",
    "expected_state",
    "index_of",
    "member_id",
    "plan",
    "state_delta",
    "tolerance",
]

#: elements of the synced state array ``w`` (float64)
STATE_LEN = 4096
#: codecs whose result is within a stated error instead of exact
LOSSY = frozenset({"fp16", "bf16", "int8"})


@dataclass(frozen=True)
class OpSpec:
    """One collective of a step: kind, reduce op, codec, dtype, element count, root."""

    kind: str  # all_reduce | reduce_scatter | all_gather | broadcast | barrier
    reduce: str = "sum"
    codec: str = "none"
    dtype: str = "float32"
    n: int = 0
    root: int = 0

    @property
    def lossy(self) -> bool:
        return self.codec in LOSSY


# (kind, reduce, codec, dtype) the planner draws from; sizes are drawn separately
_CATALOG: tuple[tuple[str, str, str, str], ...] = (
    ("all_reduce", "sum", "none", "float32"),
    ("all_reduce", "sum", "zstd", "float32"),
    ("all_reduce", "max", "none", "int64"),
    ("all_reduce", "sum", "none", "float64"),
    ("all_reduce", "sum", "int8", "float32"),
    ("all_reduce", "sum", "fp16", "float32"),
    ("all_reduce", "sum", "bf16", "float32"),
    ("reduce_scatter", "sum", "none", "float32"),
    ("all_gather", "sum", "none", "int32"),
    ("broadcast", "sum", "none", "float64"),
    ("barrier", "sum", "none", "float32"),
)
#: element counts; 1 << 20 (4 MiB of float32) is the first size at which an all-reduce
#: through the daemon takes the twin region, which leaves spliced from the daemons
#: that turn zero-copy on (every other one, _stress_cluster.py; docs/comm.md,
#: "Zero-copy sends"): the faults must meet those paths too
_SIZES = (1, 1000, 4099, 65536, 1 << 20)


def member_id(index: int) -> str:
    return f"p{index}"


def index_of(member: str) -> int:
    return int(member.lstrip("p"))


def plan(seed: int, step: int) -> list[OpSpec]:
    """The ops of ``step`` (1 to 3), the same on every member: a function of
    ``(seed, step)`` only. The first is always an exact float32 sum."""
    rng = random.Random(seed * 1_000_003 + step)
    ops = [OpSpec("all_reduce", n=rng.choice(_SIZES[1:]))]
    for _ in range(rng.randint(0, 2)):
        kind, red, codec, dtype = rng.choice(_CATALOG)
        n = 0 if kind == "barrier" else rng.choice(_SIZES)
        ops.append(OpSpec(kind, red, codec, dtype, n))
    return ops


@functools.lru_cache(maxsize=4096)
def _step_mix(step: int) -> int:
    """A pseudo-random 32-bit number per step: the steps' offsets below have no
    period (``step % 11`` made steps s and s + 11 contribute the same bytes, so a
    collective that mixed them looked right)."""
    return int.from_bytes(hashlib.blake2b(str(step).encode(), digest_size=4).digest(), "little")


def contribution(spec: OpSpec, index: int, step: int) -> np.ndarray:
    """What member ``p<index>`` puts in for ``spec`` at ``step`` (small integers: the
    step's offset stays below 251, so sums stay exact and within fp16's range)."""
    j = np.arange(spec.n, dtype=np.int64)
    mix = _step_mix(step)
    if spec.kind == "all_reduce" and spec.reduce == "max":
        vals = (index * 31 + mix % 1009 * 7 + j * 13) % 1009
    elif spec.kind in ("all_gather", "broadcast"):
        vals = index * 1000 + (mix % 97) * 3 + j % 11
    else:
        vals = (1 + j % 7) * (index + 1) + mix % 251
    return vals.astype(spec.dtype)


def chunk_of(size: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s flat chunk of ``size`` elements (as :meth:`Client.chunk`)."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def expected(spec: OpSpec, step: int, contributors: Sequence[str], me: str) -> np.ndarray:
    """The exact array member ``me`` must hold after ``spec`` ran over
    ``contributors`` (rank order) at ``step``. For lossy codecs: the exact value the
    decoded result approximates."""
    idx = [index_of(m) for m in contributors]
    if spec.kind == "broadcast":
        return contribution(spec, idx[spec.root], step)
    if spec.kind == "all_gather":
        out = np.empty(spec.n, spec.dtype)
        for rank, i in enumerate(idx):
            sl = chunk_of(spec.n, len(idx), rank)
            out[sl] = contribution(spec, i, step)[sl]
        return out
    parts = [contribution(spec, i, step).astype(np.float64) for i in idx]
    total = np.maximum.reduce(parts) if spec.reduce == "max" else np.add.reduce(parts)
    full: np.ndarray = np.asarray(total).astype(spec.dtype)
    if spec.kind == "reduce_scatter":
        out = contribution(spec, index_of(me), step)
        sl = chunk_of(spec.n, len(idx), list(contributors).index(me))
        out[sl] = full[sl]
        return out
    return full


def tolerance(spec: OpSpec, exact: np.ndarray, world: int) -> float:
    """Largest absolute error a lossy codec may leave on ``exact`` over ``world``
    members: each quantization step loses at most its relative precision (int8: 1/254
    of the block's absmax; fp16 2^-11, bf16 2^-8 of the value), and partials are
    quantized at most ``world`` times on the way (recursive doubling or the ring)."""
    absmax = float(np.max(np.abs(exact))) if exact.size else 0.0
    rel = {"int8": 1 / 127, "fp16": 2.0**-10, "bf16": 2.0**-7}.get(spec.codec, 0.0)
    return absmax * rel * max(world, 1) + 1e-6


def state_delta(step: int) -> np.ndarray:
    """What a committed ``step`` adds to ``w``."""
    j = np.arange(STATE_LEN, dtype=np.float64)
    return (step % 13 + 1) + (j % 5)


def expected_state(step: int) -> np.ndarray:
    """``w`` once steps ``0 .. step-1`` were each applied exactly once."""
    q, r = divmod(max(step, 0), 13)
    ramp = q * 91 + r * (r + 1) // 2  # sum of (s % 13 + 1) for s < step
    j = np.arange(STATE_LEN, dtype=np.float64)
    return ramp + max(step, 0) * (j % 5)


def digest(a: np.ndarray) -> str:
    """A short fingerprint of the array's bytes (dtype and shape included)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

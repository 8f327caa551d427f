"""Reduction operators of the data plane: what ``op=`` means, elementwise, in numpy.

What it is for: the engine moves chunks; this module says how two chunks combine and
how the combined value becomes the user's result. It fixes three things every rank must
agree on, bit for bit:

* **the accumulation dtype** — narrow floats (float16, bfloat16) are accumulated in
  float32, integers averaged in int64; everything else in its own dtype;
* **the combine step** — ``out = left (op) right`` with numpy ufuncs writing into ``out``
  (no temporaries); integer ``sum``/``prod`` wrap around exactly like numpy (modular
  arithmetic, never through float); ``min``/``max`` propagate NaN; ``avg`` combines as
  ``sum``;
* **the finalize step** — ``avg`` divides by the world size (floats: true division in
  the accumulation dtype; integers: *floor* division of the exact int64 sum, so
  ``avg([-1, 0]) == -1``), then the accumulator is cast to the user's dtype (float32 ->
  float16/bfloat16 rounds to nearest even).

Floating-point overflow gives inf and invalid operations give NaN per IEEE 754, silently:
these are the user's values, not our errors. An int64 ``avg`` whose exact sum leaves the
int64 range wraps around like ``sum`` does.

What it must never do: touch sockets, threads, frames or codecs; allocate per call on
the hot path (``combine``/``finalize`` only write into the arrays they are given);
loop in Python over elements or blocks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Final, Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from phalanx.errors import ConfigError, UnsupportedError

__all__ = [
    "DTYPE_NAMES",
    "ReduceOp",
    "accumulation_dtype",
    "bfloat16",
    "check_dtype",
    "combine",
    "finalize",
    "parse_op",
    "reference",
    "supported_dtypes",
]

ReduceOp = Literal["sum", "avg", "min", "max", "prod"]

_OPS: Final[tuple[str, ...]] = get_args(ReduceOp)

#: the dtypes phalanx reduces, by numpy name; their order gives their wire codes
#: (comm/descriptor.py): add at the end only
DTYPE_NAMES: Final[tuple[str, ...]] = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int32",
    "int64",
    "uint8",
)
# Every supported dtype but bfloat16, which needs ml_dtypes: see bfloat16().
_NUMPY_DTYPES: Final[tuple[np.dtype, ...]] = tuple(
    np.dtype(name) for name in DTYPE_NAMES if name != "bfloat16"
)

_FLOAT32: Final = np.dtype(np.float32)
_INT64: Final = np.dtype(np.int64)


@functools.cache
def bfloat16() -> np.dtype:
    """numpy's bfloat16 dtype, from ml_dtypes, imported on first use.

    ml_dtypes 0.7.0 takes about a second of CPU to import (0.6.0: 0.08 s), and every
    phalanx process -- daemon, client, CLI, rank -- would pay it at start-up although
    most never see a bfloat16 array. A process that holds one has imported ml_dtypes
    already (nothing else makes that dtype), so deferring costs it nothing. A member
    that heartbeats calls this before it joins (membership/agent.py): the import holds
    the GIL longer than a heartbeat timeout.
    """
    import ml_dtypes

    dt: np.dtype = np.dtype(ml_dtypes.bfloat16)
    return dt


def supported_dtypes() -> dict[str, np.dtype]:
    """Name -> dtype of every dtype phalanx reduces (imports ml_dtypes for bfloat16)."""
    return {name: check_dtype(name) for name in DTYPE_NAMES}


# "avg" combines as a sum; the division happens once, in finalize.
_COMBINE: Final[dict[str, np.ufunc]] = {
    "sum": np.add,
    "avg": np.add,
    "min": np.minimum,
    "max": np.maximum,
    "prod": np.multiply,
}


def parse_op(op: str) -> ReduceOp:
    """Return ``op`` as a :data:`ReduceOp`, or raise :class:`ConfigError` naming the valid ops."""
    if isinstance(op, str) and op in _OPS:
        return cast(ReduceOp, op)
    raise _bad_op(op)


def _bad_op(op: object) -> ConfigError:
    return ConfigError(f"unknown reduce op {op!r}; valid ops: {', '.join(_OPS)}")


def check_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """Return ``dtype`` as a numpy dtype if phalanx can reduce it, else raise
    :class:`UnsupportedError` naming the supported dtypes.

    Only native byte order is accepted; bool, int8, complex, object, strings, ... are
    refused.
    """
    if isinstance(dtype, str) and dtype == "bfloat16":
        return bfloat16()
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is not None:
        for supported in _NUMPY_DTYPES:
            if dt == supported:
                return supported
        # Only ml_dtypes makes a bfloat16 dtype: while it is not loaded, none exists.
        if "ml_dtypes" in sys.modules and dt == bfloat16():
            return bfloat16()
    raise UnsupportedError(
        f"unsupported dtype {dtype!r}; supported dtypes: {', '.join(DTYPE_NAMES)}"
    )


def accumulation_dtype(dtype: np.dtype, op: ReduceOp) -> np.dtype:
    """The dtype in which chunks of ``dtype`` are combined for ``op``.

    float16/bfloat16 -> float32 (for every op); integers with ``avg`` -> int64 (so the
    sum is exact before the floor division); otherwise the dtype itself.
    """
    dt = check_dtype(dtype)
    op = parse_op(op)
    if dt.itemsize == 2:  # float16 and bfloat16, the only 2-byte dtypes supported
        return _FLOAT32
    if op == "avg" and dt.kind in "iu":
        return _INT64
    return dt


def combine(left: np.ndarray, right: np.ndarray, out: np.ndarray, op: ReduceOp) -> None:
    """``out = left (op) right`` elementwise, in place; ``out`` may alias either input.

    All three are 1-D arrays of one length in the accumulation dtype (see
    :func:`accumulation_dtype`). ``avg`` combines as ``sum``.
    """
    ufunc = _COMBINE.get(op)
    if ufunc is None:
        raise _bad_op(op)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        ufunc(left, right, out=out)


def finalize(acc: np.ndarray, op: ReduceOp, world: int, out: np.ndarray) -> None:
    """Write the result of a reduction over ``world`` ranks from ``acc`` into ``out``.

    ``acc`` holds the combined values in the accumulation dtype and may be clobbered;
    ``out`` has the user's dtype and the same length, and may alias ``acc`` when the
    dtypes are equal. ``avg`` divides floats by ``world`` in the accumulation dtype and
    floor-divides integer (int64) sums, then casts: the floor of a mean of integers of
    a dtype always fits that dtype. Narrow floats are rounded to nearest even.
    """
    op = parse_op(op)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"world must be a positive int, got {world!r}")
    if acc.shape != out.shape:
        raise ConfigError(f"acc shape {acc.shape} != out shape {out.shape}")
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if op == "avg":
            if acc.dtype.kind == "f":
                if out.dtype == acc.dtype:
                    np.true_divide(acc, world, out=out)
                    return
                np.true_divide(acc, world, out=acc)
            else:
                np.floor_divide(acc, world, out=acc)
        # copyto is a no-op when out and acc are the same memory with the same dtype.
        np.copyto(out, acc, casting="unsafe")


def reference(inputs: Sequence[np.ndarray], op: ReduceOp) -> np.ndarray:
    """The plain numpy result of reducing ``inputs`` (one array per rank) with ``op``.

    Each input is converted to the accumulation dtype, folded left to right in rank
    order with :func:`combine`, then finalized with ``world=len(inputs)``. Returns a new
    array with the inputs' dtype and shape. Used by tests as the ground truth the
    engine must match bit for bit (when no lossy codec is involved).
    """
    op = parse_op(op)
    if len(inputs) == 0:
        raise ConfigError("reference needs at least one input")
    first = np.asarray(inputs[0])
    dtype = check_dtype(first.dtype)
    for x in inputs:
        if x.dtype != dtype or x.shape != first.shape:
            raise ConfigError(
                f"inputs differ: {x.dtype}{x.shape} vs {dtype}{first.shape}; "
                "every rank must contribute the same dtype and shape"
            )
    acc_dtype = accumulation_dtype(dtype, op)
    acc = first.astype(acc_dtype, copy=True).reshape(-1)
    for x in inputs[1:]:
        combine(acc, np.asarray(x).astype(acc_dtype, copy=False).reshape(-1), acc, op)
    out = np.empty(acc.shape, dtype=dtype)
    finalize(acc, op, len(inputs), out)
    return out.reshape(first.shape)

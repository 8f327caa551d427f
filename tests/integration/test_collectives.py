"""Every collective, codec and dtype over real processes (world 1..5), checked two ways.

Each world runs as one set of spawned rank processes (:func:`run_ranks`) that builds a
group and then walks the same list of cases in the same order. For each case every
rank generates *all* ranks' inputs from a seeded generator, runs the collective on its
own, checks the result against :func:`phalanx.comm.reduce.reference` (or the obvious
expectation for gather/broadcast) and records the sha256 of its result bytes. The
parent then demands that no rank found an error and that, case by case, every rank
holds the same bytes (promise 1).

Exactness: lossless codecs (none, zstd) must match the reference bit for bit. The
float inputs there are small integers (products of +-1, +-2), so every partial sum is
exact whatever order the ring adds in. Lossy codecs get random floats and the bound
documented at :func:`_lossy_bound`.

A few checks are local by nature: OpResult fields (epoch, seq increasing by one per
submitted op, algorithm, wire bytes), int8 wire bytes against float32's, async handles,
three streams with many small pieces, odd shapes, non-contiguous views, zero-length
arrays, arrays smaller than the world, and world 1.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, OpResult, bind
from phalanx.comm.reduce import ReduceOp, accumulation_dtype, reference, supported_dtypes
from phalanx.comm.schedules import partition
from phalanx.errors import UnsupportedError
from phalanx.testing.procs import RankContext, run_ranks

OPS: tuple[ReduceOp, ...] = ("sum", "avg", "min", "max", "prod")
DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8")
FLOATS = ("float16", "bfloat16", "float32", "float64")
LOSSLESS = ("none", "zstd")
LOSSY = ("fp16", "bf16", "int8")
EPOCH = 7
SMALL_SIZES = (1, 7, 1000)  # recursive doubling (<= 64 KiB)
LARGE = 100_003  # ring for every dtype (uint8: 100 KB > 64 KiB); not divisible by 2..5
SEED = 20240611

# Relative error of one lossy quantization (int8: of the block's absmax).
CODEC_EPS = {"fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 1.0 / 254}
# Unit roundoff of the result dtype (the final cast rounds once more).
DTYPE_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


# ----------------------------------------------------------------------------- inputs


def _rng(*key: int | str) -> np.random.Generator:
    seed = [SEED] + [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4]) for k in key]
    return np.random.default_rng(seed)


def make_input(
    case: str, rank: int, n: int, dtype: str, op: str, lossy: bool, shape: tuple[int, ...] = ()
) -> np.ndarray:
    """Rank ``rank``'s input for ``case`` (every rank can compute every rank's)."""
    rng = _rng(case, rank)
    dt = supported_dtypes()[dtype]
    if dtype in FLOATS:
        if lossy:
            v = rng.uniform(0.5, 1.5, n) if op == "prod" else rng.standard_normal(n)
        elif op == "prod":
            v = rng.choice(np.array([-2.0, -1.0, 1.0, 2.0]), n)
        else:
            v = rng.integers(-100, 101, n).astype(np.float64)
        x = v.astype(dt)
    else:
        info = np.iinfo(dt)
        x = rng.integers(info.min, int(info.max) + 1, n, dtype=dt)
    return x.reshape(shape) if shape else x


def _lossy_bound(inputs: list[np.ndarray], op: str, codec: str, dtype: str) -> np.ndarray:
    """Documented bound for lossy codecs, per element.

    A value is quantized at most ``world + 1`` times on its way (each ring hop or
    recursive-doubling exchange re-encodes a partial result, and the owner encodes
    the final value once); each quantization errs by at most ``eps`` of the magnitude
    it sees (fp16: 2^-11, bf16: 2^-8 relative; int8: 1/254 of its block's absmax).
    Magnitudes seen are bounded by ``S`` = the largest sum of |inputs| (sum, avg:
    S / world), the largest |input| (min, max), or 1.5^(2 world) for prod (inputs in
    [0.5, 1.5]: a partial product times the factors applied after it). Bound:
    ``2 (world + 1) eps S`` plus one rounding of the result dtype.
    """
    world = len(inputs)
    a = np.abs(np.stack([x.astype(np.float64).reshape(-1) for x in inputs]))
    if op in ("sum", "avg"):
        scale = float(a.sum(axis=0).max()) / (world if op == "avg" else 1)
    elif op in ("min", "max"):
        scale = float(a.max())
    else:
        scale = 1.5 ** (2 * world)
    ref = reference(inputs, op).astype(np.float64).reshape(-1)  # type: ignore[arg-type]
    return 2 * (world + 1) * CODEC_EPS[codec] * scale + 2 * DTYPE_EPS[dtype] * np.abs(ref) + 1e-30


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).view(np.uint8).tobytes()).hexdigest()[:16]


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _lossy_unsupported(kind: str, dtype: str, op: str) -> bool:
    """Whether a lossy codec must be refused (UnsupportedError) for this call.

    Lossy codecs encode float32/float64 only. all_reduce and reduce_scatter encode
    accumulators (float16/bfloat16 accumulate in float32, so those work); all_gather
    and broadcast encode the caller's dtype, so narrow floats are refused there."""
    dt = supported_dtypes()[dtype]
    if dtype not in FLOATS:
        return True
    if kind in ("all_reduce", "reduce_scatter"):
        return accumulation_dtype(dt, op) not in (np.dtype(np.float32), np.dtype(np.float64))  # type: ignore[arg-type]
    return dtype not in ("float32", "float64")


# ----------------------------------------------------------------------------- the rank side


@dataclass
class _Checker:
    """Runs cases on one rank; records errors instead of raising (ranks stay in step)."""

    rank: int
    world: int
    group: Group
    ctx: RankContext  # for exchanges through the parent
    seq: int = 0
    errors: list[str] | None = None
    hashes: list[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        self.errors = []
        self.hashes = []

    def error(self, case: str, msg: str) -> None:
        assert self.errors is not None
        self.errors.append(f"rank {self.rank} world {self.world} {case}: {msg}")

    def digest(self, case: str, x: np.ndarray) -> None:
        assert self.hashes is not None
        self.hashes.append((case, _digest(x)))

    def info(
        self, case: str, info: object, kind: str, algorithms: tuple[str, ...], x: np.ndarray
    ) -> None:
        """Check the OpResult of a successful op (and count its seq)."""
        if not isinstance(info, OpResult):
            self.error(case, f"expected OpResult, got {type(info).__name__}")
            return
        problems = []
        if info.op != kind:
            problems.append(f"op {info.op!r}")
        if info.epoch != self.group.epoch:
            problems.append(f"epoch {info.epoch}")
        if info.algorithm not in algorithms:
            problems.append(f"algorithm {info.algorithm!r} not in {algorithms}")
        if info.world != self.world or info.nbytes != x.nbytes:
            problems.append(f"world {info.world} nbytes {info.nbytes}")
        sends = kind in ("all_reduce", "reduce_scatter", "all_gather")  # a broadcast leaf does not
        if self.world > 1 and x.size and sends and info.wire_bytes_sent <= 0:
            problems.append("no wire bytes sent")
        if info.contributors != tuple(str(r) for r in range(self.world)):
            problems.append(f"contributors {info.contributors}")
        if problems:
            self.error(case, "OpResult: " + "; ".join(problems))

    def run(self, case: str, fn: Callable[[], object], unsupported: bool) -> object | None:
        """Run one op; returns its OpResult, or None if it raised (checked here)."""
        try:
            info = fn()
        except UnsupportedError as exc:
            if not unsupported:
                self.error(case, f"unexpected UnsupportedError: {exc}")
            return None
        except Exception:
            self.error(case, "raised:\n" + traceback.format_exc())
            return None
        if isinstance(info, OpResult):
            if info.seq != self.seq:
                self.error(case, f"seq {info.seq}, expected {self.seq}")
            self.seq = info.seq + 1
        if unsupported:
            self.error(case, "expected UnsupportedError, the op ran")
            return None
        return info

    def compare(
        self,
        case: str,
        got: np.ndarray,
        want: np.ndarray,
        *,
        bound: np.ndarray | None = None,
    ) -> None:
        if bound is None:
            if not _same_bytes(got, want):
                bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))[:3]
                self.error(
                    case,
                    f"not bit-identical to the reference at {bad.tolist()}: "
                    f"{got.reshape(-1)[bad]} vs {want.reshape(-1)[bad]}",
                )
            return
        g = got.astype(np.float64).reshape(-1)
        w = want.astype(np.float64).reshape(-1)
        err = np.abs(g - w)
        if not np.all(err <= bound):
            i = int(np.argmax(err - bound))
            self.error(case, f"error {err[i]:.3g} > bound {float(bound.reshape(-1)[i]):.3g} at {i}")


def _cases_all_reduce(c: _Checker, sizes: tuple[int, ...], tag: str) -> None:
    world, rank, g = c.world, c.rank, c.group
    for n in sizes:
        for op in OPS:
            for dtype in DTYPES:
                codecs = LOSSLESS + LOSSY
                for codec in codecs:
                    lossy = codec in LOSSY
                    case = f"{tag}all_reduce n={n} {op} {dtype} {codec}"
                    inputs = [make_input(case, r, n, dtype, op, lossy) for r in range(world)]
                    x = inputs[rank].copy()
                    small = x.nbytes <= g.options.small_bytes
                    algo = ("recursive-doubling",) if small else ("ring",)
                    unsupported = lossy and _lossy_unsupported("all_reduce", dtype, op)
                    info = c.run(
                        case,
                        partial(g.all_reduce, x, op, codec),
                        unsupported,
                    )
                    if unsupported:
                        c.compare(case + " (input intact)", x, inputs[rank])
                        continue
                    if info is None:
                        continue
                    c.info(case, info, "all_reduce", algo, x)
                    want = reference(inputs, op)
                    bound = _lossy_bound(inputs, op, codec, dtype) if lossy else None
                    c.compare(case, x, want, bound=bound)
                    c.digest(case, x)


def _cases_reduce_scatter(c: _Checker, sizes: tuple[int, ...], codecs: tuple[str, ...]) -> None:
    world, rank, g = c.world, c.rank, c.group
    for n in sizes:
        for op in OPS:
            for dtype in DTYPES:
                for codec in codecs:
                    lossy = codec in LOSSY
                    case = f"reduce_scatter n={n} {op} {dtype} {codec}"
                    inputs = [make_input(case, r, n, dtype, op, lossy) for r in range(world)]
                    x = inputs[rank].copy()
                    unsupported = lossy and _lossy_unsupported("reduce_scatter", dtype, op)
                    info = c.run(
                        case,
                        partial(g.reduce_scatter, x, op, codec),
                        unsupported,
                    )
                    if info is None:
                        continue
                    c.info(case, info, "reduce_scatter", ("ring",), x)
                    mine = g.chunk(n)
                    if mine != slice(*partition(n, world)[rank]):
                        c.error(case, f"chunk {mine} disagrees with partition()")
                    want = inputs[rank].copy()
                    want[mine] = reference(inputs, op)[mine]
                    bound = None
                    if lossy:
                        bound = np.zeros(n)
                        bound[mine] = _lossy_bound(inputs, op, codec, dtype)[mine]
                    c.compare(case, x, want, bound=bound)
                    # outside this rank's chunk: the input, byte for byte
                    rest = np.ones(n, dtype=bool)
                    rest[mine] = False
                    c.compare(case + " (rest unchanged)", x[rest], inputs[rank][rest])


def _roundtrip(x: np.ndarray, codec: str) -> np.ndarray:
    """What a lossy codec makes of ``x`` when every element is its own round trip."""
    half = np.float16 if codec == "fp16" else supported_dtypes()["bfloat16"]
    return x.astype(half).astype(x.dtype)


def _cases_all_gather(c: _Checker, sizes: tuple[int, ...], tag: str = "") -> None:
    world, rank, g = c.world, c.rank, c.group
    for n in sizes:
        for dtype in DTYPES:
            for codec in LOSSLESS + LOSSY:
                lossy = codec in LOSSY
                case = f"{tag}all_gather n={n} {dtype} {codec}"
                parts = [make_input(case, r, n, dtype, "sum", lossy) for r in range(world)]
                want = np.empty(n, dtype=supported_dtypes()[dtype])
                for r in range(world):
                    sl = g.chunk(n, r)
                    want[sl] = parts[r][sl]
                x = make_input(case + " garbage", rank, n, dtype, "sum", lossy)
                x[g.chunk(n)] = parts[rank][g.chunk(n)]
                unsupported = lossy and _lossy_unsupported("all_gather", dtype, "sum")
                info = c.run(case, partial(g.all_gather, x, codec), unsupported)
                if info is None:
                    continue
                c.info(case, info, "all_gather", ("ring",), x)
                if not lossy:
                    c.compare(case, x, want)
                elif codec == "int8":
                    bound = np.full(n, 2 * CODEC_EPS["int8"] * float(np.abs(want).max(initial=0)))
                    c.compare(case, x, want, bound=bound + 1e-30)
                else:
                    c.compare(case, x, _roundtrip(want, codec))
                c.digest(case, x)


def _cases_broadcast(c: _Checker, small: int, large: int) -> None:
    world, rank, g = c.world, c.rank, c.group
    plans: list[tuple[int, int, str, str]] = []
    for root in range(world):
        for n in (small, large):
            plans.append((root, n, DTYPES[(root + n) % len(DTYPES)], "none"))
            plans.append((root, n, "float32", "int8"))
    for dtype in DTYPES:
        for codec in LOSSLESS + LOSSY:
            plans.append((world - 1, large, dtype, codec))
            plans.append((0, small, dtype, codec))
    for root, n, dtype, codec in plans:
        lossy = codec in LOSSY
        case = f"broadcast root={root} n={n} {dtype} {codec}"
        src = make_input(case, root, n, dtype, "sum", lossy)
        x = src.copy() if rank == root else make_input(case, rank, n, dtype, "sum", lossy)
        algo = "binomial" if x.nbytes <= g.options.small_bytes else "chain"
        unsupported = lossy and _lossy_unsupported("broadcast", dtype, "sum")
        info = c.run(case, partial(g.broadcast, x, root, codec), unsupported)
        if info is None:
            continue
        c.info(case, info, "broadcast", (algo,), x)
        if not lossy:
            c.compare(case, x, src)
        elif codec == "int8":
            bound = np.full(n, 2 * CODEC_EPS["int8"] * float(np.abs(src).max(initial=0)))
            c.compare(case, x, src, bound=bound + 1e-30)
        else:
            c.compare(case, x, _roundtrip(src, codec))
        c.digest(case, x)


def _async_sums(c: _Checker, case: str, ins: list[list[np.ndarray]]) -> None:
    """Sum ``ins[k]`` (every rank's input of op k) with all ops in flight at once,
    waited in order: each result, seq and OpResult checked, each digest recorded."""
    xs = [ins[k][c.rank].copy() for k in range(len(ins))]
    handles = [c.group.all_reduce(x, "sum", async_op=True) for x in xs]
    for k, h in enumerate(handles):
        try:
            info = h.wait(60)
        except Exception:
            c.error(f"{case} {k}", traceback.format_exc())
            continue
        if info.seq != c.seq:
            c.error(f"{case} {k}", f"seq {info.seq}, expected {c.seq}")
        c.seq = info.seq + 1
        c.info(f"{case} {k}", info, "all_reduce", ("recursive-doubling", "ring"), xs[k])
        c.compare(f"{case} {k}", xs[k], reference(ins[k], "sum"))
        c.digest(f"{case} {k}", xs[k])


def _cases_misc(c: _Checker) -> None:
    """Barrier, async handles, shapes, non-contiguous views, zero-length, n < world."""
    world, rank, g = c.world, c.rank, c.group
    for i in range(3):
        info = c.run(f"barrier {i}", g.barrier, False)
        if info is not None:
            c.info(f"barrier {i}", info, "barrier", ("dissemination",), np.empty(0))

    # several in flight, waited in order
    case = "async"
    sizes = (5, 70_001, 1, 30_000)
    ins = [
        [make_input(f"{case} {k}", r, n, "float32", "sum", False) for r in range(world)]
        for k, n in enumerate(sizes)
    ]
    _async_sums(c, case, ins)
    # async all four kinds at once
    case = "async mixed"
    n = 1001
    a = [make_input(case + " a", r, n, "int32", "sum", False) for r in range(world)]
    b = [make_input(case + " b", r, n, "float64", "sum", False) for r in range(world)]
    xa, xb = a[rank].copy(), b[rank].copy()
    xc = b[0].copy() if rank == 0 else np.zeros(n)
    xd = make_input(case + " d", rank, n, "int64", "sum", False)
    hs = [
        g.all_reduce(xa, "max", "zstd", async_op=True),
        g.reduce_scatter(xb, "sum", async_op=True),
        g.broadcast(xc, 0, async_op=True),
        g.all_gather(xd, async_op=True),
        g.barrier(async_op=True),
    ]
    for k, h in enumerate(hs):
        try:
            info = h.wait(60)
            if info.seq != c.seq:
                c.error(f"{case} {k}", f"seq {info.seq}, expected {c.seq}")
            c.seq = info.seq + 1
        except Exception:
            c.error(f"{case} {k}", traceback.format_exc())
    c.compare(case + " all_reduce", xa, reference(a, "max"))
    c.compare(case + " reduce_scatter", xb[g.chunk(n)], reference(b, "sum")[g.chunk(n)])
    c.compare(case + " broadcast", xc, b[0])

    # shapes
    for op in OPS:
        for dtype in ("float32", "int64", "bfloat16"):
            case = f"shape (3,5,7) {op} {dtype}"
            ins3 = [make_input(case, r, 105, dtype, op, False, (3, 5, 7)) for r in range(world)]
            x = ins3[rank].copy()
            info = c.run(case, partial(g.all_reduce, x, op), False)
            if info is not None:
                c.info(case, info, "all_reduce", ("recursive-doubling",), x)
                c.compare(case, x, reference(ins3, op))
                c.digest(case, x)

    # non-contiguous views: handled, result written back, the rest untouched
    shape = (40, 2000)  # 80_000 elements; the view has 40_000 float32 = 160 KB: ring
    for codec in ("none", "zstd"):
        case = f"non-contiguous all_reduce {codec}"
        bases = [make_input(case, r, 80_000, "float32", "sum", False, shape) for r in range(world)]
        base = bases[rank].copy()
        view = base[:, ::2]
        info = c.run(case, partial(g.all_reduce, view, "sum", codec), False)
        if info is not None:
            algo = "ring" if view.nbytes > g.options.small_bytes else "recursive-doubling"
            c.info(case, info, "all_reduce", (algo,), np.ascontiguousarray(view))
            c.compare(case, view, reference([b[:, ::2] for b in bases], "sum"))
            c.compare(case + " (other columns)", base[:, 1::2], bases[rank][:, 1::2])
            c.digest(case, view)
    case = "non-contiguous broadcast"
    bases = [make_input(case, r, 600, "int32", "sum", False, (20, 30)) for r in range(world)]
    base = bases[rank].copy()
    view = base[::3, 1::2]
    info = c.run(case, partial(g.broadcast, view, world - 1), False)
    if info is not None:
        c.compare(case, view, bases[world - 1][::3, 1::2])
        c.compare(case + " (rest)", base[1::3], bases[rank][1::3])
    case = "non-contiguous all_gather"
    flats = [np.ascontiguousarray(b[::3, 1::2]).reshape(-1) for b in bases]
    base = bases[rank].copy()
    view = base[::3, 1::2]
    m = view.size
    want = np.empty(m, dtype=np.int32)
    for r in range(world):
        want[g.chunk(m, r)] = flats[r][g.chunk(m, r)]
    info = c.run(case, partial(g.all_gather, view), False)
    if info is not None:
        c.compare(case, view.reshape(-1), want)
        c.compare(case + " (rest)", base[1::3], bases[rank][1::3])
    case = "non-contiguous reduce_scatter"
    base = bases[rank].copy()
    view = base[::3, 1::2]
    info = c.run(case, partial(g.reduce_scatter, view, "sum"), False)
    if info is not None:
        mine = g.chunk(m)
        want = flats[rank].copy()
        want[mine] = reference(flats, "sum")[mine]
        c.compare(case, np.ascontiguousarray(view).reshape(-1), want)
        c.compare(case + " (rest)", base[1::3], bases[rank][1::3])

    # zero-length arrays and arrays smaller than the world
    for n in (0, 1, world - 1 if world > 2 else 1, 2):
        for dtype in ("float32", "uint8"):
            case = f"tiny n={n} {dtype}"
            ins_t = [make_input(case, r, n, dtype, "sum", False) for r in range(world)]
            x = ins_t[rank].copy()
            info = c.run(case + " all_reduce", partial(g.all_reduce, x, "sum", "zstd"), False)
            if info is not None:
                algos = ("trivial",) if n == 0 else ("recursive-doubling",)
                c.info(case + " all_reduce", info, "all_reduce", algos, x)
                c.compare(case + " all_reduce", x, reference(ins_t, "sum"))
            x = ins_t[rank].copy()
            info = c.run(case + " reduce_scatter", partial(g.reduce_scatter, x, "max"), False)
            if info is not None:
                c.info(case + " reduce_scatter", info, "reduce_scatter", ("ring",), x)
                want = ins_t[rank].copy()
                want[g.chunk(n)] = reference(ins_t, "max")[g.chunk(n)]
                c.compare(case + " reduce_scatter", x, want)
            x = ins_t[rank].copy()
            info = c.run(case + " all_gather", partial(g.all_gather, x), False)
            if info is not None:
                c.info(case + " all_gather", info, "all_gather", ("ring",), x)
                want = np.empty(n, dtype=x.dtype)
                for r in range(world):
                    want[g.chunk(n, r)] = ins_t[r][g.chunk(n, r)]
                c.compare(case + " all_gather", x, want)
            x = ins_t[rank].copy()
            info = c.run(case + " broadcast", partial(g.broadcast, x, world - 1), False)
            if info is not None:
                c.info(case + " broadcast", info, "broadcast", ("binomial",), x)
                c.compare(case + " broadcast", x, ins_t[world - 1])
            if n == 0:
                c.digest(case, x)

    # int8 on the wire: about a quarter of float32's bytes (ring, large array)
    n = 200_003
    x = make_input("wire", rank, n, "float32", "sum", True)
    sent: dict[str, int] = {}
    for codec in ("none", "int8"):
        info = c.run(f"wire {codec}", partial(g.all_reduce, x.copy(), "sum", codec), False)
        if isinstance(info, OpResult):
            c.info(f"wire {codec}", info, "all_reduce", ("ring",), x)
            sent[codec] = info.wire_bytes_sent
    if len(sent) == 2 and not sent["int8"] <= 0.27 * sent["none"]:
        c.error("wire", f"int8 sent {sent['int8']} bytes, float32 {sent['none']}: > 0.27x")


def _cases_streams(c: _Checker) -> None:
    """Three streams per pair and 4 KiB pieces: many frames per chunk, striped."""
    world, rank, g = c.world, c.rank, c.group
    for codec in ("none", "zstd", "int8", "bf16"):
        for op in ("sum", "avg", "max"):
            lossy = codec in LOSSY
            n = 20_011
            case = f"streams all_reduce {op} {codec}"
            inputs = [make_input(case, r, n, "float32", op, lossy) for r in range(world)]
            x = inputs[rank].copy()
            info = c.run(case, partial(g.all_reduce, x, op, codec), False)
            if info is None:
                continue
            c.info(case, info, "all_reduce", ("ring",), x)
            bound = _lossy_bound(inputs, op, codec, "float32") if lossy else None
            c.compare(case, x, reference(inputs, op), bound=bound)
            c.digest(case, x)
    _cases_reduce_scatter(c, (30_001,), ("none", "int8"))
    _cases_all_gather(c, (30_001,), tag="streams ")
    for root in range(world):
        case = f"streams broadcast root={root}"
        src = make_input(case, root, 30_001, "float64", "sum", False)
        x = src.copy() if rank == root else np.zeros(30_001)
        info = c.run(case, partial(g.broadcast, x, root), False)
        if info is not None:
            c.info(case, info, "broadcast", ("chain",), x)
            c.compare(case, x, src)
            c.digest(case, x)


def _cases_page_swap(c: _Checker, tmp: str) -> None:
    """The page-swapped ring (comm/pageswap.py; this group swaps from 4 KiB up): every
    op and dtype, and arrays that sit anywhere -- at odd offsets inside a buffer whose
    other bytes must stay as they were, and in a file (not swappable: the saving ring
    takes it, and the result must reach the file)."""
    world, rank, g = c.world, c.rank, c.group
    for op in OPS:
        for dtype in DTYPES:
            case = f"swap all_reduce {op} {dtype}"
            inputs = [make_input(case, r, LARGE, dtype, op, False) for r in range(world)]
            x = inputs[rank].copy()
            info = c.run(case, partial(g.all_reduce, x, op), False)
            if info is None:
                continue
            c.info(case, info, "all_reduce", ("ring",), x)
            c.compare(case, x, reference(inputs, op))
            c.digest(case, x)
    # three swapped ops in flight at once: each borrows its own twin
    case = "swap async"
    ins = [
        [make_input(f"{case} {k}", r, LARGE + k, "float64", "sum", False) for r in range(world)]
        for k in range(3)
    ]
    _async_sums(c, case, ins)
    n = 300_007
    for offset in (0, 4, 16, 4092):
        case = f"swap placed offset={offset}"
        inputs = [make_input(case, r, n, "float32", "sum", False) for r in range(world)]
        buf = np.full(4 * n + offset + 3 * 4096, 0x5A, dtype=np.uint8)
        x = buf[4096 + offset : 4096 + offset + 4 * n].view(np.float32)
        x[:] = inputs[rank]
        info = c.run(case, partial(g.all_reduce, x, "sum"), False)
        if info is None:
            continue
        c.compare(case, x, reference(inputs, "sum"))
        c.digest(case, x)
        rest = np.concatenate([buf[: 4096 + offset], buf[4096 + offset + 4 * n :]])
        if not np.all(rest == 0x5A):
            c.error(case, "bytes next to the array changed")
    # even ranks in a file, odd ranks swapping: the two rings are one wire protocol
    case = "swap memmap"
    inputs = [make_input(case, r, n, "float32", "max", False) for r in range(world)]
    path = f"{tmp}/rank{rank}.bin"
    y = np.memmap(path, dtype=np.float32, mode="w+", shape=(n,)) if rank % 2 == 0 else None
    x = y if y is not None else np.empty(n, dtype=np.float32)
    x[:] = inputs[rank]
    if c.run(case, partial(g.all_reduce, x, "max"), False) is not None:
        c.compare(case, x, reference(inputs, "max"))
        c.digest(case, x)
        if y is not None:
            y.flush()
            c.compare(case + " (file)", np.fromfile(path, dtype=np.float32), x)
    del x, y


def _connect(ctx: RankContext, options: CommOptions, epoch: int) -> Group:
    listener = bind("127.0.0.1:0")
    addresses = ctx.exchange(listener.address)
    secret = ctx.exchange(b"s" * 32 if ctx.rank == 0 else None)[0]
    return Group(ctx.rank, addresses, secret, listener=listener, epoch=epoch, options=options)


def _collectives_rank(ctx: RankContext) -> dict[str, Any]:
    t0 = time.monotonic()
    errors: list[str] = []
    hashes: list[tuple[str, str]] = []
    timings: dict[str, float] = {}
    # small_bytes pinned to 64 KiB so that LARGE takes the ring for every dtype (uint8 too)
    main = CommOptions(timeout_s=20.0, small_bytes=64 * 1024)
    with _connect(ctx, main, EPOCH) as g:
        c = _Checker(ctx.rank, ctx.world, g, ctx)
        for name, fn in (
            ("all_reduce small", partial(_cases_all_reduce, c, SMALL_SIZES, "")),
            ("all_reduce large", partial(_cases_all_reduce, c, (LARGE,), "")),
            ("reduce_scatter", partial(_cases_reduce_scatter, c, (3, 10_007), LOSSLESS + LOSSY)),
            ("all_gather", partial(_cases_all_gather, c, (1, 7, LARGE))),
            ("broadcast", partial(_cases_broadcast, c, 1000, LARGE)),
            ("misc", partial(_cases_misc, c)),
        ):
            t = time.monotonic()
            fn()
            timings[name] = round(time.monotonic() - t, 2)
        assert c.errors is not None and c.hashes is not None
        errors += c.errors
        hashes += c.hashes
    swap = CommOptions(timeout_s=20.0, small_bytes=64 * 1024, page_swap_min_bytes=4096)
    with _connect(ctx, swap, EPOCH + 2) as gs, tempfile.TemporaryDirectory() as tmp:
        cs = _Checker(ctx.rank, ctx.world, gs, ctx)
        t = time.monotonic()
        _cases_page_swap(cs, tmp)
        timings["page swap"] = round(time.monotonic() - t, 2)
        assert cs.errors is not None and cs.hashes is not None
        errors += cs.errors
        hashes += cs.hashes
    opts = CommOptions(
        streams=3, small_bytes=4096, piece_bytes=4096, crowded_piece_bytes=0, timeout_s=20.0
    )
    with _connect(ctx, opts, EPOCH + 1) as g3:
        c3 = _Checker(ctx.rank, ctx.world, g3, ctx)
        t = time.monotonic()
        _cases_streams(c3)
        timings["streams"] = round(time.monotonic() - t, 2)
        # everyone done before anyone leaves: see test_leaving_right_after_a_multi_stream_op
        ctx.exchange(None)
        assert c3.errors is not None and c3.hashes is not None
        errors += c3.errors
        hashes += c3.hashes
    timings["total"] = round(time.monotonic() - t0, 2)
    return {"errors": errors, "hashes": hashes, "timings": timings}


# ----------------------------------------------------------------------------- tests


def _report(results: list[dict[str, Any]]) -> Iterator[str]:
    """Each rank's first few errors (later ones are usually consequences)."""
    for r in results:
        yield from r["errors"][:4]


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_every_collective_codec_and_dtype(world: int) -> None:
    results = run_ranks(_collectives_rank, world, timeout=170.0, name=f"coll{world}")
    errors = list(_report(results))
    assert not errors, "\n".join(errors)
    # promise 1: every rank holds the same bytes, case by case
    cases = [case for case, _ in results[0]["hashes"]]
    assert len(cases) > 500
    for r in results[1:]:
        assert [case for case, _ in r["hashes"]] == cases
    mismatched = [
        case for i, case in enumerate(cases) if len({r["hashes"][i][1] for r in results}) != 1
    ]
    assert not mismatched, f"ranks differ on {len(mismatched)} cases: {mismatched[:10]}"
    print(f"world {world}: {len(cases)} cases; rank 0 timings {results[0]['timings']}")


def test_world_of_one(secret: bytes) -> None:
    """One rank: every collective is a local no-op (avg divides by 1), OpResult 'trivial'."""
    listener = bind("127.0.0.1:0")
    with Group(0, [listener.address], secret, listener=listener, epoch=3) as g:
        for op in OPS:
            for dtype in DTYPES:
                x = make_input(f"w1 {op} {dtype}", 0, 1001, dtype, op, False)
                want = reference([x], op)
                y = x.copy()
                info = g.all_reduce(y, op)
                assert info.algorithm == "trivial" and info.epoch == 3 and info.world == 1
                assert info.wire_bytes_sent == 0
                assert _same_bytes(y, want)
                y = x.copy()
                g.reduce_scatter(y, op)
                assert _same_bytes(y, want)
        x = make_input("w1 b", 0, 500, "float32", "sum", True)
        y = x.copy()
        g.broadcast(y, 0, "int8")
        g.all_gather(y, "zstd")
        assert _same_bytes(y, x)
        g.barrier()
        assert g.all_reduce(np.zeros(0), "sum").algorithm == "trivial"
        view = np.arange(24.0).reshape(4, 6)[:, ::2]
        g.all_reduce(view, "avg")
        assert _same_bytes(view, np.arange(24.0).reshape(4, 6)[:, ::2])
        with pytest.raises(UnsupportedError):
            g.all_reduce(np.zeros(4, dtype=np.int32), "sum", "int8")
        h = g.all_reduce(np.ones(3), async_op=True)
        assert h.wait(5).op == "all_reduce"


def test_bad_inputs_are_refused_clearly(secret: bytes) -> None:
    """Unsupported dtypes and read-only arrays: a clear error before anything runs."""
    listener = bind("127.0.0.1:0")
    with Group(0, [listener.address], secret, listener=listener) as g:
        with pytest.raises(UnsupportedError, match="dtype"):
            g.all_reduce(np.zeros(4, dtype=np.complex64))
        with pytest.raises(UnsupportedError, match="dtype"):
            g.all_reduce(np.zeros(4, dtype=np.int8))
        ro = np.zeros(4)
        ro.flags.writeable = False
        with pytest.raises(UnsupportedError, match="read-only"):
            g.all_reduce(ro)
        with pytest.raises(UnsupportedError):
            g.all_reduce([1.0, 2.0])  # type: ignore[call-overload]
        with pytest.raises(ValueError):
            g.all_reduce(np.zeros(4), "median")
        with pytest.raises(ValueError):
            g.all_reduce(np.zeros(4), "sum", "gzip")
        assert g.all_reduce(np.zeros(4)).seq == 0  # refusals used no sequence number


def _late_receiver_rank(ctx: RankContext) -> list[str]:
    listener = bind("127.0.0.1:0")
    addresses = ctx.exchange(listener.address)
    secret = ctx.exchange(b"s" * 32 if ctx.rank == 0 else None)[0]
    outcome: list[str] = []
    with Group(ctx.rank, addresses, secret, listener=listener) as g:
        x = np.arange(10, dtype=np.float32) if ctx.rank == 0 else np.zeros(10, np.float32)
        if ctx.rank == 1:
            time.sleep(0.5)  # the root's only frame arrives (and is stashed) before we start
        for step in ("broadcast", "barrier"):
            try:
                if step == "broadcast":
                    g.broadcast(x, 0)
                    outcome.append(f"broadcast ok {x[:3].tolist()}")
                else:
                    g.barrier()
                    outcome.append("barrier ok")
            except Exception as exc:
                outcome.append(f"{step}: {type(exc).__name__}: {exc}")
    return outcome


def test_broadcast_to_a_late_receiver() -> None:
    """A broadcast receiver that starts after the root's frame arrived must still
    complete, and the group must keep working (regression: the engine finished such a
    receive-only plan twice and its thread died; fixed in d1b0bfa)."""
    results = run_ranks(_late_receiver_rank, 2, timeout=60.0, name="late")
    assert results[1] == ["broadcast ok [0.0, 1.0, 2.0]", "barrier ok"], results
    assert results[0] == ["broadcast ok [0.0, 1.0, 2.0]", "barrier ok"], results


def _early_leaver_rank(ctx: RankContext) -> str:
    listener = bind("127.0.0.1:0")
    addresses = ctx.exchange(listener.address)
    opts = CommOptions(
        streams=3, piece_bytes=4096, crowded_piece_bytes=0, small_bytes=4096, timeout_s=5.0
    )
    with Group(ctx.rank, addresses, b"s" * 32, listener=listener, options=opts) as g:
        x = np.arange(30_000.0) if ctx.rank == 0 else np.zeros(30_000)
        if ctx.rank == 1:
            time.sleep(0.3)  # the root has sent everything and left (BYE) by now
        try:
            g.broadcast(x, 0)  # 240 KB in 59 pieces striped over 3 streams
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok" if np.array_equal(x, np.arange(30_000.0)) else "wrong result"


def test_leaving_right_after_a_multi_stream_op() -> None:
    """A peer that finished its part and closed the group must not fail an op whose
    frames it already sent (frames before BYE are delivered, per stream)."""
    results = run_ranks(_early_leaver_rank, 2, timeout=60.0, name="leaver")
    assert results == ["ok", "ok"], results

"""``phalanx bench allreduce``: all-reduce time and bandwidth on 127.0.0.1, every result checked.

N local rank processes (spawned, see :mod:`phalanx.testing.procs`) each bind a listener
on port 0, swap addresses through the parent and build a static :class:`phalanx.comm.Group`.
For every size: warm-up, then timed iterations; per iteration the buffer is refilled
from the rank's source (untimed), the ranks meet at a barrier, and the all-reduce alone
is timed. Each rank stamps the op's start and end with ``time.perf_counter``
(CLOCK_MONOTONIC: one clock for every process of the host); the op time of an iteration
is from the last rank's start to the last rank's end (``max(end) - max(start)``), so the
ranks' spread in leaving the barrier is not in it; that spread is reported on its own
(``start_spread_s``). Each block begins with one untimed op (the first after the idle
gap). The CPU an op costs (``cpu_s_per_op``: user + system seconds of every thread)
counts the rank process and, with ``--via daemon``, its daemon process too, read around
the block's timed ops (from ``_CPU_TAIL_S`` after the untimed one to ``_CPU_TAIL_S``
after the last: the daemon's observer works on its own thread after the op returns),
less what the block costs without its ops (the same barriers and sleep, and the main
thread's refills and checks), per timed op, averaged over the ranks (null when that is
not above zero: background work outweighed the ops): the three implementations are
compared on what the machine pays, not only on time. Inputs are integer-valued
(like the Gloo baseline) so float sums are exact: lossless results must equal the
closed form bit for bit; lossy codecs report their largest relative error. Every
iteration's result is hashed (sha256) and the hashes must agree across ranks.

With ``--via daemon`` each rank is a *client*: it starts its own ``phalanx daemon``
process (a coordinator runs in the parent), allocates the buffer with
``client.empty`` (daemon-shared memory) and the all-reduce goes client -> daemon ->
data plane; a second set of ranks runs the in-process group beside it (alternating
blocks, as with ``--vs``), and a ratio line per size compares the two.

With ``--vs gloo`` a second set of ranks runs torch.distributed's gloo backend; both sets
stay alive and take turns (a block of phalanx iterations, then a block of Gloo ones,
``--rounds`` times per size) so that the machine's noise hits both.

Output: one JSON line per size and implementation, plus a ratio line per size with
``--vs``; or a table. Exit status 1 if any result is wrong or a rank failed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from phalanx.bench._harness import (
    CpuClock,
    busbw_factor,
    format_bytes,
    parse_size,
    parse_sizes,
    print_json,
    print_table,
    progress,
    summarize_times,
)
from phalanx.comm.options import CommOptions
from phalanx.testing.procs import RankPool, RanksFailed

if TYPE_CHECKING:
    from phalanx.testing.procs import RankContext

__all__ = ["register", "run"]

log = logging.getLogger(__name__)

DEFAULT_SIZES = "4KiB,1MiB,16MiB,64MiB"
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64")
LOSSLESS_CODECS = frozenset({"none", "zstd"})
# Largest relative error a lossy codec may show on the benchmark's inputs (small
# integers, so fp16 is exact; the bounds only catch garbage, they are not a spec).
LOSSY_TOLERANCE = {"fp16": 1e-3, "bf16": 1e-2, "int8": 0.25}
DEFAULT_LOSSY_TOLERANCE = 0.5
# How long a block's CPU reading waits after its last op: longer than the daemon's
# deferred observer takes to pick up an op's sample and feed it to the monitor
# (phalanx.daemon._OBSERVE_BATCH_S, 20 ms, plus the feed).
_CPU_TAIL_S = 0.05
# What a device rank writes into the host buffer once the device holds the input: an op
# that never copied the device's data out shows as a wrong result (ints: no NaN).
_SENTINEL_INT = -0x5A5A


# -- messages between the parent and the ranks ----------------------------------------


@dataclass(frozen=True)
class _Spec:
    """What a rank needs to build its backend."""

    impl: str  # "phalanx", "phalanx-daemon" or "gloo"
    secret: bytes
    streams: int
    timeout_s: float
    log_level: str
    coordinator: str = ""  # phalanx-daemon: where the ranks' daemons join
    workdir: str = ""  # phalanx-daemon: secret file and sockets
    preserve_input: bool = True  # False: promise 2 waived (measures what it costs)
    device: str = "cpu"  # phalanx-daemon-cuda: "cuda"
    #: CommOptions.zero_copy_min_bytes of the in-process group and of the daemons
    #: (``PHALANX_COMM_ZERO_COPY_MIN_BYTES``, set either way: not an inherited one)
    zero_copy_min_bytes: int = 0


@dataclass(frozen=True)
class _Prepare:
    nbytes: int
    dtype: str
    codec: str


@dataclass(frozen=True)
class _Block:
    iters: int


@dataclass
class _BlockResult:
    #: time.perf_counter (CLOCK_MONOTONIC, comparable across the host's processes) at
    #: each timed op's start and end
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    #: CPU seconds of the block's ``ops`` timed ops (rank + helper processes; the
    #: untimed lead-in op left out), the block's cost without its ops subtracted; may
    #: be <= 0 when background work outweighed the ops
    cpu_s: float = 0.0
    ops: int = 0
    digests: list[str] = field(default_factory=list)  # every op's, the untimed one too
    wire_bytes: list[int | None] = field(default_factory=list)
    ok: bool = True
    max_rel_err: float = 0.0  # NaN if a result held NaN
    algorithm: str | None = None


def _worse_err(a: float, b: float) -> float:
    """The larger of two relative errors; NaN wins (``max`` would drop it by order)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _op_times(starts: Sequence[Sequence[float]],
              ends: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:  # fmt: skip
    """Per iteration, from every rank's start and end stamps: (op time: the last rank's
    start to the last rank's end, start spread: first to last rank's start)."""
    times, spreads = [], []
    for t0s, t1s in zip(zip(*starts, strict=True), zip(*ends, strict=True), strict=True):
        times.append(max(t1s) - max(t0s))
        spreads.append(max(t0s) - min(t0s))
    return times, spreads


@dataclass
class _Series:
    """Everything measured for one (implementation, size), over all rounds."""

    impl: str
    codec: str
    streams: int | None
    times: list[float] = field(default_factory=list)  # op time per timed iteration
    spreads: list[float] = field(default_factory=list)  # ranks' start spread, same
    cpu_s: float = 0.0  # op CPU of every timed block (mean over ranks)
    cpu_ops: int = 0  # the ops it covers
    wire_bytes: list[int] = field(default_factory=list)
    ok: bool = True
    max_rel_err: float = 0.0
    algorithms: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    digests: set[str] = field(default_factory=set)  # of every result (one if all agree)

    def add(self, replies: Sequence[_BlockResult], *, timed: bool) -> None:
        for rank, r in enumerate(replies):
            if not r.ok:
                self.ok = False
                self.problems.append(f"rank {rank}: result differs from the exact sum")
            self.max_rel_err = _worse_err(self.max_rel_err, r.max_rel_err)
            if r.algorithm:
                self.algorithms.add(r.algorithm)
            self.digests.update(r.digests)
        for i, digests in enumerate(zip(*(r.digests for r in replies), strict=True)):
            if len(set(digests)) != 1:
                self.ok = False
                self.problems.append(f"iteration {i}: ranks hold different bytes")
        if not timed:
            return
        # From the last rank's start to the last rank's end (every implementation alike).
        times, spreads = _op_times([r.starts for r in replies], [r.ends for r in replies])
        self.times.extend(times)
        self.spreads.extend(spreads)
        self.cpu_s += sum(r.cpu_s for r in replies) / len(replies)
        self.cpu_ops += max(r.ops for r in replies)
        for wires in zip(*(r.wire_bytes for r in replies), strict=True):
            known = [w for w in wires if w is not None]
            if known:
                self.wire_bytes.append(max(known))


# -- inside a rank --------------------------------------------------------------------


class _Backend(Protocol):
    impl: str
    #: other processes whose CPU an op costs (the daemon of a client rank)
    helper_pids: tuple[int, ...]

    def bind_buffer(self, buf: np.ndarray[Any, Any]) -> None: ...
    def all_reduce(self, codec: str) -> tuple[int | None, str | None]: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...


def _daemon_env(spec: _Spec, base: dict[str, str]) -> dict[str, str]:
    """A rank's daemon's environment: ``base`` with the run's data-plane settings,
    which replace any the caller exported (the rows say what ran)."""
    return {
        **base,
        "PHALANX_COMM_STREAMS": str(spec.streams),
        "PHALANX_COMM_ZERO_COPY_MIN_BYTES": str(spec.zero_copy_min_bytes),
    }


class _PhalanxBackend:
    impl = "phalanx"
    helper_pids: tuple[int, ...] = ()

    def __init__(self, ctx: RankContext, spec: _Spec) -> None:
        from phalanx.comm import Group, bind

        listener = bind("127.0.0.1:0")
        addresses = ctx.exchange(listener.address, timeout=spec.timeout_s)
        self._group = Group(
            ctx.rank,
            addresses,
            spec.secret,
            listener=listener,
            epoch=0,
            options=CommOptions(streams=spec.streams, zero_copy_min_bytes=spec.zero_copy_min_bytes),
        )
        self._buf: np.ndarray[Any, Any] = np.empty(0, np.float32)
        self._preserve = spec.preserve_input

    def bind_buffer(self, buf: np.ndarray[Any, Any]) -> None:
        self._buf = buf

    def all_reduce(self, codec: str) -> tuple[int | None, str | None]:
        info = self._group.all_reduce(
            self._buf, op="sum", codec=codec, preserve_input=self._preserve
        )
        return int(info.wire_bytes_sent), str(info.algorithm)

    def barrier(self) -> None:
        self._group.barrier()

    def close(self) -> None:
        self._group.close()


class _DaemonBackend:
    """The rank is a client of its own ``phalanx daemon`` process (client -> daemon ->
    data plane); the buffer lives in daemon-shared memory (zero-copy path)."""

    impl = "phalanx-daemon"

    def __init__(self, ctx: RankContext, spec: _Spec) -> None:
        import subprocess

        import phalanx
        from phalanx._parent import child_env
        from phalanx.testing.launcher import phalanx_argv

        sock = os.path.join(spec.workdir, f"d{ctx.rank}.sock")
        cmd = phalanx_argv("daemon", "--coordinator", spec.coordinator, "--secret-file",
                           os.path.join(spec.workdir, "secret"), "--socket", sock, "--id",
                           f"bench-{ctx.rank}", "--metrics-port", "-1",
                           log_level=spec.log_level)  # fmt: skip
        env = _daemon_env(spec, dict(os.environ))
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=child_env(env))
        self.helper_pids: tuple[int, ...] = (self._proc.pid,)
        deadline = time.monotonic() + spec.timeout_s
        while True:
            try:
                self._pg = phalanx.connect(sock, op_timeout=spec.timeout_s)
                break
            except phalanx.DaemonUnavailable:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.close()
                    raise
                time.sleep(0.05)
        while self._pg.view().world < ctx.world:  # everyone in one view
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("the daemons did not form one view in time")
            time.sleep(0.05)
        ctx.exchange(None, timeout=spec.timeout_s)
        self._buf: np.ndarray[Any, Any] = np.empty(0, np.float32)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        return self._pg.empty(shape, dtype)

    def _close_extra(self) -> None:
        pass

    def bind_buffer(self, buf: np.ndarray[Any, Any]) -> None:
        self._buf = buf

    def all_reduce(self, codec: str) -> tuple[int | None, str | None]:
        res = self._pg.all_reduce(self._buf, op="sum", codec=codec)
        return None, res.algorithm

    def barrier(self) -> None:
        self._pg.barrier()

    def close(self) -> None:
        import subprocess

        self._close_extra()
        if getattr(self, "_pg", None) is not None:
            self._pg.close()
        self._proc.terminate()
        try:
            self._proc.wait(15.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5.0)


class _CudaDaemonBackend(_DaemonBackend):
    """``--device cuda``: the data lives on the GPU. An op is CUDA -> pinned daemon-shared
    host twin -> daemon -> data plane -> host twin -> CUDA (the elastic DDP bucket path,
    :class:`phalanx.torch.cuda.DeviceBucket`), all of it timed; the refill of the device
    buffer before an op and the copy back for the check are not."""

    impl = "phalanx-daemon-cuda"

    def __init__(self, ctx: RankContext, spec: _Spec) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
        self._torch = torch
        self._bucket: Any = None
        self._host: Any = None
        super().__init__(ctx, spec)

    def bind_buffer(self, buf: np.ndarray[Any, Any]) -> None:
        from phalanx.torch.cuda import DeviceBucket, pinned

        torch = self._torch
        self._buf = buf
        self._bucket = None
        self._host = torch.from_numpy(buf)
        self._bucket = DeviceBucket(torch.device("cuda"), self._host.numel(), self._host.dtype,
                                    self._host)  # fmt: skip
        if not pinned(self._host):
            log.warning("event=bench_unpinned bytes=%d", buf.nbytes)

    def refill(self) -> None:
        """The device gets the input; the host buffer then holds a sentinel, so an op
        that does not copy the device's data out (stage_out) gives a wrong result."""
        self._bucket.flat.copy_(self._host)
        self._torch.cuda.synchronize()
        _poison(self._buf)

    def all_reduce(self, codec: str) -> tuple[int | None, str | None]:
        host = self._bucket.stage_out()
        res = self._pg.all_reduce(host, op="sum", codec=codec)
        self._bucket.stage_in()
        self._torch.cuda.synchronize()
        return None, res.algorithm

    def settle(self) -> None:
        """What the device holds goes to the checked buffer (a lost copy shows)."""
        self._host.zero_()
        self._host.copy_(self._bucket.flat)
        self._torch.cuda.synchronize()

    def _close_extra(self) -> None:
        self._bucket = None
        self._host = None


def _poison(buf: np.ndarray[Any, Any]) -> None:
    """Fill ``buf`` with what no correct all-reduce of the inputs gives: NaN, or
    :data:`_SENTINEL_INT` for integer dtypes."""
    buf.fill(_SENTINEL_INT if np.issubdtype(buf.dtype, np.integer) else np.nan)


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)


class _Buffers:
    """A rank's source, result buffer and the exact expected sum for one size."""

    def __init__(
        self,
        rank: int,
        world: int,
        prep: _Prepare,
        alloc: Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray[Any, Any]] | None = None,
    ) -> None:
        dtype = _numpy_dtype(prep.dtype)
        numel = prep.nbytes // dtype.itemsize
        pattern = (np.arange(numel, dtype=np.int64) % 13).astype(np.float64)
        self.src = (pattern + (rank + 1)).astype(dtype)
        self.expected64 = pattern * world + world * (world + 1) // 2
        self.expected = self.expected64.astype(dtype)
        self.buf = np.empty_like(self.src) if alloc is None else alloc(self.src.shape, dtype)
        self.lossless = prep.codec in LOSSLESS_CODECS
        self.codec = prep.codec

    def check(self) -> tuple[bool, float, str]:
        """(equal to the exact sum or within tolerance, max relative error, sha256)."""
        digest = hashlib.sha256(self.buf.view(np.uint8).data).hexdigest()
        if self.lossless:
            return bool(np.array_equal(self.buf, self.expected)), 0.0, digest
        got = self.buf.astype(np.float64)
        err = float(np.max(np.abs(got - self.expected64) / np.abs(self.expected64)))
        tol = LOSSY_TOLERANCE.get(self.codec, DEFAULT_LOSSY_TOLERANCE)
        return bool(np.isfinite(err) and err <= tol), err, digest


def _run_block(
    backend: _Backend,
    bufs: _Buffers,
    iters: int,
    cpu: CpuClock,
    *,
    tail_s: float = _CPU_TAIL_S,
    thread_cpu: Callable[[], float] = time.thread_time,
) -> _BlockResult:
    """One untimed op (the first after the idle gap), then ``iters`` timed ones; every
    result checked.

    CPU: counts the ``iters`` timed ops only, like the timings. ``cpu`` is first read
    ``tail_s`` after the untimed lead-in op (so its cold cost and the work a helper does
    on it after it returned are left out), then ``tail_s`` after the last op (work a
    helper process does after the op returned, e.g. the daemon's observer), less the
    CPU of the block's other work: the same ``iters`` barriers and ``tail_s`` sleep
    without ops (run first, measured the same way), and the main thread's refills and
    checks (``thread_cpu``). Background work can make the difference <= 0; the row
    then reports no CPU figure (see :func:`_row`)."""
    res = _BlockResult()
    refill = getattr(backend, "refill", None)  # device buffers: filled untimed
    settle = getattr(backend, "settle", None)
    c0 = cpu.read()
    for _ in range(iters):
        backend.barrier()
    time.sleep(tail_s)
    without_ops = cpu.read() - c0
    side = 0.0  # main-thread CPU of the timed ops' refills and checks
    c0 = 0.0
    for i in range(iters + 1):
        if i == 1:  # the lead-in op and its tail are not counted
            time.sleep(tail_s)
            side = 0.0
            c0 = cpu.read()
        s0 = thread_cpu()
        np.copyto(bufs.buf, bufs.src)
        if refill is not None:
            refill()
        side += thread_cpu() - s0
        backend.barrier()
        t0 = time.perf_counter()
        wire, algorithm = backend.all_reduce(bufs.codec)
        t1 = time.perf_counter()
        s0 = thread_cpu()
        if settle is not None:
            settle()
        ok, err, digest = bufs.check()
        side += thread_cpu() - s0
        if i:  # op 0 is the untimed lead-in
            res.starts.append(t0)
            res.ends.append(t1)
            res.wire_bytes.append(wire)
        res.digests.append(digest)
        res.ok &= ok
        res.max_rel_err = _worse_err(res.max_rel_err, err)
        res.algorithm = algorithm
    time.sleep(tail_s)
    if iters:
        res.cpu_s = cpu.read() - c0 - side - without_ops
    res.ops = iters
    return res


def _rank_worker(ctx: RankContext, spec: _Spec) -> None:
    """A rank's whole life: build the backend, then serve _Prepare/_Block commands."""
    from phalanx.cli import setup_logging

    setup_logging(spec.log_level)  # ranks log like the parent: key=value on stderr
    backend: _Backend
    if spec.impl == "gloo":
        from phalanx.bench.gloo import GlooBackend

        backend = GlooBackend(ctx, timeout_s=spec.timeout_s)
    elif spec.impl == "phalanx-daemon":
        backend = _DaemonBackend(ctx, spec)
    elif spec.impl == "phalanx-daemon-cuda":
        backend = _CudaDaemonBackend(ctx, spec)
    else:
        backend = _PhalanxBackend(ctx, spec)
    bufs: _Buffers | None = None
    cpu = CpuClock(backend.helper_pids)
    try:
        while True:
            cmd = ctx.recv()
            if cmd is None:
                return
            if isinstance(cmd, _Prepare):
                bufs = None  # free the previous size first
                # a backend may place the buffer (the daemon's shared memory)
                bufs = _Buffers(ctx.rank, ctx.world, cmd, getattr(backend, "alloc", None))
                backend.bind_buffer(bufs.buf)
                ctx.reply(os.getpid())
            elif isinstance(cmd, _Block) and bufs is not None:
                ctx.reply(_run_block(backend, bufs, cmd.iters, cpu))
            else:
                raise RuntimeError(f"unexpected command {cmd!r}")
    finally:
        backend.close()


# -- the parent -----------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    """``total`` iterations in ``parts`` nearly equal blocks (no empty block)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _block_order(impls: int, round_: int) -> list[int]:
    """The implementations' turn order in round ``round_``: rotated by one each round,
    so that none always follows the same one (or always comes first)."""
    k = round_ % impls if impls else 0
    return [*range(k, impls), *range(k)]


def _preserve_label(impl: str, args: argparse.Namespace) -> bool | None:
    """Whether the row's ops kept their input (promise 2): the in-process group as
    asked, the daemon always (its API has no such switch), Gloo: not applicable."""
    if impl == "phalanx":
        return not args.no_preserve_input
    return True if impl.startswith("phalanx-daemon") else None


def _zero_copy_label(impl: str, args: argparse.Namespace) -> int | None:
    """The phalanx rows' ``zero_copy_min_bytes`` setting (0: zero-copy sends off);
    Gloo: None. A setting: frames leave spliced only from the page-swapped ring's
    twin (not with ``--no-preserve-input``) and where the system has vmsplice."""
    return int(args.zero_copy_min_bytes) if impl.startswith("phalanx") else None


def _size_or_zero(text: str) -> int:
    """``--zero-copy-min-bytes``: a size as ``--sizes`` takes them, or 0 (off)."""
    return 0 if text.strip() == "0" else parse_size(text)


def _cpu_per_op(series: _Series) -> float | None:
    """Op CPU per timed op; None when there is none or it is not above the noise (the
    block's background work outweighed the ops: the difference is <= 0)."""
    if not series.cpu_ops:
        return None
    per_op = series.cpu_s / series.cpu_ops
    return per_op if per_op > 0 else None


def _positive_ratio(a: float | None, b: float | None) -> float | None:
    """a / b when both are measured and > 0, else None (no ratio of noise)."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b


def _row(series: _Series, args: argparse.Namespace, nbytes: int) -> dict[str, Any]:
    world = args.world
    ring_bytes = nbytes * busbw_factor(world)  # what a no-codec ring sends per rank
    wire = int(np.median(series.wire_bytes)) if series.wire_bytes else None
    err = series.max_rel_err
    row: dict[str, Any] = {
        "impl": series.impl,
        "world": world,
        "bytes": nbytes,
        "dtype": args.dtype,
        "codec": series.codec,
        "streams": series.streams,
        "zero_copy_min_bytes": _zero_copy_label(series.impl, args),
        "preserve_input": _preserve_label(series.impl, args),
        "algorithm": ",".join(sorted(series.algorithms)) or None,
        "iters": len(series.times),
        "warmup": args.warmup,
        "rounds": args.rounds if args.vs or args.via else 1,
        **summarize_times(nbytes, world, series.times),
        # median_s etc.: last rank's start -> last rank's end; how far apart the ranks
        # started (left the barrier), median over iterations:
        "start_spread_s": float(np.median(series.spreads)) if series.spreads else None,
        "time_basis": "last_start_to_last_end",
        "cpu_s_per_op": _cpu_per_op(series),
        "wire_bytes": wire,
        "wire_ratio": wire / ring_bytes if wire is not None and ring_bytes else None,
        # null when a result held NaN or inf (then max_rel_err_nonfinite says which)
        "max_rel_err": err if math.isfinite(err) else None,
        "max_rel_err_nonfinite": None if math.isfinite(err) else str(err),
        "correct": series.ok and math.isfinite(err),
    }
    return row


def _ratio_row(ours: dict[str, Any], theirs: dict[str, Any],
               same: bool | None = None) -> dict[str, Any]:  # fmt: skip
    row = {
        "ratio": f"{ours['impl']}/{theirs['impl']}",
        "world": ours["world"],
        "bytes": ours["bytes"],
        "busbw_ratio": ours["busbw_Bps"] / theirs["busbw_Bps"],
        "time_ratio": ours["median_s"] / theirs["median_s"],
        "cpu_ratio": _positive_ratio(ours["cpu_s_per_op"], theirs["cpu_s_per_op"]),
    }
    if same is not None:  # both hold the very same result bytes (every rank, iteration)
        row["identical_results"] = same
    return row


_TABLE = (
    ("impl", "impl", "str"),
    ("world", "n", "str"),
    ("bytes", "size", "size"),
    ("codec", "codec", "str"),
    ("streams", "streams", "str"),
    ("algorithm", "algo", "str"),
    ("median_s", "median ms", "ms"),
    ("min_s", "min ms", "ms"),
    ("max_s", "max ms", "ms"),
    ("start_spread_s", "spread ms", "ms"),
    ("cpu_s_per_op", "cpu ms/op", "ms"),
    ("algbw_Bps", "algbw MB/s", "MBps"),
    ("busbw_Bps", "busbw MB/s", "MBps"),
    ("wire_ratio", "wire", "ratio"),
    ("max_rel_err", "rel err", "err"),
    ("correct", "check", "bool"),
)


_RATIO_TABLE = (
    ("ratio", "ratio", "str"),
    ("world", "n", "str"),
    ("bytes", "size", "size"),
    ("busbw_ratio", "busbw ratio", "ratio"),
    ("time_ratio", "time ratio", "ratio"),
    ("cpu_ratio", "cpu ratio", "ratio"),
)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    dtype = _numpy_dtype(args.dtype)
    bad = [s for s in args.sizes if s % dtype.itemsize]
    if bad:
        parser.error(f"sizes must be multiples of {dtype.itemsize} bytes ({args.dtype}): {bad}")
    if args.vs:
        from phalanx.bench.gloo import torch_problem

        problem = torch_problem()
        if problem:
            parser.error(problem)
    say = functools.partial(progress, enabled=not args.quiet)
    secret = os.urandom(32)  # a fresh cluster secret for this run's group
    specs = [
        _Spec(
            "phalanx",
            secret,
            args.streams,
            args.timeout,
            args.log_level,
            preserve_input=not args.no_preserve_input,
            zero_copy_min_bytes=args.zero_copy_min_bytes,
        )
    ]
    coordinators: list[Any] = []
    if args.via == "daemon":
        import tempfile

        from phalanx.membership.coordinator import Coordinator

        # one coordinator (one group of daemons) per daemon set: the CUDA set first
        impls = ["phalanx-daemon-cuda", "phalanx-daemon"] if args.device == "cuda" else [
            "phalanx-daemon"]  # fmt: skip
        for n, impl in enumerate(impls):
            workdir = tempfile.mkdtemp(prefix="phalanx-bench-")
            with open(os.path.join(workdir, "secret"), "wb") as f:
                f.write(secret.hex().encode())
            coordinator = Coordinator("127.0.0.1:0", secret=secret.hex().encode(),
                                      recover=False)  # fmt: skip
            coordinators.append(coordinator)
            via = _Spec(
                impl,
                secret,
                args.streams,
                args.timeout,
                args.log_level,
                coordinator.start(),
                workdir,
                device=args.device if n == 0 else "cpu",
                zero_copy_min_bytes=args.zero_copy_min_bytes,
            )
            specs.insert(n, via)
    if args.vs:
        specs.append(_Spec(args.vs, secret, args.streams, args.timeout, args.log_level))
    pools = [RankPool(_rank_worker, args.world, spec, name=spec.impl) for spec in specs]
    rows: list[dict[str, Any]] = []
    ok = True
    finished = False
    try:
        for pool, spec in zip(pools, specs, strict=True):
            say(f"starting {args.world} {spec.impl} ranks")
            pool.start()
        for nbytes in args.sizes:
            size_rows = _bench_size(pools, specs, args, nbytes, say)
            for row in size_rows:
                ok &= row.get("correct", True)
                if args.json:
                    print_json(row)
            rows.extend(size_rows)
        finished = True
    except RanksFailed as exc:
        progress(f"FAILED: {exc}", enabled=True)
        return 1
    except KeyboardInterrupt:
        progress("interrupted; killing the ranks", enabled=True)
        return 130
    finally:
        for pool in pools:
            # Done: let the ranks close their groups. Anything else (a failure,
            # Ctrl-C, SIGTERM): they may be mid-operation, so kill them now.
            if finished:
                pool.close(timeout=30.0)
            else:
                pool.kill()
        if coordinators:
            import shutil

            for coordinator, spec in zip(coordinators, specs, strict=False):
                coordinator.stop(0.5)
                shutil.rmtree(spec.workdir, ignore_errors=True)
    if not args.json:
        print_table([r for r in rows if "ratio" not in r], _TABLE)
        ratios = [r for r in rows if "ratio" in r]
        if ratios:
            print()
            print_table(ratios, _RATIO_TABLE)
    if not ok:
        progress("some results were WRONG (see the 'correct' field)", enabled=True)
    return 0 if ok else 1


def _bench_size(
    pools: Sequence[RankPool[None]],
    specs: Sequence[_Spec],
    args: argparse.Namespace,
    nbytes: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    label = format_bytes(nbytes)
    series = []
    for pool, spec in zip(pools, specs, strict=True):
        codec = args.codec if spec.impl.startswith("phalanx") else "none"
        streams = args.streams if spec.impl.startswith("phalanx") else None
        pool.request_all(_Prepare(nbytes, args.dtype, codec), args.timeout)
        s = _Series(spec.impl, codec, streams)
        if args.warmup:
            say(f"{label}: {spec.impl} warm-up ({args.warmup})")
            s.add(pool.request_all(_Block(args.warmup), args.timeout), timed=False)
        series.append(s)
    blocks = _split(args.iters, args.rounds if len(pools) > 1 else 1)
    for i, n in enumerate(blocks):
        for j in _block_order(len(pools), i):
            pool, s = pools[j], series[j]
            say(f"{label}: {s.impl} round {i + 1}/{len(blocks)} ({n} iterations)")
            s.add(pool.request_all(_Block(n), args.timeout), timed=True)
    rows = []
    for s in series:
        for problem in s.problems[:5]:
            log.error("%s %s: %s", s.impl, label, problem)
        rows.append(_row(s, args, nbytes))
    for other, s in zip(rows[1:], series[1:], strict=True):
        same = None
        if s.codec in LOSSLESS_CODECS and series[0].codec in LOSSLESS_CODECS:
            same = len(series[0].digests | s.digests) == 1
        rows.append(_ratio_row(rows[0], other, same))
    return rows


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add this benchmark's options to ``parser``; return the function that runs it."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes(DEFAULT_SIZES),
        help=f"comma-separated sizes, bytes or KiB/MiB/GiB (default {DEFAULT_SIZES})",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="default float32")
    parser.add_argument(
        "--codec", default="none", help="none, zstd, fp16, bf16, int8 (default none)"
    )
    parser.add_argument("--streams", type=int, default=1, help="TCP streams per link")
    parser.add_argument(
        "--no-preserve-input",
        action="store_true",
        help="phalanx skips saving the input (promise 2 waived): shows what the "
        "nothing-half-done guarantee costs; not the default",
    )
    parser.add_argument(
        "--zero-copy-min-bytes",
        type=_size_or_zero,
        default=CommOptions().zero_copy_min_bytes,
        metavar="SIZE",
        help="phalanx (in process and through the daemon) splices frames of at least "
        "SIZE from its own memory (vmsplice + splice) instead of copying them with "
        "sendmsg; 0 = off, the default (docs/comm.md, 'Zero-copy sends'). E.g. 256KiB",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    parser.add_argument(
        "--vs",
        choices=("gloo",),
        default=None,
        help="also run Gloo (torch 2.13.0 CPU), alternating blocks with phalanx",
    )
    parser.add_argument(
        "--via",
        choices=("daemon",),
        default=None,
        help="daemon: each rank is a client of its own 'phalanx daemon' process "
        "(client -> daemon -> data plane), compared with the in-process group",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda (with --via daemon): the data lives on the GPU and every op is staged "
        "CUDA -> pinned shared memory -> daemon -> CUDA; compared with the same ops on "
        "CPU tensors through another set of daemons (needs torch with CUDA)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="with --vs: blocks per implementation and size the iterations are split into",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="deadline in seconds for each step (start-up, each block of iterations)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    def check_and_run(args: argparse.Namespace) -> int:
        if args.world < 1:
            parser.error("--world must be >= 1")
        if args.iters < 1 or args.warmup < 0 or args.rounds < 1 or args.streams < 1:
            parser.error("--iters, --rounds and --streams must be >= 1, --warmup >= 0")
        if args.timeout <= 0:
            parser.error("--timeout must be > 0")
        if args.device == "cuda" and (args.via != "daemon" or args.dtype == "bfloat16"):
            parser.error("--device cuda needs --via daemon and a dtype other than bfloat16")
        if args.no_preserve_input and args.via == "daemon":
            parser.error("--no-preserve-input reaches only the in-process group (the "
                         "daemon's client API always preserves the input): leave out one "
                         "of --no-preserve-input and --via daemon")  # fmt: skip
        return run(args, parser)

    return check_and_run

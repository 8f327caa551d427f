"""``phalanx bench allreduce``'s measurement, with fake backends and clocks (no process,
no network): what an op's time and CPU are, the untimed lead-in op, the turn order,
the device sentinel, non-finite errors, option checks and the exchange deadlines."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.bench import allreduce
from phalanx.bench._harness import CpuClock, print_json
from phalanx.bench.allreduce import (
    _BlockResult,
    _Buffers,
    _Prepare,
    _run_block,
    _Series,
    _Spec,
)

IN_OP_CPU = 1.0  # what the fake op costs while it runs
DEFERRED_CPU = 2.0  # ... and what a helper process spends on it after it returned
DEFERRED_AFTER_S = 0.02  # the daemon's observer batches samples for 20 ms
BARRIER_CPU = 0.5  # not the op's
IDLE_CPU_PER_S = 0.5  # a helper's background work: not the op's either


def _args(**kw: Any) -> argparse.Namespace:
    base = dict(world=2, dtype="float32", warmup=0, rounds=1, vs=None, via=None,
                no_preserve_input=False, zero_copy_min_bytes=0)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


class _FakeCpu:
    """A rank + daemon CPU clock: in-op work counts at once, the daemon's share of an
    op only ``DEFERRED_AFTER_S`` later, background work all the time."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.now = 0.0
        self.deferred: list[tuple[float, float]] = []

    def read(self) -> float:
        t = time.perf_counter()
        later = sum(cost for due, cost in self.deferred if due <= t)
        return self.now + later + IDLE_CPU_PER_S * (t - self.t0)


class _FakeBackend:
    """An all-reduce of world 2 whose result is the exact sum (or what ``result``
    says), costing CPU on a :class:`_FakeCpu`."""

    impl = "fake"
    helper_pids: tuple[int, ...] = ()

    def __init__(self, bufs: _Buffers, clock: _FakeCpu, result: float | None = None) -> None:
        self.bufs = bufs
        self.clock = clock
        self.result = result
        self.calls = 0

    def bind_buffer(self, buf: np.ndarray[Any, Any]) -> None:
        pass

    def all_reduce(self, codec: str) -> tuple[int | None, str | None]:
        self.calls += 1
        if self.result is None:
            self.bufs.buf[:] = self.bufs.expected
        else:
            self.bufs.buf[:] = self.result
        self.clock.now += IN_OP_CPU
        self.clock.deferred.append((time.perf_counter() + DEFERRED_AFTER_S, DEFERRED_CPU))
        return 100, "ring"

    def barrier(self) -> None:
        self.clock.now += BARRIER_CPU

    def close(self) -> None:
        pass


def _bufs(codec: str = "none") -> _Buffers:
    return _Buffers(0, 2, _Prepare(4096, "float32", codec))


# -- finding 1: op time ----------------------------------------------------------------


def test_op_time_is_last_start_to_last_end_and_the_spread_is_apart() -> None:
    """Rank 0 leaves the barrier 0.3 s before rank 1 and then waits in the op for it:
    timing each rank from its own start would make the op 1.0 s; it took 0.7 s once
    everyone was in."""
    r0 = _BlockResult(starts=[10.0, 20.0], ends=[11.0, 20.5], ops=2, digests=["a"] * 3,
                      wire_bytes=[1, 1])  # fmt: skip
    r1 = _BlockResult(starts=[10.3, 20.1], ends=[11.0, 20.6], ops=2, digests=["a"] * 3,
                      wire_bytes=[1, 1])  # fmt: skip
    s = _Series("phalanx", "none", 1)
    s.add([r0, r1], timed=True)
    assert s.times == [pytest.approx(0.7), pytest.approx(0.5)]
    assert s.spreads == [pytest.approx(0.3), pytest.approx(0.1)]
    row = allreduce._row(s, _args(), 4096)
    assert row["median_s"] == pytest.approx(0.6)
    assert row["start_spread_s"] == pytest.approx(0.2)
    assert row["time_basis"] == "last_start_to_last_end"


def test_ranks_stamp_the_monotonic_clock_every_process_shares() -> None:
    info = time.get_clock_info("perf_counter")
    assert info.implementation == "clock_gettime(CLOCK_MONOTONIC)", info


# -- finding 2: CPU per op -------------------------------------------------------------


def test_cpu_per_op_counts_work_done_after_the_op_returned() -> None:
    """The daemon's observer works on an op ~20 ms after it returned: a reading right
    after the op misses it. Barriers and background work are not the op's."""
    bufs = _bufs()
    clock = _FakeCpu()
    res = _run_block(_FakeBackend(bufs, clock), bufs, 4, clock)  # type: ignore[arg-type]
    s = _Series("phalanx-daemon", "none", 1)
    s.add([res, res], timed=True)
    row = allreduce._row(s, _args(via="daemon", rounds=1), 4096)
    assert row["cpu_s_per_op"] == pytest.approx(IN_OP_CPU + DEFERRED_CPU, abs=0.1)


class _ColdFirstOpBackend(_FakeBackend):
    """The first op after the idle gap (the untimed lead-in) costs far more CPU."""

    def all_reduce(self, codec: str) -> tuple[int | None, str | None]:
        if self.calls == 0:
            self.clock.now += COLD_OP_CPU
        return super().all_reduce(codec)


COLD_OP_CPU = 40.0


def test_cpu_per_op_leaves_out_the_untimed_lead_in_op() -> None:
    """The lead-in op is not in the timings, so neither its (cold) CPU nor its count
    may be in cpu_s_per_op: 4 timed ops cost IN_OP_CPU + DEFERRED_CPU each."""
    bufs = _bufs()
    clock = _FakeCpu()
    backend = _ColdFirstOpBackend(bufs, clock)
    res = _run_block(backend, bufs, 4, clock)  # type: ignore[arg-type]
    assert backend.calls == 5
    assert res.ops == 4
    s = _Series("phalanx-daemon", "none", 1)
    s.add([res, res], timed=True)
    row = allreduce._row(s, _args(via="daemon", rounds=1), 4096)
    assert row["cpu_s_per_op"] == pytest.approx(IN_OP_CPU + DEFERRED_CPU, abs=0.1)


def _cpu_row(impl: str, cpu_s: float, ops: int = 4) -> dict[str, Any]:
    r = _BlockResult(starts=[1.0] * ops, ends=[2.0] * ops, cpu_s=cpu_s, ops=ops,
                     digests=["a"] * (ops + 1), wire_bytes=[1] * ops)  # fmt: skip
    s = _Series(impl, "none", 1)
    s.add([r, r], timed=True)
    return allreduce._row(s, _args(), 4096)


@pytest.mark.parametrize("cpu_s", [-0.4, 0.0])
def test_cpu_at_or_below_zero_is_noise_reported_null_with_no_ratio(cpu_s: float) -> None:
    """Background (daemon, gRPC) work in the no-op window can outweigh the ops: a
    per-op CPU <= 0 is no measurement, and must not yield a (negative) cpu ratio."""
    noisy = _cpu_row("phalanx", cpu_s)
    good = _cpu_row("gloo", 0.8)
    assert noisy["cpu_s_per_op"] is None
    assert good["cpu_s_per_op"] == pytest.approx(0.2)
    assert json.loads(json.dumps(noisy))["cpu_s_per_op"] is None
    assert allreduce._ratio_row(good, noisy)["cpu_ratio"] is None
    assert allreduce._ratio_row(noisy, good)["cpu_ratio"] is None
    assert allreduce._ratio_row(good, good)["cpu_ratio"] == pytest.approx(1.0)


def test_a_background_burst_in_the_no_op_window_gives_no_negative_cpu() -> None:
    """A burst of background CPU while the block's no-op calibration runs makes the
    difference negative: the row reports null, not a negative CPU per op."""
    bufs = _bufs()
    clock = _FakeCpu()
    backend = _FakeBackend(bufs, clock)
    burst = {"left": 1}

    def barrier() -> None:
        clock.now += BARRIER_CPU
        if burst["left"]:  # the first barrier is the calibration's
            burst["left"] = 0
            clock.now += 1000.0

    backend.barrier = barrier  # type: ignore[method-assign]
    res = _run_block(backend, bufs, 3, clock)  # type: ignore[arg-type]
    assert res.cpu_s < 0
    s = _Series("phalanx", "none", 1)
    s.add([res, res], timed=True)
    row = allreduce._row(s, _args(), 4096)
    assert row["cpu_s_per_op"] is None


def test_the_cpu_tail_outlasts_the_daemons_observer_batching() -> None:
    from phalanx import daemon

    assert allreduce._CPU_TAIL_S >= 1.5 * daemon._OBSERVE_BATCH_S


# -- finding 8: turn order and the op after the idle gap ---------------------------------


def test_each_block_starts_with_an_untimed_op() -> None:
    bufs = _bufs()
    clock = _FakeCpu()
    backend = _FakeBackend(bufs, clock)
    res = _run_block(backend, bufs, 3, clock)  # type: ignore[arg-type]
    assert backend.calls == 4  # the first op after the gap is not timed
    assert len(res.starts) == len(res.ends) == len(res.wire_bytes) == 3
    assert len(res.digests) == 4  # ... but its result is checked like the others
    assert res.ops == 3 and res.ok  # the CPU figure covers the timed ops only


def test_block_order_rotates_every_round() -> None:
    from phalanx.bench.allreduce import _block_order

    assert [_block_order(3, i) for i in range(4)] == [
        [0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2],
    ]  # fmt: skip
    assert _block_order(2, 1) == [1, 0]
    assert _block_order(1, 5) == [0]


# -- finding 3: the device path's sentinel ------------------------------------------------


class _FakeBucket:
    """DeviceBucket on CPU tensors; ``broken``: stage_out copies nothing out."""

    def __init__(self, torch: Any, host: Any, broken: bool) -> None:
        self.flat = torch.zeros_like(host)
        self.host = host
        self.broken = broken

    def stage_out(self) -> Any:
        if not self.broken:
            self.host.copy_(self.flat)
        return self.host

    def stage_in(self) -> None:
        self.flat.copy_(self.host)


class _SumPg:
    """World 2, rank 0 (input pattern + 1): the sum is (x - 1) * 2 + 3, elementwise."""

    def all_reduce(self, host: Any, op: str, codec: str) -> Any:
        a = host.numpy()
        a[:] = (a - 1) * 2 + 3
        return SimpleNamespace(algorithm="ring")

    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("broken", [False, True])
def test_cuda_path_catches_a_device_to_host_copy_that_never_happened(
    broken: bool, dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    bufs = _Buffers(0, 2, _Prepare(4096, dtype, "none"))
    backend: Any = object.__new__(allreduce._CudaDaemonBackend)
    backend._torch = SimpleNamespace(cuda=SimpleNamespace(synchronize=lambda: None))
    backend._buf = bufs.buf
    backend._host = torch.from_numpy(bufs.buf)
    backend._bucket = _FakeBucket(torch, backend._host, broken)
    backend._pg = _SumPg()
    backend.helper_pids = ()
    res = _run_block(backend, bufs, 2, CpuClock())
    assert res.ok is (not broken)


def test_poison_is_never_a_correct_sum() -> None:
    for dtype in ("float32", "float64", "float16", "int32", "int64"):
        bufs = _Buffers(0, 2, _Prepare(64, dtype, "none"))
        allreduce._poison(bufs.buf)
        assert not bufs.check()[0], dtype


# -- finding 11: non-finite errors ---------------------------------------------------------


def test_a_nan_result_is_an_error_max_does_not_swallow() -> None:
    bufs = _bufs("int8")
    clock = _FakeCpu()
    res = _run_block(_FakeBackend(bufs, clock, result=math.nan), bufs, 2, clock)  # type: ignore[arg-type]
    assert not res.ok
    assert math.isnan(res.max_rel_err)


@pytest.mark.parametrize(("bad", "name"), [(math.nan, "nan"), (math.inf, "inf")])
def test_a_non_finite_error_is_recorded_and_the_row_printed(bad: float, name: str) -> None:
    fine = _BlockResult(starts=[1.0], ends=[1.1], ops=2, digests=["a", "a"], wire_bytes=[1])
    wrong = _BlockResult(starts=[1.0], ends=[1.1], ops=2, digests=["a", "a"], wire_bytes=[1],
                         ok=False, max_rel_err=bad)  # fmt: skip
    for order in ([fine, wrong], [wrong, fine]):
        s = _Series("phalanx", "int8", 1)
        s.add(order, timed=True)
        row = allreduce._row(s, _args(), 4096)
        assert row["max_rel_err"] is None
        assert row["max_rel_err_nonfinite"] == name
        assert row["correct"] is False
        out = io.StringIO()
        print_json(row, out)
        assert json.loads(out.getvalue())["max_rel_err_nonfinite"] == name


def test_print_json_keeps_a_row_with_infinities() -> None:
    out = io.StringIO()
    print_json({"algbw_Bps": math.inf, "x": np.float64("nan"), "n": [1.0, -math.inf]}, out)
    assert json.loads(out.getvalue()) == {"algbw_Bps": "inf", "x": "nan", "n": [1.0, "-inf"]}


# -- finding 4: --no-preserve-input ----------------------------------------------------------


def test_no_preserve_input_through_the_daemon_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def must_not_run(*a: Any) -> int:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(allreduce, "run", must_not_run)
    parser = argparse.ArgumentParser(prog="phalanx bench allreduce")
    check_and_run = allreduce.register(parser)
    args = parser.parse_args(["--via", "daemon", "--no-preserve-input"])
    with pytest.raises(SystemExit) as exc:
        check_and_run(args)
    assert exc.value.code == 2
    assert "--no-preserve-input" in capsys.readouterr().err


def test_rows_say_whether_the_input_was_preserved() -> None:
    args = _args(no_preserve_input=True)
    label = {impl: allreduce._row(_series(impl), args, 4096)["preserve_input"]
             for impl in ("phalanx", "phalanx-daemon", "phalanx-daemon-cuda", "gloo")}  # fmt: skip
    assert label == {"phalanx": False, "phalanx-daemon": True, "phalanx-daemon-cuda": True,
                     "gloo": None}  # fmt: skip


def _series(impl: str) -> _Series:
    s = _Series(impl, "none", 1)
    r = _BlockResult(starts=[1.0], ends=[1.1], ops=2, digests=["a", "a"], wire_bytes=[None])
    s.add([r, r], timed=True)
    return s


# -- finding 10: the exchanges' deadline is --timeout ------------------------------------------


class _Stop(Exception):
    pass


class _Ctx:
    def __init__(self, rank: int, world: int, stop: bool = False) -> None:
        self.rank = rank
        self.world = world
        self.stop = stop
        self.timeouts: list[float] = []

    def exchange(self, obj: Any, timeout: float = 120.0) -> list[Any]:
        self.timeouts.append(timeout)
        if self.stop:
            raise _Stop
        return [obj] * self.world


def _spec(**kw: Any) -> _Spec:
    return _Spec("phalanx", os.urandom(32), 1, 7.5, "WARNING", **kw)


def test_phalanx_rank_exchange_uses_the_timeout() -> None:
    ctx = _Ctx(0, 1)
    backend = allreduce._PhalanxBackend(ctx, _spec())  # type: ignore[arg-type]
    backend.close()
    assert ctx.timeouts == [7.5]


def test_daemon_rank_exchange_uses_the_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    class FakeProc:
        pid = os.getpid()

        def __init__(self, *a: Any, **kw: Any) -> None:
            pass

        def poll(self) -> None:
            return None

        def terminate(self) -> None:
            pass

        def wait(self, timeout: float | None = None) -> int:
            return 0

    class FakePg:
        def view(self) -> Any:
            return SimpleNamespace(world=1)

        def close(self) -> None:
            pass

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(phalanx, "connect", lambda *a, **kw: FakePg())
    ctx = _Ctx(0, 1)
    spec = _spec(coordinator="127.0.0.1:1", workdir=str(tmp_path))
    backend = allreduce._DaemonBackend(ctx, spec)  # type: ignore[arg-type]
    backend.close()
    assert ctx.timeouts == [7.5]


def test_gloo_rank_exchange_uses_the_timeout() -> None:
    pytest.importorskip("torch")
    from phalanx.bench.gloo import GlooBackend

    ctx = _Ctx(1, 2, stop=True)  # rank 1 asks for the store's port before anything else
    with pytest.raises(_Stop):
        GlooBackend(ctx, timeout_s=7.5)  # type: ignore[arg-type]
    assert ctx.timeouts == [7.5]


@pytest.mark.parametrize("asked", [0, 256 << 10])
def test_the_daemons_run_with_the_zero_copy_setting_the_rows_name(asked: int) -> None:
    """``--zero-copy-min-bytes`` reaches each rank's daemon through its environment,
    replacing one the user exported (the rows are labelled with the flag's value, so
    an inherited setting would make them lie), and the daemon's config takes it."""
    from phalanx.config import load_config

    spec = _Spec("phalanx-daemon", b"s" * 32, 2, 10.0, "WARNING", zero_copy_min_bytes=asked)
    inherited = {"PHALANX_COMM_ZERO_COPY_MIN_BYTES": "65536", "PATH": "/bin"}
    env = allreduce._daemon_env(spec, inherited)
    assert env["PATH"] == "/bin" and inherited["PHALANX_COMM_ZERO_COPY_MIN_BYTES"] == "65536"
    comm = load_config(env={k: v for k, v in env.items() if k.startswith("PHALANX_")}).comm
    assert comm.zero_copy_min_bytes == asked and comm.streams == 2


def test_zero_copy_flag_takes_zero_and_sizes() -> None:
    assert allreduce._size_or_zero("0") == 0
    assert allreduce._size_or_zero("256KiB") == 256 << 10
    with pytest.raises(argparse.ArgumentTypeError):
        allreduce._size_or_zero("-1")

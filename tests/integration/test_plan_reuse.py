"""Small all-reduces run a plan built once and rearmed (collectives.build_all_reduce):
every result is still exact and lands in the array of *this* call, a failed or
mismatched op never hands its plan on, and ops in flight together never share one."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group
from phalanx.comm.engine import Engine
from phalanx.comm.reduce import reference
from phalanx.deadline import Deadline
from phalanx.errors import OpMismatch, PeerFailure
from tests.integration._pairs import on_both, ranks


def _count_builds(groups: list[Group], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many plans each rank's engine built from scratch (Engine.plan calls)."""
    built = [0] * len(groups)
    real = Engine.plan

    def counting(self: Engine, *args: Any, **kwargs: Any) -> Any:
        built[self.rank] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "plan", counting)
    return built


@pytest.fixture
def two() -> Iterator[list[Group]]:
    groups = ranks(2, CommOptions(timeout_s=5.0))
    yield groups
    for g in groups:
        g.close()


def test_one_plan_serves_a_loop_and_every_result_is_this_calls(
    two: list[Group], monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _count_builds(two, monkeypatch)
    n = 1024

    def loop(rank: int) -> None:
        a, b = np.empty(n, np.float32), np.empty(n, np.float32)
        for i in range(60):
            x, other = (a, b) if i % 2 == 0 else (b, a)
            other[:] = -7.0  # the array of the previous call: must stay as it is
            x[:] = np.arange(n, dtype=np.float32) * (rank + 1) + i
            two[rank].all_reduce(x)
            # sum over ranks of arange*(r+1) + i: arange*3 + 2i, exact in float32
            expected = np.arange(n, dtype=np.float32) * 3 + 2 * i
            assert np.array_equal(x, expected), (rank, i)
            assert np.all(other == -7.0), (rank, i)

    on_both(loop)
    # without reuse every op builds its own plan: 60 here
    assert all(b <= 3 for b in built), built


@pytest.mark.parametrize("world", [3, 4])
def test_fold_and_unfold_steps_reused_stay_exact(world: int) -> None:
    groups = ranks(world, CommOptions(timeout_s=5.0))
    try:
        errors: list[BaseException] = []

        def loop(rank: int) -> None:
            try:
                x = np.empty(300, np.float64)
                for i in range(25):
                    x[:] = rank * 10.0 + i
                    for op in ("sum", "max"):
                        y = x.copy()
                        groups[rank].all_reduce(y, op=op)
                        want = (
                            sum(r * 10.0 + i for r in range(world))
                            if op == "sum"
                            else ((world - 1) * 10.0 + i)
                        )
                        assert np.all(y == want), (rank, i, op, y[:3])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        # one plan per (shape, op) is kept and came back after every op
        for g in groups:
            assert len(g.engine.reusable) == 2, g.engine.reusable.keys()
    finally:
        for g in groups:
            g.close()


def _warm(groups: list[Group], n: int) -> None:
    """A few all-reduces of ``n`` floats on both ranks: a plan of that shape is kept."""

    def run(rank: int) -> None:
        for _ in range(5):
            groups[rank].all_reduce(np.ones(n, np.float32))

    on_both(run)


def test_a_mismatch_hands_no_plan_on_and_the_next_op_is_exact(two: list[Group]) -> None:
    _warm(two, 256)
    key = next(iter(two[0].engine.reusable))

    def disagree(rank: int) -> None:
        x = np.full(256 + rank, 3.0, np.float32)  # rank 1 calls one element longer
        with pytest.raises(OpMismatch):
            two[rank].all_reduce(x)
        assert np.all(x == 3.0)  # promise 2: the input as it was

    on_both(disagree)
    # rank 0's kept plan ran the failed op: it was not put back
    assert key not in two[0].engine.reusable

    def again(rank: int) -> None:
        x = np.full(256, rank + 1.0, np.float32)
        two[rank].all_reduce(x)
        assert np.all(x == 3.0)

    on_both(again)


def test_a_reused_plan_that_fails_leaves_the_input_and_is_dropped(two: list[Group]) -> None:
    _warm(two, 512)
    key = next(iter(two[0].engine.reusable))
    x = np.full(512, 5.0, np.float32)
    with pytest.raises(PeerFailure) as info:  # rank 1 never calls: the deadline ends it
        two[0].all_reduce(x, deadline=Deadline.after(0.5))
    assert info.value.reason == "aborted"
    assert np.all(x == 5.0)
    assert key not in two[0].engine.reusable


def test_async_ops_of_one_shape_in_flight_together_each_get_their_own(
    two: list[Group],
) -> None:
    def run(rank: int) -> None:
        for i in range(10):
            xs = [np.full(128, (rank + 1) * (k + 1) + i, np.float32) for k in range(4)]
            handles = [two[rank].all_reduce(x, async_op=True) for x in xs]
            for h in handles:
                h.wait()
            for k, x in enumerate(xs):
                assert np.all(x == 3 * (k + 1) + 2 * i), (rank, i, k, x[:2])

    on_both(run)


def test_a_kept_plan_does_not_keep_the_callers_array_alive(two: list[Group]) -> None:
    # in the daemon the array is a view of a client's shared region: a kept plan
    # naming it would keep the region mapped after the client unmapped it
    refs: list[weakref.ref[np.ndarray] | None] = [None, None]

    def run(rank: int) -> None:
        for _ in range(3):
            x = np.ones(64, np.float32)
            two[rank].all_reduce(x)
        refs[rank] = weakref.ref(x)

    on_both(run)
    gc.collect()
    assert all(len(g.engine.reusable) == 1 for g in two)
    assert all(r is not None and r() is None for r in refs)


def test_a_plan_kept_by_an_op_that_ended_inline_is_not_anothers_before_submit_returns(
    two: list[Group], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op that ends on its caller's thread (inside submit) must not put its plan
    back before submit is done with it: a second thread of the process taking and
    rearming it there would swap in a future of its own, and the first caller would
    wait on an op that never runs. The hook plays that second thread at the worst
    moment: right after the engine ended the op."""
    real = Engine._finish
    stolen = [0]

    def finish_then_steal(self: Engine) -> None:
        real(self)
        if self.rank == 0:
            for key in list(self.reusable):
                plan = self.reusable.pop(key, None)
                if plan is not None:
                    plan.rearm()  # what build_all_reduce does for another caller
                    stolen[0] += 1

    monkeypatch.setattr(Engine, "_finish", finish_then_steal)

    def loop(rank: int) -> None:
        seqs = []
        for i in range(40):
            x = np.full(256, rank + 1.0 + i, np.float32)
            res = two[rank].all_reduce(x, deadline=Deadline.after(10.0))
            assert np.all(x == 3.0 + 2 * i), (rank, i)
            seqs.append(res.seq)
        assert seqs == list(range(seqs[0], seqs[0] + 40)), seqs  # each call its own result

    on_both(loop, timeout_s=60.0)
    assert two[0].engine.inline_starts > 0 and stolen[0] > 0


def test_the_plan_unused_longest_makes_room_for_a_new_shape(two: list[Group]) -> None:
    from phalanx.comm.engine import _REUSABLE_PLANS

    sizes = [64 + 8 * i for i in range(_REUSABLE_PLANS)]

    def run(n: int, rank: int) -> None:
        x = np.full(n, rank + 1.0, np.float32)
        two[rank].all_reduce(x)
        assert np.all(x == 3.0)

    for n in sizes:
        on_both(partial(run, n))
    on_both(partial(run, sizes[0]))  # the oldest is used again: now newest
    on_both(partial(run, 1000))  # one shape more than there is room for
    for g in two:
        kept = [key[0] for key in g.engine.reusable]  # type: ignore[index]
        assert len(kept) == _REUSABLE_PLANS
        assert kept[-1] == 1000 and sizes[0] in kept and sizes[1] not in kept, kept


@pytest.mark.parametrize("dtype", ["float32", "int64"])
@pytest.mark.parametrize("op", ["sum", "avg", "min", "max", "prod"])
def test_every_reduce_op_on_a_reused_plan_matches_numpy(
    two: list[Group], op: str, dtype: str
) -> None:
    rng = np.random.default_rng(7)
    inputs = [[rng.integers(-9, 9, 200).astype(dtype) for _ in range(6)] for _ in range(2)]

    def run(rank: int) -> None:
        for i in range(6):
            x = inputs[rank][i].copy()
            two[rank].all_reduce(x, op=op)
            want = reference([inputs[0][i], inputs[1][i]], op)  # type: ignore[arg-type]
            assert np.array_equal(x, want), (rank, i, op, x[:4], want[:4])

    on_both(run)
    assert all(len(g.engine.reusable) == 1 for g in two)

"""Small all-reduces run a plan built once and rearmed (collectives.build_all_reduce):
every result is still exact and lands in the array of *this* call, a failed or
mismatched op never hands its plan on, and ops in flight together never share one."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group
from phalanx.comm.engine import Engine
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


def test_a_mismatch_hands_no_plan_on_and_the_next_op_is_exact(two: list[Group]) -> None:
    def warm(rank: int) -> None:
        for _ in range(5):
            two[rank].all_reduce(np.ones(256, np.float32))

    on_both(warm)
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
    def warm(rank: int) -> None:
        for _ in range(5):
            two[rank].all_reduce(np.ones(512, np.float32))

    on_both(warm)
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

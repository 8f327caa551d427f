"""Collective schedules, proved by simulation with symbolic values.

A chunk's value is ``(start, stop, contributors)``: the element range it covers and the
sorted ranks whose contribution it holds, so "every contribution exactly once" and "the
right chunk" are both checked, and nothing here hard-codes a schedule's output.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phalanx.comm.schedules import (
    Combine,
    ScheduleError,
    Simulation,
    Step,
    binomial_broadcast,
    chain_broadcast,
    dissemination_barrier,
    partition,
    recursive_doubling,
    ring_all_gather,
    ring_reduce_scatter,
    simulate,
    split,
)
from phalanx.errors import ConfigError

WORLDS = [*range(1, 10), 13, 16]
Chunk = tuple[int, int, tuple[int, ...]]


def counts_for(world: int) -> list[int]:
    return sorted({0, 1, world - 1, world, world + 1, 1000, 1003})


def merge(a: Chunk, b: Chunk) -> Chunk:
    if a[:2] != b[:2]:
        raise AssertionError(f"reduced chunk {b[:2]} into chunk {a[:2]}")
    return (a[0], a[1], tuple(sorted(a[2] + b[2])))


def contributions(world: int, count: int, parts: int) -> list[list[Chunk]]:
    ranges = partition(count, parts)
    return [[(lo, hi, (r,)) for lo, hi in ranges] for r in range(world)]


def run(
    make: Callable[[int, int], list[Step]], world: int, initial: Sequence[Sequence[Chunk]]
) -> Simulation[Chunk]:
    return simulate([make(r, world) for r in range(world)], initial, merge)


def check_fifo(sim: Simulation[Chunk], schedules: Sequence[Sequence[Step]]) -> None:
    """Every send and every receive appears in exactly one message, and per (src, dst)
    messages pair the k-th send with the k-th receive."""
    sends: dict[tuple[int, int], list[tuple[int, int | None]]] = {}
    recvs: dict[tuple[int, int], list[tuple[int, int | None]]] = {}
    for r, steps in enumerate(schedules):
        for i, s in enumerate(steps):
            if s.send_to is not None:
                sends.setdefault((r, s.send_to), []).append((i, s.send_chunk))
            if s.recv_from is not None:
                recvs.setdefault((s.recv_from, r), []).append((i, s.recv_chunk))
    seen: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for m in sim.messages:
        seen.setdefault((m.src, m.dst), []).append((m.src_step, m.dst_step))
    assert sends.keys() == recvs.keys() == seen.keys()
    for pair, sent in sends.items():
        got = recvs[pair]
        assert [c for _, c in sent] == [c for _, c in got]
        assert seen[pair] == [(a, b) for (a, _), (b, _) in zip(sent, got, strict=True)]


# --------------------------------------------------------------------------- chunking


@given(st.integers(0, 5000), st.integers(1, 64))
def test_partition_covers_in_order_and_balanced(count: int, parts: int) -> None:
    ranges = partition(count, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    for (_, a_stop), (b_start, _) in itertools.pairwise(ranges):
        assert a_stop == b_start
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the bigger ones come first
    assert sum(sizes) == count


@pytest.mark.parametrize("world", WORLDS)
def test_partition_fixed_counts(world: int) -> None:
    for count in counts_for(world):
        ranges = partition(count, world)
        elems = [i for lo, hi in ranges for i in range(lo, hi)]
        assert elems == list(range(count))
        big = [hi - lo for lo, hi in ranges].count(count // world + 1)
        assert big == count % world


@given(st.integers(0, 10_000), st.integers(0, 3000), st.integers(1, 700))
def test_split_pieces(start: int, length: int, max_len: int) -> None:
    stop = start + length
    pieces = split(start, stop, max_len)
    if length == 0:
        assert pieces == [(start, start)]
        return
    assert pieces[0][0] == start and pieces[-1][1] == stop
    for (_, a_stop), (b_start, _) in itertools.pairwise(pieces):
        assert a_stop == b_start
    assert all(0 < hi - lo <= max_len for lo, hi in pieces)
    assert len(pieces) == math.ceil(length / max_len)


@pytest.mark.parametrize(
    ("call", "args"),
    [
        (partition, (-1, 2)),
        (partition, (5, 0)),
        (split, (5, 4, 2)),
        (split, (-1, 4, 2)),
        (split, (0, 4, 0)),
    ],
)
def test_chunking_rejects_bad_arguments(call: Callable[..., object], args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        call(*args)


# --------------------------------------------------------------------------- ring


@pytest.mark.parametrize("world", WORLDS)
def test_ring_reduce_scatter_then_all_gather(world: int) -> None:
    rs = [ring_reduce_scatter(r, world) for r in range(world)]
    ag = [ring_all_gather(r, world) for r in range(world)]
    assert all(len(s) == world - 1 for s in rs + ag)
    everyone = tuple(range(world))
    for count in counts_for(world):
        ranges = partition(count, world)
        sim = simulate(rs, contributions(world, count, world), merge)
        check_fifo(sim, rs)
        assert sim.rounds == world - 1
        for r in range(world):
            assert sim.values[r][r] == (*ranges[r], everyone)
        # all-gather starts from each rank's own reduced chunk only
        owned = [[sim.values[r][c] if c == r else (*ranges[c], ()) for c in range(world)]
                 for r in range(world)]  # fmt: skip
        sim2 = simulate(ag, owned, merge)
        check_fifo(sim2, ag)
        assert sim2.rounds == world - 1
        for r in range(world):
            assert list(sim2.values[r]) == [(lo, hi, everyone) for lo, hi in ranges]


# --------------------------------------------------------------------------- recursive doubling


@pytest.mark.parametrize("world", range(1, 17))
def test_recursive_doubling_all_reduce(world: int) -> None:
    scheds = [recursive_doubling(r, world) for r in range(world)]
    for parts in (1, 3):
        sim = simulate(scheds, contributions(world, 1003, parts), merge)
        check_fifo(sim, scheds)
        for r in range(world):
            assert [c[2] for c in sim.values[r]] == [tuple(range(world))] * parts
    p = 2 ** math.floor(math.log2(world))
    expected = int(math.log2(p)) + (2 if world != p else 0)
    assert sim.rounds == expected
    assert all(m.chunk is None for m in sim.messages)


# --------------------------------------------------------------------------- broadcast


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("make", [binomial_broadcast, chain_broadcast])
def test_broadcast_every_root(world: int, make: Callable[[int, int, int], list[Step]]) -> None:
    for root in range(world):
        scheds = [make(r, world, root) for r in range(world)]
        initial = contributions(world, 1000, 2)
        sim = simulate(scheds, initial, merge)
        check_fifo(sim, scheds)
        assert all(list(v) == initial[root] for v in sim.values)
        assert len(sim.messages) == world - 1  # each non-root receives exactly once
        assert Counter(m.dst for m in sim.messages) == Counter(set(range(world)) - {root})
        if make is binomial_broadcast:
            assert sim.rounds == math.ceil(math.log2(world))
        else:
            assert sim.rounds == world - 1
            assert all(len(s) <= 2 for s in scheds)


def test_chain_is_recv_then_send() -> None:
    steps = chain_broadcast(2, 5, 1)
    assert [(s.recv_from, s.send_to) for s in steps] == [(1, None), (None, 3)]


# --------------------------------------------------------------------------- barrier


@pytest.mark.parametrize("world", WORLDS)
def test_dissemination_barrier(world: int) -> None:
    scheds = [dissemination_barrier(r, world) for r in range(world)]
    assert all(len(s) == math.ceil(math.log2(world)) for s in scheds)
    sim: Simulation[None] = simulate(scheds, [[] for _ in range(world)])
    assert all(h == frozenset(range(world)) for h in sim.heard)
    assert sim.rounds == math.ceil(math.log2(world))
    assert all(not s.carries_data and s.send_chunk is None for ss in scheds for s in ss)


def test_barrier_minus_a_round_is_not_a_barrier() -> None:
    scheds = [dissemination_barrier(r, 5)[:-1] for r in range(5)]
    sim: Simulation[None] = simulate(scheds, [[] for _ in range(5)])
    assert any(h != frozenset(range(5)) for h in sim.heard)


# --------------------------------------------------------------------------- the simulator catches


def test_simulator_catches_wrong_chunk() -> None:
    scheds = [ring_reduce_scatter(r, 4) for r in range(4)]
    s = scheds[2][1]
    scheds[2][1] = Step(
        s.send_to, s.send_chunk, s.recv_from, ((s.recv_chunk or 0) + 1) % 4, "reduce"
    )
    with pytest.raises(ScheduleError) as err:
        simulate(scheds, contributions(4, 10, 4), merge)
    assert err.value.reason == "mismatch"


def test_simulator_catches_fifo_order_swap() -> None:
    # rank 0 sends chunks 0 then 1 to rank 1, which expects them the other way round
    scheds = [
        [Step(1, 0, None, None, "copy"), Step(1, 1, None, None, "copy")],
        [Step(None, None, 0, 1, "copy"), Step(None, None, 0, 0, "copy")],
    ]
    with pytest.raises(ScheduleError) as err:
        simulate(scheds, contributions(2, 4, 2), merge)
    assert err.value.reason == "mismatch"


def test_simulator_catches_deadlock() -> None:
    # both ranks receive first: nobody ever sends
    scheds = [
        [Step(None, None, 1, None, "copy"), Step(1, None, None, None, "copy")],
        [Step(None, None, 0, None, "copy"), Step(0, None, None, None, "copy")],
    ]
    with pytest.raises(ScheduleError) as err:
        simulate(scheds, contributions(2, 4, 1), merge)
    assert err.value.reason == "deadlock"


def test_simulator_catches_unreceived_send() -> None:
    scheds = [[Step(1, None, None, None, "copy")], []]
    with pytest.raises(ScheduleError) as err:
        simulate(scheds, contributions(2, 4, 1), merge)
    assert err.value.reason == "deadlock"


def test_simulator_catches_combine_disagreement() -> None:
    scheds = [[Step(1, None, None, None, "reduce")], [Step(None, None, 0, None, "copy")]]
    with pytest.raises(ScheduleError) as err:
        simulate(scheds, contributions(2, 4, 1), merge)
    assert err.value.reason == "mismatch"


@pytest.mark.parametrize(
    ("scheds", "reason"),
    [
        ([[Step(0, None, None, None, "copy")], []], "bad-peer"),
        ([[Step(2, None, None, None, "copy")], []], "bad-peer"),
        ([[Step(1, 5, None, None, "copy")], [Step(None, None, 0, 5, "copy")]], "bad-chunk"),
    ],
)
def test_simulator_rejects_bad_schedules(scheds: list[list[Step]], reason: str) -> None:
    with pytest.raises(ScheduleError) as err:
        simulate(scheds, contributions(2, 4, 2), merge)
    assert err.value.reason == reason


def test_values_catch_a_lost_contribution() -> None:
    # a ring reduce-scatter whose first step copies instead of reducing: schedules still
    # fit together, but the result misses contributions, and the value check sees it
    scheds = [
        [Step(s.send_to, s.send_chunk, s.recv_from, s.recv_chunk, "copy") if i == 0 else s
         for i, s in enumerate(ring_reduce_scatter(r, 3))]
        for r in range(3)
    ]  # fmt: skip
    sim = simulate(scheds, contributions(3, 9, 3), merge)
    assert all(sim.values[r][r][2] != (0, 1, 2) for r in range(3))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "fields",
    [
        (None, None, None, None, "copy"),  # does nothing
        (None, 1, 2, None, "copy"),  # chunk without a peer
        (1, None, None, 2, "copy"),
        (1, 0, None, None, "none"),  # a token with a chunk
        (None, None, 1, 0, "none"),
        (-1, None, None, None, "copy"),  # negative peer / chunk
        (1, -1, None, None, "copy"),
        (1, None, None, None, "sum"),  # unknown combine
    ],
)
def test_step_rejects_inconsistent(
    fields: tuple[int | None, int | None, int | None, int | None, Combine],
) -> None:
    with pytest.raises(ValueError):
        Step(*fields)
    with pytest.raises(ConfigError):
        Step(*fields)


def test_step_accepts_consistent() -> None:
    Step(1, None, 1, None, "reduce")
    Step(None, None, 3, 2, "copy")
    Step(4, None, 5, None, "none")


@pytest.mark.parametrize(
    "make",
    [ring_reduce_scatter, ring_all_gather, recursive_doubling, dissemination_barrier],
)
@pytest.mark.parametrize(("rank", "world"), [(0, 0), (-1, 3), (3, 3), (0, -2)])
def test_schedules_reject_bad_rank_or_world(
    make: Callable[[int, int], list[Step]], rank: int, world: int
) -> None:
    with pytest.raises(ValueError):
        make(rank, world)


@pytest.mark.parametrize("make", [binomial_broadcast, chain_broadcast])
@pytest.mark.parametrize(
    ("rank", "world", "root"), [(0, 0, 0), (3, 3, 0), (0, 3, 3), (0, 3, -1), (-1, 3, 0)]
)
def test_broadcasts_reject_bad_arguments(
    make: Callable[[int, int, int], list[Step]], rank: int, world: int, root: int
) -> None:
    with pytest.raises(ValueError):
        make(rank, world, root)

"""Shard placement: deterministic, distinct holders, owner kept off while possible, zones
filled evenly, minimal change when a peer leaves, and repair that moves only lost shards.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.checkpoint.placement import (
    Peer,
    Placement,
    PlacementError,
    default_km,
    place,
    replace_lost,
)


def _peers(n: int, zones: str = "") -> list[Peer]:
    return [Peer(f"peer-{i}", zones[i % len(zones)] if zones else "") for i in range(n)]


# ---------------------------------------------------------------------------- place


def test_deterministic_and_independent_of_peer_order() -> None:
    peers = _peers(12, "abc")
    first = place("peer-3", peers, 8, 2)
    for seed in range(10):
        shuffled = peers[:]
        random.Random(seed).shuffle(shuffled)
        assert place("peer-3", shuffled, 8, 2) == first
    assert first.owner == "peer-3" and (first.k, first.m, first.n) == (8, 2, 10)


def test_holders_distinct_and_owner_excluded_when_possible() -> None:
    peers = _peers(7)
    for owner in (p.id for p in peers):
        p = place(owner, peers, 4, 2)
        assert len(set(p.holders)) == 6 and owner not in p.holders
        assert p.shard_of(owner) is None
        assert all(p.shard_of(h) == i for i, h in enumerate(p.holders))


def test_owner_holds_a_shard_only_in_a_view_of_exactly_k_plus_m() -> None:
    p = place("peer-0", _peers(6), 4, 2)
    assert sorted(p.holders) == sorted(x.id for x in _peers(6))
    with pytest.raises(PlacementError) as exc:
        place("peer-0", _peers(5), 4, 2)
    assert exc.value.reason == "too-few-peers"


def test_owner_need_not_be_live() -> None:
    p = place("gone", _peers(6), 4, 2)
    assert "gone" not in p.holders and len(p.holders) == 6


def test_different_owners_spread_their_shards() -> None:
    peers = _peers(12)
    load = Counter(h for o in peers for h in place(o.id, peers, 8, 2).holders)
    assert sum(load.values()) == 12 * 10
    assert min(load.values()) >= 6 and max(load.values()) <= 12  # mean 10


@pytest.mark.parametrize(
    ("zones", "n", "want"),
    [
        ("abc", 6, [2, 2, 2]),
        ("abc", 4, [2, 1, 1]),
        ("abcd", 3, [1, 1, 1, 0]),
        ("aaaaaab", 4, [3, 1]),  # zone b has one peer: it holds one shard, a the rest
    ],
)
def test_zones_fill_evenly(zones: str, n: int, want: list[int]) -> None:
    peers = _peers(len(zones) * 3 if len(set(zones)) > 2 else len(zones), zones)
    p = place("outsider", peers, n - 1, 1)
    zone_of = {x.id: x.zone for x in peers}
    counts = Counter(zone_of[h] for h in p.holders)
    assert sorted(counts.values(), reverse=True) == [c for c in want if c]


def test_unlabeled_peers_are_their_own_failure_domain() -> None:
    peers = [Peer("a1", "a"), Peer("a2", "a"), Peer("a3", "a"), Peer("x"), Peer("y")]
    p = place("owner", peers, 2, 1)
    assert {"x", "y"} <= set(p.holders)  # one from zone a, and both unlabeled peers


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(3, 24),
    zones=st.sampled_from(["", "ab", "abc", "aabbbc"]),
    owner=st.integers(0, 23),
    pick=st.integers(0, 10_000),
)
def test_a_peer_leaving_changes_at_most_one_holder(
    world: int, zones: str, owner: int, pick: int
) -> None:
    peers = _peers(world, zones)
    k, m = default_km(world)
    before = place(f"peer-{owner}", peers, k, m)
    leaving = peers[pick % world].id
    if leaving == before.owner:
        return
    rest = [p for p in peers if p.id != leaving]
    try:
        after = place(f"peer-{owner}", rest, k, m)
    except PlacementError:
        assert world - 1 < k + m
        return
    if before.owner in after.holders:  # view shrank to k+m: the owner had to step in
        return
    if leaving in before.holders:
        assert len(set(before.holders) - set(after.holders)) == 1
        assert len(set(after.holders) - set(before.holders)) == 1
    else:
        assert after == before


def test_default_placement_never_uses_the_owner() -> None:
    for world in range(2, 40):
        k, m = default_km(world)
        peers = _peers(world)
        for owner in peers[:3]:
            assert owner.id not in place(owner.id, peers, k, m).holders


# ---------------------------------------------------------------------------- default_km


def test_default_km_table() -> None:
    table = {1: (1, 0), 2: (1, 0), 3: (1, 1), 4: (2, 1), 5: (3, 1), 6: (3, 2), 7: (4, 2)}
    table |= {8: (5, 2), 10: (7, 2), 11: (8, 2), 100: (8, 2)}
    for world, km in table.items():
        assert default_km(world) == km, world
    for world in range(2, 300):
        k, m = default_km(world)
        assert k + m <= world - 1 and k >= 1 and m >= 0
    for bad in (0, -1, True):
        with pytest.raises(PlacementError):
            default_km(bad)


# ---------------------------------------------------------------------------- repair


def test_replace_lost_moves_only_lost_shards() -> None:
    peers = _peers(14)
    old = place("peer-0", peers, 8, 2)
    dead = {old.holders[1], old.holders[8]}
    new = replace_lost(old, [p for p in peers if p.id not in dead])
    for i, (a, b) in enumerate(zip(old.holders, new.holders, strict=True)):
        if a in dead:
            assert b not in dead and b not in old.holders and b != "peer-0"
        else:
            assert a == b, i
    assert new.shards_on(set(new.holders) - set(old.holders)) == (1, 8)
    assert replace_lost(old, [p for p in peers if p.id not in dead]) == new  # deterministic


def test_replace_lost_named_corrupt_holder_and_noop() -> None:
    peers = _peers(8)
    old = place("peer-0", peers, 4, 2)
    assert replace_lost(old, peers) is old
    bad = old.holders[5]
    new = replace_lost(old, peers, lost=[bad])
    assert new.holders[:5] == old.holders[:5] and new.holders[5] not in {bad, "peer-0"}


def test_replace_lost_prefers_the_emptiest_zone() -> None:
    peers = [Peer(f"{z}{i}", z) for z in "abc" for i in range(3)]
    old = place("owner", peers, 4, 2)  # two per zone
    zone_of = {p.id: p.zone for p in peers}
    victim = old.holders[0]
    # Each zone has one unused peer; the victim's zone is now the emptiest, so its
    # unused peer must take the shard whatever the scores of the other two say.
    new = replace_lost(old, [p for p in peers if p.id != victim])
    counts = Counter(zone_of[h] for h in new.holders)
    assert sorted(counts.values()) == [2, 2, 2]


def test_replace_lost_uses_owner_last_and_fails_when_nobody_is_left() -> None:
    peers = _peers(4)
    old = place("peer-0", peers, 2, 1)
    dead = old.holders[0]
    new = replace_lost(old, [p for p in peers if p.id != dead])
    assert new.holders[0] == "peer-0" and new.holders[1:] == old.holders[1:]
    with pytest.raises(PlacementError) as exc:
        replace_lost(old, [p for p in peers if p.id not in {dead, "peer-0"}])
    assert exc.value.reason == "too-few-peers"


# ---------------------------------------------------------------------------- validation


def test_bad_inputs() -> None:
    with pytest.raises(PlacementError):
        place("o", [Peer("a"), Peer("a"), Peer("b")], 1, 1)  # duplicate id
    with pytest.raises(PlacementError):
        place("o", _peers(4), 0, 1)
    with pytest.raises(PlacementError):
        place("", _peers(4), 1, 1)
    with pytest.raises(PlacementError):
        Peer("")
    with pytest.raises(PlacementError):
        Placement("o", 2, 1, ("a", "a", "b"))
    with pytest.raises(PlacementError):
        Placement("o", 2, 1, ("a", "b"))
    assert place("o", ["a", "b", "c"], 2, 1).n == 3  # plain ids are peers without a zone

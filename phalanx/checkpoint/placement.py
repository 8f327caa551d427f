"""Shard placement: which live peers hold the k+m shards of one owner's snapshot, and
who takes over the shards of holders that were lost.

Every daemon runs these functions on the same inputs and must get the same answer
without talking, so everything is a pure function of (owner id, peer ids, zones, k, m):
the order of the peer list does not matter, Python's ``hash()`` is never used (it is
salted per process), and ties break on peer id. Scores are rendezvous hashes
(highest random weight): when a peer leaves, only the shards it held move.

Policy (docs/erasure.md has the why):

* The owner keeps its own full copy, so it holds no shard while at least k+m other
  peers are live; only a view of exactly k+m peers puts a shard on the owner.
* With zones, holders spread evenly: each zone gets at most one more holder than any
  other zone that still has unused peers. A peer with no zone label counts as its own
  failure domain.
* :func:`place` is for a new generation; :func:`replace_lost` repairs an existing one
  and never moves a surviving shard.

This module must never do I/O, keep state between calls, or depend on wall time.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from phalanx.errors import PlacementError

__all__ = [
    "Peer",
    "Placement",
    "PlacementError",
    "default_km",
    "place",
    "replace_lost",
]

#: default_km's upper bounds: 8 data shards (1.25x memory at m=2), 2 parity shards.
MAX_DEFAULT_K = 8
MAX_DEFAULT_M = 2


@dataclass(frozen=True)
class Peer:
    """A live peer: its stable id (the membership ``Member.id``) and failure-domain label
    (``""`` when unknown)."""

    id: str
    zone: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise PlacementError("bad-input", f"peer id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.zone, str):
            raise PlacementError("bad-input", f"zone of {self.id} must be a str")

    @property
    def domain(self) -> str:
        """The failure domain: the zone, or the peer itself when it has none."""
        return "z:" + self.zone if self.zone else "p:" + self.id


@dataclass(frozen=True)
class Placement:
    """Shard ``i`` of ``owner``'s snapshot lives on ``holders[i]`` (data shards
    ``0..k-1``, then parity)."""

    owner: str
    k: int
    m: int
    holders: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_km(self.k, self.m)
        if len(self.holders) != self.k + self.m:
            raise PlacementError(
                "bad-input", f"{len(self.holders)} holders for {self.k}+{self.m} shards"
            )
        if len(set(self.holders)) != len(self.holders):
            raise PlacementError("bad-input", f"holders are not distinct: {self.holders}")

    @property
    def n(self) -> int:
        return self.k + self.m

    def shard_of(self, peer_id: str) -> int | None:
        """The shard index ``peer_id`` holds, or ``None``."""
        try:
            return self.holders.index(peer_id)
        except ValueError:
            return None

    def shards_on(self, peer_ids: Iterable[str]) -> tuple[int, ...]:
        """The shard indices held by any of ``peer_ids``, in order."""
        wanted = set(peer_ids)
        return tuple(i for i, h in enumerate(self.holders) if h in wanted)


def _check_km(k: int, m: int) -> None:
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (k, m))
    if not ok or k < 1 or m < 0 or k + m > 255:
        raise PlacementError("bad-input", f"need k >= 1, m >= 0, k + m <= 255; got {k}+{m}")


def default_km(view_size: int) -> tuple[int, int]:
    """Sensible (k, m) for a view of ``view_size`` peers, owner included.

    Shards go to the ``view_size - 1`` other peers. m = 0 with one other peer (a plain
    replica), 1 with 2 to 4 others, 2 from 5 others on; k takes the remaining peers, up
    to 8. A view of one peer gets (1, 0): nothing can be kept off the owner.

    ===========  ======  =================================================
    view size    (k, m)  survives (besides the owner's own copy)
    ===========  ======  =================================================
    1            1+0     nothing (the only shard is on the owner)
    2            1+0     owner or its one replica holder
    3            1+1     owner and one more peer (two full replicas)
    4, 5         2+1, 3+1  owner and one more peer
    6 ... 10     3+2 ... 7+2  owner and two more peers
    >= 11        8+2     owner and two more peers, 1.25x memory
    ===========  ======  =================================================
    """
    if not isinstance(view_size, int) or isinstance(view_size, bool) or view_size < 1:
        raise PlacementError("bad-input", f"view_size must be an int >= 1, got {view_size!r}")
    others = view_size - 1
    if others <= 1:
        return 1, 0
    m = 1 if others < 5 else MAX_DEFAULT_M
    return min(others - m, MAX_DEFAULT_K), m


def _score(owner: str, peer: str, slot: int = -1) -> int:
    """A stable 64-bit rendezvous weight of ``peer`` for ``owner`` (and a shard slot)."""
    h = hashlib.blake2b(digest_size=8, person=b"phalanx-place")
    for part in (owner.encode(), peer.encode(), str(slot).encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return int.from_bytes(h.digest(), "little")


def _normalize(peers: Sequence[Peer | str]) -> dict[str, Peer]:
    out: dict[str, Peer] = {}
    for p in peers:
        peer = Peer(p) if isinstance(p, str) else p
        if not isinstance(peer, Peer):
            raise PlacementError("bad-input", f"peers must be Peer or str, got {type(p).__name__}")
        if peer.id in out:
            raise PlacementError("bad-input", f"peer id {peer.id!r} appears twice")
        out[peer.id] = peer
    return out


def _eligible(owner: str, live: dict[str, Peer], exclude: Collection[str], need: int) -> list[Peer]:
    """Candidates for ``need`` shards: everyone not excluded, the owner only if needed."""
    pool = [p for pid, p in live.items() if pid not in exclude]
    others = [p for p in pool if p.id != owner]
    chosen = others if len(others) >= need else pool
    if len(chosen) < need:
        raise PlacementError(
            "too-few-peers", f"{need} shard holders needed, {len(chosen)} peers available"
        )
    return chosen


def place(owner: str, peers: Sequence[Peer | str], k: int, m: int) -> Placement:
    """Choose the k+m holders of ``owner``'s shards among the live ``peers``.

    The holder set is the top k+m peers by (rank inside its zone, rendezvous score), so
    zones fill evenly and a peer leaving changes at most one holder (none if it held
    nothing). Shard indices then go to holders by a greedy matching on per-slot scores,
    which usually leaves survivors on their slots; :func:`replace_lost` guarantees it.
    """
    _check_km(k, m)
    if not isinstance(owner, str) or not owner:
        raise PlacementError("bad-input", f"owner must be a non-empty str, got {owner!r}")
    n = k + m
    pool = _eligible(owner, _normalize(peers), (), n)
    scores = {p.id: _score(owner, p.id) for p in pool}
    by_domain: dict[str, list[Peer]] = {}
    for p in sorted(pool, key=lambda p: (-scores[p.id], p.id)):
        by_domain.setdefault(p.domain, []).append(p)
    rank = {p.id: r for members in by_domain.values() for r, p in enumerate(members)}
    chosen = sorted(pool, key=lambda p: (rank[p.id], -scores[p.id], p.id))[:n]
    pairs = sorted(
        ((_score(owner, p.id, slot), slot, p.id) for slot in range(n) for p in chosen),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    holders: list[str | None] = [None] * n
    used: set[str] = set()
    for _, slot, pid in pairs:
        if holders[slot] is None and pid not in used:
            holders[slot] = pid
            used.add(pid)
    return Placement(owner, k, m, tuple(h for h in holders if h is not None))


def replace_lost(
    old: Placement, peers: Sequence[Peer | str], lost: Collection[str] = ()
) -> Placement:
    """New holders for just the lost shards of ``old``; every other shard stays put.

    A holder is lost when it is missing from ``peers`` or named in ``lost`` (e.g. it
    restarted, or its shard failed its checksum); lost peers get nothing back. Each lost
    slot, in index order, goes to the candidate in the zone with the fewest holders,
    then by rendezvous score. The owner is used only when nobody else is left.
    """
    live = _normalize(peers)
    gone = {h for h in old.holders if h not in live} | set(lost)
    slots = [i for i, h in enumerate(old.holders) if h in gone]
    if not slots:
        return old
    survivors = [h for h in old.holders if h not in gone]
    pool = _eligible(old.owner, live, set(survivors) | gone, len(slots))
    per_domain = Counter(live[h].domain for h in survivors)
    holders = list(old.holders)
    for slot in slots:
        best = min(
            pool,
            key=lambda p: (per_domain[p.domain], -_score(old.owner, p.id, slot), p.id),
        )
        holders[slot] = best.id
        per_domain[best.domain] += 1
        pool.remove(best)
    return Placement(old.owner, old.k, old.m, tuple(holders))

"""SnapshotService over the in-process hub: seal, restore, every loss pattern, corrupt
shards, a holder dying mid-seal, budgets, bad input, repair (holders gone or restarted),
the disk tier (and its newer steps), late puts swept."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint._nice import MAX_NICE, lower_own_priority
from phalanx.checkpoint.channel import InProcessChannel, InProcessHub
from phalanx.checkpoint.layout import LayoutError
from phalanx.checkpoint.snapshot import (
    SnapshotAbandoned,
    SnapshotConfig,
    SnapshotNotFound,
    SnapshotObserver,
    SnapshotService,
)
from phalanx.checkpoint.store import HolderUnavailable, MemoryShardStore, ShardKey
from phalanx.membership.view import Member, View

SHARD = 4096  # small pieces: many stripes even for small states


class Recorder(SnapshotObserver):
    def __init__(self) -> None:
        self.stalls: list[float] = []
        self.seals: list[str] = []
        self.under: list[int] = []
        self.held: list[int] = []

    def on_stall(self, seconds: float) -> None:
        self.stalls.append(seconds)

    def on_seal(self, seconds: float, outcome: str) -> None:
        self.seals.append(outcome)

    def on_held_bytes(self, nbytes: int) -> None:
        self.held.append(nbytes)

    def on_underprotected(self, generations: int) -> None:
        self.under.append(generations)


class Cluster:
    def __init__(self, n: int, k: int, m: int, budget: int = 1 << 30, **cfg: Any) -> None:
        self.hub = InProcessHub()
        self.ids = [f"p{i}" for i in range(n)]
        self.stores = {i: MemoryShardStore(budget) for i in self.ids}
        self.obs = {i: Recorder() for i in self.ids}
        self.cfg = SnapshotConfig(
            k=k, m=m, shard_bytes=SHARD, call_timeout_s=5, seal_timeout_s=20, **cfg
        )
        self.svcs: dict[str, SnapshotService] = {}
        for i in self.ids:
            self.hub.register(i, self.stores[i])
        for i in self.ids:
            self.svcs[i] = self.service(i)

    def service(self, member: str, channel: InProcessChannel | None = None) -> SnapshotService:
        return SnapshotService(
            member,
            channel or self.hub.channel(),
            self.stores.get(member),
            peers=self.ids,
            config=self.cfg,
            observer=self.obs.get(member),
        )

    def kill(self, *members: str) -> None:
        for m in members:
            self.hub.unregister(m)
            svc = self.svcs.pop(m, None)
            if svc is not None:
                svc.close()
        self.ids = [i for i in self.ids if i not in members]

    def view(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        for s in self.svcs.values():
            s.on_view(self.ids)

    def close(self) -> None:
        for s in self.svcs.values():
            s.close()


@pytest.fixture
def cluster6() -> Iterator[Cluster]:
    c = Cluster(6, 4, 2)
    yield c
    c.close()


def state(seed: int, n: int = 50_000) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "model": {"w": rng.random(n, np.float32), "b": rng.integers(0, 9, 77, np.int16)},
        "step": np.array(seed),
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[x], b[x]) for x in a)
    return bool(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))


def test_snapshot_seals_and_restores_locally(cluster6: Cluster) -> None:
    svc = cluster6.svcs["p0"]
    st = state(1)
    h = svc.snapshot(st, 10)
    info = h.wait(10)
    assert (info.step, info.k, info.m, len(set(info.holders))) == (10, 4, 2, 6)
    st["model"]["w"][:] = 0  # the snapshot is a copy
    step, out = svc.restore()
    assert step == 10 and same(out, state(1))
    assert svc.sealed() == info
    obs = cluster6.obs["p0"]
    assert obs.seals == ["committed"] and len(obs.stalls) == 1 and obs.held[-1] > 0


def test_every_m_of_k_plus_m_loss_pattern_restores_on_a_replacement(cluster6: Cluster) -> None:
    owner = cluster6.svcs["p0"]
    info = owner.snapshot(state(2), 3).wait(10)
    cluster6.hub.register("new", MemoryShardStore(0))
    repl = cluster6.service("new")
    try:
        patterns = [c for r in range(3) for c in itertools.combinations(info.holders, r)]
        assert len(patterns) == 1 + 6 + 15
        for lost in patterns:
            saved = {h: cluster6.stores[h] for h in lost}
            for h in lost:
                cluster6.hub.unregister(h)
            try:
                step, out = repl.restore_peer("p0")
                assert step == 3 and same(out, state(2)), lost
            finally:
                for h, st in saved.items():
                    cluster6.hub.register(h, st)
        # m + 1 losses: the data is gone, and restore says so
        for h in info.holders[:3]:
            cluster6.hub.unregister(h)
        with pytest.raises((SnapshotNotFound, SnapshotAbandoned, Exception)) as exc:
            repl.restore_peer("p0")
        assert "too-few-shards" in str(exc.value) or "not-found" in str(exc.value)
    finally:
        repl.close()


def test_corrupt_shard_counts_as_lost(cluster6: Cluster) -> None:
    owner = cluster6.svcs["p0"]
    info = owner.snapshot(state(3), 1).wait(10)
    # flip a byte in one data piece of every stripe on two holders (= m losses)
    for h in info.holders[:2]:
        st = cluster6.stores[h]
        for key in st.keys("p0"):
            if key.stripe >= 0:
                arr, _ = st._blobs[key]
                arr.setflags(write=True)
                arr[0] ^= 0xFF
    cluster6.hub.register("new", MemoryShardStore(0))
    repl = cluster6.service("new")
    try:
        step, out = repl.restore_peer("p0")
        assert step == 1 and same(out, state(3))
        # a third corrupt holder: beyond m
        st = cluster6.stores[info.holders[2]]
        for key in st.keys("p0"):
            if key.stripe >= 0:
                arr, _ = st._blobs[key]
                arr.setflags(write=True)
                arr[0] ^= 0xFF
        with pytest.raises(Exception, match="too-few-shards"):
            repl.restore_peer("p0")
    finally:
        repl.close()


class DyingChannel(InProcessChannel):
    """Kills ``victim`` (unregisters it) just before the ``after``-th put reaches it."""

    def __init__(self, hub: InProcessHub, victim: str, after: int) -> None:
        super().__init__(hub)
        self.victim, self.after, self.count = victim, after, 0
        self.lock = threading.Lock()

    def put(self, holder: str, key: ShardKey, data: Any, crc: int, *, timeout: float) -> None:
        if holder == self.victim:
            with self.lock:
                self.count += 1
                if self.count == self.after:
                    self._hub.unregister(holder)
        super().put(holder, key, data, crc, timeout=timeout)


def test_holder_killed_mid_seal_generation_never_seals_previous_restores() -> None:
    c = Cluster(7, 4, 2)
    try:
        first = c.svcs["p0"].snapshot(state(4), 1).wait(10)
        victim = first.holders[1]
        dying = DyingChannel(c.hub, victim, after=3)
        owner = c.service("p0", dying)
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        # this fresh instance has no own copy: its restore() must go to the holders
        h = owner.snapshot(state(5), 2)
        with pytest.raises(SnapshotAbandoned) as info:
            h.wait(10)
        assert info.value.reason == "unavailable" and info.value.holder == victim
        # nothing of generation 2 is left on live holders, and it is never offered
        for hid in c.ids:
            if hid != victim:
                assert all(k.generation == first.generation for k in c.stores[hid].keys("p0"))
        step, out = owner.restore()
        assert step == 1 and same(out, state(4))
        with pytest.raises(SnapshotNotFound):
            owner.restore(step=2)
    finally:
        c.close()


def test_budget_exhausted_abandons_and_keeps_the_last_sealed() -> None:
    c = Cluster(6, 4, 2, budget=200_000)
    try:
        svc = c.svcs["p0"]
        svc.snapshot(state(6, 10_000), 1).wait(10)
        h = svc.snapshot(state(7, 200_000), 2)  # 800 KB: 200 KB per piece column + parity
        with pytest.raises(SnapshotAbandoned) as info:
            h.wait(10)
        assert info.value.reason == "budget" and "budget" in str(info.value)
        assert c.obs["p0"].seals == ["committed", "abandoned"]
        step, out = svc.restore()
        assert step == 1 and same(out, state(6, 10_000))
        c.hub.register("new", MemoryShardStore(0))
        repl = c.service("new")
        try:
            assert repl.restore_peer("p0")[0] == 1
        finally:
            repl.close()
    finally:
        c.close()


def test_bad_input_is_refused_and_the_last_sealed_stays(cluster6: Cluster) -> None:
    svc = cluster6.svcs["p0"]
    svc.snapshot(state(8), 1).wait(10)
    for bad in ({"a": np.ones((8, 8))[:, ::2]}, {"a": np.array([None])}, {"a": 3}):
        with pytest.raises(LayoutError):
            svc.snapshot(bad, 2)
    with pytest.raises(LayoutError):
        svc.snapshot(state(8), -1)
    # shapes may change between generations; the change is reported
    grown = state(9)
    grown["model"]["w"] = np.ones(70_000, np.float32)
    h = svc.snapshot(grown, 3)
    assert h.changes == ("model/w",)
    h.wait(10)
    assert same(svc.restore()[1], grown)
    with pytest.raises(SnapshotNotFound):
        svc.restore(step=99)
    with pytest.raises(SnapshotNotFound):
        cluster6.svcs["p1"].restore_peer("nobody")


def _newcomer_restores(c: Cluster, owner: str) -> tuple[int, dict[str, Any]]:
    """(step, state) of ``owner`` as a member that just joined rebuilds it."""
    c.hub.register("new", MemoryShardStore(0))
    repl = c.service("new")
    try:
        return repl.restore_peer(owner)
    finally:
        repl.close()


def test_repair_brings_a_generation_back_to_full_protection() -> None:
    c = Cluster(9, 4, 2)
    try:
        owner = c.svcs["p0"]
        info = owner.snapshot(state(10), 5).wait(10)
        lost = [h for h in info.holders if h != "p0"][:2]
        c.kill(*lost)
        c.view(c.ids)
        deadline = threading.Event()
        for _ in range(200):
            if 1 in c.obs["p0"].under and c.obs["p0"].under[-1] == 0:
                break
            deadline.wait(0.05)
        assert 1 in c.obs["p0"].under and owner.underprotected == 0
        # fully protected again: m more holders of the repaired placement may die
        holders = {h for h in c.ids if c.stores[h].keys("p0")}
        more = sorted(holders - {"p0"})[:2]
        c.kill(*more)
        step, out = _newcomer_restores(c, "p0")
        assert step == 5 and same(out, state(10))
    finally:
        c.close()


def test_previous_generation_dropped_only_after_the_next_seals(cluster6: Cluster) -> None:
    svc = cluster6.svcs["p0"]
    g1 = svc.snapshot(state(11), 1).wait(10)
    g2 = svc.snapshot(state(12), 2).wait(10)
    gens = {k.generation for h in cluster6.ids for k in cluster6.stores[h].keys("p0")}
    assert gens == {g2.generation} and g1.generation < g2.generation
    assert svc.restore()[0] == 2


def test_disk_tier_survives_a_restart_of_every_service(tmp_path: Path) -> None:
    c = Cluster(6, 4, 2, snapshot_dir=str(tmp_path), disk_every=1)
    try:
        for i, sid in enumerate(c.ids):
            c.svcs[sid].snapshot(state(20 + i), 7).wait(10)
    finally:
        c.close()  # joins the disk writers
    assert (tmp_path / "p0").is_dir()
    # every process restarts: memory (own copies and every holder's shards) is gone
    c2 = Cluster(6, 4, 2, snapshot_dir=str(tmp_path))
    try:
        for i, sid in enumerate(c2.ids):
            step, out = c2.svcs[sid].restore()
            assert step == 7 and same(out, state(20 + i))
        # a torn write (tmp folder) is ignored and cleaned up
        (tmp_path / "p0" / "g99999999999999999999.tmp").mkdir()
    finally:
        c2.close()
    c3 = Cluster(6, 4, 2, snapshot_dir=str(tmp_path))
    try:
        assert not list((tmp_path / "p0").glob("*.tmp"))
        assert c3.svcs["p0"].restore()[0] == 7
    finally:
        c3.close()


def test_close_joins_threads(cluster6: Cluster) -> None:
    before = {t.name for t in threading.enumerate()}
    assert any(n.startswith("snapshot-worker") for n in before)
    cluster6.close()
    cluster6.svcs.clear()
    left = [t.name for t in threading.enumerate() if t.name.startswith("snapshot")]
    assert left == []


def test_restore_newest_takes_the_newest_step_any_member_sealed() -> None:
    """A group whose training state is gone altogether goes back to the newest step any
    member sealed: rebuilt from the holders (its owner gone too), else the next newest,
    never a generation that does not fit (``accept``)."""
    c = Cluster(5, 2, 2)
    try:
        for owner, step in (("p0", 10), ("p1", 20), ("p2", 15)):
            c.svcs[owner].snapshot(state(step), step).wait(10)
        c.kill("p1")
        c.view(c.ids)
        owner, step, got = c.svcs["p4"].restore_newest(timeout=10)
        assert (owner, step) == ("p1", 20) and same(got, state(20))
        # the newest generation's pieces rot on every holder: the next newest is taken
        for i in c.ids:
            for key in c.stores[i].keys("p1"):
                if key.stripe >= 0:
                    junk = np.full(c.stores[i].get(key)[0].size, 7, np.uint8)
                    c.stores[i].put(key, junk, crc32(junk))
        owner, step, got = c.svcs["p4"].restore_newest(timeout=10)
        assert (owner, step) == ("p2", 15) and same(got, state(15))
        # the restorer's own sealed copy counts, and accept() skips what does not fit
        c.svcs["p4"].snapshot(state(17), 17).wait(10)
        assert c.svcs["p3"].restore_newest(timeout=10)[:2] == ("p4", 17)
        assert c.svcs["p4"].restore_newest(timeout=10)[:2] == ("p4", 17)
        owner, step, _ = c.svcs["p4"].restore_newest(timeout=10, accept=lambda s, st: s < 16)
        assert (owner, step) == ("p2", 15)
        with pytest.raises(SnapshotNotFound, match="does not fit"):
            c.svcs["p4"].restore_newest(timeout=10, accept=lambda s, st: False)
    finally:
        c.close()
    empty = Cluster(3, 1, 1)
    try:
        with pytest.raises(SnapshotNotFound, match="none is held"):
            empty.svcs["p0"].restore_newest(timeout=5)
    finally:
        empty.close()


class SlowChannel(InProcessChannel):
    """Every piece put takes ``delay`` seconds (a seal of many stripes takes a while)."""

    def __init__(self, hub: InProcessHub, delay: float) -> None:
        super().__init__(hub)
        self.delay = delay

    def put(self, holder: str, key: ShardKey, data: Any, crc: int, *, timeout: float) -> None:
        if key.stripe >= 0:
            time.sleep(self.delay)
        super().put(holder, key, data, crc, timeout=timeout)


def test_close_during_a_seal_abandons_it_and_keeps_the_sealed_generation() -> None:
    """close() stopped the stripe loop without an error: the generation was committed
    with the unsent stripes' checksums missing (unreadable metadata), and the sealed
    one before it was deleted from every holder -- nothing left to restore."""
    c = Cluster(4, 2, 1, io_threads=2, inflight_stripes=1)
    try:
        owner = c.service("p0", SlowChannel(c.hub, 0.02))
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        first = owner.snapshot(state(1, n=40_000), 1).wait(30)
        pending = owner.snapshot(state(2, n=40_000), 2)
        time.sleep(0.15)  # a few of its ~20 stripes are out
        owner.close()
        with pytest.raises(SnapshotAbandoned) as info:
            pending.wait(10)
        assert info.value.reason == "closed"
        for hid in c.ids[1:]:
            assert {k.generation for k in c.stores[hid].keys("p0")} == {first.generation}
        fresh = c.service("p0")  # a replacement restores from the holders
        c.svcs["p0"] = fresh
        step, out = fresh.restore()
        assert step == 1 and same(out, state(1, n=40_000))
    finally:
        c.close()


class MissOneMarker(InProcessChannel):
    """The first seal marker put to ``victim`` fails (a transient error)."""

    def __init__(self, hub: InProcessHub) -> None:
        super().__init__(hub)
        self.victim: str | None = None
        self.fired = False

    def put(self, holder: str, key: ShardKey, data: Any, crc: int, *, timeout: float) -> None:
        if key.is_seal and holder == self.victim and not self.fired:
            self.fired = True
            raise HolderUnavailable("transient", holder=holder)
        super().put(holder, key, data, crc, timeout=timeout)


def test_a_holder_repaired_away_is_cleaned_up_with_its_generation() -> None:
    """A holder that missed one seal marker is replaced by the repair; once that
    generation is superseded, the pieces it still holds must go too (they stayed for
    ever, counted against its budget)."""
    c = Cluster(5, 2, 1)
    try:
        channel = MissOneMarker(c.hub)
        owner = c.service("p0", channel)
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        first = owner.snapshot(state(1), 1).wait(20)
        channel.victim = first.holders[0]
        second = owner.snapshot(state(2), 2).wait(20)  # the victim misses its marker
        assert channel.fired

        def holders() -> tuple[str, ...]:
            sealed = owner._sealed
            assert sealed is not None and sealed.meta is not None
            return sealed.meta.holders

        deadline = time.monotonic() + 10
        while channel.victim in holders() and time.monotonic() < deadline:
            time.sleep(0.02)  # the repair moves the victim's slot elsewhere
        assert channel.victim not in holders()
        third = owner.snapshot(state(3), 3).wait(20)
        fourth = owner.snapshot(state(4), 4).wait(20)
        time.sleep(0.3)
        for hid in c.ids:
            gens = {k.generation for k in c.stores[hid].keys("p0")}
            assert gens <= {third.generation, fourth.generation}, (hid, gens)
            assert second.generation not in gens, hid
    finally:
        c.close()


def test_pooled_buffers_follow_the_state_size_and_are_counted() -> None:
    """After the state shrank by more than half, the two big pooled buffers stayed in
    the pool for ever (never fitting again: every snapshot allocated a fresh buffer),
    the held-bytes metric did not count the pool, and every PendingSeal a caller kept
    held its generation's whole buffer."""
    c = Cluster(4, 2, 1)
    try:
        owner = c.svcs["p0"]
        big, small = {"w": np.ones(4 << 20, np.uint8)}, {"w": np.ones(256 << 10, np.uint8)}
        handles = [owner.snapshot(big, step) for step in (1, 2, 3)]
        for h in handles:
            h.wait(30)
        for step in range(4, 8):
            handles.append(owner.snapshot(small, step))
            handles[-1].wait(30)
        assert all(b.nbytes < 1 << 20 for b in owner._free), [b.nbytes for b in owner._free]
        pooled = sum(b.nbytes for b in owner._free)
        sealed = owner._sealed
        assert sealed is not None
        held = c.obs["p0"].held[-1]
        assert held == sealed.buf.nbytes + pooled + c.stores["p0"].used_bytes()
        kept = {id(h._gen.buf) for h in handles[:-1] if h._gen.buf.size}
        assert kept <= {id(b) for b in owner._free}, "a handle keeps a released buffer"
    finally:
        c.close()


def test_a_snapshot_waiting_for_the_previous_seal_keeps_its_deadline() -> None:
    """Review, stop 30: a snapshot while the previous generation still sealed waited
    up to seal_timeout_s (300 s by default) whatever its caller's deadline, and a
    CANCEL could not stop it. It gives up at the deadline, copying nothing."""
    from phalanx.deadline import Deadline

    c = Cluster(4, 2, 1, io_threads=2, inflight_stripes=1)
    try:
        owner = c.service("p0", SlowChannel(c.hub, 0.05))
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        sealing = owner.snapshot(state(1, n=40_000), 1)  # ~20 slow stripes
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="still sealing"):
            owner.snapshot(state(2, n=40_000), 2, deadline=Deadline.after(0.3))
        assert time.monotonic() - t0 < 5.0  # not the 20 s seal timeout
        dl = Deadline.after(60)
        threading.Timer(0.2, dl.cancel).start()  # a CANCEL from another thread
        with pytest.raises(TimeoutError, match="cancelled"):
            owner.snapshot(state(3, n=40_000), 3, deadline=dl)
        assert sealing.wait(30).step == 1  # the one in flight seals as before
        assert owner.snapshot(state(4, n=40_000), 4).wait(30).step == 4
    finally:
        c.close()


def members(ids: Sequence[str], epoch: int, bumped: Sequence[str] = ()) -> View:
    """A membership view of ``ids`` (incarnation 1; 2 for the ``bumped``, restarted)."""
    return View(
        epoch,
        tuple(Member(i, ("127.0.0.1:1",), 2 if i in bumped else 1) for i in ids),
    )


def test_an_older_view_handed_in_late_does_not_replace_a_newer_one() -> None:
    """Views reach the service from several threads: a daemon's start hands it the
    view its join returned (possibly an old or empty one, when the rejoin policy took
    over) while the view callback may already have handed it a newer one. The older
    one used to replace it, and placements used the stale member list until the next
    view change. A plain id list (no epoch) is always taken."""
    c = Cluster(6, 4, 2)
    try:
        owner = c.svcs["p0"]
        owner.on_view(members(c.ids, 5))
        owner.on_view(View(0, ()))  # the late, empty one
        assert [p.id for p in owner._peers] == list(c.ids)
        owner.on_view(members(c.ids[:5], 6))
        assert [p.id for p in owner._peers] == list(c.ids[:5])
        owner.on_view(list(c.ids))  # no epoch: taken
        assert [p.id for p in owner._peers] == list(c.ids)
        info = owner.snapshot(state(3), 1).wait(10)  # and the service still works
        assert set(info.holders) <= set(c.ids)
    finally:
        c.close()


def test_a_holder_restarted_under_the_same_id_is_repaired_away() -> None:
    """A holder restarted with the same member id (a new incarnation in the view, an
    empty store) still counted as holding its pieces: underprotected stayed 0 while
    only m - 1 more losses were survivable."""
    c = Cluster(9, 4, 2)
    try:
        owner, obs = c.svcs["p0"], c.obs["p0"]
        owner.on_view(members(c.ids, 1))
        info = owner.snapshot(state(13), 6).wait(10)
        restarted = info.holders[0]
        c.svcs.pop(restarted).close()
        c.stores[restarted] = MemoryShardStore(1 << 30)  # the new process: memory gone
        c.hub.register(restarted, c.stores[restarted])
        c.svcs[restarted] = c.service(restarted)
        since = len(obs.under)
        owner.on_view(members(c.ids, 2, bumped=[restarted]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = obs.under[since:]
            if 1 in seen and seen[-1] == 0:
                break
            time.sleep(0.02)
        assert 1 in obs.under[since:] and owner.underprotected == 0
        sealed = owner._sealed
        assert sealed is not None and sealed.meta is not None
        assert restarted not in sealed.meta.holders  # lost peers get nothing back
        assert not c.stores[restarted].keys("p0")
        # fully protected again: m more holders of the repaired placement may die
        c.kill(*sealed.meta.holders[:2])
        step, out = _newcomer_restores(c, "p0")
        assert step == 6 and same(out, state(13))
    finally:
        c.close()


def test_restore_takes_a_newer_step_on_disk_over_an_older_one_on_the_holders(
    tmp_path: Path,
) -> None:
    """restore() returned the holders' generation whenever one could be rebuilt, even
    when the disk tier had an intact generation of a newer step."""
    earlier = Cluster(6, 4, 2, snapshot_dir=str(tmp_path))
    try:
        earlier.svcs["p0"].snapshot(state(30), 9).wait(10)
    finally:
        earlier.close()  # joins the disk writer: step 9 is on disk
    c = Cluster(6, 4, 2)  # a later run whose holders got an older step (and generation id)
    try:
        c.svcs["p0"].snapshot(state(31), 3).wait(10)
        c.svcs["p0"].close()
        fresh = SnapshotService(
            "p0",
            c.hub.channel(),
            c.stores["p0"],
            peers=c.ids,
            config=dataclasses.replace(c.cfg, snapshot_dir=str(tmp_path)),
        )
        c.svcs["p0"] = fresh
        step, out = fresh.restore()
        assert step == 9 and same(out, state(30))
        assert fresh.restore(step=3)[0] == 3 and fresh.restore(step=9)[0] == 9
        # the newer step on disk fails its checksums: the holders' older step it is
        (data,) = tmp_path.glob("p0/g*/data.bin")
        raw = bytearray(data.read_bytes())
        raw[0] ^= 0xFF
        data.write_bytes(bytes(raw))
        step, out = fresh.restore()
        assert step == 3 and same(out, state(31))
    finally:
        c.close()


class LatePut(InProcessChannel):
    """Once ``armed``, the next piece put to ``victim`` reports a timeout at once but
    lands on the holder later, when ``release`` is set (the owner gave up on a put the
    holder still stored)."""

    def __init__(self, hub: InProcessHub, victim: str) -> None:
        super().__init__(hub)
        self.victim = victim
        self.armed = False
        self.generation = -1
        self.release = threading.Event()
        self.late: list[threading.Thread] = []
        self.lock = threading.Lock()

    def put(self, holder: str, key: ShardKey, data: Any, crc: int, *, timeout: float) -> None:
        with self.lock:
            fire = self.armed and holder == self.victim and key.stripe >= 0
            self.armed = self.armed and not fire
        if not fire:
            super().put(holder, key, data, crc, timeout=timeout)
            return
        self.generation = key.generation
        copy = np.array(data, dtype=np.uint8, copy=True)  # the owner reuses its buffers

        def land() -> None:
            self.release.wait(10)
            InProcessChannel.put(self, holder, key, copy, crc, timeout=timeout)

        self.late.append(threading.Thread(target=land))
        self.late[-1].start()
        raise HolderUnavailable("timed out", holder=holder)


def test_a_put_that_lands_after_its_generation_was_abandoned_is_swept() -> None:
    """A put the owner gave up on landed after the abandoned generation was deleted:
    its piece stayed on the holder for ever (nothing deleted that generation again)."""
    c = Cluster(6, 4, 2)
    try:
        first = c.svcs["p0"].snapshot(state(40), 1).wait(10)
        victim = next(h for h in first.holders if h != "p0")
        channel = LatePut(c.hub, victim)
        owner = c.service("p0", channel)
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        second = owner.snapshot(state(41), 2).wait(10)
        channel.armed = True
        with pytest.raises(SnapshotAbandoned):
            owner.snapshot(state(42), 3).wait(10)
        channel.release.set()
        for t in channel.late:
            t.join(10)
        orphans = [k for k in c.stores[victim].keys("p0") if k.generation == channel.generation]
        assert orphans, "the late put did not land"
        fourth = owner.snapshot(state(43), 4).wait(10)

        def generations() -> set[int]:
            return {k.generation for h in c.ids for k in c.stores[h].keys("p0")}

        deadline = time.monotonic() + 5
        while generations() != {fourth.generation} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert channel.generation not in generations()
        assert generations() == {fourth.generation}, (first, second)
    finally:
        c.close()


class ListCounter(InProcessChannel):
    """Records which holders were asked for a listing."""

    def __init__(self, hub: InProcessHub) -> None:
        super().__init__(hub)
        self.listed: list[str] = []

    def list(self, holder: str, owner: str | None = None, *, timeout: float) -> list[ShardKey]:
        self.listed.append(holder)
        return super().list(holder, owner, timeout=timeout)


def test_the_sweep_after_a_seal_lists_the_holders_not_every_member() -> None:
    """Sweeping every member of a large group costs a listing per member per seal;
    after the first (a start may find a previous process's keys anywhere) only the
    peers a seal sent to are asked."""
    c = Cluster(9, 2, 1)
    try:
        channel = ListCounter(c.hub)
        owner = c.service("p0", channel)
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        owner.snapshot(state(50), 1).wait(10)
        assert set(channel.listed) == set(c.ids)  # the first sweep asks everyone
        channel.listed.clear()
        info = owner.snapshot(state(51), 2).wait(10)
        assert set(channel.listed) <= set(info.holders) | {"p0"}
        assert len(set(info.holders) | {"p0"}) < len(c.ids)
    finally:
        c.close()


def test_the_first_sweep_asks_every_peer_of_a_view_that_came_after_the_start() -> None:
    """The daemon makes the service before its first view (peers=()); the "every peer
    at start" sweep then asked nobody, and a previous process's generation stayed on
    peers outside the new placement for good."""
    c = Cluster(9, 2, 1)
    try:
        old = c.svcs["p0"].snapshot(state(60), 1).wait(10)
        c.svcs["p0"].close()  # the member restarts: a new process, the same id
        channel = ListCounter(c.hub)
        fresh = SnapshotService("p0", channel, c.stores["p0"], peers=(), config=c.cfg)
        c.svcs["p0"] = fresh
        fresh.on_view(c.ids)
        new = fresh.snapshot(state(61), 2).wait(10)
        assert set(channel.listed) == set(c.ids)

        def left() -> list[str]:
            return [
                h
                for h in c.ids
                if any(k.generation == old.generation for k in c.stores[h].keys("p0"))
            ]

        deadline = time.monotonic() + 5
        while left() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not left(), left()
        assert new.generation > old.generation
    finally:
        c.close()


def test_a_newest_disk_step_that_fails_falls_back_to_memory_not_an_older_disk_step(
    tmp_path: Path,
) -> None:
    """The disk's newest generation failed its checksums and an older one was still on
    disk (a crash before older generations were removed): restore() read that older
    step instead of the own copy's or the holders' newer one."""
    earlier = Cluster(6, 4, 2, snapshot_dir=str(tmp_path))
    try:
        earlier.svcs["p0"].snapshot(state(70), 2).wait(10)
        earlier.svcs["p0"].close()  # joins the disk writer
        (older,) = tmp_path.glob("p0/g*")
        keep = tmp_path / "kept"
        shutil.copytree(older, keep)
        svc = earlier.service("p0")
        earlier.svcs["p0"] = svc
        svc.snapshot(state(71), 9).wait(10)
    finally:
        earlier.close()  # step 9 is on disk; step 2 was removed
    shutil.copytree(keep, older)  # ... and is back, as after a crash in between
    (newest,) = [d for d in tmp_path.glob("p0/g*") if d != older]
    raw = bytearray((newest / "data.bin").read_bytes())
    raw[0] ^= 0xFF
    (newest / "data.bin").write_bytes(bytes(raw))
    c = Cluster(6, 4, 2, snapshot_dir=str(tmp_path), disk_every=1000)  # writes nothing
    try:
        c.svcs["p0"].snapshot(state(72), 5).wait(10)  # memory: step 5
        step, out = c.svcs["p0"].restore()
        assert step == 5 and same(out, state(72))
    finally:
        c.close()


class NiceRecorder(InProcessChannel):
    """Records the nice value of every thread that puts a piece."""

    def __init__(self, hub: InProcessHub) -> None:
        super().__init__(hub)
        self.nice: set[int] = set()

    def put(self, holder: str, key: ShardKey, data: Any, crc: int, *, timeout: float) -> None:
        self.nice.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        super().put(holder, key, data, crc, timeout=timeout)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
@pytest.mark.parametrize("io_nice", [0, 7])
def test_pieces_are_sent_by_threads_niced_by_io_nice_and_the_caller_keeps_its_own(
    io_nice: int,
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    if base + io_nice > MAX_NICE:
        pytest.skip(f"the test runs at nice {base}: no room to lower a thread by {io_nice}")
    c = Cluster(6, 4, 2, io_nice=io_nice)
    try:
        channel = NiceRecorder(c.hub)
        owner = c.service("p0", channel)
        c.svcs["p0"].close()
        c.svcs["p0"] = owner
        info = owner.snapshot(state(3), 1).wait(10)
        assert info.step == 1
        assert channel.nice == {base + io_nice}
        # the caller and the coder (the service's worker thread) keep the process's
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
        assert owner._worker.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, owner._worker.native_id) == base
        step, out = owner.restore()
        assert step == 1 and same(out, state(3))
    finally:
        c.close()


def test_io_nice_out_of_range_or_not_an_int_is_refused() -> None:
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="io_nice"):
            SnapshotConfig(io_nice=bad)
    for wrong in (2.5, True, "5"):
        with pytest.raises(TypeError, match="io_nice"):
            SnapshotConfig(io_nice=wrong)  # type: ignore[arg-type]


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_a_thread_started_from_a_lowered_thread_does_not_sink_further() -> None:
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    if base + 3 > MAX_NICE:
        pytest.skip(f"the test runs at nice {base}")
    seen: list[int] = []

    def inner() -> None:
        lower_own_priority(3)  # inherits base + 3 from its creator; stays there
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    def outer() -> None:
        lower_own_priority(3)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        t = threading.Thread(target=inner)
        t.start()
        t.join(5)

    t = threading.Thread(target=outer)
    t.start()
    t.join(5)
    assert seen == [base + 3, base + 3]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_a_refused_priority_change_leaves_the_pool_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    c = Cluster(6, 4, 2, io_nice=5)
    try:
        info = c.svcs["p0"].snapshot(state(8), 1).wait(10)
        assert info.step == 1
        step, out = c.svcs["p0"].restore()
        assert step == 1 and same(out, state(8))
    finally:
        c.close()


def test_the_two_reserved_buffers_are_taken_in_turn() -> None:
    # phalanx bench snapshot times its memcpy baseline into a pair of buffers taken
    # in the same turn (docs/snapshots.md, "The stall's baseline")
    c = Cluster(6, 4, 2)
    try:
        svc = c.svcs["p0"]
        svc.reserve(state(1)["model"]["w"].nbytes + 4096)
        reserved = {b.ctypes.data for b in svc._free}
        assert len(reserved) == 2
        used = []
        for step in range(1, 6):
            h = svc.snapshot(state(step), step)
            used.append(h._gen.buf.ctypes.data)
            h.wait(10)
        assert set(used) == reserved
        assert used[0::2] == [used[0]] * 3 and used[1::2] == [used[1]] * 2
    finally:
        c.close()

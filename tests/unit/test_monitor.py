"""The Monitor without a network: synthetic samples, a fake clock, a fake engine.

Verdicts stay active while their anomaly stands and end on the data path (not only when
someone polls /healthz); strikes, verdicts and anomaly series never outlive a view
change; gauges never recreate a departed peer's series; the hang limit survives a view
change and a hang verdict ends with its op."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from phalanx.comm.observer import LinkSample, OpSample
from phalanx.errors import ConfigError
from phalanx.monitor import ClusterView, DetectorConfig, Monitor, MonitorConfig, Verdict


class _Clock:
    """A fake clock: tests move it by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _series(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    """Every (kind, peer) series of an anomaly gauge, with its value."""
    out: dict[tuple[str, str], float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == name:
                out[(s.labels["kind"], s.labels["peer"])] = s.value
    return out


def _op(seq: int, links: list[LinkSample], *, epoch: int = 1, rank: int = 1,
        world: int = 3, dur: float = 0.01) -> OpSample:  # fmt: skip
    return OpSample("all_reduce", seq, epoch, "ring", "none", 16384, world, rank, True, dur,
                    "", frozenset(), tuple(links))  # fmt: skip


class _Feed:
    """Rank 1 of a ring of 3 receiving from 0: a late peer 0 (a straggler) on demand."""

    def __init__(self, mon: Monitor, clock: _Clock, seed: int = 1) -> None:
        self.mon, self.clock, self.rng, self.seq = mon, clock, random.Random(seed), 0

    def ops(self, n: int, *, late: bool, dt: float = 0.1, epoch: int = 1) -> None:
        for _ in range(n):
            fb = 0.0002 + self.rng.uniform(0, 5e-5) + (0.005 if late else 0.0)
            xfer = 0.001 + self.rng.uniform(0, 1e-4)
            links = [LinkSample(0, 0, 4096, 6, fb, fb + xfer, 0.0),
                     LinkSample(2, 4096, 0, 0, None, None, 0.0)]  # fmt: skip
            self.clock.t += dt
            self.mon.observer.op_finished(_op(self.seq, links, epoch=epoch))
            self.seq += 1


def _straggler_active(mon: Monitor) -> float | None:
    return _value(mon.registry, "phalanx_anomaly_active", kind="straggler", peer="0")


def test_a_standing_anomaly_stays_active_however_often_it_is_polled() -> None:
    clock = _Clock()
    mon = Monitor(1, clock=clock)
    feed = _Feed(mon, clock)
    feed.ops(100, late=False)
    feed.ops(10, late=True)
    assert _straggler_active(mon) == 1.0
    for _ in range(180):  # 90 s of a peer that stays late, /healthz polled every op
        feed.ops(1, late=True, dt=0.5)
        mon.healthy()
    assert _straggler_active(mon) == 1.0
    active = mon.anomalies()["active"]
    assert isinstance(active, list)
    assert ("straggler", 0) in {(a["kind"], a["peer"]) for a in active}


def test_a_verdict_ends_on_the_data_path_without_polling() -> None:
    clock = _Clock()
    mon = Monitor(1, clock=clock, config=MonitorConfig(active_s=60.0))
    feed = _Feed(mon, clock)
    feed.ops(100, late=False)
    feed.ops(10, late=True)
    assert _straggler_active(mon) == 1.0
    feed.ops(10, late=False)  # the peer is on time again: the anomaly no longer stands
    clock.t += 120.0  # nobody polls /healthz or /anomalies
    feed.ops(1, late=False)
    assert _straggler_active(mon) == 0.0


def test_a_persistent_straggler_collects_strikes_and_is_reported_for_eviction() -> None:
    clock = _Clock()
    asked: list[tuple[int, str]] = []
    cfg = MonitorConfig(active_s=60.0, evict_after=3)  # renew_s: 10 s
    mon = Monitor(1, clock=clock, config=cfg, on_evict=lambda p, why: asked.append((p, why)))
    feed = _Feed(mon, clock)
    feed.ops(100, late=False)
    feed.ops(60, late=True, dt=0.5)  # 30 s of one standing straggler verdict
    assert asked == [(0, "straggler")]
    stragglers = [v for v in mon.verdicts() if v.kind == "straggler"]
    assert 3 <= len(stragglers) <= 4  # issued again every renew_s, not on every op


def test_strikes_restart_after_a_quiet_spell_whether_or_not_healthz_was_polled() -> None:
    clock = _Clock()
    asked: list[int] = []
    cfg = MonitorConfig(active_s=60.0, evict_after=3)
    mon = Monitor(0, clock=clock, config=cfg, on_evict=lambda p, why: asked.append(p))

    def strike() -> None:
        mon.record(Verdict("straggler", 2, 1.5, clock(), 1))

    strike()
    clock.t += 10.0
    strike()
    clock.t += 190.0  # long quiet: the count starts again
    mon.healthy()  # a probe's poll expires the active entry; it must not matter
    strike()
    assert asked == []
    clock.t += 5.0
    strike()
    clock.t += 5.0
    strike()
    assert asked == [2]


def test_a_view_change_clears_verdicts_strikes_and_evictions_of_renumbered_ranks() -> None:
    clock = _Clock()
    asked: list[int] = []
    cfg = MonitorConfig(evict_after=1)
    mon = Monitor(0, clock=clock, config=cfg, on_evict=lambda p, why: asked.append(p))
    mon.set_view(1, [0, 1, 2, 3], 0)
    mon.record(Verdict("straggler", 2, 1.5, clock(), 1))
    assert asked == [2]
    assert _series(mon.registry, "phalanx_anomaly_active")[("straggler", "2")] == 1.0
    # rank 2 was evicted; another host is rank 2 now and inherits nothing
    mon.set_view(2, [0, 1, 2], 0)
    assert _series(mon.registry, "phalanx_anomaly_active") == {}
    assert ("straggler", "2") not in _series(mon.registry, "phalanx_anomaly_score")
    assert mon.anomalies()["active"] == []
    # and if the new rank 2 straggles, it can be reported in its turn
    mon.record(Verdict("straggler", 2, 1.5, clock(), 2))
    assert asked == [2, 2]


def test_score_gauges_go_back_to_zero_on_a_view_change_and_when_the_anomaly_ends() -> None:
    clock = _Clock()
    mon = Monitor(1, clock=clock)
    feed = _Feed(mon, clock)
    feed.ops(100, late=False)
    feed.ops(10, late=True)
    scores = _series(mon.registry, "phalanx_anomaly_score")
    assert scores[("straggler", "0")] >= 1.0  # scored under its own kind
    assert scores.get(("slow_link", "0"), 0.0) < 1.0
    feed.ops(2 * MonitorConfig().detectors.n, late=False)  # on time again
    assert _series(mon.registry, "phalanx_anomaly_score")[("straggler", "0")] < 1.0
    feed.ops(10, late=True)
    mon.set_view(2, [0, 1, 2], 1)  # new baselines, no verdicts yet: no score stands
    assert all(v == 0.0 for v in _series(mon.registry, "phalanx_anomaly_score").values())


def test_no_series_of_a_peer_outside_the_view_is_written() -> None:
    clock = _Clock()
    mon = Monitor(0, clock=clock)
    mon.set_view(3, [0, 1], 0)
    # a sample of the current epoch naming rank 2 (it raced the view change) and a
    # verdict against it: neither may bring its series back
    links = [
        LinkSample(1, 64, 64, 1, 0.001, 0.002, 0.0),
        LinkSample(2, 64, 64, 1, 0.001, 0.002, 0.0),
    ]
    mon.observer.op_finished(_op(0, links, epoch=3, rank=0, world=2))
    mon.record(Verdict("slow_link", 2, 2.0, clock(), 3, src=2, dst=0))
    assert mon.metrics.peers() == frozenset({"1"})
    assert _value(mon.registry, "phalanx_link_sent_bytes_total", peer="2") is None
    assert ("slow_link", "2") not in _series(mon.registry, "phalanx_anomaly_active")
    assert _value(mon.registry, "phalanx_link_sent_bytes_total", peer="1") == 64.0


def test_expiry_and_strikes_run_on_the_monotonic_clock() -> None:
    wall, mono = _Clock(1_700_000_000.0), _Clock(50.0)
    mon = Monitor(0, clock=wall, monotonic=mono, config=MonitorConfig(active_s=60.0))
    mon.record(Verdict("straggler", 2, 1.5, wall(), 1))
    wall.t += 3600.0  # the wall clock steps (NTP); one second passes
    mono.t += 1.0
    mon.expire()
    assert _value(mon.registry, "phalanx_anomaly_active", kind="straggler", peer="2") == 1.0
    assert mon.anomalies()["active"] == [{"kind": "straggler", "peer": 2, "since": 1_700_000_000.0}]
    mono.t += 61.0
    mon.expire()
    assert _value(mon.registry, "phalanx_anomaly_active", kind="straggler", peer="2") == 0.0


class _Engine:
    """``inflight()`` on the real monotonic clock, set by the test."""

    def __init__(self) -> None:
        self.op: tuple[str, int, float, float] | None = None

    def run(self, seq: int, idle_s: float) -> None:
        """Op ``seq`` in flight, started and last progressed ``idle_s`` ago."""
        t = time.monotonic() - idle_s
        self.op = ("all_reduce", seq, t, t)

    def inflight(self) -> tuple[str, int, float, float] | None:
        return self.op

    def link_stats(self) -> list[object]:
        return []


def _hang_monitor() -> tuple[Monitor, _Engine]:
    cfg = MonitorConfig(detectors=DetectorConfig(hang_floor_s=1.0, hang_factor=10.0))
    mon = Monitor(0, config=cfg)
    engine = _Engine()
    mon.attach(engine)
    mon.set_view(1, [0, 1], 0)
    for seq in range(20):  # ops of 0.5 s: the limit is 10 x p99 = 5 s
        mon.observer.op_finished(_op(seq, [], epoch=1, rank=0, world=2, dur=0.5))
    return mon, engine


def test_the_hang_limit_survives_a_view_change() -> None:
    mon, engine = _hang_monitor()
    mon.set_view(2, [0, 1], 0)
    engine.run(0, idle_s=2.0)  # 2 s without progress: normal for 0.5 s ops x 10
    assert mon.check_hang() is None
    assert mon.healthy() == (True, "ok")


def test_a_hang_spanning_a_view_change_is_one_verdict() -> None:
    mon, engine = _hang_monitor()
    engine.run(20, idle_s=6.0)
    assert mon.check_hang() is not None
    mon.set_view(2, [0, 1], 0)  # the same op is still in flight (same seq and start)
    assert mon.check_hang() is None  # already reported
    assert mon.healthy()[0] is False  # and still hung
    assert [v.kind for v in mon.verdicts()] == ["hang"]


def test_a_hang_verdict_ends_when_its_op_is_no_longer_in_flight() -> None:
    mon, engine = _hang_monitor()
    engine.run(20, idle_s=6.0)
    assert mon.check_hang() is not None
    assert mon.healthy()[0] is False
    engine.run(21, idle_s=0.0)  # the next op runs: no idle check in between
    mon.check_hang()
    assert mon.healthy() == (True, "ok")
    assert _value(mon.registry, "phalanx_anomaly_active", kind="hang", peer="any") == 0.0


def test_a_hang_verdict_ends_when_its_op_progresses_again() -> None:
    mon, engine = _hang_monitor()
    engine.run(20, idle_s=6.0)
    assert mon.check_hang() is not None
    assert mon.healthy()[0] is False
    assert engine.op is not None
    op, seq, started, _ = engine.op
    engine.op = (op, seq, started, time.monotonic())  # the same op progresses again
    assert mon.check_hang() is None
    assert mon.healthy() == (True, "ok")  # though the (long) op is still in flight
    assert _value(mon.registry, "phalanx_anomaly_active", kind="hang", peer="any") == 0.0
    engine.op = (op, seq, started, time.monotonic() - 6.0)  # and stalls again
    again = mon.check_hang()
    assert again is not None and again.kind == "hang" and again.seq == seq
    assert mon.healthy() == (False, "an operation is hung")
    assert [v.kind for v in mon.verdicts()] == ["hang", "hang"]


def test_renew_s_defaults_to_at_most_active_s() -> None:
    assert MonitorConfig().renew_s == 10.0
    assert MonitorConfig(active_s=5.0).renew_s == 5.0  # valid before renew_s existed
    Monitor(0, config=MonitorConfig(active_s=5.0)).expire()
    assert MonitorConfig(active_s=5.0, renew_s=2.0).renew_s == 2.0
    for bad in ({"active_s": 5.0, "renew_s": 6.0}, {"renew_s": 0.0}, {"active_s": 0.0}):
        with pytest.raises(ConfigError):
            MonitorConfig(**bad)  # type: ignore[arg-type]


def test_a_cluster_view_ignores_late_samples_of_an_older_view() -> None:
    got: list[Verdict] = []
    view = ClusterView(2, got.append)
    judged: list[int] = []
    real = view._detector.observe

    def spy(samples, starts, now):  # type: ignore[no-untyped-def]
        judged.append(samples[0].epoch)
        return real(samples, starts, now)

    view._detector.observe = spy  # type: ignore[method-assign]
    link = [LinkSample(1, 64, 64, 1, 0.001, 0.002, 0.0)]
    view.add(_op(0, link, epoch=2, rank=0, world=2), 0.0)
    view.add(_op(9, link, epoch=1, rank=1, world=2), 0.0)  # late, from the old view
    view.add(_op(0, link, epoch=2, rank=1, world=2), 0.0)
    assert judged == [2]  # the new view's op completed: nothing was wiped


def test_a_patient_wait_moves_neither_the_hang_limit_nor_the_link_detectors() -> None:
    """A patient op (a state transfer's verdict) waits by protocol, for as long as the
    transfer takes. Fed like any op, three such waits of 5 s raised the hang limit to
    50 s for every op (10 x the p99 of the history), and a peer that reached the
    verdict late looked like a straggler. They now go to neither."""
    clock = _Clock()
    mon = Monitor(1, clock=clock)
    feed = _Feed(mon, clock)
    feed.ops(100, late=False)
    assert mon._hang.threshold() == pytest.approx(1.0)  # the floor: ops of ~10 ms
    real = mon.observer.op_finished

    def patient(sample: OpSample) -> None:
        real(replace(sample, duration_s=5.0, patient=True))

    mon.observer.op_finished = patient  # type: ignore[method-assign]
    feed.ops(10, late=True)  # ten long waits on a late peer 0
    mon.observer.op_finished = real  # type: ignore[method-assign]
    assert mon._hang.threshold() == pytest.approx(1.0)
    assert _straggler_active(mon) != 1.0
    feed.ops(10, late=True)  # the same lateness in plain ops is still seen
    assert _straggler_active(mon) == 1.0
    mon.close()

"""Detectors on synthetic series: no sockets, no threads, no clocks."""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phalanx.comm.observer import LinkSample, OpSample
from phalanx.monitor.detectors import (
    ClusterDetector,
    DegradationDetector,
    DetectorConfig,
    HangDetector,
    LocalDetector,
    RobustBaseline,
    SlowLinkDetector,
    Verdict,
    robust_score,
    size_bucket,
)

CFG = DetectorConfig()


def _op(rank: int, seq: int, world: int, links: list[LinkSample], dur: float) -> OpSample:
    return OpSample("all_reduce", seq, 0, "ring", "none", 16384, world, rank, True, dur, "",
                    frozenset(), tuple(links))  # fmt: skip


def _ring(world: int, seq: int, rng: random.Random, late: dict[tuple[int, int], float],
          starts: dict[int, float], dur: dict[int, float]) -> list[OpSample]:  # fmt: skip
    """One ring op: rank r receives from r-1; waits are noise plus injected lateness."""
    out = []
    for r in range(world):
        prv = (r - 1) % world
        wait = 0.001 + rng.uniform(0, 0.0003) + late.get((prv, r), 0.0)
        # first byte counted from the receiver's own start
        fb = max(1e-5, starts[prv] + wait - starts[r])  # ~0: it was already there
        links = [LinkSample(prv, 0, 4096, 6, fb, fb + 0.002, 0.0),
                 LinkSample((r + 1) % world, 4096, 0, 0, None, None, 0.0)]  # fmt: skip
        out.append(_op(r, seq, world, links, dur.get(r, 0.01)))
    return out


def test_size_bucket_and_robust_score() -> None:
    assert size_bucket(64) == 6 and size_bucket(65) == 7 and size_bucket(0) == 0
    z, ratio = robust_score(3.0, 1.0, 0.5, 1e-6)
    assert z == pytest.approx(4.0) and ratio == pytest.approx(3.0)
    b = RobustBaseline(100)
    for v in [0.0] * 60 + [1.0] * 40:  # bimodal: MAD 0, but the tail sets the scale
        b.add(v)
    med, scale = b.stats()
    assert med == 0.0 and scale > 0.5


@given(
    st.integers(3, 40),
    st.lists(st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False), min_size=1,
             max_size=120),
)  # fmt: skip
def test_robust_baseline_keeps_the_median_and_mad_of_its_window(
    window: int, values: list[float]
) -> None:
    """The sorted window and the O(log n) MAD give exactly what sorting gives."""
    b = RobustBaseline(window)
    for i, v in enumerate(values):
        b.add(v)
        kept = values[max(0, i + 1 - window) : i + 1]
        med = statistics.median(kept)
        mad = statistics.median([abs(x - med) for x in kept])
        q90 = sorted(kept)[min(len(kept) - 1, int(0.9 * len(kept)))]
        assert b.stats() == (med, max(1.4826 * mad, (q90 - med) / 1.2816))
    b.add(float("nan"))  # ignored: it has no place in the order
    assert len(b) == min(window, len(values))


def test_slow_link_needs_k_of_n_and_names_the_cell() -> None:
    det = SlowLinkDetector(CFG)
    rng = random.Random(1)
    cells = [("all_reduce", 14, s, (s + 1) % 4) for s in range(4)]
    for _ in range(100):
        assert det.observe({c: 0.001 + rng.uniform(0, 3e-4) for c in cells}, cross=True) == []
    # one spike is not a verdict (needs k of n)
    spike = {c: 0.001 for c in cells} | {cells[1]: 0.01}
    assert det.observe(spike, cross=True) == []
    assert det.observe({c: 0.001 for c in cells}, cross=True) == []
    hits = []
    for _ in range(CFG.k):
        hits = det.observe({c: 0.001 for c in cells} | {cells[2]: 0.004}, cross=True)
    assert [h.cell for h in hits] == [cells[2]] and hits[0].new


def test_common_mode_slowdown_is_not_a_slow_link() -> None:
    det = SlowLinkDetector(CFG)
    cells = [("all_reduce", 14, s, (s + 1) % 4) for s in range(4)]
    for i in range(100):
        det.observe({c: 0.001 + 1e-5 * (i % 7) for c in cells}, cross=True)
    for _ in range(20):  # a CPU hog slows every link alike
        assert det.observe({c: 0.008 for c in cells}, cross=True) == []


def test_cluster_slow_link_vs_straggler() -> None:
    rng = random.Random(2)
    world = 4
    for fault in ("link", "straggler"):
        det = ClusterDetector(CFG)
        verdicts = []
        for seq in range(140):
            starts = {r: rng.uniform(0, 2e-4) for r in range(world)}
            late: dict[tuple[int, int], float] = {}
            dur: dict[int, float] = {}
            if seq >= 100 and fault == "link":
                late[(0, 1)] = 0.004  # the 0 -> 1 wire adds 4 ms
                dur = {r: 0.014 for r in range(world)}
            if seq >= 100 and fault == "straggler":
                starts[3] += 0.01  # rank 3 arrives 10 ms late, then waits for nobody
                dur = {0: 0.02, 1: 0.02, 2: 0.02, 3: 0.01}
            ops = _ring(world, seq, rng, late, starts, dur)
            verdicts += [(seq, v) for v in ClusterDetector.observe(det, ops, starts, 0.0)]
        assert verdicts, fault
        seq, v = verdicts[0]
        assert 100 <= seq < 110
        if fault == "link":
            assert (v.kind, v.src, v.dst) == ("slow_link", 0, 1)
        else:
            assert (v.kind, v.peer) == ("straggler", 3)
        assert all(x.kind == v.kind for _, x in verdicts)
        # the fault persists: its verdict still stands after the last op
        assert [(x.kind, x.peer) for x in det.standing()] == [(v.kind, v.peer)]


def test_local_detector_tells_straggler_from_slow_link() -> None:
    rng = random.Random(3)
    for transfer_stretch, want in ((1.0, "straggler"), (5.0, "slow_link")):
        det = LocalDetector(CFG)
        out = []
        for seq in range(120):
            bad = seq >= 100
            fb = 0.0002 + rng.uniform(0, 5e-5) + (0.005 if bad else 0.0)
            xfer = (0.001 + rng.uniform(0, 1e-4)) * (transfer_stretch if bad else 1.0)
            links = [LinkSample(0, 0, 4096, 6, fb, fb + xfer, 0.0),
                     LinkSample(2, 4096, 0, 0, None, None, 0.0)]  # fmt: skip
            out += det.observe(_op(1, seq, 3, links, 0.01), 0.0)
        assert out and out[0].kind == want and out[0].peer == 0, (want, out)


def test_hang_threshold_is_max_of_factor_p99_and_floor() -> None:
    det = HangDetector(DetectorConfig(hang_floor_s=1.0, hang_factor=10.0))
    assert det.threshold() == 1.0
    for _ in range(100):
        det.observe_duration(0.5)
    assert det.threshold() == pytest.approx(5.0)
    assert det.check(100.0, ("all_reduce", 7, 90.0, 96.0)) is None  # 4 s idle < 5 s
    hit = det.check(100.0, ("all_reduce", 7, 90.0, 94.0))
    assert hit is not None and hit[2] == 7 and hit[0] >= 1.0
    assert det.check(101.0, ("all_reduce", 7, 90.0, 94.0)) is None  # reported once
    det.reset()
    assert det.threshold() == 1.0


def test_a_rebuilt_groups_op_that_hangs_at_a_reported_seq_is_reported_too() -> None:
    # a group rebuilt in the same view numbers its ops from 0 again: op 0 of the new
    # group is another op than op 0 of the old one (it started at another time)
    det = HangDetector(DetectorConfig(hang_floor_s=1.0, hang_factor=10.0))
    assert det.check(100.0, ("all_reduce", 0, 90.0, 94.0)) is not None
    assert det.check(101.0, ("all_reduce", 0, 90.0, 94.0)) is None  # the same op
    assert det.check(120.0, ("all_reduce", 0, 110.0, 112.0)) is not None  # a new op 0


def test_degradation_needs_a_sustained_ten_percent_shift() -> None:
    rng = random.Random(4)
    det = DegradationDetector(CFG)
    noise = [0.01 * (1 + rng.gauss(0, 0.05)) for _ in range(2000)]
    assert not any(det.observe(v) for v in noise)  # healthy: never
    det.reset()
    fired_at = None
    for i in range(3000):
        v = 0.01 * (1 + rng.gauss(0, 0.05)) * (1.12 if i >= 500 else 1.0)
        if det.observe(v):
            fired_at = i
            break
    assert fired_at is not None and 500 < fired_at < 500 + 12 * CFG.degradation_batch
    det.reset()
    # a one-batch blip is not a degradation
    series = [0.01] * 500 + [0.02] * CFG.degradation_batch + [0.01] * 500
    assert not any(det.observe(v) for v in series)


def test_degradation_ignores_microsecond_shifts_of_microsecond_series() -> None:
    """On loopback a series of ~20 us moves by a few us (10 % and more) with scheduling
    alone: no degradation (a healthy run gave 14 verdicts in 4,000 ops). A sustained
    shift that is also >= min_excess_s (0.2 ms) in absolute terms still is one."""
    rng = random.Random(7)
    det = DegradationDetector(CFG)
    series = [20e-6 * (1 + rng.gauss(0, 0.1)) for _ in range(500)]
    series += [30e-6 * (1 + rng.gauss(0, 0.1)) for _ in range(3000)]  # +50 %, +10 us
    assert not any(det.observe(v) for v in series)
    det.reset()
    fired_at = None
    for i in range(3000):
        v = 20e-6 * (1 + rng.gauss(0, 0.1)) + (0.5e-3 if i >= 500 else 0.0)  # +0.5 ms
        if det.observe(v):
            fired_at = i
            break
    assert fired_at is not None and 500 < fired_at < 500 + 12 * CFG.degradation_batch


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        DetectorConfig(k=6, n=5)
    with pytest.raises(ValueError):
        DetectorConfig(ratio_threshold=1.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"degradation_limit": 0.0},
        {"degradation_limit": -1.0},
        {"cross_ratio_threshold": 0.0},
        {"cross_ratio_threshold": -2.0},
    ],
)
def test_config_rejects_limits_that_would_divide_by_zero(bad: dict[str, Any]) -> None:
    # both divide a score: a ZeroDivisionError on the observer thread stopped detection
    with pytest.raises(ValueError):
        DetectorConfig(**bad)


def _straggling(det: LocalDetector, rng: random.Random, seq: int, bad: bool) -> list[Verdict]:
    """One op of rank 1 that receives from 0 (late when ``bad``, same transfer time)."""
    fb = 0.0002 + rng.uniform(0, 5e-5) + (0.005 if bad else 0.0)
    xfer = 0.001 + rng.uniform(0, 1e-4)
    links = [LinkSample(0, 0, 4096, 6, fb, fb + xfer, 0.0),
             LinkSample(2, 4096, 0, 0, None, None, 0.0)]  # fmt: skip
    return det.observe(_op(1, seq, 3, links, 0.01), 0.0)


def test_a_standing_verdict_is_listed_while_it_persists_and_not_after() -> None:
    det = LocalDetector(CFG)
    rng = random.Random(5)
    new: list[Verdict] = []
    for seq in range(100):
        new += _straggling(det, rng, seq, bad=False)
    for seq in range(100, 160):
        new += _straggling(det, rng, seq, bad=True)
        if new:
            # issued once, but it stands on every op while the peer stays late
            assert [(v.kind, v.peer) for v in det.standing()] == [("straggler", 0)]
    assert [(v.kind, v.peer) for v in new] == [("straggler", 0)]
    for seq in range(160, 160 + CFG.n):
        _straggling(det, rng, seq, bad=False)
    assert det.standing() == []


def test_peer_scores_use_the_straggler_kind_and_forget_cells_no_op_measures() -> None:
    det = LocalDetector(CFG)
    rng = random.Random(6)
    for seq in range(100):
        _straggling(det, rng, seq, bad=False)
    for seq in range(100, 110):
        _straggling(det, rng, seq, bad=True)
    scores = det.peer_scores()
    assert scores[("straggler", 0)] >= 1.0  # exported under its own kind
    assert scores.get(("slow_link", 0), 0.0) < 1.0
    # ops that no longer involve peer 0 (another neighbour): its score must not stay pinned
    for seq in range(110, 110 + CFG.window + 1):
        links = [LinkSample(2, 4096, 4096, 6, 0.0002, 0.0012, 0.0)]
        det.observe(_op(1, seq, 3, links, 0.01), 0.0)
    assert det.peer_scores().get(("straggler", 0), 0.0) == 0.0


def test_hang_detector_knows_the_op_it_flagged() -> None:
    det = HangDetector(DetectorConfig(hang_floor_s=1.0))
    hung = ("all_reduce", 3, 90.0, 94.0)
    assert not det.is_flagged(hung)
    assert det.check(100.0, hung) is not None
    assert det.is_flagged(hung)
    assert not det.is_flagged(("all_reduce", 4, 99.0, 99.5))  # the next op runs
    assert not det.is_flagged(None)

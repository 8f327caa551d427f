"""Anomaly detectors: pure functions and small classes over recent samples.

Collectives repeat from step to step, so a link or a peer that turns slow stands out
against its own history (C4, Greyhound). Four detectors:

* **slow link** -- a cell of the sender x receiver matrix (per op kind and size bucket)
  whose value sits far above its own baseline: robust z-score over the median and MAD
  *and* a ratio to the median, both over threshold in ``k`` of the last ``n`` ops. The
  cell value is how long the receiver waited for the sender's first byte (collectives
  send their own data first, so that wait is the link's latency plus the sender's
  lateness) or, seen from the sender, how long the kernel refused its data.
  When the whole matrix is known (the bench, a future cluster view), a cell must also
  stand out against the other cells of the same op, which cancels common-mode noise
  such as a CPU hog slowing every rank at once.
* **straggler** -- a peer the others keep waiting for while its own transfers are
  normal. Locally: the wait for its first byte is anomalous but its first-to-last-byte
  transfer is not. Across the cluster: the late sender's own op was short (it waited for
  nobody), while a slow link leaves its sender's op as long as everyone's.
* **hang** -- an in-flight op without progress for ``max(factor x recent p99, floor)``.
* **degradation** -- a sustained shift of >= 10% against the series' own baseline, and
  of at least ``min_excess_s`` in absolute terms: a one-sided CUSUM over the log-ratio
  of batch medians to the baseline median.

Baselines reset on a view change (:meth:`reset`; the Monitor keeps the hang detector's
duration history across views). Every detector returns :class:`Verdict` objects when an
anomaly starts, and lists the verdicts that still stand (``standing()``: the latest one
of every anomaly whose persistence rule still holds) so the caller can keep them fresh;
counting, logging, renewing, expiring and exporting them is the Monitor's job.

What this module must never do: start threads, open sockets, read clocks (time is an
argument), log, or touch Prometheus.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from phalanx.comm.observer import OpSample
from phalanx.errors import ConfigError

__all__ = [
    "Cell",
    "ClusterDetector",
    "DegradationDetector",
    "DetectorConfig",
    "HangDetector",
    "LocalDetector",
    "RobustBaseline",
    "SlowLinkDetector",
    "Verdict",
    "local_cells",
    "matrix_cells",
    "robust_score",
    "size_bucket",
]

MAD_SCALE = 1.4826  # MAD x this estimates sigma for normal data


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Thresholds of every detector; one frozen object the daemon's config fills."""

    #: robust z-score (over median and scaled MAD) a cell must reach
    z_threshold: float = 6.0
    #: ratio to the cell's baseline median a cell must reach
    ratio_threshold: float = 2.0
    #: ratio to the median of the other cells of the same op (when the matrix is known)
    cross_ratio_threshold: float = 2.0
    #: a cell must also exceed its median by this many seconds (ignores microsecond noise)
    min_excess_s: float = 0.0002
    #: persistence: hits in ``k`` of the last ``n`` ops make a verdict
    k: int = 4
    n: int = 6
    #: baseline window per cell and the samples needed before judging
    window: int = 128
    min_baseline: int = 20
    #: hang: no progress for max(hang_factor x p99 of recent durations, hang_floor_s)
    hang_factor: float = 10.0
    hang_floor_s: float = 1.0
    #: degradation: shift to detect, samples per batch, baseline batches, CUSUM limit
    degradation_shift: float = 0.10
    degradation_batch: int = 25
    degradation_baseline_batches: int = 4
    degradation_limit: float = 5.0

    def __post_init__(self) -> None:
        # ConfigError is a ValueError: callers may catch either
        if not 1 <= self.k <= self.n:
            raise ConfigError(f"need 1 <= k <= n, got k={self.k} n={self.n}")
        if self.min_baseline < 3 or self.window < self.min_baseline:
            raise ConfigError("need 3 <= min_baseline <= window")
        if self.ratio_threshold <= 1 or self.z_threshold <= 0:
            raise ConfigError("ratio_threshold must be > 1 and z_threshold > 0")
        if not self.cross_ratio_threshold > 0:  # it divides: 0 would stop detection
            raise ConfigError("cross_ratio_threshold must be > 0")
        if not self.min_excess_s >= 0:
            raise ConfigError("min_excess_s must be >= 0")
        if self.hang_floor_s <= 0 or self.hang_factor <= 0:
            raise ConfigError("hang_floor_s and hang_factor must be > 0")
        if self.degradation_shift <= 0 or self.degradation_batch < 1:
            raise ConfigError("degradation_shift must be > 0, degradation_batch >= 1")
        if self.degradation_baseline_batches < 1:
            raise ConfigError("degradation_baseline_batches must be >= 1")
        if not self.degradation_limit > 0:  # the score divides by it
            raise ConfigError("degradation_limit must be > 0")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision: ``kind`` against ``peer`` (``None``: no single peer, e.g. a hang).

    ``src``/``dst`` name the link for slow-link verdicts; ``score`` >= 1 means over
    threshold; ``at`` is the caller's clock (Unix seconds in the Monitor)."""

    kind: str
    peer: int | None
    score: float
    at: float
    epoch: int
    seq: int | None = None
    src: int | None = None
    dst: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "peer": self.peer,
            "score": round(self.score, 3),
            "at": self.at,
            "epoch": self.epoch,
            "seq": self.seq,
            "src": self.src,
            "dst": self.dst,
            "detail": self.detail,
        }


def size_bucket(nbytes: int) -> int:
    """Power-of-two size class: ops of 33..64 bytes share bucket 6."""
    return max(0, (max(nbytes, 1) - 1).bit_length())


def robust_score(value: float, median: float, scale: float, floor: float) -> tuple[float, float]:
    """(z, ratio) of ``value`` against a median and a robust scale (see
    :meth:`RobustBaseline.stats`); ``floor`` keeps the scale from collapsing to zero
    on a perfectly quiet series."""
    z = (value - median) / max(scale, floor, 1e-9)
    ratio = value / median if median > 0 else (math.inf if value > 0 else 1.0)
    return z, ratio


def _median_sorted(ordered: list[float]) -> float:
    """``statistics.median`` of an already sorted, non-empty list (the same value,
    without sorting it again: this runs for every op the monitor observes)."""
    n = len(ordered)
    if n == 0:
        raise statistics.StatisticsError("no median for empty data")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class RobustBaseline:
    """A sliding window of a series with its median and MAD.

    The window is also kept sorted (one ``bisect`` removal and insertion per value), so
    :meth:`stats` reads the median and q90 by index and finds the MAD without sorting:
    it runs for every op the monitor observes."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self._ordered: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        if math.isnan(value):
            return  # no order, no median: a NaN would corrupt the sorted window
        if len(self.values) == self.values.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self.values[0])]
        self.values.append(value)
        bisect.insort(self._ordered, value)

    def stats(self) -> tuple[float, float]:
        """(median, scale): scale is 1.4826 x MAD, raised to what the upper tail
        implies ((q90 - median) / 1.2816) when the series is skewed or bimodal -- a
        first-byte wait is often ~0 (the frame was already there) and sometimes not,
        which leaves the MAD near zero although waits of that size are normal."""
        ordered = self._ordered
        med = _median_sorted(ordered)
        mad = _mad_sorted(ordered, med)
        q90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return med, max(MAD_SCALE * mad, (q90 - med) / 1.2816)


def _mad_sorted(ordered: list[float], med: float) -> float:
    """The median of ``|v - med|`` over a sorted list whose median is ``med``, in
    O(log n): the deviations are two sorted runs, ``med - ordered[i]`` for ``i`` going
    down from the middle and ``ordered[j] - med`` going up from it, and their k-th
    smallest element is found by bisecting how many come from the first run."""
    n = len(ordered)
    split = n // 2  # ordered[:split] <= med <= ordered[split:]; run a has split items

    def a(i: int) -> float:  # i-th smallest deviation below the median
        return med - ordered[split - 1 - i]

    def b(j: int) -> float:  # j-th smallest deviation above it
        return ordered[split + j] - med

    def kth(k: int) -> float:
        """The k-th smallest (0-based) of the merged runs."""
        lo, hi = max(0, k + 1 - (n - split)), min(k + 1, split)
        while lo < hi:  # i = how many of the k+1 smallest come from run a
            i = (lo + hi) // 2
            if a(i) < b(k - i):
                lo = i + 1
            else:
                hi = i
        i = lo
        best = -math.inf
        if i > 0:
            best = a(i - 1)
        if k + 1 - i > 0:
            best = max(best, b(k - i))
        return best

    if n % 2:
        return kth(n // 2)
    return (kth(n // 2 - 1) + kth(n // 2)) / 2


#: a matrix cell: (op kind, size bucket, sender rank, receiver rank)
Cell = tuple[str, int, int, int]


def local_cells(sample: OpSample) -> dict[Cell, float]:
    """The cells one rank measures itself: for each peer that sent to it, the wait for
    the peer's first byte (cell peer -> me); for each peer it sent to with the kernel
    refusing data, the time refused (cell me -> peer)."""
    b = size_bucket(sample.nbytes)
    cells: dict[Cell, float] = {}
    for link in sample.links:
        if link.bytes_recv > 0 and link.first_byte_s is not None:
            cells[(sample.op, b, link.peer, sample.rank)] = max(0.0, link.first_byte_s)
        if link.bytes_sent > 0 and link.send_blocked_s > 0:
            key = (sample.op, b, sample.rank, link.peer)
            cells[key] = max(cells.get(key, 0.0), link.send_blocked_s)
    return cells


def matrix_cells(samples: Iterable[OpSample]) -> dict[Cell, float]:
    """The full sender x receiver matrix of one op from every rank's sample: a cell is
    the larger of the receiver's first-byte wait and the sender's refused time."""
    cells: dict[Cell, float] = {}
    for s in samples:
        for key, value in local_cells(s).items():
            cells[key] = max(cells.get(key, 0.0), value)
    return cells


@dataclass
class _CellState:
    baseline: RobustBaseline
    hits: deque[bool]
    active: bool = False
    score: float = 0.0
    seen: int = 0  # the detector's op count when the cell was last observed


@dataclass(frozen=True, slots=True)
class CellHit:
    """A cell whose persistence rule holds after this op."""

    cell: Cell
    value: float
    median: float
    score: float
    new: bool  # True on the op the verdict first became active


class SlowLinkDetector:
    """Per-cell robust baselines with k-of-n persistence (used locally and cluster-wide)."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self._cells: dict[Cell, _CellState] = {}
        self._ops = 0  # calls of observe since the last reset

    def reset(self) -> None:
        self._cells.clear()
        self._ops = 0

    def scores(self, recent: int | None = None) -> dict[Cell, float]:
        """The latest score of every cell; with ``recent``, only of the cells observed in
        the last ``recent`` calls of :meth:`observe` (a cell no op measures any more must
        not pin its last score)."""
        oldest = -1 if recent is None else self._ops - recent
        return {c: s.score for c, s in self._cells.items() if s.seen > oldest}

    def active(self) -> list[Cell]:
        return [c for c, s in self._cells.items() if s.active]

    def is_active(self, cell: Cell) -> bool:
        """Whether ``cell``'s verdict stands (it cleared once none of its last ``n``
        ops was a hit)."""
        st = self._cells.get(cell)
        return st is not None and st.active

    def stands(self, cell: Cell) -> bool:
        """Whether ``cell``'s verdict stands *and* the cell was measured in the last
        ``n`` calls: a cell no op measures any more (a link that stopped blocking
        sends, an op size no longer used) cannot clear itself, and must not keep its
        verdict alive for good."""
        st = self._cells.get(cell)
        return st is not None and st.active and st.seen > self._ops - self.config.n

    def observe(self, cells: Mapping[Cell, float], *, cross: bool) -> list[CellHit]:
        """Judge one op's cells; ``cross``: also require standing out within the op."""
        cfg = self.config
        others_median: dict[Cell, float] = {}
        if cross and len(cells) >= 3:
            for c in cells:
                rest = [v for k, v in cells.items() if k != c and k[:2] == c[:2]]
                if len(rest) >= 2:
                    others_median[c] = statistics.median(rest)
        out: list[CellHit] = []
        self._ops += 1
        for cell, value in cells.items():
            st = self._cells.get(cell)
            if st is None:
                st = self._cells[cell] = _CellState(RobustBaseline(cfg.window), deque(maxlen=cfg.n))
            st.seen = self._ops
            hit = False
            score = 0.0
            med = value
            if len(st.baseline) >= cfg.min_baseline:
                med, scale = st.baseline.stats()
                z, ratio = robust_score(value, med, scale, cfg.min_excess_s / cfg.z_threshold)
                score = min(z / cfg.z_threshold, ratio / cfg.ratio_threshold)
                hit = score >= 1.0 and value - med >= cfg.min_excess_s
                if cross and cell in others_median:
                    om = others_median[cell]
                    xr = value / om if om > 0 else math.inf
                    score = min(score, xr / cfg.cross_ratio_threshold)
                    hit = hit and xr >= cfg.cross_ratio_threshold
            st.hits.append(hit)
            st.score = max(0.0, score)
            persistent = sum(st.hits) >= cfg.k
            if not hit:
                st.baseline.add(value)  # anomalous values never enter the baseline
            if persistent:
                out.append(CellHit(cell, value, med, score, new=not st.active))
                st.active = True
            elif not any(st.hits):
                st.active = False
        return out


class HangDetector:
    """No progress on the in-flight op for ``max(factor x p99, floor)`` seconds."""

    def __init__(self, config: DetectorConfig, history: int = 256) -> None:
        self.config = config
        self._durations: deque[float] = deque(maxlen=history)
        # (seq, start) of the op already reported: a group rebuilt in the same view
        # numbers its ops from 0 again, and its op 0 may hang too
        self._flagged: tuple[int, float] | None = None

    def reset(self) -> None:
        """Forget everything. (The Monitor does not call this on a view change: op
        durations stay a fair history, and an op hung across the change is the same op.)"""
        self._durations.clear()
        self._flagged = None

    def is_flagged(self, inflight: tuple[str, int, float, float] | None) -> bool:
        """Whether ``inflight`` is the op already reported as hung (its verdict stands
        while it is in flight, and ends when another op, or none, is)."""
        return inflight is not None and self._flagged == (inflight[1], inflight[2])

    def observe_duration(self, seconds: float) -> None:
        self._durations.append(seconds)

    def threshold(self) -> float:
        cfg = self.config
        if len(self._durations) < 10:
            return cfg.hang_floor_s
        ordered = sorted(self._durations)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        return max(cfg.hang_factor * p99, cfg.hang_floor_s)

    def check(
        self, now: float, inflight: tuple[str, int, float, float] | None
    ) -> tuple[float, str, int] | None:
        """``inflight`` is ``Engine.inflight()`` (op, seq, started, last progress; same
        clock as ``now``). Returns (score, op, seq) once per hung op, else ``None``."""
        if inflight is None:
            return None
        op, seq, started, progress = inflight
        idle = now - progress
        limit = self.threshold()
        if idle < limit or self._flagged == (seq, started):
            return None
        self._flagged = (seq, started)
        return idle / limit, op, seq

    def score(self, now: float, inflight: tuple[str, int, float, float] | None) -> float:
        if inflight is None:
            return 0.0
        return max(0.0, (now - inflight[3]) / self.threshold())


class DegradationDetector:
    """Sustained upward shift of a series against its own baseline (one-sided CUSUM).

    Values come in batches of ``degradation_batch``; the first
    ``degradation_baseline_batches`` batch medians set the baseline. Each later batch
    adds ``log(1 + (median - baseline) / scale) - log(1 + shift/2)`` to a sum floored at
    zero, where ``scale`` is the baseline but never less than ``min_excess_s / shift``;
    the alarm rings when the sum exceeds ``degradation_limit x log(1 + shift)``: about
    ten batches at exactly the shift, four at twice it (one batch counts as at most
    twice the shift, so a short blip never rings it).

    The floor on ``scale`` makes a shift count only when it is also at least
    ``min_excess_s`` (0.2 ms) in absolute terms, as the slow-link detector requires: on
    loopback a first-byte wait of 20 us moves by 2 us (10 %) with the scheduler alone,
    and a healthy two-rank run of 4,000 small all-reduces gave 14 "degradation"
    verdicts against baselines of 19 and 72 us."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self._batch: list[float] = []
        self._base: list[float] = []
        self.baseline: float | None = None
        self.cusum = 0.0
        self.active = False

    def reset(self) -> None:
        self._batch.clear()
        self._base.clear()
        self.baseline = None
        self.cusum = 0.0
        self.active = False

    @property
    def limit(self) -> float:
        cfg = self.config
        return cfg.degradation_limit * math.log1p(cfg.degradation_shift)

    @property
    def score(self) -> float:
        return self.cusum / self.limit

    def observe(self, value: float) -> bool:
        """Add one value; True on the batch at which the alarm first rings."""
        cfg = self.config
        self._batch.append(value)
        if len(self._batch) < cfg.degradation_batch:
            return False
        med = statistics.median(self._batch)
        self._batch.clear()
        if self.baseline is None:
            self._base.append(med)
            if len(self._base) >= cfg.degradation_baseline_batches:
                self.baseline = statistics.median(self._base)
            return False
        if self.baseline <= 0 or med <= 0:
            return False
        scale = max(self.baseline, cfg.min_excess_s / cfg.degradation_shift)
        rel = max((med - self.baseline) / scale, -0.5)
        # one batch counts as at most a 2 x shift: a short blip cannot ring the alarm
        shift = min(math.log1p(rel), 2 * math.log1p(cfg.degradation_shift))
        step = shift - math.log1p(cfg.degradation_shift / 2)
        was = self.active
        if was and step <= 0:
            # a batch back under the reference ends the alarm: an unbounded CUSUM
            # built up over a long degradation took tens of thousands of healthy ops
            # to fall back below the limit, the verdict standing all along
            self.cusum, self.active = 0.0, False
            return False
        self.cusum = max(0.0, self.cusum + step)
        self.active = self.cusum >= self.limit
        return self.active and not was


class LocalDetector:
    """What one rank decides from its own samples (slow link, straggler, degradation).

    A flagged incoming cell ``peer -> me`` is a straggler when the peer's
    first-to-last-byte transfer stayed within the ratio threshold of its own baseline
    (it came late but then moved at its usual pace), a slow link otherwise. An outgoing
    cell ``me -> peer`` (the kernel refused data) is always a slow link. A flagged cell
    keeps the kind it was last judged as: its score is exported under that kind."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.links = SlowLinkDetector(config)
        self._transfer: dict[tuple[str, int, int], RobustBaseline] = {}
        self._degradation: dict[tuple[str, int, int], DegradationDetector] = {}
        self._deg_seen: dict[tuple[str, int, int], int] = {}
        self._kind: dict[Cell, str] = {}  # the kind a flagged cell was last judged as
        self._standing: dict[Cell, Verdict] = {}
        self._deg_standing: dict[tuple[str, int, int], Verdict] = {}
        self._rank: int | None = None
        self._ops = 0

    def reset(self) -> None:
        self.links.reset()
        self._transfer.clear()
        self._degradation.clear()
        self._deg_seen.clear()
        self._kind.clear()
        self._standing.clear()
        self._deg_standing.clear()
        self._ops = 0

    def observe(self, sample: OpSample, now: float) -> list[Verdict]:
        """Judge one op; returns the verdicts that start with it (see :meth:`standing`
        for those that still stand)."""
        if not sample.ok:
            return []
        cfg = self.config
        self._rank = sample.rank
        self._ops += 1
        b = size_bucket(sample.nbytes)
        transfers: dict[int, float] = {}
        for link in sample.links:
            t = link.transfer_s
            if t is not None and link.bytes_recv > 0:
                transfers[link.peer] = t
        out: list[Verdict] = []
        for hit in self.links.observe(local_cells(sample), cross=False):
            _op, _b, src, dst = hit.cell
            kind = "slow_link"
            peer = src if dst == sample.rank else dst
            if dst == sample.rank:
                base = self._transfer.get((sample.op, b, src))
                t = transfers.get(src)
                if base is not None and len(base) >= cfg.min_baseline and t is not None:
                    med, _scale = base.stats()
                    normal = t <= max(med * cfg.ratio_threshold, med + cfg.min_excess_s)
                    if normal:
                        kind = "straggler"
            if not hit.new and hit.cell in self._standing:
                # still standing: the verdict stays what it was when it started (an op
                # of a standing cell that was itself normal would judge it a
                # "straggler" of score 0 and issue that as a new verdict)
                continue
            self._kind[hit.cell] = kind
            v = Verdict(
                kind,
                peer,
                hit.score,
                now,
                sample.epoch,
                sample.seq,
                src,
                dst,
                f"op={sample.op} bucket={b} value={hit.value:.6f}s median={hit.median:.6f}s",
            )
            self._standing[hit.cell] = v
            if hit.new:
                out.append(v)
        for cell in [c for c in self._standing if not self.links.stands(c)]:
            del self._standing[cell]
        for peer, t in transfers.items():
            key = (sample.op, b, peer)
            self._transfer.setdefault(key, RobustBaseline(cfg.window)).add(t)
        # degradation of each incoming peer's first-byte wait, against its own baseline
        for link in sample.links:
            if link.bytes_recv > 0 and link.first_byte_s is not None:
                key = (sample.op, b, link.peer)
                det = self._degradation.get(key)
                if det is None:
                    det = self._degradation[key] = DegradationDetector(cfg)
                self._deg_seen[key] = self._ops
                rang = det.observe(link.last_byte_s or link.first_byte_s)
                if not det.active:
                    self._deg_standing.pop(key, None)
                    continue
                was = self._deg_standing.get(key)
                if rang or was is None or was.score != det.score:  # a new batch moved it
                    v = Verdict(
                        "degradation",
                        link.peer,
                        det.score,
                        now,
                        sample.epoch,
                        sample.seq,
                        link.peer,
                        sample.rank,
                        f"op={sample.op} bucket={b} cusum={det.cusum:.3f} "
                        f"baseline={det.baseline or 0.0:.6f}s",
                    )
                    self._deg_standing[key] = v
                    if rang:
                        out.append(v)
        oldest = self._ops - cfg.window  # a degradation no op measures any more is over
        for key in [k for k in self._deg_standing if self._deg_seen.get(k, 0) <= oldest]:
            del self._deg_standing[key]
        return out

    def standing(self) -> list[Verdict]:
        """The latest verdict of every anomaly that still stands (a slow-link or
        straggler cell until none of its last ``n`` ops was a hit, a degradation until
        its CUSUM falls below the limit): the Monitor renews these on every op."""
        return [*self._standing.values(), *self._deg_standing.values()]

    def peer_scores(self) -> dict[tuple[str, int], float]:
        """Current score per (kind, peer) for the gauges: the max over the peer's cells
        observed in the last ``window`` ops (a cell no op measures any more drops out),
        each under the kind it was last judged as (slow_link or straggler)."""
        recent = self.config.window
        out: dict[tuple[str, int], float] = {}
        for cell, s in self.links.scores(recent).items():
            _op, _b, src, dst = cell
            peer = src if dst == self._rank else dst
            key = (self._kind.get(cell, "slow_link"), peer)
            out[key] = max(out.get(key, 0.0), s)
        oldest = self._ops - recent
        for k, det in self._degradation.items():
            if self._deg_seen.get(k, 0) > oldest:
                key = ("degradation", k[2])
                out[key] = max(out.get(key, 0.0), det.score)
        return out


class ClusterDetector:
    """The sender x receiver matrix over every rank's sample of the same op.

    Needs each rank's op start on one clock (``starts``; ranks on one host share
    ``time.monotonic()``; across hosts the clock offsets must be corrected first). A cell
    is the link's latency ``start[dst] + first_byte - start[src]``: collectives send
    their own data first, so that is when the sender's first frame arrived counted
    from when it was sent. In a steady loop a slow link's latency shifts the
    receiver's later starts, so the receiver-relative wait alone would hide part of
    it. A first byte within ``censor_s`` of the receiver's start was already waiting
    (the receiver came late): the link is not to blame and the cell counts as 0.

    Stragglers are judged apart from links: a rank's lateness is its start minus the
    median start of the others; it is a straggler when that lateness is anomalous
    against its own baseline and against the others' (robust z, ratio, k of n) and its
    own op was short -- it arrived last and waited for nobody, which a rank delayed by a
    slow link into it does not do."""

    def __init__(self, config: DetectorConfig, censor_s: float = 0.00005) -> None:
        self.config = config
        self.censor_s = censor_s
        self.links = SlowLinkDetector(config)
        self.late = SlowLinkDetector(config)
        self._stragglers: set[int] = set()
        self._standing: dict[Cell, Verdict] = {}
        self._standing_stragglers: dict[int, Verdict] = {}

    def reset(self) -> None:
        self.links.reset()
        self.late.reset()
        self._stragglers.clear()
        self._standing.clear()
        self._standing_stragglers.clear()

    def standing(self) -> list[Verdict]:
        """The latest verdict of every slow link and straggler that still stands."""
        return [*self._standing.values(), *self._standing_stragglers.values()]

    def cells(self, samples: Sequence[OpSample], starts: Mapping[int, float]) -> dict[Cell, float]:
        out: dict[Cell, float] = {}
        for s in samples:
            b = size_bucket(s.nbytes)
            for link in s.links:
                if link.bytes_recv <= 0 or link.first_byte_s is None or link.peer not in starts:
                    continue
                fb = link.first_byte_s
                value = 0.0
                if fb > self.censor_s:
                    value = max(0.0, starts[s.rank] + fb - starts[link.peer])
                out[(s.op, b, link.peer, s.rank)] = value
        return out

    def observe(
        self, samples: Sequence[OpSample], starts: Mapping[int, float], now: float
    ) -> list[Verdict]:
        """``samples``: one per rank for the same op; ``starts[rank]``: its op start."""
        ok = [s for s in samples if s.ok and s.rank in starts]
        if len(ok) < 2:
            return []
        epoch, seq, op = ok[0].epoch, ok[0].seq, ok[0].op
        b = size_bucket(ok[0].nbytes)
        out: list[Verdict] = []
        for hit in self.links.observe(self.cells(ok, starts), cross=True):
            _op, _b, src, dst = hit.cell
            v = Verdict(
                "slow_link",
                src,
                hit.score,
                now,
                epoch,
                seq,
                src,
                dst,
                f"op={op} bucket={b} latency={hit.value:.6f}s median={hit.median:.6f}s",
            )
            self._standing[hit.cell] = v
            if hit.new:
                out.append(v)
        for cell in [c for c in self._standing if not self.links.stands(c)]:
            del self._standing[cell]
        durations = {s.rank: s.duration_s for s in ok}
        lateness: dict[Cell, float] = {}
        for r in durations:
            others = [starts[q] for q in durations if q != r]
            lateness[(op, b, r, r)] = max(0.0, starts[r] - statistics.median(others))
        hits = self.late.observe(lateness, cross=True)
        self._stragglers &= {h.cell[2] for h in hits}
        for r in [q for q in self._standing_stragglers if q not in self._stragglers]:
            del self._standing_stragglers[r]
        for hit in hits:
            r = hit.cell[2]
            others_d = [d for q, d in durations.items() if q != r]
            excess = hit.value - hit.median
            if durations[r] > statistics.median(others_d) - 0.5 * excess:
                continue  # it was late but then waited like everyone: not its fault
            v = Verdict(
                "straggler",
                r,
                hit.score,
                now,
                epoch,
                seq,
                detail=f"op={op} bucket={b} late={hit.value:.6f}s median={hit.median:.6f}s",
            )
            self._standing_stragglers[r] = v
            if r not in self._stragglers:
                self._stragglers.add(r)
                out.append(v)
        return out

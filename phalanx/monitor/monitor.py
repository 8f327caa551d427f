"""The daemon's monitor: a CommObserver that updates metrics, runs detectors, keeps verdicts.

``Monitor(rank)`` owns a :class:`~phalanx.monitor.metrics.Metrics` on its own registry.
Hand ``monitor.observer`` to ``Group(..., observer=...)``; connect the engine with
:meth:`Monitor.attach` (hang checks read ``engine.inflight()``, the scrape reads
``engine.link_stats()``); call :meth:`Monitor.set_view` on every view change (baselines,
verdicts, strikes and anomaly series against ranks reset; departed peers' series
removed). :meth:`Monitor.start` runs the hang-check thread; :meth:`Monitor.serve` adds
the HTTP endpoint (:mod:`phalanx.monitor.server`); :meth:`Monitor.close` stops and
joins both.

Every verdict is logged as an audit line (``event=anomaly kind=... peer=...``), counted
in ``phalanx_anomalies_total{kind}``, kept (bounded) for ``/anomalies``, and -- for a
straggler with ``evict_after`` verdicts, when the opt-in ``on_evict`` callback is set --
reported for eviction (the daemon connects ``agent.report_failure``). A verdict stays
active while its anomaly stands: every op renews it, and it is issued again every
``renew_s`` (so a persistent straggler collects strikes); it ends ``active_s`` after its
last renewal, checked on the data path and by the hang thread (not only when someone
polls /healthz). Expiry, renewal and strikes run on the monotonic clock.

What it must never do: raise into the engine (its thread, or a caller's starting an op
inline), block it (the observer methods take one short lock), or call back into the
group.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter

from phalanx.comm.observer import OpSample
from phalanx.errors import ConfigError
from phalanx.monitor.detectors import (
    ClusterDetector,
    DetectorConfig,
    HangDetector,
    LocalDetector,
    Verdict,
)
from phalanx.monitor.metrics import LinkTcp, Metrics

if TYPE_CHECKING:
    from phalanx.monitor.server import MetricsServer

__all__ = ["ClusterView", "EngineLike", "Monitor", "MonitorConfig"]

log = logging.getLogger(__name__)
#: longest sleep of the hang thread while no op runs (a backstop: an op start wakes it)
_IDLE_WAIT_S = 1.0
#: longest sleep of the hang thread while an op runs that cannot hang before then:
#: the hang gauges (last progress, score) are at most this stale during a long op
_BUSY_WAIT_S = 1.0
audit = logging.getLogger("phalanx.audit.anomaly")


class EngineLike(Protocol):
    def inflight(self) -> tuple[str, int, float, float] | None: ...
    def link_stats(self) -> Sequence[object]: ...


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    detectors: DetectorConfig = field(default_factory=DetectorConfig)
    #: how often the background thread checks for a hang (seconds)
    hang_check_s: float = 0.1
    #: verdicts kept for /anomalies
    keep_verdicts: int = 256
    #: a verdict stays "active" in phalanx_anomaly_active this long after its last
    #: renewal (every op renews the verdicts whose anomaly still stands)
    active_s: float = 60.0
    #: a verdict that still stands is issued again (counted, logged, a straggler
    #: strike) this long after it was last issued; ``None``: ``min(10, active_s)``
    renew_s: float | None = None
    #: straggler verdicts against one peer (within ``active_s`` of each other) before
    #: ``on_evict`` is called; the policy is off unless ``on_evict`` is given
    evict_after: int = 3
    #: the daemon's opt-in: report a persistent straggler to the coordinator for eviction
    evict_stragglers: bool = False

    def __post_init__(self) -> None:
        if not self.hang_check_s > 0 or self.keep_verdicts < 1 or self.evict_after < 1:
            raise ConfigError("need hang_check_s > 0, keep_verdicts >= 1, evict_after >= 1")
        if not self.active_s > 0:
            raise ConfigError("need active_s > 0")
        if self.renew_s is None:
            object.__setattr__(self, "renew_s", min(10.0, self.active_s))
        elif not 0 < self.renew_s <= self.active_s:
            raise ConfigError("need 0 < renew_s <= active_s")


class ClusterView:
    """The sender x receiver matrix when every rank's samples reach one place.

    Monitors given ``cluster=view`` forward each finished op with its start time
    (``time.monotonic()``: valid as one clock only for ranks on one host -- embedded
    mode, tests, the bench; across hosts the daemon must correct clock offsets first).
    When all ``world`` ranks have reported an op, the :class:`ClusterDetector` judges it
    and ``record`` receives each new verdict (e.g. ``monitors[v.dst or 0].record``);
    ``renew``, if given, receives after every judged op each verdict that still stands
    (e.g. ``monitors[...].renew``: it keeps them active). Samples of an older epoch than
    the newest seen are ignored; a newer epoch resets the baselines."""

    def __init__(
        self,
        world: int,
        record: Callable[[Verdict], None],
        config: DetectorConfig | None = None,
        clock: Callable[[], float] = time.time,
        renew: Callable[[Verdict], None] | None = None,
    ) -> None:
        self.world = world
        self._record = record
        self._renew = renew
        self._clock = clock
        self._lock = threading.Lock()
        self._detector = ClusterDetector(config or DetectorConfig())
        self._ops: dict[tuple[int, int], dict[int, tuple[OpSample, float]]] = {}
        self._epoch: int | None = None

    def add(self, sample: OpSample, start: float) -> None:
        with self._lock:
            if self._epoch is not None and sample.epoch < self._epoch:
                return  # a late sample of an older view: its op can never complete
            if sample.epoch != self._epoch:
                self._detector.reset()
                self._ops.clear()
                self._epoch = sample.epoch
            key = (sample.epoch, sample.seq)
            got = self._ops.setdefault(key, {})
            got[sample.rank] = (sample, start)
            if len(got) < self.world:
                if len(self._ops) > 64:  # a rank stopped reporting: drop the oldest op
                    self._ops.pop(min(self._ops))
                return
            del self._ops[key]
            samples = [s for s, _ in got.values()]
            starts = {r: t for r, (_, t) in got.items()}
            verdicts = self._detector.observe(samples, starts, self._clock())
            standing = self._detector.standing() if self._renew is not None else []
        for v in verdicts:
            self._record(v)
        if self._renew is not None:
            for v in standing:
                self._renew(v)


class _Observer:
    """The CommObserver face (kept separate so the Monitor's own API stays small)."""

    def __init__(self, monitor: Monitor) -> None:
        self._m = monitor

    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        self._m._op_started(op, seq, epoch, nbytes)

    def op_finished(self, sample: OpSample) -> None:
        self._m._ops_finished((sample,))

    def ops_finished(self, samples: Sequence[OpSample]) -> None:
        """Several finished ops at once, oldest first (see Monitor._ops_finished)."""
        self._m._ops_finished(samples)


@dataclass(slots=True)
class _Active:
    """A standing verdict: ``since`` (wall clock, for display) and, on the monotonic
    clock, when it was last renewed (expiry) and last issued (re-issue, strikes)."""

    since: float
    renewed: float
    issued: float


_HANG = ("hang", None)


class Monitor:
    """Metrics, detectors and verdicts of one daemon (one rank).

    ``clock`` (``time.time``) stamps verdicts and the ``*_timestamp_seconds`` gauges;
    ``monotonic`` (``time.monotonic``, the engine's clock) times hang checks, verdict
    expiry, renewal and straggler strikes, so a wall-clock step never moves them. A
    fake ``clock`` given without ``monotonic`` (a test's) drives both."""

    def __init__(
        self,
        rank: int,
        *,
        registry: CollectorRegistry | None = None,
        config: MonitorConfig | None = None,
        on_evict: Callable[[int, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        cluster: ClusterView | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.rank = rank
        self.config = config or MonitorConfig()
        self.metrics = Metrics(registry)
        self.registry = self.metrics.registry
        self.observer = _Observer(self)
        self.on_evict = on_evict
        self._clock = clock
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self._mono = monotonic
        self._lock = threading.Lock()
        self._local = LocalDetector(self.config.detectors)
        self._hang = HangDetector(self.config.detectors)
        self._verdicts: deque[Verdict] = deque(maxlen=self.config.keep_verdicts)
        self._active: dict[tuple[str, int | None], _Active] = {}
        self._strikes: dict[int, tuple[int, float]] = {}  # peer -> (strikes, last strike)
        self._evicted: set[int] = set()
        self._scored: set[tuple[str, int]] = set()  # score gauges the detectors last set
        self._epoch: int | None = None
        self._members: frozenset[int] | None = None  # None: not known yet (any peer)
        self._engine: EngineLike | None = None
        self._stop = threading.Event()
        # set by every op start (and close): the hang thread sleeps on it while idle
        self._op_began = threading.Event()
        self._idle = True
        #: (monotonic) when the op in flight at the last check would first count as
        #: hung if it made no more progress; None: none was in flight
        self._due: float | None = None
        self._thread: threading.Thread | None = None
        self._server: MetricsServer | None = None
        self.ops_seen = 0
        self.cluster = cluster
        self._start_mono = 0.0
        self.metrics.rank.set(rank)

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: EngineLike | None) -> None:
        """Use ``engine`` for hang checks and TCP_INFO (``None`` detaches)."""
        self._engine = engine
        if engine is None:
            self.metrics.tcp.provider = None
            return

        def tcp() -> list[LinkTcp]:
            out = []
            for s in engine.link_stats():
                out.append(
                    LinkTcp(
                        peer=int(getattr(s, "peer")),  # noqa: B009 - duck-typed LinkStats
                        stream=int(getattr(s, "stream", 0)),
                        rtt_s=getattr(s, "rtt_s", None),
                        retransmits=getattr(s, "retransmits", None),
                    )
                )
            return out

        self.metrics.tcp.provider = tcp

    def set_view(self, epoch: int, members: Sequence[int], rank: int) -> None:
        """A new view: reset every baseline and every verdict against a peer, drop the
        series of peers that left."""
        with self._lock:
            self.rank = rank
            self._epoch = epoch
            self._members = frozenset(members)
            self._view_change_locked()
            keep = {str(m) for m in members}
            for peer in self.metrics.peers() - keep:
                self.metrics.forget_peer(peer)
        self.metrics.set_view(epoch, len(members), rank)
        audit.info(
            "event=view-baselines-reset epoch=%d members=%s rank=%d", epoch, list(members), rank
        )

    def _view_change_locked(self) -> None:
        """Ranks are renumbered on a view change: no verdict, strike, eviction or anomaly
        series against a rank survives it. The hang detector keeps its op durations (a
        view's first ops would otherwise be judged against the 1 s floor) and the op it
        reported (a hang that spans the change stays one hang, and ``/healthz`` stays
        503 while that op is in flight)."""
        self._local.reset()
        self._strikes.clear()
        self._evicted.clear()
        self._scored.clear()
        hang = self._active.get(_HANG)
        self._active = {_HANG: hang} if hang is not None else {}
        self.metrics.forget_anomalies(keep="any")

    def _peer_ok_locked(self, peer: int) -> bool:
        """Whether ``peer`` is a member of the current view (series may be written)."""
        return self._members is None or peer in self._members

    def start(self) -> None:
        """Start the hang-check thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"phalanx-monitor-{self.rank}", daemon=True
        )
        self._thread.start()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve /metrics, /healthz and /anomalies; returns the bound (host, port)."""
        from phalanx.monitor.server import MetricsServer

        if self._server is None:
            self._server = MetricsServer(self, host, port)
        return self._server.address

    def close(self, timeout: float = 5.0) -> None:
        """Stop the HTTP server and the hang thread and join them. Idempotent."""
        self._stop.set()
        self._op_began.set()
        if self._server is not None:
            self._server.close(timeout)
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - the loop waits at most hang_check_s
                log.error("event=monitor-thread-stuck rank=%d", self.rank)
            self._thread = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ observer
    def _op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        self._op_began.set()
        self._start_mono = time.monotonic()
        self.metrics.op_inflight.set(1)
        self.metrics.op_last_progress.set(self._clock())

    def _ops_finished(self, samples: Sequence[OpSample]) -> None:
        """Finished ops, oldest first (the daemon feeds them in batches, ~20 ms after
        they ended). Histograms and detectors see every op; counters get one increment
        per series. What a scrape reads afterwards is what feeding the ops one at a time
        gives. A late op of a view this monitor has left (set_view came first) counts
        as an op, but neither moves the view back nor brings back its peers' series:
        per-peer series are written under the lock, and only for members of the view
        (a set_view between reading the view and writing cannot be raced)."""
        if not samples:
            return
        m = self.metrics
        now = self._clock()
        counts: dict[tuple[Counter, tuple[str, ...]], float] = {}

        def count(metric: Counter, labels: tuple[str, ...], amount: float) -> None:
            key = (metric, labels)
            counts[key] = counts.get(key, 0.0) + amount

        for sample in samples:
            outcome = "ok" if sample.ok else "failed"
            m.child(m.op_duration, sample.op, sample.algorithm, outcome).observe(sample.duration_s)
            count(m.op_payload, (sample.op,), sample.nbytes)
            if not sample.ok:
                count(m.op_failures, (sample.op, sample.reason or "unknown"), 1)
        for (metric, labels), amount in counts.items():
            m.child(metric, *labels).inc(amount)
        counts.clear()
        with self._lock:
            current = self._epoch
            for sample in samples:
                if current is not None and sample.epoch < current:
                    continue  # its peers' series were dropped with the view
                members = self._members if sample.epoch == current else None
                for link in sample.links:
                    if link.bytes_sent == 0 and link.bytes_recv == 0:
                        continue
                    if members is not None and link.peer not in members:
                        continue  # not in this view: never (re)create its series
                    p = m.peer_seen(link.peer)
                    if link.bytes_sent:
                        count(m.link_sent, (p,), link.bytes_sent)
                        m.child(m.link_send_blocked, p).observe(link.send_blocked_s)
                    if link.bytes_recv:
                        count(m.link_received, (p,), link.bytes_recv)
                        if link.first_byte_s is not None:
                            m.child(m.link_first_byte_wait, p).observe(max(0.0, link.first_byte_s))
                        t = link.transfer_s
                        if t is not None:
                            m.child(m.link_transfer, p).observe(max(0.0, t))
            for (metric, labels), amount in counts.items():
                m.child(metric, *labels).inc(amount)
        last = samples[-1]
        if last.started + last.duration_s >= self._start_mono:
            m.op_inflight.set(0)  # else the next op started after it ended, and runs
        m.op_last_finished.set(now)
        # the detectors, one view at a time: a view change inside the batch resets the
        # baselines only after the older view's verdicts are recorded (strikes and all)
        for _, view_samples in itertools.groupby(samples, key=lambda s: s.epoch):
            self._detect(list(view_samples), now)
        self.expire()
        if self.cluster is not None:
            for sample in samples:
                self.cluster.add(sample, sample.started)

    def _detect(self, samples: Sequence[OpSample], now: float) -> None:
        """Detectors and anomaly gauges for finished ops of one view epoch."""
        m = self.metrics
        epoch = samples[0].epoch
        per_op: list[list[Verdict]] = []
        with self._lock:
            self.ops_seen += len(samples)
            if self._epoch is not None and epoch < self._epoch:
                return  # an older view's op, fed after set_view: its baselines are gone
            if self._epoch != epoch:
                if self._epoch is not None:
                    self._view_change_locked()
                self._epoch = epoch
                self._members = frozenset(range(samples[-1].world))
                m.view_epoch.set(epoch)
                m.view_members.set(samples[-1].world)
            for sample in samples:
                if sample.patient:
                    # a wait by protocol (a state transfer's verdict, seconds long):
                    # in the hang limit's history three of them would raise the limit
                    # to 10x the wait for every op; to the link detectors the late
                    # peer would look like a straggler
                    per_op.append([])
                    continue
                if sample.ok:
                    self._hang.observe_duration(sample.duration_s)
                per_op.append(self._local.observe(sample, now))
            scores = self._local.peer_scores()
            standing = self._local.standing()
        # the order op-by-op feeding writes the gauges in: each op's scores, then its
        # verdicts (a verdict's record sets its own score), so the last op's come last
        for verdicts in per_op[:-1]:
            for v in verdicts:
                self.record(v)
        with self._lock:
            if self._epoch == epoch:  # else a set_view came in between: scores are void
                self._write_scores_locked(scores)
        for v in per_op[-1]:
            self.record(v)
        for v in standing:  # every op keeps the verdicts that still stand fresh
            self.renew(v)

    def _write_scores_locked(self, scores: dict[tuple[str, int], float]) -> None:
        """The detectors' scores per (kind, peer); a score the detectors no longer
        give (the peer's cells went quiet, or the cell changed kind) goes back to 0."""
        m = self.metrics
        written: set[tuple[str, int]] = set()
        for (kind, peer), score in scores.items():
            if peer != self.rank and self._peer_ok_locked(peer):
                m.child(m.anomaly_score, kind, m.peer_seen(peer)).set(round(score, 4))
                written.add((kind, peer))
        for kind, peer in self._scored - written:
            if self._peer_ok_locked(peer):
                m.child(m.anomaly_score, kind, str(peer)).set(0)
        self._scored = written

    # ------------------------------------------------------------------ verdicts
    def record(self, verdict: Verdict) -> None:
        """Count, log, keep and export one verdict (also for verdicts made elsewhere,
        e.g. a cluster-wide matrix), and apply the eviction policy. A verdict of an
        older view, or against a rank that is not a member, is counted, logged and
        kept, but sets no gauge and no strike (its rank may name another host now)."""
        m = self.metrics
        mono = self._mono()
        kind, who = verdict.kind, verdict.peer
        peer = "any" if who is None else str(who)
        evict: int | None = None
        with self._lock:
            self._verdicts.append(verdict)
            m.child(m.anomalies, kind).inc()
            live = (self._epoch is None or verdict.epoch >= self._epoch) and (
                who is None or self._peer_ok_locked(who)
            )
            if live:
                if who is not None:
                    m.peer_seen(who)
                m.child(m.anomaly_score, kind, peer).set(round(verdict.score, 4))
                if who is not None:  # the detectors' next scores write over (or zero) it
                    self._scored.add((kind, who))
                m.child(m.anomaly_active, kind, peer).set(1)
                a = self._active.get((kind, who))
                if a is None:
                    self._active[(kind, who)] = _Active(verdict.at, mono, mono)
                else:
                    a.renewed = a.issued = mono
            if live and kind == "straggler" and who is not None:
                strikes, last = self._strikes.get(who, (0, -math.inf))
                strikes = strikes + 1 if mono - last <= self.config.active_s else 1
                self._strikes[who] = (strikes, mono)
                if (
                    self.on_evict is not None
                    and strikes >= self.config.evict_after
                    and who not in self._evicted
                ):
                    self._evicted.add(who)
                    evict = who
        audit.warning(
            "event=anomaly kind=%s peer=%s src=%s dst=%s score=%.2f epoch=%d seq=%s rank=%d %s",
            kind,
            peer,
            verdict.src,
            verdict.dst,
            verdict.score,
            verdict.epoch,
            verdict.seq,
            self.rank,
            verdict.detail,
        )
        if evict is not None and self.on_evict is not None:
            audit.warning(
                "event=evict-request peer=%d reason=straggler strikes=%d epoch=%d rank=%d",
                evict,
                self.config.evict_after,
                verdict.epoch,
                self.rank,
            )
            try:
                self.on_evict(evict, "straggler")
            except Exception:
                log.exception("event=evict-callback-failed peer=%d", evict)

    def renew(self, verdict: Verdict) -> None:
        """``verdict`` still stands (a detector's ``standing()``): keep it active. It is
        issued again -- counted, logged, a straggler strike -- when it is not active
        (new, or expired) or ``renew_s`` has passed since it was last issued, so a
        persistent straggler reaches ``evict_after`` while it persists."""
        mono = self._mono()
        with self._lock:
            if self._epoch is not None and verdict.epoch < self._epoch:
                return
            if verdict.peer is not None and not self._peer_ok_locked(verdict.peer):
                return
            a = self._active.get((verdict.kind, verdict.peer))
            renew_s = self.config.renew_s
            assert renew_s is not None  # resolved by MonitorConfig.__post_init__
            if a is not None and mono - a.issued < renew_s:
                a.renewed = mono
                return
        if a is not None:
            verdict = replace(verdict, detail=f"{verdict.detail} (still standing)")
        self.record(verdict)

    def verdicts(self) -> list[Verdict]:
        with self._lock:
            return list(self._verdicts)

    def anomalies(self) -> dict[str, object]:
        """What /anomalies serves: active verdicts and the recent ones, newest last."""
        with self._lock:
            self._expire_locked(self._mono())
            active = [
                {"kind": k, "peer": p, "since": a.since} for (k, p), a in self._active.items()
            ]
            recent = [v.as_dict() for v in self._verdicts]
            return {
                "rank": self.rank,
                "epoch": self._epoch,
                "ops_seen": self.ops_seen,
                "active": active,
                "recent": recent,
            }

    def expire(self) -> None:
        """End the verdicts not renewed for ``active_s`` (the data path and the hang
        thread call this; so does every HTTP request, but nothing depends on that)."""
        with self._lock:
            self._expire_locked(self._mono())

    def _expire_locked(self, mono: float) -> None:
        for key, a in list(self._active.items()):
            if mono - a.renewed > self.config.active_s:
                del self._active[key]
                if key[1] is None or self._peer_ok_locked(key[1]):
                    peer = "any" if key[1] is None else str(key[1])
                    self.metrics.child(self.metrics.anomaly_active, key[0], peer).set(0)

    def healthy(self) -> tuple[bool, str]:
        """/healthz: unhealthy while a hang verdict stands or the hang thread died."""
        with self._lock:
            self._expire_locked(self._mono())
            hung = _HANG in self._active
        if self._thread is not None and not self._thread.is_alive():
            return False, "hang-check thread is not running"
        if hung:
            return False, "an operation is hung"
        return True, "ok"

    # ------------------------------------------------------------------ hang thread
    def check_hang(self) -> Verdict | None:
        """One hang check now (the thread calls this every ``hang_check_s``)."""
        engine = self._engine
        self._idle = True
        self._due = None
        if engine is None:
            return None
        try:
            inflight = engine.inflight()
        except Exception:
            return None
        mono = self._mono()
        m = self.metrics
        self._idle = inflight is None
        restalled = False
        with self._lock:
            # a hang verdict stands while the op it named is in flight *and* still makes
            # no progress by the detector's own rule (idle >= its limit); it ends as soon
            # as that op progresses again, or another op (or none) runs
            a = self._active.get(_HANG)
            flagged = self._hang.is_flagged(inflight)
            stalled = inflight is not None and mono - inflight[3] >= self._hang.threshold()
            if a is not None and flagged and stalled:
                a.renewed = mono
            elif a is not None:
                del self._active[_HANG]
                m.child(m.anomaly_active, "hang", "any").set(0)
            elif flagged and stalled:
                # the reported op progressed (its verdict ended) and stalled again: the
                # detector reports an op once, so this is issued here
                restalled = True
        if inflight is None:
            m.op_inflight.set(0)
            m.child(m.anomaly_score, "hang", "any").set(0)
            return None
        # progress is on the monotonic clock: convert to this monitor's clock
        m.op_inflight.set(1)
        m.op_last_progress.set(self._clock() - (mono - inflight[3]))
        with self._lock:
            hit = self._hang.check(mono, inflight)
            score = self._hang.score(mono, inflight)
            epoch = self._epoch if self._epoch is not None else -1
            limit = self._hang.threshold()
        self._due = inflight[3] + limit
        m.child(m.anomaly_score, "hang", "any").set(round(score, 4))
        if hit is None and restalled:
            hit = (score, inflight[0], inflight[1])
        if hit is None:
            return None
        s, op, seq = hit
        v = Verdict(
            "hang",
            None,
            s,
            self._clock(),
            epoch,
            seq,
            detail=f"op={op} no progress for {mono - inflight[3]:.3f}s (limit {limit:.3f}s)",
        )
        self.record(v)
        return v

    def _next_check(self) -> float:
        """How long the hang thread may sleep after a check: until the op in flight
        could first count as hung (its last progress + the threshold) -- an op of a
        few hundred ms then gets no check at all, where one every ``hang_check_s``
        cost a daemon ~0.5 ms of CPU per 64 MiB op on two busy cores -- but at least
        ``hang_check_s`` (once due: a standing verdict ends soon after progress) and
        at most :data:`_BUSY_WAIT_S`. After an idle spell the op that woke the thread
        started just now: it cannot hang before one threshold from now."""
        period = self.config.hang_check_s
        due = self._due
        if due is None:
            with self._lock:
                left = self._hang.threshold()
        else:
            left = due - self._mono()
        return min(_BUSY_WAIT_S, max(period, left))

    def _run(self) -> None:
        wait = self.config.hang_check_s
        while not self._stop.wait(wait):
            try:
                self.check_hang()
                self.expire()  # verdicts end on time even when nothing runs
            except Exception:  # pragma: no cover - never let the thread die silently
                log.exception("event=hang-check-error rank=%d", self.rank)
            if self._idle:
                # Nothing runs, so nothing can hang: sleep until an op starts (or the
                # backstop), not every hang_check_s -- an idle daemon's thread woke
                # ten times a second for nothing. An op that starts while this thread
                # is between the check and the wait has set the event: no sleep.
                self._op_began.wait(_IDLE_WAIT_S)
                self._op_began.clear()
            wait = self._next_check()

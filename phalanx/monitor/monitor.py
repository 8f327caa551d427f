"""The daemon's monitor: a CommObserver that updates metrics, runs detectors, keeps verdicts.

``Monitor(rank)`` owns a :class:`~phalanx.monitor.metrics.Metrics` on its own registry.
Hand ``monitor.observer`` to ``Group(..., observer=...)``; connect the engine with
:meth:`Monitor.attach` (hang checks read ``engine.inflight()``, the scrape reads
``engine.link_stats()``); call :meth:`Monitor.set_view` on every view change (baselines
reset, departed peers' series removed). :meth:`Monitor.start` runs the hang-check
thread; :meth:`Monitor.serve` adds the HTTP endpoint (:mod:`phalanx.monitor.server`);
:meth:`Monitor.close` stops and joins both.

Every verdict is logged once as an audit line (``event=anomaly kind=... peer=...``),
counted in ``phalanx_anomalies_total{kind}``, kept (bounded) for ``/anomalies``, and
-- for a straggler that persists ``evict_after`` verdicts, when the opt-in ``on_evict``
callback is set -- reported for eviction (the daemon connects ``agent.report_failure``).

What it must never do: raise into the engine thread, block it (the observer methods
take one short lock), or call back into the group.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter

from phalanx.comm.observer import OpSample
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
    #: a verdict stays "active" in phalanx_anomaly_active this long after its last renewal
    active_s: float = 60.0
    #: straggler verdicts against one peer (within ``active_s`` of each other) before
    #: ``on_evict`` is called; the policy is off unless ``on_evict`` is given
    evict_after: int = 3
    #: the daemon's opt-in: report a persistent straggler to the coordinator for eviction
    evict_stragglers: bool = False


class ClusterView:
    """The sender x receiver matrix when every rank's samples reach one place.

    Monitors given ``cluster=view`` forward each finished op with its start time
    (``time.monotonic()``: valid as one clock only for ranks on one host -- embedded
    mode, tests, the bench; across hosts the daemon must correct clock offsets first).
    When all ``world`` ranks have reported an op, the :class:`ClusterDetector` judges it
    and ``record`` receives each verdict (e.g. ``monitors[v.dst or 0].record``)."""

    def __init__(
        self,
        world: int,
        record: Callable[[Verdict], None],
        config: DetectorConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self._record = record
        self._clock = clock
        self._lock = threading.Lock()
        self._detector = ClusterDetector(config or DetectorConfig())
        self._ops: dict[tuple[int, int], dict[int, tuple[OpSample, float]]] = {}
        self._epoch: int | None = None

    def add(self, sample: OpSample, start: float) -> None:
        with self._lock:
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
        for v in verdicts:
            self._record(v)


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


class Monitor:
    """Metrics, detectors and verdicts of one daemon (one rank)."""

    def __init__(
        self,
        rank: int,
        *,
        registry: CollectorRegistry | None = None,
        config: MonitorConfig | None = None,
        on_evict: Callable[[int, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        cluster: ClusterView | None = None,
    ) -> None:
        self.rank = rank
        self.config = config or MonitorConfig()
        self.metrics = Metrics(registry)
        self.registry = self.metrics.registry
        self.observer = _Observer(self)
        self.on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._local = LocalDetector(self.config.detectors)
        self._hang = HangDetector(self.config.detectors)
        self._verdicts: deque[Verdict] = deque(maxlen=self.config.keep_verdicts)
        self._active: dict[tuple[str, int | None], float] = {}  # -> last renewal (clock)
        self._strikes: dict[int, int] = {}
        self._evicted: set[int] = set()
        self._epoch: int | None = None
        self._engine: EngineLike | None = None
        self._stop = threading.Event()
        # set by every op start (and close): the hang thread sleeps on it while idle
        self._op_began = threading.Event()
        self._idle = True
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
        """A new view: reset every baseline, drop the series of peers that left."""
        with self._lock:
            self.rank = rank
            self._epoch = epoch
            self._reset_locked()
            keep = {str(m) for m in members}
            for peer in self.metrics.peers() - keep:
                self.metrics.forget_peer(peer)
            for key in [k for k in self._active if k[1] is not None and str(k[1]) not in keep]:
                del self._active[key]
        self.metrics.set_view(epoch, len(members), rank)
        audit.info(
            "event=view-baselines-reset epoch=%d members=%s rank=%d", epoch, list(members), rank
        )

    def _reset_locked(self) -> None:
        self._local.reset()
        self._hang.reset()
        self._strikes.clear()

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
        as an op, but neither moves the view back nor brings back its peers' series."""
        if not samples:
            return
        m = self.metrics
        now = self._clock()
        with self._lock:
            current = self._epoch
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
            if current is not None and sample.epoch < current:
                continue  # its peers' series were dropped with the view
            for link in sample.links:
                if link.bytes_sent == 0 and link.bytes_recv == 0:
                    continue
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
                    self._reset_locked()
                self._epoch = epoch
                m.view_epoch.set(epoch)
                m.view_members.set(samples[-1].world)
            for sample in samples:
                if sample.ok:
                    self._hang.observe_duration(sample.duration_s)
                per_op.append(self._local.observe(sample, now))
            scores = self._local.peer_scores()
        # the order op-by-op feeding writes the gauges in: each op's scores, then its
        # verdicts (a verdict's record sets its own score), so the last op's come last
        for verdicts in per_op[:-1]:
            for v in verdicts:
                self.record(v)
        for (kind, peer), score in scores.items():
            if peer != self.rank:
                m.child(m.anomaly_score, kind, m.peer_seen(peer)).set(round(score, 4))
        for v in per_op[-1]:
            self.record(v)

    # ------------------------------------------------------------------ verdicts
    def record(self, verdict: Verdict) -> None:
        """Count, log, keep and export one verdict (also for verdicts made elsewhere,
        e.g. a cluster-wide matrix), and apply the eviction policy."""
        m = self.metrics
        peer = "any" if verdict.peer is None else m.peer_seen(verdict.peer)
        m.child(m.anomalies, verdict.kind).inc()
        m.child(m.anomaly_score, verdict.kind, peer).set(round(verdict.score, 4))
        m.child(m.anomaly_active, verdict.kind, peer).set(1)
        audit.warning(
            "event=anomaly kind=%s peer=%s src=%s dst=%s score=%.2f epoch=%d seq=%s rank=%d %s",
            verdict.kind,
            peer,
            verdict.src,
            verdict.dst,
            verdict.score,
            verdict.epoch,
            verdict.seq,
            self.rank,
            verdict.detail,
        )
        evict: int | None = None
        with self._lock:
            self._verdicts.append(verdict)
            key = (verdict.kind, verdict.peer)
            last = self._active.get(key)
            self._active[key] = verdict.at
            if verdict.kind == "straggler" and verdict.peer is not None:
                fresh = last is not None and verdict.at - last <= self.config.active_s
                strikes = self._strikes.get(verdict.peer, 0) + 1 if fresh or last is None else 1
                self._strikes[verdict.peer] = strikes
                if (
                    self.on_evict is not None
                    and strikes >= self.config.evict_after
                    and verdict.peer not in self._evicted
                ):
                    self._evicted.add(verdict.peer)
                    evict = verdict.peer
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

    def verdicts(self) -> list[Verdict]:
        with self._lock:
            return list(self._verdicts)

    def anomalies(self) -> dict[str, object]:
        """What /anomalies serves: active verdicts and the recent ones, newest last."""
        now = self._clock()
        with self._lock:
            self._expire_locked(now)
            active = [{"kind": k, "peer": p, "since": t} for (k, p), t in self._active.items()]
            recent = [v.as_dict() for v in self._verdicts]
            return {
                "rank": self.rank,
                "epoch": self._epoch,
                "ops_seen": self.ops_seen,
                "active": active,
                "recent": recent,
            }

    def _expire_locked(self, now: float) -> None:
        for key, t in list(self._active.items()):
            if now - t > self.config.active_s:
                del self._active[key]
                peer = "any" if key[1] is None else str(key[1])
                self.metrics.child(self.metrics.anomaly_active, key[0], peer).set(0)

    def healthy(self) -> tuple[bool, str]:
        """/healthz: unhealthy while a hang verdict stands or the hang thread died."""
        with self._lock:
            self._expire_locked(self._clock())
            hung = any(k == "hang" for k, _ in self._active)
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
        if engine is None:
            return None
        try:
            inflight = engine.inflight()
        except Exception:
            return None
        mono = time.monotonic()
        m = self.metrics
        self._idle = inflight is None
        if inflight is None:
            m.op_inflight.set(0)
            m.child(m.anomaly_score, "hang", "any").set(0)
            with self._lock:
                if ("hang", None) in self._active:
                    del self._active[("hang", None)]
                    m.child(m.anomaly_active, "hang", "any").set(0)
            return None
        # progress is on the monotonic clock: convert to this monitor's clock
        m.op_inflight.set(1)
        m.op_last_progress.set(self._clock() - (mono - inflight[3]))
        with self._lock:
            hit = self._hang.check(mono, inflight)
            score = self._hang.score(mono, inflight)
            epoch = self._epoch if self._epoch is not None else -1
            limit = self._hang.threshold()
        m.child(m.anomaly_score, "hang", "any").set(round(score, 4))
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

    def _run(self) -> None:
        period = self.config.hang_check_s
        while not self._stop.wait(period):
            try:
                self.check_hang()
            except Exception:  # pragma: no cover - never let the thread die silently
                log.exception("event=hang-check-error rank=%d", self.rank)
            if self._idle:
                # Nothing runs, so nothing can hang: sleep until an op starts (or the
                # backstop), not every hang_check_s -- an idle daemon's thread woke
                # ten times a second for nothing. An op that starts while this thread
                # is between the check and the wait has set the event: no sleep.
                self._op_began.wait(_IDLE_WAIT_S)
                self._op_began.clear()

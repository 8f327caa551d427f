"""Every Prometheus metric phalanx exports, defined in one place.

Naming follows the Prometheus rules: prefix ``phalanx_``, base units (seconds, bytes),
``_total`` on counters, ``_seconds``/``_bytes`` suffixes, points in time as
``*_timestamp_seconds`` (Unix time) rather than ages, histograms rather than summaries.
Labels are small bounded sets: op kinds, algorithms, outcomes, anomaly kinds, state-sync
roles and peer ranks -- never steps, sequence numbers or tensor names. When a peer leaves
the view, :meth:`Metrics.forget_peer` removes every series labelled with it; on every view
change :meth:`Metrics.forget_anomalies` removes the anomaly series of all peers (ranks
are renumbered: none may inherit another host's verdict).

Each daemon owns one :class:`Metrics` built on its own ``CollectorRegistry`` (never the
process-global one), so several daemons in one process (tests, embedded mode) do not
collide. Code that measures something calls a method or sets a metric here; it never
creates a metric of its own.

What this module must never do: start threads, open sockets, or block. Scrape-time
values (TCP_INFO) come from a provider callable that must itself be quick.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from phalanx.membership.statesync import SyncOutcome

__all__ = [
    "ANOMALY_KINDS",
    "DURATION_BUCKETS",
    "LINK_BUCKETS",
    "LinkTcp",
    "Metrics",
]

_M = TypeVar("_M", Counter, Gauge, Histogram)

#: op durations: 100 us .. 60 s
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: per-link times inside one op (first-byte wait, transfer, send-blocked): 10 us .. 10 s
LINK_BUCKETS: tuple[float, ...] = (
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
#: snapshot stall (the training loop's one memory copy) and seal times
SNAPSHOT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: a state transfer takes longer than a seal for a large state (10 GB at 0.7 GB/s: 14 s)
SYNC_BUCKETS: tuple[float, ...] = (*SNAPSHOT_BUCKETS, 120.0, 300.0, 600.0)

#: a state transfer's ``role`` label's whole domain
SYNC_ROLES: tuple[str, ...] = ("sent", "received")

#: the anomaly kinds the detectors produce (the ``kind`` label's whole domain)
ANOMALY_KINDS: tuple[str, ...] = ("slow_link", "straggler", "hang", "degradation")


@dataclass(frozen=True, slots=True)
class LinkTcp:
    """What the kernel says about one link at scrape time (see ``Engine.link_stats``)."""

    peer: int
    stream: int
    rtt_s: float | None
    retransmits: int | None


class _TcpCollector(Collector):
    """Reads TCP_INFO through ``provider`` at scrape time: rtt gauge, retransmit counter."""

    def __init__(self, provider: Callable[[], Sequence[LinkTcp]] | None = None) -> None:
        self.provider = provider

    def collect(self) -> Iterable[Metric]:
        rtt = GaugeMetricFamily(
            "phalanx_link_rtt_seconds",
            "Smoothed TCP round-trip time of a data-plane link (TCP_INFO).",
            labels=["peer", "stream"],
        )
        retrans = CounterMetricFamily(
            "phalanx_link_retransmits",
            "TCP segments retransmitted on a data-plane link since it opened (TCP_INFO).",
            labels=["peer", "stream"],
        )
        stats: Sequence[LinkTcp] = ()
        if self.provider is not None:
            try:
                stats = self.provider()
            except Exception:  # a closing engine: report nothing rather than fail a scrape
                stats = ()
        for s in stats:
            labels = [str(s.peer), str(s.stream)]
            if s.rtt_s is not None:
                rtt.add_metric(labels, s.rtt_s)
            if s.retransmits is not None:
                retrans.add_metric(labels, float(s.retransmits))
        return [rtt, retrans]

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """The metric objects of one daemon, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # ---- collectives
        self.op_duration = Histogram(
            "phalanx_op_duration_seconds",
            "Duration of a collective on this rank, by op, algorithm and outcome (ok/failed); "
            "the _count series counts ops.",
            ["op", "algorithm", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.op_payload = Counter(
            "phalanx_op_payload_bytes",
            "Bytes of user data (tensor size) handed to collectives.",
            ["op"],
            registry=r,
        )
        self.op_failures = Counter(
            "phalanx_op_failures",
            "Collectives that failed, by reason token.",
            ["op", "reason"],
            registry=r,
        )
        self.op_inflight = Gauge(
            "phalanx_op_inflight",
            "1 while a collective is running on this rank, else 0.",
            registry=r,
        )
        self.op_last_progress = Gauge(
            "phalanx_op_last_progress_timestamp_seconds",
            "Unix time of the last progress (a frame or part of one sent or received; "
            "now, for a patient op before its deadline) of the running "
            "collective; with phalanx_op_inflight it tells a hang.",
            registry=r,
        )
        self.op_last_finished = Gauge(
            "phalanx_op_last_finished_timestamp_seconds",
            "Unix time at which the last collective finished on this rank.",
            registry=r,
        )
        # ---- per link (peer = the other rank)
        self.link_sent = Counter(
            "phalanx_link_sent_bytes",
            "Wire bytes sent to a peer by collectives.",
            ["peer"],
            registry=r,
        )
        self.link_received = Counter(
            "phalanx_link_received_bytes",
            "Wire bytes received from a peer by collectives.",
            ["peer"],
            registry=r,
        )
        self.link_send_blocked = Histogram(
            "phalanx_link_send_blocked_seconds",
            "Per op: time this rank had data for the peer that the kernel would not take.",
            ["peer"],
            buckets=LINK_BUCKETS,
            registry=r,
        )
        self.link_first_byte_wait = Histogram(
            "phalanx_link_first_byte_wait_seconds",
            "Per op: from the op's start on this rank to the first byte from the peer.",
            ["peer"],
            buckets=LINK_BUCKETS,
            registry=r,
        )
        self.link_transfer = Histogram(
            "phalanx_link_transfer_seconds",
            "Per op: from the first to the last byte received from the peer.",
            ["peer"],
            buckets=LINK_BUCKETS,
            registry=r,
        )
        self.tcp = _TcpCollector()
        r.register(self.tcp)
        # ---- membership
        self.rank = Gauge("phalanx_rank", "This daemon's rank in the current view.", registry=r)
        self.view_epoch = Gauge(
            "phalanx_view_epoch", "Epoch of the membership view this daemon is in.", registry=r
        )
        self.view_members = Gauge(
            "phalanx_view_members", "Number of members of the current view.", registry=r
        )
        self.view_changes = Counter(
            "phalanx_view_changes",
            "Views this daemon has installed (a fast rise means membership flapping).",
            registry=r,
        )
        self.heartbeat_sent = Gauge(
            "phalanx_heartbeat_last_sent_timestamp_seconds",
            "Unix time of the last heartbeat sent to the coordinator.",
            registry=r,
        )
        self.heartbeat_acked = Gauge(
            "phalanx_heartbeat_last_ack_timestamp_seconds",
            "Unix time of the last heartbeat the coordinator acknowledged.",
            registry=r,
        )
        # ---- snapshots (set by the checkpoint code through the daemon)
        self.snapshot_stall = Histogram(
            "phalanx_snapshot_stall_seconds",
            "Time the training loop was blocked by snapshot() (its one memory copy).",
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self.snapshot_seal = Histogram(
            "phalanx_snapshot_seal_duration_seconds",
            "From snapshot() to the generation being committed (encoded, placed, acked).",
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self.snapshot_seals = Counter(
            "phalanx_snapshot_seals",
            "Snapshot generations that ended, by outcome (committed/abandoned).",
            ["outcome"],
            registry=r,
        )
        self.snapshot_last_sealed = Gauge(
            "phalanx_snapshot_last_sealed_timestamp_seconds",
            "Unix time at which the newest snapshot generation was committed.",
            registry=r,
        )
        self.snapshot_held = Gauge(
            "phalanx_snapshot_held_bytes",
            "Bytes of snapshot shards (own and peers') held in this daemon's memory.",
            registry=r,
        )
        self.snapshot_underprotected = Gauge(
            "phalanx_snapshot_underprotected_generations",
            "Committed generations that lost shard holders and can survive fewer than m "
            "further losses until repaired.",
            registry=r,
        )
        # ---- state sync (a newcomer or a diverged member receives the group's state)
        self.state_syncs = Counter(
            "phalanx_state_syncs",
            "State transfers this daemon took part in, by role (sent: it was the source; "
            "received) and outcome (ok; failed: verification or the transfer failed).",
            ["role", "outcome"],
            registry=r,
        )
        self.state_sync_bytes = Counter(
            "phalanx_state_sync_bytes",
            "State bytes this daemon sent, or received and verified.",
            ["role"],
            registry=r,
        )
        self.state_sync_duration = Histogram(
            "phalanx_state_sync_duration_seconds",
            "Transfers that went through: manifest, bytes and verification.",
            ["role"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.state_sync_failures_in_row = Gauge(
            "phalanx_state_sync_failures_in_row",
            "States this daemon received that failed verification in a row (it steps "
            "out and comes back after each); 0 once an exchange went through.",
            registry=r,
        )  # read at scrape from the group (follow_sync_failures)
        for role in SYNC_ROLES:  # zeros, so that increase() works before the first sync
            self.state_sync_bytes.labels(role=role)
            for outcome in ("ok", "failed"):
                self.state_syncs.labels(role=role, outcome=outcome)
        # ---- anomalies
        self.anomaly_score = Gauge(
            "phalanx_anomaly_score",
            "Latest anomaly score by kind and peer (0 = normal; >= 1 = over the verdict "
            "threshold).",
            ["kind", "peer"],
            registry=r,
        )
        self.anomaly_active = Gauge(
            "phalanx_anomaly_active",
            "1 while a verdict of this kind against this peer stands, else 0.",
            ["kind", "peer"],
            registry=r,
        )
        self.anomalies = Counter(
            "phalanx_anomalies",
            "Anomaly verdicts issued, by kind.",
            ["kind"],
            registry=r,
        )
        for kind in ANOMALY_KINDS:  # export zeros so rate() works before the first verdict
            self.anomalies.labels(kind=kind)
        self.build_info = Gauge(
            "phalanx_build_info", "Always 1; labels carry the version.", ["version"], registry=r
        )
        from phalanx import __version__ as _v

        self.build_info.labels(version=_v).set(1)
        self._peers: set[str] = set()
        # labelled children by (metric, label values): ``labels()`` validates and locks
        # on every call (~3 us; a small op's observation made nine such calls)
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._children_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def child(self, metric: _M, *labels: str) -> _M:
        """``metric.labels(*labels)``, cached. :meth:`forget_peer` drops the cached
        children of the series it removes, so a later call makes them anew."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            with self._children_lock:
                c = self._children[key] = metric.labels(*labels)
        return cast(_M, c)

    def peer_seen(self, peer: int | str) -> str:
        p = str(peer)
        self._peers.add(p)
        return p

    def forget_peer(self, peer: int | str) -> None:
        """Remove every series labelled with ``peer`` (it left the view)."""
        p = str(peer)
        self._peers.discard(p)
        link = (self.link_sent, self.link_received, self.link_send_blocked,
                self.link_first_byte_wait, self.link_transfer)  # fmt: skip
        anomaly = (self.anomaly_score, self.anomaly_active)
        per_peer = link + anomaly  # the metrics whose last label is the peer
        with self._children_lock:
            for key in [k for k in self._children if k[1][-1] == p and k[0] in per_peer]:
                del self._children[key]
            for m in link:
                _remove(m, (p,))
            for kind in ANOMALY_KINDS:
                for g in anomaly:
                    _remove(g, (kind, p))

    def forget_anomalies(self, keep: str = "any") -> None:
        """Remove every anomaly score/active series except those of peer ``keep`` (a
        view change: ranks are renumbered, so no rank may inherit another's state)."""
        anomaly = (self.anomaly_score, self.anomaly_active)
        with self._children_lock:
            for key in [k for k in self._children if k[0] in anomaly and k[1][-1] != keep]:
                del self._children[key]
            for g in anomaly:
                for labels in [ls for ls in _label_sets(g) if ls[-1] != keep]:
                    _remove(g, labels)

    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def set_view(self, epoch: int, members: int, rank: int) -> None:
        self.view_epoch.set(epoch)
        self.view_members.set(members)
        self.rank.set(rank)
        self.view_changes.inc()

    def state_sync(self, outcome: SyncOutcome) -> None:
        """Count one state transfer this daemon sent or received (ElasticGroup's
        ``on_state_sync``)."""
        role = outcome.role
        if role not in SYNC_ROLES:
            raise ValueError(f"state sync role {role!r} is not one of {SYNC_ROLES}")
        self.state_syncs.labels(role=role, outcome="ok" if outcome.ok else "failed").inc()
        if outcome.ok:
            self.state_sync_bytes.labels(role=role).inc(outcome.nbytes)
            self.state_sync_duration.labels(role=role).observe(outcome.seconds)

    def follow_sync_failures(self, read: Callable[[], int]) -> None:
        """``phalanx_state_sync_failures_in_row`` is ``read()`` at each scrape (the
        group's own count: it goes back to 0 at any exchange that goes through, a
        transfer or not -- set only at transfers, it stayed high, and its alert
        fired, after a state came from snapshots instead)."""
        self.state_sync_failures_in_row.set_function(lambda: float(read()))

    def heartbeat(self, acked: bool, at: float | None = None) -> None:
        """Record a heartbeat sent (and, if ``acked``, acknowledged) at Unix time ``at``."""
        now = time.time() if at is None else at
        self.heartbeat_sent.set(now)
        if acked:
            self.heartbeat_acked.set(now)


def _remove(metric: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def _label_sets(metric: Gauge) -> list[tuple[str, str]]:
    """The (kind, peer) label values of every child an anomaly gauge has now."""
    return [
        (sample.labels["kind"], sample.labels["peer"])
        for family in metric.collect()
        for sample in family.samples
    ]

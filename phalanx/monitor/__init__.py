"""phalanx.monitor: Prometheus metrics, anomaly detectors and the /metrics endpoint.

The data plane reports through :class:`phalanx.comm.observer.CommObserver`; a
:class:`Monitor` is that observer (``monitor.observer``), turns samples into metrics
(:mod:`~phalanx.monitor.metrics`, one registry per daemon), runs the pure detectors
(:mod:`~phalanx.monitor.detectors`) and serves /metrics, /healthz and /anomalies
(:mod:`~phalanx.monitor.server`). docs/monitoring.md is the operator's guide.
"""

from phalanx.monitor.detectors import (
    ClusterDetector,
    DetectorConfig,
    HangDetector,
    LocalDetector,
    Verdict,
)
from phalanx.monitor.metrics import Metrics
from phalanx.monitor.monitor import ClusterView, Monitor, MonitorConfig

__all__ = [
    "ClusterDetector",
    "ClusterView",
    "DetectorConfig",
    "HangDetector",
    "LocalDetector",
    "Metrics",
    "Monitor",
    "MonitorConfig",
    "Verdict",
]

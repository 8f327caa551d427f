"""phalanx: fault-tolerant collectives and in-memory checkpoints for elastic training.

The training loop's surface is the client (:mod:`phalanx.client`): ``phalanx.connect()``
to the local daemon or ``phalanx.start()`` for embedded mode, then collectives, steps,
commit votes, state sync and snapshots (``snapshot``/``restore``/``restore_peer``) on a
:class:`Client`. The static-group data plane is in
:mod:`phalanx.comm`, the error hierarchy in :mod:`phalanx.errors`.
"""

from typing import Any

from phalanx.client import (
    Client,
    Handle,
    OpResult,
    SealResult,
    SnapshotHandle,
    StepInfo,
    ViewInfo,
    connect,
    start,
)
from phalanx.errors import (
    AuthError,
    CommError,
    ConfigError,
    DaemonUnavailable,
    FrameError,
    GroupClosed,
    HandshakeError,
    OpMismatch,
    PeerFailure,
    PhalanxError,
    ProtocolError,
    UnsupportedError,
)
from phalanx.membership.errors import CommitUnknown, Evicted

__version__ = "0.1.0"

# Imported on first use: they pull in the data plane (and ViewChanged gRPC).
_LAZY = {
    "ViewChanged": "phalanx.membership.elastic",
    "StepAborted": "phalanx.membership.statesync",
    "StateSyncError": "phalanx.membership.statesync",
    "SnapshotError": "phalanx.checkpoint.snapshot",
    "SnapshotAbandoned": "phalanx.checkpoint.snapshot",
    "SnapshotNotFound": "phalanx.checkpoint.snapshot",
    "RestoreError": "phalanx.checkpoint.snapshot",
    "LayoutError": "phalanx.checkpoint.layout",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phalanx' has no attribute {name!r}")


__all__ = [
    "AuthError",
    "Client",
    "CommError",
    "CommitUnknown",
    "ConfigError",
    "DaemonUnavailable",
    "Evicted",
    "FrameError",
    "GroupClosed",
    "Handle",
    "HandshakeError",
    "LayoutError",
    "OpMismatch",
    "OpResult",
    "PeerFailure",
    "PhalanxError",
    "ProtocolError",
    "RestoreError",
    "SealResult",
    "SnapshotAbandoned",
    "SnapshotError",
    "SnapshotHandle",
    "SnapshotNotFound",
    "StateSyncError",
    "StepAborted",
    "StepInfo",
    "UnsupportedError",
    "ViewChanged",
    "ViewInfo",
    "__version__",
    "connect",
    "start",
]

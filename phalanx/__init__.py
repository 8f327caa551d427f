"""phalanx: fault-tolerant collectives and in-memory checkpoints for elastic training.

The training loop's surface is the client (:mod:`phalanx.client`): ``phalanx.connect()``
to the local daemon or ``phalanx.start()`` for embedded mode, then collectives, steps,
commit votes, state sync and snapshots (``snapshot``/``restore``/``restore_peer``) on a
:class:`Client`. The static-group data plane is in :mod:`phalanx.comm`, the values every
layer shares in :mod:`phalanx.ops`, the error hierarchy in :mod:`phalanx.errors`.
"""

from phalanx._parent import from_env as _die_with_parent_from_env
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
    CommitUnknown,
    ConfigError,
    DaemonUnavailable,
    Evicted,
    FrameError,
    GroupClosed,
    HandshakeError,
    LayoutError,
    LimitExceeded,
    OpMismatch,
    PeerFailure,
    PhalanxError,
    ProtocolError,
    RestoreError,
    SnapshotAbandoned,
    SnapshotError,
    SnapshotNotFound,
    StateSyncError,
    StepAborted,
    UnsupportedError,
    ViewChanged,
)

__version__ = "0.1.0"

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
    "LimitExceeded",
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

_die_with_parent_from_env()  # a harness's child: die with its parent (phalanx/_parent.py)

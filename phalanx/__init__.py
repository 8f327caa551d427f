"""phalanx: fault-tolerant collectives and in-memory checkpoints for elastic training.

The public surface grows issue by issue; today it is the static-group data plane in
:mod:`phalanx.comm` and the error hierarchy in :mod:`phalanx.errors`.
"""

from phalanx.errors import (
    AuthError,
    CommError,
    ConfigError,
    FrameError,
    GroupClosed,
    HandshakeError,
    PeerFailure,
    PhalanxError,
    ProtocolError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "CommError",
    "ConfigError",
    "FrameError",
    "GroupClosed",
    "HandshakeError",
    "PeerFailure",
    "PhalanxError",
    "ProtocolError",
    "UnsupportedError",
    "__version__",
]

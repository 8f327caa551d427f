"""phalanx.checkpoint: in-memory snapshots of training state, erasure-coded across peers.

Pure parts know nothing of sockets: :mod:`~phalanx.checkpoint.erasure` (the k+m
Reed-Solomon coder), :mod:`~phalanx.checkpoint.placement` (which peer holds which
shard), :mod:`~phalanx.checkpoint.layout` (state <-> flat buffer + manifest) and
:mod:`~phalanx.checkpoint.generation` (stripe geometry, generation metadata). The
service (:mod:`~phalanx.checkpoint.snapshot`) moves shards only through a
:class:`~phalanx.checkpoint.channel.ShardChannel` and keeps peers' shards in a
:class:`~phalanx.checkpoint.store.ShardStore`.

This package must never import from ``phalanx.membership``, and only
:mod:`phalanx.checkpoint.tcp` (the TCP shard links, not imported here) may import
``phalanx.comm``: the daemon wires them together.
"""

from phalanx.checkpoint.channel import InProcessChannel, InProcessHub, ShardChannel
from phalanx.checkpoint.erasure import (
    ErasureCoder,
    ErasureError,
    available_backends,
    make_coder,
)
from phalanx.checkpoint.layout import LayoutError, Manifest
from phalanx.checkpoint.placement import (
    Peer,
    Placement,
    PlacementError,
    default_km,
    place,
    replace_lost,
)
from phalanx.checkpoint.snapshot import (
    PendingSeal,
    RestoreError,
    SealInfo,
    SnapshotAbandoned,
    SnapshotConfig,
    SnapshotError,
    SnapshotNotFound,
    SnapshotObserver,
    SnapshotService,
)
from phalanx.checkpoint.store import (
    BudgetExceeded,
    HolderUnavailable,
    MemoryShardStore,
    ShardCorrupt,
    ShardError,
    ShardKey,
    ShardMissing,
    ShardStore,
)

__all__ = [
    "BudgetExceeded",
    "ErasureCoder",
    "ErasureError",
    "HolderUnavailable",
    "InProcessChannel",
    "InProcessHub",
    "LayoutError",
    "Manifest",
    "MemoryShardStore",
    "Peer",
    "PendingSeal",
    "Placement",
    "PlacementError",
    "RestoreError",
    "SealInfo",
    "ShardChannel",
    "ShardCorrupt",
    "ShardError",
    "ShardKey",
    "ShardMissing",
    "ShardStore",
    "SnapshotAbandoned",
    "SnapshotConfig",
    "SnapshotError",
    "SnapshotNotFound",
    "SnapshotObserver",
    "SnapshotService",
    "available_backends",
    "default_km",
    "make_coder",
    "place",
    "replace_lost",
]

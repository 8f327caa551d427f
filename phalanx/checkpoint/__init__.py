"""phalanx.checkpoint: in-memory snapshots of training state, erasure-coded across peers.

Pure parts live here and know nothing of sockets: :mod:`~phalanx.checkpoint.erasure`
(the k+m Reed-Solomon coder) and :mod:`~phalanx.checkpoint.placement` (which peer holds
which shard). This package must never import from ``phalanx.comm`` or
``phalanx.membership``: the daemon wires them together.
"""

from phalanx.checkpoint.erasure import (
    ErasureCoder,
    ErasureError,
    available_backends,
    make_coder,
)
from phalanx.checkpoint.placement import (
    Peer,
    Placement,
    PlacementError,
    default_km,
    place,
    replace_lost,
)

__all__ = [
    "ErasureCoder",
    "ErasureError",
    "Peer",
    "Placement",
    "PlacementError",
    "available_backends",
    "default_km",
    "make_coder",
    "place",
    "replace_lost",
]

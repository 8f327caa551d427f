"""The membership layer's exceptions and rejection reasons (defined in :mod:`phalanx.errors`).

They live in the one hierarchy of :mod:`phalanx.errors` (so that they cross the local
API by their fields); this module names them for code that thinks in membership terms.
It must never import gRPC, protobuf or anything with side effects.
"""

from __future__ import annotations

from phalanx.errors import (
    CommitUnknown,
    CoordinatorUnavailable,
    Evicted,
    IllegalTransition,
    MembershipError,
    Rejected,
    RejectReason,
)

__all__ = [
    "CommitUnknown",
    "CoordinatorUnavailable",
    "Evicted",
    "IllegalTransition",
    "MembershipError",
    "RejectReason",
    "Rejected",
]

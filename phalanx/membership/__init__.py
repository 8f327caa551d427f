"""phalanx.membership: who is in the group, in which epoch, and whether a step commits.

Public pieces: :class:`View`/:class:`Member` (pure, ``view.py``), the
:class:`Coordinator` service (``coordinator.py``), the peer-side :class:`Agent`
(``agent.py``), their :class:`MembershipConfig`, and the errors. The generated
protobuf modules in ``_proto/`` are private to this package: nothing outside it may
import them. The core of this package must never import from ``phalanx.comm`` or
other parts; the wiring to the data plane lives in ``elastic.py`` (``ElasticGroup``),
``statesync.py`` and ``_door.py``, which are deliberately not imported here (import
``phalanx.membership.elastic`` to use them).
"""

from phalanx.membership.agent import Agent
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.errors import (
    CommitUnknown,
    CoordinatorUnavailable,
    Evicted,
    IllegalTransition,
    MembershipError,
    Rejected,
    RejectReason,
)
from phalanx.membership.view import Member, MemberState, View

__all__ = [
    "Agent",
    "CommitUnknown",
    "Coordinator",
    "CoordinatorUnavailable",
    "Evicted",
    "IllegalTransition",
    "Member",
    "MemberState",
    "MembershipConfig",
    "MembershipError",
    "RejectReason",
    "Rejected",
    "View",
]

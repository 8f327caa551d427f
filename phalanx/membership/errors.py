"""Exceptions of the membership layer, and the rejection reasons as a Python enum.

:class:`RejectReason` mirrors the ``RejectReason`` enum of
``proto/phalanx/v1/membership.proto`` (names without the prefix) so that code inside
the package never sees protobuf. Every class here subclasses
:class:`phalanx.errors.PhalanxError`. This module must never import gRPC, protobuf
or anything with side effects.
"""

from __future__ import annotations

import enum

from phalanx.errors import PhalanxError

__all__ = [
    "CommitUnknown",
    "CoordinatorUnavailable",
    "Evicted",
    "IllegalTransition",
    "MembershipError",
    "RejectReason",
    "Rejected",
]


class RejectReason(enum.Enum):
    """Why the coordinator refused a request (see the .proto for each meaning)."""

    BAD_AUTH = 1
    VERSION_MISMATCH = 2
    DUPLICATE_ID = 3
    STALE_EPOCH = 4
    UNREACHABLE_ADDRESS = 5
    MALFORMED = 6
    NOT_MEMBER = 7
    EVICTED = 8
    STALE_INCARNATION = 9
    GROUP_FULL = 10
    SHUTTING_DOWN = 11


class MembershipError(PhalanxError):
    """Base class of membership errors."""


class IllegalTransition(MembershipError, ValueError):
    """A view or member-state change the state table does not allow."""


class Rejected(MembershipError):
    """The coordinator refused a request; ``reason`` says why, ``detail`` in words."""

    def __init__(self, reason: RejectReason, detail: str = "", *, method: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.method = method
        where = f" {method}" if method else ""
        tail = f": {detail}" if detail else ""
        super().__init__(f"coordinator refused{where}: {reason.name}{tail}")


class Evicted(Rejected):
    """This peer (id, incarnation) was removed from the group; rejoin with a higher
    incarnation (:meth:`phalanx.membership.agent.Agent.rejoin`)."""

    def __init__(self, detail: str = "", *, method: str = "", epoch: int = 0) -> None:
        self.epoch = epoch
        super().__init__(RejectReason.EVICTED, detail, method=method)


class CoordinatorUnavailable(MembershipError):
    """The coordinator could not be reached before the deadline."""


class CommitUnknown(MembershipError):
    """No decision for a commit vote could be obtained before the deadline.

    The caller must not apply the step; the group may have decided either way, so the
    safe course is to leave (or be evicted) and rejoin with the group's state.
    """

    def __init__(self, step: int, epoch: int, detail: str = "") -> None:
        self.step = step
        self.epoch = epoch
        tail = f": {detail}" if detail else ""
        super().__init__(f"no commit decision for step {step} in epoch {epoch}{tail}")

"""Views, epochs and member states: pure data and pure functions.

A :class:`View` is an epoch plus an ordered tuple of :class:`Member`; a member's rank
is its index. :func:`next_view` computes the next view from the current one and a
batch of :class:`Change` s: survivors keep their relative order (so ring neighbours
that both survive keep their link), joiners are appended at the end, the epoch grows
by exactly one. The life of one member incarnation is the table
:data:`TRANSITIONS`; :func:`transition` is the only way to move along it.

This module must never do I/O, read clocks, start threads or import gRPC/protobuf:
the coordinator and the tests drive it with plain values.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from phalanx.membership.errors import IllegalTransition

__all__ = [
    "MAX_ADDRESSES",
    "MAX_ID_LEN",
    "TRANSITIONS",
    "Change",
    "ChangeKind",
    "Member",
    "MemberEvent",
    "MemberState",
    "View",
    "adopt_reported",
    "next_view",
    "parse_address",
    "recovery_epoch",
    "transition",
]

MAX_ID_LEN = 128
MAX_ADDRESSES = 8
MAX_ZONE_LEN = 64
MAX_EPOCH = 2**63 - 1


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); raise ValueError if malformed."""
    if not isinstance(address, str) or not address or len(address) > 300:
        raise ValueError(f"bad address {address!r}")
    host, sep, port_s = address.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"bad address {address!r}: want host:port")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"bad address {address!r}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad address {address!r}: IPv6 hosts go in brackets")
    if any(c.isspace() for c in host):
        raise ValueError(f"bad address {address!r}")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"bad address {address!r}: port out of range")
    return host, port


def _check_id(member_id: str) -> None:
    if not isinstance(member_id, str) or not member_id:
        raise ValueError("member id must be a non-empty string")
    if len(member_id) > MAX_ID_LEN:
        raise ValueError(f"member id longer than {MAX_ID_LEN} characters")
    if not member_id.isprintable() or any(c.isspace() for c in member_id):
        raise ValueError(f"member id {member_id!r} has spaces or unprintable characters")


@dataclass(frozen=True)
class Member:
    """One peer incarnation: stable id, data-plane addresses, incarnation, zone."""

    id: str
    addresses: tuple[str, ...]
    incarnation: int
    zone: str = ""

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.addresses, tuple):
            raise ValueError("addresses must be a tuple")
        if not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise ValueError(f"a member needs 1..{MAX_ADDRESSES} addresses")
        for address in self.addresses:
            parse_address(address)
        if isinstance(self.incarnation, bool) or not isinstance(self.incarnation, int):
            raise ValueError("incarnation must be an int")
        if not 0 <= self.incarnation <= MAX_EPOCH:
            raise ValueError("incarnation out of range")
        if not isinstance(self.zone, str) or len(self.zone) > MAX_ZONE_LEN:
            raise ValueError(f"zone must be a string of at most {MAX_ZONE_LEN} characters")

    @property
    def key(self) -> tuple[str, int]:
        """(id, incarnation): what identifies this process."""
        return (self.id, self.incarnation)


@dataclass(frozen=True)
class View:
    """Epoch + ordered members. Epoch 0 with no members is the empty start view."""

    epoch: int
    members: tuple[Member, ...] = ()
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int):
            raise ValueError("epoch must be an int")
        if not 0 <= self.epoch <= MAX_EPOCH:
            raise ValueError(f"epoch {self.epoch} out of range")
        if not isinstance(self.members, tuple):
            raise ValueError("members must be a tuple")
        index: dict[str, int] = {}
        for rank, member in enumerate(self.members):
            if not isinstance(member, Member):
                raise ValueError("members must be Member instances")
            if member.id in index:
                raise ValueError(f"duplicate member id {member.id!r} in view {self.epoch}")
            index[member.id] = rank
        if self.members and self.epoch == 0:
            raise ValueError("epoch 0 is the empty view")
        object.__setattr__(self, "_index", MappingProxyType(index))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    @property
    def size(self) -> int:
        return len(self.members)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._index

    def rank(self, member_id: str) -> int:
        """Index of ``member_id`` in this view; KeyError if absent."""
        return self._index[member_id]

    def get(self, member_id: str) -> Member | None:
        rank = self._index.get(member_id)
        return None if rank is None else self.members[rank]

    def has(self, member: Member) -> bool:
        """True when this exact incarnation is a member."""
        current = self.get(member.id)
        return current is not None and current.incarnation == member.incarnation


# ---------------------------------------------------------------------------
# Member states: the life of one incarnation as seen by the coordinator.


class MemberState(enum.Enum):
    JOINING = "joining"  # asked to join, waits for the next operation boundary
    ACTIVE = "active"  # in the view, heartbeating
    SUSPECTED = "suspected"  # in the view, accused; a fresh heartbeat clears it
    LEAVING = "leaving"  # asked to leave; removed in the next view
    LEFT = "left"  # terminal: left gracefully
    FAILED = "failed"  # terminal: heartbeat timeout or confirmed report
    EVICTED = "evicted"  # terminal: removed by the coordinator (replaced, bad input)


class MemberEvent(enum.Enum):
    JOIN = "join"
    ADMIT = "admit"  # a view containing it was published
    SUSPECT = "suspect"  # a peer reported it, or its watch stream broke
    REFUTE = "refute"  # a heartbeat arrived after the suspicion
    CONFIRM = "confirm"  # the suspicion outlived the confirmation window
    TIMEOUT = "timeout"  # no heartbeat for heartbeat_timeout
    LEAVE = "leave"  # it asked to leave
    REMOVE = "remove"  # a view without it was published (after LEAVE)
    EVICT = "evict"  # the coordinator removes it for another reason


_S = MemberState
_E = MemberEvent

#: (state or None for "unknown", event) -> next state. Anything absent is illegal.
TRANSITIONS: Mapping[tuple[MemberState | None, MemberEvent], MemberState] = MappingProxyType(
    {
        (None, _E.JOIN): _S.JOINING,
        (_S.JOINING, _E.ADMIT): _S.ACTIVE,
        (_S.JOINING, _E.LEAVE): _S.LEFT,
        (_S.JOINING, _E.TIMEOUT): _S.FAILED,
        (_S.JOINING, _E.EVICT): _S.EVICTED,
        (_S.ACTIVE, _E.SUSPECT): _S.SUSPECTED,
        (_S.ACTIVE, _E.TIMEOUT): _S.FAILED,
        (_S.ACTIVE, _E.LEAVE): _S.LEAVING,
        (_S.ACTIVE, _E.EVICT): _S.EVICTED,
        (_S.SUSPECTED, _E.SUSPECT): _S.SUSPECTED,
        (_S.SUSPECTED, _E.REFUTE): _S.ACTIVE,
        (_S.SUSPECTED, _E.CONFIRM): _S.FAILED,
        (_S.SUSPECTED, _E.TIMEOUT): _S.FAILED,
        (_S.SUSPECTED, _E.LEAVE): _S.LEAVING,
        (_S.SUSPECTED, _E.EVICT): _S.EVICTED,
        (_S.LEAVING, _E.REMOVE): _S.LEFT,
        (_S.LEAVING, _E.TIMEOUT): _S.LEFT,
    }
)

#: States whose incarnation is (still) part of the published view or about to be.
IN_VIEW_STATES = frozenset({_S.ACTIVE, _S.SUSPECTED, _S.LEAVING})
TERMINAL_STATES = frozenset({_S.LEFT, _S.FAILED, _S.EVICTED})


def transition(state: MemberState | None, event: MemberEvent) -> MemberState:
    """The next state of one incarnation; IllegalTransition if the table forbids it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        name = state.value if state is not None else "unknown"
        raise IllegalTransition(f"no transition from {name} on {event.value}") from None


# ---------------------------------------------------------------------------
# View changes.


class ChangeKind(enum.Enum):
    ADMIT = "admit"  # append a joiner
    LEAVE = "leave"  # remove, gracefully
    FAIL = "fail"  # remove, failed (timeout or confirmed report)
    EVICT = "evict"  # remove, evicted by the coordinator


@dataclass(frozen=True)
class Change:
    """One membership change to apply in the next view."""

    kind: ChangeKind
    member: Member
    cause: str = ""

    @property
    def removes(self) -> bool:
        return self.kind is not ChangeKind.ADMIT


def next_view(view: View, changes: Sequence[Change]) -> View:
    """Apply ``changes`` to ``view``: removals first, then admissions appended in order.

    Returns ``view`` itself when ``changes`` is empty; otherwise a view with epoch
    ``view.epoch + 1``. Raises IllegalTransition when a removal names someone (or an
    incarnation) not in the view, an admission names an id still in it, or one id
    appears twice in the batch.
    """
    if not changes:
        return view
    seen: set[str] = set()
    removed: set[str] = set()
    admitted: list[Member] = []
    for change in changes:
        member = change.member
        if change.removes:
            if not view.has(member):
                raise IllegalTransition(
                    f"cannot {change.kind.value} {member.id}#{member.incarnation}: "
                    f"not a member of view {view.epoch}"
                )
            if member.id in removed:
                raise IllegalTransition(f"{member.id} removed twice in one change")
            removed.add(member.id)
        else:
            if member.id in seen:
                raise IllegalTransition(f"{member.id} admitted twice in one change")
            seen.add(member.id)
            admitted.append(member)
    for member in admitted:
        if member.id in view and member.id not in removed:
            raise IllegalTransition(
                f"cannot admit {member.id}: already a member of view {view.epoch}"
            )
    survivors = tuple(m for m in view.members if m.id not in removed)
    return View(view.epoch + 1, survivors + tuple(admitted))


def adopt_reported(reported: Iterable[View]) -> View | None:
    """The view a restarted coordinator adopts from peers' re-registrations.

    The highest epoch wins. Two different views reported with the same epoch cannot
    both be right (a coordinator publishes one view per epoch); the coordinator then
    raises the epoch above it (see :func:`recovery_epoch`), so this returns the first
    of them.
    """
    best: View | None = None
    for view in reported:
        if best is None or view.epoch > best.epoch:
            best = view
    return best


def recovery_epoch(current: View, reported: View) -> int | None:
    """After recovery: the epoch to publish when a peer reports ``reported``.

    None when nothing needs to change (the report is older than, or identical to, the
    current view); otherwise an epoch strictly above both, so that an epoch is never
    used for two different views across coordinator restarts.
    """
    if reported.epoch < current.epoch or reported == current:
        return None
    return max(current.epoch, reported.epoch) + 1

"""Every exception phalanx raises to its users, in one hierarchy, and how they travel.

Errors say who failed: a collective that breaks raises :class:`PeerFailure` carrying
the view epoch, the operation (kind and sequence number) and the ranks suspected of
causing it, and whether this process detected the fault itself or was told by a peer.
Input problems raise subclasses of both :class:`PhalanxError` and the builtin a
caller would expect (``ValueError``/``TypeError``/``LookupError``/``ConnectionError``),
so ``except ValueError`` keeps working.

::

    PhalanxError
    ├── ConfigError (ValueError) ── ScheduleError
    ├── UnsupportedError (TypeError)
    ├── ProtocolError ── FrameError, HandshakeError ── AuthError
    ├── CommError ── GroupClosed, StateSyncError, StepAborted, OpMismatch (ValueError),
    │                PeerFailure ── ViewChanged
    ├── DaemonUnavailable (ConnectionError)
    ├── MembershipError ── IllegalTransition (ValueError), CoordinatorUnavailable,
    │                      CommitUnknown, Rejected ── Evicted
    ├── SnapshotError ── SnapshotAbandoned, SnapshotNotFound (LookupError), RestoreError
    ├── LayoutError (TypeError, ValueError)
    ├── ErasureError (ValueError), PlacementError (ValueError)
    └── ShardError ── ShardMissing, ShardCorrupt, BudgetExceeded, HolderUnavailable

**Fields.** Each class's constructor parameters are its fields, kept as attributes of
the same names (a parameter named ``message`` is the text itself). That rule is what
lets an error cross a process boundary without a hand-kept table:
:func:`describe` turns an exception into its class chain (the registered names from
the class up to :class:`PhalanxError`), its message and its field values;
:func:`rebuild` makes the same exception again from those, using the first name of the
chain that this process knows — so a daemon may raise a class its client has never
heard of and the client still gets its nearest known ancestor. Every public subclass
of :class:`PhalanxError`, wherever it is defined, registers itself by class name; a
second public class with the same name is refused when it is defined.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import enum
import inspect
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "AuthError",
    "BudgetExceeded",
    "CommError",
    "CommitUnknown",
    "ConfigError",
    "CoordinatorUnavailable",
    "DaemonUnavailable",
    "ErasureError",
    "ErrorInfo",
    "Evicted",
    "FrameError",
    "GroupClosed",
    "HandshakeError",
    "HolderUnavailable",
    "IllegalTransition",
    "LayoutError",
    "LimitExceeded",
    "MembershipError",
    "OpMismatch",
    "PeerFailure",
    "PhalanxError",
    "PlacementError",
    "ProtocolError",
    "RejectReason",
    "Rejected",
    "RestoreError",
    "ScheduleError",
    "ShardCorrupt",
    "ShardError",
    "ShardMissing",
    "SnapshotAbandoned",
    "SnapshotError",
    "SnapshotNotFound",
    "StateSyncError",
    "StepAborted",
    "UnsupportedError",
    "ViewChanged",
    "describe",
    "rebuild",
]

_REGISTRY: dict[str, type[PhalanxError]] = {}


class PhalanxError(Exception):
    """Base class of every error phalanx raises on purpose."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        if name.startswith("_"):
            return
        other = _REGISTRY.get(name)
        if other is not None and other.__module__ != cls.__module__:
            raise TypeError(
                f"two public error classes named {name}: {other.__module__} and {cls.__module__}"
            )
        _REGISTRY[name] = cls


_REGISTRY["PhalanxError"] = PhalanxError


# ----------------------------------------------------------------------------- input


class ConfigError(PhalanxError, ValueError):
    """A setting or an argument is invalid (bad value, bad combination)."""


class ScheduleError(ConfigError):
    """A set of collective schedules does not fit together (``comm.schedules.simulate``).

    ``reason`` is one of ``bad-input``, ``bad-peer``, ``bad-chunk``, ``mismatch``,
    ``deadlock``; ``rank`` is the rank whose step showed it, when there is one.
    """

    def __init__(self, reason: str, detail: str, *, rank: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.rank = rank
        super().__init__(f"{reason}: {detail}")


class UnsupportedError(PhalanxError, TypeError):
    """An input phalanx cannot handle: dtype, layout, codec for that dtype, ..."""


class LimitExceeded(PhalanxError):
    """A request needs more than the daemon may give it: shared memory beyond the
    client's budget (``max_client_shm_bytes``), or memory the kernel refused to map.
    Nothing was changed; the connection stays usable."""


# ----------------------------------------------------------------------------- wire


class ProtocolError(PhalanxError):
    """A peer sent bytes that break the wire contract (the data plane, the local
    protocol between a client and its daemon)."""


class FrameError(ProtocolError):
    """A frame could not be decoded or was refused; ``reason`` is a short stable token.

    Reasons: ``short``, ``bad-magic``, ``bad-version``, ``bad-kind``, ``bad-codec``,
    ``bad-crc``, ``bad-flags``, ``too-large``, ``foreign-epoch``, ``unexpected-frame``,
    ``bad-payload``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class HandshakeError(ProtocolError):
    """A connection could not be established as a group link (wrong peer, wrong
    epoch, protocol mismatch, deadline passed during the handshake)."""

    def __init__(self, reason: str, detail: str = "", *, peer: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.peer = peer
        who = f" (peer {peer})" if peer is not None else ""
        super().__init__(f"handshake failed{who}: {reason}" + (f": {detail}" if detail else ""))


class AuthError(HandshakeError):
    """The other side could not prove the cluster secret (or refused ours)."""


# ----------------------------------------------------------------------------- collectives


class CommError(PhalanxError):
    """A collective could not complete."""


class GroupClosed(CommError):
    """The group was closed (or broken by an earlier failure); make a new one."""


class PeerFailure(CommError):
    """A collective failed because of one or more peers.

    Attributes:
        op: the collective kind (``"all_reduce"``, ``"broadcast"``, ...).
        seq: the operation sequence number inside the group.
        epoch: the view epoch the operation ran in.
        suspects: ranks believed to have caused the failure (may be empty when the
            cause is unknown, e.g. the group was closed under the operation).
        reason: a short stable token: ``disconnected``, ``timeout``, ``protocol``,
            ``foreign-epoch``, ``aborted`` (a rank gave up: its deadline passed, it
            cancelled, or it was aborted), ``closed``, ``view-change``.
        detected_by: the rank that first detected the fault (``None`` if unknown).
        detail: free text for humans.

    When this is raised by an in-place collective, the caller's array holds exactly
    its original input.
    """

    def __init__(
        self,
        *,
        op: str,
        seq: int,
        epoch: int,
        suspects: Iterable[int],
        reason: str,
        detected_by: int | None = None,
        detail: str = "",
    ) -> None:
        self.op = op
        self.seq = seq
        self.epoch = epoch
        self.suspects = frozenset(suspects)
        self.reason = reason
        self.detected_by = detected_by
        self.detail = detail
        who = ",".join(str(r) for r in sorted(self.suspects)) or "unknown"
        by = f" detected by rank {detected_by}" if detected_by is not None else ""
        msg = f"{op} #{seq} in epoch {epoch} failed: {reason}; suspected ranks [{who}]{by}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ViewChanged(PeerFailure):
    """The collective was aborted because a new view (``epoch``) was installed; the
    caller's array holds its input. ``old_epoch``: the view it ran in."""

    def __init__(self, *, op: str, seq: int, old_epoch: int, epoch: int, detail: str = "") -> None:
        super().__init__(
            op=op, seq=seq, epoch=epoch, suspects=(), reason="view-change", detail=detail
        )
        self.old_epoch = old_epoch


class StateSyncError(CommError):
    """State could not be synced (hash mismatch, bad manifest): no contribution.

    ``bad_ranks``: the receivers whose verification failed (empty when unknown)."""

    def __init__(self, message: str, bad_ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.bad_ranks = tuple(bad_ranks)


class StepAborted(CommError):
    """This member was mid-step (or had to receive state inside a collective) when a
    new view came up: the step cannot continue here. Do not vote on it (it never ran
    in this view); call ``begin_step`` again. ``epoch`` is the new view's epoch."""

    def __init__(self, epoch: int, step: int, detail: str = "") -> None:
        self.epoch = epoch
        self.step = step
        self.detail = detail
        tail = f": {detail}" if detail else ""
        super().__init__(f"step {step} aborted by the view of epoch {epoch}{tail}")


# ----------------------------------------------------------------------------- the daemon


class OpMismatch(CommError, ValueError):
    """Ranks called the same collective (same ``seq``) with different arguments: a
    caller's mistake, caught before any rank reduced or wrote a peer's data.

    Every rank of the group raises it for the same op, each caller's array holds its
    input (promise 2), and the group stays usable: the next op runs as usual. It is
    not a :class:`PeerFailure` (no peer is at fault, nothing to report or heal) and it
    is a ``ValueError`` (a wrong argument).

    Attributes:
        op: this rank's collective kind (``"all_reduce"``, ...).
        seq: the operation sequence number inside the group.
        epoch: the view epoch the operation ran in.
        descriptors: rank -> that rank's arguments, as text
            (``"all_reduce(count=10, dtype=float32, op=sum, codec=none)"``).
        fields: the argument names the ranks disagree on (``("count",)``).
        detected_by: the rank that noticed first, as far as this rank knows.
        reason: always ``"mismatch"`` (so code that sorts failures by ``reason``
            can treat it like the others).
    """

    reason = "mismatch"

    def __init__(
        self,
        *,
        op: str,
        seq: int,
        epoch: int,
        descriptors: Mapping[int, str] | Sequence[str],
        fields: Iterable[str] = (),
        detected_by: int | None = None,
        detail: str = "",
    ) -> None:
        self.op = op
        self.seq = seq
        self.epoch = epoch
        # by rank; a sequence is rank order (how the field travels, see _value)
        pairs = descriptors.items() if isinstance(descriptors, Mapping) else enumerate(descriptors)
        self.descriptors: dict[int, str] = dict(sorted(pairs))
        self.fields = tuple(fields)
        self.detected_by = detected_by
        self.detail = detail
        groups: dict[str, list[int]] = {}
        for rank, text in self.descriptors.items():
            groups.setdefault(text, []).append(rank)
        parts = []
        for text, ranks in groups.items():
            who = "rank" if len(ranks) == 1 else "ranks"
            parts.append(f"{who} {','.join(str(r) for r in ranks)}: {text}")
        what = ", ".join(self.fields) or "arguments"
        by = f"; detected by rank {detected_by}" if detected_by is not None else ""
        msg = (
            f"{op} #{seq} in epoch {epoch}: ranks disagree on {what} ({'; '.join(parts)}){by}; "
            "nothing was reduced, inputs are intact and the group is still usable"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class DaemonUnavailable(PhalanxError, ConnectionError):
    """The local phalanx daemon cannot be reached: it is not running, it died, or it
    closed the connection. ``socket`` is the local API socket path that was used.

    Raised by every client call within about a second of the daemon's death (the
    kernel closes its end of the socket), never after an unbounded wait."""

    def __init__(self, message: str, *, socket: str = "") -> None:
        self.socket = socket
        super().__init__(message)


# ----------------------------------------------------------------------------- membership


class RejectReason(enum.Enum):
    """Why the coordinator refused a request: mirrors the ``RejectReason`` enum of
    ``proto/phalanx/v1/membership.proto`` (names without the prefix; see the .proto
    for each meaning), so that code inside the package never sees protobuf."""

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
    """A view, member-state or lifecycle change its state table does not allow."""


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
    incarnation (``rejoin()``; a daemon does it by itself)."""

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
        self.detail = detail
        tail = f": {detail}" if detail else ""
        super().__init__(f"no commit decision for step {step} in epoch {epoch}{tail}")


# ----------------------------------------------------------------------------- snapshots


class SnapshotError(PhalanxError):
    """A snapshot or restore failed; ``reason`` is a short stable token."""

    def __init__(self, reason: str, detail: str = "", *, holder: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.holder = holder
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SnapshotAbandoned(SnapshotError):
    """The generation never sealed (``reason``: ``budget``, ``unavailable``, ``corrupt``,
    ``missing``, ``too-few-peers``, ``timeout``, ``closed``); ``holder`` names the
    holder that failed when one did. The previous sealed generation is intact."""


class SnapshotNotFound(SnapshotError, LookupError):
    """No sealed generation (of the requested step) is held anywhere reachable."""


class RestoreError(SnapshotError):
    """A sealed generation exists but cannot be rebuilt (more than m pieces of a stripe
    lost or corrupt, or the rebuilt state fails its checksums)."""


class LayoutError(PhalanxError, TypeError, ValueError):
    """The state cannot be snapshotted (or a manifest cannot be read).

    ``reason``: ``bad-state``, ``bad-key``, ``bad-type``, ``object-dtype``,
    ``non-contiguous``, ``device``, ``bad-manifest``; ``path`` names the array.
    """

    def __init__(self, reason: str, detail: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        self.detail = detail
        where = f" at {path!r}" if path else ""
        super().__init__(f"{reason}{where}: {detail}")


class ErasureError(PhalanxError, ValueError):
    """The erasure coder was asked for something impossible; ``reason`` is a short
    stable token.

    Reasons: ``bad-params`` (k, m), ``bad-shard`` (dtype, shape, length, read-only or
    overlapping buffer), ``bad-index`` (shard index out of range, or both present and
    wanted), ``too-few-shards`` (fewer than k present: the data is lost),
    ``backend-unavailable``. ``present`` holds the indices the caller had, where known.
    """

    def __init__(
        self, reason: str, detail: str = "", *, present: Iterable[int] | None = None
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.present = frozenset(present) if present is not None else None
        super().__init__(f"{reason}: {detail}" if detail else reason)


class PlacementError(PhalanxError, ValueError):
    """No valid shard placement exists; ``reason`` is ``bad-input`` or ``too-few-peers``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ShardError(PhalanxError):
    """A shard operation failed; ``reason`` is a stable token (one per subclass),
    ``holder`` who failed, ``key`` the shard (a ``checkpoint.store.ShardKey``; it does
    not cross a process boundary)."""

    reason: ClassVar[str] = "shard-error"

    def __init__(self, detail: str = "", *, holder: str = "", key: object = None) -> None:
        self.detail = detail
        self.holder = holder
        self.key = key
        who = f" on {holder}" if holder else ""
        what = f" ({key})" if key is not None else ""
        super().__init__(f"{self.reason}{who}{what}: {detail}" if detail else self.reason + who)


class ShardMissing(ShardError):
    """The holder does not have that shard."""

    reason = "missing"


class ShardCorrupt(ShardError):
    """The shard's bytes fail their checksum: the shard counts as lost."""

    reason = "corrupt"


class BudgetExceeded(ShardError):
    """Storing the shard would take the holder over its byte budget."""

    reason = "budget"


class HolderUnavailable(ShardError):
    """The holder cannot be reached, refused us, or did not answer before the deadline."""

    reason = "unavailable"


# ----------------------------------------------------------------------------- travel

#: a field value that can cross a process boundary
Value = None | bool | int | float | str | tuple[int, ...] | tuple[str, ...]

#: builtins an error may be when it is not a PhalanxError (a deadline passing)
_BUILTINS: Mapping[str, type[Exception]] = {"TimeoutError": TimeoutError}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception as values: its class chain (most derived first, names this side
    may or may not know), its message and its fields."""

    chain: tuple[str, ...]
    message: str
    fields: tuple[tuple[str, Value], ...] = ()


def _params(cls: type[BaseException]) -> list[inspect.Parameter]:
    """The fields of ``cls``: its constructor's parameters (none for a class that
    keeps Exception's ``*args``)."""
    init = cls.__init__
    if init is Exception.__init__ or init is BaseException.__init__:
        return []
    sig = inspect.signature(init)
    return [
        p
        for p in list(sig.parameters.values())[1:]
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _value(v: object) -> Value:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, enum.Enum):
        return v.name
    if isinstance(v, frozenset | set | tuple | list) and all(
        isinstance(r, int) and not isinstance(r, bool) for r in v
    ):
        return tuple(sorted(v)) if isinstance(v, frozenset | set) else tuple(v)
    if isinstance(v, tuple | list) and all(isinstance(t, str) for t in v):
        return tuple(v)
    if (
        isinstance(v, Mapping)
        and sorted(v) == list(range(len(v)))
        and all(isinstance(t, str) for t in v.values())
    ):
        return tuple(v[i] for i in range(len(v)))  # a per-rank table, in rank order
    return None  # not a value that travels (e.g. a shard key): its default on the other side


def describe(exc: BaseException) -> ErrorInfo:
    """``exc`` as an :class:`ErrorInfo` (see the module docstring)."""
    if isinstance(exc, PhalanxError):
        chain = tuple(
            c.__name__
            for c in type(exc).__mro__
            if issubclass(c, PhalanxError) and _REGISTRY.get(c.__name__) is c
        )
        fields = tuple(
            (p.name, _value(getattr(exc, p.name, None)))
            for p in _params(type(exc))
            if p.name != "message"
        )
        return ErrorInfo(chain, str(exc), fields)
    name = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _BUILTINS), None)
    if name is not None:
        return ErrorInfo((name,), str(exc))
    # not ours: a bug on the other side; keep what it was in the text
    return ErrorInfo(("PhalanxError",), f"{type(exc).__name__}: {exc}")


def rebuild(info: ErrorInfo) -> Exception:
    """The exception ``info`` describes: the first class of its chain this process
    knows (at worst :class:`PhalanxError`), built from its fields, with the original
    message."""
    cls: type[Exception] = PhalanxError
    for name in info.chain:
        known: type[Exception] | None = _REGISTRY.get(name) or _BUILTINS.get(name)
        if known is not None:
            cls = known
            break
    fields = dict(info.fields)
    exc: Exception | None = None
    params = _params(cls)
    if params:
        hints = typing.get_type_hints(cls.__init__)
        kwargs: dict[str, Any] = {}
        for p in params:
            if p.name == "message":
                kwargs[p.name] = info.message
                continue
            v = fields.get(p.name)
            if v is None:
                if p.default is inspect.Parameter.empty:
                    break  # a required field is missing: fall back to the message
                continue
            kind = hints.get(p.name)
            if isinstance(kind, type) and issubclass(kind, enum.Enum) and isinstance(v, str):
                try:
                    kwargs[p.name] = kind[v]
                except KeyError:
                    break
                continue
            kwargs[p.name] = v
        else:
            try:
                exc = cls(**kwargs)
            except (TypeError, ValueError):
                exc = None
    if exc is None:
        try:
            exc = cls.__new__(cls)
        except TypeError:
            exc = PhalanxError.__new__(PhalanxError)
        for name, v in fields.items():
            setattr(exc, name, v)
    exc.args = (info.message,)
    return exc

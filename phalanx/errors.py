"""Every exception phalanx raises to its users, in one hierarchy.

Errors say who failed: a collective that breaks raises :class:`PeerFailure` carrying
the view epoch, the operation (kind and sequence number) and the ranks suspected of
causing it, and whether this process detected the fault itself or was told by a peer.
Input problems raise subclasses of both :class:`PhalanxError` and the builtin a
caller would expect (``ValueError``/``TypeError``), so ``except ValueError`` keeps
working. This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "AuthError",
    "CommError",
    "ConfigError",
    "DaemonUnavailable",
    "FrameError",
    "GroupClosed",
    "HandshakeError",
    "OpMismatch",
    "PeerFailure",
    "PhalanxError",
    "ProtocolError",
    "UnsupportedError",
]


class PhalanxError(Exception):
    """Base class of every error phalanx raises on purpose."""


class ConfigError(PhalanxError, ValueError):
    """A setting or an argument is invalid (bad value, bad combination)."""


class UnsupportedError(PhalanxError, TypeError):
    """An input phalanx cannot handle: dtype, layout, codec for that dtype, ..."""


class ProtocolError(PhalanxError):
    """A peer sent bytes that break the wire contract."""


class FrameError(ProtocolError):
    """A frame could not be decoded or was refused; ``reason`` is a short stable token.

    Reasons: ``bad-magic``, ``bad-version``, ``bad-kind``, ``bad-codec``, ``bad-crc``,
    ``too-large``, ``foreign-epoch``, ``unexpected-frame``, ``bad-payload``.
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
            ``foreign-epoch``, ``aborted``, ``closed``, ``view-change``.
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
        descriptors: Mapping[int, str],
        fields: Iterable[str] = (),
        detected_by: int | None = None,
        detail: str = "",
    ) -> None:
        self.op = op
        self.seq = seq
        self.epoch = epoch
        self.descriptors = dict(sorted(descriptors.items()))
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

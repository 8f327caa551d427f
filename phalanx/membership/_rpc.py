"""The protobuf boundary: signing and checking headers, converting messages.

Everything that knows the generated ``*_pb2`` modules outside the servicer and the
client stub lives here: the HMAC scheme of the .proto (sign/verify with replay
defence), conversions between protobuf messages and the frozen dataclasses of
``view.py``/``_group.py``, and the mapping of :class:`RejectReason` onto gRPC status
codes and the ``phalanx-reject-reason`` trailer. Protobuf objects must never leave
this module, ``coordinator.py`` or ``agent.py``; this module must never do network
I/O (except :func:`probe`, the address reachability check) or keep per-peer state.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import grpc

from phalanx.membership._group import Decision, Outcome
from phalanx.membership._proto import membership_pb2 as pb
from phalanx.membership.errors import (
    Evicted,
    MembershipError,
    Rejected,
    RejectReason,
)
from phalanx.membership.pacing import Pace
from phalanx.membership.view import Member, View, parse_address

__all__ = [
    "PROTOCOL_VERSION",
    "REJECT_TRAILER",
    "HeaderInfo",
    "Signer",
    "addressed_to",
    "decision_from_pb",
    "decision_to_pb",
    "error_from_rpc",
    "member_from_pb",
    "member_to_pb",
    "probe",
    "status_for",
    "timing_to_pb",
    "view_from_pb",
    "view_to_pb",
]

PROTOCOL_VERSION = 1
REJECT_TRAILER = "phalanx-reject-reason"
SERVICE = "/phalanx.v1.Coordinator/"
_CONTEXT = b"phalanx.v1\n"
_NONCE_BYTES = 16
_MAX_NONCES = 1 << 18

_STATUS = {
    RejectReason.BAD_AUTH: grpc.StatusCode.UNAUTHENTICATED,
    RejectReason.VERSION_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.DUPLICATE_ID: grpc.StatusCode.ALREADY_EXISTS,
    RejectReason.STALE_EPOCH: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.UNREACHABLE_ADDRESS: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.NOT_MEMBER: grpc.StatusCode.NOT_FOUND,
    RejectReason.EVICTED: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.STALE_INCARNATION: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.GROUP_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
}


def status_for(reason: RejectReason) -> grpc.StatusCode:
    """The gRPC status code a refusal for ``reason`` is sent with."""
    return _STATUS[reason]


class _Signed(Protocol):
    @property
    def header(self) -> pb.Header: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


class HeaderInfo:
    """What a verified header says about its sender (plain values, no protobuf)."""

    __slots__ = ("epoch", "incarnation", "sender_id")

    def __init__(self, sender_id: str, incarnation: int, epoch: int) -> None:
        self.sender_id = sender_id
        self.incarnation = incarnation
        self.epoch = epoch


class Signer:
    """Signs outgoing messages and checks incoming ones with the cluster secret.

    ``secret=None`` is insecure mode: nothing is signed or checked except the protocol
    version. A Signer is thread-safe; its nonce cache is the replay defence.
    """

    def __init__(self, secret: bytes | None, *, max_skew: float = 30.0) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        self._secret = secret
        self._max_skew_ms = int(max_skew * 1000)
        self._lock = threading.Lock()
        self._nonces: OrderedDict[bytes, int] = OrderedDict()

    @property
    def secure(self) -> bool:
        return self._secret is not None

    def _mac(self, msg: _Signed, method: str, direction: str) -> bytes:
        assert self._secret is not None
        mac = msg.header.mac
        msg.header.mac = b""
        try:
            body = msg.SerializeToString(deterministic=True)
        finally:
            msg.header.mac = mac
        data = b"".join((_CONTEXT, method.encode(), b"\n", direction.encode(), b"\n", body))
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def sign(
        self,
        msg: _Signed,
        method: str,
        direction: str,
        *,
        sender_id: str = "",
        incarnation: int = 0,
        epoch: int = 0,
    ) -> None:
        """Fill ``msg.header`` (version, sender, epoch, timestamp, nonce, mac). The
        coordinator passes the member it answers as ``sender_id``/``incarnation``
        (see :func:`addressed_to`)."""
        h = msg.header
        h.protocol_version = PROTOCOL_VERSION
        h.sender_id = sender_id
        h.incarnation = incarnation
        h.epoch = epoch
        h.timestamp_ms = int(time.time() * 1000)
        h.nonce = os.urandom(_NONCE_BYTES)
        h.mac = b""
        if self._secret is not None:
            h.mac = self._mac(msg, method, direction)

    def verify(
        self, msg: _Signed, method: str, direction: str, *, check_replay: bool = True
    ) -> HeaderInfo:
        """Check version, MAC, timestamp and nonce; raise :class:`Rejected` if wrong."""
        h = msg.header
        if h.protocol_version == 0 and not h.nonce and not h.mac:
            raise Rejected(RejectReason.MALFORMED, "missing header", method=method)
        if h.protocol_version != PROTOCOL_VERSION:
            raise Rejected(
                RejectReason.VERSION_MISMATCH,
                f"protocol version {h.protocol_version}, this side speaks {PROTOCOL_VERSION}",
                method=method,
            )
        if self._secret is not None:
            if not h.mac:
                raise Rejected(RejectReason.BAD_AUTH, "unsigned request", method=method)
            if not hmac.compare_digest(h.mac, self._mac(msg, method, direction)):
                raise Rejected(RejectReason.BAD_AUTH, "bad MAC (wrong secret?)", method=method)
            now_ms = int(time.time() * 1000)
            if abs(now_ms - h.timestamp_ms) > self._max_skew_ms:
                raise Rejected(RejectReason.BAD_AUTH, "timestamp outside window", method=method)
            if len(h.nonce) != _NONCE_BYTES:
                raise Rejected(RejectReason.BAD_AUTH, "bad nonce", method=method)
            if check_replay:
                self._check_nonce(h.nonce, now_ms, method)
        return HeaderInfo(h.sender_id, h.incarnation, h.epoch)

    def _check_nonce(self, nonce: bytes, now_ms: int, method: str) -> None:
        with self._lock:
            cutoff = now_ms - 2 * self._max_skew_ms
            while self._nonces:
                seen = next(iter(self._nonces.values()))
                if seen >= cutoff and len(self._nonces) < _MAX_NONCES:
                    break
                self._nonces.popitem(last=False)
            if nonce in self._nonces:
                raise Rejected(RejectReason.BAD_AUTH, "replayed nonce", method=method)
            self._nonces[nonce] = now_ms


def addressed_to(msg: _Signed, member_id: str, incarnation: int) -> bool:
    """Whether a (verified) message of the coordinator may be taken by that member
    incarnation. The coordinator names the member it answers in the header's
    ``sender_id``/``incarnation`` (covered by the MAC), so a signed answer recorded
    on the path cannot be passed to another member, or to a later incarnation of the
    same one. A header that names no one is a broadcast (a view's Watch event) or
    comes from a coordinator older than this rule: taken as before."""
    h = msg.header
    if not h.sender_id:
        return True
    return h.sender_id == member_id and int(h.incarnation) == incarnation


# -- conversions -------------------------------------------------------------------


def _malformed(what: str, exc: Exception) -> Rejected:
    return Rejected(RejectReason.MALFORMED, f"{what}: {exc}")


def member_from_pb(m: pb.Member) -> Member:
    try:
        return Member(m.id, tuple(m.addresses), int(m.incarnation), m.zone)
    except ValueError as exc:
        raise _malformed("member", exc) from None


def member_to_pb(m: Member) -> pb.Member:
    return pb.Member(id=m.id, addresses=list(m.addresses), incarnation=m.incarnation, zone=m.zone)


def view_from_pb(v: pb.View) -> View:
    try:
        return View(int(v.epoch), tuple(member_from_pb(m) for m in v.members))
    except ValueError as exc:
        raise _malformed("view", exc) from None


def view_to_pb(v: View) -> pb.View:
    return pb.View(epoch=v.epoch, members=[member_to_pb(m) for m in v.members])


def decision_from_pb(d: pb.Decision) -> Decision | None:
    if d.epoch == 0:
        return None
    outcome = Outcome.ALL_OK if d.committed else Outcome.MEMBER_FAILED
    return Decision(int(d.epoch), int(d.step), bool(d.committed), outcome)


def decision_to_pb(d: Decision | None) -> pb.Decision:
    if d is None:
        return pb.Decision()
    return pb.Decision(epoch=d.epoch, step=d.step, committed=d.committed)


# -- errors ------------------------------------------------------------------------


def error_from_rpc(err: grpc.RpcError, method: str) -> MembershipError | None:
    """The refusal carried by ``err``, or None when it is a transport failure."""
    trailers: Sequence[tuple[str, str | bytes]] = ()
    trailing = getattr(err, "trailing_metadata", None)
    if callable(trailing):
        trailers = trailing() or ()
    details = err.details() if callable(getattr(err, "details", None)) else ""
    for key, value in trailers:
        if key == REJECT_TRAILER:
            name = value.decode() if isinstance(value, bytes) else value
            try:
                reason = RejectReason[name]
            except KeyError:
                return Rejected(RejectReason.MALFORMED, f"unknown reason {name}: {details}")
            if reason is RejectReason.EVICTED:
                return Evicted(details or "", method=method)
            return Rejected(reason, details or "", method=method)
    return None


# -- reachability ------------------------------------------------------------------


def probe(addresses: Sequence[str], timeout: float) -> bool:
    """True if any address accepts a TCP connection within ``timeout`` (then closed)."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        host, port = parse_address(address)
        try:
            with socket.create_connection((host, port), timeout=remaining):
                return True
        except OSError:
            continue
    return False


def timing_to_pb(pace: Pace) -> pb.Timing:
    """The pace as members are told it (milliseconds)."""
    return pb.Timing(heartbeat_interval_ms=round(pace.interval * 1000),
                     heartbeat_timeout_ms=round(pace.timeout * 1000))  # fmt: skip

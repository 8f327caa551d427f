"""The link handshake, sans-IO: message payloads and the HMAC proofs of the secret.

Every data-plane connection starts with four frames (all with the view epoch in the
header) before any tensor byte may flow::

    connector                                   acceptor
    HELLO     world, from, to, stream, nonce_c  ->
              <-  CHALLENGE  acceptor rank, nonce_s, mac_a
    PROOF     mac_c                             ->
              <-  WELCOME  (or REJECT reason, text)

    mac_a = HMAC-SHA256(secret, "phalanx/v1 accept"  || hello || nonce_s || epoch || rank)
    mac_c = HMAC-SHA256(secret, "phalanx/v1 connect" || hello || nonce_s || epoch)

Both sides prove the cluster secret over fresh nonces from both ends, so a recorded
handshake cannot be replayed and neither side can be impersonated; the labels keep a
proof from one direction useless in the other. The acceptor's proof also covers the
rank it answers as: every listener signs any HELLO (before it may say anything about
the group), so without the rank a stranger holding the address a member dials could
reflect that member's HELLO into the member's own listener, relabel the CHALLENGE with
the rank the member expects, and pass for it without the secret. The acceptor checks the proof before
it tells the connector anything about the group (rank or stream conflicts), so a
stranger learns nothing but "bad-auth". This module only builds and checks bytes; the
socket side is in :mod:`phalanx.comm.transport`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from phalanx.errors import AuthError, HandshakeError

__all__ = [
    "MAX_HANDSHAKE_PAYLOAD",
    "NONCE_SIZE",
    "Challenge",
    "Hello",
    "LinkRefusal",
    "accept_mac",
    "check_mac",
    "connect_mac",
    "decode_challenge",
    "decode_hello",
    "decode_proof",
    "decode_reject",
    "encode_challenge",
    "encode_hello",
    "encode_reject",
    "new_nonce",
]

NONCE_SIZE = 32
MAC_SIZE = 32
MAX_HANDSHAKE_PAYLOAD = 512
_MAX_REJECT_TEXT = 200

_HELLO = struct.Struct("<IIIHH32s")
_CHALLENGE = struct.Struct("<I32s32s")
_PROOF = struct.Struct("<32s")
_REJECT = struct.Struct("<B")
_EPOCH = struct.Struct("<Q")
_RANK = struct.Struct("<I")


class LinkRefusal(enum.IntEnum):
    """Why an acceptor refused a link (one byte on the wire; the membership's
    coordinator has its own reasons, ``phalanx.errors.RejectReason``)."""

    BAD_AUTH = 1  # the connector could not prove the cluster secret
    BAD_VERSION = 2  # protocol version mismatch (caught by the frame header)
    WRONG_EPOCH = 3  # HELLO names another view epoch than the acceptor's group
    WRONG_RANK = 4  # HELLO is addressed to another rank, or names a rank outside the world
    WORLD_MISMATCH = 5  # HELLO names another world size than the acceptor's group
    DUPLICATE = 6  # this (rank, stream) link is already established
    UNEXPECTED = 7  # the acceptor does not expect a link from that rank (e.g. group complete)
    MALFORMED = 8  # a handshake message could not be decoded
    TIMEOUT = 9  # the handshake did not finish before its deadline


@dataclass(frozen=True, slots=True)
class Hello:
    world: int
    from_rank: int
    to_rank: int
    stream: int
    streams: int
    nonce: bytes

    def __post_init__(self) -> None:
        if self.world < 1 or not (0 <= self.from_rank < 2**32 and 0 <= self.to_rank < 2**32):
            raise ValueError("bad ranks or world in HELLO")
        if not (0 <= self.stream < self.streams <= 0xFFFF):
            raise ValueError("bad stream index in HELLO")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")


@dataclass(frozen=True, slots=True)
class Challenge:
    rank: int
    nonce: bytes
    mac: bytes


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def encode_hello(hello: Hello) -> bytes:
    return _HELLO.pack(
        hello.world, hello.from_rank, hello.to_rank, hello.stream, hello.streams, hello.nonce
    )


def decode_hello(payload: bytes) -> Hello:
    if len(payload) != _HELLO.size:
        raise HandshakeError("malformed", f"HELLO of {len(payload)} bytes")
    world, frm, to, stream, streams, nonce = _HELLO.unpack(payload)
    try:
        return Hello(world, frm, to, stream, streams, nonce)
    except ValueError as exc:
        raise HandshakeError("malformed", str(exc)) from None


def encode_challenge(challenge: Challenge) -> bytes:
    return _CHALLENGE.pack(challenge.rank, challenge.nonce, challenge.mac)


def decode_challenge(payload: bytes) -> Challenge:
    if len(payload) != _CHALLENGE.size:
        raise HandshakeError("malformed", f"CHALLENGE of {len(payload)} bytes")
    rank, nonce, mac = _CHALLENGE.unpack(payload)
    return Challenge(rank, nonce, mac)


def decode_proof(payload: bytes) -> bytes:
    if len(payload) != _PROOF.size:
        raise HandshakeError("malformed", f"PROOF of {len(payload)} bytes")
    (mac,) = _PROOF.unpack(payload)
    return bytes(mac)


def encode_reject(reason: LinkRefusal, text: str = "") -> bytes:
    return _REJECT.pack(reason) + text.encode("utf-8", "replace")[:_MAX_REJECT_TEXT]


def decode_reject(payload: bytes) -> tuple[LinkRefusal | int, str]:
    """(reason, text); an unknown reason code is returned as a plain int."""
    if not payload:
        return LinkRefusal.MALFORMED, "empty REJECT"
    code = payload[0]
    text = payload[1 : 1 + _MAX_REJECT_TEXT].decode("utf-8", "replace")
    try:
        return LinkRefusal(code), text
    except ValueError:
        return code, text


def _mac(
    label: bytes, secret: bytes, hello_payload: bytes, nonce_s: bytes, epoch: int, tail: bytes = b""
) -> bytes:
    msg = label + hello_payload + nonce_s + _EPOCH.pack(epoch) + tail
    return hmac.new(secret, msg, hashlib.sha256).digest()


def accept_mac(secret: bytes, hello_payload: bytes, nonce_s: bytes, epoch: int, rank: int) -> bytes:
    """The acceptor's proof of the secret, bound to the ``rank`` it answers as."""
    return _mac(b"phalanx/v1 accept", secret, hello_payload, nonce_s, epoch, _RANK.pack(rank))


def connect_mac(secret: bytes, hello_payload: bytes, nonce_s: bytes, epoch: int) -> bytes:
    """The connector's proof of the secret."""
    return _mac(b"phalanx/v1 connect", secret, hello_payload, nonce_s, epoch)


def check_mac(expected: bytes, got: bytes, *, who: str, peer: int | None = None) -> None:
    """Constant-time comparison; raises :class:`AuthError` naming ``who`` failed."""
    if not hmac.compare_digest(expected, got):
        raise AuthError("bad-auth", f"{who} could not prove the cluster secret", peer=peer)

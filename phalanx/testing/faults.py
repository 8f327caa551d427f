"""Fault injection on the data plane: frame hooks keyed by (peer, op seq, ordinal).

What it is for: integration tests and ``phalanx stress`` make one rank misbehave on
purpose — send a corrupt header, a frame from another epoch, a length field of 2**40,
or stall before a frame like a straggler — and then check that every other rank fails
cleanly. A :class:`FaultInjector` implements :class:`phalanx.comm.engine.FrameHook`;
hand it to ``Group(..., frame_hook=injector)`` on the rank that should misbehave::

    injector = FaultInjector(Fault(At(peer=0, seq=2), RewriteEpoch(99)))
    group = Group(rank, addresses, secret, frame_hook=injector)

Each :class:`Fault` pairs a key (:class:`At`; ``None`` fields match anything) with an
action and fires at most ``times`` times (``None``: every match). Header rewrites that
should still look well formed (another epoch, a lying length) recompute the header's
CRC-32, so the receiver judges the field itself rather than the checksum;
:class:`FlipHeaderByte` deliberately does not.

The injector is picklable (build it in a parent, run it in a spawned rank) and records
every fault it fired in :attr:`FaultInjector.fired`.

What it must never do: touch sockets or threads (the engine calls it where it runs:
its own thread, or the caller's for the first frames of an op started inline; a
:class:`Delay` sleeps there, which is the point), change the caller's payload
buffer in place, or fire on a frame its key does not match.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from phalanx.comm.engine import FrameHook
from phalanx.comm.frames import HEADER_SIZE
from phalanx.comm.transport import Buffer

__all__ = [
    "CHUNK_OFFSET",
    "CRC_OFFSET",
    "DESC_OFFSET",
    "EPOCH_OFFSET",
    "LENGTH_OFFSET",
    "SEQ_OFFSET",
    "Action",
    "At",
    "Delay",
    "Fault",
    "FaultInjector",
    "Fired",
    "FlipHeaderByte",
    "LieLength",
    "RewriteEpoch",
    "corrupt_header",
    "foreign_epoch",
    "oversize_length",
    "reseal",
    "rewrite_header",
    "straggle",
]

# Offsets of the header fields (see phalanx/comm/frames.py for the layout).
EPOCH_OFFSET = 8
SEQ_OFFSET = 16
CHUNK_OFFSET = 24
LENGTH_OFFSET = 28
DESC_OFFSET = 36
CRC_OFFSET = 44

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def reseal(header: bytes | bytearray) -> bytes:
    """``header`` with its CRC-32 (bytes 44..47) recomputed over bytes 0..43."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, got {len(header)}")
    body = bytes(header[:CRC_OFFSET])
    return body + _U32.pack(zlib.crc32(body))


def rewrite_header(
    header: bytes | bytearray,
    *,
    epoch: int | None = None,
    seq: int | None = None,
    chunk: int | None = None,
    length: int | None = None,
    desc: int | None = None,
) -> bytes:
    """A well-formed copy of ``header`` with the given fields replaced (CRC recomputed)."""
    if len(header) != HEADER_SIZE:
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, got {len(header)}")
    buf = bytearray(header)
    if epoch is not None:
        _U64.pack_into(buf, EPOCH_OFFSET, epoch)
    if seq is not None:
        _U64.pack_into(buf, SEQ_OFFSET, seq)
    if chunk is not None:
        _U32.pack_into(buf, CHUNK_OFFSET, chunk)
    if length is not None:
        _U64.pack_into(buf, LENGTH_OFFSET, length)
    if desc is not None:
        _U64.pack_into(buf, DESC_OFFSET, desc)
    return reseal(buf)


# ----------------------------------------------------------------------------- actions


class Action(ABC):
    """What to do to one outgoing frame: return the (header, payload) to send."""

    @abstractmethod
    def apply(self, header: bytes, payload: Buffer) -> tuple[bytes, Buffer]: ...

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class FlipHeaderByte(Action):
    """XOR one header byte with ``mask`` and keep the old CRC: a corrupt frame
    (the receiver sees ``bad-crc``, or ``bad-magic`` for offsets 0..3)."""

    offset: int = SEQ_OFFSET
    mask: int = 0xFF

    def __post_init__(self) -> None:
        if not 0 <= self.offset < HEADER_SIZE:
            raise ValueError(f"offset must be in 0..{HEADER_SIZE - 1}, got {self.offset}")
        if not 1 <= self.mask <= 0xFF:
            raise ValueError(f"mask must be in 1..255, got {self.mask}")

    def apply(self, header: bytes, payload: Buffer) -> tuple[bytes, Buffer]:
        buf = bytearray(header)
        buf[self.offset] ^= self.mask
        return bytes(buf), payload


@dataclass(frozen=True)
class RewriteEpoch(Action):
    """Send the frame as if it belonged to view ``epoch`` (well formed otherwise)."""

    epoch: int

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < 2**64:
            raise ValueError("epoch must fit in 64 bits")

    def apply(self, header: bytes, payload: Buffer) -> tuple[bytes, Buffer]:
        return rewrite_header(header, epoch=self.epoch), payload


@dataclass(frozen=True)
class LieLength(Action):
    """Announce ``length`` payload bytes (well formed otherwise) and send the real
    payload: a receiver that trusted the field would allocate ``length`` bytes."""

    length: int = 2**40

    def __post_init__(self) -> None:
        if not 0 <= self.length < 2**64:
            raise ValueError("length must fit in 64 bits")

    def apply(self, header: bytes, payload: Buffer) -> tuple[bytes, Buffer]:
        return rewrite_header(header, length=self.length), payload


@dataclass(frozen=True)
class Delay(Action):
    """Sleep ``seconds`` where the engine runs before the frame goes out (a straggler,
    or — longer than the peers' timeout — a rank that looks frozen). For the first
    frames of an op started inline that is the caller's thread, inside ``submit``."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds >= 0:
            raise ValueError("seconds must be >= 0")

    def apply(self, header: bytes, payload: Buffer) -> tuple[bytes, Buffer]:
        time.sleep(self.seconds)
        return header, payload


# ----------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class At:
    """Which outgoing DATA frames a fault applies to; ``None`` matches anything.

    ``peer`` is the destination rank, ``seq`` the operation's sequence number in the
    group, ``ordinal`` the frame's ordinal inside that operation on its link.
    """

    peer: int | None = None
    seq: int | None = None
    ordinal: int | None = None

    def matches(self, peer: int, seq: int, ordinal: int) -> bool:
        return (
            (self.peer is None or self.peer == peer)
            and (self.seq is None or self.seq == seq)
            and (self.ordinal is None or self.ordinal == ordinal)
        )


@dataclass(frozen=True)
class Fault:
    """``action`` on the frames ``at`` matches, at most ``times`` times (None: always)."""

    at: At
    action: Action
    times: int | None = 1

    def __post_init__(self) -> None:
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 or None")


@dataclass(frozen=True)
class Fired:
    """One fault that fired: on the frame to ``peer`` of op ``seq``, ordinal ``ordinal``."""

    peer: int
    seq: int
    ordinal: int
    action: str
    at: float  # time.monotonic() when it fired


class FaultInjector(FrameHook):
    """A :class:`~phalanx.comm.engine.FrameHook` that applies the first matching
    :class:`Fault` (in the order given) that still has firings left."""

    def __init__(self, *faults: Fault) -> None:
        self.faults = tuple(faults)
        self._left: list[int | None] = [f.times for f in self.faults]
        self._fired: list[Fired] = []
        self._lock = threading.Lock()

    @property
    def fired(self) -> list[Fired]:
        with self._lock:
            return list(self._fired)

    def outgoing(
        self, peer: int, seq: int, ordinal: int, header: bytes, payload: Buffer
    ) -> tuple[bytes, Buffer] | None:
        action: Action | None = None
        with self._lock:
            for i, fault in enumerate(self.faults):
                left = self._left[i]
                if left == 0 or not fault.at.matches(peer, seq, ordinal):
                    continue
                if left is not None:
                    self._left[i] = left - 1
                action = fault.action
                self._fired.append(Fired(peer, seq, ordinal, action.name, time.monotonic()))
                break
        if action is None:
            return None
        return action.apply(header, payload)  # outside the lock: Delay sleeps

    # picklable (a lock is not): build in a parent, run in a spawned rank
    def __getstate__(self) -> dict[str, Any]:
        return {"faults": self.faults, "left": list(self._left), "fired": self.fired}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.faults = state["faults"]
        self._left = state["left"]
        self._fired = state["fired"]
        self._lock = threading.Lock()


# ----------------------------------------------------------------------------- shorthands


def corrupt_header(peer: int, seq: int, ordinal: int = 0) -> FaultInjector:
    """Flip the low seq byte of one DATA frame's header, CRC left stale."""
    return FaultInjector(Fault(At(peer, seq, ordinal), FlipHeaderByte(SEQ_OFFSET)))


def foreign_epoch(peer: int, seq: int, epoch: int, ordinal: int = 0) -> FaultInjector:
    """Send one DATA frame as a well-formed frame of view ``epoch``."""
    return FaultInjector(Fault(At(peer, seq, ordinal), RewriteEpoch(epoch)))


def oversize_length(peer: int, seq: int, length: int = 2**40, ordinal: int = 0) -> FaultInjector:
    """Announce ``length`` payload bytes in one well-formed DATA frame header."""
    return FaultInjector(Fault(At(peer, seq, ordinal), LieLength(length)))


def straggle(
    seconds: float,
    *,
    peer: int | None = None,
    seq: int | None = None,
    ordinal: int | None = None,
    times: int | None = 1,
) -> FaultInjector:
    """Sleep ``seconds`` before the matching DATA frames."""
    return FaultInjector(Fault(At(peer, seq, ordinal), Delay(seconds), times))

"""What the data plane reports about itself: per-operation and per-link samples.

The engine measures every collective and every link it used and hands the result to
a :class:`CommObserver`. The daemon connects an observer that feeds
``phalanx.monitor`` (Prometheus metrics, anomaly detectors); tests connect a list.
This keeps the data plane free of any metrics library and testable without one.

Observers are called where the engine runs -- its own thread, or a caller's thread
starting its op inline (``op_started``; ``op_finished`` too for an op that ends while
it starts: its peers' frames were all in) with the engine's state held -- so they must
be quick and must not raise (an exception is logged and dropped) and must never call
back into the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["CommObserver", "LinkSample", "OpSample"]


@dataclass(frozen=True, slots=True)
class LinkSample:
    """One peer's part in one operation, seen from this rank (all links to that peer).

    Times are seconds relative to the operation's start on this rank:
    ``first_byte_s`` is when the first frame from the peer arrived (``None`` if none
    was expected or none came), ``last_byte_s`` when its last frame was complete.
    ``send_blocked_s`` is the time this rank had data for the peer that the kernel
    would not take (a slow receiver or a slow link shows up here).
    """

    peer: int
    bytes_sent: int
    bytes_recv: int
    frames_recv: int
    first_byte_s: float | None
    last_byte_s: float | None
    send_blocked_s: float

    @property
    def transfer_s(self) -> float | None:
        """First byte to last byte from this peer."""
        if self.first_byte_s is None or self.last_byte_s is None:
            return None
        return self.last_byte_s - self.first_byte_s


@dataclass(frozen=True, slots=True)
class OpSample:
    """One finished (or failed) operation."""

    op: str
    seq: int
    epoch: int
    algorithm: str
    codec: str
    nbytes: int
    world: int
    rank: int
    ok: bool
    duration_s: float
    #: failure reason token (PeerFailure.reason) when not ok
    reason: str
    suspects: frozenset[int]
    links: tuple[LinkSample, ...]
    #: ``time.monotonic()`` when the op started on this rank (comparable across ranks
    #: of one host only)
    started: float = 0.0
    #: a wait by protocol (``Group.run(..., patient=True)`` with a deadline: a state
    #: transfer's verdict): its duration says nothing about the links or the peers
    patient: bool = False


class CommObserver(Protocol):
    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        """An operation began on this rank (used by hang detection)."""
        ...

    def op_finished(self, sample: OpSample) -> None:
        """An operation ended, successfully or not (``sample.ok``)."""
        ...

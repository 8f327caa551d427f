"""One deadline, carried from the caller down to the data plane.

A :class:`Deadline` is an instant on the monotonic clock. The caller's ``timeout`` is
turned into one deadline once, at the top (the client, or the daemon when a request
arrives), and every layer below — the elastic group's waits and retries, the state
exchange, the data-plane engine running the op — reads that same instant instead of
recomputing a timeout of its own. ``cancel()`` moves the instant to now: whatever
honours the deadline then stops at its next check (the engine within one poll slice),
which is how a client's CANCEL reaches an op in flight.

This module must never import from the rest of phalanx, start a thread or sleep.
"""

from __future__ import annotations

import time
from typing import Protocol


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


__all__ = ["Deadline"]


class Deadline:
    """An instant on ``time.monotonic()``; ``cancelled`` once :meth:`cancel` was called.

    Shared by reference between threads: ``cancel()`` from one thread is seen by the
    others' next :meth:`left`/:attr:`expired` (a float store is atomic in CPython).
    """

    __slots__ = ("at", "cancelled")

    def __init__(self, at: float) -> None:
        self.at = at
        self.cancelled = False

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The instant ``seconds`` from now."""
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        """Seconds until the deadline (0.0 once it passed)."""
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def slice(self, most: float) -> float:
        """How long one bounded wait may last: ``min(most, left())``."""
        return min(most, self.left())

    def acquire(self, lock: _Lock) -> bool:
        """Take ``lock`` by this deadline (waits in slices, so a cancel is seen within
        50 ms); False, and the lock not held, once the deadline passed or was cancelled."""
        while not lock.acquire(timeout=self.slice(0.05)):
            if self.expired:
                return False
        return True

    def cancel(self) -> None:
        """Expire now (idempotent): everything waiting on this deadline gives up."""
        self.cancelled = True
        self.at = min(self.at, time.monotonic())

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else f"{self.at - time.monotonic():+.3f}s"
        return f"Deadline({state})"

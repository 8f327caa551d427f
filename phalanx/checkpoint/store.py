"""Holder side of snapshots: shard keys, shard errors, and the :class:`ShardStore`.

A holder keeps other peers' shards in memory under a byte budget. Every shard is stored
with the CRC-32 its owner computed; :meth:`ShardStore.put` checks it on the way in and
:meth:`ShardStore.get` on *every* read, so a shard that rotted in memory (or was
tampered with) is reported as :class:`ShardCorrupt` and its reader treats it as lost.

:class:`ShardStore` is the pluggable part (one conformance test,
tests/unit/test_snapshot_store.py, holds every implementation to it);
:class:`MemoryShardStore` is the in-memory one the daemon uses. This module must never
do I/O, and a store must never hand out bytes it has not just checked.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint._crc import crc32
from phalanx.errors import (
    BudgetExceeded,
    HolderUnavailable,
    ShardCorrupt,
    ShardError,
    ShardMissing,
)

__all__ = [
    "BudgetExceeded",
    "HolderUnavailable",
    "MemoryShardStore",
    "Reservation",
    "ShardCorrupt",
    "ShardError",
    "ShardKey",
    "ShardMissing",
    "ShardStore",
]

U8 = npt.NDArray[np.uint8]

#: ``ShardKey.stripe`` of a generation's metadata blob and of its seal marker.
META_STRIPE = -1
SEAL_STRIPE = -2
MAX_OWNER_LEN = 128


@dataclass(frozen=True, order=True)
class ShardKey:
    """Which shard: ``owner``'s generation ``generation``, piece ``index`` of stripe
    ``stripe`` (data pieces ``0..k-1``, then parity); stripe :data:`META_STRIPE` is the
    generation's metadata, :data:`SEAL_STRIPE` its seal marker."""

    owner: str
    generation: int
    stripe: int
    index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.owner, str) or not 0 < len(self.owner.encode()) <= MAX_OWNER_LEN:
            raise ValueError(f"owner must be a str of 1..{MAX_OWNER_LEN} bytes")
        if not 0 <= self.generation < 2**63:
            raise ValueError(f"generation out of range: {self.generation}")
        if not -2 <= self.stripe < 2**31 or not 0 <= self.index < 256:
            raise ValueError(f"bad stripe/index {self.stripe}/{self.index}")

    @classmethod
    def meta(cls, owner: str, generation: int) -> ShardKey:
        return cls(owner, generation, META_STRIPE)

    @classmethod
    def seal(cls, owner: str, generation: int) -> ShardKey:
        return cls(owner, generation, SEAL_STRIPE)

    @property
    def is_meta(self) -> bool:
        return self.stripe == META_STRIPE

    @property
    def is_seal(self) -> bool:
        return self.stripe == SEAL_STRIPE

    def __str__(self) -> str:
        part = {META_STRIPE: "meta", SEAL_STRIPE: "seal"}.get(self.stripe)
        return f"{self.owner}/g{self.generation}/" + (part or f"s{self.stripe}.{self.index}")


class Reservation:
    """Bytes a :class:`ShardStore` set aside for one coming ``put`` of ``key``
    (:meth:`ShardStore.reserve`): counted in every fit check until that put consumes
    it or :meth:`release` gives it back. :meth:`release` is idempotent and a no-op once
    consumed, so a caller releases in a ``finally`` whatever happened."""

    __slots__ = ("_done", "_release", "charge", "key", "nbytes")

    def __init__(
        self, key: ShardKey, nbytes: int, charge: int, release: Callable[[Reservation], None]
    ) -> None:
        self.key = key
        self.nbytes = nbytes
        #: bytes counted against the budget (less than ``nbytes`` when it replaces a key)
        self.charge = charge
        self._release = release
        self._done = False

    def release(self) -> None:
        self._release(self)


class ShardStore(ABC):
    """Shards held for other peers, under ``budget_bytes``; thread-safe.

    ``put`` takes ownership of ``data`` (a 1-D uint8 array the caller will not touch
    again), checks ``crc`` and the budget, and replaces any shard under the same key.
    ``get`` returns ``(bytes, crc)`` after checking the bytes against the crc; the
    returned array is read-only and must not be kept past the next ``put``/``delete``
    of that key.

    A caller that must allocate before it can ``put`` (the TCP server receiving a
    shard) first sets them aside with :meth:`reserve`: reservations count in every fit
    check, so concurrent puts can never allocate more than the budget between them."""

    @property
    @abstractmethod
    def budget_bytes(self) -> int: ...

    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def reserved_bytes(self) -> int:
        """Bytes set aside by reservations not yet consumed or released."""

    @abstractmethod
    def can_fit(self, key: ShardKey, nbytes: int) -> bool:
        """Would a shard of ``nbytes`` under ``key`` fit in the budget right now
        (reservations counted)?"""

    @abstractmethod
    def reserve(self, key: ShardKey, nbytes: int) -> Reservation:
        """Set ``nbytes`` aside for a coming ``put`` of ``key``; raises
        :class:`BudgetExceeded` when they do not fit (reservations counted)."""

    @abstractmethod
    def put(
        self, key: ShardKey, data: U8, crc: int, *, reservation: Reservation | None = None
    ) -> None:
        """Raises :class:`ShardCorrupt` (bytes do not match crc), :class:`BudgetExceeded`.
        With ``reservation`` (for ``key``, at least ``data.nbytes``) the put consumes
        it; on an error it stays the caller's to release."""

    @abstractmethod
    def get(self, key: ShardKey) -> tuple[U8, int]:
        """Raises :class:`ShardMissing`, :class:`ShardCorrupt`."""

    @abstractmethod
    def delete(self, keys: Iterable[ShardKey]) -> int:
        """Drop these shards (absent ones are ignored); returns how many were dropped."""

    @abstractmethod
    def keys(self, owner: str | None = None) -> list[ShardKey]:
        """Held keys (of ``owner`` only when given), sorted."""


class MemoryShardStore(ShardStore):
    """Shards in this process's memory. ``on_change(used_bytes)`` is called after every
    change (the daemon points it at the ``phalanx_snapshot_held_bytes`` gauge), one call
    at a time and with the total current when it is made, so the last call always
    reports the store's total."""

    def __init__(
        self, budget_bytes: int, *, on_change: Callable[[int], None] | None = None
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self._budget = budget_bytes
        self._blobs: dict[ShardKey, tuple[U8, int]] = {}
        self._used = 0
        self._reserved = 0
        self._reserved_keys: dict[ShardKey, int] = {}  # key -> reservations pending
        self._lock = threading.Lock()
        self._on_change = on_change
        self._notify_lock = threading.Lock()

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def reserved_bytes(self) -> int:
        with self._lock:
            return self._reserved

    def _charge(self, key: ShardKey, nbytes: int) -> int:
        """(Lock held.) What a shard of ``nbytes`` under ``key`` adds: the difference
        when it replaces a held shard no other reservation is about to replace (never
        less than 0: the old bytes stay held until the put)."""
        old = self._blobs.get(key)
        if old is None or self._reserved_keys.get(key):
            return nbytes
        return max(0, nbytes - old[0].nbytes)

    def _fits(self, key: ShardKey, nbytes: int) -> bool:
        return self._used + self._reserved + self._charge(key, nbytes) <= self._budget

    def can_fit(self, key: ShardKey, nbytes: int) -> bool:
        with self._lock:
            return self._fits(key, nbytes)

    def _over(self, nbytes: int, key: ShardKey) -> BudgetExceeded:
        return BudgetExceeded(
            f"{nbytes} more bytes over a budget of {self._budget} "
            f"({self._used} used, {self._reserved} reserved)",
            key=key,
        )

    def reserve(self, key: ShardKey, nbytes: int) -> Reservation:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            if not self._fits(key, nbytes):
                raise self._over(nbytes, key)
            charge = self._charge(key, nbytes)
            self._reserved += charge
            self._reserved_keys[key] = self._reserved_keys.get(key, 0) + 1
            return Reservation(key, nbytes, charge, self._release)

    def _drop(self, r: Reservation) -> bool:
        """(Lock held.) Forget ``r``; False when it was already consumed or released."""
        if r._done:
            return False
        r._done = True
        self._reserved -= r.charge
        left = self._reserved_keys[r.key] - 1
        if left:
            self._reserved_keys[r.key] = left
        else:
            del self._reserved_keys[r.key]
        return True

    def _release(self, r: Reservation) -> None:
        with self._lock:
            self._drop(r)

    def put(
        self, key: ShardKey, data: U8, crc: int, *, reservation: Reservation | None = None
    ) -> None:
        if data.dtype != np.uint8 or data.ndim != 1 or not data.flags.c_contiguous:
            raise ValueError("shards are 1-D C-contiguous uint8 arrays")
        r = reservation
        if r is not None and (r._release != self._release or r.key != key):
            raise ValueError(f"a reservation for {r.key} used to put {key}")
        if crc32(data) != crc:
            raise ShardCorrupt("bytes do not match the checksum sent with them", key=key)
        data.setflags(write=False)
        with self._lock:
            if r is not None and (r._done or data.nbytes > r.nbytes):
                raise self._over(data.nbytes, key)
            old = self._blobs.get(key)
            delta = data.nbytes - (old[0].nbytes if old else 0)
            others = self._reserved - (r.charge if r is not None else 0)
            if self._used + others + delta > self._budget:
                raise self._over(data.nbytes, key)
            if r is not None:
                self._drop(r)
            self._used += delta
            self._blobs[key] = (data, crc)
        self._changed()

    def _changed(self) -> None:
        """Report the total to ``on_change``: one call at a time, each with the total
        current when it is made (never one read before another call's change)."""
        if self._on_change is None:
            return
        with self._notify_lock:
            with self._lock:
                used = self._used
            self._on_change(used)

    def get(self, key: ShardKey) -> tuple[U8, int]:
        with self._lock:
            blob = self._blobs.get(key)
        if blob is None:
            raise ShardMissing("not held here", key=key)
        data, crc = blob
        if crc32(data) != crc:
            raise ShardCorrupt("held bytes fail their checksum", key=key)
        return data, crc

    def delete(self, keys: Iterable[ShardKey]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                old = self._blobs.pop(key, None)
                if old is not None:
                    self._used -= old[0].nbytes
                    n += 1
        if n:
            self._changed()
        return n

    def keys(self, owner: str | None = None) -> list[ShardKey]:
        with self._lock:
            return sorted(k for k in self._blobs if owner is None or k.owner == owner)

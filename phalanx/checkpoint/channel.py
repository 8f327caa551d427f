"""The point-to-point shard channel the snapshot service moves shards through.

:class:`ShardChannel` is the seam of DESIGN.md ("checkpoint moves shards through a
point-to-point channel the daemon hands it"): ``put``/``get``/``delete``/``list`` on a
named holder, each call with a deadline. The daemon hands the service a
:class:`~phalanx.checkpoint.tcp.TcpShardChannel` (authenticated links of the data
plane); unit tests use :class:`InProcessHub`, whose holders are
:class:`~phalanx.checkpoint.store.ShardStore` objects in this process.
tests/unit/test_snapshot_channel.py is the one conformance test for both.

Contract: ``put`` returns only once the holder stored the bytes (the seal's
acknowledgement); ``get`` returns bytes already checked against the holder's checksum
(a mismatch raises :class:`~phalanx.checkpoint.store.ShardCorrupt`); a dead, refusing
or silent holder raises :class:`~phalanx.checkpoint.store.HolderUnavailable` by the
deadline. This module must never touch sockets.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint.store import (
    HolderUnavailable,
    ShardCorrupt,
    ShardError,
    ShardKey,
    ShardStore,
)

__all__ = ["InProcessChannel", "InProcessHub", "ShardChannel"]

U8 = npt.NDArray[np.uint8]


class ShardChannel(ABC):
    """Shard operations on remote holders, by holder (member) id. Thread-safe."""

    @abstractmethod
    def put(self, holder: str, key: ShardKey, data: U8, crc: int, *, timeout: float) -> None:
        """Store ``data`` (CRC-32 ``crc``) on ``holder``; ``data`` is not kept."""

    @abstractmethod
    def get(self, holder: str, key: ShardKey, *, timeout: float) -> tuple[U8, int]:
        """(bytes, crc) of ``key`` on ``holder``; the bytes match the crc."""

    @abstractmethod
    def delete(self, holder: str, keys: Sequence[ShardKey], *, timeout: float) -> None:
        """Drop ``keys`` on ``holder`` (absent ones are fine)."""

    @abstractmethod
    def list(self, holder: str, owner: str | None = None, *, timeout: float) -> list[ShardKey]:
        """The keys ``holder`` holds (of ``owner`` only when given), sorted."""

    def close(self) -> None:  # noqa: B027 - optional hook, most channels need it
        """Release connections; calls after close raise HolderUnavailable."""


class InProcessHub:
    """Holders living in this process (tests, embedded mode). ``unregister`` is a
    holder dying: its shards are gone and calls to it fail."""

    def __init__(self) -> None:
        self._stores: dict[str, ShardStore] = {}
        self._lock = threading.Lock()

    def register(self, holder: str, store: ShardStore) -> None:
        with self._lock:
            self._stores[holder] = store

    def unregister(self, holder: str) -> None:
        with self._lock:
            self._stores.pop(holder, None)

    def store(self, holder: str) -> ShardStore:
        with self._lock:
            st = self._stores.get(holder)
        if st is None:
            raise HolderUnavailable("no such holder (dead or never registered)", holder=holder)
        return st

    def channel(self) -> InProcessChannel:
        return InProcessChannel(self)


class InProcessChannel(ShardChannel):
    """A channel to an :class:`InProcessHub`; copies bytes both ways, like a network."""

    def __init__(self, hub: InProcessHub) -> None:
        self._hub = hub
        self._closed = False

    def _store(self, holder: str) -> ShardStore:
        if self._closed:
            raise HolderUnavailable("channel closed", holder=holder)
        return self._hub.store(holder)

    @staticmethod
    def _tag(exc: ShardError, holder: str) -> ShardError:
        exc.holder = exc.holder or holder
        return exc

    def put(self, holder: str, key: ShardKey, data: U8, crc: int, *, timeout: float) -> None:
        store = self._store(holder)
        try:
            store.put(key, np.array(data, dtype=np.uint8, copy=True).reshape(-1), crc)
        except ShardError as exc:
            raise self._tag(exc, holder) from None

    def get(self, holder: str, key: ShardKey, *, timeout: float) -> tuple[U8, int]:
        try:
            data, crc = self._store(holder).get(key)
        except ShardError as exc:
            raise self._tag(exc, holder) from None
        out = data.copy()
        if crc32(out) != crc:
            raise ShardCorrupt("bytes changed in transit", holder=holder, key=key)
        return out, crc

    def delete(self, holder: str, keys: Sequence[ShardKey], *, timeout: float) -> None:
        self._store(holder).delete(keys)

    def list(self, holder: str, owner: str | None = None, *, timeout: float) -> list[ShardKey]:
        return self._store(holder).keys(owner)

    def close(self) -> None:
        self._closed = True

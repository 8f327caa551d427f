"""Scratch memory for collectives, reused from one operation to the next.

A 64 MiB ``np.empty`` is a fresh ``mmap``: every page faults on first touch, which
costs as much as the copy that follows. Plans therefore borrow their work buffers
from a per-group :class:`BufferPool` and hand them back when the operation ends, so a
training loop that all-reduces the same sizes every step touches warm memory.

Small requests (below ``min_pooled``) are plain allocations: malloc serves them from
warm memory anyway. The pool keeps at most ``max_cached`` bytes of idle buffers and
drops the least recently returned first. It never hands one buffer to two holders.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np

__all__ = ["BufferPool", "HeldScratch"]

_ALIGN = 1 << 20  # sizes are rounded up to whole MiB so that near sizes share buffers


def _empty(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


class BufferPool:
    """``alloc`` makes a new uint8 buffer of the given size (``np.empty`` by default;
    page-swap twins need memory mapped a particular way, see comm/pageswap.py)."""

    def __init__(
        self,
        max_cached: int = 1 << 30,
        min_pooled: int = 1 << 20,
        alloc: Callable[[int], np.ndarray] = _empty,
    ) -> None:
        self.max_cached = max_cached
        self.min_pooled = min_pooled
        self.alloc = alloc
        self._lock = threading.Lock()
        self._free: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._free_bytes = 0

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._free_bytes

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 array of at least ``nbytes`` bytes (contents undefined)."""
        if nbytes < self.min_pooled:
            return self.alloc(nbytes)
        size = -(-nbytes // _ALIGN) * _ALIGN
        with self._lock:
            bufs = self._free.get(size)
            if bufs:
                buf = bufs.pop()
                if not bufs:
                    del self._free[size]
                self._free_bytes -= size
                return buf
        return self.alloc(size)

    def put(self, buf: np.ndarray) -> None:
        """Return a buffer from :meth:`get`; the caller must not use it afterwards."""
        size = buf.nbytes
        if size < self.min_pooled or size % _ALIGN or size > self.max_cached:
            return
        with self._lock:
            self._free.setdefault(size, []).append(buf)
            self._free.move_to_end(size)
            self._free_bytes += size
            while self._free_bytes > self.max_cached and self._free:
                old_size, bufs = next(iter(self._free.items()))
                bufs.pop(0)
                self._free_bytes -= old_size
                if not bufs:
                    del self._free[old_size]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0


class HeldScratch:
    """Scratch of finished operations that peers may still be reading.

    A zero-copy send hands the kernel the buffer's pages, not a copy (see
    comm/zerocopy.py): until the receiver has read them, writing the buffer would
    change the bytes in flight. So the scratch of an operation that sent zero-copy
    frames goes back to the pool only once every such peer sent a RECEIPT for that
    operation (or a later one: operations end in order). At most ``max_held``
    operations wait; beyond that the oldest is dropped -- never pooled, only freed,
    which is safe (the kernel keeps pages it still references).
    """

    def __init__(self, pool: BufferPool, max_held: int = 8) -> None:
        self.pool = pool
        self.max_held = max_held
        self._held: deque[tuple[int, set[int], list[np.ndarray]]] = deque()
        self._receipted: dict[int, int] = {}  # peer -> newest operation it confirmed

    def __len__(self) -> int:
        return len(self._held)

    def receipted(self, peer: int) -> int:
        """The newest operation ``peer`` confirmed (-1: none yet)."""
        return self._receipted.get(peer, -1)

    def hold(self, seq: int, peers: set[int], bufs: list[np.ndarray]) -> None:
        """Operation ``seq`` ended; ``bufs`` go to the pool once ``peers`` confirm."""
        waiting = {p for p in peers if self.receipted(p) < seq}
        if not waiting:
            self._release(bufs)
            return
        self._held.append((seq, waiting, bufs))
        while len(self._held) > self.max_held:
            self._held.popleft()

    def receipt(self, peer: int, seq: int) -> None:
        """``peer`` has read every frame of operation ``seq`` (and of earlier ones)."""
        if seq > self.receipted(peer):
            self._receipted[peer] = seq
        kept: deque[tuple[int, set[int], list[np.ndarray]]] = deque()
        for held_seq, waiting, bufs in self._held:
            if held_seq <= seq:
                waiting.discard(peer)
            if waiting:
                kept.append((held_seq, waiting, bufs))
            else:
                self._release(bufs)
        self._held = kept

    def _release(self, bufs: list[np.ndarray]) -> None:
        for buf in bufs:
            self.pool.put(buf)

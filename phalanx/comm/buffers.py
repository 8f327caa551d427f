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
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

__all__ = ["BufferPool"]

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

"""HeldScratch: zero-copy scratch goes back to the pool only after the RECEIPTs."""

from __future__ import annotations

import numpy as np

from phalanx.comm.buffers import BufferPool, HeldScratch


def _buf() -> np.ndarray:
    return np.empty(1 << 20, dtype=np.uint8)


def test_scratch_waits_for_every_peer_then_is_pooled() -> None:
    pool = BufferPool()
    held = HeldScratch(pool)
    held.hold(5, {1, 2}, [_buf(), _buf()])
    assert len(held) == 1 and pool.cached_bytes == 0
    held.receipt(1, 5)
    assert len(held) == 1 and pool.cached_bytes == 0  # peer 2 may still be reading
    held.receipt(2, 4)  # an older operation confirms nothing about 5
    assert len(held) == 1 and pool.cached_bytes == 0
    held.receipt(2, 6)  # a later one does: operations end in order
    assert len(held) == 0 and pool.cached_bytes == 2 << 20


def test_a_receipt_that_came_first_releases_at_once() -> None:
    pool = BufferPool()
    held = HeldScratch(pool)
    held.receipt(3, 9)  # the peer finished operation 9 before this rank did
    held.hold(9, {3}, [_buf()])
    assert len(held) == 0 and pool.cached_bytes == 1 << 20
    held.hold(10, {3}, [_buf()])  # but not 10
    assert len(held) == 1 and held.receipted(3) == 9


def test_unconfirmed_scratch_is_dropped_never_pooled() -> None:
    pool = BufferPool()
    held = HeldScratch(pool, max_held=2)
    for seq in range(4):
        held.hold(seq, {1}, [_buf()])
    assert len(held) == 2  # the two oldest were dropped to the garbage collector...
    held.receipt(1, 1)
    assert pool.cached_bytes == 0  # ... and a late receipt cannot bring them back
    held.receipt(1, 3)
    assert pool.cached_bytes == 2 << 20 and len(held) == 0

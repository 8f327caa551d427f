"""The in-place ring's save-then-reduce step (promise 2), without sockets.

``_save_and_combine`` is what the ring runs when a reduce-scatter piece arrives: it
saves the caller's piece block by block into scratch and reduces into the caller's
array in place. These tests pin down that the save is exact, that a piece is saved
only once, that a waived promise saves nothing, and that a reduce failing half-way
leaves the caller's array exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest

from phalanx.comm.collectives import _Backup, _save_and_combine
from phalanx.comm.reduce import ReduceOp


def _setup(
    n: int = 10, pieces: list[tuple[int, int]] | None = None, keep: bool = True
) -> tuple[np.ndarray, np.ndarray, _Backup]:
    x = np.arange(n, dtype=np.float32) + 0.5
    orig = x.copy()
    scratch = np.full(n, -7.0, dtype=np.float32) if keep else None
    return x, orig, _Backup(x, scratch, pieces or [(0, n)])


def _call(backup: _Backup, idx: int, got: np.ndarray, op: ReduceOp = "sum", world: int = 0) -> None:
    """As the ring calls it on a raw frame, in blocks of 4 elements."""
    _save_and_combine(backup, idx, got, op, world, 4, 0, memoryview(b""), True)


def test_saves_each_block_then_reduces_in_place() -> None:
    x, orig, backup = _setup(10)
    got = np.full(10, 100.0, dtype=np.float32)
    _call(backup, 0, got)
    assert backup.keep is not None
    assert np.array_equal(backup.keep, orig)
    assert np.array_equal(x, got + orig)
    assert backup.saved == [True]
    x[:] = 0  # a failure later in the op: the original comes back whole
    backup.restore()
    assert np.array_equal(x, orig)


def test_the_own_chunk_is_averaged_and_a_saved_piece_is_not_saved_again() -> None:
    x, orig, backup = _setup(8, [(0, 4), (4, 8)])
    backup.ensure(1)  # saved earlier (the chunk that left raw)
    assert backup.keep is not None
    backup.keep[4:8] = 42.0  # a marker: a second save would overwrite it
    got = np.full(4, 3.0, dtype=np.float32)
    _call(backup, 1, got, op="avg", world=4)
    assert np.array_equal(backup.keep[4:8], np.full(4, 42.0, dtype=np.float32))
    assert np.array_equal(x[4:8], (got + orig[4:8]) / np.float32(4))
    assert np.array_equal(x[:4], orig[:4])  # the other piece is untouched
    assert backup.saved == [False, True]


def test_a_waived_promise_saves_nothing() -> None:
    x, orig, backup = _setup(10, keep=False)
    got = np.ones(10, dtype=np.float32)
    _call(backup, 0, got, op="max")
    assert backup.keep is None
    assert np.array_equal(x, np.maximum(got, orig))


def test_a_reduce_failing_half_way_leaves_the_input_exactly_as_it_was() -> None:
    x, orig, backup = _setup(10)
    short = np.full(6, 100.0, dtype=np.float32)  # the second block cannot broadcast
    with pytest.raises(ValueError):
        _call(backup, 0, short)
    assert np.array_equal(x, orig)  # the first block was reduced, then put back
    assert backup.saved == [False]

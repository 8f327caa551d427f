"""zerocopy.detach: after a failure the engine gives a spliced buffer fresh pages, so
that what was spliced goes out unchanged however the buffer is written next."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import numpy as np
import pytest

from phalanx.comm import zerocopy
from phalanx.local import shm

pytestmark = pytest.mark.skipif(not zerocopy.available(), reason="vmsplice is Linux-only")

SPAN = 256 << 10


def _shared() -> np.ndarray:
    return shm.Region.create(1, 1 << 20).bytes  # a memfd, MAP_SHARED (the daemon's twins)


def _private() -> np.ndarray:
    area = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(area, dtype=np.uint8)  # what the in-process twins are


def _spliced_then_written(buf: np.ndarray, *, detach: bool) -> bytes:
    """Splice SPAN bytes of 7s into a pipe, (detach,) write 9s, read the pipe."""
    buf[:] = 7
    pipe = zerocopy.SplicePipe()
    try:
        assert pipe.feed(buf.ctypes.data, SPAN) == SPAN
        if detach:
            zerocopy.detach(buf.ctypes.data + 100, SPAN - 200)  # rounded out to pages
        buf[:SPAN] = 9
        return os.read(pipe._r, SPAN)
    finally:
        pipe.close()


@pytest.mark.parametrize("memory", [_shared, _private])
def test_the_pipe_keeps_the_old_pages_after_detach(memory: Callable[[], np.ndarray]) -> None:
    assert set(_spliced_then_written(memory(), detach=True)) == {7}


@pytest.mark.parametrize("memory", [_shared, _private])
def test_without_detach_a_write_changes_what_is_in_flight(
    memory: Callable[[], np.ndarray],
) -> None:
    """The hazard detach exists for: the pipe holds the pages, not a copy."""
    assert set(_spliced_then_written(memory(), detach=False)) == {9}


def test_detach_gives_zeroed_pages_and_leaves_the_rest() -> None:
    buf = _shared()
    buf[:] = 5
    page = mmap.PAGESIZE
    zerocopy.detach(buf.ctypes.data + page + 1, page)  # overlaps pages 1 and 2
    assert not buf[page : 3 * page].any()
    assert (buf[:page] == 5).all() and (buf[3 * page :] == 5).all()
    zerocopy.detach(buf.ctypes.data, 0)  # nothing to do
    assert (buf[:page] == 5).all()

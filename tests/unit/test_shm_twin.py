"""shm.exchange: the page exchange of twin regions (phalanx/local/shm.py).

Two mappings of the same two memfds stand for the client's and the daemon's: an
exchange in one changes only that one's view; the same exchange in both gives both the
same pages again (writes through one are seen through the other), and the bytes of a
partial first and last page are copied once, into pages both map.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from phalanx.comm import pageswap
from phalanx.errors import ConfigError
from phalanx.local.shm import PAGE, Region, exchange, interior
from tests._smaps import pmd_mapped_kib

pytestmark = pytest.mark.skipif(not pageswap.available(), reason="needs Linux mremap")

SIZE = 64 * PAGE


def _pair() -> tuple[Region, Region, Region, Region]:
    """(client region, client twin, daemon region, daemon twin) over two memfds."""
    a, t = Region.create(1, SIZE), Region.create(2, SIZE)
    assert a.fd is not None and t.fd is not None
    da, dt = Region.adopt(1, os.dup(a.fd), SIZE), Region.adopt(2, os.dup(t.fd), SIZE)
    a.close_fd()
    t.close_fd()
    return a, t, da, dt


def test_interior_is_the_whole_pages_inside_a_span() -> None:
    assert interior(0, 3 * PAGE) == (0, 3 * PAGE)
    assert interior(5, 3 * PAGE) == (PAGE, 3 * PAGE)
    assert interior(5, 10) == (PAGE, PAGE)  # none


def test_exchange_in_one_mapping_is_private_and_in_both_is_consistent() -> None:
    a, t, da, dt = _pair()
    a.bytes[:] = 1
    t.bytes[:] = 2
    off, n = 100, 40 * PAGE + 7  # partial first and last page
    end = off + n
    # the daemon's side first, copying the partial pages' bytes (shared: both see them)
    assert exchange(da, dt, off, n, edges=True)
    assert np.all(da.bytes[off:end] == 2) and np.all(da.bytes[:off] == 1)
    assert np.all(da.bytes[end:] == 1)
    lo, hi = interior(off, n)
    assert np.all(a.bytes[lo:hi] == 1), "an exchange leaked into the other mapping"
    assert np.all(a.bytes[off:lo] == 2) and np.all(a.bytes[hi:end] == 2)  # edges: shared
    # then the client's: both map the same pages again
    assert exchange(a, t, off, n, edges=False)
    assert np.all(a.bytes[off:end] == 2) and np.all(a.bytes[end:] == 1)
    assert np.all(t.bytes[lo:hi] == 1) and np.all(dt.bytes[lo:hi] == 1)
    a.bytes[lo + 3] = 77
    assert da.bytes[lo + 3] == 77
    dt.bytes[lo + 5] = 88
    assert t.bytes[lo + 5] == 88
    # and once more the other way round
    assert exchange(da, dt, off, n, edges=True) and exchange(a, t, off, n, edges=False)
    assert a.bytes[lo + 5] == 88 and da.bytes[lo + 5] == 88


@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [(100, PAGE + 200), (100, 200), (PAGE - 8, 16), (100, 2 * PAGE + 300), (0, PAGE)],
    ids=["across-one-boundary", "inside-one-page", "two-bytes-either-side", "pages", "page"],
)
def test_exchange_with_edges_gives_every_byte_of_the_span_and_none_outside(
    offset: int, nbytes: int
) -> None:
    a, b = Region.create(1, 4 * PAGE), Region.create(2, 4 * PAGE)
    a.bytes[:], b.bytes[:] = 1, 2
    assert exchange(a, b, offset, nbytes, edges=True)
    assert np.all(a.bytes[offset : offset + nbytes] == 2)
    assert np.all(a.bytes[:offset] == 1) and np.all(a.bytes[offset + nbytes :] == 1)


def test_an_exchange_without_room_to_park_the_pages_is_refused_with_nothing_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exchange parks one side's pages in a fresh reservation for an instant; if
    the kernel will not give one (address space, strict overcommit), the answer is
    "refused" (the caller copies), not an OSError after a successful op."""
    a, b = Region.create(1, 4 * PAGE), Region.create(2, 4 * PAGE)
    a.bytes[:], b.bytes[:] = 1, 2

    def no_room(*args: object, **kwargs: object) -> object:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_room)
    assert not exchange(a, b, 0, 4 * PAGE, edges=True)
    monkeypatch.undo()
    assert np.all(a.bytes == 1) and np.all(b.bytes == 2)


def test_exchange_refuses_regions_of_different_sizes_or_a_bad_span() -> None:
    a, t = Region.create(1, SIZE), Region.create(2, 2 * SIZE)
    with pytest.raises(ConfigError):
        exchange(a, t, 0, PAGE, edges=False)
    b = Region.create(3, SIZE)
    with pytest.raises(ConfigError):
        exchange(a, b, SIZE - PAGE, 2 * PAGE, edges=False)
    for r in (a, t, b):
        r.close_fd()


def test_large_regions_are_aligned_and_collapse_into_huge_pages_keeping_their_bytes() -> None:
    """From 2 MiB a region is mapped 2 MiB-aligned in both processes, and collapse()
    rebuilds it from huge pages: the daemon's mapping sees them too, and the bytes
    written before survive (phalanx/local/shm.py, "Huge pages")."""
    size = 8 * pageswap.HUGE
    a = Region.create(1, size)
    assert a.fd is not None
    d = Region.adopt(1, os.dup(a.fd), size)
    a.close_fd()
    assert a.base % pageswap.HUGE == 0 and d.base % pageswap.HUGE == 0
    a.bytes[: size // 2] = np.arange(size // 2, dtype=np.uint64).view(np.uint8)[: size // 2]
    before = a.bytes.copy()
    if not a.collapse():
        pytest.skip("this kernel does not collapse shared memory (MADV_COLLAPSE, 6.1+)")
    assert a.huge and a.collapse()  # idempotent
    assert np.array_equal(a.bytes, before) and np.array_equal(d.bytes, before)
    d.bytes[::PAGE].sum()  # the daemon's mapping faults the pages in
    assert pmd_mapped_kib(a.base) == size // 1024
    assert pmd_mapped_kib(d.base) == size // 1024
    small = Region.create(3, pageswap.HUGE - PAGE)
    assert not small.collapse()  # under 2 MiB: left as it is

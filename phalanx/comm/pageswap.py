"""Page swap: give the caller's array the result by exchanging memory pages, not bytes.

Promise 2 says a failed all-reduce leaves the caller's array holding its input. The
in-place ring keeps it by copying every piece of the array to scratch before it is
overwritten -- a full pass over the array on every operation, which Gloo (it keeps
no such promise) does not make. For large arrays there is a cheaper way to keep the
promise: never write the array at all while the operation runs. The ring reduces and
gathers into a *twin* buffer instead, and only when the operation has succeeded are
the two exchanged -- by moving page-table entries with ``mremap``, not by copying.
A 64 MiB exchange takes ~0.2 ms where a copy takes ~4 ms; a failed operation has
nothing to undo. After the exchange the twin holds the array's old pages, and is
reused as the next operation's twin, so no page is ever faulted in twice.

What it needs, checked by :func:`eligible` before each use:

* Linux with ``mremap`` and ``MREMAP_DONTUNMAP`` (5.7+; 5.13+ for the daemon's
  shared twin regions). Every move of an exchange leaves its source mapped, so no
  address in play is ever a hole: another thread's ``mmap`` in that instant (numpy's
  allocator, a daemon mapping a client's region) could land there and be wiped by
  the next move, which maps over its destination -- a mapping gone under the thread
  that made it (the data plane then read ``EFAULT``, stop 39's CI). Without
  ``DONTUNMAP`` nothing is exchanged: the result is copied.
* The array's whole pages lie in *private anonymous* memory (what numpy and
  PyTorch's CPU allocator return): not a file (``np.memmap``), not shared memory,
  not hugetlbfs. Exchanging pages there would detach the array from the file or from
  the other processes that map it. Kernels with ``PROCMAP_QUERY`` (6.11+) answer in
  a microsecond; older ones are asked through ``/proc/self/maps`` (~0.2 ms).

Only the pages that lie wholly inside the array move; the bytes on its first and
last page (shared with whatever sits next to it) are copied. Virtual addresses never
change, so every view of the array -- numpy views, a torch tensor sharing the memory
-- sees the result. What it cannot see, and the reason the group option
``page_swap_min_bytes`` can turn this off: memory pinned for a device by its
physical pages (``cudaHostRegister`` of a numpy array, an RDMA memory region) would
keep pointing at the old pages. Memory from ``cudaHostAlloc`` / ``pin_memory()`` is a
device mapping, not anonymous memory, and is never swapped.

Pure mechanism: no sockets, no threads. The engine decides when (collectives.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from functools import cache

import numpy as np

__all__ = [
    "SwapError",
    "advise",
    "available",
    "eligible",
    "exchange_shared",
    "map_shared_aligned",
    "move_into",
    "new_arena",
    "twin",
]

PAGE = mmap.PAGESIZE
#: transparent huge page size: twins sit at the same offset modulo this as the array,
#: so that the kernel can move whole huge pages instead of splitting them
HUGE = 2 << 20

_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_MREMAP_DONTUNMAP = 4
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10  # linux/mman.h (Python's mmap module does not export it)

# struct procmap_query (linux/fs.h, 6.11+): size, query_flags, query_addr, vma_start,
# vma_end, vma_flags, vma_page_size, vma_offset, inode, dev_major, dev_minor,
# vma_name_size, build_id_size, vma_name_addr, build_id_addr
_QUERY = struct.Struct("=QQQQQQQQQIIIIQQ")
_PROCMAP_QUERY = (3 << 30) | (_QUERY.size << 16) | (ord("f") << 8) | 17  # _IOWR('f', 17)
_VMA_READ, _VMA_WRITE, _VMA_SHARED = 1, 2, 8
_COVERING_OR_NEXT_VMA = 0x10  # PROCMAP_QUERY flag: the mapping at addr, or the next one


class SwapError(OSError):
    """A move failed, could not be undone, and the array's memory could not even be
    mapped anew (not expected: it takes the kernel refusing three calls in a row)."""


def _bind(libc: ctypes.CDLL, name: str, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    fn = libc[name]
    fn.restype = ctypes.c_void_p
    fn.argtypes = list(argtypes)
    return fn


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        # mremap through PyDLL: the GIL stays held for the call (tens of µs, never
        # blocks). A CDLL call gives the GIL up and must win it back after each of the
        # three moves; with another busy thread in the process that tripled a 64 MiB
        # exchange (0.35 vs 0.10 ms, measured for the daemon's twin regions)
        pylibc = ctypes.PyDLL(None, use_errno=True)
        size, ptr, i32 = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
        self.mremap = _bind(pylibc, "mremap", ptr, size, size, i32, ptr)
        self.mmap = _bind(libc, "mmap", ptr, size, i32, i32, i32, ctypes.c_long)
        self.madvise = libc["madvise"]
        self.madvise.restype = i32
        self.madvise.argtypes = [ptr, size, i32]


@cache
def _libc() -> _Libc | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


def _move(src: int, dst: int, nbytes: int, flags: int = 0) -> None:
    """Move the pages at ``src`` to ``dst`` (whatever was mapped at ``dst`` is gone)."""
    libc = _libc()
    assert libc is not None
    got = libc.mremap(src, nbytes, nbytes, _MREMAP_MAYMOVE | _MREMAP_FIXED | flags, dst)
    if got is None or got == _MAP_FAILED or got != dst:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"mremap {src:#x} -> {dst:#x} ({nbytes} bytes): {os.strerror(err)}")


@cache
def _dontunmap() -> int:
    """``MREMAP_DONTUNMAP`` where the kernel has it (5.7+), else 0."""
    probe = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        try:
            _move(base, base + PAGE, PAGE, _MREMAP_DONTUNMAP)
        except OSError:
            return 0
        return _MREMAP_DONTUNMAP
    finally:
        with contextlib.suppress(BufferError):
            probe.close()


def available() -> bool:
    """True where pages can be exchanged at all: Linux with ``mremap`` and
    ``MREMAP_DONTUNMAP`` (an exchange never leaves a hole: the module's head)."""
    return _libc() is not None and _dontunmap() != 0


# ----------------------------------------------------------------- what is mapped where


@cache
def _can_query() -> bool:
    """Whether /proc/self/maps answers PROCMAP_QUERY (Linux 6.11+)."""
    try:
        fd = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _query(fd, PAGE)  # any address: ENOENT is an answer, ENOTTY/EINVAL are not
    except OSError as exc:
        return exc.errno == errno.ENOENT
    finally:
        os.close(fd)
    return True


def _query(fd: int, addr: int) -> tuple[int, int, int, int]:
    """(start, end, flags, inode) of the mapping that covers ``addr`` or comes next."""
    buf = bytearray(
        _QUERY.pack(_QUERY.size, _COVERING_OR_NEXT_VMA, addr, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    )
    fcntl.ioctl(fd, _PROCMAP_QUERY, buf, True)
    fields = _QUERY.unpack(buf)
    return fields[3], fields[4], fields[5], fields[8]


def _mappings_ioctl(lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    fd = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield from _mappings_ioctl_fd(fd, lo, hi)
    finally:
        os.close(fd)


def _mappings_ioctl_fd(fd: int, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    addr = lo
    while addr < hi:
        try:
            start, end, flags, inode = _query(fd, addr)
        except OSError:
            yield addr, hi, False
            return
        if start > addr:  # a hole
            yield addr, min(start, hi), False
            if start >= hi:
                return
        usable = (
            flags & (_VMA_READ | _VMA_WRITE) == (_VMA_READ | _VMA_WRITE)
            and not flags & _VMA_SHARED
            and inode == 0
        )
        yield max(start, addr), min(end, hi), usable
        addr = end


def _mappings_text(lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    with open("/proc/self/maps", "rb") as f:
        lines = f.read().splitlines()
    addr = lo
    for line in lines:
        fields = line.split(maxsplit=5)
        start_text, _, end_text = fields[0].partition(b"-")
        start, end = int(start_text, 16), int(end_text, 16)
        if end <= addr:
            continue
        if start >= hi:
            break
        if start > addr:
            yield addr, start, False
        usable = fields[1][:2] == b"rw" and fields[1][3:4] == b"p" and fields[4] == b"0"
        yield max(start, addr), min(end, hi), usable
        addr = end
        if addr >= hi:
            return
    if addr < hi:
        yield addr, hi, False


def _mappings(lo: int, hi: int) -> list[tuple[int, int, bool]]:
    """The mappings over [lo, hi) in order, clipped to it: (start, end, usable), where
    usable means private anonymous read-write memory (holes are not usable). Where
    /proc cannot be read (a sandbox without it), nothing is usable."""
    try:
        return list(_mappings_ioctl(lo, hi) if _can_query() else _mappings_text(lo, hi))
    except OSError:
        return [(lo, hi, False)]


# ----------------------------------------------------------------------- the interface


def _interior(x: np.ndarray) -> tuple[int, int]:
    """The whole pages inside ``x``'s bytes: [lo, hi) (empty when lo >= hi)."""
    start = x.ctypes.data
    lo = -(-start // PAGE) * PAGE
    hi = (start + x.nbytes) // PAGE * PAGE
    return lo, hi


def eligible(x: np.ndarray) -> bool:
    """Whether ``x`` (1-D, contiguous, writable) can take a result by page exchange:
    it holds at least one whole page, all in private anonymous memory."""
    if not available() or not x.flags.c_contiguous or not x.flags.writeable:
        return False
    lo, hi = _interior(x)
    if hi - lo < PAGE:
        return False
    return all(usable for _, _, usable in _mappings(lo, hi))


def new_arena(nbytes: int) -> np.ndarray:
    """Private anonymous memory for twins of arrays of up to ``nbytes - HUGE`` bytes
    (a uint8 array; the mapping lives as long as it does)."""
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # advice only
        area.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(area, dtype=np.uint8)


def twin(arena: np.ndarray, x: np.ndarray) -> np.ndarray:
    """An array like ``x`` inside ``arena``, at the same offset as ``x`` modulo the
    huge page size, so that whole pages of the two line up."""
    base = arena.ctypes.data
    delta = (x.ctypes.data - base) % HUGE
    if delta + x.nbytes > arena.nbytes:
        raise ValueError(f"arena of {arena.nbytes} bytes is too small for {x.nbytes} bytes")
    return arena[delta : delta + x.nbytes].view(x.dtype)


def move_into(x: np.ndarray, result: np.ndarray) -> bool:
    """Make ``x`` hold ``result`` (its twin, from :func:`twin`): the whole pages are
    exchanged, the partial first and last page copied, and any span the kernel will
    not move is copied too. Afterwards ``result``'s memory holds what ``x`` held.

    Returns whether the twin may be used again: False only if the kernel refused to
    move ``x``'s old pages into the twin's place, leaving the twin without memory
    there (the caller must then drop it; ``x`` has the result either way)."""
    start = x.ctypes.data
    dst = x.view(np.uint8)
    src = result.view(np.uint8)
    lo, hi = _interior(x)
    swap = hi - lo >= PAGE and available()  # no DONTUNMAP: no exchange (the module's head)
    segments = _segments(lo, hi, result.ctypes.data + lo - start) if swap else None
    if segments is None:
        np.copyto(dst, src)
        return True
    try:  # a place to park the pages, first: nothing is written before it exists
        reserve = mmap.mmap(-1, hi - lo + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # out of address space or commit charge: a copy keeps the promise
        np.copyto(dst, src)
        return True
    np.copyto(dst[: lo - start], src[: lo - start])
    np.copyto(dst[hi - start :], src[hi - start :])
    reusable = True
    try:
        parked = ctypes.addressof(ctypes.c_char.from_buffer(reserve))
        park = parked + (lo - parked) % HUGE  # keeps the huge-page phase
        for a, b in segments:
            i, j = a - start, b - start
            moved, twin_ok = _exchange(a, b - a, park + a - lo, result.ctypes.data + i)
            if not moved:
                np.copyto(dst[i:j], src[i:j])
            reusable = reusable and twin_ok
    finally:
        with contextlib.suppress(BufferError):
            reserve.close()
    return reusable


def exchange_shared(at: int, other: int, nbytes: int) -> bool:
    """Exchange the pages of two page-aligned spans of ``MAP_SHARED`` mappings of
    whole memfds (the daemon's twin regions, phalanx/local/shm.py): ``at`` then maps
    what ``other`` mapped and the reverse. The caller makes sure each span lies in one
    mapping. Only this process's page tables change: another process mapping the same
    memfds still sees the old pages at its own addresses.

    Returns False when the kernel refused the first or second move (the pages are back
    where they were; nothing exchanged). Raises :class:`SwapError` when a move could not
    be undone or the last move failed: the mappings are then damaged."""
    if not available():
        return False
    keep = _dontunmap()  # every source stays mapped: never a hole (the module's head)
    try:  # a place to park the pages for the instant of the exchange
        reserve = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # out of address space or commit charge: nothing moved
        return False
    try:
        parked = ctypes.addressof(ctypes.c_char.from_buffer(reserve))
        park = parked + (at - parked) % HUGE
        try:
            _move(at, park, nbytes, keep)
        except OSError:
            return False
        try:
            _move(other, at, nbytes, keep)
        except OSError as exc:
            try:
                _move(park, at, nbytes, keep)
            except OSError:
                raise SwapError(exc.errno, f"a twin exchange could not be undone: {exc}") from exc
            return False
        try:
            _move(park, other, nbytes, keep)
        except OSError as exc:
            raise SwapError(exc.errno, f"a twin exchange left a hole: {exc}") from exc
        return True
    finally:
        with contextlib.suppress(BufferError):
            reserve.close()


def _segments(lo: int, hi: int, other: int) -> list[tuple[int, int]] | None:
    """[lo, hi) cut wherever a mapping of it, or of the same span at ``other``, ends
    (mremap moves within one mapping); None when any part is not usable."""
    cuts = {lo, hi}
    for base in (lo, other):
        for start, end, usable in _mappings(base, base + hi - lo):
            if not usable:
                return None
            cuts.add(start - base + lo)
            cuts.add(end - base + lo)
    points = sorted(cuts)
    return list(itertools.pairwise(points))


def _exchange(at: int, size: int, park: int, other: int) -> tuple[bool, bool]:
    """Swap the pages at ``at`` with those at ``other`` through the parking place
    ``park``: (whether ``at`` now has ``other``'s pages, whether ``other`` still has
    memory). When the first answer is False, ``at`` is mapped and its bytes are
    either its own or must be rewritten by the caller (it copies in both cases)."""
    keep = _dontunmap()  # each source stays mapped (empty): never a hole in play
    try:
        _move(at, park, size, keep)  # x's pages aside
    except OSError:
        return False, True
    try:
        _move(other, at, size, keep)  # the result's pages into x
    except OSError:
        try:
            _move(park, at, size, keep)  # put x's pages back
        except OSError:
            _map_fresh(at, size)  # x's bytes are lost, but the caller copies them anew
        return False, True
    try:
        _move(park, other, size, keep)  # x's old pages become the twin's
    except OSError:
        return True, False
    return True, True


def advise(address: int, nbytes: int, advice: int) -> int:
    """``madvise`` over [address, address+nbytes) (page-aligned): 0, or the errno of
    the refusal (``ENOSYS`` off Linux)."""
    libc = _libc()
    if libc is None:
        return errno.ENOSYS
    if libc.madvise(address, nbytes, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def map_shared_aligned(fd: int, size: int) -> tuple[mmap.mmap, int] | None:
    """Map all ``size`` bytes of ``fd`` shared and read-write at an address that is a
    multiple of :data:`HUGE`: ``(mapping, offset)``, the file's bytes lying at
    ``offset`` in the mapping's buffer. The mapping is an anonymous reservation of
    ``size + HUGE`` bytes with the file mapped over part of it (``MAP_FIXED``);
    closing or collecting it unmaps both. Aligned, huge pages of the file are mapped
    whole (one page-table entry per 2 MiB) and exchanges between two such regions
    move them whole. None where this cannot be done (then map it plainly)."""
    libc = _libc()
    if libc is None:
        return None
    reserve = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = int(np.frombuffer(reserve, dtype=np.uint8).ctypes.data)
    at = -(-base // HUGE) * HUGE
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if libc.mmap(at, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0) != at:
        reserve.close()
        return None
    return reserve, at - base


def _map_fresh(at: int, size: int) -> None:
    """Map new zero pages at ``at`` (nothing else can be done when a move could not
    be undone; the caller then copies the result there)."""
    libc = _libc()
    assert libc is not None
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    got = libc.mmap(at, size, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
    if got != at:
        err = ctypes.get_errno()
        raise SwapError(err, f"could not map memory back at {at:#x}: {os.strerror(err)}")

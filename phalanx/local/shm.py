"""Shared memory between a training process and its daemon: anonymous memfd regions.

Why memfd (``os.memfd_create``) passed over the Unix socket (SCM_RIGHTS), and not
``multiprocessing.shared_memory`` or named files in ``/dev/shm``:

* nothing has a name, so nothing leaks: when both processes are gone (even by
  SIGKILL) the kernel frees the memory; a named segment outlives a killed owner;
* Python 3.11's ``multiprocessing.shared_memory`` registers every segment it *attaches
  to* with the resource tracker, which unlinks it (and warns about a "leak") when that
  process exits — a restarted training process would destroy the daemon's memory
  (``track=False`` only arrived in 3.13);
* only a process holding the fd can map it: the daemon receives it over its 0600
  socket, no other user can open it by guessing a name;
* it can be sealed: a region is sealed against shrinking (``F_SEAL_SHRINK``) before
  it is sent, and the daemon maps only sealed ones. Pages past a shrunk end would
  fault (SIGBUS) in the daemon the next time it touched them: one client's
  ``ftruncate`` could otherwise kill the daemon.

Twin regions (issue 17): for a large all-reduce the client also maps a *twin* of the
array's region (a second memfd of the same size). The daemon reduces into the twin,
never writing the array, and on success both processes exchange the whole pages of the
array's span between their two mappings (:func:`exchange`, ``mremap``: page-table
entries move, no byte is copied). The exchange is private to the process that makes
it, so both must make the same ones in the same order (docs/daemon.md says how).

Huge pages (issue 17): shared memory is ``shmem``, which most kernels give 4 KiB pages
(``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` = never), where numpy's own
large arrays get 2 MiB ones: every pass over a region then costs a TLB miss per 4 KiB
(64 MiB through the daemon measured ~4 % slower than in-process for that alone). So a
region of 2 MiB or more is mapped at a 2 MiB-aligned address in both processes
(:func:`pageswap.map_shared_aligned`), and when the client first gives a region a
twin (a large all-reduce) it fills both and asks the kernel to rebuild them from huge
pages (:meth:`Region.collapse`: ``MADV_POPULATE_WRITE``, then ``MADV_COLLAPSE``, Linux
6.1+, allowed whatever ``shmem_enabled`` says short of ``deny``). Where the kernel
refuses, a region keeps small pages and works the same. The price is paid once per
region, by that first op: the memory is committed and copied into huge pages (~1.5 ms
per MiB here); regions never all-reduced that large never pay it.

A :class:`Region` is one mapping. The client creates it (:meth:`Region.create`), sends
the fd with a ``MAP`` request and keeps its mapping; the daemon maps the fd it got
(:meth:`Region.adopt`, size from ``fstat``, bounded by the caller) and closes the fd
(the mapping keeps the memory). No mapping keeps a descriptor open (:func:`_map_over`). Arrays are views of the mapping; the mapping is
unmapped when the last array over it is gone (no explicit close while arrays live).

This module must never send or receive anything, nor map a size it did not check.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from typing import Any

import numpy as np

from phalanx.comm import pageswap
from phalanx.errors import ConfigError, LimitExceeded, ProtocolError

__all__ = ["PAGE", "Region", "exchange", "interior", "mark_pinned", "pinned", "unmark_pinned"]

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # linux/mman.h (5.14+)
_MADV_COLLAPSE = 25  # (6.1+)
_MAP_FIXED = 0x10  # linux/mman.h (Python's mmap module does not export it)


def _round_up(n: int, to: int = PAGE) -> int:
    return max(to, (n + to - 1) // to * to)


class Region:
    """One shared mapping: ``rid`` (unique per client connection), ``size`` bytes."""

    def __init__(self, rid: int, mm: mmap.mmap, size: int, fd: int | None, offset: int = 0) -> None:
        self.rid = rid
        self.size = size
        self.fd = fd  # client side: kept until sent; daemon side: None (closed)
        self._mm = mm
        self.bytes: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(mm, np.uint8, size, offset)
        self.base: int = int(self.bytes.ctypes.data)
        #: whether the kernel rebuilt it from huge pages (:meth:`collapse`)
        self.huge = False

    @property
    def charge(self) -> int:
        """What it costs against a client's budget: whole pages, one at least (a
        one-byte memfd is a page of the daemon's, and a mapping)."""
        return _round_up(self.size)

    @classmethod
    def create(cls, rid: int, nbytes: int, name: str = "phalanx") -> Region:
        """A new memfd of at least ``nbytes`` (rounded up to a page), mapped here."""
        size = _round_up(nbytes)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # see the module doc
            mm, offset = _map(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(rid, mm, size, fd, offset)

    @classmethod
    def adopt(cls, rid: int, fd: int, max_bytes: int, *, sealed: bool = False) -> Region:
        """Map a memfd received from the other process. Closes ``fd`` in every case.
        ``sealed``: refuse one not sealed against shrinking (the daemon's MAP: see the
        module doc); a client mapping the daemon's RESTORE region need not ask."""
        try:
            if sealed and not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                raise ProtocolError(
                    "a shared region must be a memfd sealed against shrinking "
                    "(F_SEAL_SHRINK): a client could otherwise crash the daemon"
                )
            size = os.fstat(fd).st_size
            if size <= 0:
                raise ProtocolError(f"a shared region of {size} bytes")
            if _round_up(size) > max_bytes:  # a budget, not a broken client: it goes on
                raise LimitExceeded(
                    f"a shared region of {size} bytes ({_round_up(size)} in whole pages) "
                    "is over this client's remaining "
                    f"budget of {max(0, max_bytes)} bytes (max_client_shm_bytes)"
                )
            mm, offset = _map(fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN, errno.ENFILE, errno.EMFILE):
                raise LimitExceeded(f"cannot map the shared region: {exc}") from None
            raise ProtocolError(f"cannot map the shared region: {exc}") from None
        finally:
            os.close(fd)
        return cls(rid, mm, size, None, offset)

    def collapse(self, *, again: bool = False) -> bool:
        """Commit the region's memory and have the kernel rebuild it from huge pages
        (module docstring); whether it did. Safe while the other process uses it;
        bytes are kept. A region under 2 MiB or not 2 MiB-aligned is left as it is.
        ``again``: even if it was collapsed before, because some of its pages may have
        been replaced since (quick when none were)."""
        if again:
            self.huge = False
        if self.huge or self.size < pageswap.HUGE or self.base % pageswap.HUGE:
            return self.huge
        span = self.size // pageswap.HUGE * pageswap.HUGE
        if pageswap.advise(self.base, self.size, _MADV_POPULATE_WRITE) == 0:
            self.huge = pageswap.advise(self.base, span, _MADV_COLLAPSE) == 0
        return self.huge

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def array(self, offset: int, dtype: str | np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous view of ``shape``/``dtype`` at byte ``offset`` (bounds checked)."""
        dt = np.dtype(dtype)
        count = 1
        for d in shape:
            count *= d
        end = offset + count * dt.itemsize
        if offset < 0 or end > self.size:
            raise ConfigError(f"bytes [{offset}, {end}) are outside region {self.rid}")
        if offset % dt.alignment:
            raise ConfigError(f"offset {offset} is not aligned for {dt}")
        return self.bytes[offset:end].view(dt).reshape(shape)

    def offset_of(self, addr: int, nbytes: int) -> int | None:
        """Byte offset of ``[addr, addr+nbytes)`` if it lies inside this region."""
        off = addr - self.base
        if off >= 0 and off + nbytes <= self.size:
            return off
        return None


def _map(fd: int, size: int) -> tuple[mmap.mmap, int]:
    """The whole memfd, shared, read-write: (mapping, the region's offset in it);
    2 MiB-aligned from 2 MiB up (module docstring). The mapping keeps no descriptor
    open (see :func:`_map_over`)."""
    if size >= pageswap.HUGE:
        aligned = pageswap.map_shared_aligned(fd, size)
        if aligned is not None:
            return aligned
    return _map_over(fd, size), 0


def _map_over(fd: int, size: int) -> mmap.mmap:
    """The memfd mapped over an anonymous reservation of its size (``MAP_FIXED``):
    the mapping object owns the address range (closing or collecting it unmaps the
    file's pages) and, unlike ``mmap.mmap(fd, ...)``, keeps no ``dup`` of the
    descriptor for its life -- a trainer with a thousand small arrays would run the
    daemon and itself out of descriptors."""
    libc = pageswap._libc()
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if libc is None:  # not Linux: the plain mapping (it keeps a descriptor)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    span = _round_up(size)
    reserve = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = int(np.frombuffer(reserve, dtype=np.uint8).ctypes.data)
    if libc.mmap(base, span, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0) != base:
        err = ctypes.get_errno() or errno.ENOMEM
        reserve.close()
        raise OSError(err, f"mmap of a {size}-byte shared region: {os.strerror(err)}")
    return reserve


def interior(offset: int, nbytes: int) -> tuple[int, int]:
    """The whole pages inside bytes [offset, offset+nbytes) of a region: [lo, hi)."""
    lo = -(-offset // PAGE) * PAGE
    hi = (offset + nbytes) // PAGE * PAGE
    return lo, max(lo, hi)


def exchange(a: Region, b: Region, offset: int, nbytes: int, *, edges: bool) -> bool:
    """Give ``a`` what ``b`` holds over bytes [offset, offset+nbytes), in this process's
    mappings: the whole pages inside the span are exchanged (``b`` then maps ``a``'s
    old pages there), and with ``edges`` the bytes of the partial first and last page
    are copied from ``b`` (those pages are shared by both processes: one copy does).

    Returns False when the kernel refused a move: the pages are then where they were
    (``a`` keeps its own), and the caller must copy instead (and know that the other
    process may have exchanged)."""
    if b.size != a.size or offset < 0 or offset + nbytes > a.size:
        raise ConfigError(f"regions {a.rid}/{b.rid}: bad span [{offset}, {offset + nbytes})")
    lo, hi = interior(offset, nbytes)
    if hi > lo and not pageswap.exchange_shared(a.base + lo, b.base + lo, hi - lo):
        return False
    if edges:
        end = offset + nbytes
        np.copyto(a.bytes[offset : min(lo, end)], b.bytes[offset : min(lo, end)])
        if hi < end:  # also when no whole page lies inside: [lo, end) then
            np.copyto(a.bytes[hi:end], b.bytes[hi:end])
    return True


# Memory pinned by physical page for a device (cudaHostRegister, phalanx/torch/cuda.py)
# would keep the old pages after an exchange: regions that hold any is never exchanged.
_pinned: dict[int, int] = {}  # start address -> bytes
_pinned_lock = threading.Lock()


def mark_pinned(addr: int, nbytes: int) -> None:
    """Record that [addr, addr+nbytes) is pinned by physical page (no twin for it)."""
    with _pinned_lock:
        _pinned[addr] = nbytes


def unmark_pinned(addr: int) -> None:
    with _pinned_lock:
        _pinned.pop(addr, None)


def pinned(addr: int, nbytes: int) -> bool:
    """Whether any pinned span overlaps [addr, addr+nbytes)."""
    with _pinned_lock:
        return any(a < addr + nbytes and addr < a + n for a, n in _pinned.items())

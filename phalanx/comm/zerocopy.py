"""Zero-copy sends: hand memory pages to a TCP socket instead of copying them.

``sendmsg`` copies every payload byte into socket buffers; on loopback and fast links
that copy is the largest single cost of a large all-reduce (a fifth of a 64 MiB
ring's CPU time, measured with ``perf``). Linux can move *references* to the pages
instead: ``vmsplice`` maps user memory into a pipe, and ``splice`` moves those pages
from the pipe into the socket. The receiver still copies once, as it must. Whether
that is faster depends on the host: the splices push the socket far more often, and on
loopback each push runs the receiver's softirq inline, so it is off unless
``zero_copy_min_bytes`` turns it on (docs/comm.md, "Zero-copy sends", has the figures).

The price is a rule the caller must keep: **the memory must not change until the
receiver has read it** -- the kernel sends (or the peer's socket holds) the very
pages, not a copy. The engine keeps it (``engine.py``, docs/comm.md "Zero-copy
sends"): it splices only from memory it writes itself (scratch, the page-swapped
ring's twin), never from the caller's array as it is (a failure must be free to
hand it back at once); an operation that spliced ends only once every receiver
confirmed it has read the operation's frames (a RECEIPT frame), so the caller may
write whatever it gets back; and after a failure, when no such confirmation will
come, :func:`detach` gives the spliced buffer fresh pages before anyone writes it.

:class:`SplicePipe` is the mechanism only: a non-blocking pipe per channel that is fed
with ``vmsplice`` and drained into the socket with ``splice``. It is used where
:func:`available` says the system has both calls (Linux); elsewhere channels fall back
to ``sendmsg``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from functools import cache

from phalanx.comm import pageswap

__all__ = ["SplicePipe", "available", "detach"]

_F_SETPIPE_SZ = 1031  # linux/fcntl.h
_PIPE_BYTES = 1 << 20  # one default 1 MiB piece per refill; capped by fs.pipe-max-size
_SPLICE_F_NONBLOCK = 0x02
_SPLICE_F_MORE = 0x04
_MADV_DONTNEED = 4  # linux/mman.h (Python's mmap module offers madvise on mmap objects only)
_MADV_REMOVE = 9


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@cache
def _vmsplice() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not hasattr(os, "splice"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.vmsplice
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


def available() -> bool:
    """True where vmsplice and splice exist (Linux with glibc or musl)."""
    return _vmsplice() is not None


def detach(address: int, nbytes: int) -> None:
    """Give every page that overlaps [address, address+nbytes) new, zero-filled
    memory, leaving the old pages to the pipes and sockets that still reference
    them: what was spliced from there goes out unchanged, whatever is written there
    next. Shared memory (a memfd both processes map) loses the pages in both
    processes (``MADV_REMOVE``: a hole is punched in the file); private memory in
    this one (``MADV_DONTNEED``). Bytes of the first and last page outside the span
    are zeroed too: only for buffers whose neighbours are scratch.

    Raises OSError where the kernel refuses (not expected for those two kinds)."""
    lo = address // mmap.PAGESIZE * mmap.PAGESIZE
    hi = -(-(address + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    if hi <= lo:
        return
    err = pageswap.advise(lo, hi - lo, _MADV_REMOVE)
    if err == errno.EINVAL:  # not shared memory; anything else is a real refusal
        err = pageswap.advise(lo, hi - lo, _MADV_DONTNEED)
        if err:
            raise OSError(err, f"madvise(MADV_DONTNEED): {os.strerror(err)}")
    elif err:
        raise OSError(err, f"madvise(MADV_REMOVE): {os.strerror(err)}")


class SplicePipe:
    """A pipe that carries page references from user memory into one socket."""

    __slots__ = ("_iov", "_r", "_w", "capacity", "fill")

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self._w, _F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:  # above fs.pipe-max-size or the user's pipe-user-pages limits
            # (unprivileged): keep the default size; it only costs more syscalls
            self.capacity = 64 << 10
        self.fill = 0  # bytes in the pipe, not yet in the socket
        self._iov = _IOVec()

    def feed(self, address: int, nbytes: int) -> int:
        """Map up to ``nbytes`` of memory at ``address`` into the pipe; bytes taken
        (0 when the pipe is full). The memory must stay unchanged until sent *and*
        read by the receiver."""
        fn = _vmsplice()
        assert fn is not None
        self._iov.base = address
        self._iov.len = nbytes
        n = fn(self._w, ctypes.byref(self._iov), 1, _SPLICE_F_NONBLOCK)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return 0
            raise OSError(err, f"vmsplice: {os.strerror(err)}")
        self.fill += n
        return int(n)

    def drain(self, sock_fd: int, more: bool) -> int:
        """Move what the pipe holds into the socket; bytes moved. Raises
        BlockingIOError when the socket takes nothing now, OSError when it is broken."""
        flags = _SPLICE_F_NONBLOCK | (_SPLICE_F_MORE if more else 0)
        n = os.splice(self._r, sock_fd, self.fill, flags=flags)
        if n == 0:
            raise BrokenPipeError(errno.EPIPE, "splice: the socket took nothing")
        self.fill -= n
        return n

    def close(self) -> None:
        """Close the pipe (idempotent); pages still in it are released by the kernel."""
        fds, self._r, self._w = (self._r, self._w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fill = 0

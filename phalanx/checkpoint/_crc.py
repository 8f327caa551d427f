"""CRC-32 (zlib's polynomial) of snapshot bytes: ISA-L's ``crc32_gzip_refl`` where an
ISA-L loads -- the copy inside the ``pyeclib`` wheel first (what ``pip install`` gives;
see :mod:`phalanx.checkpoint._isal`), then the system's ``libisal2`` -- else
:func:`zlib.crc32`. On the project's 2-core machine, 64 MiB: ISA-L 10.7 GB/s, zlib 3.2
GB/s. Both give the same value, so a checksum written by one is checked by the other.

Every shard and every array in a snapshot carries one of these; a mismatch on read
means the bytes are lost. This module must never allocate or copy the bytes it checks
and never raise for a missing library (it falls back silently).
"""

from __future__ import annotations

import ctypes
import threading
import zlib
from collections.abc import Callable
from typing import cast

import numpy as np

from phalanx.checkpoint import _isal

__all__ = ["crc32", "crc32_backend"]

_lock = threading.Lock()
_fast: Callable[[int, int, int], int] | None = None
_loaded = False
_library = ""  # where the fast path came from


def _load() -> Callable[[int, int, int], int] | None:
    global _fast, _loaded, _library
    with _lock:
        if not _loaded:
            _loaded = True
            for name in _isal.candidates():
                _fast = _try(name)
                if _fast is not None:
                    _library = name
                    break
        return _fast


def _try(name: str) -> Callable[[int, int, int], int] | None:
    """``crc32_gzip_refl`` of the library ``name``, if it loads and agrees with zlib."""
    try:
        fn = ctypes.CDLL(name).crc32_gzip_refl
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64]
    probe = np.frombuffer(b"phalanx crc probe" * 300, np.uint8)  # > 4 KiB: the SIMD path
    if int(fn(0, probe.ctypes.data, probe.size)) != zlib.crc32(probe.tobytes()):
        return None
    return cast(Callable[[int, int, int], int], fn)


def crc32_backend() -> str:
    """``"isal (<library path>)"`` or ``"zlib"``: what :func:`crc32` uses here."""
    return f"isal ({_library})" if _load() is not None else "zlib"


def crc32(data: np.ndarray | bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32 of ``data`` (a C-contiguous array of any dtype, or a bytes-like object),
    continuing from ``value``; equal to ``zlib.crc32(data, value)``."""
    fn = _load()
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("crc32 needs C-contiguous bytes")
        if fn is not None and data.nbytes:
            return int(fn(value, data.ctypes.data, data.nbytes))
        return zlib.crc32(data.reshape(-1).view(np.uint8).data, value) if data.nbytes else value
    if fn is not None and len(data) > 4096:
        arr = np.frombuffer(data, np.uint8)
        return int(fn(value, arr.ctypes.data, arr.size))
    return zlib.crc32(data, value)

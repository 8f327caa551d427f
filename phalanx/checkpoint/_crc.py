"""CRC-32 (zlib's polynomial) of snapshot bytes: ISA-L's ``crc32_gzip_refl`` when
libisal2 loads (about 20 GB/s here), else :func:`zlib.crc32` (about 7 GB/s). Both give
the same value, so a checksum written by one is checked by the other.

Every shard and every array in a snapshot carries one of these; a mismatch on read
means the bytes are lost. This module must never allocate or copy the bytes it checks
and never raise for a missing library (it falls back silently).
"""

from __future__ import annotations

import ctypes
import threading
import zlib
from collections.abc import Callable

import numpy as np

__all__ = ["crc32", "crc32_backend"]

_lock = threading.Lock()
_fast: Callable[[int, int, int], int] | None = None
_loaded = False


def _load() -> Callable[[int, int, int], int] | None:
    global _fast, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                lib = ctypes.CDLL("libisal.so.2")
                fn = lib.crc32_gzip_refl
                fn.restype = ctypes.c_uint32
                fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64]
                probe = np.frombuffer(b"phalanx crc probe", np.uint8)
                if int(fn(0, probe.ctypes.data, probe.size)) == zlib.crc32(probe.tobytes()):
                    _fast = fn
            except (OSError, AttributeError):
                _fast = None
        return _fast


def crc32_backend() -> str:
    """``"isal"`` or ``"zlib"``: what :func:`crc32` uses in this process."""
    return "isal" if _load() is not None else "zlib"


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

"""ctypes binding to Intel ISA-L's erasure-code functions, wherever a copy is found.

Where from, in this order (the first that loads and passes the self-check wins):

1. the copy inside the ``pyeclib`` wheel (``pyeclib.libs/libisal*.so*``), a dependency
   of phalanx on Linux x86-64/aarch64, so ``pip install phalanx`` alone gives ISA-L
   speed. Only its vendored ISA-L is loaded, never pyeclib's own API (which holds the
   GIL for whole encodes and is 10x slower). Chosen first because pip pins it: the same
   ISA-L (2.32, with AVX2, AVX-512 and GFNI kernels) on every host, where Debian
   bookworm's ``libisal2`` is 2.30 (no GFNI kernels). On this project's 2-core machine
   both encode 4+2 at the same speed (6.2-6.9 GB/s, 256 MiB, measured side by side);
2. the system's ``libisal.so.2`` (Debian/Ubuntu ``libisal2``), then whatever
   ``ctypes.util.find_library("isal")`` finds;
3. none: the caller falls back to phalanx's numpy engine (about 0.6 GB/s).

Only four C functions are used: ``gf_gen_cauchy1_matrix`` (checked against our own
generator at load), ``gf_invert_matrix``, ``ec_init_tables`` and ``ec_encode_data``.
ctypes releases the GIL for the length of every foreign call, so the bulk work never
blocks other Python threads; the caller chops work into stripes so each call is short,
and never longer than :data:`MAX_LENGTH` (ISA-L's lengths are C ``int``).

This module must never be imported for its side effects: loading happens in
:func:`load`, and a missing or unusable library is reported as ``None`` plus a reason,
never as an exception at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint import _gf256

__all__ = ["DEFAULT_NAMES", "IsaL", "bundled_copies", "candidates", "load"]

U8 = npt.NDArray[np.uint8]

#: System sonames tried after the bundled copies when no explicit path is given.
DEFAULT_NAMES = ("libisal.so.2",)

#: Most bytes per shard one ``ec_encode_data`` call may cover: its length is a C
#: ``int``, and 2 GiB or more wrapped silently (no parity written, no error). Callers
#: chunk longer shards; :meth:`IsaL.encode` refuses more.
MAX_LENGTH = 1 << 30

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
#: An array of raw addresses; ctypes passes it where ``void **`` is expected.
Ptrs = ctypes.Array[ctypes.c_void_p]


@dataclass(frozen=True)
class IsaL:
    """A loaded, self-checked ISA-L. ``path`` is what was loaded, ``version`` a best
    guess (``isal_get_version`` exists only from ISA-L 2.31 on)."""

    path: str
    version: str
    _lib: ctypes.CDLL

    def invert(self, a: U8) -> U8:
        n = a.shape[0]
        src = np.ascontiguousarray(a, np.uint8).copy()  # gf_invert_matrix clobbers its input
        out = np.zeros((n, n), np.uint8)
        if self._lib.gf_invert_matrix(src.ctypes.data, out.ctypes.data, n) != 0:
            raise ZeroDivisionError("singular matrix over GF(256)")
        return out

    def init_tables(self, rows: U8) -> U8:
        """Expanded multiply tables for an r x k coefficient matrix (32 bytes/coefficient)."""
        r, k = rows.shape
        a = np.ascontiguousarray(rows, np.uint8)
        tbl = np.zeros(32 * k * r, np.uint8)
        self._lib.ec_init_tables(k, r, a.ctypes.data, tbl.ctypes.data)
        tbl.setflags(write=False)
        return tbl

    def encode(self, length: int, k: int, rows: int, tables: U8, srcs: Ptrs, outs: Ptrs) -> None:
        """One ``ec_encode_data`` call over raw pointer arrays (GIL released inside);
        ``length`` at most :data:`MAX_LENGTH` (ValueError: its C ``int`` would wrap)."""
        if not 0 <= length <= MAX_LENGTH:
            raise ValueError(f"ISA-L length {length} not in 0..{MAX_LENGTH}; chunk the call")
        self._lib.ec_encode_data(length, k, rows, tables.ctypes.data, srcs, outs)

    @staticmethod
    def pointers(addrs: Sequence[int]) -> Ptrs:
        return (ctypes.c_void_p * len(addrs))(*addrs)


def _version(lib: ctypes.CDLL, path: str) -> str:
    try:
        fn = lib.isal_get_version
    except AttributeError:
        pass
    else:
        fn.restype = ctypes.c_uint
        fn.argtypes = []
        v = int(fn())
        return f"{v >> 16}.{(v >> 8) & 255}"
    # Older releases: the mapped file's name says it (libisal.so.2.0.30 is ISA-L 2.30).
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                file = line.rsplit(" ", 1)[-1].strip()
                if "libisal.so." in file and file.rsplit(".", 1)[-1].isdigit():
                    return "2." + file.rsplit(".", 1)[-1]
    except OSError:
        pass
    return "unknown"


def _bind(lib: ctypes.CDLL) -> None:
    lib.gf_gen_cauchy1_matrix.argtypes = [_P, ctypes.c_int, ctypes.c_int]
    lib.gf_gen_cauchy1_matrix.restype = None
    lib.gf_invert_matrix.argtypes = [_P, _P, ctypes.c_int]
    lib.gf_invert_matrix.restype = ctypes.c_int
    lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, _P, _P]
    lib.ec_init_tables.restype = None
    lib.ec_encode_data.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _PP, _PP]
    lib.ec_encode_data.restype = None


def _self_check(isal: IsaL) -> str | None:
    """The library must build our generator and encode like our numpy engine."""
    lib = isal._lib
    for k, m in ((4, 2), (10, 4), (1, 1)):
        a = np.zeros((k + m, k), np.uint8)
        lib.gf_gen_cauchy1_matrix(a.ctypes.data, k + m, k)
        if not np.array_equal(a, _gf256.generator_matrix(k, m)):
            return f"gf_gen_cauchy1_matrix({k + m}, {k}) differs from phalanx's generator"
    k, m, n = 4, 2, 257
    rng = np.random.default_rng(5)
    data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(k)]
    rows = _gf256.generator_matrix(k, m)[k:]
    want = [np.empty(n, np.uint8) for _ in range(m)]
    _gf256.lincomb(rows.tolist(), data, want)
    got = [np.zeros(n, np.uint8) for _ in range(m)]
    isal.encode(
        n,
        k,
        m,
        isal.init_tables(rows),
        IsaL.pointers([d.ctypes.data for d in data]),
        IsaL.pointers([g.ctypes.data for g in got]),
    )
    if not all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)):
        return "ec_encode_data output differs from phalanx's numpy engine"
    return None


_cache: dict[str | None, tuple[IsaL | None, str]] = {}
_cache_lock = threading.Lock()


def load(path: str | None = None) -> tuple[IsaL | None, str]:
    """Load ISA-L from ``path`` (or the default names), bind and self-check it.

    Returns ``(IsaL, "")`` or ``(None, reason)``. The result is cached per path."""
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None:
            return hit
        result = _load_uncached(path)
        _cache[path] = result
        return result


def bundled_copies() -> list[str]:
    """Paths of ISA-L copies that pip-installed wheels carry (pyeclib's), best first.

    Found without importing pyeclib (``find_spec`` only locates it)."""
    try:
        spec = importlib.util.find_spec("pyeclib")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    site = os.path.dirname(next(iter(spec.submodule_search_locations)))
    return sorted(glob.glob(os.path.join(site, "pyeclib.libs", "libisal*.so*")), reverse=True)


def candidates() -> list[str]:
    """Where ISA-L is looked for by default, in order: the wheels' copies, then the
    system's sonames (the erasure coder and the snapshot checksums share it)."""
    return [*bundled_copies(), *DEFAULT_NAMES]


def _load_uncached(path: str | None) -> tuple[IsaL | None, str]:
    names: list[str] = [path] if path else candidates()
    errors: list[str] = []
    for name in names:
        isal = _try(name, errors)
        if isal is not None:
            return isal, ""
    if not path:
        # last resort: find_library runs ldconfig/gcc in a child process, and a fork in
        # a process whose gRPC threads already run can break gRPC's poller (a daemon
        # aborted with "epoll_wait error: Bad file descriptor"): only when all else failed
        found = ctypes.util.find_library("isal")
        if found and found not in names:
            isal = _try(found, errors)
            if isal is not None:
                return isal, ""
    hint = "" if path else " (pip install pyeclib, or the Debian package libisal2)"
    return None, "ISA-L not loadable" + hint + ": " + "; ".join(errors)


def _try(name: str, errors: list[str]) -> IsaL | None:
    """Load, bind and self-check one candidate; its failure goes to ``errors``."""
    try:
        lib = ctypes.CDLL(name)
        _bind(lib)
    except (OSError, AttributeError) as e:
        errors.append(f"{name}: {e}")
        return None
    isal = IsaL(path=name, version=_version(lib, name), _lib=lib)
    problem = _self_check(isal)
    if problem is not None:
        errors.append(f"{name}: {problem}")
        return None
    return isal

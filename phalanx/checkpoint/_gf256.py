"""GF(2^8) arithmetic for the erasure code: field tables, the generator matrix, matrix
inversion, and a pure-numpy multiply-accumulate engine (the fallback backend's math).

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1) (0x11D), the one ISA-L, zfec and
most Reed-Solomon codes use. The generator matrix is ISA-L's ``gf_gen_cauchy1_matrix``
rebuilt here bit for bit, so both backends write identical parity.

This module must never do I/O, start threads or hold a lock while computing; its only
state is a bounded cache of 128 KiB product tables.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "GF_POLY",
    "MAX_SHARDS",
    "MUL",
    "generator_matrix",
    "gf_inv",
    "gf_mul",
    "lincomb",
    "mat_inv",
    "mat_mul",
]

U8 = npt.NDArray[np.uint8]

GF_POLY = 0x11D
#: k + m may not exceed this: a Cauchy matrix needs k + m distinct field elements
#: and we keep 0xFF free so that indices fit in one byte with room for a marker.
MAX_SHARDS = 255


def _build_tables() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    exp = np.zeros(512, np.int64)
    log = np.zeros(256, np.int64)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= GF_POLY
    exp[255:510] = exp[0:255]
    return exp, log


_EXP, _LOG = _build_tables()

#: MUL[a, b] = a * b in GF(256); a 64 KiB table, the base of everything else.
MUL: U8 = np.zeros((256, 256), np.uint8)
MUL[1:, 1:] = _EXP[_LOG[1:, None] + _LOG[None, 1:]].astype(np.uint8)
MUL.setflags(write=False)

_INV: U8 = np.zeros(256, np.uint8)
_INV[1:] = _EXP[(255 - _LOG[1:]) % 255].astype(np.uint8)


def gf_mul(a: int, b: int) -> int:
    return int(MUL[a, b])


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return int(_INV[a])


def generator_matrix(k: int, m: int) -> U8:
    """The (k+m) x k systematic Cauchy generator: identity on top, then parity row i,
    column j = 1 / ((k+i) XOR j). Same bytes as ISA-L's ``gf_gen_cauchy1_matrix``.
    Every k x k submatrix is invertible (MDS) for k + m <= 256."""
    g = np.zeros((k + m, k), np.uint8)
    g[:k] = np.eye(k, dtype=np.uint8)
    rows = np.arange(k, k + m)[:, None]
    cols = np.arange(k)[None, :]
    g[k:] = _INV[rows ^ cols]
    return g


def mat_mul(a: U8, b: U8) -> U8:
    """Matrix product over GF(256): (r x n) @ (n x c)."""
    prod: U8 = MUL[a[:, :, None], b[None, :, :]]  # r x n x c
    out: U8 = np.bitwise_xor.reduce(prod, axis=1).astype(np.uint8)
    return out


def mat_inv(a: U8) -> U8:
    """Inverse of a square matrix over GF(256) (Gauss-Jordan, one numpy op per column).
    Raises ZeroDivisionError if the matrix is singular."""
    n = a.shape[0]
    w = np.concatenate([a.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        nz = np.nonzero(w[col:, col])[0]
        if nz.size == 0:
            raise ZeroDivisionError("singular matrix over GF(256)")
        piv = col + int(nz[0])
        if piv != col:
            w[[col, piv]] = w[[piv, col]]
        w[col] = MUL[_INV[w[col, col]], w[col]]
        factors = w[:, col].copy()
        factors[col] = 0
        w ^= MUL[factors[:, None], w[col][None, :]]
    return np.ascontiguousarray(w[:, n:])


# --------------------------------------------------------------------------- numpy engine
#
# outs[i] = XOR_j coef[i][j] * srcs[j], two bytes per table lookup: for a coefficient c,
# T_c[v] multiplies both bytes of the 16-bit value v by c. The table is byte-symmetric, so
# it is right on either endianness. np.take wants intp indices, so each source chunk is
# widened once into a scratch index array and reused for every output row.

_PAIR_CACHE_MAX = 64  # 64 x 128 KiB = 8 MiB at most
_pair_cache: OrderedDict[int, npt.NDArray[np.uint16]] = OrderedDict()
_pair_lock = threading.Lock()
_V16 = np.arange(65536, dtype=np.int64)


def _pair_table(c: int) -> npt.NDArray[np.uint16]:
    with _pair_lock:
        hit = _pair_cache.get(c)
        if hit is not None:
            _pair_cache.move_to_end(c)
            return hit
    row = MUL[c]
    t: npt.NDArray[np.uint16] = row[_V16 & 255].astype(np.uint16) | (
        row[_V16 >> 8].astype(np.uint16) << 8
    )
    t.setflags(write=False)
    with _pair_lock:
        _pair_cache[c] = t
        while len(_pair_cache) > _PAIR_CACHE_MAX:
            _pair_cache.popitem(last=False)
    return t


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.idx: npt.NDArray[np.intp] = np.empty(0, np.intp)
        self.tmp: npt.NDArray[np.uint16] = np.empty(0, np.uint16)

    def ensure(self, pairs: int) -> None:
        if self.idx.size < pairs:
            self.idx = np.empty(pairs, np.intp)
            self.tmp = np.empty(pairs, np.uint16)


_scratch = _Scratch()


def lincomb(coef: Sequence[Sequence[int]], srcs: Sequence[U8], outs: Sequence[U8]) -> None:
    """outs[i][:] = XOR_j coef[i][j] * srcs[j] over GF(256).

    srcs and outs are 1-D uint8 arrays of one length; outs must not overlap srcs.
    Work happens in the caller's chunking: call it on cache-sized slices."""
    n = srcs[0].shape[0] if srcs else 0
    if n == 0 or not outs:
        return
    half = n // 2
    even = 2 * half
    _scratch.ensure(half)
    idx = _scratch.idx[:half]
    tmp = _scratch.tmp[:half]
    started = [False] * len(outs)
    for j, src in enumerate(srcs):
        col = [int(coef[i][j]) for i in range(len(outs))]
        if not any(col):
            continue
        s16 = src[:even].view(np.uint16)
        if any(c > 1 for c in col):
            np.copyto(idx, s16, casting="unsafe")
        for i, c in enumerate(col):
            if c == 0:
                continue
            out = outs[i]
            o16 = out[:even].view(np.uint16)
            if c == 1:
                if started[i]:
                    np.bitwise_xor(o16, s16, out=o16)
                else:
                    np.copyto(o16, s16)
            else:
                tab = _pair_table(c)
                if started[i]:
                    np.take(tab, idx, out=tmp, mode="clip")
                    np.bitwise_xor(o16, tmp, out=o16)
                else:
                    np.take(tab, idx, out=o16, mode="clip")
            if even != n:  # odd length: the last byte through the 256-entry table
                prod = int(MUL[c, src[even]])
                out[even] = (int(out[even]) ^ prod) if started[i] else prod
            started[i] = True
    for i, out in enumerate(outs):
        if not started[i]:
            out[:] = 0

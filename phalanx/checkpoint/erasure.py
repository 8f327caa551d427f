"""Reed-Solomon erasure coding of snapshot shards: k data shards + m parity shards, any k
of the k+m rebuild everything.

The code is systematic Cauchy over GF(256) (poly 0x11D): shard i < k is data, parity
shard k+i is XOR_j c[i][j] * data[j] with c[i][j] = 1 / ((k+i) XOR j), ISA-L's
``gf_gen_cauchy1_matrix``. The matrix *is* the on-wire format: every backend writes the
same parity for the same (k, m), so one backend's shards decode with another's.

Backends are GF(256) multiply engines behind :class:`ErasureCoder`: ``"isal"`` (Intel
ISA-L via ctypes on Debian's libisal2, 5-9 GB/s, GIL released inside every call) and
``"numpy"`` (pure numpy, ~1 GB/s, always available). :func:`make_coder` picks one.

This module must never allocate per call on the hot path (callers hand in the output
buffers), never copy shards, never touch files or sockets, and never hold the GIL for
more than one stripe of work (a few hundred microseconds).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import ClassVar, Literal, cast

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint import _gf256, _isal
from phalanx.errors import ErasureError

__all__ = [
    "MAX_SHARDS",
    "ErasureCoder",
    "ErasureError",
    "IsalCoder",
    "NumpyCoder",
    "available_backends",
    "backend_summary",
    "isal_unavailable_reason",
    "make_coder",
]

log = logging.getLogger(__name__)

Shard = npt.NDArray[np.uint8]
Backend = Literal["auto", "isal", "numpy"]

#: Most shards (k + m) one code may have.
MAX_SHARDS = _gf256.MAX_SHARDS

_PLAN_CACHE_MAX = 256


def _check_params(k: int, m: int) -> None:
    for name, v in (("k", k), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ErasureError("bad-params", f"{name} must be an int, got {type(v).__name__}")
    if k < 1 or m < 0 or k + m > MAX_SHARDS:
        raise ErasureError("bad-params", f"need k >= 1, m >= 0, k + m <= {MAX_SHARDS}; got {k}+{m}")


class ErasureCoder(ABC):
    """k+m Reed-Solomon coder over caller-owned 1-D uint8 buffers (the conformance test
    in tests/unit/test_erasure.py holds every backend to this contract).

    Shards are 1-D, C-contiguous ``uint8`` arrays of one length (any length, 0 included);
    outputs are written in place and must not overlap any input. Slices of larger
    buffers are fine, so a pipeline can encode stripe by stripe while it sends.

    A coder is immutable and safe to share between threads; its only state is a cache of
    prepared tables per (present shards, wanted shards) pattern.
    """

    #: ``"isal"`` or ``"numpy"``.
    backend: ClassVar[str]
    #: Bytes of each shard handled per backend call (work per call: (k + r) x this).
    default_stripe: ClassVar[int]

    def __init__(self, k: int, m: int, *, stripe_bytes: int | None = None) -> None:
        _check_params(k, m)
        stripe = self.default_stripe if stripe_bytes is None else stripe_bytes
        if stripe < 64 or stripe % 64:
            raise ErasureError(
                "bad-params", f"stripe_bytes must be a positive multiple of 64, got {stripe}"
            )
        self._k = k
        self._m = m
        self._stripe = stripe
        self._gen = _gf256.generator_matrix(k, m)
        self._gen.setflags(write=False)
        self._plans: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], object] = OrderedDict()
        self._plans_lock = threading.Lock()

    # ------------------------------------------------------------------ public
    @property
    def k(self) -> int:
        return self._k

    @property
    def m(self) -> int:
        return self._m

    @property
    def n(self) -> int:
        """k + m: the number of shards."""
        return self._k + self._m

    @property
    def generator(self) -> npt.NDArray[np.uint8]:
        """The read-only (k+m) x k generator matrix: identity, then the Cauchy parity rows."""
        return self._gen

    @property
    def detail(self) -> str:
        """Human-readable backend description (library, version) for logs and benchmarks."""
        return self.backend

    def encode(self, data: Sequence[Shard], parity: Sequence[Shard]) -> None:
        """Write the m parity shards of ``data`` (k shards) into ``parity`` (m buffers)."""
        k, m = self._k, self._m
        if len(data) != k:
            raise ErasureError("bad-shard", f"encode needs {k} data shards, got {len(data)}")
        if len(parity) != m:
            raise ErasureError("bad-shard", f"encode needs {m} parity buffers, got {len(parity)}")
        length = self._check_shards(data, parity)
        if m == 0 or length == 0:
            return
        sources = tuple(range(k))
        wanted = tuple(range(k, k + m))
        self._apply(self._plan(sources, wanted), data, parity, length)

    def decode(self, present: Mapping[int, Shard], out: Mapping[int, Shard]) -> None:
        """Rebuild shards from any k present ones.

        ``present`` maps shard index (0..k+m-1; data first, then parity) to a shard that
        is known good. Leave out lost shards *and* shards whose checksum failed.
        ``out`` maps each index to rebuild, data or parity, to a caller buffer of the
        shard length; one pass over k present shards fills them all. Raises
        :class:`ErasureError` (``too-few-shards``) when fewer than k are present.
        """
        n = self.n
        for name, idx in (("present", present), ("out", out)):
            for i in idx:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                    raise ErasureError("bad-index", f"{name} shard index {i!r} not in 0..{n - 1}")
        both = set(present) & set(out)
        if both:
            raise ErasureError("bad-index", f"shards {sorted(both)} are both present and wanted")
        if len(present) < self._k:
            raise ErasureError(
                "too-few-shards",
                f"{len(present)} of {n} shards present, {self._k} needed",
                present=present.keys(),
            )
        sources = tuple(sorted(present)[: self._k])  # data shards first: cheapest rows
        wanted = tuple(sorted(out))
        srcs = [present[i] for i in sources]
        outs = [out[i] for i in wanted]
        length = self._check_shards(srcs, outs, extra=[present[i] for i in present])
        if not wanted or length == 0:
            return
        self._apply(self._plan(sources, wanted), srcs, outs, length)

    def missing(self, present: Collection[int]) -> tuple[int, ...]:
        """The shard indices not in ``present``, in order: what to pass as ``out`` keys."""
        return tuple(i for i in range(self.n) if i not in present)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self._k}, m={self._m}, backend={self.detail!r})"

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _make_plan(self, rows: npt.NDArray[np.uint8]) -> object:
        """Prepare whatever the engine needs to apply an r x k coefficient matrix."""

    @abstractmethod
    def _apply(
        self, plan: object, srcs: Sequence[Shard], outs: Sequence[Shard], length: int
    ) -> None:
        """outs[i] = XOR_j rows[i][j] * srcs[j]; inputs validated, length > 0.
        Work in stripes of :meth:`_stripes` so no single step is long."""

    # ------------------------------------------------------------------ internals
    def _stripes(self, length: int, most: int | None = None) -> Iterator[tuple[int, int]]:
        step = self._stripe if most is None else min(self._stripe, most)
        for start in range(0, length, step):
            yield start, min(start + step, length)

    def _plan(self, sources: tuple[int, ...], wanted: tuple[int, ...]) -> object:
        key = (sources, wanted)
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        g = self._gen
        if sources == tuple(range(self._k)):
            rows = np.ascontiguousarray(g[list(wanted)])
        else:
            inv = self._invert(np.ascontiguousarray(g[list(sources)]))
            rows = _gf256.mat_mul(np.ascontiguousarray(g[list(wanted)]), inv)
        plan = self._make_plan(rows)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > _PLAN_CACHE_MAX:
                self._plans.popitem(last=False)
        return plan

    def _invert(self, a: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return _gf256.mat_inv(a)

    @staticmethod
    def _check_shards(
        srcs: Sequence[Shard], outs: Sequence[Shard], extra: Sequence[Shard] = ()
    ) -> int:
        length: int | None = None
        for role, arrs in (("input", srcs), ("output", outs), ("input", extra)):
            for a in arrs:
                if not isinstance(a, np.ndarray):
                    raise ErasureError(
                        "bad-shard", f"{role} shard is {type(a).__name__}, not ndarray"
                    )
                if a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous:
                    raise ErasureError(
                        "bad-shard",
                        f"{role} shard must be 1-D C-contiguous uint8, got {a.dtype} {a.shape}",
                    )
                if length is None:
                    length = a.shape[0]
                elif a.shape[0] != length:
                    raise ErasureError(
                        "bad-shard", f"shard lengths differ: {a.shape[0]} != {length}"
                    )
        for o in outs:
            if not o.flags.writeable:
                raise ErasureError("bad-shard", "output shard is read-only")
            if o.shape[0] == 0:
                continue
            for s in srcs:
                if np.may_share_memory(o, s):
                    raise ErasureError("bad-shard", "output shard overlaps an input shard")
            for o2 in outs:
                if o2 is not o and np.may_share_memory(o, o2):
                    raise ErasureError("bad-shard", "output shards overlap each other")
        return length or 0


class NumpyCoder(ErasureCoder):
    """Pure-numpy GF(256) (16-bit pair tables): ~1 GB/s encode, no native dependency.
    numpy releases the GIL inside each vector op; stripes keep every op short."""

    backend = "numpy"
    default_stripe = 1024 * 1024

    def _make_plan(self, rows: npt.NDArray[np.uint8]) -> object:
        return [[int(c) for c in row] for row in rows]

    def _apply(
        self, plan: object, srcs: Sequence[Shard], outs: Sequence[Shard], length: int
    ) -> None:
        coef = cast(list[list[int]], plan)
        for a, b in self._stripes(length):
            _gf256.lincomb(coef, [s[a:b] for s in srcs], [o[a:b] for o in outs])


class IsalCoder(ErasureCoder):
    """Intel ISA-L (``ec_encode_data``) through ctypes: 5-9 GB/s; the GIL is released for
    every call and each call covers one stripe, so other Python threads keep running."""

    backend = "isal"
    default_stripe = 1024 * 1024

    def __init__(
        self, k: int, m: int, *, stripe_bytes: int | None = None, library: str | None = None
    ) -> None:
        lib, why = _isal.load(library)
        if lib is None:
            raise ErasureError("backend-unavailable", why)
        self._isal = lib
        super().__init__(k, m, stripe_bytes=stripe_bytes)

    @property
    def detail(self) -> str:
        return f"isal {self._isal.version} ({self._isal.path})"

    def _invert(self, a: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return self._isal.invert(a)

    def _make_plan(self, rows: npt.NDArray[np.uint8]) -> object:
        return self._isal.init_tables(rows)

    def _apply(
        self, plan: object, srcs: Sequence[Shard], outs: Sequence[Shard], length: int
    ) -> None:
        tables = cast(npt.NDArray[np.uint8], plan)
        k, r = len(srcs), len(outs)
        src_addr = [s.ctypes.data for s in srcs]
        out_addr = [o.ctypes.data for o in outs]
        ptrs = _isal.IsaL.pointers
        # ISA-L's length is a C int: never more than MAX_LENGTH per call, whatever the
        # stripe (a snapshot's stripe is its piece size)
        for a, b in self._stripes(length, _isal.MAX_LENGTH):
            self._isal.encode(
                b - a,
                k,
                r,
                tables,
                ptrs([p + a for p in src_addr]),
                ptrs([p + a for p in out_addr]),
            )


def isal_unavailable_reason(library: str | None = None) -> str | None:
    """``None`` when ISA-L loads and passes its self-check, else why not."""
    lib, why = _isal.load(library)
    return None if lib is not None else why


def backend_summary(prefer: str = "auto", library: str | None = None) -> tuple[str, str]:
    """What :func:`make_coder` would use, for start-up lines: a short token
    (``isal-2.32``, ``numpy``) and a description (the library's path, or why ISA-L is
    not used)."""
    if prefer == "numpy":
        return "numpy", "numpy engine (asked for)"
    lib, why = _isal.load(library)
    if lib is None:
        return "numpy", why
    return f"isal-{lib.version}", f"isal {lib.version} ({lib.path})"


def available_backends(library: str | None = None) -> tuple[str, ...]:
    """Backends usable in this process, fastest first."""
    return ("isal", "numpy") if isal_unavailable_reason(library) is None else ("numpy",)


_warned_fallback = False


def make_coder(
    k: int,
    m: int,
    prefer: Backend = "auto",
    *,
    stripe_bytes: int | None = None,
    isal_library: str | None = None,
) -> ErasureCoder:
    """A k+m coder. ``prefer="auto"`` takes ISA-L when it loads (logging a warning once
    when it falls back to numpy); ``"isal"`` raises ``backend-unavailable`` instead of
    falling back; ``"numpy"`` always works. ``isal_library`` names another libisal
    (e.g. a newer build with GFNI kernels) instead of Debian's ``libisal.so.2``."""
    global _warned_fallback
    _check_params(k, m)
    if prefer == "numpy":
        return NumpyCoder(k, m, stripe_bytes=stripe_bytes)
    if prefer == "isal":
        return IsalCoder(k, m, stripe_bytes=stripe_bytes, library=isal_library)
    if prefer != "auto":
        raise ErasureError("bad-params", f"unknown backend {prefer!r}; use auto, isal or numpy")
    why = isal_unavailable_reason(isal_library)
    if why is None:
        return IsalCoder(k, m, stripe_bytes=stripe_bytes, library=isal_library)
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("erasure coder falls back to numpy (about 1 GB/s): %s", why)
    return NumpyCoder(k, m, stripe_bytes=stripe_bytes)

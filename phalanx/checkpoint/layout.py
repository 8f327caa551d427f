"""State layout: a (nested) mapping of names to arrays <-> one flat byte buffer + manifest.

:func:`plan` walks the state (``dict``-like mappings of ``str`` keys whose leaves are
numpy arrays or CPU torch tensors), refuses what it cannot snapshot byte-exactly, and
returns a :class:`Manifest` (path, kind, dtype, shape, offset, length of every array,
offsets aligned to 64 bytes) plus the sources. :func:`copy_into` is the one memory
copy of a snapshot; :func:`with_checksums` adds per-array CRC-32s afterwards (off the
training loop's path); :func:`unflatten` rebuilds the state; :func:`changes` names the
arrays whose shape or dtype differ between two manifests.

Shape changes between generations are allowed (a model may grow): each generation
carries its own manifest and restores with its own shapes; the service reports the
changed names (handle and audit log). Refused: object/structured dtypes, non-contiguous
arrays (``np.ascontiguousarray`` first: the copy it makes is the caller's choice),
non-CPU tensors, non-``str`` keys.

This module must never do I/O or start threads, and never keep a reference to the
caller's arrays beyond the call that copies them.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint._crc import crc32
from phalanx.errors import LayoutError

__all__ = [
    "ALIGN",
    "MAX_STATE_BYTES",
    "ArraySpec",
    "LayoutError",
    "Manifest",
    "changes",
    "copy_into",
    "plan",
    "unflatten",
    "verify",
    "with_checksums",
]

#: Every array starts at a multiple of this many bytes in the flat buffer.
ALIGN = 64
_MAX_MANIFEST = 64 * 1024 * 1024
#: Most state bytes one generation may have (1 TiB): what a manifest from a peer or a
#: disk may claim, so a lying one cannot make a reader allocate more.
MAX_STATE_BYTES = 1 << 40
_OK_KINDS = frozenset("biufcmMSU")

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ArraySpec:
    """One array of the state: where its bytes are in the flat buffer and what they are."""

    path: tuple[str, ...]
    kind: str  # "numpy" | "torch"
    dtype: str  # numpy dtype str / ml_dtypes name, or torch dtype name ("torch.bfloat16")
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc: int = 0

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclass(frozen=True)
class Manifest:
    """The layout of one generation's flat buffer of ``nbytes`` bytes."""

    arrays: tuple[ArraySpec, ...]
    nbytes: int

    def to_bytes(self) -> bytes:
        doc = {
            "v": 1,
            "nbytes": self.nbytes,
            "arrays": [
                [list(a.path), a.kind, a.dtype, list(a.shape), a.offset, a.nbytes, a.crc]
                for a in self.arrays
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest read off the wire or a disk: anything that is not one
        :func:`plan` could have written (numbers out of range, unknown kinds or dtypes,
        bad paths, a shape that does not match its bytes, more than
        :data:`MAX_STATE_BYTES`) is a :class:`LayoutError` ``bad-manifest``."""
        if len(data) > _MAX_MANIFEST:
            raise LayoutError("bad-manifest", f"{len(data)} bytes is too large")
        try:
            doc = load_json(data)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise LayoutError("bad-manifest", "not a version 1 manifest")
            nbytes = wire_int(doc["nbytes"], "nbytes", 0, MAX_STATE_BYTES)
            rows = doc["arrays"]
            if not isinstance(rows, list):
                raise LayoutError("bad-manifest", "arrays is not a list")
            man = cls(tuple(_spec(row, nbytes) for row in rows), nbytes)
        except LayoutError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise LayoutError("bad-manifest", str(exc)) from None
        paths = sorted(a.path for a in man.arrays)
        for a, b in itertools.pairwise(paths):
            if b[: len(a)] == a:  # sorted: a path is a prefix of the one right after it
                raise LayoutError(
                    "bad-manifest", "one array's path is a prefix of another's", "/".join(b)
                )
        return man

    def by_name(self) -> dict[str, ArraySpec]:
        return {a.name: a for a in self.arrays}


def load_json(data: bytes) -> Any:
    """``json.loads`` for bytes from a peer or a disk: NaN and Infinity refused, nesting
    too deep for the parser (RecursionError) a ``bad-manifest`` :class:`LayoutError`."""

    def constant(name: str) -> Any:
        raise LayoutError("bad-manifest", f"{name} is not a number here")

    try:
        return json.loads(data, parse_constant=constant)
    except RecursionError:
        raise LayoutError("bad-manifest", "nested too deeply") from None


def wire_int(value: object, name: str, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool, not a float) in ``lo..hi``."""
    if type(value) is not int or not lo <= value <= hi:
        raise LayoutError("bad-manifest", f"{name} must be an int in {lo}..{hi}, got {value!r}")
    return value


#: torch dtypes a manifest may name (``str(tensor.dtype)`` without ``torch.``) and
#: their item sizes; read without importing torch.
_TORCH_ITEMSIZE = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}


def _itemsize(kind: str, dtype: str) -> int:
    """The item size of ``dtype`` if :func:`plan` could have written it for ``kind``
    (numpy: the same whitelist, by its canonical name); 0 when it could not."""
    if kind == "torch":
        if not dtype.startswith("torch."):
            return 0
        return _TORCH_ITEMSIZE.get(dtype.removeprefix("torch."), 0)
    if kind != "numpy":
        return 0
    try:
        dt = _np_dtype(dtype)
    except Exception:  # any name numpy or ml_dtypes cannot make is refused
        return 0
    return dt.itemsize if _np_dtype_name(dt) == dtype else 0


def _spec(row: object, total: int) -> ArraySpec:
    if not isinstance(row, list) or len(row) != 7:
        raise LayoutError("bad-manifest", f"an array entry is not 7 fields: {row!r:.80}")
    path, kind, dtype, shape, off, n, c = row
    if (
        not isinstance(path, list)
        or not path
        or not all(isinstance(p, str) and p and "/" not in p for p in path)
    ):
        raise LayoutError("bad-manifest", f"bad array path {path!r:.80}")
    name = "/".join(path)
    if not isinstance(kind, str) or not isinstance(dtype, str):
        raise LayoutError("bad-manifest", "kind and dtype must be str", name)
    size = _itemsize(kind, dtype)
    if not size:
        raise LayoutError("bad-manifest", f"{kind} dtype {dtype!r:.40} is not snapshotted", name)
    if not isinstance(shape, list) or len(shape) > 64:
        raise LayoutError("bad-manifest", "shape must be a list of at most 64 dims", name)
    dims = tuple(wire_int(d, "a dimension", 0, MAX_STATE_BYTES) for d in shape)
    nbytes = wire_int(n, "nbytes", 0, total)
    offset = wire_int(off, "offset", 0, total - nbytes)
    count = 1
    for d in dims:
        count *= d
    if count * size != nbytes:
        raise LayoutError("bad-manifest", f"shape {dims} of {dtype} is not {nbytes} bytes", name)
    crc = wire_int(c, "crc", 0, 2**32 - 1)
    return ArraySpec(tuple(path), kind, dtype, dims, offset, nbytes, crc)


def _torch() -> Any:
    return sys.modules.get("torch")


def _np_dtype_name(dt: np.dtype[Any]) -> str:
    if dt.kind in _OK_KINDS:
        return dt.str
    if dt.kind == "V" and dt.fields is None and dt.type.__module__.startswith("ml_dtypes"):
        return dt.name
    return ""


def _np_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return dt


def _leaf(value: object, path: tuple[str, ...]) -> tuple[str, str, tuple[int, ...], U8 | Any]:
    """(kind, dtype, shape, source) for one leaf; source is what copy_into reads."""
    name = "/".join(path)
    if isinstance(value, np.ndarray):
        dt = _np_dtype_name(value.dtype)
        if not dt:
            raise LayoutError(
                "object-dtype",
                f"dtype {value.dtype} cannot be snapshotted (object/structured arrays hold "
                "references, not bytes)",
                name,
            )
        if not value.flags.c_contiguous:
            raise LayoutError(
                "non-contiguous",
                "array is not C-contiguous; pass np.ascontiguousarray(a)",
                name,
            )
        return "numpy", dt, tuple(int(s) for s in value.shape), value
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise LayoutError("device", f"tensor is on {value.device}; move it to CPU", name)
        if not value.is_contiguous():
            raise LayoutError("non-contiguous", "tensor is not contiguous; .contiguous()", name)
        t = value.detach()
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        return "torch", str(t.dtype), tuple(int(s) for s in t.shape), flat.numpy()
    raise LayoutError(
        "bad-type", f"{type(value).__name__} is not a numpy array or CPU torch tensor", name
    )


def plan(state: Mapping[str, Any]) -> tuple[Manifest, list[npt.NDArray[Any]]]:
    """The manifest of ``state`` (checksums 0) and, in the same order, the arrays to copy.

    Raises :class:`LayoutError` before anything is copied if any leaf is refused."""
    if not isinstance(state, Mapping):
        raise LayoutError("bad-state", f"state must be a mapping, got {type(state).__name__}")
    specs: list[ArraySpec] = []
    sources: list[npt.NDArray[Any]] = []
    offset = 0

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        nonlocal offset
        for key, value in node.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise LayoutError(
                    "bad-key",
                    f"keys must be non-empty str without '/', got {key!r}",
                    "/".join(prefix),
                )
            path = (*prefix, key)
            if isinstance(value, Mapping):
                walk(value, path)
                continue
            kind, dtype, shape, src = _leaf(value, path)
            nbytes = int(src.nbytes)
            specs.append(ArraySpec(path, kind, dtype, shape, offset, nbytes))
            sources.append(src)
            offset += -(-nbytes // ALIGN) * ALIGN

    walk(state, ())
    if offset > MAX_STATE_BYTES:
        raise LayoutError("bad-state", f"{offset} bytes is more than a snapshot may hold")
    return Manifest(tuple(specs), offset), sources


def copy_into(manifest: Manifest, sources: Sequence[npt.NDArray[Any]], buf: U8) -> None:
    """Copy every source into its place in ``buf`` (the snapshot's one memory copy)."""
    if buf.size < manifest.nbytes:
        raise ValueError(f"buffer of {buf.size} bytes for a {manifest.nbytes}-byte layout")
    for spec, src in zip(manifest.arrays, sources, strict=True):
        if spec.nbytes:
            dst = buf[spec.offset : spec.offset + spec.nbytes]
            np.copyto(dst, src.reshape(-1).view(np.uint8), casting="no")


def with_checksums(manifest: Manifest, buf: U8) -> Manifest:
    """``manifest`` with the CRC-32 of every array's bytes in ``buf``."""
    return replace(
        manifest,
        arrays=tuple(
            replace(a, crc=crc32(buf[a.offset : a.offset + a.nbytes])) for a in manifest.arrays
        ),
    )


def verify(manifest: Manifest, buf: U8) -> list[str]:
    """Names of the arrays whose bytes in ``buf`` fail their checksum (empty: all good)."""
    return [a.name for a in manifest.arrays if crc32(buf[a.offset : a.offset + a.nbytes]) != a.crc]


def changes(old: Manifest | None, new: Manifest) -> tuple[str, ...]:
    """Names added, removed, or whose shape/dtype/kind changed from ``old`` to ``new``."""
    if old is None:
        return ()
    a, b = old.by_name(), new.by_name()
    out = [
        n
        for n in b
        if n not in a or (a[n].shape, a[n].dtype, a[n].kind) != (b[n].shape, b[n].dtype, b[n].kind)
    ]
    out += [n for n in a if n not in b]
    return tuple(sorted(out))


def unflatten(manifest: Manifest, buf: U8) -> dict[str, Any]:
    """Rebuild the nested state from ``buf``: fresh arrays (one copy), never views of it."""
    out: dict[str, Any] = {}
    for spec in manifest.arrays:
        raw = buf[spec.offset : spec.offset + spec.nbytes].copy()
        value: Any
        if spec.kind == "torch":
            torch = _torch()
            if torch is None:
                import torch
            dtype = getattr(torch, spec.dtype.removeprefix("torch."))
            t = torch.from_numpy(raw)
            value = (
                t.view(dtype).reshape(spec.shape)
                if raw.size
                else torch.empty(spec.shape, dtype=dtype)
            )
        else:
            value = raw.view(_np_dtype(spec.dtype)).reshape(spec.shape)
        node = out
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = value
    return out

"""What an operation is, as every rank must agree on it: the op descriptor.

Ranks run collectives by sequence number; nothing but the caller's discipline makes
the n-th call on one rank the same call as the n-th on another. When callers disagree
(one passes 10 elements, another 12; float32 against int32; ``sum`` against ``max``;
``int8`` against ``none``; broadcast roots 0 and 1) the frames no longer fit each
other's buffers, or worse, they fit and the result is silently wrong. An
:class:`OpDescriptor` names everything that defines what a rank sends and expects:
kind, element count, dtype, reduce op, codec, root, the layout tag of a gather or
reduce-scatter (the view epoch its caller laid the array out for), and the algorithm
and piece size the rank's options chose. Its 64-bit :attr:`~OpDescriptor.digest` rides in the header
of every DATA frame (``frames.py``); a receiver compares it with its own before any
payload byte reaches a plan's buffer. Only on a mismatch do ranks exchange their full
descriptors (the MISMATCH frame: :func:`encode_mismatch`), so each can name every
rank's arguments in :class:`~phalanx.errors.OpMismatch`.

Wire form of a descriptor (little-endian)::

    u8   kind        index in KINDS
    u8   algorithm   index in ALGORITHMS
    u8   dtype       index in DTYPES ("" = none: barrier)
    u8   op          index in OPS ("" = none)
    u32  root        broadcast root; 0xFFFFFFFF = none
    u64  count       elements
    u32  piece_bytes the sender's pipelining unit
    u8   n           bytes of the codec spec that follow (at most 64)
    n    codec       canonical codec spec, ASCII ("none", "zstd:level=3", ...)
    [u64 layout]     the layout tag, present only on a tagged op: an untagged
                     descriptor's bytes (so its digest) are what they were before tags

and a MISMATCH payload is ``u32 detected_by + 1`` (0: unknown) followed by the
sender's descriptor. The tables are part of the wire contract: append, never reorder.

Pure: no sockets, no threads, no clock. Decoders trust nothing: every code and the
codec spec are checked, and a bad payload raises ``FrameError("bad-payload")``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Final

from phalanx.comm.codecs import parse_codec
from phalanx.comm.reduce import DTYPE_NAMES
from phalanx.errors import ConfigError, FrameError, OpMismatch

__all__ = [
    "ALGORITHMS",
    "DTYPES",
    "KINDS",
    "NO_ROOT",
    "OPS",
    "OpDescriptor",
    "decode_mismatch",
    "differing_fields",
    "encode_mismatch",
    "mismatch_error",
    "op_descriptor",
]

KINDS: Final[tuple[str, ...]] = (
    "barrier",
    "all_reduce",
    "reduce_scatter",
    "all_gather",
    "broadcast",
)
ALGORITHMS: Final[tuple[str, ...]] = (
    "trivial",
    "recursive-doubling",
    "ring",
    "binomial",
    "chain",
    "dissemination",
)
#: a dtype's wire code is its index here ("": none); tests/unit/test_descriptor.py
#: pins the table, so reduce.DTYPE_NAMES may only grow at its end
DTYPES: Final[tuple[str, ...]] = ("", *DTYPE_NAMES)
OPS: Final[tuple[str, ...]] = ("", "sum", "avg", "min", "max", "prod")
NO_ROOT: Final = 0xFFFFFFFF
_MAX_SPEC: Final = 64

_FIXED = struct.Struct("<BBBBIQIB")
_BY = struct.Struct("<I")
_LAYOUT = struct.Struct("<Q")

#: fields that are the caller's arguments (always shown); the rest follow from options
_ARGUMENTS: Final = ("kind", "count", "dtype", "op", "codec", "root", "layout")


@dataclass(frozen=True, slots=True)
class OpDescriptor:
    """Everything that defines the frames a rank sends and expects for one op.

    ``dtype`` and ``op`` are ``""`` where the kind has none (barrier; op for
    all_gather and broadcast); ``root`` is ``-1`` except for broadcast; ``layout``
    (the caller's layout tag, :attr:`phalanx.ops.OpSpec.layout`) is ``-1`` when untagged.
    """

    kind: str
    count: int
    dtype: str = ""
    op: str = ""
    codec: str = "none"
    root: int = -1
    algorithm: str = "trivial"
    piece_bytes: int = 0
    layout: int = -1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown op kind {self.kind!r}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} has no descriptor code")
        if self.op not in OPS:
            raise ConfigError(f"unknown reduce op {self.op!r}")
        if not 0 <= self.count < 2**64:
            raise ConfigError(f"count out of range: {self.count}")
        if not (self.root == -1 or 0 <= self.root < NO_ROOT):
            raise ConfigError(f"root out of range: {self.root}")
        if not 0 <= self.piece_bytes < 2**32:
            raise ConfigError(f"piece_bytes out of range: {self.piece_bytes}")
        if not -1 <= self.layout < 2**64:
            raise ConfigError(f"layout out of range: {self.layout}")
        spec = self.codec.encode("ascii", "replace")
        if len(spec) > _MAX_SPEC:
            raise ConfigError(f"codec spec longer than {_MAX_SPEC} bytes: {self.codec!r}")

    def encode(self) -> bytes:
        spec = self.codec.encode("ascii")
        return (
            _FIXED.pack(
                KINDS.index(self.kind),
                ALGORITHMS.index(self.algorithm),
                DTYPES.index(self.dtype),
                OPS.index(self.op),
                NO_ROOT if self.root < 0 else self.root,
                self.count,
                self.piece_bytes,
                len(spec),
            )
            + spec
            + (b"" if self.layout < 0 else _LAYOUT.pack(self.layout))
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> OpDescriptor:
        """The descriptor in ``data`` (exactly); ``FrameError("bad-payload")`` otherwise."""
        data = bytes(data)
        if len(data) < _FIXED.size:
            raise FrameError("bad-payload", f"op descriptor of {len(data)} bytes")
        kind, algo, dtype, op, root, count, piece, n = _FIXED.unpack_from(data)
        end = _FIXED.size + n
        if len(data) not in (end, end + _LAYOUT.size):
            raise FrameError("bad-payload", "op descriptor length does not match its codec spec")
        layout = _LAYOUT.unpack_from(data, end)[0] if len(data) > end else -1
        for code, table, what in (
            (kind, KINDS, "kind"),
            (algo, ALGORITHMS, "algorithm"),
            (dtype, DTYPES, "dtype"),
            (op, OPS, "reduce op"),
        ):
            if code >= len(table):
                raise FrameError("bad-payload", f"unknown {what} code {code} in an op descriptor")
        try:
            spec = data[_FIXED.size : end].decode("ascii")
            codec = parse_codec(spec).spec
        except (UnicodeDecodeError, ConfigError) as exc:
            raise FrameError("bad-payload", f"bad codec in an op descriptor: {exc}") from None
        if codec != spec:
            raise FrameError("bad-payload", f"codec spec {spec!r} is not canonical")
        return cls(
            kind=KINDS[kind],
            count=count,
            dtype=DTYPES[dtype],
            op=OPS[op],
            codec=codec,
            root=-1 if root == NO_ROOT else root,
            algorithm=ALGORITHMS[algo],
            piece_bytes=piece,
            layout=layout,
        )

    @property
    def digest(self) -> int:
        """64 bits that differ, but for a 2**-64 chance, between different descriptors;
        never 0 (0 in a frame header means "no descriptor")."""
        return _digest(self)

    def describe(self, extra: tuple[str, ...] = ()) -> str:
        """The call as a human reads it: ``all_reduce(count=10, dtype=float32, op=sum,
        codec=none)``; ``extra`` adds derived fields (``algorithm``, ``piece_bytes``)."""
        parts = [f"count={self.count}"]
        if self.dtype:
            parts.append(f"dtype={self.dtype}")
        if self.op:
            parts.append(f"op={self.op}")
        if self.kind != "barrier":
            parts.append(f"codec={self.codec}")
        if self.root >= 0:
            parts.append(f"root={self.root}")
        if self.layout >= 0:
            parts.append(f"layout={self.layout}")
        for name in extra:
            parts.append(f"{name}={getattr(self, name)}")
        return f"{self.kind}({', '.join(parts)})"


@lru_cache(maxsize=1024)
def op_descriptor(
    kind: str,
    count: int,
    dtype: str,
    op: str,
    codec: str,
    root: int,
    algorithm: str,
    piece_bytes: int,
    layout: int = -1,
) -> OpDescriptor:
    """:class:`OpDescriptor` with its checks run once per distinct call: a training
    loop repeats a handful of descriptors, and this runs per op (1 us instead of 4)."""
    return OpDescriptor(kind, count, dtype, op, codec, root, algorithm, piece_bytes, layout)


@lru_cache(maxsize=1024)
def _digest(desc: OpDescriptor) -> int:
    # cached: a training loop repeats a handful of descriptors, and this runs per op
    d = int.from_bytes(hashlib.blake2b(desc.encode(), digest_size=8).digest(), "little")
    return d or 1


def differing_fields(descriptors: Mapping[int, OpDescriptor]) -> tuple[str, ...]:
    """The descriptor fields on which not every rank agrees, in declaration order."""
    values = list(descriptors.values())
    return tuple(
        f.name for f in fields(OpDescriptor) if len({getattr(d, f.name) for d in values}) > 1
    )


def encode_mismatch(desc: OpDescriptor, detected_by: int | None) -> bytes:
    """The payload of a MISMATCH frame: who detected it first, then our descriptor."""
    return _BY.pack(0 if detected_by is None else detected_by + 1) + desc.encode()


def decode_mismatch(payload: bytes | bytearray | memoryview) -> tuple[OpDescriptor, int | None]:
    data = bytes(payload)
    if len(data) < _BY.size:
        raise FrameError("bad-payload", "MISMATCH too short")
    (by,) = _BY.unpack_from(data)
    return OpDescriptor.decode(data[_BY.size :]), (by - 1 if by else None)


def mismatch_error(
    *,
    op: str,
    seq: int,
    epoch: int,
    descriptors: Mapping[int, OpDescriptor],
    detected_by: int | None,
) -> OpMismatch:
    """The error every rank raises: each rank's arguments, and what differs. Fields
    that follow from options (algorithm, piece size) are named only when no argument
    differs: then the ranks' options are the cause (a count that differs usually
    changes the algorithm too, as a consequence)."""
    diff = differing_fields(descriptors)
    args = tuple(name for name in diff if name in _ARGUMENTS)
    extra = () if args else diff
    detail = ""
    if "piece_bytes" in extra:
        detail = (
            "the ranks' options differ: piece_bytes, or crowded_piece_bytes (a group "
            "whose addresses all name one host, with more members than its CPUs, moves "
            "larger pieces; where one address reaches several machines, or releases are "
            "mixed, set crowded_piece_bytes=0 on every rank)"
        )
    return OpMismatch(
        op=op,
        seq=seq,
        epoch=epoch,
        descriptors={r: d.describe(extra) for r, d in descriptors.items()},
        fields=args or diff,
        detected_by=detected_by,
        detail=detail,
    )

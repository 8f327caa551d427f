"""The local API's wire format: frames and messages between a client and its daemon.

Pure functions and frozen dataclasses: no sockets, no threads (``server.py`` and
``conn.py`` move the bytes). Every message is one frame::

    magic "PXL1" | kind u8 | flags u8 | reserved u16 | request id u64 | body length u32
    body: UTF-8 JSON object (at most MAX_BODY bytes)

Requests (client -> daemon) carry a request id the reply repeats; a daemon answers
each request with exactly one ``REPLY`` (JSON result) or ``ERROR`` (a typed error, see
:func:`error_body`), in order. ``MAP`` travels with one file descriptor (SCM_RIGHTS): a
memfd the client created, which the daemon maps (its size is what ``fstat`` says,
never what a length field claims). A ``REPLY`` with flag :data:`FLAG_FD` travels with
one file descriptor too (a restored state: a memfd the daemon filled and the client
maps). After ``WATCH`` a connection carries only
``EVENT`` frames from the daemon (view changes). Tensor bytes never travel in frames:
a request names them as a :class:`BufRef` (region, offset, dtype, shape).

Decoders take bytes and return messages or "need more"; anything malformed raises
:class:`~phalanx.errors.ProtocolError` and the connection is closed by its owner.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from phalanx.errors import ProtocolError

__all__ = [
    "COLLECTIVES",
    "FLAG_FD",
    "HEADER",
    "MAX_BODY",
    "BufRef",
    "Decoder",
    "Frame",
    "Kind",
    "OpRequest",
    "SnapshotEntry",
    "StateEntry",
    "encode",
    "parse_bufref",
    "parse_op",
    "parse_snapshot_entries",
    "parse_state_entries",
]

MAGIC = b"PXL1"
HEADER = struct.Struct("<4sBBHQI")
MAX_BODY = 1 << 20
#: frame flag: a file descriptor travels with this frame (SCM_RIGHTS)
FLAG_FD = 1
#: collectives a client may ask for (anything else is refused by name)
COLLECTIVES = frozenset({"all_reduce", "broadcast", "all_gather", "reduce_scatter", "barrier"})
_MAX_DIMS = 32


class Kind(enum.IntEnum):
    """Frame kinds. Requests < 64, daemon -> client >= 64."""

    HELLO = 1  # -> {"daemon": id, "view": ...}
    MAP = 2  # + memfd: {"region": id}; the daemon maps it
    UNMAP = 3  # {"region": id}
    OP = 4  # a collective (OpRequest)
    COMMIT = 5  # {"step", "ok", "timeout"}
    BEGIN_STEP = 6  # {"step"|null, "timeout"}
    VIEW = 7  # {} -> the current view
    STATE_ATTACH = 8  # {"entries": [...], "step"|null}
    STATE_UPDATE = 9  # {"step", "changed"|null}
    WATCH = 10  # this connection becomes an event stream
    BYE = 11  # the client closes on purpose (not a crash)
    SNAPSHOT = 12  # {"entries": [{"path", "buf"}], "step"} -> generation, stall_s
    SNAPSHOT_WAIT = 13  # {"generation", "timeout"} -> {"sealed": bool, ...SealInfo}
    RESTORE = 14  # {"member"|null, "step"|null, "timeout"} -> layout + memfd (FLAG_FD)
    REPLY = 64
    ERROR = 65
    EVENT = 66


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    rid: int
    body: dict[str, Any]
    flags: int = 0
    #: the descriptor that came with a FLAG_FD frame (set by the receiving side)
    fd: int | None = None


def encode(kind: Kind, rid: int, body: dict[str, Any], flags: int = 0) -> bytes:
    """One frame's bytes. Raises ProtocolError if the body is too large."""
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_BODY:
        raise ProtocolError(f"local API message of {len(data)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, int(kind), flags, 0, rid, len(data)) + data


class Decoder:
    """Incremental frame decoder: ``feed(bytes)`` returns the complete frames so far."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buf = bytearray()
        self._max = max_body

    @property
    def pending(self) -> int:
        """Bytes buffered that do not form a complete frame yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            magic, kind, flags, _res, rid, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {bytes(magic)!r} on the local API socket")
            if length > self._max:
                raise ProtocolError(f"frame body of {length} bytes exceeds {self._max}")
            try:
                k = Kind(kind)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind}") from None
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            raw = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            try:
                body = json.loads(raw) if raw else {}
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"frame body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise ProtocolError("frame body must be a JSON object")
            out.append(Frame(k, rid, body, flags))
        return out


# ----------------------------------------------------------------------------- messages


def _int(body: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = body.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(body: dict[str, Any], key: str, default: str | None = None) -> str:
    v = body.get(key, default)
    if not isinstance(v, str) or len(v) > 256:
        raise ProtocolError(f"{key!r} must be a short string, got {v!r}")
    return v


def _opt_float(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v <= 86400:
        raise ProtocolError(f"{key!r} must be a number of seconds in (0, 86400], got {v!r}")
    return float(v)


@dataclass(frozen=True, slots=True)
class BufRef:
    """Where an array lives: ``region`` (a mapped memfd), byte ``offset``, dtype, shape."""

    region: int
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.shape) > _MAX_DIMS or any(d < 0 for d in self.shape):
            raise ProtocolError(f"bad shape {self.shape}")

    @property
    def nbytes(self) -> int:
        n = int(np.dtype(self.dtype).itemsize)
        for d in self.shape:
            n *= d
        return n

    def to_body(self) -> dict[str, Any]:
        return {"region": self.region, "offset": self.offset, "dtype": self.dtype,
                "shape": list(self.shape)}  # fmt: skip


def parse_bufref(body: object) -> BufRef:
    if not isinstance(body, dict):
        raise ProtocolError("a buffer reference must be an object")
    shape = body.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape
    ):
        raise ProtocolError(f"bad shape {shape!r}")
    dtype = _str(body, "dtype")
    if dtype == "bfloat16":
        import ml_dtypes  # registers the name with numpy

        del ml_dtypes
    try:
        np.dtype(dtype)
    except TypeError:
        raise ProtocolError(f"unknown dtype {dtype!r}") from None
    return BufRef(_int(body, "region"), _int(body, "offset"), dtype, tuple(shape))


@dataclass(frozen=True, slots=True)
class OpRequest:
    """One collective on a buffer (``buf`` is None for a barrier)."""

    op: str
    buf: BufRef | None
    reduce: str = "sum"
    codec: str = "none"
    root: int = 0
    retry: bool = False
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.op not in COLLECTIVES:
            raise ProtocolError(f"unknown collective {self.op!r}")
        if (self.buf is None) != (self.op == "barrier"):
            raise ProtocolError(f"{self.op} needs a buffer (and a barrier none)")

    def to_body(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "buf": None if self.buf is None else self.buf.to_body(),
            "reduce": self.reduce,
            "codec": self.codec,
            "root": self.root,
            "retry": self.retry,
            "timeout": self.timeout,
        }


def parse_op(body: dict[str, Any]) -> OpRequest:
    buf = body.get("buf")
    retry = body.get("retry", False)
    if not isinstance(retry, bool):
        raise ProtocolError("'retry' must be a boolean")
    return OpRequest(
        op=_str(body, "op"),
        buf=None if buf is None else parse_bufref(buf),
        reduce=_str(body, "reduce", "sum"),
        codec=_str(body, "codec", "none"),
        root=_int({"root": body.get("root", 0)}, "root", 0, 1 << 20),
        retry=retry,
        timeout=_opt_float(body, "timeout"),
    )


@dataclass(frozen=True, slots=True)
class StateEntry:
    name: str
    buf: BufRef


def parse_state_entries(body: dict[str, Any]) -> list[StateEntry]:
    entries = body.get("entries")
    if not isinstance(entries, list) or len(entries) > 65536:
        raise ProtocolError("'entries' must be a list")
    out = []
    for e in entries:
        if not isinstance(e, dict):
            raise ProtocolError("a state entry must be an object")
        out.append(StateEntry(_str(e, "name"), parse_bufref(e.get("buf"))))
    return out


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One array of a snapshot: its ``path`` in the nested state and where it lives."""

    path: tuple[str, ...]
    buf: BufRef


def parse_snapshot_entries(body: dict[str, Any]) -> list[SnapshotEntry]:
    entries = body.get("entries")
    if not isinstance(entries, list) or len(entries) > 65536:
        raise ProtocolError("'entries' must be a list of at most 65536 arrays")
    out = []
    for e in entries:
        if not isinstance(e, dict):
            raise ProtocolError("a snapshot entry must be an object")
        path = e.get("path")
        if (
            not isinstance(path, list)
            or not 1 <= len(path) <= _MAX_DIMS
            or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in path)
        ):
            raise ProtocolError(f"bad snapshot entry path {path!r}")
        out.append(SnapshotEntry(tuple(path), parse_bufref(e.get("buf"))))
    return out

"""The local protocol: typed messages between a training process and its daemon.

Pure: frozen dataclasses, their one binary encoding, and an incremental frame decoder;
no sockets, no threads (``conn.py`` and ``server.py`` move the bytes). Every message
is one frame::

    magic "PXL2" | kind u8 | flags u8 | reserved u16 (0) | request id u64 | body length u32
    body: the message's fields, in declaration order (at most MAX_BODY bytes)

**One table.** :data:`REQUESTS` lists every request: its kind number, its dataclass,
its reply's dataclass, and whether a file descriptor travels with it (``MAP`` brings a
memfd the client made; a ``RESTORE`` reply brings one the daemon filled) and whether it
names the client's memory (a client that gives up on such a request sends ``CANCEL``
and reuses that memory only after the daemon acknowledged it). A reply's frame kind is
``REPLY_BASE`` + its request's kind, so every frame decodes on its own; ``ERROR``
carries an :class:`~phalanx.errors.ErrorInfo` (the error hierarchy's own encoding) and
``EVENT`` a :class:`~phalanx.ops.ViewInfo` to a connection that sent ``WATCH``.
Adding a request kind is one row here (plus its handler row in ``server.py``).

**One encoding**, derived from each dataclass's field types (:mod:`._codec`): fields
in declaration order, fixed-size ones packed, strings and lists length-prefixed.
Decoding checks every length against what is left of the body before trusting it
(nothing is allocated on a length field's say-so), refuses trailing bytes, and builds
the dataclass, whose constructor validates the values; any of that failing raises
:class:`~phalanx.errors.ProtocolError`, and the connection is closed by its owner.
Tensor bytes never travel here: a request names them as a :class:`BufRef` (region,
offset, dtype, shape).

This module must never touch a socket, start a thread, or accept a frame it has not
fully validated.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from phalanx.errors import ErrorInfo, ProtocolError
from phalanx.local._codec import decode_body, schema
from phalanx.ops import OpResult, OpSpec, StepInfo, ViewInfo

__all__ = [
    "FLAG_FD",
    "HEADER",
    "MAX_BODY",
    "PROTOCOL_VERSION",
    "REPLY_BASE",
    "REQUESTS",
    "AttachState",
    "Attached",
    "BeginStep",
    "BufRef",
    "Bye",
    "Cancel",
    "Cancelled",
    "ClientHello",
    "Commit",
    "Committed",
    "Decoder",
    "Done",
    "Event",
    "GetView",
    "Kind",
    "Map",
    "Mapped",
    "NamedBuf",
    "Op",
    "Request",
    "Restore",
    "RestoreLayout",
    "RestoredArray",
    "Row",
    "SealResult",
    "SealStatus",
    "SnapshotArray",
    "SnapshotTaken",
    "SnapshotWait",
    "TakeSnapshot",
    "Unmap",
    "UpdateState",
    "Watch",
    "Welcome",
    "WireFrame",
    "decode",
    "encode",
    "row_of",
]

#: 3: shared regions are sealed against shrinking (F_SEAL_SHRINK); a daemon maps no
#: other kind, so a client of version 2 is told so at HELLO instead of losing its session.
#: 4: an OP's spec carries the layout tag (``OpSpec.layout``, one more field: the body
#: changed), so a client of version 3 is told so at HELLO instead of its first OP
#: being refused as malformed. HELLO's own body is the same in every version.
PROTOCOL_VERSION = 4
MAGIC = b"PXL2"
HEADER = struct.Struct("<4sBBHQI")
MAX_BODY = 1 << 20
#: frame flag: a file descriptor travels with this frame (SCM_RIGHTS)
FLAG_FD = 1
REPLY_BASE = 64
_MAX_DIMS = 32


class Kind(enum.IntEnum):
    """Frame kinds: requests (< 64), their replies (``REPLY_BASE`` + the request's),
    the error reply and view events."""

    HELLO = 1
    MAP = 2
    UNMAP = 3
    OP = 4
    COMMIT = 5
    BEGIN_STEP = 6
    VIEW = 7
    ATTACH_STATE = 8
    UPDATE_STATE = 9
    WATCH = 10
    BYE = 11
    SNAPSHOT = 12
    SNAPSHOT_WAIT = 13
    RESTORE = 14
    CANCEL = 15
    ERROR = 128
    EVENT = 129


# ----------------------------------------------------------------------------- values


@functools.lru_cache(maxsize=256)
def _dtype_ok(name: str) -> bool:
    if name == "bfloat16":
        import ml_dtypes  # registers the name with numpy

        del ml_dtypes
    try:
        dt = np.dtype(name)
    except Exception:  # TypeError, and SyntaxError for some strings ("f4,(")
        return False
    return not dt.hasobject and dt.fields is None and dt.itemsize > 0


@dataclass(frozen=True, slots=True)
class BufRef:
    """Where an array lives: ``region`` (a mapped memfd of the client), byte
    ``offset``, dtype (numpy's name; byte order kept), shape."""

    region: int
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.region < 0 or self.offset < 0:
            raise ProtocolError(f"bad buffer place {self.region}/{self.offset}")
        if len(self.shape) > _MAX_DIMS or any(not 0 <= d < 2**48 for d in self.shape):
            raise ProtocolError(f"bad shape {self.shape}")
        if not _dtype_ok(self.dtype):
            raise ProtocolError(f"unknown dtype {self.dtype!r}")

    @property
    def nbytes(self) -> int:
        n = int(np.dtype(self.dtype).itemsize)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class NamedBuf:
    """One array of the attached state: its name and place."""

    name: str
    buf: BufRef

    def __post_init__(self) -> None:
        if not self.name:
            raise ProtocolError("state entry names must be non-empty")


@dataclass(frozen=True, slots=True)
class SnapshotArray:
    """One array of a snapshot: its ``path`` in the nested state and its place."""

    path: tuple[str, ...]
    buf: BufRef

    def __post_init__(self) -> None:
        if not 1 <= len(self.path) <= _MAX_DIMS or not all(
            0 < len(p) <= 256 and "/" not in p for p in self.path
        ):
            raise ProtocolError(f"bad snapshot entry path {self.path!r}")


@dataclass(frozen=True, slots=True)
class RestoredArray:
    """One array of a restored state: path, dtype, shape, and its offset in the memfd."""

    path: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]
    offset: int

    def __post_init__(self) -> None:
        if not self.path or self.offset < 0 or not _dtype_ok(self.dtype):
            raise ProtocolError(f"bad restored array {self.path!r} {self.dtype!r}")
        if len(self.shape) > _MAX_DIMS or any(d < 0 for d in self.shape):
            raise ProtocolError(f"bad shape {self.shape}")


@dataclass(frozen=True, slots=True)
class SealResult:
    """A sealed snapshot generation: its id, step, state bytes, the erasure code
    (``k`` data + ``m`` parity pieces per stripe), the holders in piece order, the time
    from ``snapshot()`` to the seal and the time spent encoding."""

    generation: int
    step: int
    nbytes: int
    k: int
    m: int
    holders: tuple[str, ...]
    seal_s: float
    encode_s: float


def _timeout(seconds: float, what: str) -> None:
    if not 0 <= seconds <= 86400 * 7:
        raise ProtocolError(f"{what}: timeout must be in [0, 604800] seconds, got {seconds}")


# ----------------------------------------------------------------------------- requests


class Request:
    """Marker base of request messages."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ClientHello(Request):
    """The first request: who the client is, and its ``time.monotonic()`` (the daemon
    takes the client's deadlines as instants when the two clocks agree)."""

    pid: int
    clock: float
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """HELLO's reply: the session id (for CANCEL on another connection), the daemon's
    pid and member id, the view, and the deadlines the client should know."""

    version: int
    session: int
    daemon_pid: int
    member_id: str
    view: ViewInfo
    seal_timeout: float
    join_timeout: float


@dataclass(frozen=True, slots=True)
class Map(Request):
    """Map the memfd that travels with this frame as region ``region``."""

    region: int

    def __post_init__(self) -> None:
        if self.region < 0:
            raise ProtocolError(f"bad region id {self.region}")


@dataclass(frozen=True, slots=True)
class Mapped:
    size: int


@dataclass(frozen=True, slots=True)
class Unmap(Request):
    region: int


@dataclass(frozen=True, slots=True)
class Done:
    """An empty reply."""


@dataclass(frozen=True, slots=True)
class Op(Request):
    """One collective on the buffer at ``buf`` (None for a barrier). Its deadline:
    ``at`` on the client's monotonic clock, ``timeout`` the seconds it had left when
    sent (used where the clocks differ). The spec's ``layout`` tag (protocol 4) goes
    into the op's descriptor unchanged: the daemon never refuses an op for its tag
    alone (docs/daemon.md, "Layout tags")."""

    spec: OpSpec
    buf: BufRef | None
    retry: bool
    timeout: float
    at: float
    #: a region of the same size as ``buf``'s that the daemon may leave an all-reduce's
    #: result in (0: none); see docs/daemon.md, "twin regions"
    twin: int = 0

    def __post_init__(self) -> None:
        if (self.buf is None) != (not self.spec.needs_array):
            raise ProtocolError(f"{self.spec.kind} needs a buffer (and a barrier none)")
        if self.twin < 0 or (self.twin and (self.buf is None or self.twin == self.buf.region)):
            raise ProtocolError(f"bad twin region {self.twin}")
        _timeout(self.timeout, "OP")


@dataclass(frozen=True, slots=True)
class Commit(Request):
    step: int
    ok: bool
    timeout: float
    at: float

    def __post_init__(self) -> None:
        _timeout(self.timeout, "COMMIT")


@dataclass(frozen=True, slots=True)
class Committed:
    committed: bool


@dataclass(frozen=True, slots=True)
class BeginStep(Request):
    step: int | None
    timeout: float
    at: float
    allow_partial: bool = False

    def __post_init__(self) -> None:
        _timeout(self.timeout, "BEGIN_STEP")


@dataclass(frozen=True, slots=True)
class GetView(Request):
    pass


@dataclass(frozen=True, slots=True)
class AttachState(Request):
    """``entries`` become the state; ``step`` the step they hold (None: "hand me
    what you kept, else the group's at the next begin_step")."""

    entries: tuple[NamedBuf, ...]
    step: int | None
    timeout: float
    at: float

    def __post_init__(self) -> None:
        if len({e.name for e in self.entries}) != len(self.entries):
            raise ProtocolError("state entry names must be unique")
        _timeout(self.timeout, "ATTACH_STATE")


@dataclass(frozen=True, slots=True)
class Attached:
    step: int
    source: str  # given, kept, to-receive


@dataclass(frozen=True, slots=True)
class UpdateState(Request):
    step: int
    changed: tuple[str, ...] | None
    timeout: float
    at: float

    def __post_init__(self) -> None:
        _timeout(self.timeout, "UPDATE_STATE")


@dataclass(frozen=True, slots=True)
class Watch(Request):
    """This connection becomes a stream of view EVENTs (the reply: the current view)."""


@dataclass(frozen=True, slots=True)
class Bye(Request):
    """The client closes on purpose (not a crash)."""


@dataclass(frozen=True, slots=True)
class TakeSnapshot(Request):
    entries: tuple[SnapshotArray, ...]
    step: int
    timeout: float
    at: float

    def __post_init__(self) -> None:
        _timeout(self.timeout, "SNAPSHOT")


@dataclass(frozen=True, slots=True)
class SnapshotTaken:
    generation: int
    step: int
    nbytes: int
    stall_s: float
    changes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SnapshotWait(Request):
    generation: int
    timeout: float

    def __post_init__(self) -> None:
        _timeout(self.timeout, "SNAPSHOT_WAIT")


@dataclass(frozen=True, slots=True)
class SealStatus:
    """Not sealed yet (``seal`` None) or sealed."""

    seal: SealResult | None


@dataclass(frozen=True, slots=True)
class Restore(Request):
    member: str | None  # None: this member's own state
    step: int | None
    timeout: float
    at: float

    def __post_init__(self) -> None:
        if self.member is not None and not 0 < len(self.member) <= 128:
            raise ProtocolError("RESTORE: member must be a member id or null")
        _timeout(self.timeout, "RESTORE")


@dataclass(frozen=True, slots=True)
class RestoreLayout:
    """The restored state, laid out in the memfd that travels with this reply."""

    step: int
    size: int
    entries: tuple[RestoredArray, ...]


@dataclass(frozen=True, slots=True)
class Cancel(Request):
    """Sent on a second connection: stop request ``rid`` of ``session`` (this
    process's own), and answer once it can no longer touch the client's memory."""

    session: int
    rid: int


class CancelState(enum.Enum):
    FINISHED = "finished"  # it had already been answered
    STOPPED = "stopped"  # it was running and is over now
    WILL_NOT_RUN = "will-not-run"  # not started yet: it never will
    STILL_RUNNING = "still-running"  # it did not stop in time: memory may still change


@dataclass(frozen=True, slots=True)
class Cancelled:
    state: str

    def __post_init__(self) -> None:
        if self.state not in {s.value for s in CancelState}:
            raise ProtocolError(f"bad cancel state {self.state!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """A view change, pushed to a watching connection."""

    view: ViewInfo


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Row:
    """One request kind: its frame kind, message and reply classes, descriptors, and
    whether it names the client's memory (cancellable)."""

    kind: Kind
    request: type[Request]
    reply: type
    fd_in: bool = False
    fd_out: bool = False
    memory: bool = False


#: every request the daemon serves
REQUESTS: tuple[Row, ...] = (
    Row(Kind.HELLO, ClientHello, Welcome),
    Row(Kind.MAP, Map, Mapped, fd_in=True),
    Row(Kind.UNMAP, Unmap, Done),
    Row(Kind.OP, Op, OpResult, memory=True),
    Row(Kind.COMMIT, Commit, Committed),
    Row(Kind.BEGIN_STEP, BeginStep, StepInfo, memory=True),
    Row(Kind.VIEW, GetView, ViewInfo),
    Row(Kind.ATTACH_STATE, AttachState, Attached, memory=True),
    Row(Kind.UPDATE_STATE, UpdateState, Done),
    Row(Kind.WATCH, Watch, ViewInfo),
    Row(Kind.BYE, Bye, Done),
    Row(Kind.SNAPSHOT, TakeSnapshot, SnapshotTaken, memory=True),
    Row(Kind.SNAPSHOT_WAIT, SnapshotWait, SealStatus),
    Row(Kind.RESTORE, Restore, RestoreLayout, fd_out=True),
    Row(Kind.CANCEL, Cancel, Cancelled),
)

_BY_CLASS: dict[type, Row] = {r.request: r for r in REQUESTS}
_BY_KIND: dict[int, type] = {int(r.kind): r.request for r in REQUESTS}
_BY_KIND.update({REPLY_BASE + int(r.kind): r.reply for r in REQUESTS})
_BY_KIND[int(Kind.ERROR)] = ErrorInfo
_BY_KIND[int(Kind.EVENT)] = Event
_KIND_OF: dict[type, int] = {r.request: int(r.kind) for r in REQUESTS}
_REPLY_KIND: dict[type, int] = {r.request: REPLY_BASE + int(r.kind) for r in REQUESTS}


def row_of(request: Request | type[Request]) -> Row:
    return _BY_CLASS[request if isinstance(request, type) else type(request)]


# ----------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class WireFrame:
    """One decoded frame: its kind, request id, flags, the message, and the file
    descriptor that came with it (set by the receiving side for FLAG_FD frames)."""

    kind: int
    rid: int
    message: Any
    flags: int = 0
    fd: int | None = None


for _cls in _BY_KIND.values():  # compile every schema now: a bad field type fails at import
    schema(_cls)


def encode(message: Any, rid: int, *, reply_to: type[Request] | None = None) -> bytearray:
    """One frame's bytes: a request (its own kind), a reply to a request of class
    ``reply_to``, an :class:`ErrorInfo` (ERROR) or an :class:`Event` (EVENT).
    Raises ProtocolError if the body is too large."""
    cls = type(message)
    if reply_to is not None:
        row = _BY_CLASS[reply_to]
        if not isinstance(message, row.reply):
            raise TypeError(f"{reply_to.__name__} is answered by {row.reply.__name__}")
        kind, flags = REPLY_BASE + int(row.kind), FLAG_FD if row.fd_out else 0
    elif cls is ErrorInfo:
        kind, flags = int(Kind.ERROR), 0
    elif cls is Event:
        kind, flags = int(Kind.EVENT), 0
    else:
        row = _BY_CLASS[cls]
        kind, flags = int(row.kind), FLAG_FD if row.fd_in else 0
    body = bytearray(HEADER.size)
    schema(cls).encode_into(message, body)
    length = len(body) - HEADER.size
    if length > MAX_BODY:
        raise ProtocolError(f"local message of {length} bytes exceeds {MAX_BODY}")
    HEADER.pack_into(body, 0, MAGIC, kind, flags, 0, rid, length)
    return body


def decode(kind: int, body: bytes | memoryview) -> Any:
    """The message of a frame of ``kind`` with ``body`` (whole: trailing bytes are an
    error)."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown frame kind {kind}")
    return decode_body(cls, body if isinstance(body, bytes) else bytes(body))


class Decoder:
    """Incremental frame decoder: ``feed(bytes)`` returns the complete frames so far.
    Anything malformed raises :class:`ProtocolError` (after the good frames before it
    were returned: however the input is cut, the same frames come out); the decoder is
    then poisoned."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buf = bytearray()
        self._max = max_body
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not form a complete frame yet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[WireFrame]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[WireFrame] = []
        try:
            while len(self._buf) >= HEADER.size:
                magic, kind, flags, reserved, rid, length = HEADER.unpack_from(self._buf)
                if magic != MAGIC:
                    raise ProtocolError(f"bad magic {bytes(magic)!r} on the local API socket")
                if kind not in _BY_KIND:
                    raise ProtocolError(f"unknown frame kind {kind}")
                if flags & ~FLAG_FD or reserved:
                    raise ProtocolError(f"bad flags {flags:#x} or reserved field {reserved}")
                if length > self._max:
                    raise ProtocolError(f"frame body of {length} bytes exceeds {self._max}")
                end = HEADER.size + length
                if len(self._buf) < end:
                    break
                body = bytes(self._buf[HEADER.size : end])
                del self._buf[:end]
                message = decode(kind, body)
                out.append(WireFrame(kind, rid, message, flags))
        except ProtocolError as exc:
            self._error = exc
            if not out:
                raise
            # the frames before the bad one are delivered; the error comes next time
        return out

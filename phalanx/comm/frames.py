"""The data-plane frame codec: bytes in, frames (or "need more data") out.

Every message between two ranks is a frame: a fixed 48-byte header followed by
``length`` payload bytes. The header names the protocol version, the frame kind, the
view epoch, the operation sequence number, the frame's ordinal inside that operation on
its link (``chunk``), the payload codec, the payload length and the digest of the
operation's descriptor (``desc``, see ``descriptor.py``), and ends with a CRC-32 of the
header bytes before it, so a corrupted or misaligned header is caught before any of its
fields is trusted.

Header layout (little-endian, 48 bytes)::

    offset size field
    0      4    magic    b"PHLX"
    4      1    version  PROTOCOL_VERSION
    5      1    kind     FrameKind
    6      1    codec    payload codec id (0 = raw); see phalanx.comm.codecs
    7      1    flags    FLAG_RECEIPT or 0 (other bits must be 0)
    8      8    epoch    view epoch the frame belongs to
    16     8    seq      operation sequence number in the group
    24     4    chunk    ordinal of this frame inside the operation on its link
    28     8    length   payload bytes that follow the header
    36     8    desc     DATA: 64-bit digest of the op's descriptor; 0 otherwise
    44     4    crc      zlib.crc32 of bytes 0..43

This module never touches a socket (only ``phalanx.comm.transport`` does) and never
allocates a buffer whose size comes from a length field before that length has been
checked against the configured maximum.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from phalanx.errors import FrameError

__all__ = [
    "FLAG_RECEIPT",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CODEC_ID",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "FrameKind",
    "decode_header",
    "encode_frame",
    "encode_header",
]

MAGIC = b"PHLX"
#: 2: the RECEIPT frame kind and flag (zero-copy sends)
#: 3: the ``desc`` header field and the MISMATCH kind (op descriptors); header 40 -> 48
#: bytes. Peers of another version are refused at their first frame (the handshake).
#: 4: frames unchanged; the state sync that runs over them sends manifest version 2
#: (each entry's CRC-32 checks its bytes: phalanx/membership/statesync.py). A peer of
#: version 3 sends and expects version 1: refused at the handshake, before any sync
PROTOCOL_VERSION = 4
#: on a DATA frame: the sender handed the payload's pages to the kernel (no copy) and
#: may reuse that memory only after a RECEIPT for the operation from this receiver
FLAG_RECEIPT = 0x01
_KNOWN_FLAGS = FLAG_RECEIPT
HEADER_SIZE = 48
#: Highest payload codec id a peer of this version may use (see codecs.py).
MAX_CODEC_ID = 4

_PREFIX = struct.Struct("<4sBBBBQQIQQ")  # everything but the crc: 44 bytes
_CRC = struct.Struct("<I")
assert _PREFIX.size + _CRC.size == HEADER_SIZE


class FrameKind(enum.IntEnum):
    """What a frame is. Handshake kinds come first on a new connection only."""

    HELLO = 1  # connector -> acceptor: who I am, who I want, my nonce
    CHALLENGE = 2  # acceptor -> connector: acceptor's nonce and proof of the secret
    PROOF = 3  # connector -> acceptor: connector's proof of the secret
    WELCOME = 4  # acceptor -> connector: link established
    REJECT = 5  # either side: refusal with a reason code, then close
    DATA = 16  # a piece of a collective's payload
    ABORT = 17  # the sender abandons operation `seq`; payload names reason and suspects
    PING = 18  # liveness probe; answered with PONG carrying the same seq/chunk
    PONG = 19
    BYE = 20  # the sender is closing the link on purpose
    RECEIPT = 21  # the sender finished operation `seq`: it has read every frame of it
    MISMATCH = 22  # ranks disagree on operation `seq`; payload: the sender's descriptor


_KINDS = frozenset(int(k) for k in FrameKind)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    kind: FrameKind
    epoch: int
    seq: int
    chunk: int
    length: int
    codec: int = 0
    flags: int = 0
    desc: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < 2**64:
            raise ValueError(f"epoch out of range: {self.epoch}")
        if not 0 <= self.seq < 2**64:
            raise ValueError(f"seq out of range: {self.seq}")
        if not 0 <= self.chunk < 2**32:
            raise ValueError(f"chunk out of range: {self.chunk}")
        if not 0 <= self.length < 2**64:
            raise ValueError(f"length out of range: {self.length}")
        if not 0 <= self.codec <= MAX_CODEC_ID:
            raise ValueError(f"codec id out of range: {self.codec}")
        if self.flags & ~_KNOWN_FLAGS:
            raise ValueError(f"unknown flags {self.flags:#x}")
        if not 0 <= self.desc < 2**64:
            raise ValueError(f"desc out of range: {self.desc}")


@dataclass(frozen=True, slots=True)
class Frame:
    header: FrameHeader
    payload: bytes


def encode_header(
    kind: FrameKind,
    *,
    epoch: int,
    seq: int,
    chunk: int,
    length: int,
    codec: int = 0,
    flags: int = 0,
    desc: int = 0,
) -> bytes:
    """The 48 header bytes of a frame; the payload is sent separately (zero copy)."""
    prefix = _PREFIX.pack(
        MAGIC, PROTOCOL_VERSION, kind, codec, flags, epoch, seq, chunk, length, desc
    )
    return prefix + _CRC.pack(zlib.crc32(prefix))


def encode_frame(header: FrameHeader, payload: bytes = b"") -> bytes:
    """A whole frame as one bytes object (for control frames and tests)."""
    if len(payload) != header.length:
        raise ValueError(f"payload is {len(payload)} bytes, header says {header.length}")
    head = encode_header(
        header.kind,
        epoch=header.epoch,
        seq=header.seq,
        chunk=header.chunk,
        length=header.length,
        codec=header.codec,
        flags=header.flags,
        desc=header.desc,
    )
    return head + payload


def decode_header(data: bytes | bytearray | memoryview, max_payload: int) -> FrameHeader:
    """Parse and validate exactly one header from the first 48 bytes of ``data``.

    Raises :class:`FrameError` with a stable ``reason``: ``short``, ``bad-magic``,
    ``bad-version``, ``bad-crc``, ``bad-kind``, ``bad-codec``, ``bad-flags`` or
    ``too-large`` (length above ``max_payload``).
    """
    if len(data) < HEADER_SIZE:
        raise FrameError("short", f"{len(data)} of {HEADER_SIZE} header bytes")
    magic, version, kind, codec, flags, epoch, seq, chunk, length, desc = _PREFIX.unpack_from(
        data, 0
    )
    if magic != MAGIC:
        raise FrameError("bad-magic", f"got {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise FrameError(
            "bad-version", f"peer speaks version {version}, we speak {PROTOCOL_VERSION}"
        )
    (crc,) = _CRC.unpack_from(data, _PREFIX.size)
    if crc != zlib.crc32(memoryview(data)[: _PREFIX.size]):
        raise FrameError("bad-crc", "header checksum mismatch")
    if kind not in _KINDS:
        raise FrameError("bad-kind", f"unknown frame kind {kind}")
    if codec > MAX_CODEC_ID:
        raise FrameError("bad-codec", f"unknown codec id {codec}")
    if flags & ~_KNOWN_FLAGS:
        raise FrameError("bad-flags", f"flags {flags:#x}")
    if length > max_payload:
        raise FrameError(
            "too-large", f"payload of {length} bytes exceeds the limit of {max_payload}"
        )
    return FrameHeader(FrameKind(kind), epoch, seq, chunk, length, codec, flags, desc)


class FrameDecoder:
    """The data plane's one frame decoder: a state machine over header, destination,
    payload, with two ways in.

    *Copying* (tests, fuzzing, small readers): ``feed(bytes)`` then ``next_frame()``,
    which returns a :class:`Frame` or ``None`` when more data is needed.

    *Zero-copy* (the engine's channels, the handshake): the caller ``recv_into``s
    :meth:`window` and reports the count to :meth:`advance`. Once a header is in
    (:attr:`header` set, :attr:`needs_dest` true) the caller chooses where the payload
    goes with :meth:`place` — the plan's own buffer, so payload bytes land where they
    belong without a copy — or leaves the frame parked until it knows. When the frame
    is complete (:attr:`complete`), :meth:`pop` returns it and the decoder starts on
    the next header.

    A header is validated as soon as its HEADER_SIZE bytes are in, so an oversized length is
    refused before a single payload byte is read; the copying side allocates a
    payload buffer only once all of its bytes have arrived. After an error the decoder
    is poisoned: the stream cannot be resynchronised and must be closed.
    """

    __slots__ = ("_buf", "_dest", "_error", "_got", "_hdr", "_hdr_view", "_max_payload", "header")

    def __init__(self, max_payload: int) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must be >= 0")
        self._max_payload = max_payload
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._got = 0  # bytes of the current header (no header yet) or payload
        #: the current frame's header once its HEADER_SIZE bytes are in (None before)
        self.header: FrameHeader | None = None
        self._dest: memoryview | None = None
        self._error: FrameError | None = None
        self._buf = bytearray()  # the copying side's unread bytes

    # -- zero-copy side -------------------------------------------------------------
    @property
    def needs_dest(self) -> bool:
        """A header is in and no payload destination has been placed yet."""
        return self.header is not None and self._dest is None

    @property
    def in_payload(self) -> bool:
        """A payload destination is placed and the frame is not popped yet (part of
        its payload may be in)."""
        return self._dest is not None

    @property
    def complete(self) -> bool:
        """The current frame is whole: :meth:`pop` it."""
        return self._dest is not None and self.header is not None and self._got == len(self._dest)

    def window(self) -> memoryview:
        """Where the next received bytes go: the rest of the header, or the rest of the
        placed payload destination. Never empty while neither :attr:`needs_dest` nor
        :attr:`complete` holds."""
        if self._error is not None:
            raise self._error
        if self.header is None:
            return self._hdr_view[self._got :]
        if self._dest is None:
            raise RuntimeError("the frame has no payload destination yet (place() it)")
        return self._dest[self._got :]

    def advance(self, n: int) -> None:
        """``n`` bytes were written into :meth:`window`. Raises :class:`FrameError` on a
        bad header (the decoder is poisoned from then on)."""
        self._got += n
        if self.header is None and self._got == HEADER_SIZE:
            try:
                self.header = decode_header(self._hdr, self._max_payload)
            except FrameError as exc:
                self._error = exc
                raise
            self._got = 0

    def place(self, dest: memoryview) -> None:
        """Receive the current frame's payload into ``dest`` (exactly its length)."""
        header = self.header
        if header is None or self._dest is not None:
            raise RuntimeError("no frame is waiting for a payload destination")
        if len(dest) != header.length:
            raise FrameError("bad-payload", "receive buffer does not match the frame length")
        self._dest = dest

    def pop(self) -> tuple[FrameHeader, memoryview]:
        """The complete frame (header, payload view); the decoder moves on."""
        header, dest = self.header, self._dest
        if header is None or dest is None or self._got != len(dest):
            raise RuntimeError("no complete frame")
        self.header = None
        self._dest = None
        self._got = 0
        return header, dest

    # -- copying side ---------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as part of a frame (a parsed header's 40
        bytes no longer count)."""
        pending = self._got if self.header is None else 0
        return len(self._buf) + pending

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self.header is None:
            take = min(HEADER_SIZE - self._got, len(buf))
            self._hdr_view[self._got : self._got + take] = buf[:take]
            del buf[:take]
            self.advance(take)
            if self.header is None:
                return None
        header = self.header
        if len(buf) < header.length:
            return None  # allocate nothing until the whole payload is here
        payload = bytes(buf[: header.length])
        del buf[: header.length]
        self.place(memoryview(payload))
        self._got = header.length
        self.pop()
        return Frame(header, payload)

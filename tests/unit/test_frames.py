"""The frame codec, sans-IO: exact round trips, the header layout on the wire, one
stable reason per refusal, and a decoder that is tested whole, byte by byte, at any
split point and with trailing bytes, that refuses an oversized length before it
allocates anything for it, and that stays poisoned after an error."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.comm.frames import (
    FLAG_RECEIPT,
    HEADER_SIZE,
    MAGIC,
    MAX_CODEC_ID,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameHeader,
    FrameKind,
    decode_header,
    encode_frame,
    encode_header,
)
from phalanx.errors import FrameError, ProtocolError

U64 = 2**64 - 1
U32 = 2**32 - 1

# The layout of the module docstring, written out independently of the module.
_LAYOUT = struct.Struct("<4sBBBBQQIQQ")


def raw_header(
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    kind: int = FrameKind.DATA,
    codec: int = 0,
    flags: int = 0,
    epoch: int = 0,
    seq: int = 0,
    chunk: int = 0,
    length: int = 0,
    desc: int = 0,
    crc: int | None = None,
) -> bytes:
    """A header with any field values, with a correct CRC unless ``crc`` is given."""
    prefix = _LAYOUT.pack(magic, version, kind, codec, flags, epoch, seq, chunk, length, desc)
    return prefix + struct.pack("<I", zlib.crc32(prefix) if crc is None else crc)


def frame_bytes(header: FrameHeader, payload: bytes) -> bytes:
    return encode_frame(header, payload)


def make_frame(
    kind: FrameKind = FrameKind.DATA,
    payload: bytes = b"",
    *,
    epoch: int = 3,
    seq: int = 7,
    chunk: int = 1,
    codec: int = 0,
    desc: int = 0,
) -> Frame:
    return Frame(FrameHeader(kind, epoch, seq, chunk, len(payload), codec, 0, desc), payload)


def drain(decoder: FrameDecoder) -> list[Frame]:
    out: list[Frame] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


# --------------------------------------------------------------------------- strategies

kinds = st.sampled_from(list(FrameKind))


@st.composite
def frames(draw: st.DrawFn, max_len: int = 64) -> Frame:
    payload = draw(st.binary(max_size=max_len))
    header = FrameHeader(
        kind=draw(kinds),
        epoch=draw(st.integers(0, U64)),
        seq=draw(st.integers(0, U64)),
        chunk=draw(st.integers(0, U32)),
        length=len(payload),
        codec=draw(st.integers(0, MAX_CODEC_ID)),
        desc=draw(st.integers(0, U64)),
    )
    return Frame(header, payload)


# --------------------------------------------------------------------------- encoding


def test_header_is_forty_eight_bytes_in_the_documented_layout() -> None:
    head = encode_header(
        FrameKind.PING, epoch=U64, seq=2**63, chunk=U32, length=12345, codec=3, desc=U64 - 1
    )
    assert len(head) == HEADER_SIZE == 48
    assert PROTOCOL_VERSION == 4
    magic, version, kind, codec, flags, epoch, seq, chunk, length, desc = _LAYOUT.unpack_from(head)
    assert (magic, version, kind, codec, flags) == (b"PHLX", PROTOCOL_VERSION, 18, 3, 0)
    assert (epoch, seq, chunk, length, desc) == (U64, 2**63, U32, 12345, U64 - 1)
    assert struct.unpack_from("<I", head, 44)[0] == zlib.crc32(head[:44])


def test_a_version_3_peer_is_refused_by_version() -> None:
    """Version 3 frames are laid out as ours; its state sync's manifest is not (v1,
    without the CRC-32s): a mixed group is refused at the handshake, not at a sync."""
    with pytest.raises(FrameError) as info:
        decode_header(raw_header(version=3, kind=FrameKind.HELLO, length=48), max_payload=512)
    assert info.value.reason == "bad-version"
    assert "version 3" in str(info.value)


def test_a_version_2_peer_is_refused_by_version_not_misread() -> None:
    # Version 2 headers were 40 bytes (no desc); with its payload behind it a v2 HELLO
    # fills our 48 bytes, and the version byte (same offset) refuses it.
    v2 = struct.Struct("<4sBBBBQQIQ").pack(MAGIC, 2, FrameKind.HELLO, 0, 0, 0, 0, 0, 48)
    v2 += struct.pack("<I", zlib.crc32(v2)) + bytes(48)
    with pytest.raises(FrameError) as info:
        decode_header(v2, max_payload=512)
    assert info.value.reason == "bad-version"


def test_the_descriptor_digest_round_trips_and_defaults_to_zero() -> None:
    head = encode_header(FrameKind.DATA, epoch=1, seq=2, chunk=3, length=0, desc=0xDEADBEEF)
    assert decode_header(head, max_payload=0).desc == 0xDEADBEEF
    assert decode_header(raw_header(), max_payload=0).desc == 0
    assert decode_header(raw_header(kind=FrameKind.MISMATCH), max_payload=0).kind == 22
    with pytest.raises(ValueError, match="desc"):
        FrameHeader(FrameKind.DATA, 0, 0, 0, 0, desc=2**64)


@pytest.mark.parametrize("kind", list(FrameKind), ids=lambda k: k.name)
def test_every_kind_round_trips(kind: FrameKind) -> None:
    payload = bytes(range(256)) * 3
    frame = make_frame(kind, payload, epoch=11, seq=12, chunk=13, codec=MAX_CODEC_ID)
    data = frame_bytes(frame.header, payload)
    assert len(data) == HEADER_SIZE + len(payload)
    header = decode_header(data, max_payload=len(payload))
    assert header == frame.header
    assert type(header.kind) is FrameKind
    decoder = FrameDecoder(max_payload=len(payload))
    decoder.feed(data)
    assert drain(decoder) == [frame]
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("epoch", "seq", "chunk", "length"),
    [
        (0, 0, 0, 0),
        (U64, U64, U32, 0),
        (1, U64, 0, 1),
        (U64, 0, U32, 70000),
        (2**32, 2**32, 2**31, 3),
    ],
)
def test_field_extremes_round_trip(epoch: int, seq: int, chunk: int, length: int) -> None:
    payload = bytes([0xA5]) * length
    header = FrameHeader(FrameKind.DATA, epoch, seq, chunk, length)
    assert decode_header(encode_frame(header, payload), max_payload=length) == header


def test_header_length_extremes_decode_when_allowed() -> None:
    # A length of 2**64-1 is a legal field value; only max_payload refuses it.
    head = encode_header(FrameKind.DATA, epoch=0, seq=0, chunk=0, length=U64)
    assert decode_header(head, max_payload=U64).length == U64


@settings(max_examples=150, deadline=None)
@given(frames(max_len=300))
def test_round_trip_any_fields(frame: Frame) -> None:
    data = encode_frame(frame.header, frame.payload)
    assert decode_header(data, max_payload=len(frame.payload)) == frame.header
    assert data[HEADER_SIZE:] == frame.payload
    decoder = FrameDecoder(max_payload=300)
    decoder.feed(data)
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None


def test_encode_frame_refuses_a_payload_of_the_wrong_length() -> None:
    header = FrameHeader(FrameKind.DATA, 0, 0, 0, 4)
    with pytest.raises(ValueError, match="header says 4"):
        encode_frame(header, b"abc")
    with pytest.raises(ValueError):
        encode_frame(header, b"abcde")
    with pytest.raises(ValueError):
        encode_frame(FrameHeader(FrameKind.DATA, 0, 0, 0, 0), b"x")


def test_decode_header_accepts_any_buffer_type_and_ignores_what_follows() -> None:
    data = encode_frame(FrameHeader(FrameKind.PONG, 1, 2, 3, 4), b"abcd") + b"trailing"
    expected = FrameHeader(FrameKind.PONG, 1, 2, 3, 4)
    for buf in (data, bytearray(data), memoryview(data), data[:HEADER_SIZE]):
        assert decode_header(buf, max_payload=4) == expected


# --------------------------------------------------------------------------- FrameHeader


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("epoch", -1),
        ("epoch", 2**64),
        ("seq", -1),
        ("seq", 2**64),
        ("chunk", -1),
        ("chunk", 2**32),
        ("length", -1),
        ("length", 2**64),
        ("codec", -1),
        ("codec", MAX_CODEC_ID + 1),
        ("flags", 2),
        ("flags", -1),
    ],
)
def test_frame_header_constructor_refuses_out_of_range_fields(field: str, bad: int) -> None:
    fields: dict[str, int] = {"epoch": 0, "seq": 0, "chunk": 0, "length": 0, "codec": 0, "flags": 0}
    FrameHeader(FrameKind.DATA, **fields)  # the baseline is valid
    fields[field] = bad
    with pytest.raises(ValueError, match=field):
        FrameHeader(FrameKind.DATA, **fields)


def test_frame_header_is_frozen() -> None:
    header = FrameHeader(FrameKind.DATA, 0, 0, 0, 0)
    with pytest.raises(AttributeError):
        header.epoch = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- decode_header


@pytest.mark.parametrize("n", [0, 1, 4, 39])
def test_short_header(n: int) -> None:
    data = encode_header(FrameKind.DATA, epoch=0, seq=0, chunk=0, length=0)[:n]
    with pytest.raises(FrameError) as info:
        decode_header(data, max_payload=10)
    assert info.value.reason == "short"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"magic": b"PHLY"}, "bad-magic"),
        ({"magic": b"\0\0\0\0"}, "bad-magic"),
        ({"magic": b"GET "}, "bad-magic"),
        ({"version": 0}, "bad-version"),
        ({"version": PROTOCOL_VERSION + 1}, "bad-version"),
        ({"version": 255}, "bad-version"),
        ({"kind": 0}, "bad-kind"),
        ({"kind": 6}, "bad-kind"),
        ({"kind": 15}, "bad-kind"),
        ({"kind": 23}, "bad-kind"),
        ({"kind": 255}, "bad-kind"),
        ({"codec": MAX_CODEC_ID + 1}, "bad-codec"),
        ({"codec": 255}, "bad-codec"),
        ({"flags": 2}, "bad-flags"),
        ({"flags": 0x80}, "bad-flags"),
        ({"length": 11}, "too-large"),
        ({"length": 2**40}, "too-large"),
        ({"length": U64}, "too-large"),
    ],
)
def test_decode_header_reasons(fields: dict[str, int | bytes], reason: str) -> None:
    data = raw_header(**fields)  # type: ignore[arg-type]
    with pytest.raises(FrameError) as info:
        decode_header(data, max_payload=10)
    assert info.value.reason == reason
    assert isinstance(info.value, ProtocolError)


def test_length_equal_to_the_limit_is_accepted_and_one_more_is_not() -> None:
    assert decode_header(raw_header(length=10), max_payload=10).length == 10
    with pytest.raises(FrameError, match="too-large"):
        decode_header(raw_header(length=11), max_payload=10)
    assert decode_header(raw_header(length=0), max_payload=0).length == 0
    with pytest.raises(FrameError, match="too-large"):
        decode_header(raw_header(length=1), max_payload=0)


def test_wrong_crc_is_refused() -> None:
    good = raw_header(epoch=5, length=3)
    crc = struct.unpack_from("<I", good, 44)[0]
    for bad in (crc ^ 1, crc ^ 0x80000000, 0, U32):
        if bad == crc:
            continue
        with pytest.raises(FrameError) as info:
            decode_header(raw_header(epoch=5, length=3, crc=bad), max_payload=10)
        assert info.value.reason == "bad-crc"


_HEADER_REASONS = {"bad-magic", "bad-version", "bad-crc"}


@pytest.mark.parametrize("position", range(HEADER_SIZE))
def test_any_corrupted_header_byte_is_refused(position: int) -> None:
    good = encode_header(FrameKind.DATA, epoch=9, seq=8, chunk=7, length=6, codec=1)
    decode_header(good, max_payload=6)
    for mask in (0xFF, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x5A):
        data = bytearray(good)
        data[position] ^= mask
        with pytest.raises(FrameError) as info:
            decode_header(data, max_payload=6)
        # Before its CRC is checked, no field past the version is trusted.
        assert info.value.reason in _HEADER_REASONS, (position, mask, info.value.reason)


def test_a_misaligned_stream_is_refused_at_every_offset() -> None:
    stream = b"".join(
        encode_frame(FrameHeader(FrameKind.DATA, 1, i, i, 5), bytes([i]) * 5) for i in range(3)
    )
    for offset in range(1, 2 * (HEADER_SIZE + 5)):
        if offset % (HEADER_SIZE + 5) == 0:
            continue
        with pytest.raises(FrameError):
            decode_header(stream[offset:], max_payload=5)


# --------------------------------------------------------------------------- no allocation


@pytest.mark.parametrize("length", [2**40, U64, 2**31])
def test_an_oversized_length_is_refused_before_anything_is_allocated(length: int) -> None:
    head = encode_header(FrameKind.DATA, epoch=1, seq=2, chunk=3, length=length, desc=U64)
    decoder = FrameDecoder(max_payload=1024)
    tracemalloc.start()
    try:
        decoder.feed(head)
        with pytest.raises(FrameError) as info:
            decoder.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too-large"
    assert decoder.buffered == HEADER_SIZE
    assert peak < 64 * 1024, f"decoding a 48-byte header allocated {peak} bytes"


def test_a_header_is_checked_before_a_single_payload_byte_is_buffered() -> None:
    # The refusal comes on the header alone: the payload need not (and cannot) arrive.
    decoder = FrameDecoder(max_payload=100)
    decoder.feed(raw_header(length=101))
    with pytest.raises(FrameError, match="too-large"):
        decoder.next_frame()


def test_a_large_allowed_payload_is_not_preallocated() -> None:
    # max_payload is generous; only the bytes actually received may be held.
    decoder = FrameDecoder(max_payload=2**40)
    head = encode_header(FrameKind.DATA, epoch=0, seq=0, chunk=0, length=2**39)
    tracemalloc.start()
    try:
        decoder.feed(head + b"x" * 100)
        assert decoder.next_frame() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert decoder.buffered == 100


# --------------------------------------------------------------------------- FrameDecoder

STREAM_FRAMES = [
    make_frame(FrameKind.DATA, b"hello world", seq=1, chunk=0),
    make_frame(FrameKind.PING, b"", seq=2, chunk=5),
    make_frame(FrameKind.DATA, bytes(range(256)), seq=3, chunk=1, codec=2),
    make_frame(FrameKind.ABORT, b"\x00", seq=U64, chunk=U32),
    make_frame(FrameKind.BYE),
]
STREAM = b"".join(encode_frame(f.header, f.payload) for f in STREAM_FRAMES)


def test_whole_stream_at_once() -> None:
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(STREAM)
    assert drain(decoder) == STREAM_FRAMES
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


def test_one_byte_at_a_time() -> None:
    decoder = FrameDecoder(max_payload=256)
    got: list[Frame] = []
    ends = set()
    end = 0
    for f in STREAM_FRAMES:
        end += HEADER_SIZE + len(f.payload)
        ends.add(end)
    for i in range(len(STREAM)):
        decoder.feed(STREAM[i : i + 1])
        new = drain(decoder)
        # A frame comes out exactly when its last byte is in, never earlier.
        assert len(new) == (1 if i + 1 in ends else 0), i
        got.extend(new)
    assert got == STREAM_FRAMES
    assert decoder.buffered == 0


def test_empty_feeds_change_nothing() -> None:
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(b"")
    assert decoder.next_frame() is None
    decoder.feed(STREAM[:50])
    decoder.feed(bytearray())
    decoder.feed(memoryview(b""))
    assert decoder.next_frame() is None
    decoder.feed(memoryview(STREAM)[50:])
    assert drain(decoder) == STREAM_FRAMES


@pytest.mark.parametrize(
    "trailing", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 3], ids=lambda n: f"{n}B"
)
def test_trailing_bytes_are_kept_for_the_next_frame(trailing: int) -> None:
    nxt = make_frame(FrameKind.DATA, b"0123456789", seq=99)
    nxt_bytes = encode_frame(nxt.header, nxt.payload)
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(STREAM + nxt_bytes[:trailing])
    assert drain(decoder) == STREAM_FRAMES
    # Once a whole header is in it is parsed and leaves the buffer; payload bytes stay.
    assert decoder.buffered == (trailing if trailing < HEADER_SIZE else trailing - HEADER_SIZE)
    assert decoder.next_frame() is None
    decoder.feed(nxt_bytes[trailing:])
    assert decoder.next_frame() == nxt
    assert decoder.buffered == 0


@settings(max_examples=120, deadline=None)
@given(
    st.lists(frames(max_len=80), min_size=1, max_size=6),
    st.lists(st.integers(0, 2000), max_size=12),
)
def test_any_split_points(frame_list: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode_frame(f.header, f.payload) for f in frame_list)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder = FrameDecoder(max_payload=80)
    got: list[Frame] = []
    for a, b in itertools.pairwise(points):
        decoder.feed(data[a:b])
        got.extend(drain(decoder))
    assert got == frame_list
    assert decoder.buffered == 0


def test_payload_is_an_independent_bytes_object() -> None:
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(STREAM)
    first = decoder.next_frame()
    assert first is not None
    rest = drain(decoder)
    assert type(first.payload) is bytes
    assert first.payload == b"hello world"
    assert rest == STREAM_FRAMES[1:]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"XXXX" + bytes(44), "bad-magic"),
        (raw_header(version=PROTOCOL_VERSION + 1), "bad-version"),
        (raw_header(version=1), "bad-version"),  # before RECEIPT: refused, not misread
        (raw_header(version=2), "bad-version"),  # 40-byte headers, no descriptor
        (raw_header(crc=0), "bad-crc"),
        (raw_header(kind=99), "bad-kind"),
        (raw_header(length=2**40), "too-large"),
    ],
)
def test_decoder_is_poisoned_after_an_error(bad: bytes, reason: str) -> None:
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(STREAM[: HEADER_SIZE + 11] + bad + STREAM)
    first = decoder.next_frame()
    assert first == STREAM_FRAMES[0]
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.reason == reason
    error = info.value
    # Every later use raises the same error: the stream cannot be resynchronised.
    for _ in range(2):
        with pytest.raises(FrameError) as again:
            decoder.next_frame()
        assert again.value is error
        with pytest.raises(FrameError) as again:
            decoder.feed(STREAM)
        assert again.value is error


def test_decoder_error_at_the_start_of_a_stream() -> None:
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(b"\0" * (HEADER_SIZE - 1))
    assert decoder.next_frame() is None  # not enough for a header yet: no verdict
    decoder.feed(b"\0")
    with pytest.raises(FrameError, match="bad-magic"):
        decoder.next_frame()


def test_decoder_with_zero_max_payload_takes_only_empty_frames() -> None:
    decoder = FrameDecoder(max_payload=0)
    empty = encode_frame(FrameHeader(FrameKind.PING, 0, 1, 2, 0))
    decoder.feed(empty * 3)
    assert len(drain(decoder)) == 3
    decoder.feed(raw_header(length=1) + b"x")
    with pytest.raises(FrameError, match="too-large"):
        decoder.next_frame()


def test_decoder_refuses_a_negative_limit() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_payload=-1)
    FrameDecoder(max_payload=0)


def test_the_receipt_flag_and_kind_round_trip() -> None:
    head = encode_header(FrameKind.DATA, epoch=3, seq=9, chunk=1, length=8, flags=FLAG_RECEIPT)
    header = decode_header(head, 64)
    assert header.flags == FLAG_RECEIPT and header.kind is FrameKind.DATA
    receipt = decode_header(encode_header(FrameKind.RECEIPT, epoch=3, seq=9, chunk=0, length=0), 64)
    assert receipt.kind is FrameKind.RECEIPT and receipt.seq == 9 and receipt.flags == 0

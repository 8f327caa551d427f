"""Fuzz target for the frame decoder: arbitrary bytes, and valid streams with
mutations, fed to :class:`FrameDecoder` in random chunkings — through its copying side
(``feed``/``next_frame``) and through the zero-copy side the engine's channels and the
handshake use (``window``/``advance``/``place``/``pop``, bytes arriving in random
``recv`` sizes); both sides must return the same frames and fail the same way.

The decoder may only ever (a) return frames whose re-encoding is exactly the bytes it
consumed, (b) return ``None`` while it needs more data, or (c) raise
:class:`FrameError` - never another exception - and it never allocates more than the
bytes it was given plus one frame of at most ``max_payload`` (a length field alone
allocates nothing).

Runs under pytest with hypothesis. With atheris installed it is also a coverage-guided
target: ``python tests/fuzz/test_frames_fuzz.py [atheris/libFuzzer flags]``.
"""

from __future__ import annotations

import importlib
import itertools
import sys
import tracemalloc
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.comm.frames import (
    HEADER_SIZE,
    MAX_CODEC_ID,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameHeader,
    FrameKind,
    encode_frame,
    encode_header,
)
from phalanx.errors import FrameError

#: Bytes that Python objects and tracemalloc bookkeeping may cost beyond the data.
_SLACK = 32 * 1024


def check_stream(data: bytes, cuts: Sequence[int], max_payload: int) -> list[Frame]:
    """Feed ``data`` cut at ``cuts``; assert the decoder's contract; return its frames.

    Raises AssertionError on a contract violation; any exception other than
    FrameError escapes as itself (a bug).
    """
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder = FrameDecoder(max_payload=max_payload)
    got: list[Frame] = []
    error: FrameError | None = None
    tracemalloc.start()
    try:
        for a, b in itertools.pairwise(points):
            decoder.feed(data[a:b])
            while (frame := decoder.next_frame()) is not None:
                assert frame.header.length == len(frame.payload) <= max_payload
                got.append(frame)
    except FrameError as exc:
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    # Allocation: the input held once or twice while buffers grow, plus one frame's
    # payload copied out; nothing that a length field asks for on its own.
    biggest = max((len(f.payload) for f in got), default=0)
    budget = 2 * len(data) + 2 * min(max_payload + HEADER_SIZE, len(data)) + _SLACK
    assert peak <= budget, f"peak {peak} B > {budget} B for {len(data)} B of input"
    assert biggest <= max_payload

    # Frames re-encode to exactly the prefix of the input they were decoded from.
    encoded = b"".join(encode_frame(f.header, f.payload) for f in got)
    assert data.startswith(encoded)
    if error is None:
        # What was not returned is still there: buffered, or a parsed pending header.
        rest = len(data) - len(encoded)
        assert decoder.buffered in (rest, rest - HEADER_SIZE)
        assert rest == 0 or decoder.next_frame() is None
    else:
        # Poisoned: every later call raises the same error.
        try:
            decoder.next_frame()
        except FrameError as again:
            assert again is error
        else:
            raise AssertionError("decoder not poisoned after an error")
    return got


def check_stream_zero_copy(data: bytes, cuts: Sequence[int], max_payload: int) -> None:
    """The zero-copy side on the same input: ``recv`` sizes from ``cuts``; payloads
    land in exact-size buffers the caller places. Same frames (and same error) as the
    copying side."""
    decoder = FrameDecoder(max_payload=max_payload)
    sizes = [1 + c % 97 for c in cuts] or [4096]
    got: list[Frame] = []
    pos, i = 0, 0
    error: FrameError | None = None
    try:
        while True:
            if decoder.needs_dest:
                assert decoder.header is not None
                if decoder.header.length > len(data) - pos:
                    break  # the caller would wait for a payload that never comes
                decoder.place(memoryview(bytearray(decoder.header.length)))
            if decoder.complete:
                header, payload = decoder.pop()
                got.append(Frame(header, bytes(payload)))
                continue
            if pos == len(data):
                break
            window = decoder.window()
            n = min(len(window), sizes[i % len(sizes)], len(data) - pos)
            i += 1
            window[:n] = data[pos : pos + n]
            pos += n
            decoder.advance(n)
    except FrameError as exc:
        error = exc
    copying = FrameDecoder(max_payload=max_payload)
    copying.feed(data)
    expected: list[Frame] = []
    expected_error: FrameError | None = None
    try:
        while (frame := copying.next_frame()) is not None:
            expected.append(frame)
    except FrameError as exc:
        expected_error = exc
    assert got == expected
    assert (error is None) == (expected_error is None)
    if error is not None and expected_error is not None:
        assert error.reason == expected_error.reason


# --------------------------------------------------------------------------- strategies


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    payload = draw(st.binary(max_size=48))
    header = FrameHeader(
        kind=draw(st.sampled_from(list(FrameKind))),
        epoch=draw(st.integers(0, 2**64 - 1)),
        seq=draw(st.integers(0, 2**64 - 1)),
        chunk=draw(st.integers(0, 2**32 - 1)),
        length=len(payload),
        codec=draw(st.integers(0, MAX_CODEC_ID)),
        desc=draw(st.integers(0, 2**64 - 1)),
    )
    return Frame(header, payload)


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid stream, maybe with lying length fields, then a few byte mutations."""
    frame_list = draw(st.lists(valid_frames(), min_size=1, max_size=5))
    pieces = [encode_frame(f.header, f.payload) for f in frame_list]
    # A header whose length field lies, with a *valid* CRC: only the limit (or the
    # end of the data) stops it, and nothing may be allocated for it up front.
    for i in draw(st.lists(st.integers(0, len(pieces) - 1), max_size=2)):
        h = frame_list[i].header
        length = draw(st.sampled_from([49, 2**16, 2**20, 2**31, 2**40, 2**63, 2**64 - 1]))
        head = encode_header(
            h.kind,
            epoch=h.epoch,
            seq=h.seq,
            chunk=h.chunk,
            length=length,
            codec=h.codec,
            desc=h.desc,
        )
        pieces[i] = head + pieces[i][HEADER_SIZE:]
    data = bytearray(b"".join(pieces))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


cuts = st.lists(st.integers(0, 4096), max_size=10)
limits = st.sampled_from([0, 16, 48, 4096, 2**40])

_FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- tests


@_FUZZ
@given(st.binary(max_size=600), cuts, limits)
def test_arbitrary_bytes(data: bytes, cut_list: list[int], max_payload: int) -> None:
    check_stream(data, cut_list, max_payload)


@_FUZZ
@given(st.binary(min_size=HEADER_SIZE, max_size=200), cuts, limits)
def test_arbitrary_bytes_behind_a_real_magic(
    data: bytes, cut_list: list[int], max_payload: int
) -> None:
    # Random bytes rarely start with b"PHLX" and our version; make the fuzzer reach
    # the later checks (the CRC, then the fields).
    check_stream(b"PHLX" + bytes([PROTOCOL_VERSION]) + data, cut_list, max_payload)


@_FUZZ
@given(mutated_streams(), cuts, limits)
def test_mutated_valid_streams(data: bytes, cut_list: list[int], max_payload: int) -> None:
    check_stream(data, cut_list, max_payload)


@_FUZZ
@given(mutated_streams(), cuts, limits)
def test_zero_copy_side_agrees_with_the_copying_side(
    data: bytes, cut_list: list[int], max_payload: int
) -> None:
    check_stream_zero_copy(data, cut_list, max_payload)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(valid_frames(), max_size=3),
    valid_frames(),
    st.integers(49, 2**40),
    st.binary(max_size=100),
    cuts,
)
def test_an_allowed_but_unfulfilled_length_allocates_nothing(
    before: list[Frame], lying: Frame, length: int, tail: bytes, cut_list: list[int]
) -> None:
    # The limit is huge, so the lying header is accepted; the payload never arrives
    # in full, and the decoder may hold only what it received.
    h = lying.header
    head = encode_header(h.kind, epoch=h.epoch, seq=h.seq, chunk=h.chunk, length=length)
    data = b"".join(encode_frame(f.header, f.payload) for f in before) + head + tail
    assert check_stream(data, cut_list, max_payload=2**40) == before


@settings(max_examples=100, deadline=None)
@given(st.lists(valid_frames(), min_size=1, max_size=5), cuts)
def test_unmutated_streams_decode_completely(frame_list: list[Frame], cut_list: list[int]) -> None:
    data = b"".join(encode_frame(f.header, f.payload) for f in frame_list)
    assert check_stream(data, cut_list, max_payload=48) == frame_list


# --------------------------------------------------------------------------- atheris


def _atheris_one_input(data: bytes) -> None:
    """libFuzzer entry: the first two bytes choose the limit and the chunk size."""
    if len(data) < 2:
        return
    max_payload = [0, 16, 48, 4096, 2**40][data[0] % 5]
    step = 1 + data[1] % 64
    body = data[2:]
    check_stream(body, range(0, len(body), step), max_payload)


def _main(argv: list[str]) -> int:
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        print("atheris is not installed; run this file with pytest instead", file=sys.stderr)
        return 2
    atheris.Setup(argv, _atheris_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))

"""Fuzz target for the local protocol's decoder: arbitrary bytes, and valid streams of
every message with mutations, fed in random chunkings.

The decoder may only ever (a) return frames whose messages re-encode to exactly the
bytes they were decoded from, (b) keep a partial frame pending, or (c) raise
:class:`ProtocolError` — never another exception — and the same input gives the same
outcome however it is cut. Runs under pytest with hypothesis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.errors import ProtocolError
from phalanx.local import protocol as p
from tests.unit.test_local_protocol import SAMPLES, _stream

_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _reencode(frame: p.WireFrame) -> bytes:
    kind = frame.kind
    if kind in (int(p.Kind.ERROR), int(p.Kind.EVENT)) or kind < p.REPLY_BASE:
        return bytes(p.encode(frame.message, frame.rid))
    request = next(r.request for r in p.REQUESTS if int(r.kind) == kind - p.REPLY_BASE)
    return bytes(p.encode(frame.message, frame.rid, reply_to=request))


def check(data: bytes, cuts: Sequence[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    outcomes: list[tuple[list[p.WireFrame], str | None]] = []
    for chunking in (points, [0, len(data)]):
        dec = p.Decoder()
        frames: list[p.WireFrame] = []
        error: str | None = None
        try:
            for a, b in itertools.pairwise(chunking):
                frames += dec.feed(data[a:b])
            frames += dec.feed(b"")  # an error found after good frames surfaces now
        except ProtocolError:
            error = "error"
        outcomes.append((frames, error))
        encoded = b"".join(_reencode(f) for f in frames)
        assert data.startswith(encoded)
        if error is None:
            assert dec.pending == len(data) - len(encoded)
    assert outcomes[0] == outcomes[1]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data, _ = _stream()
    start = draw(st.integers(0, len(data) - 1))
    buf = bytearray(data[start : start + draw(st.integers(1, 400))])
    for _ in range(draw(st.integers(0, 4))):
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        else:
            del buf[pos : pos + draw(st.integers(1, 6))]
    return bytes(buf)


@st.composite
def valid_prefix_then_noise(draw: st.DrawFn) -> bytes:
    cls = draw(st.sampled_from(list(SAMPLES)))
    req, reply = SAMPLES[cls]
    msg: Any = draw(st.sampled_from([req, reply]))
    body = p.encode(msg, 3) if msg is req else p.encode(msg, 3, reply_to=cls)
    return bytes(body) + draw(st.binary(max_size=60))


cuts = st.lists(st.integers(0, 4096), max_size=12)


@_FUZZ
@given(st.binary(max_size=400), cuts)
def test_arbitrary_bytes(data: bytes, cut_list: list[int]) -> None:
    check(data, cut_list)


@_FUZZ
@given(st.binary(max_size=200), cuts)
def test_arbitrary_bodies_behind_a_valid_header(body: bytes, cut_list: list[int]) -> None:
    for kind in (int(p.Kind.OP), p.REPLY_BASE + int(p.Kind.OP), int(p.Kind.ERROR)):
        check(p.HEADER.pack(b"PXL2", kind, 0, 0, 1, len(body)) + body, cut_list)


@_FUZZ
@given(mutated(), cuts)
def test_mutated_valid_streams(data: bytes, cut_list: list[int]) -> None:
    check(data, cut_list)


@_FUZZ
@given(valid_prefix_then_noise(), cuts)
def test_a_valid_frame_then_noise(data: bytes, cut_list: list[int]) -> None:
    check(data, cut_list)

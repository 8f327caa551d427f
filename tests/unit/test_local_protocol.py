"""The local protocol's codec (local/protocol.py, local/_codec.py), without sockets:
every message round-trips; the decoder gives the same frames for the whole input, one
byte at a time, or with trailing bytes; malformed and oversized input is a
ProtocolError before anything is allocated; the table and the daemon's dispatch table
agree."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from phalanx.errors import ErrorInfo, PeerFailure, ProtocolError, describe
from phalanx.local import protocol as p
from phalanx.local.server import HANDLERS
from phalanx.ops import OpResult, OpSpec, StepInfo, ViewInfo

REF = p.BufRef(3, 128, "<f4", (4, 1024))
VIEW = ViewInfo(1_780_000_000_123, ("d0", "d1", "ü-2"), 1, "d1")

#: one instance of every request, and its reply
SAMPLES: dict[type, tuple[Any, Any]] = {
    p.ClientHello: (p.ClientHello(4242, 123.5), p.Welcome(2, 7, 99, "d1", VIEW, 300.0, 30.0)),
    p.Map: (p.Map(5), p.Mapped(1 << 20)),
    p.Unmap: (p.Unmap(5), p.Done()),
    p.Op: (
        p.Op(OpSpec("all_reduce", "avg", "int8"), REF, True, 30.0, 1234.5),
        OpResult(
            "all_reduce",
            9,
            4,
            "ring",
            16384,
            "int8",
            3,
            100,
            200,
            0.0125,
            ("d0", "d1", "ü-2"),
            1,
            True,
        ),
    ),
    p.Commit: (p.Commit(11, False, 20.0, 5.0), p.Committed(True)),
    p.BeginStep: (p.BeginStep(None, 60.0, 77.0, True), StepInfo(4, ("d0",), 12, True, 64, 0.5)),
    p.GetView: (p.GetView(), VIEW),
    p.AttachState: (
        p.AttachState(
            (p.NamedBuf("w", REF), p.NamedBuf("m", p.BufRef(1, 0, "bfloat16", ()))), 3, 9.0, 1.0
        ),
        p.Attached(3, "given"),
    ),
    p.UpdateState: (p.UpdateState(4, ("w",), 9.0, 1.0), p.Done()),
    p.Watch: (p.Watch(), VIEW),
    p.Bye: (p.Bye(), p.Done()),
    p.TakeSnapshot: (
        p.TakeSnapshot((p.SnapshotArray(("model", "w"), REF),), 8, 300.0, 9.0),
        p.SnapshotTaken(2, 8, 16384, 0.01, ("model/w",)),
    ),
    p.SnapshotWait: (
        p.SnapshotWait(2, 0.0),
        p.SealStatus(p.SealResult(2, 8, 16384, 2, 1, ("d0", "d1", "d2"), 0.5, 0.01)),
    ),
    p.Restore: (
        p.Restore("d2", None, 30.0, 2.0),
        p.RestoreLayout(8, 4096, (p.RestoredArray(("model", "w"), "<f4", (4, 2), 0),)),
    ),
    p.Cancel: (p.Cancel(7, 12), p.Cancelled("stopped")),
}


def _stream() -> tuple[bytes, list[Any]]:
    data = bytearray()
    messages: list[Any] = []
    rid = 1
    for cls, (req, reply) in SAMPLES.items():
        data += p.encode(req, rid)
        data += p.encode(reply, rid, reply_to=cls)
        messages += [req, reply]
        rid += 1
    err = describe(PeerFailure(op="all_reduce", seq=3, epoch=4, suspects=[2], reason="timeout"))
    data += p.encode(err, rid)
    data += p.encode(p.Event(VIEW), 0)
    messages += [err, p.Event(VIEW)]
    return bytes(data), messages


def test_the_table_and_the_dispatch_table_agree() -> None:
    assert set(SAMPLES) == {r.request for r in p.REQUESTS} == set(HANDLERS)
    kinds = [int(r.kind) for r in p.REQUESTS]
    assert len(set(kinds)) == len(kinds) and max(kinds) < p.REPLY_BASE
    for cls, (req, reply) in SAMPLES.items():
        row = p.row_of(cls)
        assert isinstance(req, row.request) and isinstance(reply, row.reply)
    assert p.row_of(p.Op).memory and p.row_of(p.Map).fd_in and p.row_of(p.Restore).fd_out


def test_whole_input_byte_at_a_time_and_any_split_give_the_same_frames() -> None:
    data, messages = _stream()
    whole = p.Decoder().feed(data)
    assert [f.message for f in whole] == messages
    dec = p.Decoder()
    one = [f for i in range(len(data)) for f in dec.feed(data[i : i + 1])]
    assert one == whole and dec.pending == 0
    for cut in (1, 19, 20, 21, 97, len(data) - 1):
        dec = p.Decoder()
        assert dec.feed(data[:cut]) + dec.feed(data[cut:]) == whole


def test_a_frame_that_is_not_complete_yet_is_pending_not_an_error() -> None:
    data = bytes(p.encode(SAMPLES[p.Op][0], 1))
    dec = p.Decoder()
    assert dec.feed(data + data[:25]) == [p.WireFrame(int(p.Kind.OP), 1, SAMPLES[p.Op][0])]
    assert dec.pending == 25
    assert [f.message for f in dec.feed(data[25:])] == [SAMPLES[p.Op][0]]


def test_reply_kinds_carry_descriptors_and_errors_rebuild() -> None:
    frame = p.Decoder().feed(p.encode(SAMPLES[p.Restore][1], 4, reply_to=p.Restore))[0]
    assert frame.kind == p.REPLY_BASE + int(p.Kind.RESTORE) and frame.flags == p.FLAG_FD
    assert p.Decoder().feed(p.encode(p.Map(1), 1))[0].flags == p.FLAG_FD
    with pytest.raises(TypeError):
        p.encode(p.Done(), 1, reply_to=p.Op)  # an OP is answered by an OpResult


def _frame(
    kind: int, body: bytes, *, magic: bytes = b"PXL2", flags: int = 0, res: int = 0
) -> bytes:
    return p.HEADER.pack(magic, kind, flags, res, 1, len(body)) + body


def _body(message: Any) -> bytes:
    return bytes(p.encode(message, 1))[p.HEADER.size :]


OP_BODY = _body(SAMPLES[p.Op][0])
OP = int(p.Kind.OP)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_frame(OP, OP_BODY, magic=b"PXL1"), "magic"),
        (_frame(99, b""), "unknown frame kind"),
        (_frame(OP, OP_BODY, flags=2), "flags"),
        (_frame(OP, OP_BODY, res=1), "reserved"),
        (_frame(OP, OP_BODY + b"\0"), "trailing"),
        (_frame(OP, OP_BODY[:-1]), "ends early"),
        (_frame(int(p.Kind.VIEW), b"x"), "trailing"),
        (_frame(int(p.Kind.UNMAP), b"\x01"), "ends early"),
    ],
)
def test_malformed_frames_are_protocol_errors(data: bytes, match: str) -> None:
    dec = p.Decoder()
    with pytest.raises(ProtocolError, match=match):
        dec.feed(data)
    with pytest.raises(ProtocolError):  # poisoned: the stream cannot be trusted again
        dec.feed(bytes(p.encode(p.GetView(), 2)))


def _string_field_body(text: bytes) -> bytes:
    """An UNMAP-free way to reach a string: a CANCEL reply's state."""
    return struct.pack("<H", len(text)) + text


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        (p.REPLY_BASE + int(p.Kind.CANCEL), _string_field_body(b"\xff\xfe"), "UTF-8"),
        (p.REPLY_BASE + int(p.Kind.CANCEL), _string_field_body(b"exploded"), "cancel state"),
        (p.REPLY_BASE + int(p.Kind.CANCEL), struct.pack("<H", 60000), "does not fit"),
        (p.REPLY_BASE + int(p.Kind.COMMIT), b"\x02", "boolean"),
        (p.REPLY_BASE + int(p.Kind.SNAPSHOT_WAIT), b"\x02", "presence"),
        # a list claiming four billion entries: refused before a single one is built
        (p.REPLY_BASE + int(p.Kind.RESTORE), struct.pack("<qqI", 1, 2, 0xFFFFFFFF), "does not fit"),
        (int(p.Kind.MAP), struct.pack("<q", -1), "region"),
        (int(p.Kind.UNMAP), struct.pack("<q", 1) + b"\0", "trailing"),
    ],
)
def test_malformed_bodies_are_protocol_errors(kind: int, body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.decode(kind, body)


def test_validation_in_the_constructors_reaches_the_decoder() -> None:
    bad_dtype = _body(SAMPLES[p.Op][0]).replace(b"<f4", b"<x4")
    with pytest.raises(ProtocolError, match="dtype"):
        p.decode(OP, bad_dtype)
    unknown_op = _body(SAMPLES[p.Op][0]).replace(b"all_reduce", b"all_xeduce")
    with pytest.raises(ProtocolError, match="collective"):
        p.decode(OP, unknown_op)
    barrier_with_buffer = p.Op.__new__(p.Op)  # bypass the constructor to build bad bytes
    for name, v in (("spec", OpSpec("barrier")), ("buf", REF), ("retry", False),
                    ("timeout", 1.0), ("at", 1.0), ("twin", 0)):  # fmt: skip
        object.__setattr__(barrier_with_buffer, name, v)
    with pytest.raises(ProtocolError, match="barrier"):
        p.decode(OP, _body(barrier_with_buffer))
    with pytest.raises(ProtocolError, match="twin"):  # a twin must be another region
        p.Op(OpSpec("all_reduce"), REF, False, 1.0, 1.0, REF.region)
    twin = p.Op(OpSpec("all_reduce"), REF, False, 1.0, 1.0, REF.region + 1)
    assert p.decode(OP, _body(twin)) == twin
    with pytest.raises(ProtocolError, match="unique"):
        p.AttachState((p.NamedBuf("w", REF), p.NamedBuf("w", REF)), 1, 1.0, 1.0)


def test_oversized_input_is_refused_before_it_is_buffered() -> None:
    dec = p.Decoder()
    header = p.HEADER.pack(b"PXL2", OP, 0, 0, 1, p.MAX_BODY + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(header)  # the header alone: no body byte was needed to refuse it
    huge = p.AttachState(tuple(p.NamedBuf(f"{i:06d}" * 40, REF) for i in range(5000)), 0, 1.0, 1.0)
    with pytest.raises(ProtocolError, match="exceeds"):
        p.encode(huge, 1)
    with pytest.raises(ProtocolError, match="string"):
        p.encode(p.UpdateState(1, ("x" * 5000,), 1.0, 1.0), 1)


def test_error_info_round_trips_with_every_value_kind() -> None:
    info = ErrorInfo(
        ("StepAborted", "CommError", "PhalanxError"),
        "step 3 aborted",
        (
            ("epoch", 4),
            ("step", 3),
            ("detail", "x"),
            ("ratio", 0.5),
            ("flag", True),
            ("ranks", (3, 1)),
            ("nothing", None),
        ),
    )
    assert p.Decoder().feed(p.encode(info, 9))[0].message == info

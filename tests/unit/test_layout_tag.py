"""The layout tag of a gather or reduce-scatter (``OpSpec.layout``), sans-IO: it is a
field of the op descriptor (so members that laid out for different views disagree on
it like on any argument) whose untagged form is byte for byte the old descriptor, and
it travels in the local protocol's OP request (version 4)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.comm.descriptor import (
    OpDescriptor,
    decode_mismatch,
    differing_fields,
    encode_mismatch,
    mismatch_error,
    op_descriptor,
)
from phalanx.errors import ConfigError, FrameError, ProtocolError
from phalanx.local import protocol as p
from phalanx.ops import OpSpec

GATHER = OpDescriptor("all_gather", 12, "float32", "", "none", -1, "ring", 1 << 20)


def test_an_untagged_descriptor_is_the_old_wire_form() -> None:
    """No tag, no new byte: the digest of every untagged op (all that existed before,
    and every all-reduce) is what it was, so untagged peers still agree."""
    old = struct.pack("<BBBBIQIB", 3, 2, 3, 0, 0xFFFFFFFF, 12, 1 << 20, 4) + b"none"
    assert GATHER.layout == -1 and GATHER.encode() == old
    want = int.from_bytes(hashlib.blake2b(old, digest_size=8).digest(), "little")
    assert GATHER.digest == want


def test_a_tag_is_eight_bytes_after_the_codec_and_changes_the_digest() -> None:
    tagged = dataclasses.replace(GATHER, layout=7)
    assert tagged.encode() == GATHER.encode() + struct.pack("<Q", 7)
    assert OpDescriptor.decode(tagged.encode()) == tagged
    assert tagged.digest != GATHER.digest
    assert dataclasses.replace(GATHER, layout=8).digest != tagged.digest
    assert differing_fields({0: tagged, 1: dataclasses.replace(GATHER, layout=8)}) == ("layout",)
    assert differing_fields({0: tagged, 1: GATHER}) == ("layout",)  # tagged vs untagged
    assert op_descriptor("all_gather", 12, "float32", "", "none", -1, "ring", 1 << 20, 7) == tagged


def test_the_mismatch_error_names_the_layout_of_each_rank() -> None:
    a, b = dataclasses.replace(GATHER, layout=4), dataclasses.replace(GATHER, layout=6)
    err = mismatch_error(op="all_gather", seq=3, epoch=6, descriptors={0: a, 1: b}, detected_by=1)
    assert err.fields == ("layout",)
    assert err.descriptors[0] == "all_gather(count=12, dtype=float32, codec=none, layout=4)"
    assert err.descriptors[1].endswith("layout=6)")
    # a stale layout usually has another world too: both are the caller's arguments
    c = dataclasses.replace(b, count=18)
    err = mismatch_error(op="all_gather", seq=3, epoch=6, descriptors={0: a, 1: c}, detected_by=0)
    assert err.fields == ("count", "layout")


@pytest.mark.parametrize("tail", [1, 7, 9, 16])
def test_a_tail_that_is_not_one_tag_is_a_bad_payload(tail: int) -> None:
    with pytest.raises(FrameError) as info:
        OpDescriptor.decode(GATHER.encode() + bytes(tail))
    assert info.value.reason == "bad-payload"


@pytest.mark.parametrize("layout", [-2, 2**64])
def test_out_of_range_tags_are_refused(layout: int) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(GATHER, layout=layout)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-1, 2**64 - 1),
    st.sampled_from(["none", "int8:block=256", "zstd:level=1"]),
    st.one_of(st.none(), st.integers(0, 2**32 - 2)),
)
def test_tagged_descriptors_and_mismatch_payloads_round_trip(
    layout: int, codec: str, by: int | None
) -> None:
    desc = dataclasses.replace(GATHER, layout=layout, codec=codec)
    assert OpDescriptor.decode(desc.encode()) == desc
    assert decode_mismatch(encode_mismatch(desc, by)) == (desc, by)


# ----------------------------------------------------------------------------- OpSpec


def test_the_spec_takes_a_tag_on_gathers_and_reduce_scatters_only() -> None:
    assert OpSpec("all_gather").layout == -1
    assert OpSpec("reduce_scatter", layout=0).layout == 0
    assert OpSpec("all_gather", layout=2**48).layout == 2**48
    for kind in ("all_reduce", "broadcast", "barrier"):
        with pytest.raises(ConfigError, match="layout"):
            OpSpec(kind, layout=3)
    for bad in (-2, 2**63):
        with pytest.raises(ConfigError, match="layout"):
            OpSpec("all_gather", layout=bad)


# ----------------------------------------------------------------------------- local protocol

REF = p.BufRef(2, 64, "<f4", (3, 4))


def _body(message: object) -> bytes:
    return bytes(p.encode(message, 1))[p.HEADER.size :]


def test_protocol_4_carries_the_tag_in_the_op_request() -> None:
    assert p.PROTOCOL_VERSION == 4
    tagged = p.Op(OpSpec("all_gather", layout=41), REF, False, 5.0, 9.0)
    frames = p.Decoder().feed(p.encode(tagged, 7))
    assert [(f.kind, f.rid, f.message) for f in frames] == [(int(p.Kind.OP), 7, tagged)]
    rs = p.Op(OpSpec("reduce_scatter", "max", "int8", layout=0), REF, True, 5.0, 9.0)
    assert p.decode(int(p.Kind.OP), _body(rs)) == rs
    # the tag is one packed i64 of the spec: tagged and untagged bodies differ there only
    untagged = dataclasses.replace(tagged, spec=OpSpec("all_gather"))
    a, b = _body(tagged), _body(untagged)
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert a[diff[0] : diff[0] + 8] == struct.pack("<q", 41)
    assert b[diff[0] : diff[0] + 8] == struct.pack("<q", -1)


def test_a_tag_on_an_op_that_takes_none_is_refused_by_the_decoder() -> None:
    body = _body(p.Op(OpSpec("all_gather", layout=5), REF, False, 5.0, 9.0))
    with pytest.raises(ProtocolError, match="layout"):
        p.decode(int(p.Kind.OP), body.replace(b"all_gather", b"all_reduce"))


def test_hello_is_the_same_body_in_every_version() -> None:
    """A client of version 3 is answered with a typed error naming both versions:
    the daemon can only do that if the HELLO it sends still decodes."""
    old = struct.pack("<qdq", 4242, 1.5, 3)
    assert p.decode(int(p.Kind.HELLO), old) == p.ClientHello(4242, 1.5, 3)
    assert _body(p.ClientHello(4242, 1.5)) == struct.pack("<qdq", 4242, 1.5, 4)

"""Op descriptors, sans-IO: exact round trips, a digest that tells apart any two
descriptors that differ in one field, MISMATCH payloads, decoders that refuse every
malformed input with ``bad-payload`` (never another exception), and the error text
that names each rank's arguments."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.comm.descriptor import (
    ALGORITHMS,
    DTYPES,
    KINDS,
    OPS,
    OpDescriptor,
    decode_mismatch,
    differing_fields,
    encode_mismatch,
    mismatch_error,
)
from phalanx.errors import CommError, ConfigError, FrameError, OpMismatch, PeerFailure

BASE = OpDescriptor(
    kind="all_reduce",
    count=10,
    dtype="float32",
    op="sum",
    codec="none",
    algorithm="recursive-doubling",
)

descriptors = st.builds(
    OpDescriptor,
    kind=st.sampled_from(KINDS),
    count=st.integers(0, 2**64 - 1),
    dtype=st.sampled_from(DTYPES),
    op=st.sampled_from(OPS),
    codec=st.sampled_from(
        ["none", "zstd:level=1", "zstd:level=-7", "fp16", "bf16", "int8:block=256", "int8:block=1"]
    ),
    root=st.integers(-1, 2**32 - 2),
    algorithm=st.sampled_from(ALGORITHMS),
    piece_bytes=st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None)
@given(descriptors)
def test_round_trip(desc: OpDescriptor) -> None:
    assert OpDescriptor.decode(desc.encode()) == desc
    assert 0 < desc.digest < 2**64


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "reduce_scatter"},
        {"count": 11},
        {"count": 10 + 2**32},
        {"dtype": "int32"},  # same bytes per element as float32: only the descriptor tells
        {"op": "max"},
        {"codec": "int8:block=256"},
        {"codec": "zstd:level=1"},
        {"root": 0},
        {"algorithm": "ring"},
        {"piece_bytes": 4096},
    ],
)
def test_one_field_changes_the_digest(change: dict[str, object]) -> None:
    other = dataclasses.replace(BASE, **change)  # type: ignore[arg-type]
    assert other.digest != BASE.digest
    assert differing_fields({0: BASE, 1: other}) == tuple(change)


def test_equal_descriptors_have_equal_digests() -> None:
    same = OpDescriptor("all_reduce", 10, "float32", "sum", "none", -1, "recursive-doubling", 0)
    assert same is not BASE and same.digest == BASE.digest
    assert differing_fields({0: BASE, 1: same, 2: BASE}) == ()


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "gather"},
        {"algorithm": "magic"},
        {"dtype": "complex64"},
        {"op": "median"},
        {"count": -1},
        {"count": 2**64},
        {"root": -2},
        {"root": 2**32 - 1},
        {"piece_bytes": 2**32},
        {"codec": "x" * 65},
    ],
)
def test_bad_fields_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(BASE, **fields)  # type: ignore[arg-type]


def _encoded(**fields: int) -> bytes:
    """BASE's encoding with raw fixed fields replaced (kind, algo, dtype, op codes)."""
    data = bytearray(BASE.encode())
    for offset, name in enumerate(("kind", "algo", "dtype", "op")):
        if name in fields:
            data[offset] = fields[name]
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        BASE.encode()[:5],
        BASE.encode()[:-1],  # the codec spec is one byte short
        BASE.encode() + b"x",  # trailing bytes
        _encoded(kind=len(KINDS)),
        _encoded(algo=255),
        _encoded(dtype=len(DTYPES)),
        _encoded(op=len(OPS)),
        BASE.encode()[:-4] + b"gzip",  # an unknown codec
        BASE.encode()[:-4] + b"NONE",  # a known codec, not in canonical form
        BASE.encode()[:-4] + b"\xff\xfe\xfd\xfc",  # not ASCII
    ],
)
def test_malformed_descriptors_are_bad_payloads(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        OpDescriptor.decode(data)
    assert info.value.reason == "bad-payload"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_any_bytes_decode_or_raise_bad_payload(data: bytes) -> None:
    for decode in (OpDescriptor.decode, decode_mismatch):
        try:
            decode(data)
        except FrameError as exc:
            assert exc.reason == "bad-payload"


@settings(max_examples=100, deadline=None)
@given(descriptors, st.one_of(st.none(), st.integers(0, 2**32 - 2)))
def test_mismatch_payload_round_trip(desc: OpDescriptor, by: int | None) -> None:
    assert decode_mismatch(encode_mismatch(desc, by)) == (desc, by)


def test_a_short_mismatch_payload_is_refused() -> None:
    with pytest.raises(FrameError, match="bad-payload"):
        decode_mismatch(struct.pack("<H", 1))


def test_describe_reads_like_the_call() -> None:
    assert BASE.describe() == "all_reduce(count=10, dtype=float32, op=sum, codec=none)"
    bc = OpDescriptor(
        "broadcast", 4, "float64", codec="int8:block=256", root=1, algorithm="binomial"
    )
    assert bc.describe() == "broadcast(count=4, dtype=float64, codec=int8:block=256, root=1)"
    assert OpDescriptor("barrier", 0, algorithm="dissemination").describe() == "barrier(count=0)"
    ring = dataclasses.replace(BASE, algorithm="ring", piece_bytes=4096)
    assert ring.describe(("piece_bytes",)).endswith("codec=none, piece_bytes=4096)")


def test_the_error_names_every_rank_and_what_differs() -> None:
    odd = dataclasses.replace(BASE, count=12, algorithm="ring", piece_bytes=1 << 20)
    err = mismatch_error(
        op="all_reduce", seq=970, epoch=3, descriptors={2: BASE, 0: BASE, 1: odd}, detected_by=1
    )
    assert isinstance(err, OpMismatch) and isinstance(err, CommError)
    assert isinstance(err, ValueError) and not isinstance(err, PeerFailure)
    assert (err.op, err.seq, err.epoch, err.detected_by, err.reason) == (
        "all_reduce",
        970,
        3,
        1,
        "mismatch",
    )
    # the count is the caller's argument that differs; the algorithm follows from it
    assert err.fields == ("count",)
    assert list(err.descriptors) == [0, 1, 2]
    assert err.descriptors[1] == "all_reduce(count=12, dtype=float32, op=sum, codec=none)"
    text = str(err)
    assert "all_reduce #970 in epoch 3: ranks disagree on count" in text
    assert "ranks 0,2: all_reduce(count=10," in text
    assert "rank 1: all_reduce(count=12," in text
    assert "detected by rank 1" in text


def test_options_are_named_when_no_argument_differs() -> None:
    # same call, different options (small_bytes, piece_bytes): the options are the cause
    a = dataclasses.replace(BASE, count=10**6, algorithm="ring", piece_bytes=1 << 20)
    b = dataclasses.replace(a, piece_bytes=4096)
    err = mismatch_error(op="all_reduce", seq=1, epoch=0, descriptors={0: a, 1: b}, detected_by=0)
    assert err.fields == ("piece_bytes",)
    assert err.descriptors[1].endswith("piece_bytes=4096)")
    # the unit may come from the crowded rule, which the user never set: say so
    assert "crowded_piece_bytes=0" in str(err)
    count = dataclasses.replace(b, count=12)
    other = mismatch_error(op="all_reduce", seq=1, epoch=0, descriptors={0: a, 1: count},
                           detected_by=0)  # fmt: skip
    assert "crowded" not in str(other)  # an argument differs: no word on options


def test_the_dtype_wire_codes_are_fixed() -> None:
    # A dtype's code in a descriptor is its index in DTYPES, derived from
    # reduce.DTYPE_NAMES: reordering that tuple would change the wire format.
    assert DTYPES == ("", "float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8")

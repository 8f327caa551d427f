"""Codecs: exact lossless round trips, error bounds of the lossy ones, and a decoder
that refuses every malformed payload with FrameError instead of crashing or
allocating what the payload asks."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.comm.codecs import (
    CODEC_BF16,
    CODEC_FP16,
    CODEC_INT8,
    CODEC_NAMES,
    CODEC_NONE,
    CODEC_ZSTD,
    Bf16Codec,
    Codec,
    Fp16Codec,
    Int8Codec,
    NoneCodec,
    ZstdCodec,
    decode_into,
    parse_codec,
)
from phalanx.comm.reduce import DTYPE_NAMES, supported_dtypes
from phalanx.errors import ConfigError, FrameError, UnsupportedError

ALL_CODECS: list[Codec] = [
    NoneCodec(),
    ZstdCodec(),
    ZstdCodec(level=5),
    Fp16Codec(),
    Bf16Codec(),
    Int8Codec(),
    Int8Codec(block=7),
]
LOSSY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
F32 = np.dtype(np.float32)


def _random_bits(dtype: np.dtype, count: int, seed: int) -> np.ndarray:
    """Arbitrary bit patterns (NaNs, infs, subnormals included) of ``dtype``."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype)


def _roundtrip(codec: Codec, x: np.ndarray) -> tuple[int, bytes, np.ndarray]:
    codec_id, payload = codec.encode(x)
    wire = bytes(payload)  # what a socket would carry
    assert len(wire) <= codec.max_encoded_nbytes(x.size, x.dtype)
    out = np.empty_like(x)
    decode_into(codec_id, wire, out)
    return codec_id, wire, out


def _reject(codec_id: int, payload: bytes | memoryview, out: np.ndarray, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_into(codec_id, payload, out)
    assert info.value.reason == reason, info.value


# ---------------------------------------------------------------- lossless


@pytest.mark.parametrize("name", list(DTYPE_NAMES))
@pytest.mark.parametrize("codec", [NoneCodec(), ZstdCodec(), ZstdCodec(level=9)], ids=str)
def test_lossless_roundtrip_is_bit_exact(codec: Codec, name: str) -> None:
    dtype = supported_dtypes()[name]
    random = _random_bits(dtype, 1000, seed=1)
    compressible = np.repeat(random[:10], 100)
    for x in (random, compressible, random[:0], random[:1]):
        _, _, out = _roundtrip(codec, x)
        assert out.tobytes() == x.tobytes()


def test_zstd_compresses_and_skips_per_chunk() -> None:
    zeros = np.zeros(4096, dtype=np.float32)
    codec_id, payload = ZstdCodec().encode(zeros)
    assert codec_id == CODEC_ZSTD
    assert len(payload) < zeros.nbytes // 10
    noise = _random_bits(np.dtype(np.uint8), 4096, seed=2)
    codec_id, payload = ZstdCodec().encode(noise)
    assert codec_id == CODEC_NONE
    assert len(payload) == noise.nbytes
    assert np.shares_memory(np.frombuffer(payload, dtype=np.uint8), noise)  # no copy


def test_none_codec_is_a_view() -> None:
    x = np.arange(10, dtype=np.int64)
    codec_id, payload = NoneCodec().encode(x)
    assert codec_id == CODEC_NONE
    assert isinstance(payload, memoryview) and len(payload) == x.nbytes
    assert bytes(payload) == x.tobytes()


# ---------------------------------------------------------------- fp16 / bf16


@pytest.mark.parametrize(
    ("codec", "wire_dtype", "rel"),
    [
        (Fp16Codec(), np.dtype(np.float16), 2.0**-11),
        (Bf16Codec(), np.dtype(ml_dtypes.bfloat16), 2.0**-8),
    ],
    ids=["fp16", "bf16"],
)
@pytest.mark.parametrize("dtype", LOSSY_DTYPES, ids=str)
def test_half_codecs_error_bound(
    codec: Codec, wire_dtype: np.dtype, rel: float, dtype: np.dtype
) -> None:
    rng = np.random.default_rng(4)
    # normal range of both half formats: relative error <= half an ulp
    x = (rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 4, size=2000)).astype(dtype)
    codec_id, wire, out = _roundtrip(codec, x)
    assert codec_id == codec.codec_id
    assert len(wire) == 2 * x.size
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    tiny = 2.0**-25 if codec.name == "fp16" else 0.0  # half of fp16's subnormal spacing
    assert (err <= np.abs(x.astype(np.float64)) * rel + tiny).all()
    assert (err[np.abs(x) > 1e-4] <= np.abs(x[np.abs(x) > 1e-4]) * rel).all()
    # the wire holds the nearest half value, decoded without further loss
    nearest = x.astype(wire_dtype).astype(dtype)
    assert out.tobytes() == nearest.tobytes()


def test_fp16_overflow_and_specials() -> None:
    x = np.array([70000.0, -1e30, 65504.0, np.nan, np.inf, -np.inf, 1e-9, -0.0], np.float32)
    _, _, out = _roundtrip(Fp16Codec(), x)
    assert out[0] == np.inf and out[1] == -np.inf and out[2] == 65504.0
    assert np.isnan(out[3]) and out[4] == np.inf and out[5] == -np.inf
    assert out[6] == 0.0 and np.signbit(out[7])


def test_bf16_keeps_float32_range() -> None:
    x = np.array([3e38, -1e-30, np.nan], np.float32)
    _, _, out = _roundtrip(Bf16Codec(), x)
    assert np.isfinite(out[:2]).all()
    np.testing.assert_allclose(out[:2], x[:2], rtol=2.0**-8)
    assert np.isnan(out[2])


# ---------------------------------------------------------------- int8


def _blocks(x: np.ndarray, block: int) -> list[np.ndarray]:
    return [x[i : i + block] for i in range(0, x.size, block)]


@pytest.mark.parametrize("dtype", LOSSY_DTYPES, ids=str)
@pytest.mark.parametrize("block", [1, 7, 64, 256])
@pytest.mark.parametrize("count", [0, 1, 63, 256, 257, 1000])
def test_int8_error_bound_and_layout(dtype: np.dtype, block: int, count: int) -> None:
    rng = np.random.default_rng(count * 1000 + block)
    x = (rng.standard_normal(count) * 10.0 ** rng.integers(-5, 5)).astype(dtype)
    codec = Int8Codec(block=block)
    codec_id, wire, out = _roundtrip(codec, x)
    assert codec_id == CODEC_INT8
    nblocks = -(-count // block)
    assert len(wire) == 4 + 4 * nblocks + count == codec.max_encoded_nbytes(count, dtype)
    assert struct.unpack_from("<I", wire)[0] == block
    scales = np.frombuffer(wire, dtype="<f4", count=nblocks, offset=4)
    q = np.frombuffer(wire, dtype=np.int8, offset=4 + 4 * nblocks)
    assert (np.abs(q.astype(np.int64)) <= 127).all()
    for i, (xb, ob) in enumerate(zip(_blocks(x, block), _blocks(out, block), strict=True)):
        absmax = float(np.max(np.abs(xb.astype(np.float64))))
        assert scales[i] == np.float32(absmax / 127) or np.isclose(
            scales[i], absmax / 127, rtol=2.0**-23
        )
        err = np.abs(ob.astype(np.float64) - xb.astype(np.float64))
        assert err.max() <= absmax / 254 * (1 + 1e-5), (i, err.max(), absmax)


def test_int8_zero_and_poisoned_blocks() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1100).astype(np.float32)  # 4 full blocks of 256 + a tail of 76
    x[:256] = 0.0
    x[300] = np.nan
    x[600] = np.inf
    x[800] = -np.inf
    x[1050] = np.nan  # in the tail
    _, wire, out = _roundtrip(Int8Codec(), x)
    assert (out[:256] == 0).all()
    assert np.frombuffer(wire, dtype="<f4", count=5, offset=4)[0] == 0.0
    for lo, hi in ((256, 512), (512, 768), (768, 1024), (1024, 1100)):
        assert np.isnan(out[lo:hi]).all(), (lo, hi)
    q = np.frombuffer(wire, dtype=np.int8, offset=4 + 4 * 5)
    assert (q[256:] == 0).all()  # no garbage from casting NaN


def test_int8_float64_beyond_float32_range_is_nan() -> None:
    x = np.array([1e300, 1.0, -2.0], dtype=np.float64)
    _, _, out = _roundtrip(Int8Codec(block=2), x)
    assert np.isnan(out[:2]).all()
    assert abs(out[2] + 2.0) <= 2.0 / 254


def test_int8_subnormal_scales_stay_in_range() -> None:
    # absmax / 127 is a float32 subnormal that rounds down by ~30%: x / scale exceeds
    # 127 and must be clipped, not wrapped around (and 1/scale would overflow to inf).
    tiny = np.float32(127 * 1.4 * 2.0**-149)
    x = np.array([tiny, -tiny, tiny / 3, 0.0], dtype=np.float32)
    _, wire, out = _roundtrip(Int8Codec(block=4), x)
    q = np.frombuffer(wire, dtype=np.int8, offset=8)
    assert q.tolist()[:2] == [127, -127] and q[3] == 0
    assert np.isfinite(out).all() and out[0] > 0 and out[1] < 0 and out[3] == 0


def test_int8_wire_ratio() -> None:
    count = (64 << 20) // 4  # a 64 MiB float32 array
    assert Int8Codec().max_encoded_nbytes(count, F32) / (count * 4) <= 0.27
    x = np.random.default_rng(6).standard_normal(1 << 16).astype(np.float32)
    codec_id, payload = Int8Codec().encode(x)
    assert codec_id == CODEC_INT8
    assert len(payload) / x.nbytes <= 0.27


@pytest.mark.parametrize(
    "codec", [Fp16Codec(), Bf16Codec(), Int8Codec(), Int8Codec(block=5)], ids=str
)
@pytest.mark.parametrize("dtype", LOSSY_DTYPES, ids=str)
def test_lossy_codecs_are_deterministic(codec: Codec, dtype: np.dtype) -> None:
    x = np.random.default_rng(8).standard_normal(777).astype(dtype)
    x[10] = np.nan
    first = _roundtrip(codec, x)
    again = _roundtrip(codec, x.copy())
    assert first[0] == again[0] and first[1] == again[1]
    assert first[2].tobytes() == again[2].tobytes()
    out = np.empty_like(x)
    decode_into(first[0], memoryview(first[1]), out)  # memoryview or bytes: same values
    assert out.tobytes() == first[2].tobytes()


# ---------------------------------------------------------------- one conformance test


@pytest.mark.parametrize("codec", ALL_CODECS, ids=str)
def test_codec_conformance(codec: Codec) -> None:
    assert codec.name in CODEC_NAMES
    assert parse_codec(codec.spec) == codec
    for name, dtype in supported_dtypes().items():
        x = np.random.default_rng(9).standard_normal(300).astype(dtype)
        if not codec.supports(dtype):
            assert codec.lossy and dtype not in LOSSY_DTYPES, name
            with pytest.raises(UnsupportedError):
                codec.encode(x)
            continue
        codec_id, _, out = _roundtrip(codec, x)
        if not codec.lossy:
            assert out.tobytes() == x.tobytes()
        else:
            assert codec_id == codec.codec_id
            np.testing.assert_allclose(out, x, atol=float(np.max(np.abs(x))) / 100)
    for bad in (np.zeros((2, 2), F32), np.zeros(8, F32)[::2]):
        with pytest.raises(UnsupportedError):
            codec.encode(bad)


@settings(max_examples=150, deadline=None)
@given(
    codec=st.sampled_from(ALL_CODECS),
    name=st.sampled_from(list(DTYPE_NAMES)),
    count=st.one_of(st.integers(0, 2), st.integers(0, 700)),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_roundtrip_property(codec: Codec, name: str, count: int, seed: int, scale: float) -> None:
    dtype = supported_dtypes()[name]
    if not codec.supports(dtype):
        return
    rng = np.random.default_rng(seed)
    if codec.lossy:
        x = (rng.standard_normal(count) * scale).astype(dtype)
    else:
        x = _random_bits(dtype, count, seed)
    codec_id, _, out = _roundtrip(codec, x)
    if not codec.lossy:
        assert out.tobytes() == x.tobytes()
        return
    xs = x.astype(np.float64)
    err = np.abs(out.astype(np.float64) - xs)
    if isinstance(codec, Int8Codec):
        for xb, eb in zip(_blocks(xs, codec.block), _blocks(err, codec.block), strict=True):
            assert eb.max() <= np.max(np.abs(xb)) / 254 * (1 + 1e-5)
    else:
        rel = 2.0**-11 if codec_id == CODEC_FP16 else 2.0**-8
        tiny = 2.0**-25 if codec_id == CODEC_FP16 else 0.0  # half fp16 subnormal spacing
        assert (err <= np.abs(xs) * rel + tiny).all()


# ---------------------------------------------------------------- malformed payloads


def test_unknown_codec_id() -> None:
    out = np.zeros(4, F32)
    for codec_id in (5, 42, 255, -1):
        _reject(codec_id, b"\0" * 16, out, "bad-codec")


def test_lossy_id_for_integer_out() -> None:
    for codec_id in (CODEC_FP16, CODEC_BF16, CODEC_INT8):
        _reject(codec_id, b"\0" * 8, np.zeros(4, np.int32), "bad-codec")


@pytest.mark.parametrize("codec", ALL_CODECS, ids=str)
def test_wrong_lengths(codec: Codec) -> None:
    x = np.arange(100, dtype=np.float32) - 50  # zstd compresses this
    codec_id, payload = codec.encode(x)
    wire = bytes(payload)
    for bad in (wire[:-1], wire + b"\0", wire[: len(wire) // 2], b""):
        _reject(codec_id, bad, np.empty_like(x), "bad-payload")
    for other in (99, 101, 0):  # the right payload for an out of another length
        _reject(codec_id, wire, np.empty(other, F32), "bad-payload")


def test_int8_bad_block_size() -> None:
    x = np.ones(512, F32)
    _, payload = Int8Codec(block=256).encode(x)
    wire = bytearray(payload)
    out = np.empty_like(x)
    for block in (0, 128, 255, 2**32 - 1):
        wire[:4] = struct.pack("<I", block)
        _reject(CODEC_INT8, bytes(wire), out, "bad-payload")
    _reject(CODEC_INT8, b"\x01\x00\x00", np.empty(0, F32), "bad-payload")  # no header


def test_int8_bad_scales() -> None:
    _, payload = Int8Codec(block=4).encode(np.ones(8, F32))
    for bad_scale in (-1.0, np.inf):
        wire = bytearray(payload)
        wire[4:8] = struct.pack("<f", bad_scale)
        _reject(CODEC_INT8, bytes(wire), np.empty(8, F32), "bad-payload")


def test_zstd_garbage_and_truncation() -> None:
    out = np.empty(1000, F32)
    _reject(CODEC_ZSTD, b"", out, "bad-payload")
    _reject(CODEC_ZSTD, b"not a zstd frame at all", out, "bad-payload")
    frame = zstandard.ZstdCompressor().compress(np.zeros(1000, F32).tobytes())
    for cut in (len(frame) - 1, len(frame) - 3, 6):
        _reject(CODEC_ZSTD, frame[:cut], out, "bad-payload")
    _reject(CODEC_ZSTD, frame + b"\0\0\0\0", out, "bad-payload")  # trailing junk
    _reject(CODEC_ZSTD, frame + frame, out, "bad-payload")  # a second frame
    corrupt = bytearray(frame)
    corrupt[-2] ^= 0xFF
    with pytest.raises(FrameError):  # corrupt block contents: any FrameError, never a crash
        decode_into(CODEC_ZSTD, bytes(corrupt), out)


def _frame_claiming(content_size: int, block_bytes: int) -> bytes:
    """A tiny zstd frame: header declaring ``content_size`` (8-byte field, single
    segment) and one RLE block of ``block_bytes`` zero bytes."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", content_size)
    block = (block_bytes << 3) | (1 << 1) | 1  # size, type RLE, last block
    return header + block.to_bytes(3, "little") + b"\0"


def test_zstd_bombs_are_refused() -> None:
    out = np.empty(256, F32)  # 1 KiB
    # a 17-byte payload claiming a terabyte
    bomb = _frame_claiming(1 << 40, 1 << 17)
    assert zstandard.get_frame_parameters(bomb).content_size == 1 << 40
    _reject(CODEC_ZSTD, bomb, out, "bad-payload")
    # a frame claiming exactly out.nbytes whose block expands beyond it
    liar = _frame_claiming(out.nbytes, 1 << 17)
    _reject(CODEC_ZSTD, liar, out, "bad-payload")
    # a frame without a content size that would expand far beyond out
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    assert zstandard.get_frame_parameters(streamed).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert len(streamed) < 1000
    _reject(CODEC_ZSTD, streamed, out, "bad-payload")
    # a frame of another size
    other = zstandard.ZstdCompressor().compress(bytes(out.nbytes + 4))
    _reject(CODEC_ZSTD, other, out, "bad-payload")
    # and the honest frame still decodes
    good = _frame_claiming(out.nbytes, out.nbytes)
    decode_into(CODEC_ZSTD, good, out)
    assert (out == 0).all()


@settings(max_examples=300, deadline=None)
@given(
    codec_id=st.integers(-1, 6),
    payload=st.binary(max_size=300),
    count=st.integers(0, 80),
    name=st.sampled_from(["float32", "float64", "int32", "uint8"]),
)
def test_decoder_never_crashes(codec_id: int, payload: bytes, count: int, name: str) -> None:
    out = np.empty(count, supported_dtypes()[name])
    try:
        decode_into(codec_id, payload, out)
    except FrameError as exc:
        assert exc.reason in ("bad-codec", "bad-payload")


def test_odd_payload_buffers() -> None:
    x = np.arange(6, dtype=np.float32)
    out = np.empty_like(x)
    decode_into(CODEC_NONE, memoryview(x.tobytes()).cast("I"), out)  # any flat buffer
    np.testing.assert_array_equal(out, x)
    strided = np.zeros(48, np.uint8).data[::2]
    for codec_id in (CODEC_NONE, CODEC_ZSTD, CODEC_INT8):
        _reject(codec_id, strided, out, "bad-payload")


def test_out_must_be_a_writable_vector() -> None:
    wire = bytes(8)
    for out in (np.empty((1, 2), F32), np.empty(4, F32)[::2]):
        with pytest.raises(UnsupportedError):
            decode_into(CODEC_NONE, wire, out)
    readonly = np.empty(2, F32)
    readonly.flags.writeable = False
    with pytest.raises(UnsupportedError):
        decode_into(CODEC_NONE, wire, readonly)


# ---------------------------------------------------------------- parse_codec


def test_parse_codec_valid() -> None:
    assert parse_codec("none") == NoneCodec()
    assert parse_codec("zstd") == ZstdCodec(level=1)
    assert parse_codec("zstd:level=3") == ZstdCodec(level=3)
    assert parse_codec(" zstd : level = 19 ") == ZstdCodec(level=19)
    assert parse_codec("zstd:level=-3") == ZstdCodec(level=-3)
    assert parse_codec("fp16") == Fp16Codec()
    assert parse_codec("bf16") == Bf16Codec()
    assert parse_codec("int8") == Int8Codec(block=256)
    assert parse_codec("int8:block=128") == Int8Codec(block=128)
    assert [parse_codec(n).name for n in CODEC_NAMES] == list(CODEC_NAMES)
    assert parse_codec("fp16").lossy and not parse_codec("zstd").lossy


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "gzip",
        "fp32",
        "zstd:level=99",
        "zstd:level=x",
        "zstd:lvl=3",
        "zstd:level=3,level=4",
        "zstd:",
        "int8:block=0",
        "int8:block=-4",
        "int8:block=1.5",
        "int8:level=3",
        "fp16:block=2",
        "none:x=1",
    ],
)
def test_parse_codec_invalid(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_codec(spec)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "block" in message or "level" in message, message


def test_codec_ids_are_the_wire_contract() -> None:
    assert (CODEC_NONE, CODEC_ZSTD, CODEC_FP16, CODEC_BF16, CODEC_INT8) == (0, 1, 2, 3, 4)
    assert CODEC_NAMES == ("none", "zstd", "fp16", "bf16", "int8")
    assert [
        c.codec_id for c in (NoneCodec(), ZstdCodec(), Fp16Codec(), Bf16Codec(), Int8Codec())
    ] == [0, 1, 2, 3, 4]


def test_int8_block_sizes_the_encoder_never_makes_are_refused() -> None:
    """The decoder took any block size up to 2**32 (found by review); the encoder
    makes 1..INT8_MAX_BLOCK only."""
    from phalanx.comm.codecs import INT8_MAX_BLOCK

    out = np.zeros(2, np.float32)
    for block in (INT8_MAX_BLOCK + 1, 1 << 30):
        payload = struct.pack("<I", block) + struct.pack("<f", 1.0) + bytes([0x80, 5])
        with pytest.raises(FrameError, match="block size"):
            decode_into(CODEC_INT8, payload, out)


def test_options_whose_pieces_cannot_travel_in_one_frame_are_refused() -> None:
    """piece_bytes == max_frame_bytes passed, and small_bytes was never checked: a
    small all-reduce (one frame of the whole array) or an int8 piece (5 bytes per 4)
    then broke the group with too-large frames (found by review)."""
    from phalanx.comm.options import CommOptions

    with pytest.raises(ConfigError, match="small_bytes"):
        CommOptions(max_frame_bytes=64 << 10, piece_bytes=32 << 10, small_bytes=256 << 10)
    with pytest.raises(ConfigError, match="piece_bytes"):
        CommOptions(max_frame_bytes=64 << 10, piece_bytes=64 << 10, small_bytes=0)
    CommOptions(max_frame_bytes=64 << 10, piece_bytes=32 << 10, small_bytes=32 << 10)

"""Chunk codecs of the data plane: turn a 1-D array into wire bytes and back.

What it is for: ``all_reduce(..., codec=...)`` picks one codec per call; the engine
encodes each chunk it sends with :meth:`Codec.encode` and decodes each chunk it
receives with :func:`decode_into`, which understands every wire codec id whatever
codec this rank asked for (zstd falls back to raw bytes chunk by chunk).

Wire codec ids (one byte in the frame header)::

    0 CODEC_NONE  raw little-endian bytes of the array (native layout)
    1 CODEC_ZSTD  one zstd frame that declares its content size (== out.nbytes)
    2 CODEC_FP16  float16 values (IEEE binary16), 2 bytes each
    3 CODEC_BF16  bfloat16 values, 2 bytes each
    4 CODEC_INT8  per-block int8 quantization, layout below

Lossy codecs (fp16, bf16, int8) take float32/float64 chunks only: the engine sends
accumulators, and narrow floats accumulate in float32 (see ``reduce.py``).

* fp16: values beyond +-65504 become +-inf on the wire, values below ~6e-8 become 0;
  NaN stays NaN. Round to nearest even.
* bf16: round to nearest even (ml_dtypes casts); float32's range is kept.
* int8 payload, all little-endian::

      u32      block            elements per block, > 0
      f32[nb]  scale per block  nb = ceil(count / block); scale = absmax / 127
      i8[count] values          q = rint(x / scale), within [-127, 127]

  Decoding gives ``q * scale``: the error per element is at most ``absmax / 254`` of
  its block (plus float rounding). An all-zero block has scale 0. A block holding NaN
  or +-inf is sent with scale NaN and q 0, so the whole block decodes to NaN: a
  poisoned gradient is never turned into finite garbage. For float64 input the scale
  is a float32: a block whose absmax exceeds float32's range is treated as non-finite
  (NaN). A block whose absmax is below ~1.5e-36 has a subnormal (less precise) scale,
  which loosens the error bound there; one whose scale underflows to 0 decodes to 0.
  At block 256 the payload is ``count * (1 + 4/256) + 4`` bytes, about 0.254x of
  float32. The decoder checks the header, the length and the scales (negative or
  infinite: ``bad-payload``) but not the values: a byte of -128, which no encoder
  writes, decodes to ``-128 * scale``, finite and within 1/127 of the block's range.
  Checking it would cost a pass over every int8 payload for a value that can only
  come from an authenticated peer's bug.

Every encode is a pure function of the input bytes, so the decoded values are
identical on every rank (the engine relies on that for bit parity).

What it must never do: touch sockets or frames, or start threads (it is thread-safe:
zstd contexts are cached per thread); trust a payload (every length and size field is
checked against ``out`` and a bad one raises ``FrameError("bad-payload")``); allocate
more than ``out.nbytes`` on behalf of a payload (zstd frames must declare their content
size, equal to ``out.nbytes``, and decode straight into ``out``); loop in Python over
elements or blocks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import zstandard

from phalanx.comm.reduce import bfloat16, check_dtype
from phalanx.errors import ConfigError, FrameError, UnsupportedError

__all__ = [
    "CODEC_BF16",
    "CODEC_FP16",
    "CODEC_INT8",
    "CODEC_NAMES",
    "CODEC_NONE",
    "CODEC_ZSTD",
    "Bf16Codec",
    "Codec",
    "Fp16Codec",
    "Int8Codec",
    "NoneCodec",
    "ZstdCodec",
    "decode_into",
    "parse_codec",
]

CODEC_NONE: Final = 0
CODEC_ZSTD: Final = 1
CODEC_FP16: Final = 2
CODEC_BF16: Final = 3
CODEC_INT8: Final = 4

CODEC_NAMES: Final[tuple[str, ...]] = ("none", "zstd", "fp16", "bf16", "int8")

ZSTD_DEFAULT_LEVEL: Final = 1
ZSTD_LEVELS: Final = range(-7, 23)  # zstd's fast (negative) levels and 1..22
INT8_DEFAULT_BLOCK: Final = 256
INT8_MAX_BLOCK: Final = 1 << 24

_VALID_SPECS: Final = (
    "none, zstd[:level=N] (N in -7..22, default 1), fp16, bf16, "
    "int8[:block=N] (N in 1..16777216, default 256)"
)

_F16: Final = np.dtype(np.float16)
_F32: Final = np.dtype(np.float32)
_F64: Final = np.dtype(np.float64)
_LOSSY_DTYPES: Final = (_F32, _F64)
_U8: Final = np.dtype(np.uint8)
_I8: Final = np.dtype(np.int8)
_SCALE: Final = np.dtype("<f4")
_INT8_HEADER: Final = 4


def _bytes_of(a: np.ndarray) -> memoryview:
    """A byte-format memoryview of a contiguous array (len == nbytes)."""
    return a.view(_U8).data


def _check_src(codec: Codec, src: np.ndarray) -> None:
    if not isinstance(src, np.ndarray) or src.ndim != 1 or not src.flags.c_contiguous:
        raise UnsupportedError("codecs encode 1-D C-contiguous numpy arrays only")
    if not codec.supports(src.dtype):
        raise UnsupportedError(f"codec {codec.name!r} does not support dtype {src.dtype}")


class Codec(ABC):
    """One way of putting a 1-D chunk on the wire. Instances are immutable and safe
    to share between threads."""

    name: ClassVar[str]
    lossy: ClassVar[bool]
    codec_id: ClassVar[int]

    def supports(self, dtype: np.dtype) -> bool:
        """Whether :meth:`encode` accepts chunks of ``dtype``."""
        if self.lossy:
            return any(dtype == d for d in _LOSSY_DTYPES)
        try:
            check_dtype(dtype)
        except UnsupportedError:
            return False
        return True

    @abstractmethod
    def max_encoded_nbytes(self, count: int, dtype: np.dtype) -> int:
        """Upper bound on the payload size for ``count`` elements of ``dtype``
        (whatever wire id :meth:`encode` ends up using)."""

    @abstractmethod
    def encode(self, src: np.ndarray) -> tuple[int, memoryview | bytes]:
        """Encode a 1-D C-contiguous chunk; return (wire codec id used, payload).

        The payload may be a view of ``src``: send it before changing ``src``.
        """

    @property
    def spec(self) -> str:
        """The string :func:`parse_codec` turns back into this codec."""
        return self.name


@dataclass(frozen=True)
class NoneCodec(Codec):
    """Raw bytes; the payload is a view of the chunk (no copy)."""

    name: ClassVar[str] = "none"
    lossy: ClassVar[bool] = False
    codec_id: ClassVar[int] = CODEC_NONE

    def max_encoded_nbytes(self, count: int, dtype: np.dtype) -> int:
        return count * np.dtype(dtype).itemsize

    def encode(self, src: np.ndarray) -> tuple[int, memoryview | bytes]:
        _check_src(self, src)
        return CODEC_NONE, _bytes_of(src)


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A per-thread compressor per level (zstd contexts are not thread-safe, and
    creating one per chunk would allocate its tables every time)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "compressors", None)
    if cache is None:
        cache = _tls.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "decompressor", None)
    if d is None:
        d = _tls.decompressor = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class ZstdCodec(Codec):
    """Lossless zstd; a chunk that would not shrink goes as raw bytes (CODEC_NONE)."""

    level: int = ZSTD_DEFAULT_LEVEL
    name: ClassVar[str] = "zstd"
    lossy: ClassVar[bool] = False
    codec_id: ClassVar[int] = CODEC_ZSTD

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or self.level not in ZSTD_LEVELS:
            raise ConfigError(f"zstd level must be in -7..22, got {self.level!r}")

    def max_encoded_nbytes(self, count: int, dtype: np.dtype) -> int:
        # Never more than raw: encode falls back to CODEC_NONE when zstd does not shrink.
        return count * np.dtype(dtype).itemsize

    def encode(self, src: np.ndarray) -> tuple[int, memoryview | bytes]:
        _check_src(self, src)
        raw = _bytes_of(src)
        if src.nbytes == 0:
            return CODEC_NONE, raw
        packed: bytes = _compressor(self.level).compress(raw)
        if len(packed) >= src.nbytes:
            return CODEC_NONE, raw
        return CODEC_ZSTD, packed

    @property
    def spec(self) -> str:
        return f"zstd:level={self.level}"


@dataclass(frozen=True)
class Fp16Codec(Codec):
    """float32/float64 -> IEEE float16 (overflow to +-inf, round to nearest even)."""

    name: ClassVar[str] = "fp16"
    lossy: ClassVar[bool] = True
    codec_id: ClassVar[int] = CODEC_FP16

    def max_encoded_nbytes(self, count: int, dtype: np.dtype) -> int:
        return 2 * count

    def encode(self, src: np.ndarray) -> tuple[int, memoryview | bytes]:
        _check_src(self, src)
        with np.errstate(over="ignore", under="ignore"):
            half = src.astype(_F16)
        return CODEC_FP16, _bytes_of(half)


@dataclass(frozen=True)
class Bf16Codec(Codec):
    """float32/float64 -> bfloat16 (round to nearest even, float32's range)."""

    name: ClassVar[str] = "bf16"
    lossy: ClassVar[bool] = True
    codec_id: ClassVar[int] = CODEC_BF16

    def max_encoded_nbytes(self, count: int, dtype: np.dtype) -> int:
        return 2 * count

    def encode(self, src: np.ndarray) -> tuple[int, memoryview | bytes]:
        _check_src(self, src)
        with np.errstate(over="ignore", under="ignore"):
            half = src.astype(bfloat16())
        return CODEC_BF16, _bytes_of(half)


def _int8_nbytes(count: int, block: int) -> int:
    return _INT8_HEADER + 4 * (-(-count // block)) + count


_BITS: Final[
    dict[np.dtype, tuple[np.dtype, np.dtype, np.unsignedinteger]]
] = {  # float dtype -> (same-size unsigned, signed, mask of all but the sign bit)
    _F32: (np.dtype(np.uint32), np.dtype(np.int32), np.uint32(0x7FFF_FFFF)),
    _F64: (np.dtype(np.uint64), np.dtype(np.int64), np.uint64(0x7FFF_FFFF_FFFF_FFFF)),
}


def _row_absmax(x: np.ndarray) -> np.ndarray:
    """max(|x|) per row of a 2-D float array; NaN if the row holds a NaN, else inf if
    it holds an inf.

    IEEE floats order like sign-magnitude integers, and NaN's magnitude bits exceed
    inf's, which exceed every finite value's. Viewed as unsigned, the row max is the
    largest-magnitude negative value if there is one (the sign bit is the top bit),
    else the largest positive one; viewed as signed, it is the largest positive value
    if there is one, else the largest-magnitude negative one. Masking off the sign bit
    of both and taking the larger gives the absmax. Integer max reductions run at
    memory speed and need no abs() temporary (float max along rows is ~6x slower).
    """
    unsigned, signed, mask = _BITS[x.dtype]
    hi_u = x.view(unsigned).max(axis=1)
    hi_s = x.view(signed).max(axis=1).view(unsigned)
    np.bitwise_and(hi_u, mask, out=hi_u)
    np.bitwise_and(hi_s, mask, out=hi_s)
    np.maximum(hi_u, hi_s, out=hi_u)
    absmax: np.ndarray = hi_u.view(x.dtype)
    return absmax


def _quantize_rows(x: np.ndarray, scales: np.ndarray, q: np.ndarray) -> None:
    """Quantize each row of ``x`` (rows, block) into ``q`` (int8, same shape) with its
    scale written to ``scales`` (rows,) float32."""
    absmax = _row_absmax(x)
    np.divide(absmax, 127, out=scales, casting="same_kind")
    bad = ~np.isfinite(scales)  # NaN/inf in the row, or float64 beyond float32's range
    has_bad = bool(bad.any())
    if has_bad:
        scales[bad] = np.nan
    # Divide (not multiply by 1/scale: that overflows for subnormal scales); all-zero
    # and bad rows divide by 1. The divisor is per row: (rows,) broadcast, no temporary.
    divisor = np.where(scales > 0, scales, 1).astype(x.dtype, copy=False)
    tmp = np.divide(x, divisor[:, None])
    if has_bad:
        tmp[bad] = 0  # NaN and inf would give NaN: make those rows' q 0, no invalid cast
    np.rint(tmp, out=tmp)
    # |x| <= absmax keeps |tmp| <= 127 for normal scales; a subnormal scale may have
    # been rounded down far enough to push |tmp| past 127: clip, never wrap around.
    np.clip(tmp, -127, 127, out=q, casting="unsafe")


@dataclass(frozen=True)
class Int8Codec(Codec):
    """Per-block absmax int8 quantization (layout in the module docstring)."""

    block: int = INT8_DEFAULT_BLOCK
    name: ClassVar[str] = "int8"
    lossy: ClassVar[bool] = True
    codec_id: ClassVar[int] = CODEC_INT8

    def __post_init__(self) -> None:
        if (
            isinstance(self.block, bool)
            or not isinstance(self.block, int)
            or not 1 <= self.block <= INT8_MAX_BLOCK
        ):
            raise ConfigError(f"int8 block must be in 1..{INT8_MAX_BLOCK}, got {self.block!r}")

    def max_encoded_nbytes(self, count: int, dtype: np.dtype) -> int:
        return _int8_nbytes(count, self.block)

    def encode(self, src: np.ndarray) -> tuple[int, memoryview | bytes]:
        _check_src(self, src)
        count, block = src.size, self.block
        nblocks = -(-count // block)
        nfull, tail = divmod(count, block)
        payload = np.empty(_int8_nbytes(count, block), dtype=_U8)
        payload[:_INT8_HEADER] = np.frombuffer(block.to_bytes(4, "little"), dtype=_U8)
        scales = payload[_INT8_HEADER : _INT8_HEADER + 4 * nblocks].view(_SCALE)
        q = payload[_INT8_HEADER + 4 * nblocks :].view(_I8)
        split = nfull * block
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            if nfull:
                _quantize_rows(
                    src[:split].reshape(nfull, block),
                    scales[:nfull],
                    q[:split].reshape(nfull, block),
                )
            if tail:
                _quantize_rows(
                    src[split:].reshape(1, tail), scales[nfull:], q[split:].reshape(1, tail)
                )
        return CODEC_INT8, payload.data

    @property
    def spec(self) -> str:
        return f"int8:block={self.block}"


def _byte_view(payload: memoryview | bytes) -> memoryview:
    """The payload as a flat byte memoryview (len == nbytes), or bad-payload."""
    try:
        view = memoryview(payload)
        if not view.c_contiguous:
            raise ValueError("not contiguous")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError, BufferError) as exc:
        raise FrameError("bad-payload", f"unreadable payload: {exc}") from None
    return view


def _expect_len(buf: np.ndarray, nbytes: int, what: str) -> None:
    if buf.size != nbytes:
        raise FrameError("bad-payload", f"{what} payload is {buf.size} bytes, expected {nbytes}")


def _decode_zstd(payload: memoryview, out: np.ndarray) -> None:
    try:
        params = zstandard.get_frame_parameters(payload)
    except (zstandard.ZstdError, TypeError, ValueError, BufferError) as exc:
        raise FrameError("bad-payload", f"zstd: {exc}") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise FrameError("bad-payload", "zstd frame does not declare its content size")
    if size != out.nbytes:
        raise FrameError("bad-payload", f"zstd frame holds {size} bytes, expected {out.nbytes}")
    dst = out.view(_U8)
    try:
        # Reading the whole frame at once into a buffer of exactly its content size
        # lets zstd decode straight into ``out`` (no window buffer, no copy).
        with _decompressor().stream_reader(payload, read_size=max(payload.nbytes, 1)) as reader:
            got = reader.readinto(dst)
            extra = reader.read(1)
    except (zstandard.ZstdError, ValueError, TypeError, MemoryError) as exc:
        raise FrameError("bad-payload", f"zstd: {exc}") from None
    if got != out.nbytes or extra:
        raise FrameError("bad-payload", "zstd frame truncated or followed by extra data")


def _decode_int8(buf: np.ndarray, out: np.ndarray) -> None:
    count = out.size
    if buf.size < _INT8_HEADER:
        raise FrameError("bad-payload", f"int8 payload of {buf.size} bytes has no header")
    block = int.from_bytes(buf[:_INT8_HEADER].tobytes(), "little")
    if not 1 <= block <= INT8_MAX_BLOCK:
        raise FrameError("bad-payload", f"int8 block size {block} outside 1..{INT8_MAX_BLOCK}")
    _expect_len(buf, _int8_nbytes(count, block), f"int8 (block {block}, count {count})")
    nblocks = -(-count // block)
    scales = buf[_INT8_HEADER : _INT8_HEADER + 4 * nblocks].view(_SCALE)
    if bool(np.any(scales < 0)) or bool(np.any(np.isinf(scales))):
        raise FrameError("bad-payload", "int8 scale negative or infinite")
    q = buf[_INT8_HEADER + 4 * nblocks :].view(_I8)
    nfull, tail = divmod(count, block)
    split = nfull * block
    if nfull:
        np.multiply(
            q[:split].reshape(nfull, block),
            scales[:nfull, None],
            out=out[:split].reshape(nfull, block),
            dtype=out.dtype,
        )
    if tail:
        np.multiply(q[split:], scales[nfull], out=out[split:], dtype=out.dtype)


def decode_into(codec_id: int, payload: memoryview | bytes, out: np.ndarray) -> None:
    """Decode a payload of any wire codec id into ``out``.

    ``out`` is 1-D, C-contiguous, writable, of the dtype and length that was encoded.
    Raises ``FrameError("bad-codec")`` for an unknown id (or a lossy id for a dtype no
    lossy codec encodes) and ``FrameError("bad-payload")`` for a payload that does not
    match ``out``; ``out`` may then hold partial data.
    """
    if (
        not isinstance(out, np.ndarray)
        or out.ndim != 1
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise UnsupportedError("decode_into needs a 1-D, C-contiguous, writable numpy array")
    view = _byte_view(payload)
    if codec_id == CODEC_ZSTD:
        _decode_zstd(view, out)
        return
    buf = np.frombuffer(view, dtype=_U8)
    if codec_id == CODEC_NONE:
        _expect_len(buf, out.nbytes, "raw")
        out.view(_U8)[...] = buf
        return
    if codec_id not in (CODEC_FP16, CODEC_BF16, CODEC_INT8):
        raise FrameError("bad-codec", f"unknown codec id {codec_id!r}")
    if not any(out.dtype == d for d in _LOSSY_DTYPES):
        raise FrameError("bad-codec", f"lossy codec id {codec_id} for dtype {out.dtype}")
    if codec_id == CODEC_INT8:
        _decode_int8(buf, out)
        return
    _expect_len(buf, 2 * out.size, CODEC_NAMES[codec_id])
    np.copyto(out, buf.view(_F16 if codec_id == CODEC_FP16 else bfloat16()), casting="same_kind")


def _parse_params(name: str, params: str, allowed: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in params.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key != allowed or key in result:
            raise ConfigError(
                f"bad parameter {item!r} for codec {name!r}; valid codecs: {_VALID_SPECS}"
            )
        try:
            result[key] = int(value.strip())
        except ValueError:
            raise ConfigError(
                f"{name} {key} must be an integer, got {value!r}; valid codecs: {_VALID_SPECS}"
            ) from None
    return result


def parse_codec(spec: str) -> Codec:
    """Build a codec from its spec: ``none``, ``zstd``, ``zstd:level=3``, ``fp16``,
    ``bf16``, ``int8``, ``int8:block=128``. Raises :class:`ConfigError` otherwise."""
    if not isinstance(spec, str):
        raise ConfigError(f"codec spec must be a string, got {spec!r}; valid: {_VALID_SPECS}")
    name, sep, params = spec.strip().partition(":")
    name = name.strip().lower()
    if name == "none" and not sep:
        return NoneCodec()
    if name == "fp16" and not sep:
        return Fp16Codec()
    if name == "bf16" and not sep:
        bfloat16()  # loads ml_dtypes (~1 s, once) here, on the caller's thread, not mid-op
        return Bf16Codec()
    if name == "zstd":
        if not sep:
            return ZstdCodec()
        return ZstdCodec(level=_parse_params(name, params, "level")["level"])
    if name == "int8":
        if not sep:
            return Int8Codec()
        return Int8Codec(block=_parse_params(name, params, "block")["block"])
    raise ConfigError(f"unknown codec {spec!r}; valid codecs: {_VALID_SPECS}")

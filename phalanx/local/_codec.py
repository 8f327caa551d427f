"""The local protocol's binary encoding, derived from each message dataclass's fields.

``schema(cls)`` compiles, once per class, how its fields are written: first every
fixed-size field (in declaration order, packed with one ``struct``), then the others in
declaration order. ``int`` as i64, ``float`` as f64, ``bool`` as one byte (0/1), ``str`` as u16
length + UTF-8 (at most :data:`MAX_STR` bytes), ``X | None`` as a presence byte (0/1)
+ X, ``tuple[X, ...]`` as u32 count + items, a fixed ``tuple[X, Y]`` item by item, a
nested dataclass inline, and :data:`phalanx.errors.Value` (an error's field value) as a
tag byte + its value.

Decoding reads from ``bytes`` and checks every length against what is left before it
trusts it (a count larger than the bytes left is refused before anything is built),
then builds the dataclass, whose constructor validates the values. Whatever is wrong
raises :class:`~phalanx.errors.ProtocolError`.

Pure functions: this module must never touch a socket or import the rest of the
local package.
"""

from __future__ import annotations

import operator
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

from phalanx.errors import ProtocolError, Value

__all__ = ["MAX_STR", "Schema", "decode_body", "schema"]

MAX_STR = 4096

_Enc = Callable[[Any, bytearray], None]
_Dec = Callable[[bytes, int], tuple[Any, int]]
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_FIXED = {int: "q", float: "d", bool: "?"}


def _enc_str(v: str, out: bytearray) -> None:
    raw = v.encode()
    if len(raw) > MAX_STR:
        raise ProtocolError(f"string of {len(raw)} bytes exceeds {MAX_STR}")
    out += _U16.pack(len(raw))
    out += raw


def _dec_str(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = _U16.unpack_from(buf, pos)
    end = pos + 2 + n
    if n > MAX_STR or end > len(buf):
        raise ProtocolError(f"a string of {n} bytes does not fit the message")
    return buf[pos + 2 : end].decode(), end


_TAG_NONE, _TAG_FALSE, _TAG_TRUE, _TAG_INT, _TAG_FLOAT, _TAG_STR, _TAG_INTS, _TAG_STRS = range(8)
_MAX_STRS = 4096  # strings in one value (a per-rank table of an error)


def _enc_value(v: Value, out: bytearray) -> None:
    if v is None:
        out.append(_TAG_NONE)
    elif isinstance(v, bool):
        out.append(_TAG_TRUE if v else _TAG_FALSE)
    elif isinstance(v, int):
        out.append(_TAG_INT)
        out += _I64.pack(v)
    elif isinstance(v, float):
        out.append(_TAG_FLOAT)
        out += _F64.pack(v)
    elif isinstance(v, str):
        out.append(_TAG_STR)
        _enc_str(v, out)
    elif v and all(isinstance(t, str) for t in v):
        out.append(_TAG_STRS)
        out += _U32.pack(len(v))
        for t in v:
            _enc_str(str(t), out)
    else:
        out.append(_TAG_INTS)
        out += _U32.pack(len(v))
        for r in v:
            out += _I64.pack(int(r))


def _dec_value(buf: bytes, pos: int) -> tuple[Value, int]:
    tag = buf[pos]
    pos += 1
    if tag == _TAG_NONE:
        return None, pos
    if tag in (_TAG_FALSE, _TAG_TRUE):
        return tag == _TAG_TRUE, pos
    if tag == _TAG_INT:
        return _I64.unpack_from(buf, pos)[0], pos + 8
    if tag == _TAG_FLOAT:
        return _F64.unpack_from(buf, pos)[0], pos + 8
    if tag == _TAG_STR:
        return _dec_str(buf, pos)
    if tag == _TAG_INTS:
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        if 8 * n > len(buf) - pos:
            raise ProtocolError(f"a list of {n} integers does not fit the message")
        return struct.unpack_from(f"<{n}q", buf, pos), pos + 8 * n
    if tag == _TAG_STRS:
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        if n > _MAX_STRS or 2 * n > len(buf) - pos:
            raise ProtocolError(f"a list of {n} strings does not fit the message")
        items = []
        for _ in range(n):
            t, pos = _dec_str(buf, pos)
            items.append(t)
        return tuple(items), pos
    raise ProtocolError(f"unknown value tag {tag}")


def _optional(inner: tuple[_Enc, _Dec]) -> tuple[_Enc, _Dec]:
    inner_enc, inner_dec = inner

    def enc(v: Any, out: bytearray) -> None:
        if v is None:
            out.append(0)
        else:
            out.append(1)
            inner_enc(v, out)

    def dec(buf: bytes, pos: int) -> tuple[Any, int]:
        flag = buf[pos]
        if flag == 0:
            return None, pos + 1
        if flag != 1:
            raise ProtocolError("a presence byte must be 0 or 1")
        return inner_dec(buf, pos + 1)

    return enc, dec


def _sequence(item: tuple[_Enc, _Dec]) -> tuple[_Enc, _Dec]:
    item_enc, item_dec = item

    def enc(v: Any, out: bytearray) -> None:
        out += _U32.pack(len(v))
        for x in v:
            item_enc(x, out)

    def dec(buf: bytes, pos: int) -> tuple[Any, int]:
        (n,) = _U32.unpack_from(buf, pos)
        pos += 4
        if n > len(buf) - pos:  # every item takes at least one byte
            raise ProtocolError(f"a list of {n} items does not fit the message")
        items = []
        for _ in range(n):
            x, pos = item_dec(buf, pos)
            items.append(x)
        return tuple(items), pos

    return enc, dec


def _record(parts: list[tuple[_Enc, _Dec]]) -> tuple[_Enc, _Dec]:
    def enc(v: Any, out: bytearray) -> None:
        for (e, _), x in zip(parts, v, strict=True):
            e(x, out)

    def dec(buf: bytes, pos: int) -> tuple[Any, int]:
        items = []
        for _, d in parts:
            x, pos = d(buf, pos)
            items.append(x)
        return tuple(items), pos

    return enc, dec


def _scalar(code: str) -> tuple[_Enc, _Dec]:
    s = struct.Struct("<" + code)
    boolean = code == "?"

    def enc(v: Any, out: bytearray) -> None:
        out += s.pack(v)

    def dec(buf: bytes, pos: int) -> tuple[Any, int]:
        if boolean and buf[pos] > 1:
            raise ProtocolError("a boolean must be 0 or 1")
        return s.unpack_from(buf, pos)[0], pos + s.size

    return enc, dec


def _field_codec(hint: Any) -> tuple[_Enc, _Dec]:
    """The encoder and decoder of one field type."""
    if hint in _FIXED:
        return _scalar(_FIXED[hint])
    if hint is str:
        return _enc_str, _dec_str
    if hint == Value:
        return _enc_value, _dec_value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        return _optional(_field_codec(next(a for a in args if a is not type(None))))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_field_codec(args[0]))
    if origin is tuple and args:
        return _record([_field_codec(a) for a in args])
    if isinstance(hint, type) and is_dataclass(hint):
        sch = schema(hint)
        return sch.encode_into, sch.decode_from
    raise TypeError(f"the local protocol cannot encode {hint!r}")


class Schema:
    """How one dataclass is encoded (see the module docstring)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        fixed = [n for n in names if hints[n] in _FIXED]
        var = [n for n in names if hints[n] not in _FIXED]
        codes = "".join(_FIXED[hints[n]] for n in fixed)
        self.packer = struct.Struct("<" + codes)
        offsets = [struct.calcsize("<" + codes[:i]) for i in range(len(codes))]
        self.bools = tuple(off for off, c in zip(offsets, codes, strict=True) if c == "?")
        self.codecs = [_field_codec(hints[n]) for n in var]
        self._get = operator.attrgetter(*fixed, *var) if names else (lambda msg: ())
        self.nfixed = len(fixed)
        # wire position of each field, in declaration order
        wire = fixed + var
        self._order = [wire.index(n) for n in names]
        self._identity = self._order == list(range(len(names)))

    def encode_into(self, msg: Any, out: bytearray) -> None:
        values = self._get(msg)
        if not isinstance(values, tuple):
            values = (values,)
        nfixed = self.nfixed
        if nfixed:
            out += self.packer.pack(*values[:nfixed])
        for (enc, _), v in zip(self.codecs, values[nfixed:], strict=True):
            enc(v, out)

    def decode_from(self, buf: bytes, pos: int) -> tuple[Any, int]:
        for off in self.bools:
            if buf[pos + off] > 1:
                raise ProtocolError("a boolean must be 0 or 1")
        values = list(self.packer.unpack_from(buf, pos))
        pos += self.packer.size
        for _, dec in self.codecs:
            value, pos = dec(buf, pos)
            values.append(value)
        if not self._identity:
            values = [values[i] for i in self._order]
        try:
            return self.cls(*values), pos
        except ProtocolError:
            raise
        except (ValueError, TypeError) as exc:  # the constructor's own validation
            raise ProtocolError(f"bad {self.cls.__name__}: {exc}") from None


_SCHEMAS: dict[type, Schema] = {}


def schema(cls: type) -> Schema:
    """The (cached) schema of a message dataclass; raises TypeError for a field type
    the encoding does not cover."""
    sch = _SCHEMAS.get(cls)
    if sch is None:
        sch = _SCHEMAS[cls] = Schema(cls)
    return sch


def decode_body(cls: type, body: bytes) -> Any:
    """A whole message body of ``cls``; trailing bytes, a short body, or a value its
    constructor refuses raise ProtocolError."""
    try:
        message, pos = schema(cls).decode_from(body, 0)
    except (struct.error, IndexError):
        raise ProtocolError(f"a {cls.__name__} body ends early") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"a {cls.__name__} holds a string that is not UTF-8") from None
    if pos != len(body):
        raise ProtocolError(f"{len(body) - pos} trailing bytes after a {cls.__name__}")
    return message

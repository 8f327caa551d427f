"""Encode a torch ``state_dict``-like tree as plain bytes plus flat arrays, and back.

A state dict is nested dicts (keys: str, int, ...; ``OrderedDict`` s keep their type
and ``_metadata``, which ``load_state_dict`` reads), lists and tuples whose leaves are
tensors, numpy arrays and plain values (None, bool, int, float incl. nan/inf, str,
bytes, ``torch.dtype``, ``torch.Size``). phalanx moves named numpy arrays (snapshots,
state sync), so :func:`encode` splits a tree into

* a **header**: canonical JSON of the structure with every tensor replaced by a
  reference ``{"T": i, "dt": "float32", "sh": [2, 3]}`` (array ``i`` of the list), and
* **arrays**: each tensor's raw bytes as a flat ``uint8`` numpy array (a zero-copy view
  of a contiguous CPU tensor), so any torch dtype (bfloat16, bool, complex, ...) travels
  exactly.

:func:`decode` rebuilds the tree with the same nesting, key types, container types,
dtypes, shapes and bytes (tensors share the given arrays' memory: no copy). :func:`pack`
/ :func:`unpack` put header and arrays into one ``bytes`` blob (small trees: the
manager's plain-value state). The JSON is canonical (no whitespace, insertion order
kept), so equal trees built the same way give equal bytes on every member.

Pure: no I/O, no threads. It must never pickle (unpickling runs code) nor accept a
value it could not give back exactly.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from phalanx.torch.errors import StateLayoutError

__all__ = ["decode", "encode", "pack", "tensor_bytes", "unpack"]

_MAGIC = b"PXT1"
_HEAD = struct.Struct("<4sII")  # magic, header length, number of arrays
_ALIGN = 8

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
        torch.complex128, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.bool, torch.uint16, torch.uint32, torch.uint64,
    )
}  # fmt: skip


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a flat uint8 array (a view when it is contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return np.zeros(0, np.uint8)
    arr: np.ndarray = t.reshape(-1).view(torch.uint8).numpy()
    return arr


def _dtype_name(dt: torch.dtype, path: str) -> str:
    name = str(dt).removeprefix("torch.")
    if name not in _DTYPES:
        raise StateLayoutError(f"tensors of dtype {dt} cannot be encoded", path)
    return name


def _key(k: Any, path: str) -> Any:
    if isinstance(k, bool) or k is None:
        return {"k": k}
    if isinstance(k, str):
        return k
    if isinstance(k, int):
        return {"i": k}
    if isinstance(k, float):
        return {"kf": repr(k)}
    if isinstance(k, tuple):
        return {"kt": [_key(x, path) for x in k]}
    raise StateLayoutError(f"dict keys of type {type(k).__name__} cannot be encoded", path)


def _unkey(k: Any) -> Any:
    if isinstance(k, str):
        return k
    if "k" in k:
        return k["k"]
    if "i" in k:
        return int(k["i"])
    if "kf" in k:
        return float(k["kf"])
    return tuple(_unkey(x) for x in k["kt"])


def _enc(obj: Any, arrays: list[np.ndarray], path: str) -> Any:
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return obj if -(2**63) <= obj < 2**63 else {"I": str(obj)}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"F": repr(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.layout != torch.strided:
            raise StateLayoutError("sparse tensors cannot be encoded", path)
        arrays.append(tensor_bytes(obj))
        ref: dict[str, Any] = {
            "T": len(arrays) - 1, "dt": _dtype_name(obj.dtype, path), "sh": list(obj.shape),
        }  # fmt: skip
        if isinstance(obj, torch.nn.Parameter):
            ref["P"] = bool(obj.requires_grad)
        return ref
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or obj.dtype.fields is not None:
            raise StateLayoutError(f"numpy arrays of dtype {obj.dtype} cannot be encoded", path)
        data = np.ascontiguousarray(obj)
        arrays.append(data.reshape(-1).view(np.uint8) if data.size else np.zeros(0, np.uint8))
        return {"A": len(arrays) - 1, "dt": _np_dtype_name(obj.dtype), "sh": list(obj.shape)}
    if isinstance(obj, bytes | bytearray):
        return {"b": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, torch.dtype):
        return {"dt": _dtype_name(obj, path)}
    if isinstance(obj, torch.Size):
        return {"S": [int(d) for d in obj]}
    if isinstance(obj, OrderedDict):  # what state_dict() returns, with its _metadata
        node: dict[str, Any] = {
            "o": [[_key(k, path), _enc(v, arrays, f"{path}/{k}")] for k, v in obj.items()]
        }
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            node["m"] = _enc(meta, arrays, f"{path}/_metadata")
        return node
    if isinstance(obj, Mapping):
        return {"d": [[_key(k, path), _enc(v, arrays, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"l": [_enc(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, tuple):
        return {"u": [_enc(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, np.generic):
        return _enc(obj.item(), arrays, path)
    raise StateLayoutError(f"values of type {type(obj).__name__} cannot be encoded", path)


def _np_dtype_name(dt: np.dtype[Any]) -> str:
    return dt.name if dt.kind == "V" else dt.str


def _np_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return dt


def _as_bytes(arr: np.ndarray) -> np.ndarray:
    """A flat uint8 view of whatever dtype the array came back as (restore gives the
    bytes back as uint8 already; be lenient)."""
    a = np.ascontiguousarray(arr)
    return a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)


def _dec(node: Any, arrays: list[np.ndarray]) -> Any:
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, dict):
        if "T" in node:
            raw = _as_bytes(arrays[int(node["T"])])
            dt = _DTYPES[str(node["dt"])]
            shape = tuple(int(d) for d in node["sh"])
            if raw.size == 0:
                t = torch.empty(shape, dtype=dt)
            else:
                t = torch.from_numpy(raw).view(dt).reshape(shape)
            if "P" in node:
                return torch.nn.Parameter(t, requires_grad=bool(node["P"]))
            return t
        if "A" in node:
            raw = _as_bytes(arrays[int(node["A"])])
            return raw.view(_np_dtype(str(node["dt"]))).reshape(tuple(node["sh"]))
        if "d" in node:
            return {_unkey(k): _dec(v, arrays) for k, v in node["d"]}
        if "o" in node:
            od: OrderedDict[Any, Any] = OrderedDict(
                (_unkey(k), _dec(v, arrays)) for k, v in node["o"]
            )
            if "m" in node:
                od._metadata = _dec(node["m"], arrays)  # type: ignore[attr-defined]
            return od
        if "l" in node:
            return [_dec(v, arrays) for v in node["l"]]
        if "u" in node:
            return tuple(_dec(v, arrays) for v in node["u"])
        if "I" in node:
            return int(node["I"])
        if "F" in node:
            return float(node["F"])
        if "b" in node:
            return base64.b64decode(node["b"])
        if "S" in node:
            return torch.Size(int(d) for d in node["S"])
        if "dt" in node:
            return _DTYPES[str(node["dt"])]
    raise StateLayoutError(f"malformed encoded tree node {str(node)[:80]!r}")


def encode(tree: Any) -> tuple[bytes, list[np.ndarray]]:
    """(canonical JSON header, each tensor's bytes as a flat uint8 array)."""
    arrays: list[np.ndarray] = []
    root = _enc(tree, arrays, "")
    header = json.dumps(root, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return header.encode(), arrays


def decode(header: bytes, arrays: list[np.ndarray]) -> Any:
    """The tree :func:`encode` was given (tensors over ``arrays``' memory)."""
    try:
        root = json.loads(header.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateLayoutError(f"encoded tree header is not JSON: {exc}") from exc
    return _dec(root, arrays)


def pack(tree: Any) -> bytes:
    """One blob: a 12-byte head, the header, then every array (8-byte aligned)."""
    header, arrays = encode(tree)
    parts = [_HEAD.pack(_MAGIC, len(header), len(arrays)), header]
    size = _HEAD.size + len(header)
    table = []
    for a in arrays:
        table.append(a.size)
    lens = struct.pack(f"<{len(table)}Q", *table)
    parts.append(lens)
    size += len(lens)
    for a in arrays:
        pad = -size % _ALIGN
        parts.append(b"\0" * pad)
        parts.append(a.tobytes())
        size += pad + a.size
    return b"".join(parts)


def unpack(blob: bytes | memoryview | np.ndarray) -> Any:
    """The tree of a :func:`pack` blob (tensors are copies: the blob may be reused)."""
    buf = np.frombuffer(blob, np.uint8) if not isinstance(blob, np.ndarray) else blob
    if buf.size < _HEAD.size:
        raise StateLayoutError("packed state is shorter than its head")
    magic, hlen, n = _HEAD.unpack(buf[: _HEAD.size].tobytes())
    if magic != _MAGIC:
        raise StateLayoutError(f"packed state has a bad magic {magic!r}")
    pos = _HEAD.size
    header = buf[pos : pos + hlen].tobytes()
    pos += hlen
    lens = struct.unpack(f"<{n}Q", buf[pos : pos + 8 * n].tobytes())
    pos += 8 * n
    arrays = []
    for ln in lens:
        pos += -pos % _ALIGN
        if pos + ln > buf.size:
            raise StateLayoutError("packed state is truncated")
        arrays.append(buf[pos : pos + ln].copy())
        pos += ln
    return decode(header, arrays)

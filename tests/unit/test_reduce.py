"""Reduce ops against an independent computation (python ints, exact float64 math)."""

from __future__ import annotations

import subprocess
import sys
import zlib
from collections.abc import Callable
from functools import reduce as fold

import ml_dtypes
import numpy as np
import pytest

from phalanx.comm.reduce import (
    DTYPE_NAMES,
    ReduceOp,
    accumulation_dtype,
    check_dtype,
    combine,
    finalize,
    parse_op,
    reference,
    supported_dtypes,
)
from phalanx.errors import ConfigError, UnsupportedError

OPS: tuple[ReduceOp, ...] = ("sum", "avg", "min", "max", "prod")
INT_DTYPES = ("int32", "int64", "uint8")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
WORLD = 3
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
N = 40


def _wrap(value: int, dtype: np.dtype) -> int:
    """``value`` reduced modulo 2**bits into the range of integer ``dtype``."""
    info = np.iinfo(dtype)
    span = int(info.max) - int(info.min) + 1
    return (value - int(info.min)) % span + int(info.min)


_PY_OPS: dict[str, Callable[[list[int]], int]] = {
    "sum": sum,
    "min": min,
    "max": max,
    "prod": lambda xs: fold(lambda a, b: a * b, xs, 1),
}


def _int_inputs(dtype: np.dtype, op: str, rng: np.random.Generator) -> list[np.ndarray]:
    info = np.iinfo(dtype)
    if op == "avg" and dtype == np.int64:
        lo, hi = -(2**40), 2**40  # keep the exact sum inside int64
    else:
        lo, hi = int(info.min), int(info.max)
    return [rng.integers(lo, hi, size=N, dtype=dtype, endpoint=True) for _ in range(WORLD)]


@pytest.mark.parametrize("name", INT_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_integer_ops_match_python_ints(name: str, op: ReduceOp) -> None:
    dtype = supported_dtypes()[name]
    inputs = _int_inputs(dtype, op, np.random.default_rng(zlib.crc32(f"{name}/{op}".encode())))
    columns = [[int(x[i]) for x in inputs] for i in range(N)]
    if op == "avg":
        expected = [sum(col) // WORLD for col in columns]  # floor, also for negatives
    else:
        expected = [_wrap(_PY_OPS[op](col), dtype) for col in columns]
    got = reference(inputs, op)
    assert got.dtype == dtype
    assert [int(v) for v in got] == expected


def _exact_float_inputs(op: str, rng: np.random.Generator) -> list[np.ndarray]:
    """float64 values whose sums/products are exact in every supported float dtype."""
    if op == "prod":
        choices = np.array([-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0])
        return [rng.choice(choices, size=N) for _ in range(WORLD)]
    return [rng.integers(-64, 64, size=N) / 4.0 for _ in range(WORLD)]


@pytest.mark.parametrize("name", FLOAT_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_float_ops_match_float64_math(name: str, op: ReduceOp) -> None:
    dtype = supported_dtypes()[name]
    exact = _exact_float_inputs(op, np.random.default_rng(zlib.crc32(f"{name}/{op}".encode())))
    inputs = [x.astype(dtype) for x in exact]
    assert all((x.astype(np.float64) == e).all() for x, e in zip(inputs, exact, strict=True))
    stacked = np.stack(exact)
    if op == "avg":
        expected = stacked.sum(axis=0) / WORLD
    else:
        expected = {
            "sum": stacked.sum(axis=0),
            "min": stacked.min(axis=0),
            "max": stacked.max(axis=0),
            "prod": stacked.prod(axis=0),
        }[op]
    got = reference(inputs, op)
    assert got.dtype == dtype
    if op == "avg":
        eps = EPS[name]
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=eps, atol=0)
    else:
        np.testing.assert_array_equal(got.astype(np.float64), expected)


def test_uint8_sum_wraps_exactly() -> None:
    a = np.array([200, 255, 0], dtype=np.uint8)
    b = np.array([100, 1, 0], dtype=np.uint8)
    out = np.empty(3, dtype=np.uint8)
    combine(a, b, out, "sum")
    assert out.tolist() == [(200 + 100) % 256, 0, 0]
    assert reference([a, b], "sum").tolist() == [44, 0, 0]
    assert reference([a, b], "prod").tolist() == [(200 * 100) % 256, 255, 0]


def test_int64_wraps_without_float() -> None:
    big = np.array([2**62 + 1], dtype=np.int64)
    got = reference([big, big, big], "sum")
    assert int(got[0]) == _wrap(3 * (2**62 + 1), np.dtype(np.int64))
    # the same through float64 would have lost the low bit
    assert int(got[0]) & 1 == 1


@pytest.mark.parametrize(
    ("name", "values", "narrow_result", "wide_result"),
    [
        # float16 spacing at 2048 is 2: 2048+1 rounds back to 2048 (ties to even).
        ("float16", [2048.0, 1.0, 1.0], 2048.0, 2050.0),
        # bfloat16 spacing at 256 is 2.
        ("bfloat16", [256.0, 1.0, 1.0], 256.0, 258.0),
    ],
)
def test_narrow_floats_accumulate_in_float32(
    name: str, values: list[float], narrow_result: float, wide_result: float
) -> None:
    dtype = supported_dtypes()[name]
    assert accumulation_dtype(dtype, "sum") == np.float32
    inputs = [np.array([v], dtype=dtype) for v in values]
    narrow = inputs[0].copy()
    for x in inputs[1:]:
        np.add(narrow, x, out=narrow)  # what accumulating in the narrow dtype gives
    assert float(narrow[0]) == narrow_result
    got = reference(inputs, "sum")
    assert got.dtype == dtype
    assert float(got[0]) == wide_result


@pytest.mark.parametrize("name", INT_DTYPES)
def test_integer_avg_floors(name: str) -> None:
    dtype = supported_dtypes()[name]
    if dtype.kind == "u":
        rows = [[1, 2], [3, 4, 4], [255, 254]]
    else:
        rows = [[-1, 0], [-3, 0], [1, 2], [-7, 1, 1]]
    for row in rows:
        got = reference([np.array([v], dtype=dtype) for v in row], "avg")
        assert int(got[0]) == sum(row) // len(row)


def test_accumulation_dtypes() -> None:
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    for op in OPS:
        assert accumulation_dtype(supported_dtypes()["float16"], op) == f32
        assert accumulation_dtype(supported_dtypes()["bfloat16"], op) == f32
        assert accumulation_dtype(np.dtype(np.float64), op) == np.float64
        assert accumulation_dtype(np.dtype(np.float32), op) == f32
        for name in INT_DTYPES:
            dtype = supported_dtypes()[name]
            assert accumulation_dtype(dtype, op) == (i64 if op == "avg" else dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["float32", "int32"])
def test_combine_aliasing(op: ReduceOp, name: str) -> None:
    rng = np.random.default_rng(7)
    dtype = accumulation_dtype(supported_dtypes()[name], op)
    a = rng.integers(-50, 50, size=N).astype(dtype)
    b = rng.integers(-50, 50, size=N).astype(dtype)
    fresh = np.empty_like(a)
    combine(a, b, fresh, op)
    left, right = a.copy(), b.copy()
    combine(left, b, left, op)
    combine(a, right, right, op)
    np.testing.assert_array_equal(left, fresh)
    np.testing.assert_array_equal(right, fresh)
    np.testing.assert_array_equal(a, a.copy())  # inputs not aliased stay untouched


def test_min_max_propagate_nan() -> None:
    a = np.array([np.nan, 1.0], dtype=np.float32)
    b = np.array([0.0, np.nan], dtype=np.float32)
    for op in ("min", "max"):
        out = np.empty_like(a)
        combine(a, b, out, op)
        assert np.isnan(out).all()


def test_finalize_float_avg_and_alias() -> None:
    acc = np.array([1.0, 2.0, 7.0], dtype=np.float32)
    finalize(acc, "avg", 3, acc)
    np.testing.assert_array_equal(acc, np.array([1.0, 2.0, 7.0], np.float32) / np.float32(3))


@pytest.mark.parametrize(("name", "one_bits"), [("float16", 0x3C00), ("bfloat16", 0x3F80)])
def test_finalize_rounds_to_nearest_even(name: str, one_bits: int) -> None:
    dtype = supported_dtypes()[name]
    # float32 values exactly halfway between two adjacent narrow values: the one with an
    # even mantissa must win (1.0 has an even mantissa, its successor an odd one).
    bits = np.array([one_bits, one_bits + 1, one_bits + 2], dtype=np.uint16)
    narrow = bits.view(dtype).astype(np.float32)
    ties = (narrow[:2] + narrow[1:]) / np.float32(2)
    assert (ties > narrow[:2]).all() and (ties < narrow[1:]).all()
    rng = np.random.default_rng(3)
    acc = np.concatenate([ties, -ties, (rng.standard_normal(N) * 1000).astype(np.float32)])
    out = np.empty(acc.size, dtype=dtype)
    finalize(acc.copy(), "sum", 2, out)
    got = out.view(np.uint16)
    sign = np.uint16(0x8000)
    assert got[:4].tolist() == [bits[0], bits[2], bits[0] | sign, bits[2] | sign]
    # the rest: the nearest narrow value
    err = np.abs(out[4:].astype(np.float64) - acc[4:])
    magnitude = got[4:] & np.uint16(0x7FFF)
    spacing = (magnitude + np.uint16(1)).view(dtype).astype(np.float64) - magnitude.view(
        dtype
    ).astype(np.float64)
    assert (err <= spacing / 2).all()
    np.testing.assert_array_equal(got, acc.astype(dtype).view(np.uint16))


def test_finalize_int_avg_casts_back() -> None:
    acc = np.array([255 * 4, 7, -5], dtype=np.int64)
    out = np.empty(3, dtype=np.int32)
    finalize(acc, "avg", 4, out)
    assert out.tolist() == [255, 1, -2]


@pytest.mark.parametrize(
    "bad",
    [
        np.dtype(bool),
        np.dtype(np.int8),
        np.dtype(np.int16),
        np.dtype(np.uint16),
        np.dtype(np.complex64),
        np.dtype(object),
        np.dtype(">f4"),
        np.dtype("V2"),
        np.dtype("U3"),
        np.dtype(ml_dtypes.float8_e4m3fn),
    ],
)
def test_check_dtype_refuses(bad: np.dtype) -> None:
    with pytest.raises(UnsupportedError) as info:
        check_dtype(bad)
    assert isinstance(info.value, TypeError)
    assert "bfloat16" in str(info.value) and "uint8" in str(info.value)


def test_check_dtype_accepts_all_supported() -> None:
    for name, dtype in supported_dtypes().items():
        assert check_dtype(np.dtype(dtype)) == dtype
        assert check_dtype(np.dtype(dtype).newbyteorder("=")).name == name


def test_bad_ops_and_arguments() -> None:
    for bad in ("mean", "SUM", "", "band"):
        with pytest.raises(ConfigError) as info:
            parse_op(bad)
        assert isinstance(info.value, ValueError)
        assert all(op in str(info.value) for op in OPS)
    for op in OPS:
        assert parse_op(op) == op
    x = np.zeros(2, np.float32)
    with pytest.raises(ConfigError):
        combine(x, x, x, "mean")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        finalize(x, "avg", 0, x)
    with pytest.raises(ConfigError):
        finalize(x, "sum", 1, np.zeros(3, np.float32))
    with pytest.raises(ConfigError):
        reference([], "sum")
    with pytest.raises(ConfigError):
        reference([x, np.zeros(2, np.float64)], "sum")
    with pytest.raises(UnsupportedError):
        reference([np.zeros(2, np.int8)], "sum")


def test_reference_keeps_shape_and_returns_new_array() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = reference([a, a], "sum")
    assert got.shape == (2, 3) and got.dtype == np.float32
    assert not np.shares_memory(got, a)
    np.testing.assert_array_equal(got, a * 2)
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))


_FRESH_PROCESS = """
import sys
import phalanx.client, phalanx.comm, phalanx.cli, phalanx.daemon
from phalanx.comm.reduce import check_dtype
loaded_at_import = "ml_dtypes" in sys.modules
import numpy as np
assert check_dtype(np.float32) == np.float32
assert "ml_dtypes" not in sys.modules, "checking a numpy dtype imported ml_dtypes"
import ml_dtypes  # the user's own import, after phalanx's
assert check_dtype(np.dtype(ml_dtypes.bfloat16)) == np.dtype(ml_dtypes.bfloat16)
print(loaded_at_import)
"""


def test_importing_phalanx_does_not_import_ml_dtypes_yet_bfloat16_is_recognised() -> None:
    # ml_dtypes 0.7.0 costs ~1 s of CPU to import; every phalanx process paid it.
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_bfloat16_by_name_loads_ml_dtypes_on_demand() -> None:
    assert check_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert supported_dtypes()["bfloat16"] == np.dtype(ml_dtypes.bfloat16)
    assert list(supported_dtypes()) == list(DTYPE_NAMES)

"""What every ``phalanx bench ...`` shares: argument parsing helpers, statistics, output.

Benchmarks print one JSON object per line on stdout (``--json``) or a readable table,
and progress on stderr. This module does no networking and starts no process: the
process plumbing is :mod:`phalanx.testing.procs` (``RankPool``), shared with tests and
the stress harness.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

__all__ = [
    "CpuClock",
    "busbw_factor",
    "format_bytes",
    "parse_size",
    "parse_sizes",
    "print_json",
    "print_table",
    "progress",
    "summarize_times",
]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """``"4KiB"`` -> 4096, ``"1MiB"``, ``"2GiB"``, ``"1000"``, ``"4kB"`` (decimal).

    Raises ``argparse.ArgumentTypeError`` with a readable message otherwise."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a whole number of bytes with an optional "
            "suffix KiB, MiB, GiB (powers of 1024) or kB, MB, GB (powers of 1000), "
            "e.g. 4KiB or 1048576"
        )
    value = int(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be > 0 bytes")
    return value


def parse_sizes(text: str) -> list[int]:
    """Comma-separated :func:`parse_size` values, e.g. ``"4KiB,1MiB,64MiB"``."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("no sizes given")
    return [parse_size(p) for p in parts]


def format_bytes(n: float) -> str:
    """4096 -> ``"4KiB"``, 67108864 -> ``"64MiB"``, 1000 -> ``"1000B"``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{int(n // scale)}{unit}"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f}MiB"
    return f"{int(n)}B"


def busbw_factor(world: int) -> float:
    """busbw = algbw x 2(n-1)/n: the bytes each rank moves in a ring all-reduce."""
    return 2.0 * (world - 1) / world if world > 1 else 1.0


class CpuClock:
    """CPU seconds (user + system, every thread) of this process plus ``pids``.

    Read through the kernel's per-process CPU clocks (``clock_getcpuclockid``: the
    scheduler's nanosecond runtime), so one collective of 0.1 ms is measurable, where
    ``/proc/PID/stat`` counts 10 ms ticks. A process that is gone reads as its last
    value."""

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self._clocks = [time.CLOCK_PROCESS_CPUTIME_ID]
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in pids:
            clk = ctypes.c_int()
            if libc.clock_getcpuclockid(int(pid), ctypes.byref(clk)) != 0:
                raise OSError(ctypes.get_errno(), f"no CPU clock for process {pid}")
            self._clocks.append(clk.value)
        self._last = [0.0] * len(self._clocks)

    def read(self) -> float:
        total = 0.0
        for i, clk in enumerate(self._clocks):
            with contextlib.suppress(OSError):
                self._last[i] = time.clock_gettime(clk)
            total += self._last[i]
        return total


def summarize_times(nbytes: int, world: int, times: Sequence[float]) -> dict[str, float]:
    """median/min/max of per-iteration op times and the bandwidths of the median."""
    med = statistics.median(times)
    algbw = nbytes / med if med > 0 else math.inf
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "algbw_Bps": algbw,
        "busbw_Bps": algbw * busbw_factor(world),
    }


def progress(msg: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One progress line on stderr (stdout carries only results)."""
    if enabled:
        out = stream or sys.stderr
        out.write(f"[bench] {msg}\n")
        out.flush()


def print_json(row: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """One JSON line. A non-finite float (NaN, inf: not JSON) is written as the string
    ``"nan"``, ``"inf"`` or ``"-inf"``: the row is never lost to it."""
    out = stream or sys.stdout
    out.write(json.dumps(_finite(dict(row)), allow_nan=False, default=_json_default) + "\n")
    out.flush()


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (numpy scalars too) replaced by its name."""
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _json_default(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "size":
        return format_bytes(value)
    if kind == "ms":
        return f"{value * 1e3:.3f}"
    if kind == "MBps":
        return f"{value / 1e6:.1f}"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "err":
        return f"{value:.2e}" if value else "0"
    if kind == "bool":
        return "ok" if value else "WRONG"
    return str(value)


def print_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[tuple[str, str, str]],
    stream: TextIO | None = None,
) -> None:
    """A fixed-width table; ``columns`` are (key, header, kind) with kind one of
    size, ms, MBps, ratio, err, bool, str. Missing keys print as ``-``."""
    out = stream or sys.stdout
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key), kind) for key, _, kind in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        out.write("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    out.flush()

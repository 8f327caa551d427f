"""A small all-reduce whose accumulator is wider than its input (float16 sums in
float32, integer averages in int64) must still fit the frame limit: recursive
doubling sends the whole accumulator in one frame, so an array whose accumulator
would not fit takes the ring. Before, legal options made every such op break the
group with a ``too-large`` protocol error naming an innocent peer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from phalanx.comm import CommOptions
from phalanx.comm.reduce import ReduceOp, reference
from tests.integration._pairs import pair

KiB = 1 << 10


@pytest.mark.parametrize(
    ("dtype", "op", "count"),
    [("uint8", "avg", 200_000), ("float16", "sum", 300_000), ("int32", "avg", 150_000)],
)
def test_a_small_array_with_a_wide_accumulator_stays_within_the_frame_limit(
    dtype: str, op: ReduceOp, count: int
) -> None:
    options = CommOptions(
        timeout_s=10.0,
        max_frame_bytes=1024 * KiB,
        small_bytes=800 * KiB,
        piece_bytes=256 * KiB,
        crowded_piece_bytes=0,
    )
    g0, g1 = pair(options=options)
    try:
        xs = [np.full(count, r + 1, dtype=dtype) for r in range(2)]
        want = reference(xs, op)
        assert xs[0].nbytes <= options.small_bytes  # "small" by the caller's bytes
        results: list[object] = [None, None]

        def run(rank: int) -> None:
            try:
                results[rank] = (g0, g1)[rank].all_reduce(xs[rank], op)
            except Exception as exc:  # reported below
                results[rank] = exc

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(isinstance(r, Exception) for r in results), results
        for x in xs:
            assert np.array_equal(x, want)
    finally:
        g0.close()
        g1.close()

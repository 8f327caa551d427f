"""A client that gives up on a collective never lets that op touch the next op's memory.

Regression for issue 15: a client whose call timed out returned its staging region to
the pool while the daemon's op was still running on it; the next op copied its input
into the same region, and the old op then wrote its result (or, failing, restored its
input) over it. The fix: the caller's deadline travels into the data plane (the daemon
ends the op by then and answers), and a client that still has no answer sends CANCEL
and reuses the memory only after the daemon acknowledged that the op is over.

Two members in embedded mode (real daemons, real Unix sockets, real TCP; one process).
``PHALANX_CANCEL_RUNS`` repeats the scenario (the issue's bar is 200 runs in a row).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import phalanx

pytestmark = pytest.mark.timeout(900)

RUNS = int(os.environ.get("PHALANX_CANCEL_RUNS", "3"))
N = 4096


@pytest.fixture
def pair() -> Iterator[tuple[phalanx.Client, phalanx.Client]]:
    secret = os.urandom(32)
    a = phalanx.start(secret=secret, member_id="a")
    try:
        b = phalanx.start(coordinator=a.coordinator_address, secret=secret, member_id="b")
        try:
            deadline = time.monotonic() + 20
            while a.view().world != 2 or b.view().world != 2:
                assert time.monotonic() < deadline, "the two members never shared a view"
                time.sleep(0.05)
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


def test_a_timed_out_op_never_touches_the_next_ops_data(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    a, b = pair
    for i in range(RUNS):
        # b is not taking part: a's op cannot complete before a's deadline
        first = np.full(N, 1.0 + i, np.float32)  # plain numpy: staged through shared memory
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            a.all_reduce(first, timeout=0.3)
        assert np.all(first == 1.0 + i), "a failed op changed the caller's array"
        assert time.monotonic() - t0 < 8.0
        # now b takes part, once; a's next op reuses the staging memory of the first
        got: list[np.ndarray] = []
        errors: list[BaseException] = []

        def peer(got: list[np.ndarray], errors: list[BaseException]) -> None:
            y = np.full(N, 0.5, np.float32)
            try:
                b.all_reduce(y, retry=True, timeout=15.0)
            except BaseException as exc:  # reported below
                errors.append(exc)
            got.append(y)

        t = threading.Thread(target=peer, args=(got, errors))
        t.start()
        second = np.full(N, 1000.0 + i, np.float32)
        try:
            a.all_reduce(second, retry=True, timeout=15.0)
        finally:
            t.join(30.0)
        assert not errors, f"run {i}: the peer's op failed: {errors[0]!r}"
        want = 1000.5 + i
        assert np.all(second == want), (
            f"run {i}: the next op summed {np.unique(second)[:4]} instead of {want}: "
            "the cancelled op wrote into its memory"
        )
        assert np.all(got[0] == want)

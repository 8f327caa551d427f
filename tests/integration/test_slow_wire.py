"""A slow wire is not a dead peer: a frame that takes longer than ``timeout_s`` to arrive,
while its bytes keep coming, must not get the op failed or its sender suspected.

Two ranks (threads of this process); rank 1 reaches rank 0 through a
:class:`~phalanx.testing.throttle.LinkProxy` that paces both directions to 100 KB/s.
With 128 KiB pieces one frame takes ~1.3 s on that wire, longer than the engine's
``timeout_s`` (0.25 s) plus its probe (0.2 s), twice over (the patience rule). The
engine counts partial frames, in and out, as progress; before it did, the op failed
with "no progress ... and no answer to a probe" (the probe's PING queued behind the
slow frame) and named a healthy peer.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from phalanx.comm import CommOptions, Group, bind
from phalanx.deadline import Deadline
from phalanx.testing.throttle import LinkProxy
from tests.integration._pairs import ranks

RATE_BPS = 100_000
PIECE = 128 * 1024


def _slow_pair(options: CommOptions) -> tuple[Group, Group, LinkProxy]:
    listeners = [bind("127.0.0.1:0") for _ in range(2)]
    proxy = LinkProxy(listeners[0].address)
    # fast while the groups connect and shake hands; slow from the first op on
    g0, g1 = ranks(2, options, listeners=listeners, via={1: proxy.address})
    proxy.set(down_rate_Bps=RATE_BPS, up_rate_Bps=RATE_BPS)
    return g0, g1, proxy


def test_a_frame_slower_than_the_timeout_is_progress_not_a_failure() -> None:
    opts = CommOptions(timeout_s=0.25, probe_s=0.2, piece_bytes=PIECE, crowded_piece_bytes=0,
                       small_bytes=0, zero_copy_min_bytes=1 << 40)  # fmt: skip
    g0, g1, proxy = _slow_pair(opts)
    try:
        # world 2 ring: each rank sends one 128 KiB chunk per phase, one frame each
        n = 2 * PIECE // 4
        xs = [np.arange(n, dtype=np.float32) + r for r in range(2)]
        want = xs[0] + xs[1]
        errors: list[BaseException] = []

        def run(g: Group, x: np.ndarray) -> None:
            try:
                g.all_reduce(x, op="sum", deadline=Deadline.after(60.0))
            except BaseException as exc:  # reported below
                errors.append(exc)

        t0 = time.monotonic()
        t = threading.Thread(target=run, args=(g1, xs[1]))
        t.start()
        run(g0, xs[0])
        t.join(90)
        took = time.monotonic() - t0
        assert not t.is_alive()
        assert not errors, f"the slow wire failed the op: {errors!r}"
        for x in xs:
            np.testing.assert_array_equal(x, want)
        # the wire was really that slow (at least one frame took longer than the
        # engine's timeout and probe, twice): otherwise this test tests nothing
        assert took > 2 * (opts.timeout_s + opts.probe_s), took
        # and the group is still whole: a small op after it
        ys = [np.ones(4, np.float32) for _ in range(2)]
        t = threading.Thread(target=run, args=(g1, ys[1]))
        t.start()
        run(g0, ys[0])
        t.join(30)
        assert not errors, errors
        np.testing.assert_array_equal(ys[0], 2.0)
    finally:
        g0.close()
        g1.close()
        proxy.close()

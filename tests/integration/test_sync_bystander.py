"""A state transfer longer than the engine's no-progress window still reaches the
newcomer when a bystander waits for its verdict.

Three ranks of one group (threads of this process): rank 0 holds the state, rank 1
holds it too (the bystander), rank 2 is the newcomer. The bytes go 0 -> 2 in a side
group whose link is paced to 2 MB/s (a :class:`~phalanx.testing.throttle.LinkProxy`),
so the 4 MiB transfer takes ~2 s, several times the view group's ``timeout_s`` +
``probe_s``. Meanwhile the bystander waits in the verdict all_gather on the view's
group, where nothing moves until the transfer ends: its peers are alive (they answer
its probes), and that wait is the protocol's, bounded by the caller's deadline. Before,
the engine's "peers alive but the operation made no progress" rule failed it after two
periods, every member rebuilt, and the transfer started over -- for ever, once a state
took longer than ~2 x timeout_s to move (~14 GB at the default 10 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, bind
from phalanx.deadline import Deadline
from phalanx.membership.statesync import (
    SyncAction,
    SyncPlan,
    SyncReport,
    SyncState,
    transfer,
)
from phalanx.monitor.monitor import Monitor
from phalanx.ops import OpSpec
from phalanx.testing.throttle import LinkProxy
from tests.integration._pairs import ranks

SECRET = b"s" * 32
RATE_BPS = 2_000_000


def test_a_bystander_waits_out_a_transfer_longer_than_the_no_progress_window() -> None:
    opts = CommOptions(timeout_s=0.3, probe_s=0.2)
    view = ranks(3, opts)
    n = (4 << 20) // 4
    states = [
        SyncState({"w": np.full(n, 1.5, np.float32)}, 7),
        SyncState({"w": np.full(n, 1.5, np.float32)}, 7),
        SyncState.empty(),
    ]
    plan = SyncPlan(SyncAction.PROCEED, 0, (2,), 7, states[0].digest(), 2)

    # the side group 0 -> 2 (source, newcomer), its link paced; built on first use by
    # both of its ranks, each taking its own end
    side_listeners = [bind("127.0.0.1:0") for _ in range(2)]
    side_real = [lst.address for lst in side_listeners]
    proxy = LinkProxy(side_real[0])
    proxy.set(down_rate_Bps=RATE_BPS, up_rate_Bps=RATE_BPS)
    side_opts = CommOptions(timeout_s=0.3, probe_s=0.2)

    def side_for(me: int) -> Callable[[tuple[int, ...]], Group]:
        def side(ranks: tuple[int, ...]) -> Group:
            assert ranks == (0, 2)
            i = ranks.index(me)
            addrs = list(side_real) if i == 0 else [proxy.address, side_real[1]]
            return Group(i, addrs, SECRET, listener=side_listeners[i], options=side_opts)

        return side

    reports: list[SyncReport | BaseException | None] = [None] * 3

    def run(r: int) -> None:
        try:
            reports[r] = transfer(view[r], plan, states[r], epoch=0, side=side_for(r),
                                  deadline=Deadline.after(60.0))  # fmt: skip
        except BaseException as exc:  # reported below
            reports[r] = exc

    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        took = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads)
        errors = [r for r in reports if isinstance(r, BaseException)]
        assert not errors, f"the transfer failed: {errors!r}"
        # the wait really was longer than the window the old rule allowed (two
        # periods of timeout_s + probe_s): otherwise this test tests nothing
        assert took > 2 * (opts.timeout_s + opts.probe_s), took
        assert states[2].valid and states[2].step == 7
        np.testing.assert_array_equal(states[2].arrays["w"], states[0].arrays["w"])
        assert states[2].digest() == states[0].digest()
        # the view's group is still whole: an op over all three
        xs = [np.ones(4, np.float32) for _ in range(3)]
        ts = [threading.Thread(target=view[r].all_reduce, args=(xs[r],)) for r in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        for x in xs:
            np.testing.assert_array_equal(x, 3.0)
    finally:
        for g in view:
            g.close()
        proxy.close()


@pytest.mark.parametrize(
    ("timeout_s", "late"), [(2.0, 6.0), (10.0, 3.5)], ids=["past-a-probe", "before-any-probe"]
)
def test_a_patient_wait_on_live_peers_is_not_a_hang(timeout_s: float, late: float) -> None:
    """The daemon's /healthz (a livenessProbe in deploy/k8s) answers 503 while the
    monitor sees a hang, and PhalanxCollectiveHung (critical) fires. A patient op
    waits by design (the verdict, while a transfer runs elsewhere): it is not a hang.
    The engine checks its peers itself (a silent one fails the op at the probe).

    Before stop 33 the monitor saw it stall between probes (its progress time moved
    once per ``timeout_s``) and the daemon looked unhealthy most of the wait -- long
    enough for a liveness probe to restart the source mid-transfer (past-a-probe
    guards that). Until stop 35 it was a hang from the hang floor (1 s) until the first
    probe was answered (both cases; before-any-probe is the default ``timeout_s`` and a
    3.5 s wait), so every state transfer that kept the bystanders waiting longer than
    a second raised the alert."""
    opts = CommOptions(timeout_s=timeout_s, probe_s=0.3)
    view = ranks(3, opts)
    mon = Monitor(2)
    mon.attach(view[2].engine)
    mon.start()
    errors: list[BaseException] = []

    def verdict(r: int, delay: float) -> None:
        time.sleep(delay)
        buf = np.zeros(3, dtype=np.int64)
        buf[r] = r + 1
        try:
            view[r].run(OpSpec("all_gather"), buf, deadline=Deadline.after(30.0), patient=True)
            assert list(buf) == [1, 2, 3], buf
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        threads = [
            threading.Thread(target=verdict, args=(r, late if r == 1 else 0.0)) for r in range(3)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        samples: list[tuple[float, bool]] = []
        while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 40:
            samples.append((time.monotonic() - t0, mon.healthy()[0]))
            time.sleep(0.1)
        for t in threads:
            t.join(10)
        assert not errors, errors
        # from the start (past the hang floor of 1 s, and past the first probe) until
        # rank 1 arrived, the wait is the protocol's: healthy throughout
        window = [ok for at, ok in samples if 0.5 < at < late - 0.2]
        assert len(window) > 20, samples
        assert all(window), [(round(at, 1), ok) for at, ok in samples]
    finally:
        mon.close()
        for g in view:
            g.close()

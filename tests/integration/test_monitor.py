"""The Monitor on a real group: HTTP endpoints, the hang thread, eviction policy, clean close."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, bind
from phalanx.comm.observer import OpSample
from phalanx.deadline import Deadline
from phalanx.errors import PeerFailure
from phalanx.monitor import DetectorConfig, Monitor, MonitorConfig, Verdict
from tests.integration._pairs import pair as _pair
from tests.integration._threads import wakeups


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def pair(secret: bytes) -> Iterator[tuple[list[Group], list[Monitor]]]:
    cfg = MonitorConfig(detectors=DetectorConfig(hang_floor_s=0.5), hang_check_s=0.05)
    monitors = [Monitor(r, config=cfg) for r in range(2)]
    listeners = [bind("127.0.0.1:0") for _ in range(2)]
    addrs = [x.address for x in listeners]
    groups: list[Group | None] = [None, None]
    opts = CommOptions(timeout_s=5.0)

    def build(r: int) -> None:
        groups[r] = Group(r, addrs, secret, listener=listeners[r], options=opts,
                          observer=monitors[r].observer)  # fmt: skip

    ts = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30.0)
    gs = [g for g in groups if g is not None]
    assert len(gs) == 2
    for g, m in zip(gs, monitors, strict=True):
        m.attach(g.engine)
        m.start()
    try:
        yield gs, monitors
    finally:
        for g in gs:
            g.close()
        for m in monitors:
            m.close()


def test_endpoints_and_hang_detection(pair: tuple[list[Group], list[Monitor]]) -> None:
    groups, monitors = pair
    host, port = monitors[0].serve("127.0.0.1", 0)
    base = f"http://{host}:{port}"

    def both(n: int) -> None:
        ts = [threading.Thread(target=lambda g=g: [g.all_reduce(np.ones(256, np.float32))
                                                   for _ in range(n)]) for g in groups]  # fmt: skip
        for t in ts:
            t.start()
        for t in ts:
            t.join(30.0)

    both(20)
    code, body = _get(base + "/metrics")
    assert code == 200 and b"phalanx_op_duration_seconds_bucket" in body
    assert b"phalanx_link_rtt_seconds" in body  # TCP_INFO through engine.link_stats()
    assert _get(base + "/healthz") == (200, b"ok\n")
    assert _get(base + "/nope")[0] == 404
    # rank 0 enters an all-reduce alone: no progress -> a hang verdict within ~0.5 s
    x = np.ones(256, np.float32)
    started = time.monotonic()
    handle = groups[0].all_reduce(x, async_op=True)
    while time.monotonic() - started < 3.0:
        anomalies = json.loads(_get(base + "/anomalies")[1])
        if any(v["kind"] == "hang" for v in anomalies["recent"]):
            break
        time.sleep(0.05)
    took = time.monotonic() - started
    assert any(v["kind"] == "hang" for v in anomalies["recent"]), anomalies
    assert 0.4 < took < 2.0
    assert _get(base + "/healthz")[0] == 503
    groups[1].all_reduce(np.ones(256, np.float32))  # the partner arrives: op completes
    handle.wait(10.0)
    deadline = time.monotonic() + 2.0
    while _get(base + "/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_eviction_policy_is_opt_in_and_fires_once() -> None:
    asked: list[tuple[int, str]] = []
    mon = Monitor(
        0, config=MonitorConfig(evict_after=3), on_evict=lambda p, r: asked.append((p, r))
    )
    for i in range(5):
        mon.record(Verdict("straggler", 2, 1.5, time.time(), 1, i))
    assert asked == [(2, "straggler")]
    quiet = Monitor(1)
    for i in range(5):
        quiet.record(Verdict("straggler", 2, 1.5, time.time(), 1, i))
    assert len(quiet.verdicts()) == 5


def test_close_joins_threads() -> None:
    before = {t.name for t in threading.enumerate()}
    mon = Monitor(0)
    mon.start()
    mon.serve()
    mon.close()
    mon.close()
    after = {t.name for t in threading.enumerate()} - before
    assert not [n for n in after if n.startswith("phalanx-")], after


def test_an_idle_group_and_its_monitor_sleep_instead_of_polling(
    pair: tuple[list[Group], list[Monitor]],
) -> None:
    # The engine polled every 50 ms, the hang thread every hang_check_s (50 ms here)
    # and the accept loop every 100 ms while nothing ran: 20-40 wake-ups in 2 s each,
    # CPU an idle daemon spent for nothing. Now each sleeps until an event or a 1 s
    # backstop; an op still wakes them (the second all-reduce and the hang check).
    groups, monitors = pair
    x = [np.ones(1000, np.float32) for _ in groups]
    ts = [threading.Thread(target=g.all_reduce, args=(x[r],)) for r, g in enumerate(groups)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10.0)
    time.sleep(0.3)  # the monitor's first check after the op, then idle
    names = ("phalanx-engine-", "phalanx-monitor-", "phalanx-accept-")
    before = wakeups(*names)
    assert len(before) == 6, before
    time.sleep(2.0)
    after = wakeups(*names)
    woke = {name: after[name] - before[name] for name in before}
    assert all(n <= 8 for n in woke.values()), woke
    assert all(float(v[0]) == 2.0 for v in x), "the op before the idle spell"
    ts = [threading.Thread(target=g.all_reduce, args=(x[r],)) for r, g in enumerate(groups)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10.0)
    assert all(float(v[0]) == 4.0 for v in x), "an op after the idle spell"
    assert all(m.ops_seen >= 2 for m in monitors)


class _Samples:
    """A CommObserver that keeps every finished op's sample."""

    def __init__(self) -> None:
        self.done: list[OpSample] = []

    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        pass

    def op_finished(self, sample: OpSample) -> None:
        self.done.append(sample)


def test_an_op_given_up_as_it_starts_reports_no_bytes_of_the_op_before_it() -> None:
    """An op whose deadline passed before it started fails as it starts; its sample
    must count what it sent (an ABORT), not the previous op's 4 MiB. (A deadline that
    passes while the op is still queued fails the op ahead of it too, since stop 32:
    test_abort.py; here the op before it has ended.)"""
    seen = _Samples()
    g0, g1 = _pair(timeout_s=10.0, observer=seen)
    try:
        big = np.ones(1 << 20, np.float32)
        first = g0.all_reduce(big, async_op=True)
        g1.all_reduce(np.ones(1 << 20, np.float32))
        first.wait(10.0)
        given_up = g0.all_reduce(np.ones(16, np.float32), async_op=True,
                                 deadline=Deadline.after(0.0))  # fmt: skip
        with pytest.raises(PeerFailure):
            given_up.wait(10.0)
    finally:
        g0.close()
        g1.close()
    ok, failed = seen.done[0], seen.done[1]
    assert ok.ok and sum(link.bytes_sent for link in ok.links) >= big.nbytes
    assert not failed.ok and failed.reason == "aborted"
    assert sum(link.bytes_sent for link in failed.links) < 1024
    assert all(link.bytes_recv == 0 and link.first_byte_s is None for link in failed.links)

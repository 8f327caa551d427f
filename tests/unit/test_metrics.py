"""Metric definitions: naming rules, per-daemon registries, departed peers removed."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from phalanx.comm.observer import LinkSample, OpSample
from phalanx.membership.statesync import SyncOutcome
from phalanx.monitor import Monitor
from phalanx.monitor.metrics import LinkTcp, Metrics


def _sample(seq: int, ok: bool = True) -> OpSample:
    links = (LinkSample(0, 100, 200, 2, 0.001, 0.002, 0.0005),
             LinkSample(2, 300, 0, 0, None, None, 0.0))  # fmt: skip
    return OpSample("all_reduce", seq, 3, "ring", "none", 4096, 3, 1, ok, 0.01,
                    "" if ok else "timeout", frozenset(), links)  # fmt: skip


def test_names_follow_prometheus_rules() -> None:
    m = Metrics()
    m.tcp.provider = lambda: [LinkTcp(0, 0, 0.0001, 3)]
    families = list(text_string_to_metric_families(generate_latest(m.registry).decode()))
    assert families
    for f in families:
        assert f.name.startswith("phalanx_"), f.name
        assert f.type != "summary", f.name
        if f.type == "counter":
            assert not f.name.endswith("_total")  # the client appends _total itself
        for s in f.samples:
            assert "seq" not in s.labels and "step" not in s.labels
            assert set(s.labels) <= {"op", "algorithm", "outcome", "peer", "stream", "kind",
                                     "reason", "version", "le", "role"}  # fmt: skip
        if re.search(r"(time|duration|latency|wait|rtt)", f.name) and not f.name.endswith(
            "_created"
        ):
            assert f.name.endswith("_seconds"), f.name


def test_registries_are_per_daemon() -> None:
    a, b = Monitor(0), Monitor(1)  # would raise "Duplicated timeseries" on one registry
    a.observer.op_finished(_sample(1))
    assert b"phalanx_op_duration_seconds_count" in generate_latest(a.registry)
    text_b = generate_latest(b.registry).decode()
    assert 'phalanx_op_duration_seconds_count{algorithm="ring"' not in text_b


def test_a_batch_exports_what_the_same_ops_one_by_one_export() -> None:
    """The daemon feeds finished ops in batches (counters summed, gauges set once): a
    scrape must read the same as after feeding them one at a time."""
    samples = [_sample(1), _sample(2, ok=False), _sample(3), replace(_sample(4), epoch=4)]
    one, batch = Monitor(1, clock=lambda: 100.0), Monitor(1, clock=lambda: 100.0)
    for s in samples:
        one.observer.op_finished(s)
    batch.observer.ops_finished(samples)
    a, b = generate_latest(one.registry).decode(), generate_latest(batch.registry).decode()
    drop = re.compile(r"^.*_created.*$", re.M)  # creation times differ by construction
    assert drop.sub("", a) == drop.sub("", b)
    assert 'phalanx_link_sent_bytes_total{peer="2"} 1200.0' in b  # 4 ops x 300 bytes
    assert one.ops_seen == batch.ops_seen == 4


def _timed(seq: int, first_byte: float, last_byte: float, epoch: int = 3) -> OpSample:
    """An op whose bytes from peer 0 came after ``first_byte`` s and ended at ``last_byte``."""
    links = (LinkSample(0, 100, 200, 2, first_byte, last_byte, 0.0),
             LinkSample(2, 300, 0, 0, None, None, 0.0))  # fmt: skip
    return OpSample("all_reduce", seq, epoch, "ring", "none", 4096, 3, 1, True, 0.01, "",
                    frozenset(), links)  # fmt: skip


def _scrape(mon: Monitor) -> str:
    drop = re.compile(r"^.*_created.*$", re.M)  # creation times differ by construction
    return drop.sub("", generate_latest(mon.registry).decode())


@pytest.mark.parametrize(
    "late",
    [
        # a slow link (stretched transfers) and then healthy ops: the verdict's score
        # must not stand over the later ops' scores
        [_timed(30 + i, 0.010, 0.030) for i in range(4)]
        + [_timed(40 + i, 0.001, 0.002) for i in range(3)],
        # a straggler (late first bytes), then the next view's first op: the strikes
        # belong to the old view and go with its reset
        [_timed(30 + i, 0.010, 0.011) for i in range(4)] + [_timed(0, 0.001, 0.002, epoch=4)],
    ],
    ids=["verdict-then-healthy", "verdicts-then-new-view"],
)
def test_a_batch_with_verdicts_exports_what_one_by_one_feeding_does(late: list[OpSample]) -> None:
    samples = [_timed(i, 0.001, 0.002) for i in range(30)] + late
    one, batch = Monitor(1, clock=lambda: 100.0), Monitor(1, clock=lambda: 100.0)
    for s in samples:
        one.observer.op_finished(s)
    batch.observer.ops_finished(samples)
    assert one.verdicts(), "the late ops must make the detectors speak"
    assert [(v.kind, v.peer, v.epoch) for v in batch.verdicts()] == [
        (v.kind, v.peer, v.epoch) for v in one.verdicts()
    ]
    assert _scrape(one) == _scrape(batch)
    assert one._strikes == batch._strikes


def test_a_late_op_of_an_older_view_does_not_move_the_view_back() -> None:
    mon = Monitor(1, clock=lambda: 100.0)
    mon.observer.ops_finished([_sample(1), _sample(2)])  # view 3: ranks 0, 1, 2
    mon.set_view(4, [0, 1], rank=1)  # rank 2 left
    mon.observer.ops_finished([_sample(3, ok=False)])  # view 3's last op, fed after
    text = generate_latest(mon.registry).decode()
    assert "phalanx_view_epoch 4.0" in text and "phalanx_view_members 2.0" in text
    assert 'peer="2"' not in text  # the departed peer's series stay gone
    assert 'phalanx_op_failures_total{op="all_reduce",reason="timeout"} 1.0' in text
    assert mon.anomalies()["epoch"] == 4 and mon.ops_seen == 3


def test_a_batch_that_lands_while_the_next_op_runs_leaves_it_in_flight() -> None:
    mon = Monitor(0)
    mon.observer.op_started("all_reduce", 0, 3, 4096)
    done = replace(_sample(0), started=time.monotonic() - 0.002, duration_s=0.001)
    mon.observer.op_started("all_reduce", 1, 3, 4096)  # began after op 0 ended
    mon.observer.ops_finished([done])
    assert mon.metrics.op_inflight._value.get() == 1  # op 1 runs
    second = replace(_sample(1), started=time.monotonic() - 0.001, duration_s=0.001)
    mon.observer.ops_finished([second])
    assert mon.metrics.op_inflight._value.get() == 0


def test_op_and_link_metrics_and_forget_peer() -> None:
    mon = Monitor(1)
    mon.observer.op_finished(_sample(1))
    mon.observer.op_finished(_sample(2, ok=False))
    text = generate_latest(mon.registry).decode()
    assert (
        'phalanx_op_duration_seconds_count{algorithm="ring",op="all_reduce",outcome="ok"} 1.0'
        in text
    )
    assert 'phalanx_op_failures_total{op="all_reduce",reason="timeout"} 1.0' in text
    assert 'phalanx_link_received_bytes_total{peer="0"} 400.0' in text
    assert 'phalanx_link_sent_bytes_total{peer="2"} 600.0' in text
    assert 'phalanx_link_first_byte_wait_seconds_count{peer="0"} 2.0' in text
    assert "phalanx_view_epoch 3.0" in text
    mon.set_view(4, [1, 2], rank=0)  # rank 0 left
    text = generate_latest(mon.registry).decode()
    assert 'peer="0"' not in text and 'peer="2"' in text
    assert "phalanx_view_members 2.0" in text and "phalanx_view_changes_total 1.0" in text
    # a rank 0 that comes back starts its series afresh (the cached children went too)
    mon.set_view(5, [0, 1, 2], rank=1)
    mon.observer.op_finished(replace(_sample(3), epoch=5))
    text = generate_latest(mon.registry).decode()
    assert 'phalanx_link_received_bytes_total{peer="0"} 200.0' in text


def test_state_syncs_are_counted_by_role_and_outcome() -> None:
    m = Metrics()
    r = m.registry

    def value(name: str, **labels: str) -> float | None:
        return r.get_sample_value(name, labels)

    # exported at zero before the first sync (increase() needs a first sample)
    assert value("phalanx_state_syncs_total", role="received", outcome="failed") == 0.0
    assert value("phalanx_state_sync_bytes_total", role="sent") == 0.0
    in_row = [0]  # the group's count, read at each scrape
    m.follow_sync_failures(lambda: in_row[0])
    m.state_sync(SyncOutcome("received", False, 0, 0.2, 1))
    m.state_sync(SyncOutcome("received", False, 0, 0.2, 2))
    in_row[0] = 2
    assert value("phalanx_state_sync_failures_in_row") == 2.0
    assert value("phalanx_state_syncs_total", role="received", outcome="failed") == 2.0
    in_row[0] = 0  # an exchange went through, with or without a transfer
    assert value("phalanx_state_sync_failures_in_row") == 0.0
    m.state_sync(SyncOutcome("received", True, 4096, 0.5, 0))
    assert value("phalanx_state_syncs_total", role="received", outcome="ok") == 1.0
    assert value("phalanx_state_sync_bytes_total", role="received") == 4096.0
    assert value("phalanx_state_sync_duration_seconds_count", role="received") == 1.0
    assert value("phalanx_state_sync_duration_seconds_sum", role="received") == 0.5
    m.state_sync(SyncOutcome("sent", True, 100, 0.1, 0))
    assert value("phalanx_state_sync_bytes_total", role="sent") == 100.0
    assert value("phalanx_state_syncs_total", role="sent", outcome="failed") == 0.0
    with pytest.raises(ValueError, match="role"):
        m.state_sync(SyncOutcome("restored", True, 1, 0.1, 0))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is absent")
def test_promtool_check_metrics_is_clean() -> None:
    mon = Monitor(1)
    for i in range(5):
        mon.observer.op_finished(_sample(i))
    mon.metrics.heartbeat(acked=True)
    mon.metrics.snapshot_stall.observe(0.01)
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(mon.registry),
                         capture_output=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()

"""``phalanx status``'s pure helpers: RTT per peer over its streams, rates across a
counter reset (a restarted daemon)."""

from __future__ import annotations

import pytest

from phalanx.monitor.status import TargetState, parse_metrics, summarize


def _text(sent: float, ops: float, rtts: dict[int, float]) -> str:
    rtt = "".join(
        f'phalanx_link_rtt_seconds{{peer="1",stream="{s}"}} {v}\n' for s, v in rtts.items()
    )
    return (
        "# TYPE phalanx_rank gauge\nphalanx_rank 0.0\n"
        "# TYPE phalanx_view_epoch gauge\nphalanx_view_epoch 3.0\n"
        "# TYPE phalanx_link_sent_bytes counter\n"
        f'phalanx_link_sent_bytes_total{{peer="1"}} {sent}\n'
        "# TYPE phalanx_link_received_bytes counter\n"
        f'phalanx_link_received_bytes_total{{peer="1"}} {sent}\n'
        "# TYPE phalanx_link_rtt_seconds gauge\n"
        + rtt
        + "# TYPE phalanx_op_duration_seconds histogram\n"
        f'phalanx_op_duration_seconds_count{{op="all_reduce",algorithm="ring",outcome="ok"}} {ops}\n'
        f'phalanx_op_duration_seconds_sum{{op="all_reduce",algorithm="ring",outcome="ok"}} {ops * 0.01}\n'
    )


def test_a_peers_rtt_is_its_slowest_stream_not_the_sum() -> None:
    state = TargetState("h:1", 10.0, parse_metrics(_text(100, 1, {0: 0.010, 1: 0.012})), True)
    (link,) = summarize(None, [state]).links
    assert link["rtt_ms"] == pytest.approx(12.0)


def test_a_counter_reset_counts_from_zero_and_never_gives_a_negative_rate() -> None:
    before = TargetState("h:1", 10.0, parse_metrics(_text(5_000_000, 1000, {0: 0.01})), True)
    # the daemon restarted between the polls: its counters start again from zero
    after = TargetState("h:1", 12.0, parse_metrics(_text(4000, 20, {0: 0.01})), True)
    snap = summarize([before], [after])
    row = snap.rows[0]
    assert row["ops_per_s"] == pytest.approx(10.0)  # 20 ops since the reset, in 2 s
    assert row["mean_op_ms"] == pytest.approx(10.0)
    (link,) = snap.links
    assert link["send_Bps"] == pytest.approx(2000.0)
    assert link["recv_Bps"] == pytest.approx(2000.0)
    # and without a reset the rate is the plain difference
    later = TargetState("h:1", 14.0, parse_metrics(_text(8000, 40, {0: 0.01})), True)
    snap = summarize([after], [later])
    assert snap.rows[0]["ops_per_s"] == pytest.approx(10.0)
    assert snap.links[0]["send_Bps"] == pytest.approx(2000.0)

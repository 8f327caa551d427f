"""``phalanx status`` against real monitors serving a real 2-rank group."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np

from phalanx.comm import Group, bind
from phalanx.errors import PhalanxError
from phalanx.monitor.monitor import Monitor
from phalanx.monitor.status import Snapshot, TargetState, parse_metrics, render, summarize


def _text(sent: float, ops: float, epoch: float = 3) -> str:
    return (
        "# TYPE phalanx_rank gauge\nphalanx_rank 0.0\n"
        f"# TYPE phalanx_view_epoch gauge\nphalanx_view_epoch {epoch}\n"
        "# TYPE phalanx_view_members gauge\nphalanx_view_members 2.0\n"
        "# TYPE phalanx_link_sent_bytes counter\n"
        f'phalanx_link_sent_bytes_total{{peer="1"}} {sent}\n'
        "# TYPE phalanx_op_duration_seconds histogram\n"
        f'phalanx_op_duration_seconds_count{{op="all_reduce",algorithm="ring",outcome="ok"}} {ops}\n'
        f'phalanx_op_duration_seconds_sum{{op="all_reduce",algorithm="ring",outcome="ok"}} {ops * 0.01}\n'
    )


def test_summarize_turns_counters_into_rates() -> None:
    a = TargetState("h:1", 10.0, parse_metrics(_text(1000, 10)), True)
    b = TargetState("h:1", 12.0, parse_metrics(_text(5000, 30)), True)
    snap = summarize([a], [b])
    assert snap.epochs == (3,)
    row = snap.rows[0]
    assert row["rank"] == 0 and row["members"] == 2 and row["ops"] == 30
    assert abs(row["ops_per_s"] - 10.0) < 1e-9
    assert abs(row["mean_op_ms"] - 10.0) < 1e-6
    (link,) = snap.links
    assert link["peer"] == "1" and abs(link["send_Bps"] - 2000.0) < 1e-9
    screen = render(snap)
    assert "epoch 3" in screen and "0 -> 1" in screen and "2.0 kB/s" in screen


def test_down_daemons_and_split_epochs_are_shown() -> None:
    up = TargetState("h:1", 1.0, parse_metrics(_text(0, 0, epoch=4)), True)
    other = TargetState("h:2", 1.0, parse_metrics(_text(0, 0, epoch=5)), True)
    down = TargetState("h:3", 1.0, error="connection refused")
    snap = summarize(None, [up, other, down])
    screen = render(snap)
    assert "daemons disagree" in screen and "DOWN" in screen
    assert isinstance(snap, Snapshot) and snap.rows[2]["up"] is False


def test_status_command_reads_live_monitors() -> None:
    listeners = [bind("127.0.0.1:0") for _ in range(2)]
    addresses = [lst.address for lst in listeners]
    monitors = [Monitor(r) for r in range(2)]
    groups: list[Group | None] = [None, None]

    def build(r: int) -> None:
        groups[r] = Group(
            r, addresses, b"s" * 32, listener=listeners[r], observer=monitors[r].observer
        )

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    endpoints = []
    try:
        for r, m in enumerate(monitors):
            g = groups[r]
            assert g is not None
            m.attach(g.engine)
            m.set_view(0, [0, 1], r)
            host, port = m.serve("127.0.0.1", 0)
            endpoints.append(f"{host}:{port}")
        stop = threading.Event()

        def traffic(r: int) -> None:
            g = groups[r]
            assert g is not None
            x = np.ones(1 << 18, dtype=np.float32)
            while not stop.is_set():
                try:
                    g.all_reduce(x)
                except PhalanxError:
                    if stop.is_set():
                        return  # the other rank stopped first: this op has no partner
                    raise
                x[:] = 1

        workers = [threading.Thread(target=traffic, args=(r,)) for r in range(2)]
        for w in workers:
            w.start()
        try:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "phalanx",
                    "status",
                    *endpoints,
                    "--once",
                    "--json",
                    "--interval",
                    "0.5",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout.strip().splitlines()[-1])
        assert snap["epochs"] == [0]
        assert {d["rank"] for d in snap["daemons"]} == {0, 1}
        assert all(d["ops_per_s"] > 0 for d in snap["daemons"])
        assert any(link["send_Bps"] > 0 for link in snap["links"])
    finally:
        for m in monitors:
            m.close()
        for g in groups:
            if g is not None:
                g.close()

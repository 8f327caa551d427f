"""'phalanx bench snapshot' through the CLI: real processes, TCP shard links, SIGKILL of
m holders, a replacement restoring byte-exact (small size to stay fast)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_snapshot_cli_json() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "phalanx",
            "bench",
            "snapshot",
            "--world",
            "6",
            "--k",
            "4",
            "--m",
            "2",
            "--size",
            "8MiB",
            "--shard-bytes",
            "256KiB",
            "--generations",
            "2",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "stall_s",
        "memcpy_s",
        "memcpy_hot_s",
        "seal_s",
        "encode_Bps",
        "restore_local_s",
        "restore_after_m_losses_s",
    ):
        assert row[key] > 0, key
    assert row["restored_exact"] is True and row["shards_lost"] == 2
    # both restores returned the last generation (the state differs in each one)
    assert row["restored_step"] == 2 and row["restore_local_step"] == 2
    assert row["checksum_Bps"] > 0
    # the coder's CPU time is part of its wall time: never the slower of the two
    assert row["encode_cpu_Bps"] >= 0.99 * row["encode_Bps"] > 0
    assert len(row["killed"]) == 2 and "r0" in row["killed"]
    assert row["io_nice"] == 10  # the service's default, said in the row


def test_bench_snapshot_rejects_impossible_codes() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "phalanx",
            "bench",
            "snapshot",
            "--world",
            "4",
            "--k",
            "4",
            "--m",
            "2",
            "--size",
            "1MiB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "k + m <= world" in out.stderr


def test_bench_snapshot_refuses_an_io_nice_out_of_range() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "phalanx", "bench", "snapshot", "--io-nice", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "io_nice must be from 0 to 19" in out.stderr

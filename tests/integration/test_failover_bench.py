"""``phalanx bench failover`` as users run it: a real subprocess, one JSON line out.

One fault end to end through the CLI (the other faults run in test_elastic.py through
the same scenario code), the output contract, and argument errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phalanx.bench import COMMANDS

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"fault", "world", "detect_s", "resume_s", "ops_failed", "correct", "commit_agree"}


def bench(*args: str, timeout: float = 80.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phalanx", "bench", "failover", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_failover_is_in_the_command_table() -> None:
    assert COMMANDS["failover"][0] == "phalanx.bench.failover:register"


def test_kill_prints_one_checked_json_line() -> None:
    out = bench(
        "--fault", "kill", "--world", "2", "--size", "1MiB", "--state-size", "1MiB",
        "--warmup-ops", "3", "--after-ops", "2", "--timeout", "40", "--json", "--quiet",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    row = json.loads(lines[0])
    assert row.keys() >= FIELDS
    assert (row["fault"], row["world"], row["correct"], row["commit_agree"]) == (
        "kill",
        2,
        True,
        True,
    )
    assert 0 < row["detect_s"] <= row["resume_s"] <= 1.0
    assert row["ops_failed"] <= 1


@pytest.mark.parametrize(
    "args",
    [
        ("--fault", "explode"),
        ("--fault", "kill", "--world", "1"),
        ("--world", "3"),  # --fault is required
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: tuple[str, ...]) -> None:
    out = bench(*args, timeout=30.0)
    assert out.returncode == 2
    assert "error" in out.stderr.lower()

"""The runnable examples in examples/ run and end with bit-identical members, and
``phalanx demo --torch`` trains through a kill and a join against its reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from phalanx.demo.scenario import DemoOptions, run_demo

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_elastic_ddp_example_survives_a_kill_and_takes_a_replacement() -> None:
    out = _run("elastic_ddp.py", "--members", "3", "--steps", "40", "--kill-at", "12",
               "--join-at", "20")  # fmt: skip
    assert "SIGKILL member 2" in out and "a replacement joins" in out
    assert "OK: 3 members hold bit-identical parameters" in out


def test_diloco_example_survives_a_kill_and_takes_a_replacement() -> None:
    out = _run("diloco.py", "--members", "3", "--steps", "40", "--sync-every", "5",
               "--kill-at", "12", "--join-at", "20")  # fmt: skip
    assert "outer sync among 2" in out and "outer sync among 3" in out
    assert "OK: 3 members hold bit-identical parameters" in out


def test_torch_demo_matches_its_reference_through_a_kill_and_a_join() -> None:
    res = run_demo(DemoOptions(torch=True, peers=3, steps=40, kill_at=12, join_at=24,
                               step_time=0.02, timeout=200, log_level="INFO"))  # fmt: skip
    assert res.ok, res.errors
    assert res.bit_identical and len(res.members_final) == 3
    assert {f.kind for f in res.faults} == {"kill", "join"}
    assert res.loss_diff < 1e-9 and res.param_diff < 1e-7

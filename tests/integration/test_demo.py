"""``phalanx demo`` end to end: real coordinator, daemons and training processes.

Each run SIGKILLs a peer and its daemon, starts a replacement that must sync state
and join, and exits 0 only if the final model matches the single-process reference
(the demo checks that itself; the test also reads its summary).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from phalanx.demo.model import Problem, batch_indices, grad_sum, make_dataset, reference, shard


def _demo(*args: str, timeout: float = 90.0) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "phalanx", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def _check_ok(rc: int, out: str, err: str) -> None:
    assert rc == 0, f"demo failed (exit {rc}):\n{out}\n--- stderr ---\n{err[-3000:]}"
    assert "OK: the model matches the single-process reference" in out
    assert "bit-identical" in out
    m = re.search(r"difference\s+(\S+) \(tolerance (\S+)\)", out)
    assert m is not None, out
    assert float(m.group(1)) <= float(m.group(2))


def test_issue_scenario_kill_and_join() -> None:
    rc, out, err, _ = _demo("--peers", "3", "--steps", "120", "--kill-at", "40", "--join-at", "80")
    _check_ok(rc, out, err)
    assert "kill peer-1 at step 40" in out
    assert re.search(r"join peer-3 started at step 80: admitted after \S+, 5408 bytes", out)
    assert "final members    peer-0, peer-2, peer-3;" in out
    assert "SIGKILL peer-1" in err


def test_plain_demo_with_defaults() -> None:
    rc, out, err, wall = _demo()
    _check_ok(rc, out, err)
    assert "4 peers, 300/300 steps" in out
    assert "kill peer-2 at step 100" in out
    assert "join peer-4 started at step 180" in out
    assert len(re.findall(r"http://127\.0\.0\.1:\d+/metrics", out)) == 5
    assert wall < 60, f"a plain demo took {wall:.1f}s"


def test_lossy_codec_within_its_tolerance() -> None:
    rc, out, err, _ = _demo(
        "--peers", "2", "--steps", "60", "--kill-at", "15", "--join-at", "30", "--codec", "int8"
    )  # fmt: skip
    _check_ok(rc, out, err)
    assert "codec int8" in out


def test_bad_options_exit_2() -> None:
    rc, _, err, _ = _demo("--peers", "1", "--kill-at", "5")
    assert rc == 2
    assert "--kill-at needs --peers >= 2" in err
    rc, _, err, _ = _demo("--steps", "50", "--join-at", "80")
    assert rc == 2
    assert "--join-at must be in 1..steps-1" in err


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_sharded_sum_is_the_full_batch_gradient(world: int) -> None:
    """The invariant the demo rests on: summing per-shard gradient sums over any world
    size gives the whole batch's gradient (up to the order of float64 additions)."""
    pr = Problem()
    data = make_dataset(pr, 7)
    p = reference(pr, 7, 3)
    idx = batch_indices(pr, 7, 3)
    whole, whole_loss = grad_sum(pr, p, data.x[idx], data.y[idx])
    parts = [shard(idx, r, world) for r in range(world)]
    assert sorted(int(i) for part in parts for i in part) == sorted(int(i) for i in idx)
    sums = [grad_sum(pr, p, data.x[s], data.y[s]) for s in parts]
    total = sum(g for g, _ in sums)
    assert abs(sum(v for _, v in sums) - whole_loss) < 1e-9
    assert float(abs(total - whole).max()) < 1e-12

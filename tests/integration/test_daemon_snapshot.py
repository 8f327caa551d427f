"""Snapshots through real daemon processes and the client (issue 5, promise 5).

One cluster: an in-process coordinator and three ``phalanx daemon`` processes with
k + m = 2 + 1 and a 2 MiB holder budget (``[snapshot]`` in a TOML file). The pytest
process is a client of each daemon; a spawned process plays the training process that
is SIGKILLed.

* snapshot -> seal -> restore is byte-exact (shared-memory and plain arrays, nested,
  bfloat16, empty arrays);
* the training process is SIGKILLed after its second seal; a new client of the same
  daemon restores step 2 byte-exact (the daemon kept the service);
* object arrays are refused with ``LayoutError`` before anything is copied;
* a state too large for the holders' budget is abandoned (``SnapshotAbandoned``,
  ``reason == "budget"``) and the previous generation is still the one restored;
* a daemon is SIGKILLed (a holder lost): another member's generation is rebuilt from
  the survivors, and a replacement daemon restores the dead member's state with
  ``restore_peer``, byte-exact;
* the snapshot metrics are on ``/metrics``.

Every child is stopped in ``finally`` (SIGTERM, then SIGKILL) and reaped.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import urllib.request
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import phalanx
from phalanx.testing.launcher import LocalCluster
from tests.integration.test_daemon import Daemons

pytestmark = pytest.mark.timeout(240)

BUDGET = 2 << 20
CONFIG = f"[snapshot]\nk = 2\nm = 1\nbudget_bytes = {BUDGET}\nseal_timeout = 60.0\n"


def make_state(seed: int, pg: phalanx.Client | None = None, n: int = 40_000) -> dict[str, Any]:
    """A deterministic nested state; ``w`` lives in ``pg``'s shared memory if given."""
    rng = np.random.default_rng(seed)
    w = pg.empty((n,), "float32") if pg is not None else np.empty(n, np.float32)
    w[:] = rng.standard_normal(n, dtype=np.float32)
    return {
        "model": {"w": w, "b": rng.integers(0, 1 << 40, (17, 3), dtype=np.int64)},
        "opt": {"m": rng.standard_normal(1000), "be": np.arange(5, dtype=">i4")},
        "bf": rng.standard_normal(64).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(
        isinstance(b, np.ndarray)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.tobytes() == b.tobytes()
    )


def _trainer(sock: str, ready: str) -> None:
    """Snapshots steps 1 and 2 (waiting for each seal), says so, then idles until killed."""
    pg = phalanx.connect(sock)
    for step in (1, 2):
        h = pg.snapshot(make_state(step, pg), step)
        assert h.zero_copy is False  # some arrays are plain numpy: staged
        h.wait(60.0)
    Path(ready).write_text("sealed")
    time.sleep(120.0)


def cluster(daemons: Daemons, tmp: Path, n: int = 3) -> AbstractContextManager[LocalCluster]:
    """The ``daemons`` fixture's cluster with every daemon on the test's snapshot config."""
    (tmp / "phalanx.toml").write_text(CONFIG)
    return daemons(n, "--config", str(tmp / "phalanx.toml"), grace=20.0)


def test_snapshots_through_daemons(daemons: Daemons, tmp_path: Path) -> None:
    mp = multiprocessing.get_context("spawn")
    with cluster(daemons, tmp_path) as cl:
        ready = cl.ready_line(0)
        assert "shards=" in ready
        # --- the training process snapshots twice and is SIGKILLed
        flag = tmp_path / "trainer.ready"
        trainer = mp.Process(target=_trainer, args=(cl.sockets[0], str(flag)))
        trainer.start()
        try:
            deadline = time.monotonic() + 90
            while not flag.exists():
                assert trainer.exitcode is None, f"trainer died: {trainer.exitcode}"
                assert time.monotonic() < deadline, "trainer did not seal in time"
                time.sleep(0.05)
            assert trainer.pid is not None
            os.kill(trainer.pid, signal.SIGKILL)
            trainer.join(10)
        finally:
            if trainer.is_alive():
                trainer.kill()
                trainer.join(5)
        assert cl.procs[0].poll() is None  # the daemon outlived its training process

        pgs = [phalanx.connect(s) for s in cl.sockets]
        try:
            pg0, pg1, pg2 = pgs
            # --- the restarted training process restores from its daemon
            step, state = pg0.restore()
            assert step == 2 and same(state, make_state(2))
            assert same(pg0.restore(step=2)[1], make_state(2))
            # --- a shared-memory-only snapshot is zero-copy; restore is exact
            shm = {"w": make_state(3, pg0)["model"]["w"]}
            h = pg0.snapshot(shm, 3)
            assert h.zero_copy and h.nbytes >= shm["w"].nbytes
            info = h.wait(60.0)
            assert info.step == 3 and (info.k, info.m) == (2, 1) and len(info.holders) == 3
            assert h.done()
            step, state = pg0.restore()
            assert step == 3 and same(state, {"w": make_state(3)["model"]["w"]})
            # --- bad input: refused before anything is copied
            with pytest.raises(phalanx.LayoutError, match="object") as bad:
                pg0.snapshot({"ok": np.ones(4), "o": np.array([object(), 1])}, 4)
            assert bad.value.path == "o" and isinstance(bad.value, ValueError)
            with pytest.raises(phalanx.LayoutError, match="contiguous"):
                pg0.snapshot({"t": np.ones((4, 4))[:, 1]}, 4)
            # --- budget exhausted on the holders: abandoned, previous generation intact
            big = {"x": np.ones(2 * BUDGET // 4 + 1024, np.float32)}
            hb = pg0.snapshot(big, 4)
            with pytest.raises(phalanx.SnapshotAbandoned) as ab:
                hb.wait(60.0)
            assert ab.value.reason == "budget" and ab.value.holder
            step, state = pg0.restore()
            assert step == 3 and same(state, {"w": make_state(3)["model"]["w"]})
            with pytest.raises(phalanx.SnapshotNotFound):
                pg0.restore(step=99)
            with pytest.raises(phalanx.SnapshotNotFound):
                pg0.restore_peer("nobody")
            # --- the other members snapshot; then d1's daemon is SIGKILLed
            for i, pg in ((1, pg1), (2, pg2)):
                pg.snapshot(make_state(10 + i, pg), 5).wait(60.0)
            cl.procs[1].kill()
            cl.procs[1].wait(10)
            with pytest.raises(phalanx.DaemonUnavailable):
                pg1.view()
            # d2's generation is rebuilt from the survivors (d1 held one of its pieces)
            step, state = pg0.restore_peer("d2")
            assert step == 5 and same(state, make_state(12))
            # a replacement daemon restores the dead member's state from its holders
            cl.coordinator.wait_for(lambda v: "d1" not in v, 30.0)
            cl.add_daemon("--config", str(tmp_path / "phalanx.toml"))
            cl.ready_line(3)
            with phalanx.connect(cl.sockets[3]) as pg3:
                t0 = time.perf_counter()
                step, state = pg3.restore_peer("d1")
                took = time.perf_counter() - t0
                assert step == 5 and same(state, make_state(11))
                with pytest.raises(phalanx.SnapshotNotFound):
                    pg3.restore()  # the replacement has nothing of its own yet
            assert took < 30.0
        finally:
            for pg in pgs:
                pg.close()
        metrics = ready.split("metrics=")[1].split()[0]
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'phalanx_snapshot_seals_total{outcome="committed"}' in body
        assert 'phalanx_snapshot_seals_total{outcome="abandoned"} 1.0' in body
        assert "phalanx_snapshot_stall_seconds_count 4.0" in body

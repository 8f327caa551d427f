"""The client against real daemon processes (world 2): every collective, sync and async,
zero-copy and copied arrays, torch CPU tensors giving the same bytes as numpy, typed
errors; a training process SIGKILLed mid-run and restarted reconnects to its daemon
(which kept the view and the state) and training continues to the exact result; and
embedded mode (``phalanx.start``) with the same API.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.testing.procs import RankContext, run_ranks
from tests.integration.test_daemon import Daemons

pytestmark = pytest.mark.timeout(120)


def _collectives(ctx: RankContext, sockets: list[str]) -> dict[str, Any]:
    import torch

    pg = phalanx.connect(sockets[ctx.rank], op_timeout=30.0)
    try:
        v = pg.view()
        assert v.world == 2 and v.rank is not None
        r = v.rank  # the rank in the view (join order), not the process index
        base = np.arange(1000, dtype=np.float32)
        # all_reduce, zero-copy (shared memory) and copied (plain numpy), sync and async
        x = pg.empty((1000,), "float32")
        x[:] = base + r
        res = pg.all_reduce(x)
        assert res.zero_copy and res.contributors == v.members and res.epoch == v.epoch
        assert np.array_equal(x, 2 * base + 1)
        # large: through a twin region that both processes exchange (docs/daemon.md)
        big = pg.empty((2, 1 << 20), "float32")
        for i in range(3):
            big[:] = r + i
            assert pg.all_reduce(big).in_twin and np.all(big == 2 * i + 1)
        y = np.full(333, r + 1, np.float64)
        assert not pg.all_reduce(y, op="avg").zero_copy
        assert np.all(y == 1.5)
        z = np.full((3, 7), r + 1, np.int64)
        h = pg.all_reduce(z, op="max", async_op=True)
        assert h.wait(30.0).op == "all_reduce" and np.all(z == 2)
        # broadcast from view rank 1, all_gather, reduce_scatter, barrier
        b = np.full(10, r, np.int64)
        pg.broadcast(b, root=1)
        assert np.all(b == 1)
        g = np.zeros(10, np.int32)
        mine = pg.chunk(10)
        g[mine] = r + 1
        pg.all_gather(g)
        assert g.tolist() == [1] * 5 + [2] * 5
        rs = np.arange(10, dtype=np.float32)
        pg.reduce_scatter(rs)
        expect = np.arange(10, dtype=np.float32)
        expect[mine] *= 2
        assert np.array_equal(rs, expect)
        assert pg.barrier().op == "barrier"
        # torch CPU tensors: same bytes as numpy, zero-copy when over shared memory
        t = torch.arange(1000, dtype=torch.float32) + r
        pg.all_reduce(t)
        assert np.array_equal(t.numpy(), x)
        ts = torch.from_numpy(pg.empty((1000,), "float32"))
        ts.copy_(torch.arange(1000, dtype=torch.float32) + r)
        assert pg.all_reduce(ts).zero_copy and np.array_equal(ts.numpy(), x)
        tn = (torch.arange(20, dtype=torch.float64).reshape(4, 5) + r).t()  # not contiguous
        ref = (np.arange(20, dtype=np.float64).reshape(4, 5) * 2 + 1).T
        pg.all_reduce(tn)
        assert np.array_equal(tn.numpy(), ref)
        tb = torch.full((64,), float(r + 1), dtype=torch.bfloat16)
        pg.all_reduce(tb)
        assert torch.all(tb == 3.0)
        # typed errors from the daemon
        with pytest.raises(phalanx.ConfigError, match="codec"):
            pg.all_reduce(np.ones(4, np.float32), codec="nope")
        with pytest.raises(phalanx.UnsupportedError):
            pg.all_reduce(np.ones(4, np.complex64))
        with pytest.raises(phalanx.ConfigError):
            pg.broadcast(np.ones(4, np.float32), root=5)
        ok = pg.all_reduce(np.ones(4, np.float32))  # the group survived both refusals
        assert ok.epoch == v.epoch
        assert pg.commit(0) is True
        return {"rank": r, "seq": ok.seq}
    finally:
        pg.close()


def test_every_collective_through_the_daemon(daemons: Daemons) -> None:
    with daemons(2) as cl:
        out = run_ranks(_collectives, 2, cl.sockets, timeout=60.0)
    assert sorted(o["rank"] for o in out) == [0, 1]
    assert out[0]["seq"] == out[1]["seq"]


# ----------------------------------------------------------------------------- restart

STEPS = 40
N = 256


def _trainer(sock: str, progress: str) -> None:
    """A training loop that keeps its state in the daemon; resumable after a crash."""
    pg = phalanx.connect(sock, op_timeout=60.0)
    w = pg.empty((N,), "float64")
    if pg.attach_state({"w": w}, step=None) < 0:  # the daemon holds nothing: fresh start
        pg.attach_state({"w": w}, step=0)
    while True:
        try:
            info = pg.begin_step()
        except phalanx.StepAborted:
            continue
        if info.step >= STEPS:
            break
        g = np.full(N, float(info.step + 1))  # the same on every member: exact result
        try:
            pg.all_reduce(g, op="avg", retry=True)
        except (phalanx.StepAborted, phalanx.ViewChanged):
            continue
        if pg.commit(info.step):
            w += g
            pg.update_state(info.step + 1)
        with open(progress, "w") as f:
            f.write(str(info.step))
        time.sleep(0.02)
    np.save(progress + ".npy", w)
    pg.close()


def _step_of(path: Path) -> int:
    try:
        return int(path.read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def test_training_process_sigkilled_and_restarted_continues(
    daemons: Daemons, tmp_path: Path
) -> None:
    mp = multiprocessing.get_context("spawn")
    with daemons(2) as cl:
        prog = [tmp_path / "p0", tmp_path / "p1"]
        procs = [mp.Process(target=_trainer, args=(cl.sockets[i], str(prog[i]))) for i in (0, 1)]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + 40
            while _step_of(prog[0]) < 8:
                assert time.monotonic() < deadline, "training did not start"
                assert procs[0].exitcode is None and procs[1].exitcode is None
                time.sleep(0.02)
            assert procs[0].pid is not None
            os.kill(procs[0].pid, 9)  # SIGKILL the training process, not its daemon
            procs[0].join(5)
            killed_at = _step_of(prog[0])
            restarted = mp.Process(target=_trainer, args=(cl.sockets[0], str(prog[0])))
            procs.append(restarted)
            restarted.start()
            for p in (procs[1], restarted):
                p.join(60)
                assert p.exitcode == 0, f"trainer exit code {p.exitcode}"
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        assert cl.procs[0].poll() is None  # the daemon outlived its training process
    expected = STEPS * (STEPS + 1) / 2  # sum of (step + 1): every step applied exactly once
    w0 = np.load(str(prog[0]) + ".npy")
    w1 = np.load(str(prog[1]) + ".npy")
    assert 8 <= killed_at < STEPS
    assert np.all(w0 == expected) and np.array_equal(w0, w1)


# ----------------------------------------------------------------------------- embedded


def test_embedded_mode_same_api_and_view_callbacks() -> None:
    pg = phalanx.start()
    seen: list[phalanx.ViewInfo] = []
    try:
        pg.on_view_change(seen.append)
        assert pg.coordinator_address is not None
        assert pg.view().world == 1
        x = pg.empty((5,), "int64")
        x[:] = 7
        assert pg.all_reduce(x).zero_copy and np.all(x == 7)
        secret = os.urandom(32)
        other = phalanx.start(secret=secret)  # a second group with its own coordinator
        try:
            assert other.view().members != pg.view().members
        finally:
            other.close()
        with pytest.raises(phalanx.ConfigError):
            phalanx.start(coordinator="127.0.0.1:1")  # an existing group needs the secret
    finally:
        pg.close()
    assert pg.daemon is not None and not os.path.exists(pg.socket)
    with pytest.raises(phalanx.DaemonUnavailable):
        pg.view()


_EMBEDDED_THEN_WAIT = """
import sys, time, phalanx
pg = phalanx.start()
print(pg.socket, flush=True)
time.sleep(60)
"""


def test_the_socket_folder_of_a_killed_embedded_process_is_swept_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process running an embedded daemon that is SIGKILLed (the examples kill
    one) never removes its socket folder: each kill left one in /tmp, a dead socket
    inside. The next phalanx.start() on the machine removes the folders of embedded
    daemons whose process is gone -- and nothing else."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", _EMBEDDED_THEN_WAIT], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])  # fmt: skip
    try:
        assert proc.stdout is not None
        sock = Path(proc.stdout.readline().strip())
        assert sock.parent.parent == tmp_path and sock.exists(), sock
    finally:
        proc.kill()
        proc.wait(30)
    assert sock.exists()  # nobody cleaned up after the SIGKILL
    alive = tmp_path / f"phalanx-{os.getppid()}-live"  # a live process's: kept
    busy = tmp_path / f"phalanx-{proc.pid}-keep"  # a dead one's holding something else
    for d in (alive, busy):
        d.mkdir()
        (d / "daemon.sock").touch()
    (busy / "notes.txt").touch()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pg = phalanx.start()
    try:
        assert Path(pg.socket).parent.name.startswith(f"phalanx-{os.getpid()}-")
        assert not sock.parent.exists(), "the dead process's folder is still there"
        assert alive.exists() and busy.exists()
    finally:
        pg.close()
    assert not Path(pg.socket).parent.exists()


def test_state_calls_wait_out_a_busy_daemon() -> None:
    """Regression (churn soak, seed 20261124): a trainer killed mid-step was restarted
    while its daemon was still leaving and rejoining (it holds the step lock, up to its
    join timeout); the new trainer's attach/update gave up after a fixed 10 s and the
    trainer crashed. State calls now wait as long as the daemon may be busy."""
    pg = phalanx.start()
    try:
        x = pg.empty((4,), "float32")
        x[:] = 1
        assert pg.attach_state({"w": x}, step=0) == 0
        assert pg.daemon is not None and pg.daemon.server is not None
        busy = pg.daemon.server._group_lock
        assert busy.acquire(timeout=5)
        threading.Timer(11.0, busy.release).start()  # longer than the old 10 s
        t0 = time.monotonic()
        pg.update_state(1)
        assert time.monotonic() - t0 >= 10.5
    finally:
        pg.close()

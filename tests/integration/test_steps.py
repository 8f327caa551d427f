"""Training steps through real daemon processes: no step is committed silently over
other members than it began with, the group heals from a rank's mistake without a
view change, StepInfo.synced says what that begin_step received, and a client that
only runs collectives costs its daemon nothing when it exits.

Issue 18 point 4 (a kill mid-step, the retried op on the smaller view), point 1's
general half (a PeerFailure whose suspects are alive), point 6(a); issue 15's synced.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.membership.config import MembershipConfig
from phalanx.testing.launcher import LocalCluster, local_cluster
from tests.integration.test_daemon import Daemons

pytestmark = pytest.mark.timeout(150)

_MP = multiprocessing.get_context("spawn")
N = 1024


def _stepper(sock: str, allow_partial: bool, contribute: bool, pipe: Connection) -> None:
    """One trainer: attach state, begin a step, tell the test, wait for 'go', then
    (if ``contribute``) all-reduce with retry and vote; report what happened."""
    pg = phalanx.connect(sock, op_timeout=40.0)
    try:
        w = pg.empty((4,), "float64")
        pg.attach_state({"w": w}, step=0)
        info = pg.begin_step(allow_partial=allow_partial)
        pipe.send(("ready", info.members))
        assert pipe.recv() == "go"
        if not contribute:
            time.sleep(60)  # killed by the test while "inside the step"
        x = np.full(N, 1.0, np.float32)
        out: dict[str, Any] = {"step": info.step}
        try:
            res = pg.all_reduce(x, retry=True, timeout=30.0)
            out["contributors"] = res.contributors
            out["sum"] = float(x[0])
        except phalanx.StepAborted as exc:
            out["aborted"] = str(exc)
            out["input_kept"] = bool(np.all(x == 1.0))
        out["committed"] = pg.commit(info.step, timeout=20.0)
        pipe.send(("done", out))
    finally:
        pg.close()


def _steady(n: int, secret: bytes, tmp: Path) -> AbstractContextManager[LocalCluster]:
    """Like ``daemons``, with a failure detector that a loaded machine does not trip
    (heartbeats may lag by 2 s): the only view change is the one the test makes."""
    config = MembershipConfig(heartbeat_timeout=2.5, confirm_window=1.0)
    return local_cluster(n, secret, tmp, config=config, ready_timeout=30.0)


@pytest.mark.parametrize("allow_partial", [False, True])
def test_a_kill_mid_step_never_commits_a_partial_step_unless_opted_in(
    secret: bytes, tmp_path: Path, allow_partial: bool
) -> None:
    with _steady(3, secret, tmp_path) as cl:
        pipes: list[Connection] = []
        procs = []
        try:
            for i in range(3):
                mine, theirs = _MP.Pipe()
                p = _MP.Process(target=_stepper, args=(cl.sockets[i], allow_partial, i < 2, theirs))
                p.start()
                procs.append(p)
                pipes.append(mine)
            for pipe in pipes:
                assert pipe.poll(60), "a trainer did not begin its step"
                kind, members = pipe.recv()
                assert kind == "ready" and len(members) == 3
            for pipe in pipes:
                pipe.send("go")
            time.sleep(0.5)  # d0 and d1 are inside the all-reduce, waiting for d2
            cl.procs[2].send_signal(signal.SIGKILL)  # the member dies mid-step
            assert procs[2].pid is not None
            os.kill(procs[2].pid, signal.SIGKILL)
            outs = []
            for pipe in pipes[:2]:
                assert pipe.poll(60), "a survivor did not finish its step"
                kind, out = pipe.recv()
                assert kind == "done"
                outs.append(out)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(10)
    if allow_partial:
        # opted in: the op ran over the survivors, and the step commits on both
        for out in outs:
            assert sorted(out["contributors"]) == ["d0", "d1"] and out["sum"] == 2.0
            assert out["committed"] is True
    else:
        # the retry would have run over 2 of the 3 members the step began with
        for out in outs:
            assert "aborted" in out and out["input_kept"], out
            assert out["committed"] is False, out


def _mismatch(sock: str, n: int, pipe: Connection) -> None:
    pg = phalanx.connect(sock, op_timeout=30.0)
    try:
        epoch = pg.view().epoch
        bad = np.ones(n, np.float32)
        t0 = time.monotonic()
        err = ""
        try:
            pg.all_reduce(bad, timeout=10.0)  # the ranks disagree on the length
        except phalanx.OpMismatch as exc:
            err = type(exc).__name__
        except TimeoutError as exc:
            err = f"TimeoutError: {exc}"
        failed_s = time.monotonic() - t0
        good = np.full(64, 2.0, np.float32)
        t1 = time.monotonic()
        res = pg.all_reduce(good, retry=True, timeout=10.0)
        pipe.send(
            {
                "error": err,
                "input_kept": bool(np.all(bad == 1.0)),
                "failed_s": failed_s,
                "healed_s": time.monotonic() - t1,
                "sum": float(good[0]),
                "same_view": res.epoch == epoch == pg.view().epoch,
                "failed_attempts": res.failed_attempts,
            }
        )
    finally:
        pg.close()


def test_after_a_ranks_mistake_the_group_is_usable_again_without_a_view_change(
    daemons: Daemons,
) -> None:
    """Issue 18.1: two ranks all-reduce arrays of different lengths; both get OpMismatch
    (the op descriptors differ, so nothing moves); the next correct op succeeds within
    its deadline in the same view, where it used to time out until a view change that
    never came."""
    with daemons(2) as cl:
        pipes, procs = [], []
        try:
            for i, n in enumerate((10, 12)):
                mine, theirs = _MP.Pipe()
                p = _MP.Process(target=_mismatch, args=(cl.sockets[i], n, theirs))
                p.start()
                procs.append(p)
                pipes.append(mine)
            outs = []
            for pipe in pipes:
                assert pipe.poll(60), "a rank did not finish"
                outs.append(pipe.recv())
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(10)
    for out in outs:
        assert out["error"] == "OpMismatch" and out["input_kept"], out
        assert out["sum"] == 4.0 and out["same_view"], out
        assert out["healed_s"] < 5.0, out


def test_synced_is_true_only_on_the_begin_step_that_received_state() -> None:
    secret = os.urandom(32)
    a = phalanx.start(secret=secret, member_id="a")
    b: phalanx.Client | None = None
    try:
        w = a.empty((8,), "float32")
        w[:] = 3.0
        a.attach_state({"w": w}, step=5)
        first = a.begin_step()
        assert first.synced is False and first.step == 5
        b = phalanx.start(coordinator=a.coordinator_address, secret=secret, member_id="b")
        wb = b.empty((8,), "float32")
        assert b.attach_state({"w": wb}, step=None) == -1  # a newcomer: nothing yet
        infos: list[phalanx.StepInfo] = []

        def joiner() -> None:
            assert b is not None
            infos.append(b.begin_step(timeout=30.0))
            infos.append(b.begin_step(timeout=30.0))

        deadline = time.monotonic() + 20
        while a.view().world != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        import threading

        t = threading.Thread(target=joiner)
        t.start()
        second = a.begin_step(timeout=30.0)
        third = a.begin_step(timeout=30.0)
        t.join(30.0)
        got, again = infos
        assert got.synced and got.sync_bytes == w.nbytes and got.step == 5
        assert np.all(wb == 3.0)
        assert not again.synced and again.sync_bytes == 0  # the same view: nothing received
        assert not second.synced and not third.synced  # the source never receives
        # each daemon counted the transfer (phalanx_state_sync_*)
        for client, role in ((a, "sent"), (b, "received")):
            assert client.daemon is not None
            reg = client.daemon.monitor.registry
            ok = {"role": role, "outcome": "ok"}
            assert reg.get_sample_value("phalanx_state_syncs_total", ok) == 1.0, role
            failed = {"role": role, "outcome": "failed"}
            assert reg.get_sample_value("phalanx_state_syncs_total", failed) == 0.0, role
            got_bytes = reg.get_sample_value("phalanx_state_sync_bytes_total", {"role": role})
            assert got_bytes == w.nbytes, (role, got_bytes)
            assert reg.get_sample_value("phalanx_state_sync_failures_in_row") == 0.0
    finally:
        if b is not None:
            b.close()
        a.close()


def _collectives_only(sock: str) -> None:
    pg = phalanx.connect(sock, op_timeout=30.0)
    for _ in range(5):
        pg.all_reduce(np.ones(16, np.float32), timeout=20.0)
    sys.exit(0)  # a clean exit without close(): no goodbye on the socket


def test_a_client_that_only_runs_collectives_costs_its_daemon_nothing_when_it_exits(
    daemons: Daemons,
) -> None:
    """Issue 18.6(a): the daemon used to leave and rejoin (a new incarnation) when such
    a client exited, so restarting it with --incarnation 2 was refused."""
    with daemons(2) as cl:
        epoch = cl.coordinator.view.epoch
        procs = [_MP.Process(target=_collectives_only, args=(s,)) for s in cl.sockets]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        time.sleep(1.0)  # time to leave and rejoin, had the daemon wanted to
        view = cl.coordinator.view
        assert view.epoch == epoch and [m.incarnation for m in view.members] == [1, 1]
        errs = cl.outs[0].with_suffix(".err").read_text()
        assert "client_lost_mid_step" not in errs and "event=client_lost " in errs
        # the operator restarts d1 as its next incarnation: admitted
        cl.procs[1].send_signal(signal.SIGKILL)
        cl.procs[1].wait(10)
        cl.daemons[1] = cl.launcher.start_daemon(
            "d1", "--incarnation", "2", coordinator=cl.coordinator.address, name="d1b"
        )
        cl.ready_line(1)
        cl.coordinator.wait_for(
            lambda v: any(m.id == "d1" and m.incarnation == 2 for m in v.members), 20.0
        )

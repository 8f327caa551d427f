"""The churn harness's bookkeeping (phalanx/testing/stress.py and its helpers), fed
synthetic events and stand-in processes: what it counts as a crash, a hang, a lost
snapshot or a wrong result, what it cleans up, and what its seed fixes. No cluster is
started here (tests/integration/test_stress.py runs the real one)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from phalanx.testing import _stress_cluster, _stress_trainer, netns, stress
from phalanx.testing import _stress_model as model
from phalanx.testing._stress_check import Checker
from phalanx.testing._stress_cluster import Cluster, Peer, leaks, socket_fds
from phalanx.testing.launcher import Proc
from phalanx.testing.stress import StressConfig, _Run

pytestmark = pytest.mark.timeout(60)

Event = tuple[str, str, float, dict[str, Any]]


# ----------------------------------------------------------------------------- helpers


class _Trainer:
    """A stand-in for a trainer's multiprocessing.Process."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode: int | None = None
        self._final = exitcode
        self.pid = None
        self.joined: list[float | None] = []

    def join(self, timeout: float | None = None) -> None:
        self.joined.append(timeout)
        self.exitcode = self._final

    def is_alive(self) -> bool:
        return self.exitcode is None

    def close(self) -> None:
        pass


@pytest.fixture
def cluster() -> Any:
    cl = Cluster(heartbeat_timeout=None, netns=False, log_level="WARNING")
    procs: list[subprocess.Popen[bytes]] = []
    cl._test_procs = procs  # type: ignore[attr-defined]
    try:
        yield cl
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)
        cl.remove_dir()


def _exited(cl: Cluster, rc: int) -> subprocess.Popen[bytes]:
    code = f"import os; os.kill(os.getpid(), {-rc})" if rc < 0 else f"import sys; sys.exit({rc})"
    p = subprocess.Popen([sys.executable, "-c", code])
    p.wait(30)
    cl._test_procs.append(p)  # type: ignore[attr-defined]
    return p


def _sleeping(cl: Cluster) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    cl._test_procs.append(p)  # type: ignore[attr-defined]
    return p


def _peer(cl: Cluster, name: str, daemon: subprocess.Popen[bytes], status: str = "running",
          trainer: _Trainer | None = None) -> tuple[Peer, Any]:  # fmt: skip
    ours, theirs = multiprocessing.Pipe()
    p = Peer(name, len(cl.peers) + 1, daemon, Path("/nonexistent"), "/x", conn=ours,
             status=status)  # fmt: skip
    p.trainer = cast(Any, trainer if trainer is not None else _Trainer(0))
    cl.peers[name] = p
    return p, theirs


def _run(cl: Cluster, **cfg: Any) -> tuple[_Run, list[str | None]]:
    run = _Run(StressConfig(seed=1, **cfg), cl, lambda msg: None)
    replaced: list[str | None] = []
    run.start_peer = lambda restore_peer=None: replaced.append(restore_peer)  # type: ignore[method-assign]
    return run, replaced


def _done(name: str, why: str) -> Event:
    return ("done", name, time.monotonic(), {"why": why})


# ------------------------------------------------------------------ 1. daemon crashes


def test_a_daemon_that_crashed_is_a_crash_even_when_its_trainer_reports_first(
    cluster: Cluster,
) -> None:
    """The trainer of a dead daemon gets DaemonUnavailable and says "done" at once:
    pump() retired (SIGKILLed) the peer as a replacement before advance() ever looked
    at the daemon's exit status, so a crashed daemon was a plain replacement."""
    run, replaced = _run(cluster)
    _p, t = _peer(cluster, "p0", _exited(cluster, 1))
    t.send(_done("p0", "DaemonUnavailable: the daemon closed the connection"))
    t.close()
    run.pump(0.5)
    run.advance()
    assert run.check.crashes == 1 and replaced == ["p0"], run.check.details
    assert "daemon p0 exited rc=1" in run.check.details[-1]


def test_a_leaving_daemon_that_crashes_is_a_crash_and_a_clean_stop_is_not(
    cluster: Cluster,
) -> None:
    run, _ = _run(cluster)
    _p, t = _peer(cluster, "p1", _exited(cluster, -signal.SIGSEGV), status="leaving")
    t.send(_done("p1", "stopped"))
    run.pump(0.5)
    assert run.check.crashes == 1 and "p1" not in cluster.peers
    # exits the harness asked for (SIGTERM: 0 or the signal's status) are not crashes,
    # nor is whatever a daemon the harness SIGKILLed exits with
    for i, rc in enumerate((0, -signal.SIGTERM, 128 + signal.SIGTERM)):
        _q, t = _peer(cluster, f"q{i}", _exited(cluster, rc), status="leaving")
        t.send(_done(f"q{i}", "stopped"))
    killed, _t = _peer(cluster, "k", _sleeping(cluster))
    run.retire(killed, kill=True)
    killed.daemon.wait(10)
    run.pump(0.5)
    run.advance()
    assert run.check.crashes == 1, run.check.details


def test_a_retired_daemon_is_judged_when_reaped(cluster: Cluster) -> None:
    """A graceful leave (SIGTERM) whose daemon exits with an error is a crash."""
    run, _ = _run(cluster)
    p, _t = _peer(cluster, "p2", _exited(cluster, 1), status="leaving")
    cluster.retire(p, kill=False)  # the signals find it gone: its own status counts
    run.advance()
    assert run.check.crashes == 1, run.check.details


def test_a_coordinator_that_dies_on_its_own_is_a_crash(cluster: Cluster) -> None:
    run, _ = _run(cluster)
    for name, killed in (("coordinator-1", True), ("coordinator-2", False)):
        proc = Proc(name, "coordinator", _exited(cluster, 1), None, cluster.dir / "x.err",
                    info={"address": "127.0.0.1:1"}, killed=killed)  # fmt: skip
        cluster.launcher.procs.append(proc)
    run.advance()
    run.advance()
    assert run.check.crashes == 1 and "coordinator-2" in run.check.details[-1]


# ----------------------------------------------------------- 2. trainers killed by signals


def test_a_trainer_that_died_of_a_signal_is_a_crash(cluster: Cluster) -> None:
    """SIGSEGV, SIGBUS, the OOM killer: the pipe closes without "done"; that was a
    replacement, its exit status never read."""
    run, replaced = _run(cluster)
    dead = _Trainer(-signal.SIGSEGV)
    _p, t = _peer(cluster, "p0", _sleeping(cluster), trainer=dead)
    t.close()
    run.pump(0.5)
    assert run.check.crashes == 1 and replaced == ["p0"], run.check.details
    assert "SIGSEGV" in run.check.details[-1] and dead.joined
    # killed by the harness, or ended after saying "done": no crash
    p, t = _peer(cluster, "p1", _sleeping(cluster), trainer=_Trainer(-signal.SIGKILL))
    p.status = "restarting"
    p.signal(signal.SIGKILL, daemon=False)
    t.close()
    _p, t2 = _peer(cluster, "p2", _sleeping(cluster), trainer=_Trainer(0))
    t2.send(_done("p2", "stopped"))
    t2.close()
    run.pump(0.5)
    run.pump(0.1)
    assert run.check.crashes == 1, run.check.details


# --------------------------------------------------------------- 3. hangs near the end


def test_the_silent_trainer_watchdog_covers_every_state_with_a_trainer(
    cluster: Cluster,
) -> None:
    run, _ = _run(cluster, hang_s=1.0)
    now = time.monotonic()
    leaving, _t1 = _peer(cluster, "p0", _sleeping(cluster), status="leaving")
    leaving.t_last = now - 11.5
    starting, _t2 = _peer(cluster, "p1", _sleeping(cluster), status="starting")
    starting.t_last = now - 11.5  # attach_state may wait out a daemon busy rejoining
    run.advance()
    assert run.check.hangs == 1 and "p0" not in cluster.peers, run.check.details
    starting.t_last = now - 45.0
    run.advance()
    assert run.check.hangs == 2 and "p1" not in cluster.peers, run.check.details


def test_a_straggler_killed_at_the_end_is_a_hang_when_it_was_stuck_already(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finish() kills members still in a step after the others stopped: waiting on the
    stopped members is the stop's doing, but one silent for hang_s already was stuck
    before it (the churn phase's checks end at t_end: such a hang was never counted)."""
    monkeypatch.setattr(stress, "_STOP_STRAGGLER_S", 0.2)
    run, _ = _run(cluster, hang_s=3.0)
    stuck, _t1 = _peer(cluster, "p0", _sleeping(cluster))
    stuck.t_last = time.monotonic() - 5.0
    _slow, _t2 = _peer(cluster, "p1", _sleeping(cluster))  # in a step, not stuck
    _stopper, t3 = _peer(cluster, "p2", _sleeping(cluster))
    t3.send(_done("p2", "stopped"))
    t3.close()
    run.finish(time.monotonic() + 10.0)
    assert run.check.hangs == 1 and "p0" in run.check.details[-1], run.check.details
    assert not cluster.peers.keys() & {"p0", "p1"}
    assert run.t_finished is not None


def test_trainers_that_never_reach_the_stop_boundary_are_hangs(cluster: Cluster) -> None:
    run, _ = _run(cluster, hang_s=0.5)
    ends = [_peer(cluster, name, _sleeping(cluster))[1] for name in ("p0", "p1")]
    t0 = time.monotonic()
    run.finish(t0 + 1.0)  # nobody stops: no straggler rule, the deadline
    assert run.check.hangs >= 2, run.check.details
    assert "did not stop within" in run.check.details[-1] and ends


# -------------------------------------------------------- 4. an eviction never rejoined


def test_a_trainer_that_gives_up_on_its_evicted_daemon_reports_a_hang() -> None:
    sent: list[Event] = []
    out = cast(Any, _stress_trainer._Out(None, "p3"))
    out.put = lambda kind, **p: sent.append((kind, "p3", time.monotonic(), p))
    exc = RuntimeError("evicted")
    with pytest.raises(RuntimeError):
        _stress_trainer._evicted(out, time.monotonic() - 21.0, exc, 20.0)
    assert [e[0] for e in sent] == ["rejoin_timeout"], sent
    c = Checker(1, hang_s=20.0)
    for ev in sent:
        c.event(ev)
    assert c.hangs == 1 and c.max_rejoin_s >= 21.0, c.details


# -------------------------------------------------- 5. snapshot / restore deadlines


def test_snapshot_and_restore_calls_the_daemon_never_answered_are_hangs() -> None:
    """A failed snapshot or restore that ended at its deadline because the daemon never
    answered was a clean failure. Their deadline is the seal timeout (hang_s / 2): a
    daemon that answers in time that it gave up (a seal abandoned, "deadline passed
    while another snapshot ran") is a clean failure by design (docs/stress.md)."""
    c = Checker(1, hang_s=20.0)
    c.event(_sealed("p9", 1.0, 10, ("p3", "p4"), 1))
    for call, err in (
        ("restore_failed", "TimeoutError: RESTORE got no answer within 10s"),
        ("restore_failed", "NoReply: no answer from the daemon within 16.0s"),
        ("snapshot_failed", "TimeoutError: SNAPSHOT passed its deadline before the daemon "
                            "ran it (cancelled)"),
    ):  # fmt: skip
        c.event((call, "p5", 3.0, {"owner": "p9", "step": 10, "view": ["p3", "p4", "p5"],
                                   "error": err, "secs": 16.0}))  # fmt: skip
    assert c.hangs == 3, c.details
    for err in ("SnapshotAbandoned: timeout",
                "TimeoutError: SNAPSHOT's deadline passed while another snapshot ran"):  # fmt: skip
        c.event(("snapshot_failed", "p5", 4.0, {"step": 15, "secs": 10.0, "error": err}))
    assert c.hangs == 3 and c.snapshot_failures == 3


# ------------------------------------------------------- 6. evicted, then never "back"


def _sealed(owner: str, t: float, step: int, holders: tuple[str, ...], m: int) -> Event:
    return ("sealed", owner, t, {"step": step, "world": len(holders) + 1, "secs": 0.05,
                                 "generation": 1, "k": len(holders) - m, "m": m,
                                 "holders": holders})  # fmt: skip


def test_an_evicted_holder_is_readable_again_once_it_is_back_in_a_view() -> None:
    """A trainer restarted while its daemon was evicted never says "back": the holder
    stayed "unavailable" for good, and a real loss (one holder of a 1+1 code gone) was
    called lost_beyond_m."""
    for back in ("ready", "begin"):
        c = Checker(1, hang_s=20.0)
        c.event(_sealed("p9", 1.0, 10, ("p3", "p4"), 1))
        c.event(("evicted", "p3", 2.0, {"error": "Evicted"}))
        payload = {"step": 11, "epoch": 5, "secs": 0.1, "synced": True, "state_ok": True,
                   "members": ("p3", "p5")}  # fmt: skip
        c.event((back, "p3", 3.0, payload if back == "begin" else {"step": 11}))
        c.departed(50.0, "p4")
        c.event(("restore_failed", "p5", 60.0, {"owner": "p9", "error": "RestoreError: x",
                                                "view": ["p3", "p5"], "secs": 1.0}))  # fmt: skip
        assert (c.lost_snapshots, c.lost_beyond_m) == (1, 0), (back, c.last_unreadable)
    # while it is out, it cannot be read
    c = Checker(1, hang_s=20.0)
    c.event(_sealed("p9", 1.0, 10, ("p3", "p4"), 1))
    c.event(("evicted", "p3", 2.0, {"error": "Evicted"}))
    c.departed(50.0, "p4")
    c.event(("restore_failed", "p5", 60.0, {"owner": "p9", "error": "RestoreError: x",
                                            "view": ["p3", "p5"], "secs": 1.0}))  # fmt: skip
    assert (c.lost_snapshots, c.lost_beyond_m) == (0, 1)


# ------------------------------------------------------ 7. a split commit, first op failed


def test_a_split_commit_is_seen_when_a_members_first_op_failed() -> None:
    c = Checker(1, hang_s=20.0)
    for me in ("p1", "p2"):
        c.event(("commit", me, 1.0, {"step": 5, "ok": True, "answer": True, "epochs": [7],
                                     "epoch": 7, "secs": 0.1}))  # fmt: skip
    c.event(("commit", "p0", 1.0, {"step": 5, "ok": False, "answer": False, "epochs": [],
                                   "epoch": 7, "secs": 0.1}))  # fmt: skip
    assert c.wrong_results == 1, c.details
    # begun in another epoch: another round
    c.event(("commit", "p3", 1.0, {"step": 5, "ok": False, "answer": False, "epochs": [],
                                   "epoch": 8, "secs": 0.1}))  # fmt: skip
    assert c.wrong_results == 1


# ------------------------------------------------------------- 8. the leak scan


def _scan_with_an_orphan(tmp_path: Path, env_lines: str) -> tuple[dict[str, Any], int]:
    """In a child process: start an orphan (``sleep``, its command line naming
    ``tmp_path``) with the environment ``env_lines`` builds as ``env``, then run the
    leak scan; (the scan's output, the orphan's pid)."""
    script = textwrap.dedent(f"""
        import json, os, subprocess, sys, threading
        from pathlib import Path
        from phalanx.testing._stress_cluster import RUN_ENV, leaks, socket_fds
        threads = {{t.ident for t in threading.enumerate()}}
        sockets = socket_fds()
        cmd = f"{{sys.executable}} -c 'import time; time.sleep(60)' {tmp_path} >/dev/null 2>&1 & echo $!"
        {env_lines}
        sh = subprocess.run(["sh", "-c", cmd], capture_output=True, env=env, timeout=30)
        orphan = int(sh.stdout)
        print(json.dumps({{"orphan": orphan, "found": leaks(Path({str(tmp_path)!r}), threads, sockets)}}))
    """)  # fmt: skip
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=45)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    return out, int(out["orphan"])


def _reap(orphan: int | None) -> None:
    if orphan is not None:  # adopted by this process (the suite is a subreaper)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
            os.waitpid(orphan, 0)


def test_the_leak_scan_kills_only_its_own_processes(tmp_path: Path) -> None:
    """A `tail -f events.log` of someone else names the run's directory too: it was
    SIGKILLed and reported as a leak. Orphans of the run (started with the launcher's
    PHALANX_PARENT_PID naming the harness) still are."""
    reader = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "events.log")]
    )
    orphan = None
    try:
        out, orphan = _scan_with_an_orphan(
            tmp_path, 'env = {**os.environ, "PHALANX_PARENT_PID": str(os.getpid())}'
        )
        assert reader.poll() is None, out
        assert not any(str(reader.pid) in f for f in out["found"]), out
        assert f"orphan pid {orphan} still runs in {tmp_path}" in out["found"], out
    finally:
        reader.kill()
        reader.wait(10)
        _reap(orphan)


def test_the_leak_scan_finds_orphans_carrying_only_the_run_marker(tmp_path: Path) -> None:
    """A daemon's children never inherit PHALANX_PARENT_PID (phalanx/_parent.py drops
    it at import); once the daemon is killed they are reparented away from the
    harness. The run marker the harness gives every process it starts still names it."""
    orphan = None
    try:
        out, orphan = _scan_with_an_orphan(
            tmp_path,
            'env = {k: v for k, v in os.environ.items() if k != "PHALANX_PARENT_PID"}; '
            "env[RUN_ENV] = str(os.getpid())",
        )
        assert f"orphan pid {orphan} still runs in {tmp_path}" in out["found"], out
    finally:
        _reap(orphan)


def test_the_cluster_marks_every_process_it_starts(cluster: Cluster) -> None:
    assert cluster.launcher.env[_stress_cluster.RUN_ENV] == str(os.getpid())
    assert cluster.daemon_env[_stress_cluster.RUN_ENV] == str(os.getpid())


# ----------------------------------------------------------- 9. network cleanup


def test_the_leak_scan_reports_the_runs_links(monkeypatch: pytest.MonkeyPatch) -> None:
    tag = os.getpid() % 100000
    text = (f"1: lo: <LOOPBACK,UP> mtu 65536\n"
            f"7: pxb{tag}: <BROADCAST,UP> mtu 1500\n"
            f"9: pxh{tag}k3@if8: <BROADCAST,UP> mtu 1500\n"
            f"11: pxb{tag}7: <BROADCAST> mtu 1500\n"
            f"12: pxh{tag}7k1@if2: <BROADCAST> mtu 1500\n")  # fmt: skip
    monkeypatch.setattr(_stress_cluster, "_ip_links", lambda: text)
    monkeypatch.setattr(_stress_cluster, "_children", list)  # leave this session's alone
    monkeypatch.setattr(_stress_cluster, "_LINK_SETTLE_S", 0.3)
    threads = {t.ident for t in threading.enumerate() if t.ident is not None}
    found = leaks(Path("/nonexistent-phalanx-run"), threads, socket_fds())
    assert [f for f in found if "link" in f] == [
        f"network link left: pxb{tag}",
        f"network link left: pxh{tag}k3",
    ], found


def test_the_bridge_is_removed_even_when_a_namespace_cannot_be(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_run(*cmd: str, timeout: float = 10.0) -> Any:
        calls.append(cmd)
        if cmd[:3] == ("ip", "netns", "del") and cmd[3] == "ns1":
            raise subprocess.TimeoutExpired(list(cmd), timeout)
        return subprocess.CompletedProcess(list(cmd), 0, b"", b"")

    monkeypatch.setattr(netns, "_run", fake_run)
    b = netns.Bridge.__new__(netns.Bridge)
    b.name, b.namespaces = "pxb1", ["ns1", "ns2"]
    b._outer = {"ns1": "pxh1k1", "ns2": "pxh1k2"}
    b._rules = [("iptables", ["FORWARD", "-i", "pxb1"])]
    b.close()
    assert ("ip", "netns", "del", "ns2") in calls
    # the host ends go too, even the one whose namespace would not go (a namespace can
    # outlive its name and keep its veth pair up)
    assert ("ip", "link", "del", "pxh1k1") in calls and ("ip", "link", "del", "pxh1k2") in calls
    assert ("ip", "link", "del", "pxb1") in calls
    assert ("iptables", "-w", "5", "-D", "FORWARD", "-i", "pxb1") in calls


def test_a_bridge_set_up_when_ctrl_c_comes_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []

    class _Bridge:
        def __init__(self, *a: Any) -> None:
            pass

        def probe(self) -> None:
            raise KeyboardInterrupt

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(_stress_cluster, "Bridge", _Bridge)
    with pytest.raises(KeyboardInterrupt):
        Cluster(heartbeat_timeout=None, netns=True, log_level="WARNING")
    assert closed == [True]


def test_run_stress_tears_the_cluster_down_whatever_fails_after_it_is_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    closed: list[bool] = []

    class _Cluster:
        def __init__(self, **kw: Any) -> None:
            self.dir = tmp_path
            self.net_skipped = None
            self.bridge = None

        def close(self) -> None:
            closed.append(True)

    def interrupted(*a: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stress, "Cluster", _Cluster)
    monkeypatch.setattr(stress, "_Run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stress.run_stress(StressConfig(faults=("join",)), progress=False)
    assert closed == [True]


# ------------------------------------------------- 10. a slowed daemon and a stop fault


class _SigPeer:
    member = "p0"
    status = "running"
    t_last = 0.0

    def __init__(self) -> None:
        self.sent: list[int] = []

    def signal(self, sig: int, *, trainer: bool = True, daemon: bool = True) -> None:
        if daemon:
            self.sent.append(sig)


def test_the_slow_duty_cycle_does_not_continue_a_stopped_daemon() -> None:
    run = _Run(StressConfig(seed=1), cast(Cluster, None), lambda msg: None)
    peer = _SigPeer()
    t = threading.Thread(target=run._duty_cycle, args=(peer, 0.6))
    t.start()
    time.sleep(0.12)
    run._fault_stop(cast(Peer, peer))
    t.join(5.0)
    assert peer.status == "stopped"
    last = [s for s in peer.sent if s in (signal.SIGSTOP, signal.SIGCONT)][-1]
    assert last == signal.SIGSTOP, peer.sent  # the stop fault's timer continues it
    for _, what, fn in run.timers:
        assert what == "cont"
        fn()
    assert peer.sent[-1] == signal.SIGCONT and peer.status == "running"


# ------------------------------------------------------------------ 11. the seed


def test_each_fault_tick_draws_the_same_whatever_the_ticks_before_did() -> None:
    """The draws of a tick depend on the seed and the tick only: an earlier tick that
    drew once more (the group was below --peers) shifted every later draw."""

    def draws(below_peers_at_tick_1: bool) -> list[float]:
        peers = {f"p{i}": Peer(f"p{i}", i, cast(Any, None), Path("/x"), "/x", status="running")
                 for i in range(5)}  # fmt: skip
        cl = cast(Cluster, type("C", (), {"peers": peers})())
        run = _Run(StressConfig(seed=7, peers=4 if not below_peers_at_tick_1 else 6), cl,
                   lambda msg: None)  # fmt: skip
        got: list[float] = []
        for kind in stress.FAULTS:
            setattr(run, f"_fault_{kind}", lambda victim: got.append(run.rng.random()))
        run.coordinator_may_fail = lambda now: True  # type: ignore[method-assign]
        run.inject()
        run.cfg = StressConfig(seed=7, peers=4)  # from tick 2 on: no longer below
        gap = [run.next_gap()]
        run.inject()
        run.inject()
        return got[1:] + gap

    assert draws(True) == draws(False)


def test_contributions_do_not_repeat_with_the_step() -> None:
    spec = model.plan(1, 0)[0]
    same = [s for s in range(200)
            if np.array_equal(model.contribution(spec, 3, s), model.contribution(spec, 3, s + 11))]  # fmt: skip
    assert len(same) <= 3, same
    for kind in (("all_reduce", "max", "none", "int64"), ("all_gather", "sum", "none", "int32")):
        s2 = model.OpSpec(*kind, n=64)
        assert not all(
            np.array_equal(model.contribution(s2, 3, s), model.contribution(s2, 3, s + p))
            for p in (11, 97, 1009)
            for s in range(5)
        )


def _op_event(me: str, step: int, i: int, seq: int, contrib: tuple[str, ...],
              epoch: int = 5, digest: str | None = None) -> Event:  # fmt: skip
    spec = model.plan(1, step)[i]
    if digest is None:
        digest = ("" if spec.kind == "barrier" else
                  model.digest(model.expected(spec, step, contrib, me)))  # fmt: skip
    err = 0.0 if spec.lossy else None
    return ("op", me, 1.0, {"step": step, "op": i, "epoch": epoch, "seq": seq,
                            "contributors": contrib, "failed": 0, "digest": digest,
                            "err": err, "secs": 0.1})  # fmt: skip


def test_a_generation_rebuilt_in_the_same_view_may_reuse_epoch_and_seq() -> None:
    """OpResult.epoch is the view's epoch and a data-plane generation rebuilt within
    the view (a stop, a net fault) starts its seq at 0 again: the next steps report
    the (epoch, seq) of earlier ones. A healthy run: no wrong result."""
    c = Checker(1, hang_s=20.0)
    contrib = ("p0", "p1")
    for step in (3, 4):  # step 4 ran in a rebuilt generation: seq from 0 again
        for i in range(len(model.plan(1, step))):
            for me in contrib:
                c.event(_op_event(me, step, i, i, contrib))
    assert c.wrong_results == 0 and c.ops_ok == c.ops, c.details


def test_members_running_one_op_in_one_view_must_agree() -> None:
    """Same view, step and op: the same contributors, and at the same seq the same
    result bytes."""
    step = next(
        s
        for s in range(100)
        if model.plan(1, s)[0].kind in ("all_reduce", "broadcast", "all_gather")
    )
    c = Checker(1, hang_s=20.0)
    c.event(_op_event("p0", step, 0, 0, ("p0", "p1")))
    c.event(_op_event("p1", step, 0, 0, ("p1",)))
    assert c.wrong_results == 1 and "contributors" in c.details[-1], c.details
    c.event(_op_event("p1", step, 0, 0, ("p0", "p1"), digest="feed"))
    assert c.wrong_results == 2 and "bytes differ" in c.details[-1], c.details

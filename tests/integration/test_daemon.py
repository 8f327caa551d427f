"""``phalanx daemon`` as a real process: secure by default, config printed, /healthz and
/metrics served, SIGTERM leaves the group and exits 0, and a SIGKILLed daemon gives its
client ``DaemonUnavailable`` within a second (a blocked call and a new one), not a hang.

The ``daemons`` fixture (tests/conftest.py, :func:`phalanx.testing.launcher.local_cluster`)
runs an in-process coordinator and N daemon processes on 127.0.0.1 (port 0 everywhere)
and stops them all when its block ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

import phalanx
from phalanx.testing.launcher import LocalCluster
from tests.integration._procs import stop

pytestmark = pytest.mark.timeout(90)


Daemons = Callable[..., AbstractContextManager[LocalCluster]]


def test_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "phalanx",
            "daemon",
            "--coordinator",
            "127.0.0.1:1",
            "--socket",
            str(tmp_path / "s.sock"),
        ],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 2
    assert b"--insecure" in r.stderr and b"secret" in r.stderr


def test_serves_health_and_metrics_and_leaves_on_sigterm(secret: bytes, daemons: Daemons) -> None:
    with daemons(1) as cl:
        ready = cl.ready_line(0)
        text = cl.outs[0].read_text()
        assert "comm.streams = 1" in text and "secret_file" in text  # the config, printed
        assert secret.hex() not in text  # ... with no secret in it
        from phalanx.checkpoint.erasure import backend_summary

        assert f"erasure={backend_summary()[0]}" in ready.split()  # says what it encodes with
        metrics = ready.split("metrics=")[1].split()[0]
        with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with phalanx.connect(cl.sockets[0]) as pg:
            x = pg.empty((256,), "float32")
            x[:] = 2
            pg.all_reduce(x)
            assert pg.view().members == ("d0",)
        deadline = time.monotonic() + 10.0
        while True:  # op samples reach the monitor on a thread of their own: allow it a beat
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            if "phalanx_op_duration_seconds_count{" in body or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "phalanx_view_epoch" in body and "phalanx_op_duration_seconds_count{" in body
        t0 = time.monotonic()
        cl.procs[0].send_signal(signal.SIGTERM)
        assert cl.procs[0].wait(15.0) == 0
        cl.coordinator.wait_for(lambda v: "d0" not in v, 5.0)  # it left; not failed late
        assert time.monotonic() - t0 < 10.0
        assert "phalanx daemon stopped" in cl.outs[0].read_text()
        assert not os.path.exists(cl.sockets[0])


def _gauge(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_heartbeat_gauges_follow_the_agent(daemons: Daemons) -> None:
    """phalanx_heartbeat_last_{sent,ack}_timestamp_seconds come from the agent's
    heartbeats (they stayed 0.0: nothing called metrics.heartbeat); with the
    coordinator gone, beats are still sent but no longer acknowledged."""
    with daemons(1) as cl:
        metrics = cl.ready_line(0).split("metrics=")[1].split()[0]

        def scrape() -> tuple[float, float]:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            return (_gauge(body, "phalanx_heartbeat_last_sent_timestamp_seconds"),
                    _gauge(body, "phalanx_heartbeat_last_ack_timestamp_seconds"))  # fmt: skip

        sent, acked = scrape()
        assert time.time() - 5.0 < acked <= sent <= time.time() + 1.0, (sent, acked)
        cl.coordinator.stop(0.5)  # beats go unanswered from here on
        stopped = time.time()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            sent, acked = scrape()
            if sent > stopped + 1.0:
                break
            time.sleep(0.2)
        assert sent > stopped + 1.0 and acked < stopped + 0.5, (sent, acked, stopped)


def test_sigkilled_daemon_gives_daemon_unavailable_within_a_second(daemons: Daemons) -> None:
    with daemons(2) as cl:
        pg = phalanx.connect(cl.sockets[0], op_timeout=30.0)
        try:
            x = pg.empty((1024,), "float32")
            # nobody drives daemon 1: this all-reduce waits for its peer
            handle = pg.all_reduce(x, async_op=True)
            time.sleep(0.3)
            assert not handle.done()
            t0 = time.monotonic()
            cl.procs[0].kill()
            with pytest.raises(phalanx.DaemonUnavailable):
                handle.wait()
            assert time.monotonic() - t0 < 1.0
            t1 = time.monotonic()
            with pytest.raises(phalanx.DaemonUnavailable):
                pg.all_reduce(np.ones(4, np.float32))
            with pytest.raises(phalanx.DaemonUnavailable):
                pg.view()
            assert time.monotonic() - t1 < 1.0
        finally:
            pg.close()
        cl.procs[0].wait(5.0)
        with pytest.raises(phalanx.DaemonUnavailable, match="no phalanx daemon"):
            phalanx.connect(cl.sockets[0])


def test_an_insecure_coordinator_and_an_insecure_daemon_pair_up(tmp_path: Path) -> None:
    # Both sign with the public secret; the coordinator used to sign nothing under
    # --insecure and the daemon's Join was refused (BAD_AUTH) until it gave up.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coord = subprocess.Popen(
        [sys.executable, "-m", "phalanx", "coordinator", "--listen", f"127.0.0.1:{port}",
         "--insecure"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    daemon = subprocess.Popen(
        [sys.executable, "-m", "phalanx", "daemon", "--coordinator", f"127.0.0.1:{port}",
         "--insecure", "--socket", str(tmp_path / "d.sock"), "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        seen = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            line = daemon.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("phalanx daemon ready"):
                break
        assert seen and seen[-1].startswith("phalanx daemon ready"), "".join(seen[-5:])
        assert not any("BAD_AUTH" in line for line in seen)
    finally:
        stop(daemon, coord, grace=15.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("after_s", [0.0, 1.5])
def test_sigterm_while_joining_exits_0_promptly(tmp_path: Path, after_s: float) -> None:
    """A daemon whose coordinator is not there keeps joining (join_timeout, 30 s: as
    long as Kubernetes' grace period); SIGTERM meanwhile gives the join up and exits 0
    within seconds. It used to be ignored until the join timed out, then exit 1.
    ``after_s``: right at the configuration print (the group may not exist yet), or
    well into the join's retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "phalanx", "daemon", "--insecure",
         "--coordinator", f"127.0.0.1:{_free_port()}",  # nobody listens there
         "--socket", str(tmp_path / "d.sock"), "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = daemon.stdout.readline()
            if not line or line.startswith("phalanx daemon configuration"):
                break
        assert line.startswith("phalanx daemon configuration"), line
        time.sleep(after_s)
        assert daemon.poll() is None, "the daemon ended before the signal"
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(10.0)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM during start-up was not acted on within 10 s")
        out, err = daemon.communicate(timeout=10)
        assert code == 0, err[-2000:]
        assert "phalanx daemon stopped" in out
        assert "could not start" not in err
        assert not (tmp_path / "d.sock").exists()
    finally:
        stop(daemon, grace=5.0)


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--listen", "127.0.0.1:abc", "listen"),
        ("--listen", "127.0.0.1:99999", "listen"),
        ("--coordinator", "127.0.0.1:0", "coordinator"),
    ],
)
def test_a_bad_address_is_a_configuration_error(
    tmp_path: Path, flag: str, value: str, named: str
) -> None:
    """Exit 2 with a message naming the setting, not a traceback and exit 1 at start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    args = {"--coordinator": "127.0.0.1:1", "--listen": "127.0.0.1:0", flag: value}
    r = subprocess.run(
        [sys.executable, "-m", "phalanx", "daemon", "--insecure", "--metrics-port", "-1",
         "--socket", str(tmp_path / "s.sock"), *[w for kv in args.items() for w in kv]],
        capture_output=True, env=env, timeout=60, text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{named} must be HOST:PORT" in r.stderr and value in r.stderr
    assert "Traceback" not in r.stderr

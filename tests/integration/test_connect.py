"""``phalanx.connect()`` finds the daemon ``phalanx daemon --id ID`` started (by
``member_id=`` or ``PHALANX_ID``, the variable the daemon reads its id from too) and
waits for a daemon that is still starting (issue 18 point 6 d and e)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import phalanx
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator

pytestmark = pytest.mark.timeout(90)


def _daemon(coordinator: str, secret_file: Path, runtime: Path, out: Path, *extra: str
            ) -> subprocess.Popen[bytes]:  # fmt: skip
    """A daemon with no --socket: it listens where its id says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    cmd = [sys.executable, "-m", "phalanx", "daemon", "--coordinator", coordinator,
           "--secret-file", str(secret_file), "--metrics-port", "-1", *extra]  # fmt: skip
    with open(out, "wb") as o, open(out.with_suffix(".err"), "wb") as e:
        return subprocess.Popen(cmd, stdout=o, stderr=e, env=env)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.delenv("PHALANX_SOCKET", raising=False)
    monkeypatch.delenv("PHALANX_ID", raising=False)
    return d


def test_connect_finds_the_daemon_by_its_id_and_waits_for_it_to_start(
    secret: bytes, tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret.hex().encode())
    coord = Coordinator("127.0.0.1:0", secret=secret.hex().encode(), config=MembershipConfig(),
                        recover=False)  # fmt: skip
    address = coord.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        # (e) the client starts first: connect() waits for the daemon's socket
        clients: list[phalanx.Client] = []
        errors: list[BaseException] = []

        def early() -> None:
            try:
                clients.append(phalanx.connect(member_id="d0", timeout=40.0))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=early)
        t.start()
        time.sleep(0.5)
        proc = _daemon(address, secret_file, runtime, tmp_path / "d0.out", "--id", "d0")
        t.join(45.0)
        assert not errors, repr(errors)
        pg = clients[0]
        try:
            assert pg.member_id == "d0"
            assert pg.socket == str(runtime / "phalanx" / "d0.sock")  # where the daemon is
        finally:
            pg.close()
        # (d) PHALANX_ID names the daemon for connect() as it does for the daemon
        monkeypatch.setenv("PHALANX_ID", "d0")
        with phalanx.connect(timeout=5.0) as pg2:
            assert pg2.member_id == "d0"  # (its view may still be forming: it is starting)
        monkeypatch.delenv("PHALANX_ID")
        # without an id: the default path is daemon.sock; the error names what exists
        t0 = time.monotonic()
        with pytest.raises(phalanx.DaemonUnavailable, match=r"waited 0\.5s.*'d0'.*member_id"):
            phalanx.connect(timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3.0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        coord.stop(0.5)

"""The monitor's HTTP server on 127.0.0.1: an idle or stalled client delays no other
request and no close(), and is dropped after its deadline."""

from __future__ import annotations

import socket
import threading
import urllib.request

from phalanx.monitor import Monitor
from phalanx.monitor.server import MetricsServer


def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=4.0) as r:
        return r.status, r.read()


def _close_bounded(close: object, limit: float = 15.0) -> bool:
    """Run ``close()`` on a thread; True if it returned within ``limit`` seconds (a
    close that never returns must fail the test, not hang it)."""
    t = threading.Thread(target=close, daemon=True)  # type: ignore[arg-type]
    t.start()
    t.join(limit)
    return not t.is_alive()


def test_an_idle_connection_blocks_neither_requests_nor_close() -> None:
    mon = Monitor(0)
    host, port = mon.serve("127.0.0.1", 0)
    idle = socket.create_connection((host, port), timeout=10.0)
    stalled = socket.create_connection((host, port), timeout=10.0)
    try:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes
        code, body = _get(host, port, "/metrics")
        assert code == 200 and b"phalanx_build_info" in body
        assert _get(host, port, "/healthz") == (200, b"ok\n")
        assert _close_bounded(mon.close)
        # close() dropped the open connections instead of leaving them to their deadline
        assert idle.recv(1024) == b""
        assert stalled.recv(1024) == b""
        left = [t.name for t in threading.enumerate() if t.name.startswith("phalanx-metrics")]
        assert left == []
        with socket.socket() as again:  # and the listening socket is closed
            again.settimeout(5.0)
            assert again.connect_ex((host, port)) != 0
    finally:
        idle.close()
        stalled.close()


def test_an_idle_connection_is_dropped_after_its_deadline() -> None:
    mon = Monitor(0)
    server = MetricsServer(mon, "127.0.0.1", 0, conn_timeout_s=0.3)
    try:
        with socket.create_connection(server.address, timeout=10.0) as idle:
            assert idle.recv(1024) == b""  # the server gave up on it (not our 10 s)
        assert _get(*server.address, "/healthz") == (200, b"ok\n")
    finally:
        assert _close_bounded(server.close)

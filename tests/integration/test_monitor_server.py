"""The monitor's HTTP server on 127.0.0.1: an idle or stalled client delays no other
request and no close(), and is dropped after its deadline (for the whole connection, so
a client trickling its request gains nothing); connections are capped, and a handler
thread that cannot start leaves nothing behind."""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest

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


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True if the server closes ``sock`` (EOF or reset) within ``wait`` seconds."""
    ready, _, _ = select.select([sock], [], [], wait)
    if not ready:
        return False
    try:
        return sock.recv(1024) == b""
    except OSError:
        return True


def test_a_client_trickling_its_request_is_dropped_at_the_connection_deadline() -> None:
    mon = Monitor(0)
    server = MetricsServer(mon, "127.0.0.1", 0, conn_timeout_s=0.5)
    try:
        with socket.create_connection(server.address, timeout=10.0) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            began = time.monotonic()
            closed = False
            while not closed and time.monotonic() - began < 5.0:
                try:
                    slow.sendall(b"a")  # one byte every 0.2 s: each read is quick
                except OSError:
                    closed = True
                    break
                closed = _closed_by_server(slow, 0.2)
            assert closed, "a trickling client kept its connection past the deadline"
            assert time.monotonic() - began < 3.0
        assert _get(*server.address, "/healthz") == (200, b"ok\n")
    finally:
        assert _close_bounded(server.close)


def test_connections_over_the_cap_are_closed_at_once() -> None:
    mon = Monitor(0)
    server = MetricsServer(mon, "127.0.0.1", 0, conn_timeout_s=10.0, max_conns=2)
    idle = [socket.create_connection(server.address, timeout=10.0) for _ in range(2)]
    try:
        began = time.monotonic()
        while len(server._httpd._conns) < 2 and time.monotonic() - began < 5.0:
            time.sleep(0.02)
        with socket.create_connection(server.address, timeout=10.0) as extra:
            assert _closed_by_server(extra, 3.0)  # not left to its 10 s deadline
        for s in idle:
            s.close()  # their handlers see EOF and end: room again
        began = time.monotonic()
        while server._httpd._conns and time.monotonic() - began < 5.0:
            time.sleep(0.02)
        assert _get(*server.address, "/healthz") == (200, b"ok\n")
    finally:
        for s in idle:
            s.close()
        assert _close_bounded(server.close)


def test_a_handler_thread_that_cannot_start_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mon = Monitor(0)
    server = MetricsServer(mon, "127.0.0.1", 0, conn_timeout_s=10.0)
    real = threading.Thread

    class _NoStart(real):  # type: ignore[valid-type,misc]
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    def thread(*args: Any, **kwargs: Any) -> threading.Thread:
        if str(kwargs.get("name", "")).startswith("phalanx-metrics-conn"):
            return _NoStart(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(threading, "Thread", thread)
    try:
        with socket.create_connection(server.address, timeout=10.0) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _closed_by_server(c, 3.0)  # dropped, not left open
        assert server._httpd._conns == {}
    finally:
        monkeypatch.setattr(threading, "Thread", real)
        server.close()  # joins nothing unstarted: returns without raising
    assert not server._thread.is_alive()


def test_an_idle_server_sleeps_until_a_connection_and_closes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No connection open: the accept loop waits for one (it used to wake every 0.1 s,
    ~1.6 ms of CPU a second in an idle daemon); close() wakes it, and a connection's
    deadline still counts."""
    from phalanx.monitor import server as server_module

    rounds = 0
    real = server_module._Server.handle_request

    def counted(self: Any) -> None:
        nonlocal rounds
        rounds += 1
        real(self)

    monkeypatch.setattr(server_module._Server, "handle_request", counted)
    srv = MetricsServer(Monitor(0), "127.0.0.1", 0, conn_timeout_s=0.5)
    host, port = srv.address
    time.sleep(1.0)
    assert rounds <= 2, f"the idle accept loop went round {rounds} times in 1 s"
    # a connection that never sends still ends at its deadline
    idle = socket.create_connection((host, port), timeout=10.0)
    try:
        assert select.select([idle], [], [], 5.0)[0], "not dropped at its deadline"
        assert idle.recv(1024) == b""
    finally:
        idle.close()
    assert _get(host, port, "/healthz") == (200, b"ok\n")
    t = time.monotonic()
    assert _close_bounded(srv.close)
    assert time.monotonic() - t < 5.0  # woken, not left to its 30 s backstop
    assert not [t.name for t in threading.enumerate() if t.name.startswith("phalanx-metrics")]


def test_a_dropped_connection_whose_handler_lingers_does_not_spin_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection past its deadline is shut down once; while its handler thread
    still runs (stuck outside socket I/O here) the accept loop must not keep waking
    for that spent deadline."""
    from phalanx.monitor import server as server_module

    release = threading.Event()
    rounds = 0
    real_handle = server_module._Server.handle_request
    real_get = server_module._Handler.do_GET

    def counted(self: Any) -> None:
        nonlocal rounds
        rounds += 1
        real_handle(self)

    def stuck(self: Any) -> None:
        release.wait(10.0)  # e.g. building a response behind a lock
        real_get(self)

    monkeypatch.setattr(server_module._Server, "handle_request", counted)
    monkeypatch.setattr(server_module._Handler, "do_GET", stuck)
    srv = MetricsServer(Monitor(0), "127.0.0.1", 0, conn_timeout_s=0.2)
    host, port = srv.address
    c = socket.create_connection((host, port), timeout=10.0)
    try:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # past its deadline: shut down, its handler still waiting
        before = rounds
        time.sleep(1.0)
        assert rounds - before <= 3, f"{rounds - before} rounds in 1 s"
    finally:
        release.set()
        c.close()
        assert _close_bounded(srv.close)

"""HTTP endpoint of one daemon's monitor: /metrics, /healthz, /anomalies.

``/metrics`` is the Prometheus text format of the monitor's own registry (never the
process-global one); ``/healthz`` answers 200 ``ok`` or 503 with the reason;
``/anomalies`` is JSON (active verdicts and the recent ones). One thread accepts; each
connection gets a short-lived handler thread and a deadline (``conn_timeout_s``, 5 s)
for the whole connection, counted from its accept: the accept loop wakes at the
earliest such deadline and shuts down a connection still open past it, so an idle
client, or one that trickles its request a byte at a time, delays nobody else and
cannot keep its thread. With no connection open the loop sleeps until the next one
(or :meth:`MetricsServer.close`, which wakes it): an idle daemon's accept thread used
to wake ten times a second and cost ~1.6 ms of CPU a second.
At most ``max_conns`` (32) connections are served at once; one more is closed at once.
:meth:`MetricsServer.close` stops accepting, closes the listening socket, shuts the
open connections down and joins every thread, each wait bounded.

What it must never do: serve anything but these three read-only paths, wait on a
client without a deadline, or block the monitor's lock for longer than building one
response.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from phalanx.monitor.monitor import Monitor

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)

#: the accept loop's longest wait with no connection open: a backstop only, since
#: close() wakes it at once (it shuts the listening socket down)
_IDLE_WAIT_S = 30.0
#: its shortest wait
_MIN_WAIT_S = 0.01
#: its pause after an unexpected error (each one is logged)
_ERROR_PAUSE_S = 0.1
#: connections served at once; one more is closed as soon as it is accepted
_MAX_CONNS = 32


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def setup(self) -> None:
        # the longest wait of any one read or write (an accepted socket inherits none);
        # the whole connection's deadline is enforced by the accept loop
        self.request.settimeout(self.server.conn_timeout_s)
        super().setup()

    def do_GET(self) -> None:
        mon = self.server.monitor
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(mon.registry))
            elif path == "/healthz":
                ok, why = mon.healthy()
                self._send(200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode())
            elif path == "/anomalies":
                body = json.dumps(mon.anomalies(), allow_nan=False).encode()
                self._send(200, "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
        except OSError:  # the client went away or stalled past the deadline
            self.close_connection = True

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler thread never holds the process open
    block_on_close = False  # close() joins the handler threads itself, bounded
    timeout = None  # handle_request waits as long as the socket timeout: next_wait()

    def __init__(
        self,
        monitor: Monitor,
        host: str,
        port: int,
        conn_timeout_s: float,
        max_conns: int = _MAX_CONNS,
    ) -> None:
        self.monitor = monitor
        self.conn_timeout_s = conn_timeout_s
        self.max_conns = max_conns
        self._conns_lock = threading.Lock()
        # handler thread -> (its socket, the connection's deadline on the monotonic clock)
        self._conns: dict[threading.Thread, tuple[socket.socket, float]] = {}
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        deadline = time.monotonic() + self.conn_timeout_s
        with self._conns_lock:
            # the lock is held across start(): the thread's own removal (in its
            # finally) cannot run before it is registered
            if len(self._conns) >= self.max_conns:
                log.warning("event=metrics-conn-refused open=%d", len(self._conns))
                self.shutdown_request(request)
                return
            t = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name=f"phalanx-metrics-conn-{self.server_address[1]}",
                daemon=True,
            )
            try:
                t.start()
            except Exception:  # e.g. no thread can be started: drop this connection
                log.exception("event=metrics-conn-thread-failed")
                self.shutdown_request(request)
                return
            self._conns[t] = (request, deadline)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)

    def handle_timeout(self) -> None:
        pass  # no connection within the wait: the accept loop looks at the deadlines

    def next_wait(self) -> float:
        """How long the accept loop may wait for a connection: until the earliest
        open connection's deadline, else :data:`_IDLE_WAIT_S`."""
        with self._conns_lock:
            earliest = min((d for _, d in self._conns.values()), default=math.inf)
        if earliest == math.inf:  # none open, or only ones already dropped
            return _IDLE_WAIT_S
        return min(_IDLE_WAIT_S, max(_MIN_WAIT_S, earliest - time.monotonic()))

    def drop_expired(self) -> None:
        """Shut down the connections open past their deadline (their threads end)."""
        now = time.monotonic()
        late = []
        with self._conns_lock:
            for t, (sock, deadline) in self._conns.items():
                if now >= deadline:  # dropped now: no deadline left to wake for
                    self._conns[t] = (sock, math.inf)
                    late.append(sock)
        for sock in late:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)

    def drop_connections(self, timeout: float) -> None:
        """Shut every open connection down and join its handler thread (bounded)."""
        with self._conns_lock:
            conns = dict(self._conns)
        for sock, _ in conns.values():
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in conns:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():  # pragma: no cover - a shut-down socket ends its reads
                log.warning("event=metrics-handler-stuck thread=%s", t.name)


class MetricsServer:
    """Serves one monitor on ``host:port`` (port 0: any free port); one accept thread,
    one thread per connection (at most ``max_conns`` at once), each connection closed
    ``conn_timeout_s`` after its accept at the latest."""

    def __init__(
        self,
        monitor: Monitor,
        host: str = "127.0.0.1",
        port: int = 0,
        conn_timeout_s: float = 5.0,
        max_conns: int = _MAX_CONNS,
    ) -> None:
        self._httpd = _Server(monitor, host, port, conn_timeout_s, max_conns)
        h, p = self._httpd.server_address[:2]
        self.address: tuple[str, int] = (str(h), int(p))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"phalanx-metrics-{p}", daemon=True
        )
        self._thread.start()
        log.info("event=metrics-listening address=%s:%d", *self.address)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                # the wait of handle_request(), and of the accept() after it
                self._httpd.socket.settimeout(self._httpd.next_wait())
                self._httpd.handle_request()
                self._httpd.drop_expired()
            except Exception:  # pragma: no cover - never let the accept loop die silently
                if self._stop.is_set():
                    return
                log.exception("event=metrics-accept-error")
                self._stop.wait(_ERROR_PAUSE_S)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the listening socket, drop open connections and join
        every thread; returns within about ``timeout`` seconds whatever clients do."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes the accept loop's wait (accept: EINVAL)
            self._httpd.socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._httpd.server_close()  # the listening socket: new connections are refused
        self._httpd.drop_connections(max(0.0, deadline - time.monotonic()))

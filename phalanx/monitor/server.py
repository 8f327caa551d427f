"""HTTP endpoint of one daemon's monitor: /metrics, /healthz, /anomalies.

``/metrics`` is the Prometheus text format of the monitor's own registry (never the
process-global one); ``/healthz`` answers 200 ``ok`` or 503 with the reason;
``/anomalies`` is JSON (active verdicts and the recent ones). One thread serves
requests (Prometheus scrapes are rare and small); :meth:`MetricsServer.close` shuts it
down and joins it.

What it must never do: serve anything but these three read-only paths, or block the
monitor's lock for longer than building one response.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from phalanx.monitor.monitor import Monitor

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

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
        except BrokenPipeError:
            pass

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http " + format, *args)


class _Server(HTTPServer):
    daemon_threads = True
    timeout = 5.0

    def __init__(self, monitor: Monitor, host: str, port: int) -> None:
        self.monitor = monitor
        super().__init__((host, port), _Handler)


class MetricsServer:
    """Serves one monitor on ``host:port`` (port 0: any free port) from one thread."""

    def __init__(self, monitor: Monitor, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = _Server(monitor, host, port)
        self._httpd.socket.settimeout(5.0)  # a stalled client cannot hold the thread forever
        h, p = self._httpd.server_address[:2]
        self.address: tuple[str, int] = (str(h), int(p))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"phalanx-metrics-{p}",
            daemon=True,
        )
        self._thread.start()
        log.info("event=metrics-listening address=%s:%d", *self.address)

    def close(self, timeout: float = 5.0) -> None:
        self._httpd.shutdown()  # returns once serve_forever's loop has stopped
        self._thread.join(timeout)
        self._httpd.server_close()

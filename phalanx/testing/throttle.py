"""Slow links and slow senders on purpose, for the anomaly detectors' tests and bench.

Two tools:

* :class:`LinkProxy` -- a TCP relay put between two ranks. Bytes in one direction are
  held back by ``delay_s`` (added latency) and/or paced to ``rate_Bps``: a slow wire,
  while both ranks' engines run at full speed. Rank ``hi`` connects to rank ``lo``
  (lower ranks accept), so give rank ``hi`` the address list from
  :func:`proxied_addresses`; the proxy forwards to ``lo``'s real listener. Bytes
  ``lo -> hi`` flow "down" (target to client), ``hi -> lo`` flow "up". The delay can be
  changed while the group runs (:meth:`LinkProxy.set`). :meth:`LinkProxy.blackhole`
  silences the connections relayed so far (bytes dropped, nothing closed: a peer
  whose end never arrives) while new connections pass.
* :class:`SlowFrames` -- a :class:`~phalanx.comm.engine.FrameHook` that sleeps before
  every DATA frame to one peer. It runs where the sender's engine runs (its thread,
  or the caller's for an op's first frames when it starts inline), so the whole
  sending rank stalls during the sleep (its reads are late too): it models a slow
  *sender*, not a slow wire. Use :class:`LinkProxy` to test link localization.

What this module must never do: run outside tests and benchmarks, listen anywhere but
the host it is given (127.0.0.1 by default), or leave a thread or socket behind after
``close()``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence

from phalanx.comm.transport import Buffer

__all__ = ["LinkProxy", "SlowFrames", "proxied_addresses"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_SLICE_S = 0.01  # a paced direction releases its bytes in slices this long at its rate
_MIN_SLICE = 512
_PACED_HOLD = 64 * 1024  # a paced direction reads no more while it holds this much


def proxied_addresses(addresses: Sequence[str], a: int, b: int, proxy_address: str) -> list[str]:
    """The address list for rank ``max(a, b)``: the same as ``addresses`` but with the
    lower rank reached through the proxy (the other ranks keep the plain list)."""
    lo = min(a, b)
    out = list(addresses)
    out[lo] = proxy_address
    return out


class _Pipe:
    """One direction of one relayed connection: a reader and a delayed writer."""

    def __init__(self, proxy: LinkProxy, src: socket.socket, dst: socket.socket, down: bool):
        self.proxy, self.src, self.dst, self.down = proxy, src, dst, down
        self.queue: deque[tuple[float, bytes]] = deque()
        self.cond = threading.Condition()
        self.eof = False
        self.silent = False  # drop what arrives from here on (LinkProxy.blackhole)
        self.last_release = 0.0
        self.queued = 0  # bytes read and not yet written (a paced wire holds few)
        self.threads = [
            threading.Thread(target=self._read, name="throttle-read", daemon=True),
            threading.Thread(target=self._write, name="throttle-write", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while not self.proxy._stop.is_set():
                with self.cond:
                    # a paced wire pushes back: the sender's socket fills as a real
                    # slow link's would, instead of this relay buffering everything
                    if self.queued > _PACED_HOLD and self.proxy._params(self.down)[1] > 0:
                        self.cond.wait(0.05)
                        continue
                try:
                    data = self.src.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    break
                delay, rate = self.proxy._params(self.down)
                now = time.monotonic()
                release = max(now + delay, self.last_release)
                # a paced wire trickles: slices of ~10 ms of its rate, each released
                # when the wire would have carried it (not one burst per read)
                step = max(_MIN_SLICE, int(rate * _SLICE_S)) if rate > 0 else len(data)
                with self.cond:
                    for i in range(0, len(data), step):
                        piece = data[i : i + step]
                        if rate > 0:
                            release += len(piece) / rate
                        self.queue.append((release, piece))
                    self.queued += len(data)
                    self.last_release = release
                    self.cond.notify()
        except OSError:
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof and not self.proxy._stop.is_set():
                        self.cond.wait(0.1)
                    if not self.queue:
                        break
                    release, data = self.queue[0]
                    wait = release - time.monotonic()
                    if wait > 0:
                        self.cond.wait(min(wait, 0.1))
                        continue
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
                    if self.silent:
                        continue
                self.dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)


class LinkProxy:
    """A relay from ``listen`` (port 0 by default) to ``target`` that slows one direction."""

    def __init__(self, target: str, *, host: str = "127.0.0.1") -> None:
        th, tp = target.rsplit(":", 1)
        self._target = (th, int(tp))
        self._lock = threading.Lock()
        self._delay = {True: 0.0, False: 0.0}
        self._rate = {True: 0.0, False: 0.0}
        self._stop = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._pipes: list[_Pipe] = []
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name="throttle-accept", daemon=True)
        self._acceptor.start()

    def set(self, *, down_delay_s: float = 0.0, up_delay_s: float = 0.0,
            down_rate_Bps: float = 0.0, up_rate_Bps: float = 0.0) -> None:  # fmt: skip
        """Latency added and bandwidth cap (0: none) per direction, from now on."""
        with self._lock:
            self._delay = {True: down_delay_s, False: up_delay_s}
            self._rate = {True: down_rate_Bps, False: up_rate_Bps}

    def blackhole(self) -> None:
        """The connections relayed so far go silent both ways: what either end sends
        is dropped and nothing is closed, as if the other end had vanished without a
        FIN. Connections accepted later are relayed as before."""
        with self._lock:
            pipes = list(self._pipes)
        for p in pipes:
            with p.cond:
                p.silent = True
                p.queue.clear()
                p.queued = 0
                p.cond.notify_all()

    def _params(self, down: bool) -> tuple[float, float]:
        with self._lock:
            return self._delay[down], self._rate[down]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5.0)
            except OSError as exc:
                log.warning("event=proxy-connect-failed target=%s error=%s", self._target, exc)
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(0.2)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
                self._pipes.append(_Pipe(self, upstream, client, down=True))
                self._pipes.append(_Pipe(self, client, upstream, down=False))

    def close(self, timeout: float = 5.0) -> None:
        """Stop relaying, close every socket, join every thread. Idempotent."""
        self._stop.set()
        self._acceptor.join(timeout)
        self._listener.close()
        with self._lock:
            socks, pipes = list(self._socks), list(self._pipes)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for p in pipes:
            for t in p.threads:
                t.join(timeout)
        for s in socks:
            s.close()

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlowFrames:
    """FrameHook: sleep ``delay_s`` before every DATA frame to ``peer`` (while enabled).

    Picklable; ``enabled`` may be flipped by the rank that owns it."""

    def __init__(self, peer: int, delay_s: float, enabled: bool = True) -> None:
        self.peer = peer
        self.delay_s = delay_s
        self.enabled = enabled
        self.fired = 0

    def outgoing(
        self, peer: int, seq: int, ordinal: int, header: bytes, payload: Buffer
    ) -> tuple[bytes, Buffer] | None:
        if self.enabled and peer == self.peer:
            self.fired += 1
            time.sleep(self.delay_s)
        return None

"""The daemon's local API endpoint: a Unix socket, one thread per client connection.

:class:`LocalServer` binds the socket (its directory 0700, the socket 0600, and only
processes of the daemon's own user are served: ``SO_PEERCRED``), accepts connections
and runs, per connection, a thread that reads frames (:mod:`phalanx.local.wire`),
receives memfds (SCM_RIGHTS; a RESTORE reply sends one back) and answers each request with the
:class:`~phalanx.local.service.Service`'s result, in order. Running the request on the
connection's own thread keeps the round trip to one thread hop in the daemon; async
requests from a client simply queue in the socket until the previous one is answered.

A connection that sent ``WATCH`` only receives ``EVENT`` frames (:meth:`publish`).
Malformed input (bad frame, bad request, oversized body) closes that connection with
an ``event=local_protocol_error`` log line; it never stops the daemon.

A stale socket file (nobody accepts on it) is replaced; a live one (another daemon)
is refused. :meth:`close` stops accepting, shuts every connection down and joins
every thread (each blocked read wakes at least every ``_POLL_S``).

This module must never run group logic itself or block a connection thread without
a deadline.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any

from phalanx.errors import ConfigError, PhalanxError, ProtocolError
from phalanx.local.errcodec import encode_error
from phalanx.local.service import FdReply, Service, Session
from phalanx.local.wire import FLAG_FD, Decoder, Frame, Kind, encode

__all__ = ["LocalServer"]

log = logging.getLogger(__name__)

_POLL_S = 0.25
_RECV = 1 << 16
_SEND_TIMEOUT_S = 5.0
_MAX_CONNECTIONS = 64


class _Conn:
    def __init__(self, sock: socket.socket, session: Session) -> None:
        self.sock = sock
        self.session = session
        self.send_lock = threading.Lock()
        self.watching = False
        self.thread: threading.Thread | None = None

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def send_fd(self, data: bytes, fd: int) -> None:
        """``data`` with ``fd`` attached to its first byte (SCM_RIGHTS)."""
        with self.send_lock:
            sent = socket.send_fds(self.sock, [data], [fd])
            if sent < len(data):
                self.sock.sendall(data[sent:])


class LocalServer:
    """Serves ``service`` on the Unix socket ``path`` (see the module docstring)."""

    def __init__(self, path: str, service: Service) -> None:
        self.path = path
        self.service = service
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._next_sid = 1
        self._sock = _bind(path)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="phalanx-local-accept", daemon=True
        )
        self._acceptor.start()
        log.info("event=local_api_listening socket=%s", path)

    # ------------------------------------------------------------------ accept
    def _accept_loop(self) -> None:
        self._sock.settimeout(_POLL_S)
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not _same_user(sock):
                log.warning("event=local_refused reason=foreign-user")
                sock.close()
                continue
            with self._lock:
                self._conns = [c for c in self._conns if c.thread is None or c.thread.is_alive()]
                if len(self._conns) >= _MAX_CONNECTIONS:
                    log.warning("event=local_refused reason=too-many-connections")
                    sock.close()
                    continue
                conn = _Conn(sock, Session(self._next_sid))
                self._next_sid += 1
                t = threading.Thread(
                    target=self._serve, args=(conn,), name="phalanx-local-conn", daemon=True
                )
                conn.thread = t
                self._conns.append(conn)
            t.start()

    # ------------------------------------------------------------------ one connection
    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        sock.settimeout(_POLL_S)
        decoder = Decoder()
        fds: list[int] = []
        try:
            while not self._stop.is_set():
                try:
                    data, anc, _flags, _ = sock.recvmsg(_RECV, socket.CMSG_SPACE(4 * 4))
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    break
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(payload[: len(payload) - len(payload) % 4])
                        fds.extend(arr)
                if not data:
                    break  # EOF: the client closed or died
                for frame in decoder.feed(data):
                    if frame.kind is Kind.WATCH:
                        conn.watching = True
                        conn.send(encode(Kind.REPLY, frame.rid, self.service.view()))
                        continue
                    if frame.kind is Kind.BYE:
                        conn.session.closed_cleanly = True
                        conn.send(encode(Kind.REPLY, frame.rid, {}))
                        continue
                    fd = fds.pop(0) if frame.kind is Kind.MAP and fds else None
                    self._answer(conn, frame, fd)
                if fds and decoder.pending == 0:
                    raise ProtocolError("file descriptor without a MAP request")
        except ProtocolError as exc:
            log.warning(
                "event=local_protocol_error session=%d error=%r", conn.session.sid, str(exc)
            )
        except OSError as exc:  # the client went away while we answered
            log.info("event=local_send_failed session=%d error=%r", conn.session.sid, str(exc))
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            if not conn.watching:
                try:
                    self.service.session_ended(conn.session)
                except Exception:
                    log.exception("event=session_end_failed session=%d", conn.session.sid)

    def _answer(self, conn: _Conn, frame: Frame, fd: int | None) -> None:
        try:
            body = self.service.handle_fd(conn.session, frame, fd)
        except ProtocolError:
            raise
        except Exception as exc:  # typed errors travel to the client
            if isinstance(exc, PhalanxError | TimeoutError):
                log.debug("event=local_request_error kind=%s error=%r", frame.kind.name, str(exc))
            else:  # a bug on our side: keep the traceback
                log.exception("event=local_request_failed kind=%s", frame.kind.name)
            conn.send(encode(Kind.ERROR, frame.rid, encode_error(exc)))
            return
        if isinstance(body, FdReply):
            try:
                data = encode(Kind.REPLY, frame.rid, body.body, FLAG_FD)
                conn.send_fd(data, body.fd)
            finally:
                os.close(body.fd)
            return
        conn.send(encode(Kind.REPLY, frame.rid, body))

    # ------------------------------------------------------------------ events
    def publish(self, body: dict[str, Any]) -> None:
        """Send an EVENT to every watching connection (drops one that cannot keep up)."""
        data = encode(Kind.EVENT, 0, body)
        with self._lock:
            watchers = [c for c in self._conns if c.watching]
        for c in watchers:
            try:
                c.sock.settimeout(_SEND_TIMEOUT_S)
                c.send(data)
            except OSError:
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)

    @property
    def clients(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if not c.watching)

    # ------------------------------------------------------------------ lifecycle
    def stop_accepting(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._acceptor.join(2 * _POLL_S + 1.0)

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, shut every connection down, join every thread. Idempotent."""
        self.stop_accepting()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout)
                if c.thread.is_alive():
                    log.error("event=thread_not_joined name=%s", c.thread.name)
        with contextlib.suppress(FileNotFoundError):
            if _is_socket(self.path):
                os.unlink(self.path)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _bind(path: str) -> socket.socket:
    p = Path(path)
    if len(os.fsencode(path)) >= 108:
        raise ConfigError(f"socket path is too long for a Unix socket (max 107 bytes): {path}")
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        if not _is_socket(path):
            raise ConfigError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(f"cannot check socket {path}: {exc}") from None
            os.unlink(path)  # stale: its daemon is gone
            log.info("event=stale_socket_removed socket=%s", path)
        else:
            raise ConfigError(f"another daemon is serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {path}: {exc}") from None
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _same_user(sock: socket.socket) -> bool:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())

"""The local API's limits and its failures under pressure, with embedded daemons (real
Unix socket, real session threads): an acceptor that survives accept() errors and
threads it cannot start, small regions that keep no descriptor open, a cap on regions
per session (and a page charged at least), a MAP queued behind a slow op, late replies
nobody waits for, and requests before HELLO. Each test failed on the code before its
fix (found by review)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx import client as client_mod
from phalanx.local import protocol as P
from phalanx.local import server as server_mod
from phalanx.local import snapshots
from phalanx.local.conn import Connection
from phalanx.local.server import LocalServer, Session
from phalanx.local.shm import PAGE
from phalanx.ops import OpSpec
from tests.integration._pairs import embedded_pair

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pg() -> Iterator[phalanx.Client]:
    """A fresh embedded member (each test may bend its daemon's server)."""
    client = phalanx.start()
    yield client
    client.close()


def _server(client: phalanx.Client) -> LocalServer:
    assert client.daemon is not None
    server = client.daemon.server
    assert isinstance(server, LocalServer)
    return server


def _session(client: phalanx.Client) -> Session:
    return _server(client)._sessions[client._session]


def _hello(conn: Connection) -> P.Welcome:
    welcome = conn.call(P.ClientHello(os.getpid(), time.monotonic()), 5.0)
    assert isinstance(welcome, P.Welcome)
    return welcome


def _fds(word: str = "") -> list[str]:
    """This process's open descriptors (their targets containing ``word``)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if word in target:
            out.append(target)
    return out


def _until(check: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# ----------------------------------------------------------------------------- accept


class _AcceptFailsOnce:
    """The listening socket, whose next accept() raises ``exc`` once."""

    def __init__(self, sock: Any, exc: OSError) -> None:
        self._sock = sock
        self._exc = exc
        self.raised = threading.Event()

    def accept(self) -> Any:
        if not self.raised.is_set():
            self.raised.set()
            raise self._exc
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ECONNABORTED])
def test_the_acceptor_outlives_an_accept_error(
    pg: phalanx.Client, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Any accept() error (EMFILE with the descriptors used up, ECONNABORTED) ended the
    acceptor: connect() still succeeded, and HELLO was never answered."""
    srv = _server(pg)
    failing = _AcceptFailsOnce(srv._sock, OSError(code, os.strerror(code)))
    monkeypatch.setattr(srv, "_sock", failing)
    # the acceptor waits in accept() on the real socket (it does not poll): a
    # connection wakes it, and its next accept() goes through the wrapper
    with socket.socket(socket.AF_UNIX) as wake:
        wake.settimeout(5.0)
        wake.connect(pg.socket)
    assert failing.raised.wait(5.0)
    _serves_a_new_client(pg, srv)


def test_the_acceptor_outlives_a_thread_it_cannot_start(
    pg: phalanx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``RuntimeError: can't start new thread`` ended the acceptor (and left the
    connection's bookkeeping behind). That connection is closed; the next is served."""
    srv = _server(pg)
    real = threading.Thread.start
    failed = threading.Event()

    def start(self: threading.Thread) -> None:
        if self.name == "phalanx-local-conn" and not failed.is_set():
            failed.set()
            raise RuntimeError("can't start new thread")
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    sessions = set(srv._sessions)
    first = Connection(pg.socket, 5.0)
    try:
        with pytest.raises(phalanx.DaemonUnavailable):
            _hello(first)
    finally:
        first.close()
    assert failed.is_set()
    assert set(srv._sessions) == sessions  # nothing left of the refused connection
    _serves_a_new_client(pg, srv)


def _serves_a_new_client(pg: phalanx.Client, srv: LocalServer) -> None:
    """A new connection gets its HELLO answered, and the acceptor is alive."""
    conn = Connection(pg.socket, 5.0)
    try:
        assert _hello(conn).session > 0
    finally:
        conn.close()
    assert srv._acceptor.is_alive()


# ----------------------------------------------------------------------------- regions


def test_small_regions_keep_no_descriptor_open(pg: phalanx.Client) -> None:
    """A region under 2 MiB was mapped with mmap.mmap(fd), which keeps a dup of the fd
    for the mapping's life, in the client and in the daemon (both in this process
    here): a trainer with ~1000 small arrays ran out of descriptors."""
    pg.empty(16)  # whatever a first call opens once
    before = len(_fds())
    memfds = _memfds()  # other tests' (same process) are not this one's
    arrays = [pg.empty((256,), "float32") for _ in range(40)]
    assert len(_fds()) - before < 10
    regions = _session(pg).regions
    for i, a in enumerate(arrays):
        a[:] = i  # the daemon sees the client's bytes: one memory
        ref = pg._locate(a)
        assert ref is not None
        assert np.all(regions[ref.region].array(ref.offset, ref.dtype, ref.shape) == i)
    assert not _memfds() - memfds  # no memfd left open on either side


def _memfds() -> set[tuple[str, str]]:
    """(descriptor, target) of this process's open phalanx memfds."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if "memfd:phalanx" in target:
                out.add((name, target))
    return out


def _memfd(size: int) -> int:
    fd = os.memfd_create("phalanx-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def test_regions_per_session_are_capped(
    pg: phalanx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget counted bytes only: tiny regions were accepted without limit (each a
    mapping of the daemon's: vm.max_map_count). Past the cap MAP is refused with
    LimitExceeded, and the session goes on."""
    monkeypatch.setattr(server_mod, "_MAX_REGIONS", 4)
    held = len(_session(pg).regions)
    xs = [pg.empty(16) for _ in range(4 - held)]
    with pytest.raises(phalanx.LimitExceeded, match="regions"):
        pg.empty(16)
    pg._release(xs[0])
    y = pg.empty(16)  # one freed: one more fits
    y[:] = 3.0
    pg.all_reduce(y)
    assert np.all(y == 3.0)


def test_a_region_is_charged_a_page_at_least(
    pg: phalanx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-byte memfds were charged one byte each against max_client_shm_bytes, and each
    costs the daemon a mapping of a page."""
    monkeypatch.setattr(_server(pg), "max_shm", 3 * PAGE)
    conn = Connection(pg.socket, 5.0)
    try:
        welcome = _hello(conn)
        for rid in (1, 2, 3):
            fd = _memfd(1)
            try:
                assert isinstance(conn.call(P.Map(rid), 5.0, fd=fd), P.Mapped)
            finally:
                os.close(fd)
        assert _server(pg)._sessions[welcome.session].shm_bytes == 3 * PAGE
        fd = _memfd(1)
        try:
            with pytest.raises(phalanx.LimitExceeded):
                conn.call(P.Map(4), 5.0, fd=fd)
        finally:
            os.close(fd)
        conn.call(P.Unmap(1), 5.0)
        fd = _memfd(1)
        try:
            assert isinstance(conn.call(P.Map(5), 5.0, fd=fd), P.Mapped)
        finally:
            os.close(fd)
    finally:
        conn.close()


# ----------------------------------------------------------------------------- MAP behind an op


@pytest.fixture
def pair() -> Iterator[tuple[phalanx.Client, phalanx.Client]]:
    with embedded_pair() as clients:
        yield clients


def _daemon_regions(c: phalanx.Client) -> set[int]:
    return set(_session(c).regions)


def _client_regions(c: phalanx.Client) -> set[int]:
    return set(c._regions) | {t.rid for t in c._twins.values() if t is not None}


def test_a_map_behind_a_slow_op_waits_for_it(
    pair: tuple[phalanx.Client, phalanx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MAP queued behind an async op that ran longer than the control timeout (10 s;
    0.5 s here) raised, the client forgot the region, and the daemon mapped it later:
    its budget leaked for the session's life. It now waits as long as the op may take."""
    a, _b = pair
    monkeypatch.setattr(client_mod, "_CONTROL_TIMEOUT", 0.5)
    x = a.empty(1024)
    h = a.all_reduce(x, async_op=True, timeout=2.5)  # b never joins: runs to its deadline
    time.sleep(0.1)
    y = a.empty(1 << 16)  # behind the op
    with pytest.raises(TimeoutError):
        h.wait()
    y[:] = 1.0
    assert _daemon_regions(a) == _client_regions(a)


def test_a_map_that_never_got_its_answer_is_undone(
    pair: tuple[phalanx.Client, phalanx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a MAP still gets no answer, the daemon unmaps it right after mapping it (the
    late reply is dropped): no region stays charged that the client does not know."""
    a, _b = pair
    monkeypatch.setattr(a, "_map_timeout", lambda: 0.3)
    x = a.empty(1024)
    h = a.all_reduce(x, async_op=True, timeout=2.0)
    time.sleep(0.1)
    with pytest.raises(TimeoutError):
        a.empty(1 << 16)
    with pytest.raises(TimeoutError):
        h.wait()
    a.view()  # reads whatever came late
    assert _until(lambda: _daemon_regions(a) == _client_regions(a), 5.0), (
        _daemon_regions(a),
        _client_regions(a),
    )
    assert not a._conn._replies
    assert not a._conn.busy


# ----------------------------------------------------------------------------- late replies


@pytest.mark.parametrize("daemon_checks", [True, False])
def test_a_late_restore_reply_leaves_no_memfd_behind(
    pair: tuple[phalanx.Client, phalanx.Client],
    monkeypatch: pytest.MonkeyPatch,
    daemon_checks: bool,
) -> None:
    """A RESTORE that timed out behind a slow op: its late reply (a memfd holding the
    whole state) was kept in the connection for ever, unclaimed. The daemon now answers
    a RESTORE whose deadline passed with TimeoutError (no memfd), and the client drops
    a late reply (closing its memfd: ``daemon_checks=False`` sends one)."""
    a, _b = pair
    if not daemon_checks:
        monkeypatch.setattr(snapshots, "_in_time", lambda dl: None)
    state = {"w": a.empty((1 << 16,), "float32")}
    state["w"][:] = 3.0
    a.snapshot(state, 1).wait(timeout=60)
    monkeypatch.setattr(client_mod, "_GRACE_S", 0.1)
    monkeypatch.setattr(client_mod, "_ACK_S", 0.1)
    x = a.empty(1024)
    h = a.all_reduce(x, async_op=True, timeout=2.0)  # holds a's connection ~2 s
    time.sleep(0.1)
    with pytest.raises(TimeoutError):
        a.restore(timeout=0.3)
    with pytest.raises(TimeoutError):
        h.wait()
    a.view()  # reads the late reply
    assert not a._conn._replies
    assert not _fds("memfd:phalanx-restore")
    step, got = a.restore(timeout=30)  # and a restore in time still works
    assert step == 1 and np.all(got["w"] == 3.0)


def test_replies_nobody_waits_for_are_dropped(pg: phalanx.Client) -> None:
    """A call that raised NoReply left its reply, when it came, in the connection."""
    conn = Connection(pg.socket, 5.0)
    try:
        _hello(conn)
        for _ in range(50):  # a call that gives up before its answer comes
            try:
                conn.call(P.GetView(), 0.0)
            except TimeoutError:
                break
        else:
            pytest.fail("no call ever gave up")
        assert isinstance(conn.call(P.GetView(), 5.0), phalanx.ViewInfo)
        assert not conn._replies
    finally:
        conn.close()


# ----------------------------------------------------------------------------- HELLO first


def test_requests_before_hello_are_refused(pg: phalanx.Client) -> None:
    """A connection that skipped HELLO, or whose HELLO was refused (another protocol
    version), could begin steps and run ops, and its death was never told to the
    group. Such a connection is closed; CANCEL and WATCH connections need no HELLO."""
    now = time.monotonic()
    for first in (None, P.ClientHello(os.getpid(), now, P.PROTOCOL_VERSION + 1)):
        for req in (
            P.BeginStep(None, 2.0, now + 2.0, False),
            P.Op(OpSpec("barrier"), None, False, 2.0, now + 2.0),
        ):
            conn = Connection(pg.socket, 5.0)
            try:
                if first is not None:
                    with pytest.raises(phalanx.ConfigError):
                        conn.call(first, 5.0)
                with pytest.raises(phalanx.DaemonUnavailable):
                    conn.call(req, 5.0)
            finally:
                conn.close()
    watch = Connection(pg.socket, 5.0)
    try:
        assert isinstance(watch.call(P.Watch(), 5.0), phalanx.ViewInfo)
        state = watch.call(P.Cancel(pg._session, 1), 5.0)
        assert isinstance(state, P.Cancelled)
    finally:
        watch.close()
    pg.barrier(timeout=5.0)  # the daemon serves its client as before


def test_an_idle_acceptor_does_not_poll_and_stops_at_once(pg: phalanx.Client) -> None:
    """The acceptor used to wake every 0.25 s; now it waits in accept(), and
    stop_accepting() wakes it by shutting the listening socket down."""
    srv = _server(pg)
    timeout = srv._sock.gettimeout()
    assert timeout is None or timeout >= 10.0
    time.sleep(0.3)  # the acceptor is waiting in accept()
    t = time.monotonic()
    srv.stop_accepting()
    assert time.monotonic() - t < 5.0  # woken, not left to its backstop
    assert not srv._acceptor.is_alive()

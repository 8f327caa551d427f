"""The client -> daemon path under load and bad input, with an embedded daemon (real
Unix socket, real session threads): replies a client reads late, errors and replies
over the wire's string limit, deadlines, cancelled MAPs, timeouts and dtype strings.
Each test failed on the code before its fix (found by review)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.local import protocol as P

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pg() -> Iterator[phalanx.Client]:
    client = phalanx.start()
    yield client
    client.close()


def test_a_client_that_reads_its_replies_late_keeps_its_session(
    pg: phalanx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside a step, 100 async all-reduces, then compute before waiting: the daemon's
    reply sends shared the 0.25 s read-poll timeout, so it dropped the session as lost
    (the member left and rejoined the group mid-step)."""
    caplog.set_level(logging.INFO)
    grads = [pg.empty((256,), "float32") for _ in range(100)]
    for g in grads:
        g[:] = 1.0
    handles = [pg.all_reduce(g, async_op=True) for g in grads]
    time.sleep(0.6)  # compute while the reductions run
    for h in handles:
        h.wait(30)
    assert all(np.all(g == 1.0) for g in grads)  # world 1: the sum is the input
    lost = [r.getMessage() for r in caplog.records if "client_lost" in r.getMessage()]
    assert not lost, lost


def test_an_error_longer_than_the_wire_allows_still_reaches_the_caller(
    pg: phalanx.Client,
) -> None:
    """A 4 KiB+ message could not be encoded: the daemon closed the connection (the
    caller saw DaemonUnavailable, and the member cycled) instead of answering."""
    x = pg.empty((4,), "float32")
    with pytest.raises(phalanx.ConfigError):
        pg.all_reduce(x, op="x" * 4090)
    pg.all_reduce(x)  # the session goes on


def test_a_non_finite_deadline_is_bounded_by_the_timeout() -> None:
    """An OP whose `at` is NaN never expired and could not be cancelled (a deadline
    that cannot end); the daemon now takes the earlier of `at` and its timeout."""
    from phalanx.deadline import Deadline
    from phalanx.local.server import LocalServer, Session

    s = Session.__new__(Session)
    s.shared_clock = True
    req = P.Op(P.OpSpec("barrier"), None, False, 0.5, float("nan"))  # type: ignore[attr-defined]
    dl = LocalServer._deadline(None, s, req)  # type: ignore[arg-type]
    assert isinstance(dl, Deadline) and 0 < dl.left() <= 0.5


def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(10)
    return sock


def _call(sock: socket.socket, msg: Any, rid: int, fd: int | None = None) -> Any:
    data = bytes(P.encode(msg, rid))
    if fd is None:
        sock.sendall(data)
    else:
        socket.send_fds(sock, [data], [fd])
    decoder = P.Decoder()
    while not (frames := decoder.feed(sock.recv(65536))):
        pass
    return frames[0].message


def test_a_cancelled_map_closes_its_descriptor(pg: phalanx.Client) -> None:
    """A MAP cancelled before it ran answered TimeoutError and kept the descriptor
    that came with it, open for ever in the daemon."""
    a, b = _raw(pg.socket), _raw(pg.socket)
    try:
        welcome = _call(a, P.ClientHello(os.getpid(), time.monotonic()), 1)
        before = len(os.listdir("/proc/self/fd"))
        for i in range(30):
            rid = 10 + i
            assert _call(b, P.Cancel(welcome.session, rid), 100 + i).state == "will-not-run"
            fd = os.memfd_create("phalanx-test")
            os.ftruncate(fd, 4096)
            try:
                answer = _call(a, P.Map(rid), rid, fd=fd)
            finally:
                os.close(fd)
            assert answer.chain[0] == "TimeoutError", answer
        time.sleep(0.2)
        assert len(os.listdir("/proc/self/fd")) - before < 5
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("timeout", [1e6, float("nan"), -1.0])
def test_a_timeout_the_protocol_refuses_is_a_config_error_and_stages_nothing(
    pg: phalanx.Client, timeout: float
) -> None:
    regions = len(pg._regions)
    a = np.ones(4, np.float32)  # not shared: it would be staged
    with pytest.raises(phalanx.ConfigError):
        pg.all_reduce(a, timeout=timeout)
    assert len(pg._regions) == regions


@pytest.mark.parametrize("timeout", [1e6, float("nan"), -1.0])
@pytest.mark.parametrize("call", ["begin_step", "commit", "snapshot", "restore"])
def test_a_control_call_with_a_timeout_the_protocol_refuses_is_a_config_error(
    pg: phalanx.Client, timeout: float, call: str
) -> None:
    """Review, stop 30: begin_step(timeout=-1) and the other control calls raised
    ProtocolError (the request could not be encoded), as if the daemon had broken the
    protocol, instead of naming the caller's mistake."""
    calls: dict[str, Callable[[], object]] = {
        "begin_step": lambda: pg.begin_step(timeout=timeout),
        "commit": lambda: pg.commit(0, timeout=timeout),
        "snapshot": lambda: pg.snapshot({"w": np.ones(4, np.float32)}, 0, timeout=timeout),
        "restore": lambda: pg.restore(timeout=timeout),
    }
    with pytest.raises(phalanx.ConfigError, match="timeout"):
        calls[call]()


@pytest.mark.parametrize("name", ["f4,(", "S0", "V0"])
def test_dtype_strings_numpy_chokes_on_are_refused(name: str) -> None:
    ref: Any = None
    with pytest.raises(phalanx.ProtocolError):
        ref = P.BufRef(1, 0, name, (1,))
    assert ref is None


def test_a_busy_daemon_is_waited_for_not_called_gone(pg: phalanx.Client) -> None:
    """While the daemon runs one long request, a client that queued many async ops
    waits for room to send. It used to give up after a fixed 5 s, call the daemon gone
    and leave the socket open, so the daemon still ran the queued ops on memory the
    caller had been told was free."""
    assert pg.daemon is not None and pg.daemon.server is not None
    lock = pg.daemon.server._group_lock  # held as by a collective waiting for a peer
    assert lock.acquire(timeout=5)
    threading.Timer(6.0, lock.release).start()
    handles = [pg.barrier(async_op=True, timeout=60) for _ in range(300)]
    for h in handles:
        h.wait(60)


def test_a_stopping_daemon_leaves_its_replacements_socket_alone(tmp_path: Any) -> None:
    """Review, stop 31: the socket file was unlinked at the end of close(), after the
    drain and the leave; a daemon with the same id started meanwhile had found the
    socket dead, removed it and bound its own -- which the old one then unlinked, and
    its clients got ENOENT."""
    from phalanx.local.server import LocalServer

    path = str(tmp_path / "d.sock")
    old = LocalServer(path, None, max_client_shm_bytes=1 << 20, op_timeout=5.0)  # type: ignore[arg-type]
    old.stop_accepting()  # the listener is closed: the file is a dead socket now
    os.unlink(path)  # what the replacement's _bind does with a dead socket
    new = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        new.bind(path)
        new.listen(1)
        old.close()
        assert os.path.exists(path)  # still the replacement's
        _raw(path).close()  # and it answers
    finally:
        new.close()
    mine = LocalServer(str(tmp_path / "e.sock"), None, max_client_shm_bytes=1 << 20, op_timeout=5.0)  # type: ignore[arg-type]
    mine.close()
    assert not os.path.exists(tmp_path / "e.sock")  # its own socket is removed


def test_only_regions_sealed_against_shrinking_are_mapped(pg: phalanx.Client) -> None:
    """Review, stop 30: a client could shrink a memfd the daemon had mapped; the
    daemon's next touch of a page past the new end was a SIGBUS that killed it (and
    every other client's group with it). Regions are sealed (F_SEAL_SHRINK) before
    they are sent, and the daemon refuses unsealed ones."""
    import fcntl

    a = _raw(pg.socket)
    try:
        _call(a, P.ClientHello(os.getpid(), time.monotonic()), 1)
        fd = os.memfd_create("phalanx-test", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 1 << 16)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            assert isinstance(_call(a, P.Map(7), 2, fd=fd), P.Mapped)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4096)  # the seal holds in the client
        finally:
            os.close(fd)
        loose = os.memfd_create("phalanx-test")
        try:
            os.ftruncate(loose, 1 << 16)
            socket.send_fds(a, [bytes(P.encode(P.Map(8), 3))], [loose])
        finally:
            os.close(loose)
        assert a.recv(65536) == b""  # refused: the daemon ended that session
    finally:
        a.close()
    x = pg.empty((4,), "float32")  # the daemon and other sessions go on
    x[:] = 2.0
    pg.all_reduce(x)
    assert np.all(x == 2.0)


def test_cancels_of_requests_never_sent_are_bounded_and_pruned(pg: phalanx.Client) -> None:
    """Review, stop 30: every CANCEL of a request not read yet was kept for good, so
    CANCELs of rids never sent grew the daemon's memory without bound. They are capped
    per session, and dropped once the session answers past them."""
    a, b = _raw(pg.socket), _raw(pg.socket)
    try:
        welcome = _call(a, P.ClientHello(os.getpid(), time.monotonic()), 1)
        rid = 100
        for rid in range(100, 100 + 4096):
            msg = P.Cancel(welcome.session, rid)
            assert _call(b, msg, rid).state == "will-not-run"
        b.sendall(bytes(P.encode(P.Cancel(welcome.session, rid + 1), rid + 1)))
        assert b.recv(65536) == b""  # one too many: that connection is closed
        b.close()
        # the session answers a request past them: they are dropped, cancels work again
        assert isinstance(_call(a, P.GetView(), rid + 10), phalanx.ViewInfo)
        b = _raw(pg.socket)
        for r in range(rid + 20, rid + 4116):
            assert _call(b, P.Cancel(welcome.session, r), r).state == "will-not-run"
    finally:
        a.close()
        b.close()


def test_giving_staging_memory_back_never_waits_for_a_busy_daemon() -> None:
    """Review, stop 30: Handle.done() ("never blocks") gives a staged op's memory back
    and unmaps the regions beyond the few it keeps, and each UNMAP waited for its
    answer -- behind whatever the daemon ran meanwhile (10 s at most). UNMAPs are now
    sent without waiting; the daemon answers them in order, and the answer is dropped."""
    from tests.integration._pairs import embedded_pair

    with embedded_pair() as (a, b):
        xs = [np.full(64, float(i), np.float32) for i in range(6)]  # not shared: staged
        ys = [b.empty((64,), "float32") for _ in range(6)]  # shared: no MAP in between
        for y in ys:
            y[:] = 1.0
        peer = [b.all_reduce(y, async_op=True, timeout=20) for y in ys]
        hs = [a.all_reduce(x, async_op=True, timeout=20) for x in xs]
        for h in peer:
            h.wait(20)
        held = a.empty((16,), "float32")  # b never joins this one: a's daemon is busy
        busy = a.all_reduce(held, async_op=True, timeout=6.0)
        time.sleep(0.3)
        t0 = time.monotonic()
        while not all(h.done() for h in hs):
            assert time.monotonic() - t0 < 3.0
            time.sleep(0.01)
        assert time.monotonic() - t0 < 3.0  # was: each UNMAP waited behind the held op
        assert [float(x[0]) for x in xs] == [i + 1.0 for i in range(6)]
        with pytest.raises((TimeoutError, phalanx.PhalanxError)):
            busy.wait(20)


def test_a_client_of_the_previous_local_protocol_is_told_at_hello(pg: phalanx.Client) -> None:
    """Review, stop 31: regions must now be sealed, but the protocol version stayed 2,
    so an older client passed HELLO and lost its session at its first MAP with
    "the daemon closed the connection". The version is 3: HELLO says what is wrong.
    (Version 4, the OP spec's layout tag: a client of 3 is told the same way.)"""
    for version in (2, P.PROTOCOL_VERSION - 1):
        a = _raw(pg.socket)
        try:
            old = P.ClientHello(os.getpid(), time.monotonic(), version=version)
            a.sendall(bytes(P.encode(old, 1)))
            answer = P.Decoder()
            frames: list[Any] = []
            while not frames:
                data = a.recv(65536)
                if not data:
                    break
                frames = answer.feed(data)
            assert frames, "the daemon closed the connection without saying why"
            want = f"local protocol {version}, not {P.PROTOCOL_VERSION}"
            assert want in str(frames[0].message), frames[0].message
        finally:
            a.close()

"""The shard plane's limits: connections capped before and after authentication, a
connection thread that cannot start costs that connection (never the accept thread,
never close()), the budget is reserved before a PUT's bytes are allocated (and given
back whatever happens to the PUT), on_change reports the current total, and a holder
whose LIST fails is named in a log line."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint.channel import InProcessChannel
from phalanx.checkpoint.store import (
    BudgetExceeded,
    HolderUnavailable,
    MemoryShardStore,
    ShardCorrupt,
    ShardKey,
)
from phalanx.checkpoint.tcp import OP_PUT, ShardServer, TcpShardChannel, encode_key
from phalanx.comm.frames import FrameKind, encode_header
from tests.integration.test_snapshot_channel import _blob
from tests.unit.test_snapshot_service import Cluster, state


def _closed_soon(sock: socket.socket, timeout: float = 3.0) -> bool:
    """Whether the server closed ``sock`` within ``timeout`` (it sent nothing)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _eventually(fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """``fn()`` retried (0.05 s apart) until it stops raising, at most ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def test_connections_still_in_their_handshake_are_capped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Silent strangers used to get a thread each, without limit."""
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    with ShardServer(st, secret=secret, max_handshakes=2, handshake_timeout=10) as srv:
        silent = [_connect(srv.address) for _ in range(2)]
        time.sleep(0.3)  # both accepted, both waiting in their handshake
        extra = [_connect(srv.address) for _ in range(3)]
        assert all(_closed_soon(s) for s in extra)  # over the cap: closed at once
        for s in silent + extra:
            s.close()
        assert (
            sum("in their handshake" in r.getMessage() for r in caplog.records) == 1
        )  # rate-limited
        ch = TcpShardChannel(secret=secret, addresses={"h": srv.address})
        try:
            _eventually(
                lambda: ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=5)
            )
        finally:
            ch.close()
        assert st.keys() == [ShardKey("o", 1, 0)]


def test_authenticated_connections_are_capped() -> None:
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    with ShardServer(st, secret=secret, max_conns=2) as srv:
        chans = [TcpShardChannel(secret=secret, addresses={"h": srv.address}) for _ in range(3)]
        try:
            for i, ch in enumerate(chans[:2]):  # each keeps its link pooled
                ch.put("h", ShardKey("o", 1, i), _blob(10), crc32(_blob(10)), timeout=5)
            with pytest.raises(HolderUnavailable):
                chans[2].put("h", ShardKey("o", 1, 2), _blob(10), crc32(_blob(10)), timeout=5)
            chans[0].close()  # its link goes, and with it its slot
            _eventually(
                lambda: chans[2].put(
                    "h", ShardKey("o", 1, 2), _blob(10), crc32(_blob(10)), timeout=5
                )
            )
        finally:
            for ch in chans:
                ch.close()


def test_a_connection_thread_that_cannot_start_costs_only_that_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RuntimeError from Thread.start (no threads left) killed the accept thread for
    good, and close() then joined a thread that never started (RuntimeError)."""
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    srv = ShardServer(st, secret=secret)
    try:
        failures = [2]
        real_start = threading.Thread.start

        def start(self: threading.Thread) -> None:
            if self.name == "shard-conn" and failures[0] > 0:
                failures[0] -= 1
                raise RuntimeError("can't start new thread")
            real_start(self)

        monkeypatch.setattr(threading.Thread, "start", start)
        refused = [_connect(srv.address) for _ in range(2)]
        assert all(_closed_soon(s) for s in refused)
        for s in refused:
            s.close()
        ch = TcpShardChannel(secret=secret, addresses={"h": srv.address})
        try:
            ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=5)
        finally:
            ch.close()
        assert srv._thread.is_alive()
    finally:
        srv.close()  # must not raise
    assert not srv._thread.is_alive()


def test_concurrent_puts_reserve_the_budget_before_allocating() -> None:
    """Two PUTs of 600 bytes against a budget of 1000: both used to pass the fit
    check, allocate and receive; only the second to finish was refused. Now the first
    one's bytes are set aside before they are allocated, the second is refused at once,
    and a PUT that dies mid-transfer gives its reservation back."""
    secret = os.urandom(32)
    st = MemoryShardStore(1000)
    with ShardServer(st, secret=secret) as srv:
        ch = TcpShardChannel(secret=secret, addresses={"h": srv.address})
        try:
            slow = ch._take("h", time.monotonic() + 5)  # an authenticated link of our own
            d = _blob(600)
            head = encode_key(ShardKey("o", 1, 0, 0)) + struct.pack("<I", crc32(d))
            slow.sendall(
                encode_header(FrameKind.DATA, epoch=0, seq=1, chunk=OP_PUT, length=len(head) + 600)
            )
            slow.sendall(head + d[:300].tobytes())  # past the key, then it stalls
            time.sleep(0.5)  # the server has read the head and set the 600 bytes aside
            d2 = _blob(600, 1)
            with pytest.raises(BudgetExceeded):
                ch.put("h", ShardKey("o", 1, 0, 1), d2, crc32(d2), timeout=5)
            assert st.reserved_bytes() == 600 and st.used_bytes() == 0
            slow.close()  # dies mid-transfer: the reservation goes back
            _eventually(lambda: ch.put("h", ShardKey("o", 1, 0, 1), d2, crc32(d2), timeout=5))
            assert st.used_bytes() == 600 and st.reserved_bytes() == 0
            assert st.keys() == [ShardKey("o", 1, 0, 1)]
        finally:
            ch.close()


def test_store_reservations_count_in_the_budget_and_go_back_on_failure() -> None:
    st = MemoryShardStore(1000)
    k1, k2 = ShardKey("a", 1, 0, 0), ShardKey("a", 1, 0, 1)
    d6, d9 = _blob(600), _blob(900, 1)
    r = st.reserve(k1, 600)
    assert st.reserved_bytes() == 600 and st.used_bytes() == 0
    assert not st.can_fit(k2, 600)
    with pytest.raises(BudgetExceeded):
        st.reserve(k2, 600)
    with pytest.raises(BudgetExceeded):  # a put without a reservation counts them too
        st.put(k2, d6.copy(), crc32(d6))
    r.release()
    r.release()  # idempotent
    assert st.reserved_bytes() == 0 and st.can_fit(k2, 600)
    r = st.reserve(k1, 600)
    with pytest.raises(ShardCorrupt):
        st.put(k1, d6.copy(), 12345, reservation=r)
    r.release()
    assert st.reserved_bytes() == 0 and st.used_bytes() == 0
    r = st.reserve(k1, 600)
    st.put(k1, d6.copy(), crc32(d6), reservation=r)  # consumes it
    r.release()  # a no-op now
    assert st.used_bytes() == 600 and st.reserved_bytes() == 0
    # replacing a key sets aside only the difference
    r = st.reserve(k1, 900)
    assert st.reserved_bytes() == 300
    st.put(k1, d9.copy(), crc32(d9), reservation=r)
    assert st.used_bytes() == 900 and st.reserved_bytes() == 0
    # a reservation is for the bytes it named: more is refused
    r = st.reserve(k2, 50)
    with pytest.raises(BudgetExceeded):
        st.put(k2, d6[:80].copy(), crc32(d6[:80]), reservation=r)
    r.release()
    assert st.used_bytes() == 900 and st.reserved_bytes() == 0


def test_on_change_reports_the_current_total_in_order() -> None:
    """on_change(used) ran outside the lock: a put that finished later could report
    its older total last, leaving the gauge wrong until the next change."""
    entered, go = threading.Event(), threading.Event()
    seen: list[int] = []

    def on_change(used: int) -> None:
        if not entered.is_set():
            entered.set()
            go.wait(5)
        seen.append(used)

    st = MemoryShardStore(1000, on_change=on_change)
    a, b = _blob(100), _blob(200, 1)
    ta = threading.Thread(target=st.put, args=(ShardKey("a", 1, 0, 0), a, crc32(a)))
    tb = threading.Thread(target=st.put, args=(ShardKey("a", 1, 0, 1), b, crc32(b)))
    ta.start()
    assert entered.wait(5)
    tb.start()
    time.sleep(0.2)
    go.set()
    ta.join(5)
    tb.join(5)
    assert seen[-1] == st.used_bytes() == 300
    assert seen == sorted(seen)


class FailingList(InProcessChannel):
    def list(self, holder: str, owner: str | None = None, *, timeout: float) -> list[ShardKey]:
        if holder == "p2":
            raise HolderUnavailable("listing refused", holder=holder)
        return super().list(holder, owner, timeout=timeout)


def test_a_holder_whose_listing_fails_is_named_in_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Cluster(4, 2, 1)
    try:
        c.svcs["p1"].snapshot(state(5), 5).wait(20)
        svc = c.service("p0", FailingList(c.hub))
        try:
            with caplog.at_level(logging.WARNING, logger="phalanx.checkpoint.snapshot"):
                assert svc.restore_peer("p1", timeout=10)[0] == 5
                assert svc.restore_peer("p1", timeout=10)[0] == 5
        finally:
            svc.close()
        lines = [r.getMessage() for r in caplog.records if "listing" in r.getMessage()]
        assert len(lines) == 1 and "p2" in lines[0] and "listing refused" in lines[0]
    finally:
        c.close()


def test_an_idle_shard_server_does_not_poll_and_closes_at_once() -> None:
    """Its acceptor used to wake every 0.2 s; now it waits in accept(), and close()
    wakes it by shutting the listening socket down."""
    srv = ShardServer(MemoryShardStore(1 << 20), secret=os.urandom(32))
    try:
        timeout = srv._listener.sock.gettimeout()
        assert timeout is None or timeout >= 10.0
        time.sleep(0.3)  # the acceptor is waiting in accept()
    finally:
        t = time.monotonic()
        srv.close(timeout=20.0)
    assert time.monotonic() - t < 5.0  # woken, not left to its backstop
    assert not srv._thread.is_alive()

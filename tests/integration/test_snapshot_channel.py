"""One conformance test for every ShardChannel (in-process hub and TCP shard links),
plus what only the TCP links can get wrong: the secret, oversized lengths, deadlines."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint._nice import MAX_NICE
from phalanx.checkpoint.channel import InProcessHub, ShardChannel
from phalanx.checkpoint.store import (
    BudgetExceeded,
    HolderUnavailable,
    MemoryShardStore,
    Reservation,
    ShardCorrupt,
    ShardKey,
    ShardMissing,
)
from phalanx.checkpoint.tcp import (
    OP_DELETE,
    OP_LIST,
    OP_PUT,
    ShardServer,
    TcpShardChannel,
    encode_key,
)
from phalanx.comm.frames import FrameKind, encode_header


@dataclass
class Rig:
    channel: ShardChannel
    stores: dict[str, MemoryShardStore]


@pytest.fixture(params=["inprocess", "tcp"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    stores = {"h1": MemoryShardStore(1 << 20), "h2": MemoryShardStore(10_000)}
    if request.param == "inprocess":
        hub = InProcessHub()
        for h, st in stores.items():
            hub.register(h, st)
        ch: ShardChannel = hub.channel()
        yield Rig(ch, stores)
        ch.close()
        return
    secret = os.urandom(32)
    servers = {h: ShardServer(st, secret=secret) for h, st in stores.items()}
    ch = TcpShardChannel(secret=secret, addresses={h: s.address for h, s in servers.items()})
    yield Rig(ch, stores)
    ch.close()
    for s in servers.values():
        s.close()


def _blob(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_channel_conformance(rig: Rig) -> None:
    ch = rig.channel
    k1, k2 = ShardKey("own", 5, 0, 1), ShardKey("own", 5, ShardKey.meta("own", 5).stripe)
    d = _blob(300_000, 1)
    ch.put("h1", k1, d, crc32(d), timeout=5)
    d[0] ^= 1  # the channel did not keep a reference
    got, crc = ch.get("h1", k1, timeout=5)
    d[0] ^= 1
    assert np.array_equal(got, d) and crc == crc32(d)
    ch.put("h1", k2, _blob(10, 2), crc32(_blob(10, 2)), timeout=5)
    ch.put("h1", ShardKey("other", 1, 0), _blob(5), crc32(_blob(5)), timeout=5)
    assert ch.list("h1", "own", timeout=5) == sorted([k1, k2])
    assert len(ch.list("h1", timeout=5)) == 3
    with pytest.raises(ShardMissing):
        ch.get("h1", ShardKey("own", 6, 0), timeout=5)
    with pytest.raises(ShardCorrupt):  # wrong checksum refused on the way in
        ch.put("h1", ShardKey("own", 7, 0), d[:100], crc32(d[:100]) ^ 1, timeout=5)
    with pytest.raises(BudgetExceeded):
        ch.put("h2", k1, d, crc32(d), timeout=5)
    assert rig.stores["h2"].used_bytes() == 0
    # held bytes rot: the read says corrupt
    arr, _ = rig.stores["h1"]._blobs[k1]
    arr.setflags(write=True)
    arr[99] ^= 0x10
    with pytest.raises(ShardCorrupt):
        ch.get("h1", k1, timeout=5)
    ch.delete("h1", [k1, k2, ShardKey("own", 99, 0)], timeout=5)
    assert ch.list("h1", "own", timeout=5) == []
    with pytest.raises(HolderUnavailable):
        ch.list("nobody", timeout=1)


def test_tcp_wrong_secret_is_refused() -> None:
    st = MemoryShardStore(1 << 20)
    with ShardServer(st, secret=os.urandom(32)) as srv:
        ch = TcpShardChannel(secret=os.urandom(32), addresses={"h": srv.address})
        with pytest.raises(HolderUnavailable, match="bad-auth"):
            ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=3)
        ch.close()
        assert st.keys() == []


def test_tcp_oversized_length_closes_the_link_without_allocating() -> None:
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    with ShardServer(st, secret=secret, max_message=1 << 20) as srv:
        ch = TcpShardChannel(secret=secret, addresses={"h": srv.address})
        sock = ch._take("h", time.monotonic() + 5)  # an authenticated link
        sock.sendall(encode_header(FrameKind.DATA, epoch=0, seq=1, chunk=1, length=2**40))
        sock.settimeout(5)
        assert sock.recv(100) == b""  # the server closed it
        sock.close()
        # the server is still fine for well-behaved peers
        ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=5)
        ch.close()


def test_tcp_silent_holder_fails_by_the_deadline() -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)  # accepts (kernel backlog) but never answers the handshake
    ch = TcpShardChannel(
        secret=os.urandom(32),
        addresses={"h": f"127.0.0.1:{lsock.getsockname()[1]}"},
        handshake_timeout=0.5,
    )
    t0 = time.monotonic()
    with pytest.raises(HolderUnavailable):
        ch.list("h", timeout=0.5)
    assert time.monotonic() - t0 < 3
    ch.close()
    lsock.close()


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (OP_DELETE, b""),  # no key count
        (OP_LIST, struct.pack("<H", 2) + b"\xff\xfe"),  # an owner that is not UTF-8
    ],
)
def test_tcp_malformed_control_body_closes_the_link_with_a_log_line(
    op: int, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The error used to escape the connection thread (threading.excepthook, a
    traceback) instead of closing the link as every other bad frame does."""
    uncaught: list[str] = []
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    previous = threading.excepthook
    threading.excepthook = lambda args: uncaught.append(repr(args.exc_value))
    try:
        with ShardServer(st, secret=secret) as srv:
            ch = TcpShardChannel(secret=secret, addresses={"h": srv.address})
            sock = ch._take("h", time.monotonic() + 5)
            sock.sendall(encode_header(FrameKind.DATA, epoch=0, seq=7, chunk=op, length=len(body)))
            sock.sendall(body)
            sock.settimeout(5)
            assert sock.recv(100) == b""  # the server closed it
            sock.close()
            ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=5)
            ch.close()
    finally:
        threading.excepthook = previous
    assert uncaught == []
    assert any("bad-payload" in r.getMessage() for r in caplog.records)


def test_tcp_put_over_the_budget_is_refused_before_its_bytes_are_allocated() -> None:
    """A PUT announcing 64 MiB to a holder with a 1 MiB budget: the server must not
    allocate those bytes (it did, before asking the budget) -- only drain them."""
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    with ShardServer(st, secret=secret) as srv:
        ch = TcpShardChannel(secret=secret, addresses={"h": srv.address})
        sock = ch._take("h", time.monotonic() + 5)
        head = encode_key(ShardKey("o", 1, 0)) + struct.pack("<I", 0)
        n = 64 << 20
        tracemalloc.start()
        try:
            sock.sendall(
                encode_header(FrameKind.DATA, epoch=0, seq=9, chunk=OP_PUT, length=len(head) + n)
            )
            sock.sendall(head + bytes(4096))
            time.sleep(0.5)  # the server has read the head and decided
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        sock.close()
        ch.close()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated for a PUT over the budget"


@pytest.mark.parametrize("same_port", [True, False])
def test_tcp_a_holder_restarted_under_the_same_id_is_reached_at_once(same_port: bool) -> None:
    """A pooled link to a holder's old process (it restarted with the same member id,
    at a new address or the same one) failed the next call; in a seal, one failed put
    abandons the whole generation."""
    secret = os.urandom(32)
    first = MemoryShardStore(1 << 20)
    srv = ShardServer(first, secret=secret)
    where = {"h": srv.address}
    ch = TcpShardChannel(secret=secret, addresses=lambda member: where.get(member))
    try:
        ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=5)  # pooled now
        srv.close()
        second = MemoryShardStore(1 << 20)
        bind = srv.address if same_port else "127.0.0.1:0"
        srv = ShardServer(second, secret=secret, address=bind)
        where["h"] = srv.address
        time.sleep(0.1)
        ch.put("h", ShardKey("o", 2, 0), _blob(10), crc32(_blob(10)), timeout=5)
        assert second.keys() == [ShardKey("o", 2, 0)]
    finally:
        ch.close()
        srv.close()


def test_tcp_a_live_pooled_link_serves_while_the_holders_address_is_unknown() -> None:
    """Between views a daemon may not know a holder's address for a moment; a live
    pooled link to it must still serve (checking links against the address made every
    call then fail with "no known shard address": a soak lost a restore to it)."""
    secret = os.urandom(32)
    st = MemoryShardStore(1 << 20)
    with ShardServer(st, secret=secret) as srv:
        where: dict[str, str] = {"h": srv.address}
        ch = TcpShardChannel(secret=secret, addresses=lambda member: where.get(member))
        try:
            ch.put("h", ShardKey("o", 1, 0), _blob(10), crc32(_blob(10)), timeout=5)
            where.clear()
            assert ch.list("h", "o", timeout=5) == [ShardKey("o", 1, 0)]
        finally:
            ch.close()


class NiceStore(MemoryShardStore):
    """Records the nice value of every thread that stores a piece."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget)
        self.nice: set[int] = set()

    def put(
        self, key: ShardKey, data: np.ndarray, crc: int, *, reservation: Reservation | None = None
    ) -> None:
        self.nice.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        super().put(key, data, crc, reservation=reservation)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
@pytest.mark.parametrize("io_nice", [0, 6])
def test_tcp_a_holder_takes_pieces_in_on_threads_niced_by_io_nice(io_nice: int) -> None:
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    if base + 6 > MAX_NICE:
        pytest.skip(f"the test runs at nice {base}: no room to lower a thread by 6")
    store = NiceStore(1 << 20)
    secret = os.urandom(32)
    server = ShardServer(store, secret=secret, io_nice=io_nice)
    ch = TcpShardChannel(secret=secret, addresses={"h": server.address})
    try:
        blob = _blob(4096)
        ch.put("h", ShardKey("o", 1, 0, 0), blob, crc32(blob), timeout=5)
        data, _ = ch.get("h", ShardKey("o", 1, 0, 0), timeout=5)
        assert np.array_equal(data, blob)
        assert store.nice == {base + io_nice}
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        ch.close()
        server.close()
    with pytest.raises(ValueError, match="io_nice"):
        ShardServer(MemoryShardStore(1), secret=secret, io_nice=20)
    with pytest.raises(TypeError, match="io_nice"):
        ShardServer(MemoryShardStore(1), secret=secret, io_nice=2.5)  # type: ignore[arg-type]

"""``phalanx.daemon.quiet_grpc_waits``: a thread parked on a gRPC stream's next
response stops waking ten times a second, and what should end its wait still does.

A real gRPC server on 127.0.0.1 with one server-streaming method that sends nothing
until told; the waiting thread's wake-ups are its voluntary context switches
(``/proc/self/task/<tid>/status``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc import _common

from phalanx.daemon import quiet_grpc_waits

_METHOD = "/phalanx.test.Quiet/Hold"


def _switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


@pytest.fixture
def slice_restored() -> Iterator[None]:
    before = _common.MAXIMUM_WAIT_TIMEOUT
    try:
        yield
    finally:
        _common.MAXIMUM_WAIT_TIMEOUT = before


@pytest.fixture
def stream() -> Iterator[tuple[grpc.Channel, threading.Event]]:
    release = threading.Event()

    def hold(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        release.wait(30)
        yield b"done"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_stream_rpc_method_handler(hold)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("phalanx.test.Quiet", {"Hold": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, release
    finally:
        release.set()
        channel.close()
        server.stop(None).wait(5)


def _park(
    channel: grpc.Channel, timeout: float | None
) -> tuple[Any, threading.Thread, dict[str, Any]]:
    call: Any = channel.unary_stream(_METHOD, None, None)(b"", timeout=timeout)
    got: dict[str, Any] = {}

    def consume() -> None:
        got["tid"] = threading.get_native_id()
        try:
            got["first"] = next(call)
        except grpc.RpcError as err:
            got["code"] = err.code()
        got["t"] = time.monotonic()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    while "tid" not in got:
        time.sleep(0.01)
    return call, t, got


def test_a_parked_stream_reader_stops_waking_and_still_gets_its_answer(
    stream: tuple[grpc.Channel, threading.Event], slice_restored: None
) -> None:
    channel, release = stream
    assert quiet_grpc_waits(5.0) is True
    _, t, got = _park(channel, timeout=30)
    time.sleep(0.3)  # past the call's start
    before = _switches(got["tid"])
    time.sleep(2.0)
    woke = _switches(got["tid"]) - before
    assert woke <= 4, f"the parked reader woke {woke} times in 2 s (gRPC's own slice: ~20)"
    release.set()  # the answer notifies: no slice to wait out
    t0 = time.monotonic()
    t.join(10)
    assert got.get("first") == b"done" and got["t"] - t0 < 2.5


def test_a_cancel_and_a_deadline_still_end_the_wait(
    stream: tuple[grpc.Channel, threading.Event], slice_restored: None
) -> None:
    channel, _ = stream
    assert quiet_grpc_waits(5.0) is True
    call, t, got = _park(channel, timeout=30)
    time.sleep(0.2)
    t0 = time.monotonic()
    call.cancel()
    t.join(10)
    assert got.get("code") is grpc.StatusCode.CANCELLED and got["t"] - t0 < 2.5
    t0 = time.monotonic()
    _, t, got = _park(channel, timeout=0.5)
    t.join(10)
    assert got.get("code") is grpc.StatusCode.DEADLINE_EXCEEDED and got["t"] - t0 < 3.0

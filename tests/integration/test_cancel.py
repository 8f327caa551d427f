"""A client that gives up on a collective never lets that op touch the next op's memory.

Regression for issue 15: a client whose call timed out returned its staging region to
the pool while the daemon's op was still running on it; the next op copied its input
into the same region, and the old op then wrote its result (or, failing, restored its
input) over it. The fix: the caller's deadline travels into the data plane (the daemon
ends the op by then and answers), and a client that still has no answer sends CANCEL
and reuses the memory only after the daemon acknowledged that the op is over.

Two members in embedded mode (real daemons, real Unix sockets, real TCP; one process).
``PHALANX_CANCEL_RUNS`` repeats the scenario (the issue's bar is 200 runs in a row).
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.local import protocol
from phalanx.ops import ViewInfo
from tests.integration._pairs import embedded_pair

pytestmark = pytest.mark.timeout(900)

RUNS = int(os.environ.get("PHALANX_CANCEL_RUNS", "3"))
N = 4096


@pytest.fixture
def pair() -> Iterator[tuple[phalanx.Client, phalanx.Client]]:
    with embedded_pair() as clients:
        yield clients


def test_a_timed_out_op_never_touches_the_next_ops_data(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    a, b = pair
    for i in range(RUNS):
        # b is not taking part: a's op cannot complete before a's deadline
        first = np.full(N, 1.0 + i, np.float32)  # plain numpy: staged through shared memory
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            a.all_reduce(first, timeout=0.3)
        assert np.all(first == 1.0 + i), "a failed op changed the caller's array"
        assert time.monotonic() - t0 < 8.0
        # now b takes part, once; a's next op reuses the staging memory of the first
        got: list[np.ndarray] = []
        errors: list[BaseException] = []

        def peer(got: list[np.ndarray], errors: list[BaseException]) -> None:
            y = np.full(N, 0.5, np.float32)
            try:
                b.all_reduce(y, retry=True, timeout=15.0)
            except BaseException as exc:  # reported below
                errors.append(exc)
            got.append(y)

        t = threading.Thread(target=peer, args=(got, errors))
        t.start()
        second = np.full(N, 1000.0 + i, np.float32)
        try:
            a.all_reduce(second, retry=True, timeout=15.0)
        finally:
            t.join(30.0)
        assert not errors, f"run {i}: the peer's op failed: {errors[0]!r}"
        want = 1000.5 + i
        assert np.all(second == want), (
            f"run {i}: the next op summed {np.unique(second)[:4]} instead of {want}: "
            "the cancelled op wrote into its memory"
        )
        assert np.all(got[0] == want)


class _StallOnce:
    """A frame hook that holds the engine thread once, as a wedged engine would (a
    long reduce, a GIL-starved thread): the op cannot end at its deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = threading.Event()

    def outgoing(self, peer: int, seq: int, ordinal: int, header: bytes, payload: Any) -> None:
        if not self.fired.is_set():
            self.fired.set()
            time.sleep(self.seconds)
        return None


def test_a_client_cancels_an_op_that_overruns_and_reuses_memory_only_after_the_ack(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    """The daemon cannot end the op at its deadline (its engine is held for 2 s): the
    client sends CANCEL at deadline + grace, and its TimeoutError (and the reuse of the
    staging memory) comes only after the daemon acknowledged that the op is over."""
    a, b = pair
    assert a.daemon is not None and a.daemon.group is not None
    deadline = time.monotonic() + 20
    while True:  # the view is known; its data-plane group may still be building
        plane = a.daemon.group._current
        if plane is not None and plane.group is not None and plane.view.size == 2:
            break
        assert time.monotonic() < deadline, "the data-plane group was never built"
        time.sleep(0.02)
    stall = _StallOnce(2.0)
    plane.group.engine.frame_hook = stall
    got: list[np.ndarray] = []
    errors: list[BaseException] = []

    def peer(got: list[np.ndarray], errors: list[BaseException]) -> None:
        y = np.full(N, 0.5, np.float32)
        try:
            b.all_reduce(y, retry=True, timeout=20.0)  # fails with a's op, then pairs again
        except BaseException as exc:
            errors.append(exc)
        got.append(y)

    t = threading.Thread(target=peer, args=(got, errors))
    t.start()
    first = np.full(N, 1.0, np.float32)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            a.all_reduce(first, timeout=0.3)
        took = time.monotonic() - t0
        assert stall.fired.is_set()
        assert 1.9 < took < 7.0, f"answered after {took:.2f}s: before the op was over?"
        assert np.all(first == 1.0)
        second = np.full(N, 1000.0, np.float32)  # the same staging memory, at once
        a.all_reduce(second, retry=True, timeout=20.0)
    finally:
        t.join(30.0)
    assert not errors, repr(errors)
    assert np.all(second == 1000.5) and np.all(got[0] == 1000.5)


def test_a_daemon_that_cannot_stop_an_op_is_treated_as_gone_and_its_memory_never_reused(
    tmp_path: Path,
) -> None:
    """A daemon that neither answers nor stops an op: the client gives up after the
    deadline, its grace and the acknowledgement time, closes the connection, and never
    hands the staging region out again."""
    path = str(tmp_path / "mute.sock")
    with _MuteDaemon(path) as fake:
        pg = phalanx.connect(path, timeout=2.0)
        try:
            x = np.ones(64, np.float32)  # staged: plain numpy
            t0 = time.monotonic()
            with pytest.raises(phalanx.DaemonUnavailable, match="did not stop"):
                pg.all_reduce(x, timeout=0.2)
            assert time.monotonic() - t0 < 1.0 + 0.2 + 5.0 + 2.0
            assert fake.cancels == 1
            assert pg._staging.free == [] and not pg._regions  # quarantined
            with pytest.raises(phalanx.DaemonUnavailable):
                pg.all_reduce(x, timeout=0.2)
        finally:
            pg.close()


class _MuteDaemon:
    """A Unix socket that speaks the local protocol but never finishes an OP and
    answers CANCEL with STILL_RUNNING (the real daemon's last resort)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cancels = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(4)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            th = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(th)
            th.start()

    def _serve(self, conn: socket.socket) -> None:
        dec = protocol.Decoder()
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    data, anc, _f, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(16))
                except TimeoutError:
                    continue
                except OSError:
                    return
                for level, kind, payload in anc:  # a MAP's memfd: not kept (a real
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:  # leak)
                        for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                            os.close(fd)
                if not data:
                    return
                for frame in dec.feed(data):
                    reply = self._reply(frame.message)
                    if reply is not None:
                        conn.sendall(
                            protocol.encode(reply, frame.rid, reply_to=type(frame.message))
                        )

    def _reply(self, msg: Any) -> Any:
        view = ViewInfo(1, ("mute",), 0, "mute")
        if isinstance(msg, protocol.ClientHello):
            return protocol.Welcome(protocol.PROTOCOL_VERSION, 1, 1, "mute", view, 300.0, 30.0)
        if isinstance(msg, protocol.Map):
            return protocol.Mapped(1 << 20)
        if isinstance(msg, protocol.Cancel):
            self.cancels += 1
            return protocol.Cancelled(protocol.CancelState.STILL_RUNNING.value)
        if isinstance(msg, protocol.Bye | protocol.Unmap):
            return protocol.Done()
        return None  # an OP: never answered

    def __enter__(self) -> _MuteDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()
        for th in self._threads:
            th.join(2.0)

"""Ops started on their caller's thread (Engine.submit's inline start): taken when the
engine thread is watching closely, refused after an idle spell, and never a way to
wait past a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group
from phalanx.comm.engine import _ACTIVE_S, _BUSY_POLL_S
from phalanx.deadline import Deadline
from phalanx.errors import PeerFailure
from tests.integration._pairs import on_both, pair


def _together(groups: tuple[Group, Group], ops: int, n: int = 1024) -> list[np.ndarray]:
    """``ops`` back-to-back all-reduces on both ranks; every result checked."""
    xs = [np.empty(n, np.float32) for _ in groups]

    def loop(rank: int) -> None:
        for i in range(ops):
            xs[rank][:] = rank + 1 + i
            groups[rank].all_reduce(xs[rank])
            expected = 1 + 2 + 2 * i
            assert np.all(xs[rank] == expected), (rank, i, xs[rank][:4])

    on_both(loop)
    return xs


@pytest.fixture
def groups() -> object:
    g = pair(options=CommOptions(timeout_s=5.0))
    yield g
    for grp in g:
        grp.close()


def test_back_to_back_small_ops_mostly_start_on_the_callers_thread(
    groups: tuple[Group, Group],
) -> None:
    # Before, every op woke the engine thread to start it (a socket write and a
    # wake-up per op); now an op that follows another within _ACTIVE_S starts on the
    # caller's thread and only the peers' frames wake the engine thread.
    _together(groups, 5)
    woken = [0, 0]
    for r, g in enumerate(groups):
        wake = g.engine._wake

        def counted(r: int = r, wake: Callable[[], None] = wake) -> None:
            woken[r] += 1
            wake()

        g.engine._wake = counted  # type: ignore[method-assign]
    _together(groups, 300)
    for r, g in enumerate(groups):
        assert woken[r] < 200, woken  # was one wake-up per op: 300
        assert g.engine.inline_starts >= 100, g.engine.inline_starts
        assert woken[r] <= 300 - g.engine.inline_starts + 5, (woken, g.engine.inline_starts)


def test_after_an_idle_spell_the_engine_thread_starts_the_op(
    groups: tuple[Group, Group],
) -> None:
    _together(groups, 5)
    before = [g.engine.inline_starts for g in groups]
    # the engine threads now sleep up to a second: starting an op here would leave
    # it unwatched that long, so the caller wakes the engine thread instead
    time.sleep(_ACTIVE_S + 3 * _BUSY_POLL_S)
    _together(groups, 1)
    assert [g.engine.inline_starts for g in groups] == before


def test_an_op_started_inline_still_ends_at_its_deadline(groups: tuple[Group, Group]) -> None:
    g0, _g1 = groups
    _together(groups, 5)
    time.sleep(0.01)  # the engine thread is back in its (short) poll
    before = g0.engine.inline_starts
    x = np.full(1024, 7.0, np.float32)
    t0 = time.monotonic()
    with pytest.raises(PeerFailure) as info:  # rank 1 never calls
        g0.all_reduce(x, deadline=Deadline.after(0.3))
    took = time.monotonic() - t0
    assert g0.engine.inline_starts == before + 1, "the op was not started inline"
    assert info.value.reason == "aborted"
    # the deadline plus the engine's busy poll (0.05 s); an op left under the idle
    # poll (1 s) would end after ~1.05 s
    assert took < 0.9, took
    assert np.all(x == 7.0), "the input is intact"


class _Interrupt:
    """Raises KeyboardInterrupt (as a signal would, on the main thread) once armed, and
    only on the thread that armed it: where the engine runs an op's start on that
    thread -- a FrameHook's ``outgoing`` (the first DATA frame) or an observer's
    ``op_started`` (before the links are set up for the op)."""

    def __init__(self) -> None:
        self.armed_by: int | None = None

    def _maybe(self) -> None:
        if self.armed_by is not None and self.armed_by == threading.get_ident():
            self.armed_by = None
            raise KeyboardInterrupt

    def outgoing(self, peer: int, seq: int, ordinal: int, header: bytes, payload: Any) -> None:
        self._maybe()

    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        self._maybe()

    def op_finished(self, sample: object) -> None:
        pass


@pytest.mark.parametrize("where", ["first-frame", "op-started"])
def test_an_interrupt_while_an_op_starts_inline_fails_it_and_reaches_the_caller(
    groups: tuple[Group, Group], where: str
) -> None:
    # The caller's thread may be the main thread, where signals land: an interrupt in
    # the middle of starting the op must neither be swallowed nor leave the engine
    # with a half-started op. The op fails as an abort does (input intact, the peer
    # told the reason, the group broken) and the KeyboardInterrupt goes on to the
    # caller. "op-started": the links are not yet set up for the op when it lands,
    # so a peer frame read before the abort would look like a protocol error.
    g0, g1 = groups
    hook = _Interrupt()
    if where == "first-frame":
        g0.engine.frame_hook = hook
    else:
        g0.engine.observer = hook
    for _ in range(10):  # until the op starts inline (the engine thread may be busy)
        _together(groups, 3)
        time.sleep(0.01)
        before = g0.engine.inline_starts
        x0 = np.full(1024, 7.0, np.float32)
        x1 = np.full(1024, 5.0, np.float32)
        peer: list[BaseException] = []

        def other(x1: np.ndarray = x1, peer: list[BaseException] = peer) -> None:
            try:
                g1.all_reduce(x1, deadline=Deadline.after(10.0))
            except BaseException as exc:  # reported below
                peer.append(exc)

        t = threading.Thread(target=other)
        t.start()
        hook.armed_by = threading.get_ident()
        interrupted = False
        try:
            g0.all_reduce(x0, deadline=Deadline.after(10.0))
        except KeyboardInterrupt:
            interrupted = True
        hook.armed_by = None
        t.join(10.0)
        assert not t.is_alive(), "the peer's op did not end"
        if g0.engine.inline_starts == before:  # started by the engine thread: again
            assert not interrupted and not peer, peer
            continue
        assert interrupted, "the interrupt did not reach the caller"
        assert np.all(x0 == 7.0) and np.all(x1 == 5.0), "inputs are intact"
        assert len(peer) == 1 and isinstance(peer[0], PeerFailure), peer
        assert peer[0].reason == "aborted", peer[0]
        with pytest.raises(PeerFailure) as info:  # the group is broken, not crashed
            g0.all_reduce(x0)
        assert info.value.reason == "aborted", info.value
        return
    pytest.fail("no op of ten started inline")

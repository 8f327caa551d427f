"""Ops started on their caller's thread (Engine.submit's inline start): taken when the
engine thread is watching closely, refused after an idle spell, and never a way to
wait past a deadline."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group
from phalanx.comm.engine import _ACTIVE_S, _BUSY_POLL_S
from phalanx.deadline import Deadline
from phalanx.errors import PeerFailure
from tests.integration._pairs import pair


def _together(groups: tuple[Group, Group], ops: int, n: int = 1024) -> list[np.ndarray]:
    """``ops`` back-to-back all-reduces on both ranks; every result checked."""
    xs = [np.empty(n, np.float32) for _ in groups]
    errors: list[BaseException] = []

    def loop(rank: int) -> None:
        try:
            for i in range(ops):
                xs[rank][:] = rank + 1 + i
                groups[rank].all_reduce(xs[rank])
                expected = 1 + 2 + 2 * i
                assert np.all(xs[rank] == expected), (rank, i, xs[rank][:4])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the ops did not end in time"
    assert not errors, errors
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
    _together(groups, 300)
    for g in groups:
        assert g.engine.inline_starts >= 100, g.engine.inline_starts


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
    before = g0.engine.inline_starts
    x = np.full(1024, 7.0, np.float32)
    t0 = time.monotonic()
    with pytest.raises(PeerFailure) as info:  # rank 1 never calls
        g0.all_reduce(x, deadline=Deadline.after(0.3))
    took = time.monotonic() - t0
    assert g0.engine.inline_starts == before + 1, "the op was not started inline"
    assert info.value.reason == "aborted"
    assert took < 2.0, took  # the deadline, plus the engine's poll (0.05 s), not 1 s
    assert np.all(x == 7.0), "the input is intact"

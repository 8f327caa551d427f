"""Group.abort() and the caller's deadline: the op in flight fails at once, input intact."""

from __future__ import annotations

import os
import resource
import threading
import time

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, bind
from phalanx.deadline import Deadline
from phalanx.errors import GroupClosed, PeerFailure
from tests.integration._pairs import pair


def test_abort_from_another_thread_fails_the_op_and_restores_the_input() -> None:
    g0, g1 = pair()
    try:
        x = np.arange(1 << 20, dtype=np.float32)
        before = x.copy()
        handle = g0.all_reduce(x, async_op=True)  # rank 1 never joins this op
        time.sleep(0.2)
        assert not handle.done()
        t0 = time.monotonic()
        g0.abort("view-change", "test")
        with pytest.raises(PeerFailure) as info:
            handle.wait(5.0)
        assert time.monotonic() - t0 < 2.0
        assert info.value.reason == "view-change"
        assert info.value.detected_by == 0
        assert np.array_equal(x, before)
        # the group is broken now: the next op fails at once
        with pytest.raises(PeerFailure):
            g0.barrier()
        # rank 1, joining the same op late, hears the verdict instead of timing out,
        # and its input is intact too
        y = np.ones(1 << 20, dtype=np.float32)
        with pytest.raises(PeerFailure) as peer_info:
            g1.all_reduce(y)
        assert peer_info.value.reason == "view-change"
        assert peer_info.value.detected_by == 0
        assert np.array_equal(y, np.ones_like(y))
    finally:
        g0.close()
        g1.close()


def test_close_aborts_the_op_in_flight_promptly() -> None:
    g0, g1 = pair()
    try:
        x = np.arange(1 << 20, dtype=np.float32)
        before = x.copy()
        handle = g0.all_reduce(x, async_op=True)  # rank 1 never joins
        time.sleep(0.1)
        t0 = time.monotonic()
        g0.close()
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(PeerFailure) as info:
            handle.wait(1.0)
        assert info.value.reason == "closed"
        assert np.array_equal(x, before)
    finally:
        g0.close()
        g1.close()


def test_preserve_input_false_is_correct_and_says_so_on_failure() -> None:
    g0, g1 = pair()
    try:
        n = 1 << 20  # 4 MiB of float32: the in-place ring
        xs = [np.arange(n, dtype=np.float32) % 7 + r for r in range(2)]
        expected = xs[0] + xs[1]
        hs = [
            g.all_reduce(x, async_op=True, preserve_input=False)
            for g, x in zip((g0, g1), xs, strict=True)
        ]
        for h in hs:
            assert h.wait(30).algorithm == "ring"
        for x in xs:
            assert np.array_equal(x, expected)
        # a failure now says the input was not kept
        y = np.ones(n, dtype=np.float32)
        h = g0.all_reduce(y, async_op=True, preserve_input=False)
        time.sleep(0.1)
        g0.abort("view-change", "test")
        with pytest.raises(PeerFailure) as info:
            h.wait(5.0)
        assert "NOT preserved" in str(info.value)
    finally:
        g0.close()
        g1.close()


def test_the_callers_deadline_ends_the_op_in_the_engine_and_cancel_ends_it_sooner() -> None:
    """The deadline travels into the engine: an op a peer never joins fails when the
    caller's deadline passes (not after the engine's own progress timeout, 30 s here),
    with no suspects (nobody failed: the caller gave up) and the input intact; a
    cancelled deadline ends a second op at once."""
    g0, g1 = pair(timeout_s=30.0)
    try:
        x = np.arange(1 << 18, dtype=np.float32)
        before = x.copy()
        t0 = time.monotonic()
        with pytest.raises(PeerFailure) as info:
            g0.all_reduce(x, deadline=Deadline.after(0.3))
        took = time.monotonic() - t0
        assert 0.25 < took < 2.0
        assert info.value.reason == "aborted" and not info.value.suspects
        assert "deadline passed" in str(info.value)
        assert np.array_equal(x, before)
        # the peer that comes late hears the verdict
        with pytest.raises(PeerFailure) as peer_info:
            g1.all_reduce(np.ones(1 << 18, np.float32))
        assert peer_info.value.reason == "aborted" and peer_info.value.detected_by == 0
    finally:
        g0.close()
        g1.close()
    g0, g1 = pair(timeout_s=30.0)
    try:
        deadline = Deadline.after(60.0)
        h = g0.barrier(async_op=True, deadline=deadline)
        time.sleep(0.1)
        t0 = time.monotonic()
        deadline.cancel()
        with pytest.raises(PeerFailure, match="cancelled by the caller"):
            h.wait(5.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        g0.close()
        g1.close()


class _StallAfterFirstFrame:
    """A FrameHook: the rank stops (neither sends nor reads) before its second frame."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def outgoing(self, peer: int, seq: int, ordinal: int, header: bytes, payload: object) -> None:
        if ordinal >= 1:
            time.sleep(self.seconds)


def test_a_failure_with_a_send_blocked_on_a_socket_numbered_past_1024() -> None:
    """A process with many files open gets socket numbers past select()'s limit of
    1024. An op that fails while a send is blocked on such a socket must still tell
    its peer and leave the input intact: waiting with select() raised ValueError,
    which crashed the engine before the undo (CommError, the array half-reduced)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"the hard limit on open files ({hard}) is below 1400")
    if soft != resource.RLIM_INFINITY and soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    pad = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        g0, g1 = pair(options=CommOptions(timeout_s=30.0, page_swap_min_bytes=0))
        g1.engine.frame_hook = _StallAfterFirstFrame(3.0)
        late: list[BaseException] = []
        try:
            assert min(s.channel.fd for ls in g0.engine.links.values() for s in ls) >= 1024
            x = np.random.default_rng(1).standard_normal(8 << 20).astype(np.float32)
            before = x.copy()

            def peer() -> None:
                try:
                    g1.all_reduce(np.ones(8 << 20, np.float32))
                except PeerFailure as exc:
                    late.append(exc)

            t = threading.Thread(target=peer)
            t.start()
            with pytest.raises(PeerFailure) as info:
                g0.all_reduce(x, deadline=Deadline.after(1.0))
            assert info.value.reason == "aborted"
            assert np.array_equal(x, before)
            t.join(30.0)
            assert late, "the peer's op must fail too"
        finally:
            g0.close()
            g1.close()
    finally:
        for fd in pad:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("round_", range(3))
def test_close_right_after_submit_fails_the_queued_op_without_starting_it(round_: int) -> None:
    """close() found no op running and left the queued one to the engine, which
    started it; close() then gave up joining after 5 s and shut the links under it
    (the engine died with an untyped error, the input half overwritten)."""
    g0, g1 = pair(timeout_s=10.0)
    try:
        x = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: the in-place ring
        before = x.copy()
        handle = g0.all_reduce(x, async_op=True)  # rank 1 never joins
        t0 = time.monotonic()
        g0.close()
        assert time.monotonic() - t0 < 3.0
        with pytest.raises((PeerFailure, GroupClosed)) as info:
            handle.wait(2.0)
        err = info.value
        assert isinstance(err, GroupClosed) or (
            isinstance(err, PeerFailure) and err.reason == "closed"
        )
        assert np.array_equal(x, before)
    finally:
        g0.close()
        g1.close()


def test_a_queued_ops_deadline_is_kept_while_the_op_ahead_waits() -> None:
    """A queued op's deadline was checked only once it started: behind an op that
    a peer never joins it waited for that op's progress timeout (30 s here). The
    group gives up on both within the queued op's deadline; inputs intact."""
    g0, g1 = pair(timeout_s=30.0)
    try:
        x = np.arange(1 << 16, dtype=np.float32)
        y = np.arange(1 << 16, dtype=np.float32) * 2
        xb, yb = x.copy(), y.copy()
        ahead = g0.all_reduce(x, async_op=True)  # rank 1 never joins
        t0 = time.monotonic()
        queued = g0.all_reduce(y, async_op=True, deadline=Deadline.after(0.5))
        with pytest.raises(PeerFailure) as info:
            queued.wait(10.0)
        assert time.monotonic() - t0 < 5.0
        assert info.value.reason == "aborted"
        with pytest.raises(PeerFailure) as ahead_info:
            ahead.wait(1.0)
        assert "queued behind this op" in str(ahead_info.value)
        assert np.array_equal(x, xb) and np.array_equal(y, yb)
    finally:
        g0.close()
        g1.close()


def test_on_break_tells_the_owner_once_of_a_break_that_reaches_an_idle_engine() -> None:
    """A peer's ABORT while this rank runs nothing breaks its group; ``on_break`` says
    so at once, on the engine's thread, once -- what lets ElasticGroup's installer
    sleep instead of polling the engine for a break."""
    # an idle group that never broke, closed: nothing to tell
    told, (g0, g1) = _told_pair()
    g0.close()
    g1.close()
    time.sleep(0.2)
    assert told == [[], []]

    told, (g0, g1) = _told_pair()
    try:
        b1 = threading.Thread(target=g1.barrier)
        b1.start()
        g0.barrier()  # an op that ended well: no break, nothing told
        b1.join(30)
        time.sleep(0.2)
        assert told == [[], []]
        g1.abort("view-change", "test: rank 1 gives up while rank 0 is idle")
        deadline = time.monotonic() + 10
        while not (told[0] and told[1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert told[0] == ["phalanx-engine-0"], told  # rank 0 ran nothing: ABORT read idle
        assert told[1] == ["phalanx-engine-1"], told
        assert isinstance(g0.engine.broken, PeerFailure)
        with pytest.raises(PeerFailure):
            g0.barrier()
        time.sleep(0.2)
        assert told == [["phalanx-engine-0"], ["phalanx-engine-1"]]  # once, not per failure
    finally:
        g0.close()
        g1.close()


def _told_pair() -> tuple[list[list[str]], tuple[Group, Group]]:
    """Two ranks whose ``on_break`` calls are recorded (the calling thread's name)."""
    listeners = [bind("127.0.0.1:0") for _ in range(2)]
    addresses = [lst.address for lst in listeners]
    told: list[list[str]] = [[], []]
    groups: list[Group | None] = [None, None]

    def build(rank: int) -> None:
        groups[rank] = Group(rank, addresses, b"s" * 32, listener=listeners[rank],
                             options=CommOptions(timeout_s=30.0),
                             on_break=lambda: told[rank].append(threading.current_thread().name))  # fmt: skip

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    g0, g1 = groups
    assert g0 is not None and g1 is not None
    return told, (g0, g1)

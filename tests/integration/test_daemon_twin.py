"""Twin regions through the daemon (issue 17 item 1; docs/daemon.md, "Twin regions").

A large all-reduce on shared memory is reduced by the daemon into a twin memfd that the
client maps too; on success the daemon and then the client exchange the array's pages
between their two mappings. Checked here with two members in embedded mode (real
daemons, real Unix sockets, real TCP, one process; each side's mappings are its own,
so the exchanges are made separately, as between two processes):

* results are right after the exchange, op after op, with the array written by the
  caller between ops, chained (each op's input is the last op's result, read by the
  daemon through its own mapping), pipelined async ops on the same array, and a slice
  whose first and last page are shared with bytes that must keep their values;
* promise 2: an op that fails mid-way (a corrupt frame from the peer after partial
  sums reached the twin, sent with zero-copy on or off) leaves the caller's array
  exactly as it was, a twin that left spliced gets fresh pages (a peer may still read
  the old ones), and the group goes on with the right result, on huge pages again
  where the kernel gives them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.comm import CommOptions, zerocopy
from phalanx.config import PhalanxConfig
from phalanx.local import shm
from phalanx.local.protocol import REPLY_BASE, Kind, WireFrame
from phalanx.testing.faults import SEQ_OFFSET, At, Delay, Fault, FaultInjector, FlipHeaderByte
from tests._smaps import pmd_mapped_kib
from tests.integration._pairs import embedded_pair

pytestmark = pytest.mark.timeout(120)

N = 3 << 20  # float32 elements: 12 MiB, above the 4 MiB twin threshold


@pytest.fixture
def pair() -> Iterator[tuple[phalanx.Client, phalanx.Client]]:
    with embedded_pair() as clients:
        yield clients


def _both(fa: Callable[[], Any], fb: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``fa`` here and ``fb`` on a thread (both members must call); their results,
    or the first exception."""
    out: list[Any] = [None]
    err: list[BaseException] = []

    def run_b() -> None:
        try:
            out[0] = fb()
        except BaseException as exc:  # re-raised below
            err.append(exc)

    t = threading.Thread(target=run_b)
    t.start()
    try:
        ra = fa()
    finally:
        t.join(60)
    assert not t.is_alive()
    if err:
        raise err[0]
    return ra, out[0]


def test_results_are_right_after_each_exchange_op_after_op(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    a, b = pair
    xa, xb = a.empty(N, "float32"), b.empty(N, "float32")
    rng = np.random.default_rng(7)
    for i in range(6):
        if i % 2 == 0:  # written by the caller (its own mapping) between ops
            xa[:] = rng.integers(-1000, 1000, N).astype(np.float32)
            xb[:] = rng.integers(-1000, 1000, N).astype(np.float32)
        expect = xa + xb  # else: chained, the input is the last op's result
        ra, rb = _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))
        assert ra.in_twin and rb.in_twin, "the op did not go through the twin region"
        assert np.array_equal(xa, expect), f"op {i}: a's result is wrong"
        assert np.array_equal(xb, expect), f"op {i}: b's result is wrong"

    # pipelined: the second op (same array) must read the first one's result in the
    # daemon's mapping before the client has even read the first reply
    x0 = xa + xb
    ha1 = a.all_reduce(xa, async_op=True)
    ha2 = a.all_reduce(xa, async_op=True)
    hb1, hb2 = b.all_reduce(xb, async_op=True), b.all_reduce(xb, async_op=True)
    for h in (ha2, ha1, hb2, hb1):  # waited out of order on purpose
        assert h.wait(60.0).in_twin
    assert np.array_equal(xa, 2 * x0) and np.array_equal(xb, 2 * x0)

    # a slice that starts and ends inside pages: the bytes around it keep their values
    ya, yb = xa[3 : N - 5], xb[3 : N - 5]
    around_a = (xa[:3].copy(), xa[N - 5 :].copy())
    around_b = (xb[:3].copy(), xb[N - 5 :].copy())
    xb[3 : N - 5] = rng.integers(0, 4000, N - 8).astype(np.float32)
    expect = np.maximum(ya, yb)
    ra, rb = _both(lambda: a.all_reduce(ya, op="max"), lambda: b.all_reduce(yb, op="max"))
    assert ra.in_twin and rb.in_twin
    assert np.array_equal(ya, expect) and np.array_equal(yb, expect)
    assert np.array_equal(xa[:3], around_a[0]) and np.array_equal(xa[N - 5 :], around_a[1])
    assert np.array_equal(xb[:3], around_b[0]) and np.array_equal(xb[N - 5 :], around_b[1])
    # and a whole-array op after the slice op sees both sides' pages consistently
    expect = xa + xb
    _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))
    assert np.array_equal(xa, expect) and np.array_equal(xb, expect)


def test_a_small_or_copied_array_does_not_use_a_twin(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    a, b = pair
    small_a, small_b = a.empty(1000, "float32"), b.empty(1000, "float32")
    small_a[:], small_b[:] = 1.0, 2.0
    ra, _ = _both(lambda: a.all_reduce(small_a), lambda: b.all_reduce(small_b))
    assert not ra.in_twin and np.all(small_a == 3.0)
    plain_a, plain_b = np.full(N, 1.0, np.float32), np.full(N, 2.0, np.float32)
    ra, _ = _both(lambda: a.all_reduce(plain_a), lambda: b.all_reduce(plain_b))
    assert not ra.in_twin and not ra.zero_copy and np.all(plain_a == 3.0)


def test_pages_pinned_for_a_device_are_never_exchanged(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    a, b = pair
    xa, xb = a.empty(N, "float32"), b.empty(N, "float32")
    xa[:], xb[:] = 1.0, 2.0
    addr = int(xa.ctypes.data)
    shm.mark_pinned(addr, xa.nbytes)  # what cuda.pin records after cudaHostRegister
    try:
        ra, rb = _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))
    finally:
        shm.unmark_pinned(addr)
    assert not ra.in_twin and rb.in_twin
    assert np.all(xa == 3.0) and np.all(xb == 3.0)


@pytest.mark.parametrize("spliced", [True, False], ids=["zero-copy", "sendmsg"])
def test_an_op_failing_midway_leaves_the_array_as_it_was(
    spliced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # zero-copy sends are off by default (comm/options.py): both ways must keep promise 2
    if spliced and not zerocopy.available():
        pytest.skip("no vmsplice/splice here: every frame goes out with sendmsg")
    comm = CommOptions(zero_copy_min_bytes=(256 << 10) if spliced else 0)
    with embedded_pair(config=PhalanxConfig(comm=comm)) as pair:
        _fail_midway_then_go_on(pair, spliced, monkeypatch)


def _fail_midway_then_go_on(
    pair: tuple[phalanx.Client, phalanx.Client], spliced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    detached: list[tuple[int, int]] = []
    real_detach = zerocopy.detach

    def spy(address: int, nbytes: int) -> None:
        detached.append((address, nbytes))
        real_detach(address, nbytes)

    monkeypatch.setattr(zerocopy, "detach", spy)
    xa, xb = a.empty(N, "float32"), b.empty(N, "float32")
    xa[:] = np.arange(N, dtype=np.float32) % 1000
    xb[:] = 7.0
    before = xa.copy()
    # b's engine holds its third frame of the next op to a (the first of the
    # all-gather) back for 0.5 s and corrupts the header of the fourth: a has by then
    # received partial sums into its twin and sent its chunk's sum on from there
    # (spliced with zero-copy on, comm/zerocopy.py), and fails on the corrupt frame
    assert b.daemon is not None
    engine = b.daemon.monitor._engine  # reaches into b's data plane
    assert engine is not None
    injector = FaultInjector(
        Fault(At(ordinal=2), Delay(0.5)), Fault(At(ordinal=3), FlipHeaderByte(SEQ_OFFSET))
    )
    engine.frame_hook = injector  # type: ignore[attr-defined]

    def fail_b() -> BaseException | None:
        try:
            b.all_reduce(xb, timeout=10.0)
        except phalanx.PhalanxError as exc:
            return exc
        return None

    with pytest.raises((phalanx.PhalanxError, TimeoutError)):
        _both(lambda: a.all_reduce(xa, timeout=10.0), fail_b)
    assert len(injector.fired) == 2, "the faults never fired: the op did not fail mid-way"
    assert np.array_equal(xa, before), "a failed op changed the caller's array"
    ref = a._locate(xa)
    assert ref is not None
    region, twin = a._regions[ref.region], a._twins[ref.region]
    assert twin is not None
    huge = twin.huge  # collapsed at its first use, where this kernel can
    if spliced:
        # a's chunk's sum left its twin spliced, so the failed op gave the twin fresh
        # pages, seen by both processes: b may still be reading the old ones, which the
        # next op's partial sums must not overwrite (detached: the daemons' own mappings)
        assert xa.nbytes in [n for _, n in detached], detached
        assert not np.any(twin.bytes[: xa.nbytes]), "the twin kept pages a peer may still read"
    else:  # nothing left spliced: no peer reads the twin's pages, which it keeps
        assert detached == [], detached
    # the group goes on (rebuilt if it must): the next op's result is right
    expect = xa + 7.0
    xb[:] = 7.0
    _both(
        lambda: a.all_reduce(xa, retry=True, timeout=30.0),
        lambda: b.all_reduce(xb, retry=True, timeout=30.0),
    )
    assert np.array_equal(xa, expect) and np.array_equal(xb, expect)
    if huge:
        # the fresh pages were small; the client collapsed them again before the op,
        # so after its exchange the array and its twin are huge pages, as before
        assert twin.huge
        assert pmd_mapped_kib(region.base) == region.size // 1024
        assert pmd_mapped_kib(twin.base) == twin.size // 1024


def test_a_twin_over_the_clients_memory_budget_is_refused_and_the_op_runs_without() -> None:
    """The twin would take the client over ``max_client_shm_bytes``: the daemon refuses
    it with a typed error, the op runs in place (right result), the connection stays
    up; an array over the budget is refused the same way."""
    with embedded_pair(config=PhalanxConfig(max_client_shm_bytes=20 << 20)) as (a, b):
        xa, xb = a.empty(N, "float32"), b.empty(N, "float32")  # 12 MiB of 20: no twin
        xa[:], xb[:] = 1.0, 2.0
        ra, rb = _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))
        assert not ra.in_twin and not rb.in_twin
        assert np.all(xa == 3.0) and np.all(xb == 3.0)
        with pytest.raises(phalanx.LimitExceeded, match="max_client_shm_bytes"):
            a.empty(N, "float32")
        ra, rb = _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))  # still usable
        assert np.all(xa == 6.0) and np.all(xb == 6.0)


def test_polling_done_alone_sees_the_op_end(pair: tuple[phalanx.Client, phalanx.Client]) -> None:
    """A loop that only polls ``Handle.done()`` must see the op end (and get the
    result's pages): done() gave up before reading the socket, so it stayed False
    until the op's deadline had passed (~2 minutes by default)."""
    a, b = pair
    xa, xb = a.empty(N, "float32"), b.empty(N, "float32")
    xa[:], xb[:] = 1.0, 2.0
    ha = a.all_reduce(xa, async_op=True)
    b.all_reduce(xb)
    deadline = time.monotonic() + 10.0
    while not ha.done():
        assert time.monotonic() < deadline, "done() never became True"
        time.sleep(0.01)
    assert ha.wait(0.0).in_twin and np.all(xa == 3.0)


def test_a_first_large_op_while_another_runs_does_not_wait_to_map_its_twin(
    pair: tuple[phalanx.Client, phalanx.Client],
) -> None:
    """An async op waits for a slow peer; the first large op on another array must not
    block its caller on the twin's MAP, which the daemon would answer only after the
    running op (or never, past the 10 s control timeout: TimeoutError). It goes
    without a twin; the next op on that array maps one."""
    a, b = pair
    x1a, x1b = a.empty(N, "float32"), b.empty(N, "float32")
    x2a, x2b = a.empty(N, "float32"), b.empty(N, "float32")
    x1a[:], x1b[:], x2a[:], x2b[:] = 1.0, 2.0, 10.0, 20.0
    h1 = a.all_reduce(x1a, async_op=True)  # b joins it 3 s later
    t0 = time.monotonic()
    h2 = a.all_reduce(x2a, async_op=True)
    assert time.monotonic() - t0 < 2.0, "the call waited for the running op"
    time.sleep(3.0 - (time.monotonic() - t0))
    b.all_reduce(x1b)
    b.all_reduce(x2b)
    h1.wait(30.0)
    assert np.all(x1a == 3.0)
    assert not h2.wait(30.0).in_twin and np.all(x2a == 30.0)
    ra, _ = _both(lambda: a.all_reduce(x2a), lambda: b.all_reduce(x2b))
    assert ra.in_twin and np.all(x2a == 60.0) and np.all(x2b == 60.0)


def test_ops_in_flight_when_the_clients_exchange_fails_do_not_report_stale_results(
    pair: tuple[phalanx.Client, phalanx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's page exchange is refused once (as when mremap fails in the
    training process only) while a second op on the same array is already sent: the
    two processes' mappings now differ, so neither op may report success with bytes
    other than the peer's. The second op used to be exchanged anyway and report
    success with the first op's result in the array."""
    import phalanx.client as client_module

    a, b = pair
    xa, xb = a.empty(N, "float32"), b.empty(N, "float32")
    xa[:], xb[:] = 1.0, 2.0
    _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))  # the twins exist now
    real, calls = shm.exchange, []
    region = a._regions[next(iter(a._twins))]

    def refuse_once(*args: Any, **kwargs: Any) -> bool:
        if args[0] is region:
            calls.append(1)
            if len(calls) == 1:
                return False
        return bool(real(*args, **kwargs))

    monkeypatch.setattr(client_module, "exchange", refuse_once)
    handles = [a.all_reduce(xa, async_op=True) for _ in range(2)]
    for _ in range(2):
        b.all_reduce(xb)
    assert np.all(xb == 12.0)
    failed = 0
    for h in handles:
        try:
            h.wait(30.0)
        except phalanx.DaemonUnavailable:
            failed += 1
        else:
            assert np.all(xa == 12.0), "an op reported success with a stale array"
    assert calls and failed >= 1


def test_a_retried_op_marks_its_twin_for_collapsing_again(
    pair: tuple[phalanx.Client, phalanx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op whose first attempt failed after splicing from the twin, and whose retry
    succeeded, answers with an OpResult (failed_attempts > 0), yet the failed attempt
    gave the twin fresh small pages: the next op must collapse it again, as after a
    failure. (Reply bookkeeping only: the reply is built here; a retried twin op with
    a spliced failure has no deterministic trigger between two embedded members.)"""
    a, b = pair
    xa, xb = a.empty(N, "float32"), b.empty(N, "float32")
    _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))  # the twins exist now
    ref = a._locate(xa)
    assert ref is not None
    region, twin = a._regions[ref.region], a._twins[ref.region]
    assert twin is not None
    collapsed: list[bool] = []
    real = type(twin).collapse

    def spy(self: shm.Region, again: bool = False) -> bool:
        if self is twin:
            collapsed.append(again)
        return bool(real(self, again=again))

    monkeypatch.setattr(type(twin), "collapse", spy)
    rid = 10**9  # a request id never sent
    a._twin_ops[rid] = (region, twin, ref)
    retried = phalanx.OpResult(
        op="all_reduce", seq=1, epoch=2, algorithm="ring", nbytes=xa.nbytes, codec="none",
        world=2, wire_bytes_sent=0, wire_bytes_recv=0, duration_s=0.1, contributors=("0", "1"),
        failed_attempts=1, in_twin=False,
    )  # fmt: skip
    a._on_reply(WireFrame(REPLY_BASE + int(Kind.OP), rid, retried))
    _both(lambda: a.all_reduce(xa), lambda: b.all_reduce(xb))
    assert collapsed == [True], collapsed

"""Members agree on the layout of a gather or reduce-scatter before any byte moves.

A gather/reduce-scatter buffer is laid out for one view (its world, this member's
rank). If a view change lands between one member's layout and its submit while a
peer laid out for the new view, the op used to run with the two laid out for
different views: the stale member raised, but its peers accepted a result holding its
chunk in the wrong slot. The layout's epoch now travels with the op (the client's
``layout_epoch``, ``OpSpec.layout``) into its descriptor, so members that disagree all
fail the op (``OpMismatch`` naming ``layout``; the ProcessGroup raises ``ViewChanged``)
with their arrays untouched, and the group goes on.

Real data-plane groups, embedded daemons and ProcessGroups in this process; the race
is made deterministic by holding one member between its layout and its submit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import phalanx
from phalanx.comm import Group
from phalanx.errors import OpMismatch
from phalanx.ops import OpResult, OpSpec
from tests.integration._pairs import embedded_pair, pair

pytestmark = pytest.mark.timeout(240)

N = 6  # elements per member


def _both(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` at the same time; each one's result or exception."""
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a member never returned"
    return out


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _layout_mismatch(exc: object) -> OpMismatch:
    assert isinstance(exc, OpMismatch), exc
    assert "layout" in exc.fields, exc.fields
    return exc


# ----------------------------------------------------------------------------- data plane
@pytest.fixture
def groups() -> Iterator[tuple[Group, Group]]:
    g0, g1 = pair(timeout_s=20)
    try:
        yield g0, g1
    finally:
        g0.close()
        g1.close()


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter"])
def test_ranks_tagged_for_different_views_all_fail_and_go_on(
    groups: tuple[Group, Group], kind: str
) -> None:
    xs = [np.arange(2 * N, dtype=np.float32) + 100 * r for r in range(2)]
    before = [x.copy() for x in xs]
    out = _both(*(lambda r=r: groups[r].run(OpSpec(kind, layout=5 + r), xs[r]) for r in range(2)))
    for r in range(2):
        err = _layout_mismatch(out[r])
        assert err.fields == ("layout",)
        assert "layout=5" in err.descriptors[0] and "layout=6" in err.descriptors[1]
        np.testing.assert_array_equal(xs[r], before[r])
    # the same tag on both: the group is usable, the op runs
    out = _both(*(lambda r=r: groups[r].run(OpSpec(kind, layout=6), xs[r]) for r in range(2)))
    assert all(isinstance(o, OpResult) for o in out), out
    if kind == "all_gather":
        want = np.concatenate([before[0][:N], before[1][N:]])
        for x in xs:
            np.testing.assert_array_equal(x, want)
    else:
        total = before[0] + before[1]
        np.testing.assert_array_equal(xs[0][:N], total[:N])
        np.testing.assert_array_equal(xs[1][N:], total[N:])


def test_a_tagged_and_an_untagged_rank_disagree(groups: tuple[Group, Group]) -> None:
    xs = [np.full(2 * N, r + 1, dtype=np.float32) for r in range(2)]
    out = _both(
        lambda: groups[0].run(OpSpec("all_gather", layout=3), xs[0]),
        lambda: groups[1].run(OpSpec("all_gather"), xs[1]),
    )
    for r in range(2):
        _layout_mismatch(out[r])
        np.testing.assert_array_equal(xs[r], np.full(2 * N, r + 1, dtype=np.float32))


# ----------------------------------------------------------------------------- client API
@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter"])
def test_clients_that_laid_out_for_different_views_both_get_a_typed_error(kind: str) -> None:
    """Member a laid its buffer out for the view before the current one, b for the
    current one (what a view change between a's layout and its submit leaves): both
    get ``OpMismatch`` on ``layout``, not one success with a's chunk in a wrong slot;
    both buffers hold their input; the next op, tagged alike, succeeds."""
    with embedded_pair() as (a, b):
        epoch = a.view().epoch
        assert b.view().epoch == epoch
        bufs = [a.empty((2 * N,), "float32"), np.zeros(2 * N, dtype=np.float32)]  # shm, staged
        for r, buf in enumerate(bufs):
            buf[:] = np.arange(2 * N) + 100 * r
        before = [buf.copy() for buf in bufs]

        def call(c: phalanx.Client, buf: np.ndarray, tag: int) -> Any:
            if kind == "all_gather":
                return c.all_gather(buf, layout_epoch=tag, timeout=30)
            return c.reduce_scatter(buf, layout_epoch=tag, timeout=30)

        out = _both(lambda: call(a, bufs[0], epoch - 1), lambda: call(b, bufs[1], epoch))
        for r in range(2):
            err = _layout_mismatch(out[r])
            assert f"layout={epoch - 1}" in str(err) and f"layout={epoch}" in str(err)
            np.testing.assert_array_equal(bufs[r], before[r])
        assert a.view().epoch == b.view().epoch == epoch  # a caller's mistake: no view change
        out = _both(lambda: call(a, bufs[0], epoch), lambda: call(b, bufs[1], epoch))
        assert all(isinstance(o, OpResult) and o.epoch == epoch for o in out), out
        ra, rb = a.view().rank, b.view().rank
        assert {ra, rb} == {0, 1}
        if kind == "all_gather":
            want = np.empty(2 * N, dtype=np.float32)
            for r, rank in ((0, ra), (1, rb)):
                assert rank is not None
                want[rank * N : (rank + 1) * N] = before[r][rank * N : (rank + 1) * N]
            for buf in bufs:
                np.testing.assert_array_equal(buf, want)
        else:
            total = before[0] + before[1]
            for r, rank in ((0, ra), (1, rb)):
                assert rank is not None
                part = slice(rank * N, (rank + 1) * N)
                np.testing.assert_array_equal(bufs[r][part], total[part])


def test_the_daemon_runs_an_agreed_tag_in_its_current_view() -> None:
    """The daemon never refuses an op for its tag alone (a member that did would leave
    its peers waiting for it): members that agree on a stale tag run the op, and the
    result's epoch tells them it ran in another view than their layout's."""
    with embedded_pair() as (a, b):
        epoch = a.view().epoch
        xs = [np.full(2 * N, r + 1.0, dtype=np.float32) for r in range(2)]
        out = _both(
            lambda: a.all_gather(xs[0], layout_epoch=epoch - 1, timeout=30),
            lambda: b.all_gather(xs[1], layout_epoch=epoch - 1, timeout=30),
        )
        assert all(isinstance(o, OpResult) and o.epoch == epoch for o in out), out


# ----------------------------------------------------------------------------- ProcessGroup
def _start_in_order(secret: bytes) -> list[phalanx.Client]:
    """x (with the coordinator), y, s joined one after the other: view [x, y, s]."""
    x = phalanx.start(secret=secret, member_id="x")
    members = [x]
    try:
        for name in ("y", "s"):
            members.append(
                phalanx.start(coordinator=x.coordinator_address, secret=secret, member_id=name)
            )
            ids = tuple(m.member_id for m in members)

            def joined(ids: tuple[str, ...] = ids) -> bool:
                return all(m.view().members == ids for m in members)

            _wait(joined, f"no view {ids}")
    except BaseException:
        for m in reversed(members):
            m.close()
        raise
    return members


@pytest.mark.parametrize("kind", ["gather", "reduce_scatter"])
def test_a_stale_member_fails_the_op_on_every_member(secret: bytes, kind: str) -> None:
    """View [x, y, s]; s reads its layout (world 3, rank 2), then y leaves and z joins:
    view [x, s, z], the same world, s now rank 1. x and z lay out for the new view and
    s submits its stale buffer. Before, only s raised: x and z returned a gather
    holding s's pooled buffer's zeros where s's chunk belongs (s's data sat at its old
    rank's offset), and a reduce-scatter that had run with a member laid out for
    another view. Now every member raises ``ViewChanged``, every output untouched,
    nobody is evicted, and the next op is right."""
    from phalanx.errors import ViewChanged
    from phalanx.torch.process_group import ProcessGroup

    torch = pytest.importorskip("torch")
    x, y, s = _start_in_order(secret)
    members: dict[str, phalanx.Client] = {"x": x, "y": y, "s": s}
    try:
        pgs = {name: ProcessGroup(members[name], timeout=30) for name in ("x", "s")}
        laid_out, submit = threading.Event(), threading.Event()
        take = pgs["s"]._take_buf

        def held(numel: int, dtype: Any) -> Any:
            laid_out.set()  # s read its layout: now the view changes
            assert submit.wait(60)
            return take(numel, dtype)

        pgs["s"]._take_buf = held  # type: ignore[method-assign]

        def value(name: str) -> float:
            return {"x": 1.0, "s": 2.0, "z": 3.0}[name]

        outs: dict[str, Any] = {}

        def op(name: str) -> Any:
            pg = pgs[name]
            if kind == "gather":
                out = outs[name] = torch.full((3 * N,), -1.0)
                pg.all_gather_single(out, torch.full((N,), value(name))).wait()
            else:
                out = outs[name] = torch.full((N,), -1.0)
                inp = torch.arange(3 * N, dtype=torch.float32) * value(name)
                pg.reduce_scatter_single(out, inp).wait()
            return out

        stale: list[Any] = []
        t = threading.Thread(target=lambda: stale.extend(_both(lambda: op("s"))), daemon=True)
        t.start()
        assert laid_out.wait(60)
        assert pgs["s"].rank() == 2 and pgs["s"].size() == 3
        y.close()
        del members["y"]
        _wait(lambda: x.view().world == 2 and s.view().world == 2, "y never left")
        members["z"] = phalanx.start(
            coordinator=x.coordinator_address, secret=secret, member_id="z"
        )
        pgs["z"] = ProcessGroup(members["z"], timeout=30)
        _wait(
            lambda: all(m.view().members == ("x", "s", "z") for m in members.values()),
            "no view [x, s, z]",
        )
        fresh: list[Any] = []
        t2 = threading.Thread(
            target=lambda: fresh.extend(_both(lambda: op("x"), lambda: op("z"))), daemon=True
        )
        t2.start()
        time.sleep(0.5)  # x and z submitted (and wait for s): now s submits its stale op
        submit.set()
        t.join(120)
        t2.join(120)
        assert not t.is_alive() and not t2.is_alive()
        outcomes = {"s": stale[0], "x": fresh[0], "z": fresh[1]}
        for name, got in outcomes.items():
            assert isinstance(got, ViewChanged), (kind, name, got)
            assert bool((outs[name] == -1.0).all()), (name, outs[name])
        # a layout disagreement is no failure of anyone: nobody was evicted
        assert all(m.view().members == ("x", "s", "z") for m in members.values())

        del pgs["s"]._take_buf
        names = ("x", "s", "z")
        again = dict(zip(names, _both(*(lambda n=n: op(n) for n in names)), strict=True))
        for name in ("x", "s", "z"):
            assert isinstance(again[name], torch.Tensor), (name, again[name])
        if kind == "gather":
            want = torch.cat([torch.full((N,), value(n)) for n in ("x", "s", "z")])
            for name in ("x", "s", "z"):
                assert torch.equal(again[name], want), (name, again[name])
        else:
            total = torch.arange(3 * N, dtype=torch.float32) * 6.0
            for rank, name in enumerate(("x", "s", "z")):
                assert torch.equal(again[name], total[rank * N : (rank + 1) * N]), name
    finally:
        for name in ("z", "s", "y", "x"):
            if name in members:
                members[name].close()

"""phalanx.torch's Manager with one embedded daemon in the test process: the step
protocol's local rules, quickly (no faults between processes here: see
test_torch_faults.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import phalanx  # noqa: E402
from phalanx.errors import DaemonUnavailable, PeerFailure  # noqa: E402
from phalanx.torch import Manager, OptimizerWrapper, StateLayoutError  # noqa: E402


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    client = phalanx.start()
    yield client
    client.close()


def _net(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2))  # fmt: skip


def _data(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(12, 4, generator=g), torch.randint(0, 2, (12,), generator=g)


def test_alone_it_trains_exactly_like_plain_torch(pg: Any) -> None:
    ref, net = _net(), _net()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 2, 0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    mgr = Manager(pg, net, opt, scheduler=sched, global_batch=12)
    try:
        for step in range(5):
            x, y = _data(step)
            ref_opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            ref_opt.step()
            ref_sched.step()
            s = mgr.begin_step()
            assert (s.step, s.world, s.shard()) == (step, 1, slice(0, 12))
            torch.nn.functional.cross_entropy(net(x[s.shard()]), y[s.shard()]).backward()
            assert mgr.commit()
        for a, b in zip(ref.state_dict().values(), net.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.0025
        assert mgr.step == 5 and mgr.stats["commits"] == 5
    finally:
        mgr.close()


def test_a_failed_collective_drops_the_attempt_and_nothing_is_applied(pg: Any) -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    mgr = Manager(pg, net, opt, scheduler=sched, global_batch=12, bucket_cap_mb=0.0001)
    real = pg.all_reduce
    try:
        x, y = _data(0)
        before = {k: v.clone() for k, v in net.state_dict().items()}

        def failing(*a: Any, **kw: Any) -> Any:
            raise PeerFailure(op="all_reduce", seq=1, epoch=1, suspects=[], reason="timeout")

        s = mgr.begin_step()
        pg.all_reduce = failing  # every bucket's submission fails, inside backward
        torch.nn.functional.cross_entropy(net(x), y).backward()  # no error crosses autograd
        pg.all_reduce = real
        assert not mgr.commit()
        assert "PeerFailure" in mgr.stats["last_failure"]
        # nothing applied: parameters, BatchNorm statistics, momentum, LR
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not opt.state and opt.param_groups[0]["lr"] == 0.1
        s2 = mgr.begin_step()
        assert s2.step == s.step and s2.attempt == 2  # the same step, redone
        torch.nn.functional.cross_entropy(net(x), y).backward()
        assert mgr.commit() and mgr.step == 1 and opt.param_groups[0]["lr"] == 0.05
        # a gone daemon is not transient: its typed error reaches the loop, not a RuntimeError
        mgr.begin_step()

        def gone(*a: Any, **kw: Any) -> Any:
            raise DaemonUnavailable("the daemon died", socket=pg.socket)

        pg.all_reduce = gone
        torch.nn.functional.cross_entropy(net(x), y).backward()
        with pytest.raises(DaemonUnavailable):
            mgr.commit()
    finally:
        pg.all_reduce = real
        mgr.close()


def test_micro_batches_and_the_optimizer_wrapper(pg: Any) -> None:
    one, acc = _net(), _net()
    opt1 = torch.optim.SGD(one.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(acc.parameters(), lr=0.1)
    m1 = Manager(pg, one, opt1, global_batch=12, job="one")
    m1.close()  # (its state is replaced by the next manager's: one job per daemon)
    m2 = Manager(pg, acc, opt2, global_batch=12, job="acc")
    w = OptimizerWrapper(m2)
    try:
        x, y = _data(3)
        opt1.zero_grad()
        (torch.nn.functional.cross_entropy(one[0:1](x).sum(1, keepdim=True).repeat(1, 2), y)
         ).backward()  # fmt: skip
        w.zero_grad()
        assert w.context.step == 0
        with m2.no_sync():  # two micro-batches, one all-reduce
            for half in (slice(0, 6), slice(6, 12)):
                out = acc[0:1](x[half]).sum(1, keepdim=True).repeat(1, 2)
                (torch.nn.functional.cross_entropy(out, y[half]) / 2).backward()
        assert w.step()
        opt1.step()
        torch.testing.assert_close(acc[0].weight, one[0].weight, rtol=1e-5, atol=1e-6)
        assert w.param_groups[0]["lr"] == 0.1  # the wrapped optimizer's
    finally:
        m2.close()


def test_optimizers_that_need_a_closure_are_refused(pg: Any) -> None:
    net = _net()
    with pytest.raises(StateLayoutError):
        Manager(pg, net, torch.optim.LBFGS(net.parameters()))


def test_a_second_backward_after_the_gradients_were_sent_is_refused(pg: Any) -> None:
    """Two backward() calls in one step outside no_sync(): the first sends its buckets
    (summed and scaled in place), the second adds this member's raw gradient on top,
    so members would commit different gradients and their replicas drift apart. The
    commit raises ConfigError instead and applies nothing; the next step trains."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mgr = Manager(pg, net, opt, global_batch=12, job="twice")
    try:
        before = [p.detach().clone() for p in net.parameters()]
        x, y = _data(0)
        mgr.begin_step()
        torch.nn.functional.cross_entropy(net(x[:6]), y[:6]).backward()
        torch.nn.functional.cross_entropy(net(x[6:]), y[6:]).backward()
        with pytest.raises(phalanx.ConfigError, match="no_sync"):
            mgr.commit()
        for a, b in zip(before, net.parameters(), strict=True):
            assert torch.equal(a, b.detach())
        s = mgr.begin_step()
        torch.nn.functional.cross_entropy(net(x[s.shard()]), y[s.shard()]).backward()
        assert mgr.commit()
    finally:
        mgr.close()


def test_a_replay_never_mixes_the_kept_gradients_of_two_attempts(pg: Any) -> None:
    """partial=True keeps each bucket's own gradient as it goes out, for a replay in a
    smaller view. An attempt that fails at its first bucket keeps nothing new for the
    later buckets: their copies are the previous attempt's, and a replay must refuse
    (it used to commit the mix, no error)."""
    from phalanx.ops import Handle
    from phalanx.torch.gradsync import GradSync

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    gs = GradSync(pg, list(net.parameters()), cap_bytes=64, keep_local=True)
    try:
        assert len(gs.plan) >= 2
        gs.arm(1.0)  # attempt 1: every bucket goes out (and is kept)
        net(torch.randn(6, 4)).pow(2).sum().backward()
        gs.finish()
        gs.arm(1.0, replay=True)  # its replay has every bucket of attempt 1
        assert gs.restore_local()
        gs.drain()

        def failing(*args: Any, **kwargs: Any) -> Handle:
            def settle(wait: float | None) -> Any:
                raise PeerFailure(op="all_reduce", seq=1, epoch=2, suspects=[], reason="x")

            return Handle(settle)

        gs.arm(1.0)  # attempt 2: its first bucket fails, the others never go out
        real, pg.all_reduce = pg.all_reduce, failing
        try:
            net(torch.randn(6, 4)).pow(2).sum().backward()
            with pytest.raises(PeerFailure):
                gs.finish()
        finally:
            pg.all_reduce = real
        gs.arm(1.0, replay=True)
        assert not gs.restore_local()
    finally:
        gs.close()


def test_gathers_through_the_backend_reuse_their_shared_buffers(pg: Any) -> None:
    """dist.all_gather_single / reduce_scatter_single mapped a new shared region
    per call (in this process and in the daemon) and never unmapped it."""
    import torch.distributed as dist

    import phalanx.torch as pt

    pt.init_process_group(pg)
    try:
        t, out = torch.ones(1000), torch.empty(1000 * dist.get_world_size())
        dist.all_gather_single(out, t)
        dist.reduce_scatter_single(torch.empty(1000), out)
        regions = len(pg._regions)
        for _ in range(50):
            dist.all_gather_single(out, t)
            part = torch.empty(1000)
            dist.reduce_scatter_single(part, out)
        assert torch.equal(part, torch.full((1000,), float(dist.get_world_size())))
        assert len(pg._regions) == regions
    finally:
        dist.destroy_process_group()


def test_a_bfloat16_model_with_batchnorm_commits(pg: Any) -> None:
    """Its running statistics are bfloat16, which numpy lacks: the buffer all-reduce
    raised torch's TypeError out of every commit."""
    net = _net().to(torch.bfloat16)
    mgr = Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), global_batch=12,
                  job="bf16")  # fmt: skip
    try:
        x, _ = _data(0)
        for _ in range(2):
            mgr.begin_step()
            net(x.to(torch.bfloat16)).float().pow(2).mean().backward()
            assert mgr.commit()
        stats = net[1].running_mean
        assert stats.dtype == torch.bfloat16 and bool(stats.abs().sum() > 0)
    finally:
        mgr.close()


def test_a_commit_that_fails_after_the_vote_does_not_let_the_step_run_twice(pg: Any) -> None:
    """The plain values outgrow meta_bytes: capture() raises after optimizer.step()
    moved the weights. The next begin_step used to redo the same step on the moved
    weights (applied twice); now the manager refuses to go on, saying why."""
    from phalanx.torch import StateLayoutError

    net = _net()
    user: dict[str, Any] = {"log": ""}
    mgr = Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.5), user_state=user,
                  global_batch=12, meta_bytes=4096, job="overflow")  # fmt: skip
    try:
        x, y = _data(0)
        mgr.begin_step()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        with pytest.raises(StateLayoutError):
            mgr.commit(apply=lambda: user.update(log="x" * 5000))
        user["log"] = ""
        with pytest.raises(phalanx.ConfigError, match="committed by the group"):
            mgr.begin_step()
    finally:
        mgr.close()


def test_close_unmaps_the_managers_op_buffers(pg: Any) -> None:
    """Gradient buckets, buffer ops and the opening slots stayed mapped (here and in
    the daemon) after close(): a loop of managers grew without bound. The state's
    regions go too (the daemon keeps its own mappings and serves the state until a
    new attach replaces it), and the gradients stay readable (this process's memory
    lives while tensors view it)."""
    before = len(pg._regions)
    net = _net()
    mgr = Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), global_batch=12,
                  job="close")  # fmt: skip
    x, y = _data(0)
    mgr.begin_step()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert mgr.commit()
    mapped = len(pg._regions) - before
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    mgr.close()
    kept = len(pg._regions) - before
    assert kept == 0, (mapped, kept)  # buckets, buffer ops, opening slots, the state
    after = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, after, strict=True))
    mgr.close()  # idempotent


def test_a_bad_codec_is_refused_when_the_manager_is_made(pg: Any) -> None:
    net = _net()
    with pytest.raises(phalanx.ConfigError):
        Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), codec="bogus")


def test_a_closed_hook_submits_nothing(pg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """allreduce_hook submitted its op before finding the state closed: an op nobody
    waits for (its staging memory never back) while ConfigError was raised."""
    from phalanx.torch.hook import HookState, allreduce_hook

    class Bucket:
        def buffer(self) -> Any:
            return torch.ones(8)

    calls: list[object] = []
    monkeypatch.setattr(pg, "all_reduce", lambda *a, **k: calls.append(a))
    state = HookState(pg)
    state.close()
    with pytest.raises(phalanx.ConfigError, match="closed"):
        allreduce_hook(state, Bucket())
    assert calls == []


def test_a_failed_work_still_waits_for_every_op() -> None:
    """_Work stopped at the first failing handle: the later ops of a multi-tensor call
    were never waited (their memory handed back while the daemon could still write)."""
    from phalanx.ops import Handle
    from phalanx.torch.process_group import _Work

    waited: list[int] = []

    def handle(i: int, fail: bool) -> Handle:
        def settle(timeout: float | None) -> Any:
            waited.append(i)
            if fail:
                raise PeerFailure(op="all_reduce", seq=i, epoch=1, suspects=[], reason="x")
            return None

        return Handle(settle)

    work = _Work([handle(0, True), handle(1, False), handle(2, True)], None, [])
    with pytest.raises(PeerFailure) as info:
        work.wait()
    assert waited == [0, 1, 2] and info.value.seq == 0


def _manager(client: Any, net: Any) -> Any:
    return Manager(client, net, torch.optim.SGD(net.parameters(), lr=0.1), global_batch=8,
                   op_timeout=8.0)  # fmt: skip


def _diloco(client: Any, net: Any) -> Any:
    from phalanx.torch import DiLoCo

    return DiLoCo(client, net, torch.optim.SGD(net.parameters(), lr=0.1), sync_every=2,
                  codec="none", op_timeout=8.0)  # fmt: skip


@pytest.mark.parametrize("make", [_manager, _diloco], ids=["manager", "diloco"])
def test_begin_step_keeps_its_timeout_when_a_peer_never_opens(make: Any) -> None:
    """The peer passed the daemon's begin_step but never reaches its opening op: the
    opening all-reduce (and, in DiLoCo, every op of the sync) used op_timeout (8 s
    here), not what was left of begin_step's 1 s."""
    import threading
    import time

    from phalanx.torch import StepTimeout
    from tests.integration._pairs import embedded_pair

    with embedded_pair() as (a, b):
        algo = make(a, _net())
        try:
            b.attach_state({"x": b.empty((4,), "float32")}, step=0)
            peer = threading.Thread(target=lambda: b.begin_step(timeout=20), daemon=True)
            peer.start()
            t0 = time.monotonic()
            with pytest.raises(StepTimeout):
                algo.begin_step(timeout=1.0)
            assert time.monotonic() - t0 < 4.0
            peer.join(25)
        finally:
            algo.close()


def test_a_diloco_sync_that_timed_out_runs_again_at_the_next_end_step() -> None:
    """Review, stop 30: end_step counted the inner step before its sync; when the sync
    raised StepTimeout, calling end_step again counted another inner step and, off the
    sync step, returned None: the retry silently skipped the sync (this member's
    delta never averaged; the peer waited for it in vain)."""
    import threading

    from phalanx.torch import StepTimeout
    from tests.integration._pairs import embedded_pair

    with embedded_pair() as (a, b):
        da, db = _diloco(a, _net()), _diloco(b, _net())
        try:
            opened = threading.Thread(target=lambda: db.begin_step(timeout=30))
            opened.start()
            da.begin_step(timeout=30)
            opened.join(35)
            for algo in (da, db):
                assert algo.end_step(timeout=10) is None  # inner step 1 of 2
                algo.begin_step()
            with pytest.raises(StepTimeout):
                da.end_step(timeout=1.0)  # b is not at the sync yet
            reports: list[Any] = []
            peer = threading.Thread(target=lambda: reports.append(db.end_step(timeout=30)))
            peer.start()
            again = da.end_step(timeout=30)  # the retry: the same sync
            peer.join(35)
            assert again is not None and reports and reports[0] is not None
            assert da.stats["inner_steps"] == db.stats["inner_steps"] == 2
        finally:
            da.close()
            db.close()

"""phalanx.torch's Manager: what a loop may do to the gradients, which parameters train,
and what the manager leaves behind (review of the torch path).

* backward() returns with the global gradient, so clipping between backward() and the
  commit keeps every member's replica identical (it used to clip a mix of reduced,
  in-flight and local buckets, differently on each member);
* a parameter whose requires_grad changed after the manager was built, or a stray
  .grad outside the bucket plan, is a ConfigError before anything is applied;
* partial=True never replays the raw local gradients once the loop has had (and
  clipped) the synced ones: the step is redone instead;
* close() and a failed constructor leave no shared region mapped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.utils.checkpoint import checkpoint  # noqa: E402

import phalanx  # noqa: E402
from phalanx.config import PhalanxConfig  # noqa: E402
from phalanx.errors import DaemonUnavailable, LimitExceeded, PeerFailure, StepAborted  # noqa: E402
from phalanx.membership.config import MembershipConfig  # noqa: E402
from phalanx.torch import Manager, OptimizerWrapper  # noqa: E402
from tests.integration._pairs import embedded_members, embedded_pair  # noqa: E402

_JOIN_S = 60.0  # every thread join / barrier wait is bounded by this
# A failure detector a loaded machine does not trip (heartbeats may lag by 2 s), for the
# tests whose subject is the one view change they make (a member leaving before its
# vote). With the default 0.6 s a CI run (stop 38) went through views 5 and 6 that the
# test never made -- by the log, most likely b's beats lagging under load: evicted,
# then back -- and the replay the test checks was never opened.
_STEADY = PhalanxConfig(membership=MembershipConfig(heartbeat_timeout=2.5, confirm_window=1.0))


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    client = phalanx.start()
    yield client
    client.close()


def _run_members(target: Any, names: str) -> None:
    """``target(name)`` on a thread per member; re-raises the first failure."""
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            target(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_JOIN_S)
    assert not any(t.is_alive() for t in threads), "a member did not finish in time"
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- 1. clip after backward
@pytest.mark.parametrize("shape", ["plain", "accumulated", "checkpointed"])
def test_clipping_right_after_backward_keeps_the_replicas_identical(shape: str) -> None:
    """A torchft-style loop: zero_grad / backward / clip_grad_norm_ / step. The clip
    used to see a mix of reduced, in-flight and local buckets (and wrote into pages the
    daemon was reducing): each member scaled differently and the replicas diverged.
    Also after micro-batches accumulated in no_sync() (the last backward's hooks found
    their parameters counted and queued no settle: the clip saw local gradients), and
    with reentrant activation checkpointing (its nested backward's end settled every
    bucket, and the outer backward's next hooks then failed the step)."""
    lock = threading.Lock()
    out: dict[str, dict[str, Any]] = {}
    with embedded_pair() as (a, b):
        clients = {"a": a, "b": b}

        mse = torch.nn.functional.mse_loss

        def member(name: str) -> None:
            with lock:
                torch.manual_seed(0)
                net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            mgr = Manager(clients[name], net, opt, global_batch=8, op_timeout=10,
                          bucket_cap_mb=0.02, job="clip")  # fmt: skip
            w = OptimizerWrapper(mgr)
            try:
                for step in range(3):
                    w.zero_grad()
                    s = w.context
                    g = torch.Generator().manual_seed(step)
                    x, y = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
                    xs, ys = x[s.shard()], y[s.shard()]
                    if shape == "accumulated":
                        with mgr.no_sync():
                            mse(net(xs[:1]) * 10, ys[:1]).backward()
                        mse(net(xs[1:]) * 10, ys[1:]).backward()
                    elif shape == "checkpointed":
                        h = net[:2](xs)  # the last two layers run (and backward) nested
                        top = checkpoint(net[2:], h, use_reentrant=True)
                        mse(top * 10, ys).backward()
                    else:
                        mse(net(xs) * 10, ys).backward()
                    assert mgr.grads._settled  # the global gradient once backward returns
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
                    assert w.step()
                out[name] = {k: v.detach().clone() for k, v in net.state_dict().items()}
                assert len(mgr.grads.plan) >= 3
            finally:
                mgr.close()

        _run_members(member, "ab")
    bad = [k for k in out["a"] if not torch.equal(out["a"][k], out["b"][k])]
    assert not bad, f"diverged: {bad}"


def test_a_failure_in_the_end_of_backward_wait_is_phalanx_s_error_at_commit(pg: Any) -> None:
    """The buckets are waited for before backward() returns, yet a failed op neither
    raises out of backward() (torch would wrap it in a RuntimeError) nor is lost:
    commit drops the attempt (PeerFailure), or raises DaemonUnavailable, as before."""
    from phalanx.ops import Handle

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in net.parameters()]
    mgr = Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), global_batch=6,
                  job="endwait")  # fmt: skip
    real = pg.all_reduce
    waited: list[str] = []

    def failing(error: BaseException) -> Any:
        def submit(*args: Any, **kwargs: Any) -> Handle:
            def settle(wait: float | None) -> Any:
                waited.append(type(error).__name__)
                raise error

            return Handle(settle)

        return submit

    try:
        x = torch.randn(6, 4)
        mgr.begin_step()
        pg.all_reduce = failing(
            PeerFailure(op="all_reduce", seq=1, epoch=1, suspects=[], reason="x")
        )
        net(x).pow(2).sum().backward()  # nothing crosses autograd
        assert waited == ["PeerFailure"]  # waited for inside backward(), not at commit
        pg.all_reduce = real
        assert not mgr.commit()
        assert "PeerFailure" in mgr.stats["last_failure"]
        assert all(
            torch.equal(p, q.detach()) for p, q in zip(before, net.parameters(), strict=True)
        )
        mgr.begin_step()
        pg.all_reduce = failing(DaemonUnavailable("gone", socket=pg.socket))
        net(x).pow(2).sum().backward()
        pg.all_reduce = real
        with pytest.raises(DaemonUnavailable):
            mgr.commit()
        mgr.begin_step()  # and the manager goes on
        net(x).pow(2).sum().backward()
        assert mgr.commit()
    finally:
        pg.all_reduce = real
        mgr.close()


# ---------------------------------------------------------------- 2. which parameters train
def _two_layers() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))


def _loss(net: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    return net(torch.randn(6, 4, generator=g)).pow(2).mean()


def _params(net: Any) -> list[Any]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[Any], net: Any) -> bool:
    return all(torch.equal(x, p.detach()) for x, p in zip(a, net.parameters(), strict=True))


def test_unfreezing_or_freezing_after_the_manager_was_built_is_refused(pg: Any) -> None:
    """The bucket plan covers the parameters trainable at construction: one unfrozen
    later got a private .grad, never averaged (members diverged silently)."""
    net = _two_layers()
    net[1].weight.requires_grad_(False)
    mgr = Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), global_batch=6,
                  job="unfreeze")  # fmt: skip
    try:
        mgr.begin_step()
        _loss(net).backward()
        assert mgr.commit()
        kept = _params(net)
        net[1].weight.requires_grad_(True)  # unfrozen before the step
        with pytest.raises(phalanx.ConfigError, match=r"1\.weight.*new Manager"):
            mgr.begin_step()
        net[1].weight.requires_grad_(False)
        mgr.begin_step()
        net[1].weight.requires_grad_(True)  # unfrozen inside the step
        _loss(net).backward()
        with pytest.raises(phalanx.ConfigError, match=r"1\.weight"):
            mgr.commit()
        assert _same(kept, net)
        net[1].weight.requires_grad_(False)
        net[1].weight.grad = None
        net[0].bias.requires_grad_(False)  # frozen after the build: refused too
        with pytest.raises(phalanx.ConfigError, match=r"no longer require grad.*0\.bias"):
            mgr.begin_step()
        net[0].bias.requires_grad_(True)
        mgr.begin_step()
        _loss(net).backward()
        assert mgr.commit() and mgr.step == 2
    finally:
        mgr.close()


def test_a_grad_on_a_parameter_outside_the_plan_is_refused_at_commit(pg: Any) -> None:
    """A .grad found on a frozen parameter would be applied by optimizer.step() on this
    member alone."""
    net = _two_layers()
    net[1].weight.requires_grad_(False)
    mgr = Manager(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), global_batch=6,
                  job="stray")  # fmt: skip
    try:
        kept = _params(net)
        mgr.begin_step()
        _loss(net).backward()
        net[1].weight.grad = torch.ones_like(net[1].weight)
        with pytest.raises(phalanx.ConfigError, match=r"\.grad.*1\.weight"):
            mgr.commit()
        assert _same(kept, net)
        net[1].weight.grad = None
        mgr.begin_step()
        _loss(net).backward()
        assert mgr.commit()
    finally:
        mgr.close()


# ---------------------------------------------------------------- 3. partial replays
def test_a_partial_replay_never_undoes_the_loops_clipping() -> None:
    """Three members, partial=True; each clips the synced gradient to norm 1e-3 (a by
    sync_gradients() then clip, b by clipping right after backward), then c leaves
    before the vote. The replay used to reduce the raw local gradients again and
    commit them (update norm ~17000 with lr=1): now the step is redone, clipped.
    Then b leaves before a's vote while a left its gradients alone: that replay is
    still made (a partial commit)."""
    with embedded_members("abc", _JOIN_S, _STEADY) as clients:
        synced = threading.Barrier(3, timeout=_JOIN_S)
        again = threading.Barrier(2, timeout=_JOIN_S)
        lock = threading.Lock()
        out: dict[str, Any] = {}
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 4, generator=g) * 100, torch.randn(6, 1, generator=g)

        def member(name: str) -> None:
            with lock:
                torch.manual_seed(0)
                net = torch.nn.Linear(4, 1)
            mgr = Manager(clients[name], net, torch.optim.SGD(net.parameters(), lr=1.0),
                          global_batch=6, partial=True, op_timeout=10, job="clip")  # fmt: skip

            def backward(clip: bool) -> Any:
                s = mgr.begin_step(timeout=30)
                loss = torch.nn.functional.mse_loss(net(x[s.shard()]), y[s.shard()])
                loss.backward()
                if clip and name == "a":
                    assert mgr.sync_gradients()
                if clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e-3)
                return s

            def moved(before: list[Any]) -> float:
                d = [
                    (p.detach() - q).pow(2).sum()
                    for p, q in zip(net.parameters(), before, strict=True)
                ]
                return float(torch.stack(d).sum().sqrt())

            try:
                before = _params(net)
                backward(clip=True)
                synced.wait()
                if name == "c":
                    clients["c"].close()  # leaves before its vote
                    return
                committed = mgr.commit()
                out[name] = {"first": committed, "first_moved": moved(before)}
                for _ in range(5):  # the same step, redone by the two survivors
                    s = backward(clip=True)
                    if mgr.commit():
                        break
                out[name].update(redo_world=s.world, redo_moved=moved(before),
                                 params=_params(net))  # fmt: skip
                before = _params(net)
                backward(clip=False)  # both synced; nobody touches the gradients
                again.wait()
                if name == "b":
                    clients["b"].close()  # leaves before its vote
                    return
                out[name]["partial"] = mgr.commit()
                out[name]["partial_moved"] = moved(before)
            finally:
                out.setdefault(name, {})["stats"] = dict(mgr.stats)
                with contextlib.suppress(Exception):
                    mgr.close()

        _run_members(member, "abc")
        for name in "ab":
            r = out[name]
            assert not r["first"] and r["first_moved"] == 0.0, r  # not replayed unclipped
            assert r["redo_world"] == 2 and r["redo_moved"] <= 1e-3 * 1.001, r
            assert r["stats"]["partial_refused"] >= 1, r["stats"]
        assert all(
            torch.equal(p, q) for p, q in zip(out["a"]["params"], out["b"]["params"], strict=True)
        )
        ra = out["a"]
        assert ra["partial"] and ra["stats"]["partial_commits"] == 1, ra
        assert ra["partial_moved"] > 1.0  # its own, unclipped gradient, as partial promises


class _ReplayOpensStale:
    """A member's client whose daemon answers the vote (the view changed) before it
    installs the new view: the replay's first opening op is then refused with
    StepAborted, as that daemon refuses it. Everything else is the real client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.opening: Any = None  # the manager's opening array
        self.armed = False
        self.refused = 0

    def all_reduce(self, x: Any, *args: Any, **kw: Any) -> Any:
        if self.armed and x is self.opening:
            self.armed = False
            self.refused += 1
            raise StepAborted(0, 0, "the view changed since begin_step")
        return self.client.all_reduce(x, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_replay_opened_before_the_new_view_opens_again_and_commits() -> None:
    """Three members, partial=True; c leaves before the vote. b's replay opens before
    its daemon installed the view without c, so its opening op is refused: the replay
    used to give up at once (commit False) while a waited in the new view for b until
    its deadline, and neither committed (a CI flake of the unused-parameters replay
    test). Now b opens again, and both make the partial commit, alike."""
    with embedded_members("abc", _JOIN_S, _STEADY) as clients:
        synced = threading.Barrier(3, timeout=_JOIN_S)
        out: dict[str, Any] = {}
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)
        stale = _ReplayOpensStale(clients["b"])
        lock = threading.Lock()

        def member(name: str) -> None:
            with lock:  # torch.manual_seed is process-wide: one member builds at a time
                torch.manual_seed(0)
                net = torch.nn.Linear(4, 1)
            mgr = Manager(clients[name], net, torch.optim.SGD(net.parameters(), lr=0.1),
                          global_batch=6, partial=True, op_timeout=10, job="stale")  # fmt: skip
            try:
                if name == "b":
                    stale.opening = mgr._open
                    mgr.client = stale  # type: ignore[assignment]  # a real client inside
                s = mgr.begin_step(timeout=30)
                torch.nn.functional.mse_loss(net(x[s.shard()]), y[s.shard()]).backward()
                synced.wait()
                if name == "c":
                    clients["c"].close()  # leaves before its vote
                    return
                if name == "b":
                    stale.armed = True
                out[name] = {"committed": mgr.commit(), "params": _params(net)}
            finally:
                out.setdefault(name, {})["stats"] = dict(mgr.stats)
                with contextlib.suppress(Exception):
                    mgr.close()

        _run_members(member, "abc")
    assert stale.refused == 1, out["b"]["stats"]
    for name in "ab":
        r = out[name]
        assert r["committed"] and r["stats"]["partial_commits"] == 1, r
    assert all(
        torch.equal(p, q) for p, q in zip(out["a"]["params"], out["b"]["params"], strict=True)
    )


# ---------------------------------------------------------------- 4. leaks
def _bn_net() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))


def _regions(pg: Any) -> tuple[int, int]:
    return len(pg._regions), sum(r.size for r in pg._regions.values())


def test_closed_managers_leave_no_region_mapped(pg: Any) -> None:
    """close() left the state's arrays mapped, and each new manager's attach_state
    replaced them without unmapping: a loop of managers grew without bound."""
    start = _regions(pg)
    for i in range(3):
        net = _bn_net()
        mgr = Manager(pg, net, torch.optim.Adam(net.parameters()), global_batch=4,
                      job=f"leak{i}")  # fmt: skip
        mgr.begin_step()
        net(torch.randn(4, 16)).pow(2).mean().backward()
        assert mgr.commit()
        mgr.close()
        mgr.close()  # idempotent
        assert _regions(pg) == start, i
        assert net[0].weight.grad is not None  # still readable


def _limited(empty: Any, k: int) -> Any:
    """``client.empty`` that maps ``k`` arrays, then raises LimitExceeded."""
    left = [k]

    def limited(*args: Any, **kwargs: Any) -> Any:
        if left[0] == 0:
            raise LimitExceeded("over this client's shared-memory budget")
        left[0] -= 1
        return empty(*args, **kwargs)

    return limited


def test_a_failed_constructor_undoes_what_it_set_up(pg: Any, monkeypatch: Any) -> None:
    """client.empty over the daemon's limit (in the state, a bucket, the opening slots
    or the buffer ops) or attach_state timing out: the regions mapped so far stayed
    mapped, the parameters stayed rebound to shared memory, the hooks registered and
    optimizer.zero_grad patched."""
    real_empty = pg.empty
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(pg, "empty", counting)
    net = _bn_net()
    Manager(pg, net, torch.optim.Adam(net.parameters()), job="count", bucket_cap_mb=0.0005).close()
    n = calls[0]
    assert n >= 5
    start = _regions(pg)

    def check(net: Any, opt: Any, ptrs: list[int]) -> None:
        assert _regions(pg) == start
        assert [p.data_ptr() for p in net.parameters()] == ptrs  # not rebound
        assert all(p.grad is None for p in net.parameters())
        assert all(not p._post_accumulate_grad_hooks for p in net.parameters())
        assert "zero_grad" not in vars(opt)

    for k in range(n):
        net = _bn_net()
        opt = torch.optim.Adam(net.parameters())
        ptrs = [p.data_ptr() for p in net.parameters()]
        monkeypatch.setattr(pg, "empty", _limited(real_empty, k))
        with pytest.raises(LimitExceeded):
            Manager(pg, net, opt, job="limit", bucket_cap_mb=0.0005)
        check(net, opt, ptrs)
    monkeypatch.setattr(pg, "empty", real_empty)

    def late(*args: Any, **kwargs: Any) -> Any:
        raise TimeoutError("ATTACH_STATE got no answer")

    net = _bn_net()
    opt = torch.optim.Adam(net.parameters())
    ptrs = [p.data_ptr() for p in net.parameters()]
    monkeypatch.setattr(pg, "attach_state", late)
    with pytest.raises(TimeoutError):
        Manager(pg, net, opt, job="late")
    check(net, opt, ptrs)
    monkeypatch.undo()
    mgr = Manager(pg, net, opt, global_batch=4, job="after")  # the same model: fine now
    try:
        mgr.begin_step()
        net(torch.randn(4, 16)).pow(2).mean().backward()
        assert mgr.commit()
    finally:
        mgr.close()
    assert _regions(pg) == start

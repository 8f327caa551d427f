"""phalanx.torch's Manager with ``find_unused_parameters`` (DDP's meaning), on embedded
members (a daemon each, in this process).

Every trainable parameter's ``.grad`` is a view into a shared bucket, so a parameter no
member's forward pass used ended the step with a zero gradient, and AdamW's weight decay
still moved it (plain torch and DDP with ``find_unused_parameters=True`` leave it
alone: its ``.grad`` stays ``None``). With the option on:

* a branch no member used: ``.grad`` is ``None`` once ``backward()`` returns, and AdamW
  leaves it bit-identical, while the used parameters move (alike on every member);
* a branch one member used: every member gets the same averaged gradient for it (the
  plain-torch gradient of the whole global batch);
* micro-batches accumulated in ``no_sync()``: a parameter used in any one counts;
* a partial replay reduces the usage of the attempt it replays;
* members that disagree on the option never average together (``JobMismatch``);
* off (the default): the zeros of today, and no extra op.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import phalanx  # noqa: E402
from phalanx.errors import PeerFailure  # noqa: E402
from phalanx.ops import Handle  # noqa: E402
from phalanx.torch import JobMismatch, Manager  # noqa: E402
from phalanx.torch.gradsync import GradSync  # noqa: E402
from tests.integration._pairs import embedded_members, embedded_pair  # noqa: E402

pytestmark = pytest.mark.timeout(120)

_JOIN_S = 60.0  # every thread join is bounded by this
_GLOBAL = 8  # examples per step over the group


def _net() -> Any:
    """A trunk and a head always used, and a branch the caller switches on
    (:func:`_forward`)."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {"trunk": torch.nn.Linear(4, 6), "head": torch.nn.Linear(6, 1),
         "branch": torch.nn.Linear(6, 1)}
    )  # fmt: skip


def _forward(net: Any, x: Any, branch: bool) -> Any:
    h = torch.tanh(net.trunk(x))
    out = net.head(h)
    return out + net.branch(h) if branch else out


def _batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(_GLOBAL, 4, generator=g), torch.randn(_GLOBAL, 1, generator=g)


def _snapshot(net: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _grads(net: Any) -> dict[str, Any]:
    return {
        n: None if p.grad is None else p.grad.detach().clone() for n, p in net.named_parameters()
    }


def _adamw(net: Any) -> Any:
    return torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)


def _run_pair(member: Callable[[str, Any], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``member(name, client)`` for ``a`` and ``b`` of an embedded pair, each on its own
    thread; their results by name. Re-raises the first failure."""
    out: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    with embedded_pair() as (a, b):

        def run(name: str, client: Any) -> None:
            try:
                out[name] = member(name, client)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=(n, c), daemon=True) for n, c in (("a", a), ("b", b))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(_JOIN_S)
        assert not any(t.is_alive() for t in threads), "a member did not finish in time"
    if errors:
        raise errors[0]
    return out


_build_lock = threading.Lock()


def _manager(client: Any, job: str, **kw: Any) -> tuple[Any, Manager]:
    with _build_lock:  # torch.manual_seed is process-wide: one member builds at a time
        net = _net()
    kw.setdefault("find_unused_parameters", True)
    mgr = Manager(client, net, _adamw(net), global_batch=_GLOBAL, op_timeout=10,
                  bucket_cap_mb=0.0002, job=job, **kw)  # fmt: skip
    return net, mgr


# ---------------------------------------------------------------- 1. used by no member
def test_a_branch_no_member_uses_keeps_grad_none_and_adamw_leaves_it_alone() -> None:
    def member(name: str, client: Any) -> dict[str, Any]:
        net, mgr = _manager(client, "unused-none")
        try:
            assert len(mgr.grads.plan) >= 2  # several buckets, then the usage op
            start = _snapshot(net)
            grads = []
            for step in range(3):
                s = mgr.begin_step(timeout=30)
                # re-armed: every .grad is its bucket view again (zeros)
                assert net.branch.weight.grad is not None
                assert not net.branch.weight.grad.any()
                x, y = _batch(step)
                loss = torch.nn.functional.mse_loss(
                    _forward(net, x[s.shard()], False), y[s.shard()]
                )
                loss.backward()
                assert mgr.grads._settled  # the usage op ran before backward() returned
                grads.append(_grads(net))
                assert not mgr.grads.touched()  # the deliberate None is not a change
                assert mgr.commit()
            return {"start": start, "end": _snapshot(net), "grads": grads,
                    "sent": mgr.grads.nbytes_sent, "nbytes": mgr.grads.nbytes}  # fmt: skip
        finally:
            mgr.close()

    out = _run_pair(member)
    for name, r in out.items():
        for g in r["grads"]:
            assert g["branch.weight"] is None and g["branch.bias"] is None, name
            assert g["trunk.weight"] is not None and g["trunk.weight"].any(), name
            assert g["head.bias"] is not None and g["head.bias"].any(), name
        for n in ("branch.weight", "branch.bias"):
            assert torch.equal(r["start"][n], r["end"][n]), (name, n)  # bit-identical
        for n in ("trunk.weight", "trunk.bias", "head.weight", "head.bias"):
            assert not torch.equal(r["start"][n], r["end"][n]), (name, n)
    for n in out["a"]["end"]:
        assert torch.equal(out["a"]["end"][n], out["b"]["end"][n]), n
    for r in out.values():  # one more op per attempt: a float32 flag per parameter
        assert r["sent"] == 3 * (r["nbytes"] + 4 * 6)


# ---------------------------------------------------------------- 2. used by one member
def test_a_branch_one_member_uses_gets_the_averaged_gradient_on_every_member() -> None:
    steps = 2

    def member(name: str, client: Any) -> dict[str, Any]:
        net, mgr = _manager(client, "unused-one")
        try:
            grads, shards = [], []
            for step in range(steps):
                s = mgr.begin_step(timeout=30)
                x, y = _batch(step)
                use = name == "a"
                loss = torch.nn.functional.mse_loss(_forward(net, x[s.shard()], use), y[s.shard()])
                loss.backward()
                grads.append(_grads(net))
                shards.append((s.shard(), use))
                assert mgr.commit()
            return {"end": _snapshot(net), "grads": grads, "shards": shards}
        finally:
            mgr.close()

    out = _run_pair(member)
    # plain torch over the whole global batch, the branch on a's examples only
    ref = _net()
    opt = _adamw(ref)
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        parts = []
        for r in out.values():
            sl, use = r["shards"][step]
            parts.append((sl, _forward(ref, x[sl], use)))
        pred = torch.cat([p for _, p in sorted(parts, key=lambda t: t[0].start)])
        torch.nn.functional.mse_loss(pred, y).backward()
        for r in out.values():
            for n, p in ref.named_parameters():
                got = r["grads"][step][n]
                assert got is not None and got.any(), (step, n)
                torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
        for n in ("branch.weight", "branch.bias"):
            assert torch.equal(out["a"]["grads"][step][n], out["b"]["grads"][step][n]), n
        opt.step()
    for n, p in ref.named_parameters():
        assert torch.equal(out["a"]["end"][n], out["b"]["end"][n]), n
        torch.testing.assert_close(out["a"]["end"][n], p.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 3. micro-batches
def test_a_branch_used_in_one_accumulated_micro_batch_counts_as_used() -> None:
    """Step 0: the branch runs only in b's first micro-batch (inside no_sync): used.
    Step 1: in no micro-batch of any member: None, and AdamW leaves it alone."""

    def member(name: str, client: Any) -> dict[str, Any]:
        net, mgr = _manager(client, "unused-acc")
        mse = torch.nn.functional.mse_loss
        try:
            out: dict[str, Any] = {}
            for step, use in ((0, name == "b"), (1, False)):
                s = mgr.begin_step(timeout=30)
                x, y = _batch(step)
                xs, ys = x[s.shard()], y[s.shard()]
                with mgr.no_sync():
                    (mse(_forward(net, xs[:2], use), ys[:2]) / 2).backward()
                (mse(_forward(net, xs[2:], False), ys[2:]) / 2).backward()
                out[f"grads{step}"] = _grads(net)
                out[f"before{step}"] = _snapshot(net)
                assert mgr.commit()
                out[f"end{step}"] = _snapshot(net)
            return out
        finally:
            mgr.close()

    out = _run_pair(member)
    for name, r in out.items():
        g = r["grads0"]["branch.weight"]
        assert g is not None and g.any(), name
        assert not torch.equal(r["before0"]["branch.weight"], r["end0"]["branch.weight"]), name
        assert r["grads1"]["branch.weight"] is None, name
        assert r["grads1"]["trunk.weight"] is not None, name
        assert torch.equal(r["before1"]["branch.weight"], r["end1"]["branch.weight"]), name
    assert torch.equal(out["a"]["grads0"]["branch.weight"], out["b"]["grads0"]["branch.weight"])
    for n in out["a"]["end1"]:
        assert torch.equal(out["a"]["end1"][n], out["b"]["end1"][n]), n


# ---------------------------------------------------------------- 4. the default
def test_off_the_unused_branch_gets_zeros_and_no_extra_op_runs() -> None:
    def member(name: str, client: Any) -> dict[str, Any]:
        net, mgr = _manager(client, "unused-off", find_unused_parameters=False)
        try:
            start = _snapshot(net)
            s = mgr.begin_step(timeout=30)
            x, y = _batch(0)
            torch.nn.functional.mse_loss(
                _forward(net, x[s.shard()], False), y[s.shard()]
            ).backward()
            grads = _grads(net)
            assert mgr.commit()
            sent = mgr.grads.nbytes_sent
            return {"grads": grads, "start": start, "end": _snapshot(net), "sent": sent,
                    "nbytes": mgr.grads.nbytes}  # fmt: skip
        finally:
            mgr.close()

    out = _run_pair(member)
    for name, r in out.items():
        g = r["grads"]["branch.weight"]
        assert g is not None and not g.any(), name  # today's zeros
        # and AdamW's weight decay moved it, as it always did
        assert not torch.equal(r["start"]["branch.weight"], r["end"]["branch.weight"]), name
        assert r["sent"] == r["nbytes"], name  # the buckets only: no usage op
    for n in out["a"]["end"]:
        assert torch.equal(out["a"]["end"][n], out["b"]["end"][n]), n


def test_members_that_disagree_on_the_option_never_average_together() -> None:
    def member(name: str, client: Any) -> dict[str, Any]:
        _, mgr = _manager(client, "unused-mix", find_unused_parameters=name == "a")
        try:
            with pytest.raises(JobMismatch):
                mgr.begin_step(timeout=30)
            return {}
        finally:
            mgr.close()

    _run_pair(member)


def test_a_partial_replay_uses_the_replayed_attempts_usage() -> None:
    """Three members, partial=True; only a uses the branch, and c leaves after its
    backward, before the vote. The survivors replay their kept gradients in the new
    view (no hook fires in a replay): a's kept flags still say the branch was used, so
    it gets the survivors' averaged gradient, alike on a and b."""
    with embedded_members("abc", _JOIN_S) as clients:
        synced = threading.Barrier(3, timeout=_JOIN_S)
        out: dict[str, Any] = {}
        errors: list[BaseException] = []

        def member(name: str) -> None:
            try:
                net, mgr = _manager(clients[name], "unused-replay", partial=True)
            except BaseException as exc:
                errors.append(exc)
                synced.abort()
                return
            try:
                start = _snapshot(net)
                s = mgr.begin_step(timeout=30)
                x, y = _batch(0)
                loss = torch.nn.functional.mse_loss(
                    _forward(net, x[s.shard()], name == "a"), y[s.shard()]
                )
                loss.backward()
                synced.wait()
                if name == "c":
                    clients["c"].close()  # leaves before its vote
                    return
                out[name] = {"committed": mgr.commit(), "start": start, "end": _snapshot(net),
                             "grads": _grads(net), "stats": dict(mgr.stats)}  # fmt: skip
            except BaseException as exc:
                errors.append(exc)
            finally:
                with contextlib.suppress(Exception):
                    mgr.close()

        threads = [threading.Thread(target=member, args=(n,), daemon=True) for n in "abc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(_JOIN_S)
        assert not any(t.is_alive() for t in threads), "a member did not finish in time"
        if errors:
            raise errors[0]
        for name in "ab":
            r = out[name]
            assert r["committed"] and r["stats"]["partial_commits"] == 1, r["stats"]
            g = r["grads"]["branch.weight"]
            assert g is not None and g.any(), name  # used: a's kept flag counted
            assert not torch.equal(r["start"]["branch.weight"], r["end"]["branch.weight"])
        for n in out["a"]["end"]:
            assert torch.equal(out["a"]["end"][n], out["b"]["end"][n]), n
            assert torch.equal(out["a"]["grads"][n], out["b"]["grads"][n]), n


# ---------------------------------------------------------------- 5. one member's rules
@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    client = phalanx.start()
    yield client
    client.close()


def test_a_replay_reduces_the_usage_of_the_attempt_it_replays(pg: Any) -> None:
    """keep_local keeps the flags with the local gradients: the replay (a new attempt:
    no hook fires) still knows the branch was used, and which parameter was not."""
    net = _net()
    params = list(net.parameters())
    gs = GradSync(pg, params, cap_bytes=64, keep_local=True, find_unused_parameters=True)
    try:
        x, y = _batch(0)
        gs.arm(0.5)
        torch.nn.functional.mse_loss(net.branch(net.trunk(x)), y).backward()  # head unused
        gs.finish()
        first = _grads(net)
        assert first["head.weight"] is None and first["branch.weight"] is not None
        gs.arm(0.5, replay=True)
        assert net.head.weight.grad is not None  # arm() points it back at its view
        assert gs.restore_local()
        gs.finish()
        again = _grads(net)
        assert again["head.weight"] is None and again["head.bias"] is None
        for n in ("trunk.weight", "branch.weight", "branch.bias"):
            assert torch.equal(first[n], again[n]), n
        gs.forget_local()  # nothing kept: no replay
        gs.arm(0.5, replay=True)
        assert not gs.restore_local()
    finally:
        gs.close()


def test_touched_ignores_the_deliberate_none_but_not_the_users(pg: Any) -> None:
    net = _net()
    gs = GradSync(pg, list(net.parameters()), find_unused_parameters=True)
    try:
        x, y = _batch(0)
        gs.arm(1.0)
        torch.nn.functional.mse_loss(_forward(net, x, False), y).backward()
        assert net.branch.weight.grad is None and not gs.touched()
        gs.finish()  # leaves the deliberate None alone
        assert net.branch.weight.grad is None and not gs.touched()
        net.head.weight.grad = None  # the user removes a used parameter's gradient
        assert gs.touched()
        gs.zero()  # every .grad back on its view
        assert net.branch.weight.grad is not None and net.head.weight.grad is not None
    finally:
        gs.close()


def test_a_failed_usage_op_drops_the_attempt_like_a_failed_bucket(pg: Any) -> None:
    """The usage op fails (the buckets went through): nothing crosses autograd, the
    commit drops the attempt (PeerFailure recorded) and applies nothing; no .grad was
    set to None on that failure; the step is then redone and commits."""
    net = _net()
    mgr = Manager(pg, net, _adamw(net), global_batch=_GLOBAL, job="unused-fail",
                  find_unused_parameters=True)  # fmt: skip
    real = pg.all_reduce
    failed: list[int] = []

    def usage_fails(x: Any, *args: Any, **kwargs: Any) -> Any:
        if x is mgr.grads._usage:

            def settle(wait: float | None) -> Any:
                failed.append(1)
                raise PeerFailure(op="all_reduce", seq=1, epoch=1, suspects=[], reason="x")

            return Handle(settle)
        return real(x, *args, **kwargs)

    try:
        start = _snapshot(net)
        x, y = _batch(0)
        mgr.begin_step(timeout=30)
        pg.all_reduce = usage_fails
        torch.nn.functional.mse_loss(_forward(net, x, False), y).backward()  # no raise
        pg.all_reduce = real
        assert failed == [1]
        assert net.branch.weight.grad is not None  # left on its view: nothing decided
        assert not mgr.commit()
        assert "PeerFailure" in mgr.stats["last_failure"]
        end = _snapshot(net)
        assert all(torch.equal(start[n], end[n]) for n in start)
        s = mgr.begin_step(timeout=30)
        assert s.attempt == 2
        torch.nn.functional.mse_loss(_forward(net, x, False), y).backward()
        assert net.branch.weight.grad is None
        assert mgr.commit()
        end = _snapshot(net)
        assert torch.equal(start["branch.weight"], end["branch.weight"])
        assert not torch.equal(start["head.weight"], end["head.weight"])
    finally:
        pg.all_reduce = real
        mgr.close()

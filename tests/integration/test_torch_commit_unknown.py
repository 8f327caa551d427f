"""phalanx.torch after an unanswered vote: a member whose commit raised ``CommitUnknown``
while the round committed True is re-synced by its daemon in a new *generation of the
same view* (not a new epoch). Its next ``begin_step`` reports ``synced`` and the manager
must load what was received (optimizer settings and state, scheduler, user state,
BatchNorm buffers, DiLoCo's outer state and step) even though it already loaded the
group's state once in that epoch; otherwise it trains on beside the others with stale
values and the members silently diverge.

Two embedded members (``phalanx.start``, a daemon each, in this process); ``b`` joins
the running job. ``b``'s first vote times out (its ``op_timeout`` is short, and ``a``
casts its vote only once ``b``'s commit has raised), the round still commits True with
``b``'s yes, and both go on. Every wait is bounded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from phalanx.membership.errors import CommitUnknown  # noqa: E402
from phalanx.torch import DiLoCo, Manager  # noqa: E402
from tests.integration._pairs import embedded_pair  # noqa: E402

_JOIN_S = 90.0  # a member thread's whole run


def _net() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))  # fmt: skip


def _batch(step: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def _diff(x: Any, y: Any, path: str = "") -> list[str]:
    """Where two nested state dicts differ (tensors bit for bit)."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        same = (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dtype == y.dtype
            and x.shape == y.shape
            and torch.equal(x, y)
        )
        return [] if same else [path]
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return [f"{path}{{keys}}"]
        return [d for k in x for d in _diff(x[k], y[k], f"{path}/{k}")]
    if isinstance(x, list | tuple) and isinstance(y, list | tuple):
        if len(x) != len(y):
            return [f"{path}[len]"]
        return [
            d
            for i, (u, v) in enumerate(zip(x, y, strict=True))
            for d in _diff(u, v, f"{path}[{i}]")
        ]
    return [] if x == y else [path]


def _snapshot(tree: Any) -> Any:
    """A deep copy with every tensor cloned (the live ones keep changing)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_snapshot(v) for v in tree)
    return tree


class _UnknownOnce:
    """Make ``b``'s first vote time out while the round commits True: ``b`` votes yes
    with a short timeout and gets ``CommitUnknown``; ``a``'s first vote waits (bounded)
    until then, so the round is decided True with ``b``'s kept yes."""

    def __init__(self) -> None:
        self.b_unknown = threading.Event()
        self.b_raised: list[str] = []
        self.a_first: list[bool] = []

    def wrap(self, name: str, client: Any) -> None:
        orig: Callable[..., bool] = client.commit

        def commit(step: int, ok: bool = True, *, timeout: float | None = None) -> bool:
            if name == "a" and not self.a_first:
                self.b_unknown.wait(30)
                res = orig(step, ok, timeout=30.0)
                self.a_first.append(res)
                return res
            try:
                return orig(step, ok, timeout=timeout)
            except CommitUnknown:
                if name == "b":
                    self.b_raised.append(f"step {step}")
                    self.b_unknown.set()
                raise

        client.commit = commit


def _run(member: Callable[[str, Any], None], fault: _UnknownOnce) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(name: str, client: Any) -> None:
        try:
            member(name, client)
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    with embedded_pair() as (a, b):
        fault.wrap("a", a)
        fault.wrap("b", b)
        ts = [threading.Thread(target=guarded, args=(n, c), daemon=True)
              for n, c in (("a", a), ("b", b))]  # fmt: skip
        for t in ts:
            t.start()
        for t in ts:
            t.join(_JOIN_S)
        assert not any(t.is_alive() for t in ts), f"a member did not finish in {_JOIN_S} s"
    return errors


def test_a_manager_loads_the_state_its_daemon_resynced_after_commit_unknown() -> None:
    fault = _UnknownOnce()
    out: dict[str, dict[str, Any]] = {}

    def member(name: str, client: Any) -> None:
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        user: dict[str, Any] = {"applied": 0}
        # b's votes time out after 2 s; a's first waits for that (see _UnknownOnce)
        mgr = Manager(client, net, opt, scheduler=sched, user_state=user, global_batch=8,
                      op_timeout=2.0 if name == "b" else 10.0, timeout=30.0,
                      job="commit-unknown", join=name == "b")  # fmt: skip
        rec = out.setdefault(name, {"commits": []})
        try:
            for _ in range(8):  # bounded: step 0 twice on b, step 1 once
                if mgr.step >= 2:
                    break
                s = mgr.begin_step(timeout=30.0)
                x, y = _batch(s.step)
                torch.nn.functional.mse_loss(net(x[s.shard()]), y[s.shard()]).backward()

                def bump() -> None:
                    user["applied"] += 1

                rec["commits"].append((s.step, s.synced, mgr.commit(apply=bump)))
            rec["step"] = mgr.step
            rec["state"] = _snapshot({"model": net.state_dict(), "opt": opt.state_dict(),
                                      "sched": sched.state_dict(), "user": dict(user)})  # fmt: skip
            rec["stats"] = dict(mgr.stats)
        finally:
            mgr.close()

    errors = _run(member, fault)
    assert not errors, errors
    # the fault happened as intended: b's vote on step 0 had no answer, the round committed
    assert fault.b_raised == ["step 0"], fault.b_raised
    assert fault.a_first == [True]
    assert out["a"]["commits"] == [(0, False, True), (1, False, True)], out["a"]["commits"]
    assert out["a"]["step"] == out["b"]["step"] == 2
    diff = _diff(out["a"]["state"], out["b"]["state"])
    assert not diff, f"a and b differ after step 1 in: {diff}"
    assert out["b"]["state"]["user"] == {"applied": 2}
    # b received the state as a newcomer, then again (same view, next generation)
    assert out["b"]["stats"]["syncs"] == 2, out["b"]["stats"]
    assert out["a"]["stats"]["syncs"] == 0, out["a"]["stats"]
    assert out["b"]["commits"] == [(0, True, False), (1, True, True)], out["b"]["commits"]


def test_diloco_loads_the_state_its_daemon_resynced_after_commit_unknown() -> None:
    fault = _UnknownOnce()
    out: dict[str, dict[str, Any]] = {}
    last = 6  # syncs at 2 (b's vote unanswered), 4 (b weight 0) and 6 (both)

    def member(name: str, client: Any) -> None:
        net = _net()
        inner = torch.optim.SGD(net.parameters(), lr=0.1)
        user: dict[str, Any] = {"seed": 7}  # plain values travel with the outer state
        algo = DiLoCo(client, net, inner, sync_every=2, codec="none", global_batch=8,
                      user_state=user, op_timeout=2.0 if name == "b" else 10.0,
                      timeout=30.0, job="commit-unknown-diloco", join=name == "b")  # fmt: skip
        rec = out.setdefault(name, {"reports": []})
        try:
            algo.begin_step(timeout=30.0)
            for _ in range(3 * last):  # bounded
                if algo.step >= last:
                    break
                x, y = _batch(algo.step)
                inner.zero_grad()
                torch.nn.functional.mse_loss(net(x[algo.shard()]), y[algo.shard()]).backward()
                inner.step()
                rep = algo.end_step(timeout=30.0)
                if rep is not None:
                    rec["reports"].append((rep.step, rep.mine))
            rec["step"] = algo.step
            rec["state"] = _snapshot({
                "global": list(algo._global), "gbuf": list(algo._gbuf),
                "outer": algo.outer.state_dict(), "local": net.state_dict(), "user": dict(user),
            })  # fmt: skip
            rec["stats"] = dict(algo.stats)
        finally:
            algo.close()

    errors = _run(member, fault)
    assert not errors, errors
    assert fault.b_raised == ["step 0"], fault.b_raised
    assert fault.a_first == [True]
    assert out["a"]["reports"] == [(2, 1.0), (4, 1.0), (6, 1.0)], out["a"]["reports"]
    # b: its sync to 2 had no answer, it was re-synced to 2 and took part in the sync to
    # 4 with weight 0 (its inner steps were from the old state), then trained with a
    assert out["b"]["reports"] == [(4, 0.0), (6, 1.0)], out["b"]["reports"]
    assert out["a"]["step"] == out["b"]["step"] == last
    diff = _diff(out["a"]["state"], out["b"]["state"])
    assert not diff, f"a and b differ after step {last} in: {diff}"
    # b received the state as a newcomer, then again (same view, next generation)
    assert out["b"]["stats"]["state_syncs"] == 2, out["b"]["stats"]

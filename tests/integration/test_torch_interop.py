"""phalanx.torch next to torch.distributed, in two real processes with embedded daemons.

* Elastic DDP (:class:`phalanx.torch.Manager`) computes the same gradients as plain
  ``DistributedDataParallel`` over gloo on the same model (with BatchNorm) and data:
  rtol 1e-6 at every step when nothing fails.
* The ``"phalanx"`` torch.distributed backend: ``dist.all_reduce`` / ``broadcast`` /
  ``all_gather`` / ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` / ``barrier``
  (sync and async) run over the daemons; unsupported ops raise phalanx's typed error;
  ``get_world_size()`` follows the view when a member leaves.
* Snapshots of whole state dicts come back exactly, also another member's.
* LocalSGD: after each sync every member holds the average of the local models;
  streaming DiLoCo syncs its fragments in turn.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from phalanx.testing.procs import RankContext, run_ranks  # noqa: E402

_STEPS = 3


def _sha(tree: Any) -> str:
    from phalanx.torch import treecodec

    header, arrays = treecodec.encode(tree)
    h = hashlib.sha256(header)
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def _rank(ctx: RankContext, secret: bytes) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed import TCPStore  # type: ignore[attr-defined]
    from torch.nn.parallel import DistributedDataParallel as DDP

    import phalanx
    import phalanx.torch as pt
    from phalanx.demo.torch_model import TorchDemo, batch, make_data, make_model, rows

    torch.set_num_threads(1)
    if ctx.rank == 0:
        pg = phalanx.start(secret=secret)
        store = TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=datetime.timedelta(seconds=60),
                         wait_for_workers=False)  # fmt: skip
        ctx.exchange((pg.coordinator_address, store.port))
    else:
        coord, port = ctx.exchange(None)[0]
        pg = phalanx.start(coordinator=coord, secret=secret)
        store = TCPStore("127.0.0.1", port, 2, is_master=False,
                         timeout=datetime.timedelta(seconds=60))  # fmt: skip
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while pg.view().world < 2:
            assert time.monotonic() < deadline, "the group never reached 2 members"
            time.sleep(0.02)
        # ---- elastic DDP == gloo DDP
        demo = TorchDemo(dtype="float32")
        x, y = make_data(0, demo)
        ref, ela = make_model(0, demo), make_model(0, demo)
        dist.init_process_group("gloo", store=store, rank=ctx.rank, world_size=2)
        ddp = DDP(ref)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        opt = torch.optim.SGD(ela.parameters(), lr=0.1, momentum=0.9)
        mgr = pt.Manager(pg, ela, opt, global_batch=64, bucket_cap_mb=0.001, timeout=60)
        worst = 0.0
        for step in range(_STEPS):
            s = mgr.begin_step()
            # (the view's rank order need not be run_ranks' order: both paths use this shard)
            assert s.step == step and s.world == 2
            idx = batch(0, step, demo)[s.shard()]
            opt_ref.zero_grad()
            torch.nn.functional.cross_entropy(ddp(rows(x, idx)), rows(y, idx)).backward()
            torch.nn.functional.cross_entropy(ela(rows(x, idx)), rows(y, idx)).backward()
            assert mgr.sync_gradients()
            for a, b in zip(ref.parameters(), ela.parameters(), strict=True):
                assert a.grad is not None and b.grad is not None
                np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=1e-6, atol=1e-7)
                worst = max(worst, float((a.grad - b.grad).abs().max()))
            assert mgr.commit()
            opt_ref.step()
        out["worst_grad_diff"] = worst
        out["params_sha"] = _sha([p.detach() for p in ela.parameters()])
        mgr.close()
        dist.destroy_process_group()
        # ---- a restarted training process: the daemon kept the state, join=True gets it
        pg2 = phalanx.connect(pg.socket)
        again = make_model(7, demo)  # other weights: they must be replaced
        opt2 = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
        mgr2 = pt.Manager(pg2, again, opt2, global_batch=64, join=True)
        assert mgr2.step == _STEPS
        assert all(
            torch.equal(a, b)
            for a, b in zip(again.state_dict().values(), ela.state_dict().values(), strict=True)
        )
        assert _sha(opt2.state_dict()) == _sha(opt.state_dict())
        mgr2.close()
        pg2.close()
        # ---- LocalSGD: after a sync every member holds the average of the local models
        local = make_model(1, demo)
        inner = torch.optim.SGD(local.parameters(), lr=0.1)
        algo = pt.LocalSGD(pg, local, inner, sync_every=2, global_batch=64, timeout=60)
        for _ in range(4):
            s = algo.begin_step()
            idx = batch(0, s.step, demo)[algo.shard()]
            inner.zero_grad()
            torch.nn.functional.cross_entropy(local(rows(x, idx)), rows(y, idx)).backward()
            inner.step()
            mine = [p.detach().clone() for p in local.parameters()]
            if (s.step + 1) % 2 == 0:
                both = ctx.exchange(mine)
                rep = algo.end_step()
                assert rep is not None and len(rep.contributors) == 2
                for got, a, b in zip(local.parameters(), *both, strict=True):
                    torch.testing.assert_close(got.detach(), (a + b) / 2, rtol=1e-5, atol=1e-6)
            else:
                assert algo.end_step() is None
        algo.close()
        # ---- streaming DiLoCo: two fragments, one synced every H/2 steps, in turn
        sm = make_model(3, demo)
        sin = torch.optim.SGD(sm.parameters(), lr=0.05)
        st = pt.DiLoCo(pg, sm, sin, sync_every=4, fragments=2, codec="none", global_batch=64,
                       timeout=60)  # fmt: skip
        frags = []
        while st.step < 8:
            s = st.begin_step()
            idx = batch(0, s.step, demo)[st.shard()]
            sin.zero_grad()
            torch.nn.functional.cross_entropy(sm(rows(x, idx)), rows(y, idx)).backward()
            sin.step()
            rep = st.end_step()
            if rep is not None:
                frags.append(rep.fragment)
        assert frags == [1, 0, 1, 0], frags
        just_synced = [p.detach().clone() for p, f in zip(sm.parameters(), st._frag, strict=True)
                       if f == 0]  # fmt: skip
        assert just_synced and 0 < len(just_synced) < len(list(sm.parameters()))
        both = ctx.exchange(just_synced)
        assert all(torch.equal(a, b) for a, b in zip(*both, strict=True))
        st.close()
        # ---- snapshots of whole state dicts
        state = {"model": ela.state_dict(), "opt": opt.state_dict(), "step": 3,
                 "note": ("x", b"\x01")}  # fmt: skip
        pt.snapshot(pg, state, 3).wait(60)
        got_step, back = pt.restore(pg)
        assert got_step == 3 and _sha(back) == _sha(state)
        peers = ctx.exchange((pg.member_id, _sha(state)))
        other_id, other_sha = peers[1 - ctx.rank]
        got_step, theirs = pt.restore_peer(pg, other_id, timeout=60)  # rebuilt from holders
        assert got_step == 3 and _sha(theirs) == other_sha
        # ---- torch.distributed over phalanx
        pgrp = pt.init_process_group(pg)
        me = dist.get_rank()  # this member's rank in the view
        assert (dist.get_backend(), dist.get_world_size(), me) == (
            "phalanx", 2, pg.view().rank)  # fmt: skip
        t = torch.full((5,), float(me + 1))
        dist.all_reduce(t)
        assert t.tolist() == [3.0] * 5
        w = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        assert w is not None and w.wait() and t.tolist() == [3.0] * 5
        b = torch.arange(4.0) * (me + 1)
        dist.broadcast(b, src=1)
        assert b.tolist() == [0.0, 2.0, 4.0, 6.0]
        outs = [torch.zeros(2) for _ in range(2)]
        dist.all_gather(outs, torch.full((2,), float(me)))
        assert [o.tolist() for o in outs] == [[0.0, 0.0], [1.0, 1.0]]
        flat = torch.zeros(4)
        dist.all_gather_into_tensor(flat, torch.full((2,), float(me + 5)))
        assert flat.tolist() == [5.0, 5.0, 6.0, 6.0]
        part = torch.zeros(2)
        dist.reduce_scatter_tensor(part, torch.arange(4.0))
        assert part.tolist() == ([0.0, 2.0] if me == 0 else [4.0, 6.0])
        dist.barrier()
        with pytest.raises(phalanx.UnsupportedError):
            dist.send(torch.ones(1), dst=1 - me)
        ctx.exchange("phase-done")
        # ---- opt-in partial steps: rank 1 leaves during backward of step 2; rank 0
        # commits that step with its own gradient (no second forward/backward)
        part_model = make_model(2, demo)
        popt = torch.optim.SGD(part_model.parameters(), lr=0.1)
        pm = pt.Manager(pg, part_model, popt, global_batch=64, partial=True, timeout=60)
        while pm.step < 4:
            s = pm.begin_step()
            idx = batch(0, s.step, demo)[s.shard()]
            if ctx.rank == 1 and s.step == 2:
                first = next(part_model.parameters())
                first.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    lambda p: pg.close()
                )
            loss = torch.nn.functional.cross_entropy(part_model(rows(x, idx)), rows(y, idx))
            loss.backward()
            if ctx.rank == 1 and s.step == 2:
                return out  # it has left the group, mid-step (and tells rank 0, below)
            if s.step == 2:  # rank 0's own gradient on its shard, from a twin of the model
                before = [p.detach().clone() for p in part_model.parameters()]
                twin = copy.deepcopy(part_model)
                for p in twin.parameters():
                    p.grad = None
                torch.nn.functional.cross_entropy(twin(rows(x, idx)), rows(y, idx)).backward()
                own = [torch.as_tensor(p.grad).clone() for p in twin.parameters()]
            committed = pm.commit()
            if s.step == 2:
                assert committed, "the partial step was not committed by the survivor"
                assert pm.stats["partial_commits"] == 1, pm.stats
                # the step's gradient is the mean over the survivor's examples only
                for b0, g, p in zip(before, own, part_model.parameters(), strict=True):
                    torch.testing.assert_close(p.detach(), b0 - 0.1 * g, rtol=1e-5, atol=1e-6)
        pm.close()
        # ---- the view changed under torch.distributed too: rank 1 has left
        ctx.exchange(None)
        end = time.monotonic() + 30
        while dist.get_world_size() != 1:
            assert time.monotonic() < end, "get_world_size() never followed the view"
            time.sleep(0.05)
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0] and dist.get_rank() == 0
        out["world_after_leave"] = dist.get_world_size()
        del pgrp
        dist.destroy_process_group()
        return out
    finally:
        pg.close()  # embedded mode: the daemon leaves the group
        if ctx.rank == 1:
            ctx.exchange(None)  # "I have left"


def test_elastic_ddp_matches_gloo_and_the_phalanx_backend(secret: bytes) -> None:
    res = run_ranks(_rank, 2, secret, timeout=240)
    assert res[0]["params_sha"] == res[1]["params_sha"]  # bit-identical members
    assert 0 <= res[0]["worst_grad_diff"] < 1e-6
    assert res[0]["world_after_leave"] == 1

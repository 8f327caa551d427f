"""CUDA tensors through phalanx.torch, compared with the same runs on CPU tensors.

Runs only where ``torch.cuda.is_available()`` (the project's machines have no GPU; the
device machine of issue 16 has one). Two real rank processes, each embedding a real
daemon (``phalanx.start``), run the same script twice: once with every tensor on the
CPU, once on ``cuda`` (both ranks share the one GPU). Each run does:

* ``torch.distributed`` over phalanx (``backend="phalanx"``): ``all_reduce`` (sum, max,
  async; float32, float64, bfloat16, int64; a 4 MiB one; a non-contiguous one),
  ``broadcast``, ``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``,
  ``barrier``. Results must equal the CPU run's **bit for bit** (a two-member sum is
  exact and the reduction runs on the same host bytes either way) and the closed form.
* elastic DDP (:class:`phalanx.torch.Manager`): the demo network with a BatchNorm, SGD
  with momentum, 4 steps, several gradient buckets (each staged device -> pinned shared
  host -> device); then a restarted training process takes the state back with
  ``join=True`` (the host mirror pulled onto the device).
* DiLoCo: 3 outer syncs (H=2) of the pseudo-gradient of device-resident local models.

What must hold: every rank ends **bit-identical** to the other (parameters, BatchNorm
buffers, optimizer state, gradients of every step); the CUDA run equals the CPU run
within ``rtol=1e-4, atol=1e-5`` (float32: the GPU's forward/backward kernels sum in
another order than the CPU's, about 1e-7 relative per op; TF32 is off; a few steps of
SGD keep that below 1e-5); the state the daemon holds (the host twin a newcomer would
receive) equals the device parameters exactly after each commit; the gradient buckets'
host twins are page-locked.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)",
                allow_module_level=True)  # fmt: skip

from phalanx.testing.procs import RankContext, run_ranks  # noqa: E402

pytestmark = pytest.mark.timeout(420)

_DDP_STEPS = 4
_RTOL, _ATOL = 1e-4, 1e-5


def _cpu(t: Any) -> Any:
    return t.detach().to("cpu").clone()


def _np(t: Any) -> Any:
    """A result as a numpy array (exact bits; bfloat16 as its int16 pattern): tensors
    would cross to the parent through torch's shared-memory pickling, which needs the
    rank process alive."""
    c = _cpu(t)
    return (c.view(torch.int16) if c.dtype == torch.bfloat16 else c).numpy()


def _collectives(pg: Any, dev: Any) -> dict[str, Any]:
    import torch.distributed as dist

    import phalanx.torch as pt

    out: dict[str, Any] = {}
    pgrp = pt.init_process_group(pg)
    me = dist.get_rank()
    out["me"] = me
    gen = torch.Generator().manual_seed(100 + me)
    a = torch.randn(1000, generator=gen).to(dev)
    dist.all_reduce(a)
    out["sum_f32"] = _np(a)
    m = torch.randn(257, generator=gen).to(dev)
    w = dist.all_reduce(m, op=dist.ReduceOp.MAX, async_op=True)
    assert w is not None and w.wait()
    out["max_f32_async"] = _np(m)
    d = torch.randn(100, generator=gen, dtype=torch.float64).to(dev)
    dist.all_reduce(d)
    out["sum_f64"] = _np(d)
    h = torch.randn(300, generator=gen).to(torch.bfloat16).to(dev)
    dist.all_reduce(h)
    out["sum_bf16"] = _np(h)
    i = (torch.arange(10, dtype=torch.int64) * (me + 1)).to(dev)
    dist.all_reduce(i)
    assert i.device.type == dev.type
    assert i.tolist() == [3 * k for k in range(10)]
    big = torch.randn(1 << 20, generator=gen).to(dev)  # 4 MiB
    dist.all_reduce(big)
    out["sum_4mib"] = _np(big)
    nc = torch.randn(8, 6, generator=gen).to(dev)[:, ::2]  # not contiguous
    assert not nc.is_contiguous()
    dist.all_reduce(nc)
    out["sum_noncontig"] = _np(nc)
    b = (torch.arange(6.0) * (me + 1)).to(dev)
    dist.broadcast(b, src=1)
    assert b.tolist() == [float(2 * k) for k in range(6)]
    outs = [torch.zeros(3, device=dev) for _ in range(2)]
    dist.all_gather(outs, torch.full((3,), float(me), device=dev))
    assert all(o.device.type == dev.type for o in outs)
    assert [o.tolist() for o in outs] == [[0.0] * 3, [1.0] * 3]
    flat = torch.zeros(4, device=dev)
    dist.all_gather_into_tensor(flat, torch.full((2,), float(me + 5), device=dev))
    assert flat.tolist() == [5.0, 5.0, 6.0, 6.0]
    part = torch.zeros(2, device=dev)
    dist.reduce_scatter_tensor(part, torch.arange(4.0, device=dev))
    assert part.tolist() == ([0.0, 2.0] if me == 0 else [4.0, 6.0])
    dist.barrier()
    del pgrp
    dist.destroy_process_group()
    return out


def _ddp(pg: Any, dev: Any) -> dict[str, Any]:
    import phalanx
    import phalanx.torch as pt
    from phalanx.demo.torch_model import TorchDemo, batch, make_data, make_model, rows

    demo = TorchDemo(dtype="float32")
    x, y = make_data(0, demo)
    x, y = x.to(dev), y.to(dev)
    model = make_model(0, demo).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = pt.Manager(pg, model, opt, global_batch=64, bucket_cap_mb=0.001, timeout=60)
    assert len(mgr.grads.plan) > 1  # several buckets: one in flight at a time
    out: dict[str, Any] = {"grads": [], "losses": []}
    if dev.type == "cuda":
        from phalanx.torch.cuda import pinned

        out["pinned"] = [pinned(s.host) for s in mgr.grads._slots]
    for step in range(_DDP_STEPS):
        s = mgr.begin_step()
        assert s.step == step and s.world == 2
        idx = batch(0, step, demo)[s.shard()]
        loss = torch.nn.functional.cross_entropy(model(rows(x, idx)), rows(y, idx))
        loss.backward()
        assert mgr.sync_gradients()
        out["grads"].append([_np(p.grad) for p in model.parameters()])
        out["losses"].append(float(loss.detach()))
        assert mgr.commit()
        # what the daemon holds (and a newcomer would receive) is the device state
        held = mgr.state.views("params")
        for name, p in model.named_parameters():
            assert torch.equal(held[name], _cpu(p)), f"host twin of {name} is stale"
    out["state"] = {k: _np(v) for k, v in model.state_dict().items()}
    out["momentum"] = [_np(opt.state[p]["momentum_buffer"]) for p in model.parameters()]
    mgr.close()
    # a restarted training process: its daemon kept the state; join=True pulls it onto
    # the device (parameters, BatchNorm buffers, optimizer state)
    pg2 = phalanx.connect(pg.socket)
    again = make_model(7, demo).to(dev)
    opt2 = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    mgr2 = pt.Manager(pg2, again, opt2, global_batch=64, join=True)
    assert mgr2.step == _DDP_STEPS
    for k, v in again.state_dict().items():
        assert v.device.type == dev.type and np.array_equal(_np(v), out["state"][k]), k
    for p, mom in zip(again.parameters(), out["momentum"], strict=True):
        assert np.array_equal(_np(opt2.state[p]["momentum_buffer"]), mom)
    mgr2.close()
    pg2.close()
    return out


def _diloco(pg: Any, dev: Any) -> dict[str, Any]:
    import phalanx.torch as pt
    from phalanx.demo.torch_model import TorchDemo, batch, make_data, make_model, rows

    demo = TorchDemo(dtype="float32")
    x, y = make_data(0, demo)
    x, y = x.to(dev), y.to(dev)
    local = make_model(1, demo).to(dev)
    inner = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    algo = pt.DiLoCo(pg, local, inner, sync_every=2, codec="none", global_batch=64,
                     timeout=60)  # fmt: skip
    syncs = 0
    while algo.step < 6:
        s = algo.begin_step()
        idx = batch(0, s.step, demo)[algo.shard()]
        inner.zero_grad()
        torch.nn.functional.cross_entropy(local(rows(x, idx)), rows(y, idx)).backward()
        inner.step()
        rep = algo.end_step()
        if rep is not None:
            assert len(rep.contributors) == 2
            syncs += 1
    out = {"syncs": syncs, "state": {k: _np(v) for k, v in local.state_dict().items()}}
    algo.close()
    return out


def _rank(ctx: RankContext, secret: bytes, device: str) -> dict[str, Any]:
    import phalanx

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(device)
    if ctx.rank == 0:
        pg = phalanx.start(secret=secret)
        ctx.exchange(pg.coordinator_address)
    else:
        coord = ctx.exchange(None)[0]
        pg = phalanx.start(coordinator=coord, secret=secret)
    try:
        deadline = time.monotonic() + 60
        while pg.view().world < 2:
            assert time.monotonic() < deadline, "the group never reached 2 members"
            time.sleep(0.02)
        t0 = time.monotonic()
        out: dict[str, Any] = {"coll": _collectives(pg, dev)}
        out["ddp"] = _ddp(pg, dev)
        out["diloco"] = _diloco(pg, dev)
        out["seconds"] = time.monotonic() - t0
        ctx.exchange("done")  # nobody leaves while the other still needs it
        return out
    finally:
        pg.close()


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict[str, Any]]]:
    import os

    out = {}
    for device in ("cpu", "cuda"):
        res = run_ranks(_rank, 2, os.urandom(32), device, timeout=300)
        out[device] = sorted(res, key=lambda r: int(r["coll"]["me"]))  # by view rank
    return out


def _close(a: Any, b: Any, what: str) -> None:
    np.testing.assert_allclose(a, b, rtol=_RTOL, atol=_ATOL, err_msg=what)


def test_collectives_on_cuda_tensors_equal_the_cpu_results(runs: Any) -> None:
    for me in (0, 1):
        cpu, gpu = runs["cpu"][me]["coll"], runs["cuda"][me]["coll"]
        for key, want in cpu.items():
            got = gpu[key]
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and np.array_equal(got, want), key
            else:
                assert got == want, key
    for key in runs["cuda"][0]["coll"]:  # every member got the same bytes
        a, b = runs["cuda"][0]["coll"][key], runs["cuda"][1]["coll"][key]
        if key != "me":
            assert np.array_equal(a, b), key


def test_elastic_ddp_on_cuda_matches_cpu_and_ranks_are_bit_identical(runs: Any) -> None:
    g0, g1 = runs["cuda"][0]["ddp"], runs["cuda"][1]["ddp"]
    assert all(g0["pinned"]) and all(g1["pinned"]), "gradient host twins not page-locked"
    for k in g0["state"]:
        assert np.array_equal(g0["state"][k], g1["state"][k]), k
    for a, b in zip(g0["momentum"], g1["momentum"], strict=True):
        assert np.array_equal(a, b)
    for step, (s0, s1) in enumerate(zip(g0["grads"], g1["grads"], strict=True)):
        for a, b in zip(s0, s1, strict=True):
            assert np.array_equal(a, b), f"gradients differ across ranks at step {step}"
    for me in (0, 1):
        cpu, gpu = runs["cpu"][me]["ddp"], runs["cuda"][me]["ddp"]
        for step, (sc, sg) in enumerate(zip(cpu["grads"], gpu["grads"], strict=True)):
            for k, (a, b) in enumerate(zip(sg, sc, strict=True)):
                _close(a, b, f"rank {me} step {step} gradient {k}")
        for k in cpu["state"]:
            _close(gpu["state"][k], cpu["state"][k], f"rank {me} {k}")
        for a, b in zip(gpu["momentum"], cpu["momentum"], strict=True):
            _close(a, b, f"rank {me} momentum")


def test_diloco_on_cuda_matches_cpu(runs: Any) -> None:
    d0, d1 = runs["cuda"][0]["diloco"], runs["cuda"][1]["diloco"]
    assert d0["syncs"] == d1["syncs"] == 3
    for k in d0["state"]:  # every member restarts from the same global state
        assert np.array_equal(d0["state"][k], d1["state"][k]), k
    for me in (0, 1):
        cpu, gpu = runs["cpu"][me]["diloco"], runs["cuda"][me]["diloco"]
        assert cpu["syncs"] == gpu["syncs"]
        for k in cpu["state"]:
            _close(gpu["state"][k], cpu["state"][k], f"rank {me} {k}")


def test_a_cuda_tensor_given_to_the_client_directly_is_right_and_leaves_nothing_behind() -> None:
    """``client.all_reduce(cuda_tensor)`` stages through a page-locked shared host
    region. At 4 MiB and more the daemon's twin exchange applies to host arrays; pages
    the device has locked must never be exchanged (the copy back to the device would
    read the old ones: the input), and the staging region must go after each op
    (one was mapped, page-locked and kept on every call)."""
    from tests.integration._pairs import embedded_pair

    dev = torch.device("cuda")
    with embedded_pair() as (a, b):
        regions = len(a._regions), len(b._regions)
        for i in range(3):
            ta = torch.full((3 << 20,), 1.0 + i, device=dev)  # 12 MiB: over the twin size
            tb = torch.full((3 << 20,), 2.0 * (1 + i), device=dev)
            out: list[Any] = []
            t = threading.Thread(target=lambda o=out, x=tb: o.append(b.all_reduce(x)))
            t.start()
            a.all_reduce(ta)
            t.join(60.0)
            assert out, "rank b's op did not finish"
            want = 3.0 * (1 + i)
            assert torch.all(ta == want).item() and torch.all(tb == want).item(), (i, ta[:3])
        assert (len(a._regions), len(b._regions)) == regions, "staging regions were kept"

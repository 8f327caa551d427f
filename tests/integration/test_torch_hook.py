"""The DDP communication hook and torch tensors through real phalanx daemons.

Two spawned processes each run an embedded daemon (rank 0 also the coordinator) and
DDP over a gloo process group that does only DDP's bookkeeping (initial broadcast,
bucket order); every gradient goes through :func:`phalanx.torch.allreduce_hook`. The
gradients of each step must equal (allclose) a single-process run on the full batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from phalanx.testing.procs import RankContext, run_ranks  # noqa: E402

_STEPS = 3
_BATCH = 16


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()


def _data() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(_STEPS, _BATCH, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (_STEPS, _BATCH), generator=g)
    return x, y


def _grad(p: Any) -> np.ndarray:
    assert p.grad is not None
    out: np.ndarray = p.grad.detach().numpy().copy()
    return out


def _reference() -> list[list[np.ndarray]]:
    """Gradients of each step in one process on the full batch (SGD between steps)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    out = []
    for s in range(_STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[s]), y[s]).backward()
        out.append([_grad(p) for p in model.parameters()])
        opt.step()
    return out


def _ddp_rank(ctx: RankContext, secret: bytes) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed import TCPStore  # type: ignore[attr-defined]
    from torch.nn.parallel import DistributedDataParallel as DDP

    import phalanx
    import phalanx.torch as pt

    store = None
    if ctx.rank == 0:
        pg = phalanx.start(secret=secret)
        store = TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=_td(30), wait_for_workers=False)
        ctx.exchange((pg.coordinator_address, store.port))
    else:
        coord, port = ctx.exchange(None)[0]
        pg = phalanx.start(coordinator=coord, secret=secret)
        store = TCPStore("127.0.0.1", port, 2, is_master=False, timeout=_td(30))
    try:
        deadline = time.monotonic() + 30
        while pg.view().world < 2:
            assert time.monotonic() < deadline, "the phalanx group never reached 2 members"
            time.sleep(0.02)
        dist.init_process_group("gloo", store=store, rank=ctx.rank, world_size=2)
        model = DDP(_model(), bucket_cap_mb=0.0005)  # several buckets after the first step
        state = pt.register_hook(model, pg, timeout=30.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data()
        half = slice(ctx.rank * _BATCH // 2, (ctx.rank + 1) * _BATCH // 2)
        grads = []
        for s in range(_STEPS):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[s][half]), y[s][half]).backward()
            grads.append([_grad(p) for p in model.parameters()])
            opt.step()
        ops = state.ops
        last = state.last
        state.close()
        dist.destroy_process_group()
        return {
            "grads": grads,
            "ops": ops,
            "contributors": last.contributors if last else (),
            "zero_copy": last.zero_copy if last else None,
        }
    finally:
        pg.close()


def _td(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)


def test_ddp_hook_gives_the_single_process_gradients(secret: bytes) -> None:
    results = run_ranks(_ddp_rank, 2, secret, timeout=120)
    ref = _reference()
    for r, res in enumerate(results):
        assert res["ops"] > _STEPS, f"rank {r}: the hook ran {res['ops']} times"
        assert len(res["contributors"]) == 2
        assert res["zero_copy"] is False  # DDP owns bucket memory: staged once each way
        for s in range(_STEPS):
            for got, want in zip(res["grads"][s], ref[s], strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0]["grads"][-1], results[1]["grads"][-1], strict=True):
        assert np.array_equal(a, b)  # bit parity across ranks


def test_shared_memory_tensors_are_zero_copy() -> None:
    import phalanx
    import phalanx.torch as pt

    pg = phalanx.start()
    try:
        t = pt.empty(pg, (1000,), torch.float32)
        t.fill_(2.0)
        res = pg.all_reduce(t, "avg")
        assert res.zero_copy and float(t[0]) == 2.0
        b = pt.empty(pg, (64,), torch.bfloat16)
        b.fill_(1.5)
        assert pg.all_reduce(b, "sum").zero_copy and float(b[3]) == 1.5
        plain = torch.ones(10, dtype=torch.float64)
        res = pg.all_reduce(plain, "sum")
        assert not res.zero_copy and float(plain.sum()) == 10.0
    finally:
        pg.close()


def test_clear_error_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None\nimport phalanx.torch\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode != 0
    assert "pip install -e '.[torch]'" in proc.stderr
    assert "torch==2.13.0" in proc.stderr

"""The Gloo side of ``--vs gloo``: torch.distributed's gloo backend as a bench backend.

Runs inside a rank process started by :mod:`phalanx.testing.procs`. Gloo stays on
loopback (``GLOO_SOCKET_IFNAME=lo``, rendezvous on 127.0.0.1 with a TCPStore bound to
port 0) and on one thread (``torch.set_num_threads(1)``), as in the project's baseline
script. torch is imported only here and only inside the rank processes; the parent
asks :func:`torch_problem` first so that a missing torch is a clear error, not a
traceback from N children.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from phalanx.testing.procs import RankContext

__all__ = ["TORCH_VERSION", "GlooBackend", "torch_problem"]

TORCH_VERSION = "2.13.0"  # the CPU wheel the project's machines carry; see pyproject

_INSTALL_HINT = (
    f'install it with: .venv/bin/pip install -e ".[torch]"  (torch=={TORCH_VERSION} only: '
    "it is a CPU wheel already on the project's machines; any other version pulls "
    "several GB of CUDA packages)"
)


def torch_problem() -> str | None:
    """``None`` if torch==2.13.0 is importable here, else a message saying how to fix it."""
    if importlib.util.find_spec("torch") is None:
        return "--vs gloo needs PyTorch, which is not installed; " + _INSTALL_HINT
    version = importlib.metadata.version("torch")
    if not version.startswith(TORCH_VERSION):
        return f"--vs gloo needs torch=={TORCH_VERSION}, found {version}; " + _INSTALL_HINT
    return None


class GlooBackend:
    """One rank of a gloo process group; all-reduces numpy buffers in place (SUM)."""

    impl = "gloo"
    helper_pids: tuple[int, ...] = ()

    def __init__(self, ctx: RankContext, *, timeout_s: float) -> None:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        self._torch = torch
        self._dist = dist
        timeout = timedelta(seconds=timeout_s)
        tcp_store: Any = dist.TCPStore  # type: ignore[attr-defined]
        if ctx.rank == 0:
            store = tcp_store(
                "127.0.0.1", 0, ctx.world, True, timeout=timeout, wait_for_workers=False
            )
            port = ctx.exchange(store.port, timeout=timeout_s)[0]
        else:
            port = ctx.exchange(None, timeout=timeout_s)[0]
            store = tcp_store("127.0.0.1", port, ctx.world, False, timeout=timeout)
        dist.init_process_group(
            "gloo", store=store, rank=ctx.rank, world_size=ctx.world, timeout=timeout
        )
        self._store = store
        self._tensor: Any = None

    def bind_buffer(self, buf: np.ndarray[Any, Any]) -> None:
        """Make the next all-reduces work on ``buf`` (a zero-copy torch view of it)."""
        torch = self._torch
        if buf.dtype.name == "bfloat16":  # ml_dtypes: torch cannot import it directly
            self._tensor = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16)
        else:
            self._tensor = torch.from_numpy(buf)

    def all_reduce(self, codec: str) -> tuple[int | None, str | None]:
        """All-reduce the bound buffer; returns (wire bytes sent, algorithm): unknown
        for Gloo."""
        if codec != "none":
            raise ValueError(f"gloo has no codec {codec!r}")
        self._dist.all_reduce(self._tensor, op=self._dist.ReduceOp.SUM)
        return None, None

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        self._dist.destroy_process_group()

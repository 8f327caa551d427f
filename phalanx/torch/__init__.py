"""PyTorch on phalanx: training that survives a dead peer and takes a new one.

Install the extra first: ``pip install -e ".[torch]"`` (it pins ``torch==2.13.0``, the
CPU wheel; other versions pull gigabytes of CUDA packages). docs/torch.md has the full
guide. The parts, one concept per module:

* :class:`Manager` (:mod:`~phalanx.torch.manager`) — elastic DDP with committed
  optimizer steps: no ``torch.distributed`` process group; gradients all-reduced in
  shared-memory buckets during backward (:mod:`~phalanx.torch.gradsync`), BatchNorm
  buffers averaged, the optimizer stepped only when every member's commit vote says
  yes, a newcomer handed model + optimizer + scheduler + user state (verified)
  before it contributes (:mod:`~phalanx.torch.state`).
* :class:`OptimizerWrapper` (:mod:`~phalanx.torch.optim`) — the same behind the
  ``zero_grad()`` / ``step()`` calls of an existing loop.
* :class:`DiLoCo`, :class:`LocalSGD` (:mod:`~phalanx.torch.diloco`) — inner steps
  locally, an outer sync of the pseudo-gradient every H steps that survives a dead peer.
* :func:`init_process_group`, :class:`ProcessGroup` (:mod:`~phalanx.torch.process_group`)
  — ``torch.distributed`` calls over phalanx (``backend="phalanx"``).
* :func:`snapshot`, :func:`restore`, :func:`restore_peer`
  (:mod:`~phalanx.torch.snapshot`) — state dicts (tensors and plain values) in
  phalanx's erasure-coded snapshots, given back exactly.
* :func:`register_hook` (:mod:`~phalanx.torch.hook`) — the older DDP communication hook
  (still needs a gloo group beside phalanx).

This package must never be imported by ``import phalanx`` (torch is optional) and
never touch the network itself: it talks to the daemon through :class:`phalanx.Client`.
"""

from __future__ import annotations

from typing import Any

try:
    import torch
    import torch.distributed
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "phalanx.torch needs PyTorch: install the extra with "
        "pip install -e '.[torch]' (it pins torch==2.13.0, the CPU wheel)"
    ) from exc

from phalanx.torch.errors import JobMismatch, StateLayoutError, StepTimeout
from phalanx.torch.hook import HookState, allreduce_hook, empty, register_hook
from phalanx.torch.manager import Manager, StepContext, shard_slice

__all__ = [
    "DiLoCo",
    "HookState",
    "JobMismatch",
    "LocalSGD",
    "Manager",
    "OptimizerWrapper",
    "ProcessGroup",
    "StateLayoutError",
    "StepContext",
    "StepTimeout",
    "allreduce_hook",
    "empty",
    "init_process_group",
    "register_hook",
    "restore",
    "restore_peer",
    "shard_slice",
    "snapshot",
]

_LAZY = {
    "DiLoCo": "phalanx.torch.diloco",
    "LocalSGD": "phalanx.torch.diloco",
    "OptimizerWrapper": "phalanx.torch.optim",
    "ProcessGroup": "phalanx.torch.process_group",
    "init_process_group": "phalanx.torch.process_group",
    "snapshot": "phalanx.torch.snapshot",
    "restore": "phalanx.torch.snapshot",
    "restore_peer": "phalanx.torch.snapshot",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phalanx.torch' has no attribute {name!r}")


del torch

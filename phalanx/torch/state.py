"""The training state the group keeps identical on its members, in shared memory.

:class:`TrainingState` lays out (:mod:`~phalanx.torch.layout`) the tensors a job keeps
in sync — sections of named tensors the caller hands over (the model's parameters and
buffers for elastic DDP; the global parameters for DiLoCo), each optimizer's state
(:mod:`~phalanx.torch.optimstate`) — in a few flat arrays from ``client.empty`` (memory
the daemon shares), plus one ``meta`` byte array holding every plain value
(:mod:`~phalanx.torch.treecodec`): optimizer hyper-parameters, LR scheduler state, the
user's state dict, the manager's own counters.

* On CPU the live tensors **are** the shared slots: each section tensor's ``rebind``
  callback points it at its slot (``param.data = slot``), so the daemon's state sync
  writes where training reads, and the optimizer updates in place what the group
  hashes; nothing is copied per step.
* On a GPU the live tensors stay on the device and the slots are a host mirror
  (:mod:`phalanx.torch.cuda`): :meth:`capture` copies device -> host before the state
  is declared, :meth:`load` host -> device after it was received.

:meth:`arrays` is what ``client.attach_state`` gets; :meth:`capture` (after a committed
optimizer step, before ``update_state``) and :meth:`load` (after ``begin_step``
received the group's state) keep the plain values and the optimizer's tensors in step
with the slots. Everything here must be identical on every member at a step boundary
(the group hashes it): never put per-member values (RNG states, ranks) in it.

This module must never talk to the daemon beyond allocating its arrays.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phalanx.client import Client
from phalanx.torch import treecodec
from phalanx.torch.errors import StateLayoutError
from phalanx.torch.layout import StateLayout, TensorSpec, plan_layout
from phalanx.torch.optimstate import SharedOptimizerState, probe

__all__ = ["META", "SectionTensor", "TrainingState", "shared_tensor"]

log = logging.getLogger(__name__)

META = "meta"
_LEN = struct.Struct("<Q")


@dataclass
class SectionTensor:
    """A tensor to keep in sync: its name, the live tensor, and how it meets its slot.

    ``rebind`` (CPU only): called with the shared slot, so that the live tensor's owner
    uses the slot itself (``param.data = slot``): for tensors that change only when a
    step is committed. ``rebind=None``: the live tensor stays where it is and is
    *copied* into its slot by :meth:`TrainingState.capture` and back by
    :meth:`TrainingState.load` / :meth:`TrainingState.revert`: for tensors that change
    during an attempt that may not commit (BatchNorm's running statistics change in the
    forward pass), so the group's state only ever holds committed values."""

    name: str
    tensor: torch.Tensor
    rebind: Callable[[torch.Tensor], None] | None = None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def shared_tensor(client: Client, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor of ``numel`` elements in memory the daemon shares (zeros)."""
    name = _dtype_name(dtype)
    if dtype == torch.bfloat16:
        return torch.from_numpy(client.empty((numel,), "int16")).view(torch.bfloat16)
    if dtype == torch.bool:
        return torch.from_numpy(client.empty((numel,), "uint8")).view(torch.bool)
    return torch.from_numpy(client.empty((numel,), name))


def release_shared(client: Client, t: torch.Tensor) -> None:
    """Unmap the shared region of a tensor from :func:`shared_tensor` in the daemon and
    forget it here; this process's memory stays valid while tensors still view it."""
    client._release(t.detach().view(torch.uint8).numpy())


_TORCH_DTYPES = {_dtype_name(dt): dt for dt in treecodec._DTYPES.values()}


class TrainingState:
    """See the module docstring. ``sections``: ``[(section, [SectionTensor, ...])]``;
    ``optimizers``/``schedulers``: name -> object; ``user_state``: a dict of plain
    values and tensors (updated in place by :meth:`load`); ``meta_bytes``: capacity of
    the plain-value blob (the same on every member)."""

    def __init__(
        self,
        client: Client,
        sections: Sequence[tuple[str, Sequence[SectionTensor]]],
        *,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        schedulers: dict[str, Any] | None = None,
        user_state: dict[str, Any] | None = None,
        meta_bytes: int = 1 << 20,
    ) -> None:
        if meta_bytes < 4096:
            raise StateLayoutError(f"meta_bytes must be >= 4096, got {meta_bytes}")
        self.client = client
        self.optimizers = dict(optimizers or {})
        self.schedulers = dict(schedulers or {})
        self.user_state = user_state
        self.meta_bytes = int(meta_bytes)
        specs: list[tuple[str, list[TensorSpec]]] = []
        for sec, items in sections:
            specs.append((sec, [TensorSpec(it.name, _dtype_name(it.tensor.dtype),
                                           tuple(it.tensor.shape)) for it in items]))  # fmt: skip
        probes = {name: probe(opt) for name, opt in self.optimizers.items()}
        for name, ps in probes.items():
            specs.append((f"optim-{name}", ps))
        self.layout: StateLayout = plan_layout(specs)
        self.flat: dict[str, torch.Tensor] = {}
        for bname, (dt, n) in self.layout.buffers.items():
            self.flat[bname] = shared_tensor(client, n, _TORCH_DTYPES[dt])
        self._meta = client.empty((self.meta_bytes,), "uint8")
        self._meta_len = 0
        self.nbytes = self.layout.nbytes + self.meta_bytes
        # bind the live tensors to their slots (or mirror them: device tensors)
        mirrors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live, slot) on CPU
        for sec, items in sections:
            for it in items:
                view = self._view(sec, it.name)
                with torch.no_grad():
                    view.copy_(it.tensor.detach().to("cpu"))
                if it.tensor.device.type != "cpu":
                    mirrors.append((it.tensor, view))
                elif it.rebind is not None:
                    it.rebind(view)
                else:
                    self._copies.append((it.tensor, view))
        self.optim: dict[str, SharedOptimizerState] = {}
        for name, opt in self.optimizers.items():
            views: dict[str, torch.Tensor] = {}
            dev = {str(i): p.device for i, p in enumerate(
                q for g in opt.param_groups for q in g["params"])}  # fmt: skip
            for s in self.layout.slots(f"optim-{name}"):
                host = self._view(f"optim-{name}", s.spec.name)
                device = dev[s.spec.name.split("/", 1)[0]]
                if device.type != "cpu":
                    live = torch.zeros(host.shape, dtype=host.dtype, device=device)
                    mirrors.append((live, host))
                    views[s.spec.name] = live
                else:
                    views[s.spec.name] = host
            self.optim[name] = SharedOptimizerState(opt, views)
        self._mirror = None
        self._copies_on_device = any(
            it.rebind is None and it.tensor.device.type != "cpu"
            for _, items in sections
            for it in items
        )
        if mirrors:
            from phalanx.torch.cuda import Mirror

            self._mirror = Mirror(mirrors, list(self.flat.values()))
        self.extra: dict[str, Any] = {}
        self.write_meta()

    def _view(self, section: str, name: str) -> torch.Tensor:
        for s in self.layout.slots(section):
            if s.spec.name == name:
                flat = self.flat[s.buffer]
                return flat[s.offset : s.offset + s.spec.numel].view(s.spec.shape)
        raise KeyError(f"{section}/{name}")

    def views(self, section: str) -> dict[str, torch.Tensor]:
        """Name -> shared slot of every tensor of ``section`` (host memory)."""
        out = {}
        for s in self.layout.slots(section):
            flat = self.flat[s.buffer]
            out[s.spec.name] = flat[s.offset : s.offset + s.spec.numel].view(s.spec.shape)
        return out

    def arrays(self) -> dict[str, Any]:
        """The arrays ``client.attach_state`` gets (every flat buffer and the meta blob)."""
        out: dict[str, Any] = dict(self.flat)
        out[META] = self._meta
        return out

    # ------------------------------------------------------------------ plain values
    def plain(self) -> dict[str, Any]:
        """Every plain value of the state, as it is now (optimizer state adopted)."""
        return {
            "optim": {name: st.adopt() for name, st in self.optim.items()},
            "sched": {name: s.state_dict() for name, s in self.schedulers.items()},
            "user": self.user_state if self.user_state is not None else {},
            "extra": self.extra,
        }

    def write_meta(self) -> None:
        blob = treecodec.pack(self.plain())
        need = _LEN.size + len(blob)
        if need > self.meta_bytes:
            raise StateLayoutError(
                f"the plain values of the state take {need} bytes, more than meta_bytes="
                f"{self.meta_bytes}: raise meta_bytes (the same on every member)"
            )
        m = self._meta
        m[: _LEN.size] = np.frombuffer(_LEN.pack(len(blob)), np.uint8)
        m[_LEN.size : need] = np.frombuffer(blob, np.uint8)
        if need < self._meta_len:
            m[need : self._meta_len] = 0  # equal states must be equal bytes
        self._meta_len = need

    def read_meta(self) -> dict[str, Any]:
        m = self._meta
        (n,) = _LEN.unpack(m[: _LEN.size].tobytes())
        if not 0 < n <= self.meta_bytes - _LEN.size:
            raise StateLayoutError(f"the received plain-value blob has a bad length {n}")
        self._meta_len = _LEN.size + n
        out: dict[str, Any] = treecodec.unpack(m[_LEN.size : _LEN.size + n])
        return out

    # ------------------------------------------------------------------ the two moments
    def capture(self) -> None:
        """After a committed optimizer step, before ``update_state``: adopt the
        optimizer's state tensors, copy device tensors to their host slots, rewrite
        the plain values."""
        self.write_meta()  # adopts (copies new state tensors into their slots) first
        with torch.no_grad():
            for live, slot in self._copies:
                slot.copy_(live)
        if self._mirror is not None:
            self._mirror.push()

    def revert(self) -> None:
        """Put the committed values back into the copied tensors (an attempt that did
        not commit changed them: BatchNorm statistics of its forward pass)."""
        with torch.no_grad():
            for live, slot in self._copies:
                live.copy_(slot)
        if self._mirror is not None and self._copies_on_device:
            self._mirror.pull()

    def load(self) -> None:
        """After ``begin_step`` received the group's state into the slots: install it
        (device copies, optimizer state, schedulers, user state, extras)."""
        plain = self.read_meta()
        with torch.no_grad():
            for live, slot in self._copies:
                live.copy_(slot)
        if self._mirror is not None:
            self._mirror.pull()
        for name, st in self.optim.items():
            st.load(plain["optim"][name])
        for name, s in self.schedulers.items():
            s.load_state_dict(plain["sched"][name])
        if self.user_state is not None:
            self.user_state.clear()
            self.user_state.update(plain["user"])
        self.extra = dict(plain["extra"])

"""An optimizer's state as fixed-shape tensors in shared memory, plus plain values.

``torch.optim`` optimizers create their state lazily, on the first ``step()``, so a
process that has not stepped yet (a newcomer) cannot know which arrays the group's
state holds. :func:`probe` finds out without touching the real optimizer: it deep-
copies it (parameters included), gives every copied parameter a zero gradient, calls
``step()`` once and reads the state it created — tensor entries become
:class:`~phalanx.torch.layout.TensorSpec` s named ``"<param index>/<key>"`` (param
index as in ``optimizer.state_dict()``). The same model and optimizer give the same
specs on every member.

:class:`SharedOptimizerState` keeps the real optimizer's state tensors *in* the shared
slots: after each ``step()`` :meth:`adopt` copies any state tensor that is not yet a
shared view into its slot and puts the view in its place (once: optimizers update
their state in place from then on, so the check is a pointer comparison), and returns
the plain values (``param_groups`` hyper-parameters, non-tensor state entries, which
parameters have state) for the
manager's plain-value blob; :meth:`load` does the reverse after a state transfer.

This module must never change the real optimizer's parameters or state in
:func:`probe`, nor accept state it could not give back exactly (it raises
:class:`~phalanx.torch.errors.StateLayoutError` instead).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from phalanx.torch.errors import StateLayoutError
from phalanx.torch.layout import TensorSpec

__all__ = ["SharedOptimizerState", "optimizer_params", "probe"]


def optimizer_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in ``state_dict()`` index order."""
    return [p for g in opt.param_groups for p in g["params"]]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _specs_of(opt: torch.optim.Optimizer) -> list[TensorSpec]:
    specs = []
    for i, p in enumerate(optimizer_params(opt)):
        st = opt.state.get(p, {})
        for key in sorted(st, key=str):
            v = st[key]
            if isinstance(v, torch.Tensor):
                if not isinstance(key, str) or "/" in key:
                    raise StateLayoutError(f"optimizer state key {key!r} is not a plain name",
                                           f"{i}")  # fmt: skip
                specs.append(TensorSpec(f"{i}/{key}", _dtype(v), tuple(v.shape)))
    return specs


def probe(opt: torch.optim.Optimizer) -> list[TensorSpec]:
    """The tensor entries ``opt`` will hold after a step (what it holds now, if it has
    stepped already)."""
    if any(opt.state.get(p) for p in optimizer_params(opt)):
        return _specs_of(opt)
    try:
        twin = copy.deepcopy(opt)
    except Exception as exc:
        raise StateLayoutError(
            f"{type(opt).__name__} cannot be copied to probe its state: {exc}"
        ) from exc
    params = optimizer_params(twin)
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        with torch.no_grad():
            twin.step()
    except Exception as exc:
        raise StateLayoutError(
            f"{type(opt).__name__}.step() without a closure failed while probing its state "
            f"({exc}); optimizers that need a closure are not supported"
        ) from exc
    return _specs_of(twin)


class SharedOptimizerState:
    """The real optimizer's state held in shared slots (see the module docstring).

    ``views``: slot name (``"<param index>/<key>"``) -> the shared tensor (on the
    parameter's device: for CUDA the manager mirrors it to host memory)."""

    def __init__(self, opt: torch.optim.Optimizer, views: dict[str, torch.Tensor]) -> None:
        self.opt = opt
        self.views = views
        self.params = optimizer_params(opt)
        self.keys: dict[int, list[str]] = {}
        for name in views:
            i, key = name.split("/", 1)
            self.keys.setdefault(int(i), []).append(key)

    def adopt(self) -> dict[str, Any]:
        """Move the state tensors into their slots (copy once, then pointers agree);
        return the plain values to keep (``groups``, ``extra``, ``init``)."""
        extra: dict[int, dict[str, Any]] = {}
        has: list[int] = []  # parameters with state (not all: e.g. streaming DiLoCo's
        # outer step moves one fragment at a time, and parameters without a gradient)
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p)
            if not st:
                continue
            has.append(i)
            want = set(self.keys.get(i, ()))
            for key in list(st):
                v = st[key]
                if isinstance(v, torch.Tensor):
                    if key not in want:
                        raise StateLayoutError(
                            f"optimizer state entry {key!r} appeared after the probe "
                            "(its shape or presence changes during training)",
                            str(i),
                        )
                    view = self.views[f"{i}/{key}"]
                    if v.shape != view.shape or v.dtype != view.dtype:
                        raise StateLayoutError(
                            f"optimizer state entry {key!r} changed to {tuple(v.shape)} "
                            f"{v.dtype} (probed {tuple(view.shape)} {view.dtype})",
                            str(i),
                        )
                    if v.data_ptr() != view.data_ptr() or v.device != view.device:
                        with torch.no_grad():
                            view.copy_(v)
                        st[key] = view
                else:
                    extra.setdefault(i, {})[str(key)] = v
            missing = want - {k for k in st if isinstance(st[k], torch.Tensor)}
            if missing:
                raise StateLayoutError(f"optimizer state entries {sorted(missing)} vanished",
                                       str(i))  # fmt: skip
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        return {"has": has, "groups": groups, "extra": extra}

    def load(self, plain: dict[str, Any]) -> None:
        """Install the group's optimizer state: slots (already received in place) and
        the plain values :meth:`adopt` returned on the source."""
        groups = plain["groups"]
        if len(groups) != len(self.opt.param_groups):
            raise StateLayoutError("the group's optimizer has another number of param groups")
        for g, saved in zip(self.opt.param_groups, groups, strict=True):
            g.update(saved)
        self.opt.state.clear()
        extra: dict[int, dict[str, Any]] = plain["extra"]
        for i in plain["has"]:
            p = self.params[i]
            st: dict[str, Any] = {}
            for key in self.keys.get(i, ()):
                st[key] = self.views[f"{i}/{key}"]
            st.update(extra.get(i, {}))
            if st:
                self.opt.state[p] = st

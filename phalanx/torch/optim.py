"""The manager behind an optimizer's own calls: :class:`OptimizerWrapper`.

For loops written around ``optimizer.zero_grad()`` / ``loss.backward()`` /
``optimizer.step()`` (the shape torchft's ``OptimizerWrapper`` keeps):

* ``zero_grad()`` opens the group's next step if none is open
  (:meth:`Manager.begin_step`: view, state, opening check) and zeroes the gradients in
  place; ``wrapper.context`` is that step (its number, rank, shard);
* ``loss.backward()`` returns with the global gradient (the manager waits for its
  buckets at the end of the backward pass), so ``clip_grad_norm_`` between
  ``backward()`` and ``step()`` clips the same gradient on every member;
* ``step()`` is :meth:`Manager.commit`: the gradients are checked, the vote is taken,
  and the wrapped optimizer (and LR scheduler) step only if every member said yes. It
  returns that answer: False means the same step is redone at the next ``zero_grad()``.

Everything else (``param_groups``, ``state``, ``state_dict`` ...) is the wrapped
optimizer's. This module must never step the optimizer itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from phalanx.errors import ConfigError
from phalanx.torch.manager import Manager, StepContext

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper:
    """See the module docstring."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.optimizer = manager.optimizer
        self._ctx: StepContext | None = None

    @property
    def context(self) -> StepContext:
        """The open step (call ``zero_grad()`` first)."""
        if self._ctx is None:
            raise ConfigError("no step is open: call zero_grad() first")
        return self._ctx

    def zero_grad(self, set_to_none: bool = False) -> None:
        if self._ctx is None:
            self._ctx = self.manager.begin_step()
        self.manager.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> bool:
        if closure is not None:
            raise ConfigError("optimizers that need a closure are not supported")
        if self._ctx is None:
            raise ConfigError("step() without zero_grad(): no step is open")
        try:
            return self.manager.commit()
        finally:
            self._ctx = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

"""HostedGroup: the :class:`ElasticGroup` a daemon hosts, plus what a daemon needs of it.

:class:`~phalanx.membership.elastic.ElasticGroup` is the training-loop-facing elastic
group; a daemon that serves a training process over the local API needs three more
things, added here without touching ``elastic.py``:

* ``reduce_scatter`` and a ``codec`` for ``broadcast``/``all_gather`` (the data-plane
  :class:`~phalanx.comm.Group` has them; ``ElasticGroup`` exposes a subset);
* a :class:`~phalanx.comm.observer.CommObserver` on every view's data-plane group, and
  a callback with each new engine (the monitor's hang checks and TCP_INFO read it).
  ``ElasticGroup`` builds its groups without an observer and offers no hook, so the
  observer is installed on the engine (``engine.observer``, a public attribute) the
  first time a collective runs on a group; the state-sync exchange that runs before a
  group's first collective is therefore not observed;
* nothing else: every collective still goes through ``ElasticGroup._collective`` (its
  retry, failure classification, reports and step bookkeeping).

This module must never hold a lock across a collective, nor change the behaviour of
the methods it inherits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from phalanx.comm import Group
from phalanx.comm.engine import Engine
from phalanx.comm.observer import CommObserver
from phalanx.membership.elastic import ElasticGroup, ElasticResult

__all__ = ["HostedGroup"]


class HostedGroup(ElasticGroup):
    """An :class:`ElasticGroup` with every collective and an observer on every view.

    Extra args (keyword-only): ``observer`` is installed on each view's engine before
    its first collective; ``on_engine(engine)`` is called then too (monitor.attach).
    """

    def __init__(
        self,
        *args: Any,
        observer: CommObserver | None = None,
        on_engine: Callable[[Engine], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._comm_observer = observer
        self._on_engine = on_engine
        self._observed: int | None = None  # id() of the engine last wired
        super().__init__(*args, **kwargs)

    def _wire(self, g: Group) -> Group:
        engine = g.engine
        if self._observed != id(engine):
            self._observed = id(engine)
            if self._comm_observer is not None:
                engine.observer = self._comm_observer
            if self._on_engine is not None:
                self._on_engine(engine)
        return g

    def all_reduce(
        self,
        x: np.ndarray,
        op: str = "sum",
        codec: str = "none",
        *,
        retry: bool = False,
        timeout: float | None = None,
    ) -> ElasticResult:
        """In-place all-reduce over the current view."""
        return self._collective(
            "all_reduce", lambda g: self._wire(g).all_reduce(x, op, codec), retry, timeout
        )

    def reduce_scatter(
        self,
        x: np.ndarray,
        op: str = "sum",
        codec: str = "none",
        *,
        retry: bool = False,
        timeout: float | None = None,
    ) -> ElasticResult:
        """Reduce over the view; only this rank's chunk of ``x`` is written."""
        return self._collective(
            "reduce_scatter",
            lambda g: self._wire(g).reduce_scatter(x, op, codec),
            retry,
            timeout,
        )

    def broadcast(
        self,
        x: np.ndarray,
        root: int = 0,
        *,
        codec: str = "none",
        retry: bool = False,
        timeout: float | None = None,
    ) -> ElasticResult:
        """Copy rank ``root``'s ``x`` to every member (rank in the view it runs in)."""
        return self._collective(
            "broadcast", lambda g: self._wire(g).broadcast(x, root, codec), retry, timeout
        )

    def all_gather(
        self,
        x: np.ndarray,
        *,
        codec: str = "none",
        retry: bool = False,
        timeout: float | None = None,
    ) -> ElasticResult:
        """Every rank's chunk of ``x`` (``Group.chunk``) ends up in every rank's ``x``."""
        return self._collective(
            "all_gather", lambda g: self._wire(g).all_gather(x, codec), retry, timeout
        )

    def barrier(self, *, retry: bool = False, timeout: float | None = None) -> ElasticResult:
        return self._collective("barrier", lambda g: self._wire(g).barrier(), retry, timeout)

    def chunk_of(self, size: int) -> tuple[int, int]:
        """(start, stop) of this member's chunk of a ``size``-element array in the
        current view (what reduce_scatter writes and all_gather contributes)."""
        from phalanx.comm.schedules import partition

        view = self.view
        me = self.member_id
        if me not in view:
            return (0, 0)
        a, b = partition(size, view.size)[view.rank(me)]
        return (int(a), int(b))

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
* rejoining by itself after an eviction (a SIGSTOPped daemon that wakes, a partition
  that heals): a daemon exists to be in the group, so it joins again with a higher
  incarnation in the background; its client sees ``Evicted`` until then and receives
  the group's state at its next ``begin_step``;
* nothing else: every collective still goes through ``ElasticGroup._collective`` (its
  retry, failure classification, reports and step bookkeeping).

This module must never hold a lock across a collective, nor change the behaviour of
the methods it inherits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from phalanx.comm import Group
from phalanx.comm.engine import Engine
from phalanx.comm.observer import CommObserver
from phalanx.membership.elastic import ElasticGroup, ElasticResult
from phalanx.membership.view import View

__all__ = ["HostedGroup"]

log = logging.getLogger(__name__)


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
        auto_rejoin: bool = True,
        rejoin_timeout: float = 15.0,
        **kwargs: Any,
    ) -> None:
        self._comm_observer = observer
        self._on_engine = on_engine
        self._observed: int | None = None  # id() of the engine last wired
        self._auto_rejoin = auto_rejoin
        self._rejoin_timeout = rejoin_timeout
        self._rejoin_stop = threading.Event()  # set by close(): never cleared
        self._left = False  # leave() on purpose: no automatic return until rejoin()
        self._rejoiner: threading.Thread | None = None
        super().__init__(*args, **kwargs)

    def _on_evicted(self, epoch: int) -> None:
        super()._on_evicted(epoch)
        if not self._auto_rejoin or self._rejoin_stop.is_set() or self._left:
            return
        if self._rejoiner is not None and self._rejoiner.is_alive():
            return
        self._rejoiner = threading.Thread(
            target=self._rejoin_loop, name="phalanx-rejoin", daemon=True
        )
        self._rejoiner.start()

    def _rejoin_loop(self) -> None:
        """Join again until it works or the group closes (backoff 0.2 s .. 5 s)."""
        delay = 0.2
        while not self._rejoin_stop.is_set() and not self._left and self.evicted:
            try:
                view = super().rejoin(self._rejoin_timeout)
                log.warning(
                    "event=rejoined reason=evicted member=%s epoch=%d members=%s",
                    self.member_id,
                    view.epoch,
                    ",".join(view.ids),
                )
                return
            except Exception as exc:  # coordinator away, refused: try again later
                log.warning("event=rejoin_failed member=%s error=%r", self.member_id, str(exc))
            if self._rejoin_stop.wait(delay):
                return
            delay = min(delay * 2, 5.0)

    def leave(self, timeout: float | None = None, reason: str = "") -> None:
        self._left = True  # leaving on purpose: do not come back by ourselves
        super().leave(timeout, reason)

    def rejoin(self, timeout: float = 15.0) -> View:
        self._left = False
        return super().rejoin(timeout)

    def close(self) -> None:
        self._rejoin_stop.set()
        t = self._rejoiner
        super().close()
        if t is not None:
            t.join(self._rejoin_timeout + 5.0)

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

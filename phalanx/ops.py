"""What every layer says about a collective: what to run, what it returned, and the wait.

The same classes travel from the data-plane engine up to the training loop:

* :class:`OpSpec` — one collective to run: its kind, reduce op, codec and root. The
  client builds it, the local protocol carries it, the elastic group and the data-plane
  :class:`~phalanx.comm.Group` run it (``run(spec, array)``): the collectives are named
  once, here, and every layer forwards a spec instead of spelling them out again;
* :class:`OpResult` — a completed collective. The engine makes it (contributors named
  by the group's member names), the elastic group fills in the epoch of the view and
  the failed attempts, the client whether it ran on the caller's own memory;
* :class:`Handle` — an op in flight (``async_op=True``), whoever runs it;
* :class:`StepInfo` and :class:`ViewInfo` — what ``begin_step`` found and the current
  view, the same from an :class:`~phalanx.membership.elastic.ElasticGroup` in-process
  and from a daemon through the client.

Frozen values and one small waiting helper: this module must never import numpy, the
data plane or anything with side effects (the client imports it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from phalanx.errors import ConfigError

__all__ = [
    "COLLECTIVES",
    "LAYOUT_KINDS",
    "Handle",
    "OpResult",
    "OpSpec",
    "StepInfo",
    "ViewInfo",
    "layout_tag",
]

#: every collective phalanx runs, by name
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier")
#: the collectives whose array is laid out per view (a chunk per rank): they take a
#: layout tag (:attr:`OpSpec.layout`)
LAYOUT_KINDS = ("reduce_scatter", "all_gather")


def layout_tag(layout_epoch: int | None) -> int:
    """A caller's ``layout_epoch`` as :attr:`OpSpec.layout` holds it (-1: untagged)."""
    return -1 if layout_epoch is None else layout_epoch


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One collective: ``kind`` (see :data:`COLLECTIVES`), the ``reduce`` op (sum,
    avg, min, max, prod; reductions only), the ``codec`` (none, zstd, fp16, bf16,
    int8), the ``root`` rank of a broadcast, and the ``layout`` tag of an all_gather
    or reduce_scatter: the view epoch the caller laid its array out for (-1:
    untagged; a plain int so that an untagged op costs the local protocol nothing but
    8 packed bytes). The tag is part of what every member must call identically (the
    op's descriptor, docs/comm.md "Mismatched calls"): members that laid out for
    different views all fail the op with ``OpMismatch`` naming ``layout``."""

    kind: str
    reduce: str = "sum"
    codec: str = "none"
    root: int = 0
    layout: int = -1

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVES:
            raise ConfigError(f"unknown collective {self.kind!r}; one of {', '.join(COLLECTIVES)}")
        if self.root < 0:
            raise ConfigError(f"root must be >= 0, got {self.root}")
        if self.layout != -1:
            if self.kind not in LAYOUT_KINDS:
                raise ConfigError(
                    f"a layout tag applies to {' and '.join(LAYOUT_KINDS)}, not {self.kind}"
                )
            if not 0 <= self.layout < 2**63:
                raise ConfigError(f"layout must be a view epoch (>= 0) or -1, got {self.layout}")

    @property
    def needs_array(self) -> bool:
        return self.kind != "barrier"


@dataclass(frozen=True, slots=True)
class OpResult:
    """A completed collective.

    ``op``, ``seq`` (sequence number in the data-plane group it ran in), ``epoch`` (of
    the view it ran in), ``algorithm``, ``nbytes`` (the array's), ``codec``, ``world``,
    bytes on the wire both ways, ``duration_s``, ``contributors`` (member names whose
    data went into the result, in rank order: a static group names its ranks ``"0"``,
    ``"1"``, ... unless given names), ``failed_attempts`` before this one
    (``retry=True``), and ``zero_copy``: False when the client staged the array
    through a copy (it did not live in shared memory). ``in_twin`` is plumbing: True
    when the data plane left an all-reduce's result in the ``into`` buffer it was
    given rather than in the array (the daemon's twin regions, docs/daemon.md); the
    client has exchanged the pages by the time a caller sees the result.
    """

    op: str
    seq: int
    epoch: int
    algorithm: str
    nbytes: int
    codec: str
    world: int
    wire_bytes_sent: int
    wire_bytes_recv: int
    duration_s: float
    contributors: tuple[str, ...]
    failed_attempts: int = 0
    zero_copy: bool = True
    in_twin: bool = False


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What ``begin_step`` found: the view (``epoch``, ``members`` in rank order), the
    ``step`` the state is at, and whether **this** call received the group's state
    (``synced``, ``sync_bytes``, ``sync_s`` the transfer took) into the attached arrays."""

    epoch: int
    members: tuple[str, ...]
    step: int
    synced: bool = False
    sync_bytes: int = 0
    sync_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ViewInfo:
    """A view: ``epoch``, member ids in rank order, this member's ``rank`` (None while
    not in it) and id."""

    epoch: int
    members: tuple[str, ...]
    rank: int | None
    member_id: str

    @property
    def world(self) -> int:
        return len(self.members)


class Handle:
    """An operation in flight (``async_op=True``). :meth:`wait` returns its
    :class:`OpResult` or raises its error; the array must not be touched before.

    ``settle(timeout)`` is the runner's: it returns the result once the op ended,
    ``None`` if it is still running after ``timeout`` seconds (``None``: as long as
    the op's own deadline), or raises the op's error. It is called until it settles,
    one caller at a time; the outcome is kept.
    """

    __slots__ = ("_error", "_lock", "_result", "_settle")

    def __init__(self, settle: Callable[[float | None], OpResult | None]) -> None:
        self._settle = settle
        self._result: OpResult | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def _poll(self, timeout: float | None) -> bool:
        with self._lock:
            if self._result is not None or self._error is not None:
                return True
            try:
                result = self._settle(timeout)
            except BaseException as exc:
                self._error = exc
                return True
            if result is None:
                return False
            self._result = result
            return True

    def done(self) -> bool:
        """True once the result (or error) is in; never blocks."""
        return self._poll(0.0)

    def wait(self, timeout: float | None = None) -> OpResult:
        """Block until the op ends (at most its deadline); ``timeout``: give up waiting
        sooner (``TimeoutError``; the op goes on, wait again later)."""
        if not self._poll(timeout):
            raise TimeoutError(f"operation still running after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

"""Plans: a collective as a dataflow of sends, receives and compute steps.

:mod:`phalanx.comm.collectives` builds a :class:`Plan` for each operation; the
:class:`~phalanx.comm.engine.Engine` runs it. A plan is per link an ordered list of
frames to send and an ordered list of frames to receive, plus compute steps, tied
together by dependency counts: a node runs when every node it waits for is done.
Plans also carry what the engine must do at the end (success steps, undo steps on
failure), the scratch buffers they borrowed, and the caller's :class:`Deadline`.

A plan borrows from a :class:`PlanHost` — the streams to each peer and two buffer
pools — and knows nothing else of what runs it (the engine is one such host; the
dependency goes one way: ``engine`` imports ``plan``, never the reverse).

This module holds data and bookkeeping only: no sockets, no threads, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from phalanx.comm import pageswap
from phalanx.comm.buffers import BufferPool
from phalanx.comm.descriptor import OpDescriptor
from phalanx.comm.transport import Buffer
from phalanx.deadline import Deadline
from phalanx.ops import OpResult

__all__ = ["ComputeNode", "Node", "Plan", "PlanHost", "RecvNode", "RecvThen", "SendNode"]


class PlanHost(Protocol):
    """What a plan borrows from whoever runs it.

    ``links``: per peer rank, its streams (opaque keys: a plan orders its sends and
    receives per stream and hands them back to the host); ``pool``: scratch buffers;
    ``twins``: page-swap twins (comm/pageswap.py)."""

    @property
    def links(self) -> Mapping[int, Sequence[Hashable]]: ...

    @property
    def pool(self) -> BufferPool: ...

    @property
    def twins(self) -> BufferPool: ...


class Node:
    __slots__ = ("children", "done", "waiting")

    def __init__(self) -> None:
        self.waiting = 0
        self.children: list[Node] = []
        self.done = False

    def after(self, deps: Iterable[Node | None]) -> None:
        for dep in deps:
            if dep is not None and not dep.done:
                dep.children.append(self)
                self.waiting += 1


class SendNode(Node):
    """Send one frame; ``produce()`` returns (codec id, payload) once deps are done.

    ``zero_copy``: the payload is plan scratch that nothing writes to again in this
    plan, so the engine may hand its pages to the kernel (see comm/zerocopy.py)."""

    __slots__ = ("ordinal", "produce", "state", "zero_copy")

    def __init__(
        self,
        state: Hashable,
        ordinal: int,
        produce: Callable[[], tuple[int, Buffer]],
        zero_copy: bool = False,
    ) -> None:
        super().__init__()
        self.state = state
        self.ordinal = ordinal
        self.produce = produce
        self.zero_copy = zero_copy


RecvThen = Callable[[int, memoryview, bool], None]


class RecvNode(Node):
    """Receive one frame. A raw payload of exactly ``len(direct)`` bytes lands in
    ``direct``; anything else (encoded) in a fresh buffer of at most ``max_encoded``
    bytes. ``prepare()`` runs once the frame's header is in, before any payload byte
    is written; ``then(codec, payload, was_direct)`` runs when it is complete."""

    __slots__ = ("direct", "max_encoded", "ordinal", "prepare", "state", "then")

    def __init__(
        self,
        state: Hashable,
        ordinal: int,
        direct: memoryview | None,
        max_encoded: int,
        then: RecvThen | None,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.ordinal = ordinal
        self.direct = direct
        self.max_encoded = max_encoded
        self.then = then
        self.prepare = prepare


class ComputeNode(Node):
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        super().__init__()
        self.fn = fn


@dataclass(frozen=True, slots=True)
class _Frozen:
    """What :meth:`Plan.rearm` puts back: the plan's state as it was built."""

    waiting: list[int]
    ready: list[Node]
    pending: int
    failure: list[Callable[[], None]]
    sends: dict[Hashable, list[SendNode]]
    recvs: dict[Hashable, list[RecvNode]]


class Plan:
    """A collective as per-link ordered sends/receives plus compute, built before it runs."""

    def __init__(
        self,
        host: PlanHost,
        kind: str,
        *,
        algorithm: str,
        nbytes: int,
        codec: str,
    ) -> None:
        self.host = host
        self.kind = kind
        self.algorithm = algorithm
        self.nbytes = nbytes
        self.codec = codec
        self.seq = -1  # assigned at submit
        self.sends: dict[Hashable, deque[SendNode]] = {}
        self.recvs: dict[Hashable, deque[RecvNode]] = {}
        self._ordinals: dict[tuple[Hashable, bool], int] = {}
        self.ready: list[Node] = []
        self.pending = 0
        self.success: list[Callable[[], None]] = []
        self.failure: list[Callable[[], None]] = []
        self.borrowed: list[np.ndarray] = []
        self.twins: list[np.ndarray] = []  # arenas from the engine's twin pool
        self.future: Future[OpResult] = Future()
        #: the caller's deadline: the engine fails the op once it passes (None: only
        #: the engine's own progress timeout applies)
        self.deadline: Deadline | None = None
        #: a wait that is the protocol's, not a stall (a state transfer's verdict,
        #: which waits while other ranks move the bytes elsewhere): while every peer it
        #: waits on answers the probes, it is bounded by its deadline alone. Set only
        #: together with a deadline (Group.run)
        self.patient = False
        #: False when the caller waived promise 2 for this op (preserve_input=False)
        self.preserves_input = True
        #: True when an all-reduce given ``into`` leaves its result there (the caller's
        #: array untouched; the caller exchanges the two on success)
        self.into_used = False
        #: peers this plan sent zero-copy frames to: it ends only once each of them
        #: sent a RECEIPT for it (Engine._seal), and after a failure what it spliced
        #: from is never reused as it is
        self.spliced: set[int] = set()
        #: peers that asked for a RECEIPT (FLAG_RECEIPT): sent once every node is done
        self.receipts: set[int] = set()
        #: whether those RECEIPTs went out (the plan may then still wait for its own)
        self.receipts_sent = False
        #: what every rank must agree on (descriptor.py); its digest goes in the
        #: header of every DATA frame of this plan (0: none, nothing is checked)
        self.descriptor: OpDescriptor | None = None
        self.digest = 0
        #: once ranks are known to disagree on this op: rank -> its descriptor, as far
        #: as they are in (the engine then runs the MISMATCH exchange, not the plan)
        self.mismatch: dict[int, OpDescriptor] | None = None
        self.mismatch_by: int | None = None
        #: set by collectives for a plan that may run again (see :meth:`freeze`): the
        #: engine hands it back to its host's ``reusable`` once it is done with it
        self.reuse_key: Hashable | None = None
        #: a reusable plan's way to take its next input array (see :meth:`freeze`)
        self.rebind: Callable[[np.ndarray], None] | None = None
        self._nodes: list[Node] = []
        self._frozen: _Frozen | None = None

    def describe(self, descriptor: OpDescriptor) -> None:
        """Name what this plan is (kind, count, dtype, op, codec, root, ...)."""
        self.descriptor = descriptor
        self.digest = descriptor.digest

    def _link(self, peer: int, piece: int) -> Hashable:
        streams = self.host.links[peer]
        return streams[piece % len(streams)]

    def _ordinal(self, link: Hashable, sending: bool) -> int:
        key = (link, sending)
        n = self._ordinals.get(key, 0)
        self._ordinals[key] = n + 1
        return n

    def _add(self, node: Node, deps: Iterable[Node | None]) -> None:
        node.after(deps)
        self.pending += 1
        self._nodes.append(node)
        if node.waiting == 0:
            self.ready.append(node)

    def freeze(self, key: Hashable) -> None:
        """Mark this just-built plan as one that can run again: :meth:`rearm` puts
        every node, queue and per-run field back to what it is now. Only for plans
        that borrow nothing (no scratch, no twins): those go back to their pools."""
        if self.borrowed or self.twins:
            raise ValueError("a plan that borrowed pool memory cannot be kept for reuse")
        self.reuse_key = key
        self._frozen = _Frozen(
            waiting=[n.waiting for n in self._nodes],
            ready=list(self.ready),
            pending=self.pending,
            failure=list(self.failure),
            sends={k: list(v) for k, v in self.sends.items()},
            recvs={k: list(v) for k, v in self.recvs.items()},
        )

    def rearm(self) -> None:
        """Make a frozen plan that ran (and ended) ready to run again, as built."""
        frozen = self._frozen
        if frozen is None:
            raise ValueError("only a frozen plan can be rearmed")
        if self.borrowed or self.twins:
            raise ValueError("a plan that borrowed pool memory cannot be rearmed")
        for node, waiting in zip(self._nodes, frozen.waiting, strict=True):
            node.waiting = waiting
            node.done = False
        self.ready = list(frozen.ready)
        self.pending = frozen.pending
        self.sends = {k: deque(v) for k, v in frozen.sends.items()}
        self.recvs = {k: deque(v) for k, v in frozen.recvs.items()}
        self.failure = list(frozen.failure)
        self.seq = -1
        self.future = Future()
        self.deadline = None
        self.patient = False
        self.preserves_input = True
        self.into_used = False
        self.spliced = set()
        self.receipts = set()
        self.receipts_sent = False
        self.mismatch = None
        self.mismatch_by = None

    def send(
        self,
        peer: int,
        piece: int,
        produce: Callable[[], tuple[int, Buffer]],
        after: Iterable[Node | None] = (),
        *,
        zero_copy: bool = False,
    ) -> SendNode:
        link = self._link(peer, piece)
        node = SendNode(link, self._ordinal(link, True), produce, zero_copy)
        self.sends.setdefault(link, deque()).append(node)
        self._add(node, after)
        return node

    def send_raw(
        self, peer: int, piece: int, data: Buffer, after: Iterable[Node | None] = ()
    ) -> SendNode:
        payload = (0, data)
        return self.send(peer, piece, lambda: payload, after)

    def recv(
        self,
        peer: int,
        piece: int,
        *,
        direct: memoryview | None,
        max_encoded: int,
        then: RecvThen | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> RecvNode:
        link = self._link(peer, piece)
        node = RecvNode(link, self._ordinal(link, False), direct, max_encoded, then, prepare)
        self.recvs.setdefault(link, deque()).append(node)
        self._add(node, ())
        return node

    def compute(self, fn: Callable[[], None], after: Iterable[Node | None] = ()) -> ComputeNode:
        node = ComputeNode(fn)
        self._add(node, after)
        return node

    def on_success(self, fn: Callable[[], None]) -> None:
        """Finish the result (write the caller's memory); runs where the engine runs
        (its thread, or a caller's whose op ended while it started inline)."""
        self.success.append(fn)

    def on_failure(self, fn: Callable[[], None]) -> None:
        """Undo work on the caller's memory; runs where the engine runs (its thread, or
        a caller's starting an op inline) when the op fails."""
        self.failure.append(fn)

    def scratch(self, count: int, dtype: np.dtype) -> np.ndarray:
        """A work array of ``count`` elements borrowed from the group's pool for the
        lifetime of this plan (contents undefined)."""
        buf = self.host.pool.get(count * dtype.itemsize)
        self.borrowed.append(buf)
        return buf[: count * dtype.itemsize].view(dtype)

    def twin(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(arena, twin): memory borrowed for this plan that can exchange pages with
        ``x`` (see comm/pageswap.py); the arena goes back to the pool at the end
        unless :meth:`drop_twin` says the exchange damaged it."""
        arena = self.host.twins.get(x.nbytes + pageswap.HUGE)
        self.twins.append(arena)
        return arena, pageswap.twin(arena, x)

    def drop_twin(self, arena: np.ndarray) -> None:
        self.twins = [t for t in self.twins if t is not arena]

    def release(self) -> None:
        bufs, self.borrowed = self.borrowed, []
        for buf in bufs:
            self.host.pool.put(buf)
        twins, self.twins = self.twins, []
        for arena in twins:
            self.host.twins.put(arena)

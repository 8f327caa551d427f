"""Collective schedules: which chunk goes where, at each step, for each rank.

Every collective phalanx runs is a list of :class:`Step` per rank, computed here by
pure functions of ``(rank, world[, root])``; the engine executes the steps over its
links and never works out a peer or a chunk index by itself. :func:`partition` and
:func:`split` say which elements a chunk index (and a pipelined sub-chunk) stands for.
:func:`simulate` runs one schedule per rank against each other with symbolic values,
checking that sends and receives pair up over FIFO links; it is what the tests use to
prove each schedule correct, and the engine's tests can use it the same way.

Semantics of a step: the rank posts its send (the value of ``send_chunk`` *as it was
when the step began*) and its receive at the same time; the step is over when both
are done. Received data is combined into the local chunk: ``"reduce"`` sets
``local = op(local, received)``, ``"copy"`` sets ``local = received``; ``"none"`` marks a
zero-payload token step (barrier). On a send-only step ``combine`` says what the
receiver will do with the data, so both ends of every message agree on it.

This module must never do I/O, start threads, read the clock, or touch array data:
it deals in ranks and chunk indices only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar, get_args

from phalanx.errors import ConfigError, ScheduleError

__all__ = [
    "Combine",
    "Message",
    "ScheduleError",
    "Simulation",
    "Step",
    "binomial_broadcast",
    "chain_broadcast",
    "dissemination_barrier",
    "partition",
    "recursive_doubling",
    "ring_all_gather",
    "ring_reduce_scatter",
    "simulate",
    "split",
]

Combine = Literal["reduce", "copy", "none"]
_COMBINES: frozenset[str] = frozenset(get_args(Combine))

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Step:
    """One step of one rank's schedule (see the module docstring for the semantics).

    ``send_chunk``/``recv_chunk`` index into :func:`partition` of the buffer; ``None``
    means the whole buffer (or, with ``combine="none"``, a token with no payload).
    """

    send_to: int | None
    send_chunk: int | None
    recv_from: int | None
    recv_chunk: int | None
    combine: Combine

    def __post_init__(self) -> None:
        if self.combine not in _COMBINES:
            raise ConfigError(f"combine must be one of {sorted(_COMBINES)}, got {self.combine!r}")
        if self.send_to is None and self.recv_from is None:
            raise ConfigError("a step must send or receive something")
        for name in ("send_to", "send_chunk", "recv_from", "recv_chunk"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.send_chunk is not None and self.send_to is None:
            raise ConfigError("send_chunk given without send_to")
        if self.recv_chunk is not None and self.recv_from is None:
            raise ConfigError("recv_chunk given without recv_from")
        if self.combine == "none" and (self.send_chunk is not None or self.recv_chunk is not None):
            raise ConfigError('combine "none" is for zero-payload token steps: chunks must be None')

    @property
    def carries_data(self) -> bool:
        """Whether the messages of this step carry data (else they are tokens)."""
        return self.combine != "none"


# --------------------------------------------------------------------------- chunking


def partition(count: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into ``parts`` balanced contiguous ``[start, stop)`` ranges.

    The first ``count % parts`` ranges get one element more; ranges may be empty when
    ``count < parts``.
    """
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    if parts < 1:
        raise ConfigError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(count, parts)
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def split(start: int, stop: int, max_len: int) -> list[tuple[int, int]]:
    """Cut ``[start, stop)`` into consecutive pieces of at most ``max_len`` elements.

    An empty range gives exactly one empty piece ``[(start, start)]``, so that a frame is
    still exchanged for it and every rank's step counts match.
    """
    if start < 0 or stop < start:
        raise ConfigError(f"need 0 <= start <= stop, got [{start}, {stop})")
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    if start == stop:
        return [(start, start)]
    return [(lo, min(lo + max_len, stop)) for lo in range(start, stop, max_len)]


# --------------------------------------------------------------------------- schedules


def _check_rank(rank: int, world: int) -> None:
    if world < 1:
        raise ConfigError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, {world}), got {rank}")


def _check_root(root: int, world: int) -> None:
    if not 0 <= root < world:
        raise ConfigError(f"root must be in [0, {world}), got {root}")


def ring_reduce_scatter(rank: int, world: int) -> list[Step]:
    """``world - 1`` steps around the ring; afterwards rank r holds reduced chunk r.

    Step s sends chunk ``(rank - s - 1) % world`` to ``rank + 1`` and receives chunk
    ``(rank - s - 2) % world`` from ``rank - 1``, reducing it in.
    """
    _check_rank(rank, world)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    return [
        Step(nxt, (rank - s - 1) % world, prv, (rank - s - 2) % world, "reduce")
        for s in range(world - 1)
    ]


def ring_all_gather(rank: int, world: int) -> list[Step]:
    """``world - 1`` steps around the ring; rank r starts with chunk r, ends with all.

    Step s sends chunk ``(rank - s) % world`` to ``rank + 1`` and receives chunk
    ``(rank - s - 1) % world`` from ``rank - 1``, copying it in.
    """
    _check_rank(rank, world)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    return [
        Step(nxt, (rank - s) % world, prv, (rank - s - 1) % world, "copy") for s in range(world - 1)
    ]


def recursive_doubling(rank: int, world: int) -> list[Step]:
    """Whole-buffer all-reduce in ``log2(p)`` exchange rounds (+2 when world != p).

    With ``p`` the largest power of two <= world and ``e = world - p``: ranks
    ``p..world-1`` first fold their buffer into ``rank - p``; ranks below ``p`` then
    exchange-and-reduce with ``rank ^ (1 << k)`` for each k; finally ranks below ``e``
    hand the result back to ``rank + p``. A rank with no part in a phase has no step.
    """
    _check_rank(rank, world)
    p = 1 << (world.bit_length() - 1)
    e = world - p
    if rank >= p:
        return [
            Step(rank - p, None, None, None, "reduce"),
            Step(None, None, rank - p, None, "copy"),
        ]
    steps: list[Step] = []
    if rank < e:
        steps.append(Step(None, None, rank + p, None, "reduce"))
    for k in range(p.bit_length() - 1):
        partner = rank ^ (1 << k)
        steps.append(Step(partner, None, partner, None, "reduce"))
    if rank < e:
        steps.append(Step(rank + p, None, None, None, "copy"))
    return steps


def binomial_broadcast(rank: int, world: int, root: int) -> list[Step]:
    """Whole-buffer broadcast down a binomial tree rooted at ``root``.

    With ``v = (rank - root) % world``: a non-root receives from ``v - lowbit(v)``, then
    every rank sends to ``v + m`` for the powers of two ``m`` below its lowest set bit
    (below the tree's span for the root), largest first, so that the biggest subtrees
    start earliest. Depth is ``ceil(log2(world))``.
    """
    _check_rank(rank, world)
    _check_root(root, world)
    v = (rank - root) % world
    steps: list[Step] = []
    if v == 0:
        mask = 1 << _ceil_log2(world)
    else:
        mask = v & -v
        steps.append(Step(None, None, (v - mask + root) % world, None, "copy"))
    mask >>= 1
    while mask:
        if v + mask < world:
            steps.append(Step((v + mask + root) % world, None, None, None, "copy"))
        mask >>= 1
    return steps


def chain_broadcast(rank: int, world: int, root: int) -> list[Step]:
    """Whole-buffer broadcast along ``root, root+1, ..., root-1`` (for large payloads).

    Expressed as **two Steps**: a receive from the predecessor (non-root ranks), then a
    send to the successor (all but the last rank). It cannot be one Step because a
    Step sends the value its chunk had when the step began. The engine pipelines the
    pair per sub-chunk (:func:`split`): a receive step directly followed by a send step
    of the same chunk forwards each sub-chunk as soon as it has arrived.
    """
    _check_rank(rank, world)
    _check_root(root, world)
    v = (rank - root) % world
    steps: list[Step] = []
    if v > 0:
        steps.append(Step(None, None, (rank - 1) % world, None, "copy"))
    if v < world - 1:
        steps.append(Step((rank + 1) % world, None, None, None, "copy"))
    return steps


def dissemination_barrier(rank: int, world: int) -> list[Step]:
    """``ceil(log2(world))`` token rounds: round k sends to ``rank + 2**k`` and receives
    from ``rank - 2**k``; after the last round every rank has heard from all others."""
    _check_rank(rank, world)
    return [
        Step((rank + (1 << k)) % world, None, (rank - (1 << k)) % world, None, "none")
        for k in range(_ceil_log2(world))
    ]


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


# --------------------------------------------------------------------------- simulator


@dataclass(frozen=True, slots=True)
class Message:
    """One matched send/receive, as :func:`simulate` saw it."""

    src: int
    dst: int
    chunk: int | None
    combine: Combine
    src_step: int  # index of the step in the sender's schedule
    dst_step: int  # index of the step in the receiver's schedule
    time: int  # lockstep round in which it was exchanged (0-based)


@dataclass(frozen=True, slots=True)
class Simulation(Generic[T]):
    """Outcome of :func:`simulate`.

    values: every rank's chunks at the end.
    heard: for every rank, the ranks it has (transitively) heard from, itself included.
    rounds: lockstep rounds until the last rank finished (each step takes one round and
        a message needs both ends to be at its step).
    messages: every message, in the order they were matched.
    """

    values: tuple[tuple[T, ...], ...]
    heard: tuple[frozenset[int], ...]
    rounds: int
    messages: tuple[Message, ...]


@dataclass(slots=True)
class _Rank(Generic[T]):
    steps: Sequence[Step]
    values: list[T]
    heard: set[int]
    pc: int = 0
    start: int = 0  # round at which the current step began
    finish: int = 0  # latest round a message of the current step was exchanged in, + 1
    sent: bool = False
    received: bool = False
    payload: tuple[T, ...] = ()  # send payload, snapshotted when the step began
    heard_at_start: frozenset[int] = field(default_factory=frozenset)

    @property
    def step(self) -> Step | None:
        return self.steps[self.pc] if self.pc < len(self.steps) else None


def simulate(
    schedules: Sequence[Sequence[Step]],
    initial: Sequence[Sequence[T]],
    reduce: Callable[[T, T], T] | None = None,
) -> Simulation[T]:
    """Run one schedule per rank against each other and return the final state.

    ``initial[r]`` is rank r's chunks (a whole-buffer message carries all of them);
    ``reduce(local, received)`` combines a chunk for ``"reduce"`` steps. Links are
    FIFO per (sender, receiver) and unbuffered: a send completes only when the
    receiver takes it, which is the strictest model a real link can be (a schedule
    that runs here also runs with any amount of buffering). Raises
    :class:`ScheduleError` when a message's two ends disagree on chunk or combine,
    a peer or chunk is out of range, or some rank waits for ever (deadlock).
    """
    world = len(schedules)
    if world < 1 or len(initial) != world:
        raise ScheduleError("bad-input", f"{world} schedules for {len(initial)} initial buffers")
    nchunks = len(initial[0])
    if any(len(buf) != nchunks for buf in initial):
        raise ScheduleError("bad-input", "every rank must start with the same number of chunks")
    ranks = [_Rank(list(schedules[r]), list(initial[r]), {r}) for r in range(world)]
    for r, st in enumerate(ranks):
        for i, step in enumerate(st.steps):
            for peer in (step.send_to, step.recv_from):
                if peer is not None and (peer == r or peer >= world):
                    raise ScheduleError("bad-peer", f"rank {r} step {i}: peer {peer}", rank=r)
            for chunk in (step.send_chunk, step.recv_chunk):
                if chunk is not None and chunk >= nchunks:
                    raise ScheduleError("bad-chunk", f"rank {r} step {i}: chunk {chunk}", rank=r)
            if step.combine == "reduce" and step.recv_from is not None and reduce is None:
                raise ScheduleError("bad-input", "a reduce step needs reduce=", rank=r)
        _begin(st, st.start)

    messages: list[Message] = []
    progress = True
    while progress:
        progress = False
        for dst, rx in enumerate(ranks):
            rstep = rx.step
            if rstep is None or rstep.recv_from is None or rx.received:
                continue
            src = rstep.recv_from
            tx = ranks[src]
            sstep = tx.step
            if sstep is None or sstep.send_to != dst or tx.sent:
                continue  # the sender is not (yet) at its matching send
            if (sstep.send_chunk, sstep.combine) != (rstep.recv_chunk, rstep.combine):
                raise ScheduleError(
                    "mismatch",
                    f"rank {src} step {tx.pc} sends chunk {sstep.send_chunk} ({sstep.combine}) "
                    f"but rank {dst} step {rx.pc} receives chunk {rstep.recv_chunk} "
                    f"({rstep.combine}) from it",
                    rank=dst,
                )
            time = max(tx.start, rx.start)
            messages.append(Message(src, dst, rstep.recv_chunk, rstep.combine, tx.pc, rx.pc, time))
            _apply(rx, rstep, tx.payload, reduce)
            rx.heard |= tx.heard_at_start | {src}
            tx.sent = rx.received = True
            for st in (tx, rx):
                st.finish = max(st.finish, time + 1)
                _maybe_advance(st)
            progress = True

    stuck = [r for r, st in enumerate(ranks) if st.step is not None]
    if stuck:
        waits = "; ".join(_describe_wait(r, ranks[r]) for r in stuck)
        raise ScheduleError("deadlock", waits, rank=stuck[0])
    return Simulation(
        values=tuple(tuple(st.values) for st in ranks),
        heard=tuple(frozenset(st.heard) for st in ranks),
        rounds=max((st.start for st in ranks), default=0),
        messages=tuple(messages),
    )


def _begin(st: _Rank[T], start: int) -> None:
    """Enter the step at ``st.pc`` at round ``start``, snapshotting what it sends."""
    st.start = st.finish = start
    step = st.step
    st.sent = step is None or step.send_to is None
    st.received = step is None or step.recv_from is None
    st.heard_at_start = frozenset(st.heard)
    if step is not None and step.send_to is not None and step.carries_data:
        chunk = step.send_chunk
        st.payload = tuple(st.values) if chunk is None else (st.values[chunk],)
    else:
        st.payload = ()


def _maybe_advance(st: _Rank[T]) -> None:
    if st.sent and st.received:
        st.pc += 1
        _begin(st, st.finish)


def _apply(
    rx: _Rank[T], step: Step, payload: tuple[T, ...], reduce: Callable[[T, T], T] | None
) -> None:
    if step.combine == "none":
        return
    idx = range(len(rx.values)) if step.recv_chunk is None else (step.recv_chunk,)
    for i, value in zip(idx, payload, strict=True):
        if step.combine == "copy":
            rx.values[i] = value
        else:
            assert reduce is not None  # checked up front
            rx.values[i] = reduce(rx.values[i], value)


def _describe_wait(r: int, st: _Rank[T]) -> str:
    step = st.step
    assert step is not None
    parts = []
    if not st.received:
        parts.append(f"receive from {step.recv_from}")
    if not st.sent:
        parts.append(f"send to {step.send_to}")
    return f"rank {r} step {st.pc} waits to {' and '.join(parts)}"

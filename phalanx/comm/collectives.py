"""Collectives compiled into engine plans: ring, recursive doubling, broadcast, barrier.

Each ``build_*`` function takes a 1-D contiguous array and returns a
:class:`~phalanx.comm.plan.Plan` whose sends, receives and compute steps follow a
schedule from :mod:`phalanx.comm.schedules`, cut into pieces of at most
``options.piece_bytes`` so that receiving, reducing and sending overlap.

Rules every plan keeps:

* **After a failure the caller's array holds its input** (promise 2). Most plans
  write it only on success: partial sums live in a work buffer, results land there
  (or in a result buffer) and the plan's success step copies them into the caller's
  array after the last frame is in. The ring all-reduce without a codec (the
  caller's dtype) takes one of two forms: for arrays of ``page_swap_min_bytes`` and
  more in private anonymous memory it works in a twin buffer and exchanges pages
  with the caller's array on success (comm/pageswap.py: no copy at all); otherwise
  it works in the caller's array itself and saves each piece to scratch before
  first writing it, and a failure puts the saved pieces back.
* **Only the plan's own memory leaves spliced** (``zero_copy=True`` sends:
  comm/zerocopy.py): scratch, the saved copy, the twin -- never the caller's array
  as it is, which a failure must hand back at once and the caller may then write.
  The engine ends a plan that spliced only after its receivers' RECEIPTs, so a twin
  whose pages the caller then gets is no longer read; after a failure the twin gets
  fresh pages (:func:`_detach_spliced`).
* **Bit parity** (promise 1). Every reduced element is computed once, by the owner of
  its chunk, and then copied; in recursive doubling partners combine their partials in
  rank order. With a codec, a chunk's final value is encoded once by its owner, the
  encoded bytes are forwarded unchanged, and the owner itself takes the decoded value.
  Lossy codecs also quantize a rank's own partial before it is exchanged, so both ends
  combine the same numbers.
* Narrow floats (and integer averages) accumulate in the wider dtype of
  :func:`~phalanx.comm.reduce.accumulation_dtype`; the final cast happens once, on
  the owner, before the all-gather (so the all-gather moves the narrow dtype).
* **Every plan names its descriptor** (:mod:`phalanx.comm.descriptor`), and every
  rank's completion depends on a frame from every other rank, each checked against
  that descriptor: then ranks that disagree can never complete, and at least one of
  them sees a foreign descriptor (docs/comm.md, "Mismatched calls"). The ring, the
  recursive doubling and the dissemination barrier have that shape already (empty
  chunks still send an empty piece); broadcast and zero-length ops add an exchange of
  empty frames (:func:`_exchange`) where their tree or their emptiness does not.

This module never touches a socket or a thread; it only describes work for the engine.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from functools import partial

import numpy as np

from phalanx.comm import pageswap, zerocopy
from phalanx.comm import schedules as sched
from phalanx.comm.codecs import CODEC_NONE, Codec, NoneCodec, decode_into
from phalanx.comm.descriptor import op_descriptor
from phalanx.comm.engine import Engine
from phalanx.comm.options import largest_payload
from phalanx.comm.plan import Node, Plan, RecvNode
from phalanx.comm.reduce import (
    ReduceOp,
    accumulation_dtype,
    check_dtype,
    combine,
    finalize,
)
from phalanx.comm.transport import Buffer
from phalanx.errors import UnsupportedError

__all__ = [
    "build_all_gather",
    "build_all_reduce",
    "build_barrier",
    "build_broadcast",
    "build_reduce_scatter",
]

Encoded = tuple[int, Buffer]


def _bytes(a: np.ndarray) -> memoryview:
    """The bytes of a 1-D contiguous array, as a writable flat memoryview."""
    return memoryview(a.view(np.uint8))  # type: ignore[arg-type]


def _raw(a: np.ndarray) -> Callable[[], Encoded]:
    view = _bytes(a)

    def produce() -> Encoded:
        return CODEC_NONE, view

    return produce


def _converted(plan: Plan, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = plan.scratch(x.size, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def _check_codec(codec: Codec, dtype: np.dtype) -> None:
    if not codec.supports(dtype):
        raise UnsupportedError(f"codec {codec.name!r} does not support dtype {dtype}")


def _piece_elems(engine: Engine, itemsize: int) -> int:
    return max(1, engine.options.piece_bytes // max(1, itemsize))


_NONE = NoneCodec()
#: algorithms whose frames depend on options.piece_bytes (the others send whole arrays)
_PIECED = ("ring", "chain")


def _describe(
    plan: Plan,
    engine: Engine,
    x: np.ndarray | None,
    *,
    op: str = "",
    codec: Codec = _NONE,
    root: int = -1,
    layout: int = -1,
) -> None:
    """Give ``plan`` its descriptor: what every rank must have called identically
    (``layout``: the caller's layout tag of a gather or reduce-scatter, -1: none)."""
    plan.describe(
        op_descriptor(
            plan.kind,
            0 if x is None else x.size,
            "" if x is None else check_dtype(x.dtype).name,
            op,
            codec.spec,
            root,
            plan.algorithm,
            engine.options.piece_bytes if plan.algorithm in _PIECED else 0,
            layout,
        )
    )


def _exchange(
    plan: Plan, engine: Engine, skip_to: frozenset[int] = frozenset(), skip_from: int = -1
) -> None:
    """An empty frame to every peer but ``skip_to``, and one from every peer but
    ``skip_from``, first on stream 0: each carries this rank's descriptor digest, so
    this rank completes only if every peer called the same op. Added before the plan's
    other nodes, so these are ordinal 0 on their links at both ends."""
    empty = memoryview(bytearray(0))
    for peer in range(engine.world):
        if peer == engine.rank:
            continue
        if peer not in skip_to:
            plan.send_raw(peer, 0, b"")
        if peer != skip_from:
            plan.recv(peer, 0, direct=empty, max_encoded=0)


class _Stored:
    """Encoded payloads kept for forwarding, keyed by (chunk, piece)."""

    def __init__(self) -> None:
        self.items: dict[tuple[int, int], Encoded] = {}

    def put(self, key: tuple[int, int], value: Encoded) -> None:
        self.items[key] = value

    def getter(self, key: tuple[int, int]) -> Callable[[], Encoded]:
        return lambda: self.items.pop(key)


# ----------------------------------------------------------------------------- all-reduce


def build_all_reduce(
    engine: Engine,
    x: np.ndarray,
    op: ReduceOp,
    codec: Codec,
    *,
    preserve_input: bool = True,
    into: np.ndarray | None = None,
) -> Plan:
    """``preserve_input=False`` lets the in-place ring skip saving the caller's array
    (promise 2 waived: after a failure ``x`` is undefined); other paths ignore it.

    ``into`` (same shape and dtype as ``x``, not overlapping it): where the ring may
    leave the result instead of ``x``, which it then never writes (the daemon's twin
    regions: it exchanges the pages itself on success). Only the plain ring takes it
    (no codec, no widened accumulator); ``plan.into_used`` says whether it did, and
    otherwise the op runs in place as without it."""
    world, rank = engine.world, engine.rank
    acc_dtype = accumulation_dtype(x.dtype, op)
    if codec.name != "none":
        _check_codec(codec, acc_dtype)
    # recursive doubling sends the whole accumulator in one frame, and it may be
    # wider than x (float16 sums in float32, integer averages in int64): an array
    # whose accumulator would not fit takes the ring, whose pieces are sized for it
    small = x.nbytes <= engine.options.small_bytes and x.size * acc_dtype.itemsize <= (
        largest_payload(engine.options.max_frame_bytes)
    )
    algorithm = (
        "trivial" if world == 1 or x.size == 0 else ("recursive-doubling" if small else "ring")
    )
    # the common small op (no codec, accumulated in its own dtype) runs a plan built
    # once and rearmed, while its shape repeats: building one costs more than the op
    reusable = algorithm == "recursive-doubling" and codec.name == "none" and acc_dtype == x.dtype
    key = (x.size, x.dtype.str, op) if reusable else None
    if key is not None:
        plan = engine.reusable.pop(key, None)
        if plan is not None and plan.rebind is not None:
            plan.rearm()
            plan.rebind(x)
            return plan
    plan = engine.plan("all_reduce", algorithm=algorithm, nbytes=x.nbytes, codec=codec.name)
    _describe(plan, engine, x, op=op, codec=codec)
    if key is not None:
        _recursive_doubling(plan, engine, x, x, op, codec, reuse_key=key)
        return plan
    if algorithm == "trivial":
        if world == 1 and x.size:
            work = x.astype(acc_dtype)
            plan.on_success(partial(finalize, work, op, 1, x))
        elif world > 1:
            _exchange(plan, engine)  # nothing to move, but the ranks must agree
        return plan
    if algorithm == "ring" and codec.name == "none" and acc_dtype == x.dtype:
        swap_min = engine.options.page_swap_min_bytes
        if into is not None and into.shape == x.shape and into.dtype == x.dtype:
            plan.into_used = True
            _ring_all_reduce_swapped(plan, engine, x, op, rank, world, into=into)
        elif preserve_input and swap_min and x.nbytes >= swap_min and pageswap.eligible(x):
            _ring_all_reduce_swapped(plan, engine, x, op, rank, world)
        else:
            _ring_all_reduce_in_place(plan, engine, x, op, rank, world, preserve_input)
        return plan
    xa = x if acc_dtype == x.dtype else _converted(plan, x, acc_dtype)
    if algorithm == "recursive-doubling":
        _recursive_doubling(plan, engine, x, xa, op, codec)
    else:
        _ring_all_reduce(plan, engine, x, xa, op, codec, rank, world)
    return plan


def _reduce_scatter_phase(
    plan: Plan,
    engine: Engine,
    xa: np.ndarray,
    work: np.ndarray,
    op: ReduceOp,
    codec: Codec,
    pieces: list[list[tuple[int, int]]],
) -> dict[tuple[int, int], Node]:
    """Ring reduce-scatter of ``xa`` into ``work``; returns the node that completes
    each (chunk, piece) of the partial sums (for chunk ``rank``: the final sums)."""
    rank, world = engine.rank, engine.world
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    last: dict[tuple[int, int], Node] = {}
    encoded = codec.name != "none"
    for s, step in enumerate(sched.ring_reduce_scatter(rank, world)):
        assert step.send_chunk is not None and step.recv_chunk is not None
        c = step.send_chunk
        for j, (a, b) in enumerate(pieces[c]):
            src = xa[a:b] if s == 0 else work[a:b]
            produce = partial(codec.encode, src) if encoded else _raw(src)
            plan.send(nxt, j, produce, after=(last.get((c, j)),))
        c = step.recv_chunk
        for j, (a, b) in enumerate(pieces[c]):
            dst, own = work[a:b], xa[a:b]
            node = plan.recv(
                prv,
                j,
                direct=_bytes(dst),
                max_encoded=codec.max_encoded_nbytes(b - a, work.dtype) if encoded else 0,
                then=partial(_reduce_piece, dst, own, op),
            )
            last[(c, j)] = node
    return last


def _reduce_piece(
    dst: np.ndarray, own: np.ndarray, op: ReduceOp, codec_id: int, payload: memoryview, direct: bool
) -> None:
    if not direct:
        decode_into(codec_id, payload, dst)
    combine(dst, own, dst, op)


def _store_piece(
    store: _Stored,
    key: tuple[int, int],
    dst: np.ndarray,
    codec_id: int,
    payload: memoryview,
    direct: bool,
) -> None:
    if direct:
        store.put(key, (CODEC_NONE, payload))
    else:
        decode_into(codec_id, payload, dst)
        store.put(key, (codec_id, payload))


def _ring_all_reduce(
    plan: Plan,
    engine: Engine,
    x: np.ndarray,
    xa: np.ndarray,
    op: ReduceOp,
    codec: Codec,
    rank: int,
    world: int,
) -> None:
    acc = xa.dtype
    n = x.size
    work = plan.scratch(n, acc)
    parts = sched.partition(n, world)
    pieces = [sched.split(a, b, _piece_elems(engine, acc.itemsize)) for a, b in parts]
    last = _reduce_scatter_phase(plan, engine, xa, work, op, codec, pieces)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    encoded = codec.name != "none"
    if not encoded:
        # all-gather moves final values in the caller's dtype
        res = work if acc == x.dtype else plan.scratch(n, x.dtype)
        ready: dict[tuple[int, int], Node] = {}
        for j, (a, b) in enumerate(pieces[rank]):
            if res is work and op != "avg":
                ready[(rank, j)] = last[(rank, j)]
            else:
                ready[(rank, j)] = plan.compute(
                    partial(finalize, work[a:b], op, world, res[a:b]), after=(last[(rank, j)],)
                )
        for step in sched.ring_all_gather(rank, world):
            assert step.send_chunk is not None and step.recv_chunk is not None
            c = step.send_chunk
            for j, (a, b) in enumerate(pieces[c]):
                plan.send(nxt, j, _raw(res[a:b]), after=(ready[(c, j)],))
            c = step.recv_chunk
            for j, (a, b) in enumerate(pieces[c]):
                ready[(c, j)] = plan.recv(prv, j, direct=_bytes(res[a:b]), max_encoded=0)
        plan.on_success(partial(np.copyto, x, res))
        return
    # with a codec: the owner encodes its final chunk once; everyone forwards the bytes
    store = _Stored()
    encoded_ready: dict[tuple[int, int], Node] = {}
    for j, (a, b) in enumerate(pieces[rank]):
        encoded_ready[(rank, j)] = plan.compute(
            partial(_own_final, store, (rank, j), work[a:b], op, world, codec),
            after=(last[(rank, j)],),
        )
    for step in sched.ring_all_gather(rank, world):
        assert step.send_chunk is not None and step.recv_chunk is not None
        c = step.send_chunk
        for j, _ in enumerate(pieces[c]):
            plan.send(nxt, j, store.getter((c, j)), after=(encoded_ready[(c, j)],))
        c = step.recv_chunk
        last_step = step.recv_chunk == (rank + 1) % world
        for j, (a, b) in enumerate(pieces[c]):
            dst = work[a:b]
            key = (c, j)
            then = (
                partial(_decode_only, dst) if last_step else partial(_store_piece, store, key, dst)
            )
            encoded_ready[key] = plan.recv(
                prv,
                j,
                direct=_bytes(dst),
                max_encoded=codec.max_encoded_nbytes(b - a, acc),
                then=then,
            )
    plan.on_success(partial(_cast_into, x, work))


class _Backup:
    """Copies of the caller's pieces taken before they are overwritten, so that a
    failed operation can put the input back (promise 2)."""

    def __init__(
        self, x: np.ndarray, keep: np.ndarray | None, pieces: list[tuple[int, int]]
    ) -> None:
        self.x = x
        self.keep = keep  # None: the caller waived promise 2 (nothing is saved)
        self.pieces = pieces
        self.saved = [keep is None] * len(pieces)

    def ensure(self, i: int) -> None:
        if not self.saved[i]:
            assert self.keep is not None
            a, b = self.pieces[i]
            np.copyto(self.keep[a:b], self.x[a:b])
            self.saved[i] = True

    def restore(self) -> None:
        if self.keep is None:
            return
        for i, (a, b) in enumerate(self.pieces):
            if self.saved[i]:
                np.copyto(self.x[a:b], self.keep[a:b])


#: the in-place ring saves and reduces a piece in blocks of this many bytes, so that
#: the block the save has just read is still in the cache when the reduce reads and
#: overwrites it (measured: 256 KiB makes the save almost free; see docs/comm.md)
_FUSED_BLOCK_BYTES = 256 * 1024


def _ring_all_reduce_in_place(
    plan: Plan,
    engine: Engine,
    x: np.ndarray,
    op: ReduceOp,
    rank: int,
    world: int,
    preserve: bool = True,
) -> None:
    """Ring all-reduce, no codec, accumulation in the caller's dtype, entirely in
    ``x``: partial sums are reduced into it and sent from it, and the all-gather
    receives straight into it.

    With ``preserve`` (promise 2) every piece is copied to scratch just before it is
    first overwritten, block by block inside the reduce that overwrites it (see
    :func:`_save_and_combine`): the save reads what the reduce then finds in the
    cache, and writing ``x`` in place needs no fresh cache lines, so promise 2 costs
    little more than the waived path. The chunk that leaves raw at the first step is
    saved first and sent from the saved copy. Nothing leaves spliced: zero-copy here
    (the saved copy) measured neutral on the 2-core machine and slower on a 16-core
    host (docs/comm.md), and would make the op wait for its receivers' RECEIPTs.
    Without ``preserve`` nothing is saved.

    Reduce-scatter frames land in one small buffer per stream, reused piece after
    piece: it stays in the cache, so the kernel's copy and the reduce that reads it
    right after cost no memory traffic. Frames on one link arrive in order and each is
    reduced (its ``then``) before the next one's first byte is written, so the buffer
    is always free again in time."""
    n = x.size
    dtype = x.dtype
    pieces = _ring_pieces(engine, x, world)
    flat: list[tuple[int, int]] = []
    index: dict[tuple[int, int], int] = {}
    for c in range(world):
        for j, piece in enumerate(pieces[c]):
            index[(c, j)] = len(flat)
            flat.append(piece)
    keep = plan.scratch(n, dtype) if preserve else None
    backup = _Backup(x, keep, flat)
    if preserve:
        plan.on_failure(backup.restore)
    else:
        plan.preserves_input = False
    block = max(1, _FUSED_BLOCK_BYTES // dtype.itemsize)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    # a landing buffer per stream, but no more than a chunk has pieces (a crowded
    # group's pieces are large and few)
    lanes = min(len(engine.links[prv]), max(len(p) for p in pieces))
    hot = [plan.scratch(max(b - a for a, b in flat), dtype) for _ in range(lanes)]
    last: dict[tuple[int, int], Node] = {}
    for s, step in enumerate(sched.ring_reduce_scatter(rank, world)):
        assert step.send_chunk is not None and step.recv_chunk is not None
        c = step.send_chunk
        for j, (a, b) in enumerate(pieces[c]):
            if s > 0:  # a partial sum, reduced into x
                plan.send(nxt, j, _raw(x[a:b]), after=(last[(c, j)],))
            elif keep is not None:  # this chunk leaves raw: save it, send the copy
                saved = plan.compute(partial(backup.ensure, index[(c, j)]))
                plan.send(nxt, j, _raw(keep[a:b]), after=(saved,))
            else:
                plan.send(nxt, j, _raw(x[a:b]))
        c = step.recv_chunk
        final = world if c == rank else 0
        for j, (a, b) in enumerate(pieces[c]):
            into = hot[j % len(hot)][: b - a]
            then = partial(_save_and_combine, backup, index[(c, j)], into, op, final, block)
            last[(c, j)] = plan.recv(prv, j, direct=_bytes(into), max_encoded=0, then=then)
    _ring_all_gather_in(
        plan, x, pieces, last, rank, world, lambda c, j: partial(backup.ensure, index[(c, j)])
    )


def _ring_all_gather_in(
    plan: Plan,
    dst: np.ndarray,
    pieces: list[list[tuple[int, int]]],
    last: dict[tuple[int, int], Node],
    rank: int,
    world: int,
    prepare: Callable[[int, int], Callable[[], None]] | None = None,
    *,
    splice: Callable[[int, int], bool] | None = None,
) -> None:
    """The ring's all-gather, raw, in ``dst``: send each final piece once it is
    ready (``last`` has this rank's own, from the reduce-scatter), receive the others
    straight into place (``prepare(chunk, piece)`` runs before a piece is written).
    ``splice(a, b)``: whether elements [a, b) of ``dst`` (the plan's own memory, a
    twin) may leave spliced; None: no piece does."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    ready = {(rank, j): last[(rank, j)] for j in range(len(pieces[rank]))}
    for step in sched.ring_all_gather(rank, world):
        assert step.send_chunk is not None and step.recv_chunk is not None
        c = step.send_chunk
        for j, (a, b) in enumerate(pieces[c]):
            zero_copy = splice is not None and splice(a, b)
            plan.send(nxt, j, _raw(dst[a:b]), after=(ready[(c, j)],), zero_copy=zero_copy)
        c = step.recv_chunk
        for j, (a, b) in enumerate(pieces[c]):
            ready[(c, j)] = plan.recv(
                prv,
                j,
                direct=_bytes(dst[a:b]),
                max_encoded=0,
                prepare=None if prepare is None else prepare(c, j),
            )


def _ring_pieces(engine: Engine, x: np.ndarray, world: int) -> list[list[tuple[int, int]]]:
    """The ring's layout: chunk c (of ``world``) cut into pieces, as element ranges."""
    step = _piece_elems(engine, x.dtype.itemsize)
    return [sched.split(a, b, step) for a, b in sched.partition(x.size, world)]


def _ring_all_reduce_swapped(
    plan: Plan,
    engine: Engine,
    x: np.ndarray,
    op: ReduceOp,
    rank: int,
    world: int,
    *,
    into: np.ndarray | None = None,
) -> None:
    """Ring all-reduce, no codec, that never writes ``x`` until it has succeeded:
    partial sums are received, reduced and sent on in a twin buffer, the all-gather
    receives into the twin, and on success the twin's pages are exchanged with
    ``x``'s (comm/pageswap.py). Promise 2 then costs nothing: a failure leaves ``x``
    untouched, so there is no save and no undo. ``x`` must be
    :func:`pageswap.eligible`.

    A received piece is reduced with ``x``'s piece into the twin (``twin = got (op)
    x``, the same operand order as the in-place ring, so the two give the same
    bits). The raw chunk of the first step leaves straight from ``x``.

    With ``into`` the result is left there (the caller exchanges, see
    :func:`build_all_reduce`) and no twin is borrowed. Memory next to ``into`` may be
    live (the caller's), so only pieces on whole pages of it leave spliced: after a
    failure a spliced page gets fresh, zeroed memory, all of it."""
    if into is None:
        arena, out = plan.twin(x)
        splice: Callable[[int, int], bool] = _anywhere  # the twin's neighbours: scratch
    else:
        out = into
        splice = _on_whole_pages(out)
    pieces = _ring_pieces(engine, x, world)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    last: dict[tuple[int, int], Node] = {}
    for s, step in enumerate(sched.ring_reduce_scatter(rank, world)):
        assert step.send_chunk is not None and step.recv_chunk is not None
        c = step.send_chunk
        for j, (a, b) in enumerate(pieces[c]):
            if s > 0:  # a partial sum, reduced into the twin
                plan.send(nxt, j, _raw(out[a:b]), after=(last[(c, j)],),
                          zero_copy=splice(a, b))  # fmt: skip
            else:  # the caller's array itself: never spliced (module docstring)
                plan.send(nxt, j, _raw(x[a:b]))
        c = step.recv_chunk
        final = world if c == rank else 0
        for j, (a, b) in enumerate(pieces[c]):
            then = partial(_combine_into_twin, out[a:b], x[a:b], op, final)
            last[(c, j)] = plan.recv(prv, j, direct=_bytes(out[a:b]), max_encoded=0, then=then)
    _ring_all_gather_in(plan, out, pieces, last, rank, world, splice=splice)
    plan.on_failure(partial(_detach_spliced, plan, out, into is not None))
    if into is None:
        plan.on_success(partial(_hand_over, plan, arena, x, out))


def _combine_into_twin(
    got: np.ndarray,
    xs: np.ndarray,
    op: ReduceOp,
    world: int,
    codec_id: int,
    payload: memoryview,
    direct: bool,
) -> None:
    """A reduce-scatter piece arrived in the twin (``got``): ``got = got (op) x``;
    ``world`` > 0 marks this rank's own, final chunk (avg divides by it)."""
    del codec_id, payload, direct
    combine(got, xs, got, op)
    if world and op == "avg":
        finalize(got, op, world, got)


def _anywhere(a: int, b: int) -> bool:
    return True


def _whole_pages(out: np.ndarray) -> tuple[int, int]:
    """The byte addresses [lo, hi) of the pages that lie wholly inside ``out``."""
    start = out.ctypes.data
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    return lo, max(lo, (start + out.nbytes) // page * page)


def _on_whole_pages(out: np.ndarray) -> Callable[[int, int], bool]:
    """Whether elements [a, b) of ``out`` lie on pages wholly inside it."""
    lo, hi = _whole_pages(out)
    start, size = out.ctypes.data, out.itemsize

    def inside(a: int, b: int) -> bool:
        return lo <= start + a * size and start + b * size <= hi

    return inside


def _detach_spliced(plan: Plan, out: np.ndarray, whole_pages_only: bool) -> None:
    """After a failure: if frames left the twin spliced, a receiver may still read
    those pages (no RECEIPT will say when), so the twin gets fresh ones before it is
    written again -- by the next op, or by the caller once it is exchanged. A
    caller's ``into`` only spliced from its whole pages, and only those are replaced
    (the bytes around it may be the caller's)."""
    if not plan.spliced:
        return
    if whole_pages_only:
        lo, hi = _whole_pages(out)
        if hi > lo:
            zerocopy.detach(lo, hi - lo)
    else:
        zerocopy.detach(out.ctypes.data, out.nbytes)


def _hand_over(plan: Plan, arena: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    if not pageswap.move_into(x, out):
        plan.drop_twin(arena)  # the kernel left it without memory somewhere: never reuse


def _save_and_combine(
    backup: _Backup,
    idx: int,
    got: np.ndarray,
    op: ReduceOp,
    world: int,
    block: int,
    codec_id: int,
    payload: memoryview,
    direct: bool,
) -> None:
    """A reduce-scatter piece arrived in ``got``: ``x = got (op) x`` over piece
    ``idx``, saving each block of ``x`` first (unless already saved or waived);
    ``world`` > 0 marks this rank's own, final chunk (avg divides by it)."""
    del codec_id, payload, direct
    x, keep = backup.x, backup.keep
    a, b = backup.pieces[idx]
    if backup.saved[idx] or keep is None:
        keep = None  # saved before, or promise 2 waived
    saved_upto = a
    try:
        for lo in range(a, b, block):
            hi = min(b, lo + block)
            xs = x[lo:hi]
            if keep is not None:
                np.copyto(keep[lo:hi], xs)
                saved_upto = hi
            combine(got[lo - a : hi - a], xs, xs, op)
            if world and op == "avg":
                finalize(xs, op, world, xs)
    except BaseException:
        if keep is not None:  # the piece is not marked saved: put back what changed
            np.copyto(x[a:saved_upto], keep[a:saved_upto])
        raise
    backup.saved[idx] = True


def _decode_only(dst: np.ndarray, codec_id: int, payload: memoryview, direct: bool) -> None:
    if not direct:
        decode_into(codec_id, payload, dst)


def _own_final(
    store: _Stored,
    key: tuple[int, int],
    acc: np.ndarray,
    op: ReduceOp,
    world: int,
    codec: Codec,
) -> None:
    if op == "avg":
        finalize(acc, op, world, acc)
    codec_id, payload = codec.encode(acc)
    if codec.lossy:
        decode_into(codec_id, memoryview(payload), acc)
    store.put(key, (codec_id, payload))


def _cast_into(x: np.ndarray, work: np.ndarray) -> None:
    np.copyto(x, work, casting="unsafe")


def _recursive_doubling(
    plan: Plan,
    engine: Engine,
    x: np.ndarray,
    xa: np.ndarray,
    op: ReduceOp,
    codec: Codec,
    *,
    reuse_key: tuple[int, str, ReduceOp] | None = None,
) -> None:
    """``reuse_key`` (no codec, ``xa`` is ``x``): the plan is frozen for reuse; its
    ``rebind(x)`` loads the next input and points the result at it."""
    rank, world = engine.rank, engine.world
    n = x.size
    acc = xa.dtype
    work = xa.copy()
    encoded = codec.name != "none"
    lossy = encoded and codec.lossy
    max_enc = codec.max_encoded_nbytes(n, acc) if encoded else 0
    p = 1 << (world.bit_length() - 1)
    core = rank < p
    prev: Node | None = None
    final_box: list[Encoded] | None = None

    def quantize_final(after: Node | None) -> Node:
        nonlocal final_box
        final_box = []
        return plan.compute(partial(_quantize_own, work, codec, final_box, True), after=(after,))

    for step in sched.recursive_doubling(rank, world):
        if step.send_to is not None and step.recv_from is not None:  # exchange
            tmp = np.empty(n, dtype=acc)
            if encoded:
                box: list[Encoded] = []
                q = plan.compute(partial(_quantize_own, work, codec, box, lossy), after=(prev,))
                send_node: Node = plan.send(step.send_to, 0, partial(box.pop), after=(q,))
            else:
                send_node = plan.send(step.send_to, 0, _raw(work), after=(prev,))
            recv = plan.recv(
                step.recv_from,
                0,
                direct=_bytes(tmp),
                max_encoded=max_enc,
                then=partial(_decode_only, tmp),
            )
            if step.recv_from < rank:
                fn = partial(combine, tmp, work, work, op)
            else:
                fn = partial(combine, work, tmp, work, op)
            prev = plan.compute(fn, after=(recv, send_node))
        elif step.send_to is not None:
            if core and lossy:  # unfold: send exactly the final value this rank keeps
                q_final: Node = quantize_final(prev)
                box_final = final_box
                assert box_final is not None
                prev = plan.send(step.send_to, 0, partial(_peek_box, box_final), after=(q_final,))
            elif encoded:
                prev = plan.send(step.send_to, 0, partial(_encode_copy, codec, work), after=(prev,))
            else:
                prev = plan.send(step.send_to, 0, _raw(work), after=(prev,))
        elif step.recv_from is not None:
            tmp = np.empty(n, dtype=acc)
            recv = plan.recv(
                step.recv_from,
                0,
                direct=_bytes(tmp),
                max_encoded=max_enc,
                then=partial(_decode_only, tmp),
            )
            if step.combine == "copy":
                fn = partial(np.copyto, work, tmp)
            else:  # fold: the sender is always the higher rank
                fn = partial(combine, work, tmp, work, op)
            prev = plan.compute(fn, after=(recv, prev))
    if core and lossy and world != p and final_box is None:
        # core ranks without an unfold partner end with the same decoded value as the rest
        quantize_final(prev)
    plan.on_success(partial(finalize, work, op, world, x))
    if reuse_key is None:
        return

    def rebind(y: np.ndarray) -> None:
        np.copyto(work, y)
        plan.success = [partial(finalize, work, op, world, y)]

    plan.freeze(reuse_key)
    plan.rebind = rebind


def _peek_box(box: list[Encoded]) -> Encoded:
    return box[0]


def _encode_copy(codec: Codec, work: np.ndarray) -> Encoded:
    codec_id, payload = codec.encode(work)
    return codec_id, bytes(payload) if codec_id == CODEC_NONE else payload


def _quantize_own(work: np.ndarray, codec: Codec, box: list[Encoded], lossy: bool) -> None:
    codec_id, payload = codec.encode(work)
    if codec_id == CODEC_NONE:
        payload = bytes(payload)
    if lossy:
        decode_into(codec_id, memoryview(payload), work)
    box.append((codec_id, payload))


# ----------------------------------------------------------------------------- reduce-scatter


def build_reduce_scatter(
    engine: Engine, x: np.ndarray, op: ReduceOp, codec: Codec, *, layout: int = -1
) -> Plan:
    """After success, x[partition(n, world)[rank]] holds the reduced chunk; the rest of
    x keeps its input values. ``layout``: the caller's layout tag (-1: none), part of
    the descriptor."""
    world, rank = engine.world, engine.rank
    acc_dtype = accumulation_dtype(x.dtype, op)
    if codec.name != "none":
        _check_codec(codec, acc_dtype)
    plan = engine.plan("reduce_scatter", algorithm="ring", nbytes=x.nbytes, codec=codec.name)
    _describe(plan, engine, x, op=op, codec=codec, layout=layout)
    a, b = sched.partition(x.size, world)[rank]
    if world == 1 or x.size == 0:
        if world > 1:
            _exchange(plan, engine)
        if b > a:
            plan.on_success(partial(finalize, x[a:b].astype(acc_dtype), op, world, x[a:b]))
        return plan
    xa = x if acc_dtype == x.dtype else _converted(plan, x, acc_dtype)
    work = plan.scratch(x.size, acc_dtype)
    pieces = [
        sched.split(s, e, _piece_elems(engine, acc_dtype.itemsize))
        for s, e in sched.partition(x.size, world)
    ]
    _reduce_scatter_phase(plan, engine, xa, work, op, codec, pieces)
    plan.on_success(partial(finalize, work[a:b], op, world, x[a:b]))
    return plan


# ----------------------------------------------------------------------------- all-gather


def build_all_gather(engine: Engine, x: np.ndarray, codec: Codec, *, layout: int = -1) -> Plan:
    """Rank r contributes x[partition(n, world)[r]]; afterwards every rank has all.
    ``layout``: the caller's layout tag (-1: none), part of the descriptor."""
    world, rank = engine.world, engine.rank
    if codec.name != "none":
        _check_codec(codec, x.dtype)
    plan = engine.plan("all_gather", algorithm="ring", nbytes=x.nbytes, codec=codec.name)
    _describe(plan, engine, x, codec=codec, layout=layout)
    if world == 1 or x.size == 0:
        if world > 1:
            _exchange(plan, engine)
        return plan
    parts = sched.partition(x.size, world)
    pieces = [sched.split(a, b, _piece_elems(engine, x.dtype.itemsize)) for a, b in parts]
    res = plan.scratch(x.size, x.dtype)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    encoded = codec.name != "none"
    store = _Stored()
    ready: dict[tuple[int, int], Node] = {}
    ra, rb = parts[rank]
    np.copyto(res[ra:rb], x[ra:rb])
    for j, (a, b) in enumerate(pieces[rank]):
        if encoded:
            box: list[Encoded] = []
            ready[(rank, j)] = plan.compute(
                partial(_quantize_own, res[a:b], codec, box, codec.lossy)
            )
            store_key = (rank, j)
            ready[store_key] = plan.compute(
                partial(_move_box, box, store, store_key), after=(ready[store_key],)
            )
    for step in sched.ring_all_gather(rank, world):
        assert step.send_chunk is not None and step.recv_chunk is not None
        c = step.send_chunk
        for j, (a, b) in enumerate(pieces[c]):
            produce = store.getter((c, j)) if encoded else _raw(res[a:b])
            plan.send(nxt, j, produce, after=(ready.get((c, j)),))
        c = step.recv_chunk
        for j, (a, b) in enumerate(pieces[c]):
            dst = res[a:b]
            then = partial(_store_piece, store, (c, j), dst) if encoded else None
            ready[(c, j)] = plan.recv(
                prv,
                j,
                direct=_bytes(dst),
                max_encoded=codec.max_encoded_nbytes(b - a, x.dtype) if encoded else 0,
                then=then,
            )
    plan.on_success(partial(np.copyto, x, res))
    return plan


def _move_box(box: list[Encoded], store: _Stored, key: tuple[int, int]) -> None:
    store.put(key, box.pop())


# ----------------------------------------------------------------------------- broadcast


def build_broadcast(engine: Engine, x: np.ndarray, root: int, codec: Codec) -> Plan:
    world, rank = engine.world, engine.rank
    if codec.name != "none":
        _check_codec(codec, x.dtype)
    small = x.nbytes <= engine.options.small_bytes
    algorithm = "binomial" if small else "chain"
    plan = engine.plan("broadcast", algorithm=algorithm, nbytes=x.nbytes, codec=codec.name)
    _describe(plan, engine, x, codec=codec, root=root)
    if world == 1:
        return plan
    if x.size == 0:
        _exchange(plan, engine)
        return plan
    steps = (sched.binomial_broadcast if small else sched.chain_broadcast)(rank, world, root)
    # the tree alone lets the root finish without hearing from anyone, and a leaf with
    # hearing only from its ancestors: every other pair exchanges an empty frame
    parent = next((s.recv_from for s in steps if s.recv_from is not None), -1)
    children = frozenset(s.send_to for s in steps if s.send_to is not None)
    _exchange(plan, engine, skip_to=children, skip_from=parent)
    pieces = (
        [(0, x.size)] if small else sched.split(0, x.size, _piece_elems(engine, x.dtype.itemsize))
    )
    encoded = codec.name != "none"
    store = _Stored()
    res = plan.scratch(x.size, x.dtype)
    if rank == root:
        np.copyto(res, x)
    ready: dict[int, Node | None] = {}
    if rank == root:
        for j, (a, b) in enumerate(pieces):
            if encoded:
                box: list[Encoded] = []
                q = plan.compute(partial(_quantize_own, res[a:b], codec, box, codec.lossy))
                ready[j] = plan.compute(partial(_move_box, box, store, (0, j)), after=(q,))
            else:
                ready[j] = None
    for step in steps:
        if step.recv_from is not None:
            for j, (a, b) in enumerate(pieces):
                dst = res[a:b]
                then = partial(_store_piece, store, (0, j), dst) if encoded else None
                ready[j] = plan.recv(
                    step.recv_from,
                    j,
                    direct=_bytes(dst),
                    max_encoded=codec.max_encoded_nbytes(b - a, x.dtype) if encoded else 0,
                    then=then,
                )
        if step.send_to is not None:
            for j, (a, b) in enumerate(pieces):
                produce = _peek(store, (0, j)) if encoded else _raw(res[a:b])
                plan.send(step.send_to, j, produce, after=(ready[j],))
    plan.on_success(partial(np.copyto, x, res))
    return plan


def _peek(store: _Stored, key: tuple[int, int]) -> Callable[[], Encoded]:
    """A payload that may be sent several times (binomial tree: several children)."""
    return lambda: store.items[key]


# ----------------------------------------------------------------------------- barrier


def build_barrier(engine: Engine) -> Plan:
    plan = engine.plan("barrier", algorithm="dissemination", nbytes=0, codec="none")
    _describe(plan, engine, None)
    prev: RecvNode | None = None
    empty = memoryview(bytearray(0))
    for step in sched.dissemination_barrier(engine.rank, engine.world):
        assert step.send_to is not None and step.recv_from is not None
        plan.send_raw(step.send_to, 0, b"", after=(prev,))
        prev = plan.recv(step.recv_from, 0, direct=empty, max_encoded=0)
    return plan

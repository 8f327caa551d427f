"""A static group: ranks that know each other's addresses run collectives on numpy arrays.

This is the data plane's public face: tests, the benchmark and the daemon build on it.
Creating a :class:`Group` binds (or takes) this rank's listener, connects to every
lower rank and accepts every higher one — ``streams`` authenticated TCP links per pair —
and starts the engine thread. Collectives are in place on numpy arrays of any shape;
each has an ``async_op=True`` form returning a :class:`~phalanx.ops.Handle`, and a
``deadline`` (:class:`~phalanx.deadline.Deadline`) the engine fails the op at. They are
all one method, :meth:`Group.run` of an :class:`~phalanx.ops.OpSpec`; the named methods
only build the spec. Results are :class:`~phalanx.ops.OpResult` (contributors named by
``names``, default the ranks as strings).

Membership changes are not this class's business: after a :class:`PeerFailure` the group
is broken and a new one (a new view, a new epoch) must be built. Ranks that call an op
with different arguments (length, dtype, op, codec, root, layout tag, kind) all raise
:class:`~phalanx.errors.OpMismatch` instead, with their arrays intact, and the group
stays usable (docs/comm.md, "Mismatched calls").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Literal, overload

import numpy as np

from phalanx.comm import collectives
from phalanx.comm import handshake as hs
from phalanx.comm.codecs import Codec, parse_codec
from phalanx.comm.engine import Engine, FrameHook, LinkStats
from phalanx.comm.observer import CommObserver
from phalanx.comm.options import CommOptions, pipelining_unit
from phalanx.comm.plan import Plan
from phalanx.comm.reduce import check_dtype, parse_op
from phalanx.comm.transport import (
    Channel,
    Link,
    Listener,
    accept_link,
    bind,
    connect_link,
    parse_address,
)
from phalanx.deadline import Deadline
from phalanx.errors import ConfigError, HandshakeError, UnsupportedError
from phalanx.ops import Handle, OpResult, OpSpec

__all__ = ["Group"]

log = logging.getLogger(__name__)


def _cpus() -> int | None:
    """The CPUs this host is configured with: one figure for every process on it --
    not a process's affinity, nor the online count (CPU hotplug), nor Python 3.13's
    per-process ``PYTHON_CPU_COUNT``, any of which may differ between the ranks."""
    try:
        n = os.sysconf("SC_NPROCESSORS_CONF")
    except (ValueError, OSError):
        return os.cpu_count()
    return n if n > 0 else os.cpu_count()


def _settler(
    future: Future[OpResult], copy_back: list[tuple[np.ndarray, np.ndarray]]
) -> Callable[[float | None], OpResult | None]:
    """A :class:`Handle`'s settle function for an engine future. ``wait()`` without a
    timeout still ends in bounded time: the engine bounds every op (progress timeout,
    the caller's deadline)."""

    def settle(timeout: float | None) -> OpResult | None:
        try:
            result = future.result(timeout)
        except FutureTimeout:
            return None
        for dst, src in copy_back:  # once: the Handle keeps the outcome
            np.copyto(dst, src)
        return result

    return settle


def _coerce_secret(secret: bytes | str) -> bytes:
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(data) < 16:
        raise ConfigError("the cluster secret must be at least 16 bytes")
    return data


class Group:
    """``world`` ranks on ``addresses`` (index = rank) sharing a cluster ``secret``."""

    def __init__(
        self,
        rank: int,
        addresses: Sequence[str],
        secret: bytes | str,
        *,
        listener: Listener | None = None,
        epoch: int = 0,
        options: CommOptions | None = None,
        frame_hook: FrameHook | None = None,
        observer: CommObserver | None = None,
        names: Sequence[str] | None = None,
        on_break: Callable[[], None] | None = None,
    ) -> None:
        """Connect to every peer (blocking, bounded by ``options.connect_timeout_s``).

        ``listener`` is this rank's bound listener (see :func:`bind`); the group owns it
        from now on and closes it. ``observer`` receives per-op, per-link measurements
        (see :mod:`phalanx.comm.observer`); ``frame_hook`` is for fault injection only.
        ``names``: what results call each rank (``OpResult.contributors``; default the
        ranks as strings). ``on_break`` is called once, on the engine's thread with no
        lock of the group held, when the group breaks -- also while no op runs (a peer's
        ABORT, a lost link), and when ``close()`` aborts an op in flight (closing an idle
        group tells nothing): its owner needs no poll to notice.
        """
        world = len(addresses)
        if world < 1:
            raise ConfigError("a group needs at least one address")
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside 0..{world - 1}")
        for a in addresses:
            parse_address(a)
        if len(set(addresses)) != world:
            raise ConfigError("every rank needs its own address")
        if not 0 <= epoch < 2**64:
            raise ConfigError("epoch must fit in 64 bits")
        if names is not None and len(names) != world:
            raise ConfigError(f"{len(names)} names for a group of {world}")
        self.rank = rank
        self.world = world
        self.epoch = epoch
        self.addresses = tuple(addresses)
        opts = options or CommOptions()
        unit = pipelining_unit(opts, [parse_address(a)[0] for a in addresses], _cpus())
        # the options the engine runs with: piece_bytes is the group's pipelining unit
        self.options = opts if unit == opts.piece_bytes else replace(opts, piece_bytes=unit)
        self._secret = _coerce_secret(secret)
        self._listener = listener if listener is not None else bind(addresses[rank])
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._links: dict[tuple[int, int], Link] = {}
        self._accepting = True
        self._threads: list[threading.Thread] = []
        self.rejected = 0  # connections refused by the handshake (wrong secret, ...)
        self._engine: Engine | None = None
        self._closed = False
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"phalanx-accept-{rank}", daemon=True
        )
        self._acceptor.start()
        try:
            self._connect_all()
        except BaseException:
            self.close()
            raise
        channels = [Channel(link, self.options.max_frame_bytes) for link in self._links.values()]
        with self._cond:
            self._accepting = False
        self._engine = Engine(
            rank=rank,
            world=world,
            epoch=epoch,
            channels=channels,
            options=self.options,
            name=f"phalanx-engine-{rank}",
            frame_hook=frame_hook,
            observer=observer,
            names=names,
            on_break=on_break,
        )
        log.info(
            "event=group-up rank=%d world=%d epoch=%d streams=%d piece_bytes=%d address=%s",
            rank,
            world,
            epoch,
            self.options.streams,
            self.options.piece_bytes,
            self._listener.address,
        )

    # ------------------------------------------------------------------ links
    @property
    def address(self) -> str:
        return self._listener.address

    def _expected(self) -> set[tuple[int, int]]:
        k = self.options.streams
        return {(p, s) for p in range(self.world) if p != self.rank for s in range(k)}

    def _connect_all(self) -> None:
        opts = self.options
        deadline = time.monotonic() + opts.connect_timeout_s
        for peer in range(self.rank):
            for stream in range(opts.streams):
                link = connect_link(
                    self.addresses[peer],
                    secret=self._secret,
                    epoch=self.epoch,
                    world=self.world,
                    rank=self.rank,
                    peer=peer,
                    stream=stream,
                    streams=opts.streams,
                    buffer_bytes=opts.socket_buffer_bytes,
                    deadline=deadline,
                    handshake_timeout=opts.handshake_timeout_s,
                )
                with self._cond:
                    self._links[(peer, stream)] = link
        expected = self._expected()
        with self._cond:
            while not expected <= self._links.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted({p for p, _ in expected - self._links.keys()})
                    raise HandshakeError(
                        "timeout",
                        f"no authenticated link from ranks {missing} within {opts.connect_timeout_s:g}s",
                    )
                self._cond.wait(min(left, 0.1))

    def _accept_loop(self) -> None:
        sock = self._listener.sock
        # a backstop only: close() wakes accept() (Listener.close shuts the socket
        # down); a 0.1 s poll woke every idle daemon ten times a second
        sock.settimeout(1.0)
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            t = threading.Thread(
                target=self._handshake, args=(conn,), name="phalanx-handshake", daemon=True
            )
            self._threads = [th for th in self._threads if th.is_alive()]
            if len(self._threads) >= 64:
                conn.close()  # too many handshakes at once: refuse, do not queue
                continue
            self._threads.append(t)
            t.start()

    def _claim(self, hello: hs.Hello) -> hs.LinkRefusal | None:
        with self._cond:
            if hello.streams != self.options.streams or hello.from_rank <= self.rank:
                return hs.LinkRefusal.UNEXPECTED
            if not self._accepting:
                return hs.LinkRefusal.UNEXPECTED
            if (hello.from_rank, hello.stream) in self._links:
                return hs.LinkRefusal.DUPLICATE
            return None

    def _handshake(self, conn: object) -> None:
        import socket as _socket

        assert isinstance(conn, _socket.socket)
        try:
            link = accept_link(
                conn,
                secret=self._secret,
                epoch=self.epoch,
                world=self.world,
                rank=self.rank,
                claim=self._claim,
                buffer_bytes=self.options.socket_buffer_bytes,
                deadline=time.monotonic() + self.options.handshake_timeout_s,
            )
        except HandshakeError as exc:
            self.rejected += 1
            log.warning(
                "event=link-refused rank=%d reason=%s detail=%r", self.rank, exc.reason, str(exc)
            )
            return
        with self._cond:
            key = (link.peer, link.stream)
            if key in self._links or not self._accepting:  # lost a race: refuse quietly
                link.sock.close()
                return
            self._links[key] = link
            self._cond.notify_all()

    # ------------------------------------------------------------------ collectives
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ConfigError("group is not connected")
        return self._engine

    def _prepare(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        if not isinstance(x, np.ndarray):
            raise UnsupportedError(f"expected a numpy array, got {type(x).__name__}")
        check_dtype(x.dtype)
        if not x.flags.writeable:
            raise UnsupportedError("the array is read-only; collectives work in place")
        if x.flags.c_contiguous:
            return x.reshape(-1), []
        # non-contiguous: work on a contiguous copy, copy back once on success
        tmp = np.ascontiguousarray(x)
        return tmp.reshape(-1), [(x, tmp)]

    def run(
        self,
        spec: OpSpec,
        x: np.ndarray | None,
        *,
        async_op: bool = False,
        deadline: Deadline | None = None,
        preserve_input: bool = True,
        into: np.ndarray | None = None,
        patient: bool = False,
    ) -> OpResult | Handle:
        """Run the collective ``spec`` on ``x`` (in place; ``None`` for a barrier): the
        one entry point every named collective below goes through.

        ``patient`` (with a ``deadline``): a wait that is the caller's protocol, not a
        stall -- while every peer it waits on answers the probes, only the deadline
        ends it (docs/comm.md, "Detection"). Dead or silent peers fail it as any op.

        ``into`` (all-reduce, C-contiguous, like ``x``): a buffer the large-array ring
        may leave the result in, never writing ``x``; the result's ``in_twin`` says
        whether it did (then exchanging the two is the caller's job).

        ``deadline``: the engine fails the op (reason ``aborted``, the array restored)
        once it passes or is cancelled. ``preserve_input=False`` waives promise 2 for an
        all-reduce (see :meth:`all_reduce`).
        """
        if spec.needs_array:
            if x is None:
                raise ConfigError(f"{spec.kind} needs an array")
            flat, copy_back = self._prepare(x)
        else:
            flat, copy_back = np.empty(0, np.uint8), []
        if into is not None and spec.kind == "all_reduce" and into.flags.c_contiguous:
            plan = collectives.build_all_reduce(
                self.engine, flat, parse_op(spec.reduce), parse_codec(spec.codec),
                preserve_input=preserve_input, into=into.reshape(-1),
            )  # fmt: skip
        else:
            plan = _BUILD[spec.kind](self, flat, spec, preserve_input)
        plan.deadline = deadline
        plan.patient = patient and deadline is not None  # never unbounded
        handle = Handle(_settler(self.engine.submit(plan), copy_back))
        return handle if async_op else handle.wait()

    @overload
    def all_reduce(
        self, x: np.ndarray, op: str = ..., codec: str | Codec = ..., *,
        async_op: Literal[False] = ..., preserve_input: bool = ...,
        deadline: Deadline | None = ...,
    ) -> OpResult: ...  # fmt: skip
    @overload
    def all_reduce(
        self, x: np.ndarray, op: str = ..., codec: str | Codec = ..., *,
        async_op: Literal[True], preserve_input: bool = ..., deadline: Deadline | None = ...,
    ) -> Handle: ...  # fmt: skip
    def all_reduce(
        self, x: np.ndarray, op: str = "sum", codec: str | Codec = "none", *,
        async_op: bool = False, preserve_input: bool = True, deadline: Deadline | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Reduce ``x`` over all ranks, in place; every rank ends with the same bytes.

        ``preserve_input=False`` waives promise 2 for this call: the large-array path
        then skips saving ``x`` (one pass over it less; ~20 % faster here), and after a
        failure ``x`` is undefined. For callers that can recompute their input.
        """
        return self.run(OpSpec("all_reduce", op, _spec(codec)), x, async_op=async_op,
                        deadline=deadline, preserve_input=preserve_input)  # fmt: skip

    @overload
    def reduce_scatter(
        self, x: np.ndarray, op: str = ..., codec: str | Codec = ..., *,
        async_op: Literal[False] = ..., deadline: Deadline | None = ...,
    ) -> OpResult: ...  # fmt: skip
    @overload
    def reduce_scatter(
        self, x: np.ndarray, op: str = ..., codec: str | Codec = ..., *,
        async_op: Literal[True], deadline: Deadline | None = ...,
    ) -> Handle: ...  # fmt: skip
    def reduce_scatter(
        self, x: np.ndarray, op: str = "sum", codec: str | Codec = "none", *,
        async_op: bool = False, deadline: Deadline | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Reduce ``x`` over all ranks; only this rank's chunk (:meth:`chunk`) is
        written with the result, the rest of ``x`` keeps its values."""
        return self.run(OpSpec("reduce_scatter", op, _spec(codec)), x, async_op=async_op,
                        deadline=deadline)  # fmt: skip

    @overload
    def all_gather(
        self, x: np.ndarray, codec: str | Codec = ..., *, async_op: Literal[False] = ...,
        deadline: Deadline | None = ...,
    ) -> OpResult: ...  # fmt: skip
    @overload
    def all_gather(
        self, x: np.ndarray, codec: str | Codec = ..., *, async_op: Literal[True],
        deadline: Deadline | None = ...,
    ) -> Handle: ...  # fmt: skip
    def all_gather(
        self, x: np.ndarray, codec: str | Codec = "none", *, async_op: bool = False,
        deadline: Deadline | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Rank r contributes the elements of its chunk (:meth:`chunk`) of ``x`` (flat
        order); afterwards every rank's ``x`` holds every rank's chunk."""
        return self.run(OpSpec("all_gather", codec=_spec(codec)), x, async_op=async_op,
                        deadline=deadline)  # fmt: skip

    @overload
    def broadcast(
        self, x: np.ndarray, root: int = ..., codec: str | Codec = ..., *,
        async_op: Literal[False] = ..., deadline: Deadline | None = ...,
    ) -> OpResult: ...  # fmt: skip
    @overload
    def broadcast(
        self, x: np.ndarray, root: int = ..., codec: str | Codec = ..., *,
        async_op: Literal[True], deadline: Deadline | None = ...,
    ) -> Handle: ...  # fmt: skip
    def broadcast(
        self, x: np.ndarray, root: int = 0, codec: str | Codec = "none", *,
        async_op: bool = False, deadline: Deadline | None = None,
    ) -> OpResult | Handle:  # fmt: skip
        """Copy root's ``x`` into every rank's ``x``."""
        if not 0 <= root < self.world:
            raise ConfigError(f"root {root} is outside 0..{self.world - 1}")
        return self.run(OpSpec("broadcast", codec=_spec(codec), root=root), x,
                        async_op=async_op, deadline=deadline)  # fmt: skip

    @overload
    def barrier(
        self, *, async_op: Literal[False] = ..., deadline: Deadline | None = ...
    ) -> OpResult: ...
    @overload
    def barrier(self, *, async_op: Literal[True], deadline: Deadline | None = ...) -> Handle: ...
    def barrier(
        self, *, async_op: bool = False, deadline: Deadline | None = None
    ) -> OpResult | Handle:
        """Return once every rank has entered the barrier."""
        return self.run(OpSpec("barrier"), None, async_op=async_op, deadline=deadline)

    def chunk(self, size: int, rank: int | None = None) -> slice:
        """The flat slice of a ``size``-element array that ``rank`` owns in
        reduce_scatter and contributes in all_gather (balanced, contiguous)."""
        from phalanx.comm.schedules import partition

        a, b = partition(size, self.world)[self.rank if rank is None else rank]
        return slice(a, b)

    def abort(self, reason: str = "view-change", detail: str = "") -> None:
        """Fail the op in flight and break the group, from any thread (e.g. when a new
        view is installed): the waiting caller gets :class:`PeerFailure` with this
        ``reason`` and its array back as it was; later calls raise at once."""
        self.engine.abort(reason, detail)

    def link_stats(self) -> list[LinkStats]:
        """Bytes moved and TCP round-trip time / retransmissions of every link."""
        return self.engine.link_stats()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Leave: tell peers (BYE), stop threads, close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._engine is not None:
            self._engine.close()
        # the group owns its listener, given or not; closing it first wakes the accept
        # loop now instead of at its next poll (0.1 s that every state sync's short-lived
        # side group used to pay)
        self._listener.close()
        self._acceptor.join(2.0)
        for t in self._threads:
            t.join(self.options.handshake_timeout_s + 1)
        with self._cond:
            if self._engine is None:
                for link in self._links.values():
                    link.sock.close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spec(codec: str | Codec) -> str:
    return codec.spec if isinstance(codec, Codec) else codec


def _build_all_reduce(g: Group, x: np.ndarray, spec: OpSpec, preserve: bool) -> Plan:
    return collectives.build_all_reduce(
        g.engine, x, parse_op(spec.reduce), parse_codec(spec.codec), preserve_input=preserve
    )


def _build_reduce_scatter(g: Group, x: np.ndarray, spec: OpSpec, preserve: bool) -> Plan:
    return collectives.build_reduce_scatter(
        g.engine, x, parse_op(spec.reduce), parse_codec(spec.codec), layout=spec.layout
    )


def _build_all_gather(g: Group, x: np.ndarray, spec: OpSpec, preserve: bool) -> Plan:
    return collectives.build_all_gather(g.engine, x, parse_codec(spec.codec), layout=spec.layout)


def _build_broadcast(g: Group, x: np.ndarray, spec: OpSpec, preserve: bool) -> Plan:
    if not 0 <= spec.root < g.world:
        raise ConfigError(f"root {spec.root} is outside 0..{g.world - 1}")
    return collectives.build_broadcast(g.engine, x, spec.root, parse_codec(spec.codec))


def _build_barrier(g: Group, x: np.ndarray, spec: OpSpec, preserve: bool) -> Plan:
    return collectives.build_barrier(g.engine)


#: OpSpec.kind -> the plan compiler (the one place a collective's name meets its code)
_BUILD: dict[str, Callable[[Group, np.ndarray, OpSpec, bool], Plan]] = {
    "all_reduce": _build_all_reduce,
    "reduce_scatter": _build_reduce_scatter,
    "all_gather": _build_all_gather,
    "broadcast": _build_broadcast,
    "barrier": _build_barrier,
}

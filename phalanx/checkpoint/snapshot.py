"""The snapshot service: one member's erasure-coded, two-phase-sealed in-memory snapshots.

Owner side: :meth:`SnapshotService.snapshot` validates the state, copies it once into a
service buffer (the only thing the training loop waits for) and hands the generation to
a background worker that checksums it, places its k+m holders
(:func:`~phalanx.checkpoint.placement.place`), encodes stripe after stripe while earlier
stripes are on the wire (:class:`~phalanx.checkpoint.channel.ShardChannel` puts), puts
the generation's metadata on every holder and, once *every* put is acknowledged, commits:
the generation is sealed, seal markers go to the holders, and only then, if every
marker was acknowledged, is every older generation of this owner swept from the live
peers (the previous sealed one, and pieces of abandoned generations or failed repairs
that landed after their deletion). Any failure before the commit abandons the
generation (its shards are deleted, the previous sealed one stays). :meth:`on_view`
repairs the sealed generation when holders leave or restart (a new incarnation: an
empty store under the same id): the owner re-encodes the lost pieces from its own copy
and re-places them with :func:`~phalanx.checkpoint.placement.replace_lost`.

Restore: :meth:`restore` returns this member's newest sealed generation from its own
copy (checked, one memcpy), else from the holders, else from the disk tier; a newer
step on disk than the own copy or the holders offer wins (they are the fallback);
:meth:`restore_peer` rebuilds a gone peer's newest sealed generation from any k
checked pieces per stripe. A generation without a seal marker is never offered.

This module must never touch sockets (shards move only through the channel), never
block ``snapshot()`` on the network, never offer an unsealed generation, and never wait
without a deadline. Threads: one worker (seals and repairs, serialized), an I/O pool,
and the disk writer; all joined by :meth:`SnapshotService.close`.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint._nice import DEFAULT_IO_NICE, check_increment, lower_own_priority
from phalanx.checkpoint.channel import ShardChannel
from phalanx.checkpoint.disk import DiskTier, DiskWrite
from phalanx.checkpoint.erasure import ErasureCoder, make_coder
from phalanx.checkpoint.generation import MAX_SHARD_BYTES, GenerationMeta, Geometry
from phalanx.checkpoint.layout import (
    LayoutError,
    Manifest,
    changes,
    copy_into,
    plan,
    unflatten,
    verify,
    with_checksums,
)
from phalanx.checkpoint.placement import (
    Peer,
    Placement,
    PlacementError,
    default_km,
    place,
    replace_lost,
)
from phalanx.checkpoint.store import ShardError, ShardKey, ShardStore
from phalanx.deadline import Deadline
from phalanx.errors import (
    RestoreError,
    SnapshotAbandoned,
    SnapshotError,
    SnapshotNotFound,
)
from phalanx.logthrottle import LogThrottle

__all__ = [
    "PendingSeal",
    "RestoreError",
    "SealInfo",
    "SnapshotAbandoned",
    "SnapshotConfig",
    "SnapshotError",
    "SnapshotNotFound",
    "SnapshotObserver",
    "SnapshotService",
]

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.snapshot")

U8 = npt.NDArray[np.uint8]

#: Warnings about one holder (its listing failed) at most this often.
_WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class SnapshotConfig:
    """Snapshot settings. ``k``/``m`` ``None``: :func:`default_km` of the view size.
    ``shard_bytes``: bytes of each piece of a stripe (a stripe covers ``k * shard_bytes``
    of state). ``call_timeout_s``: deadline of every channel call;
    ``seal_timeout_s``: of a whole generation (and of ``snapshot()`` waiting for the
    previous one). ``snapshot_dir``/``disk_every``: the disk tier (every Nth sealed
    generation). ``io_nice``: how much nicer than the process the I/O threads run
    (an increment, 0-19; Linux only, where nice is per thread;
    :mod:`phalanx.checkpoint._nice`): the sends of a seal, and the fetches of a
    restore, which share the pool. Background work that yields to the coder and to
    the rest of the process when cores are short, and runs as fast when a core is
    free. 0: left as the thread that starts them (the pool starts its threads on
    first use, from the worker or a restore's caller)."""

    k: int | None = None
    m: int | None = None
    shard_bytes: int = 4 * 1024 * 1024
    call_timeout_s: float = 30.0
    seal_timeout_s: float = 300.0
    inflight_stripes: int = 4
    io_threads: int = 8
    backend: str = "auto"
    snapshot_dir: str | None = None
    disk_every: int = 1
    io_nice: int = DEFAULT_IO_NICE

    def __post_init__(self) -> None:
        if (self.k is None) != (self.m is None):
            raise ValueError("give both k and m, or neither")
        if not 64 <= self.shard_bytes <= MAX_SHARD_BYTES or self.shard_bytes % 64:
            raise ValueError(
                f"shard_bytes must be a multiple of 64 from 64 to {MAX_SHARD_BYTES} (1 GiB)"
            )
        if min(self.call_timeout_s, self.seal_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")
        if self.inflight_stripes < 1 or self.io_threads < 1 or self.disk_every < 1:
            raise ValueError("inflight_stripes, io_threads and disk_every must be >= 1")
        check_increment(self.io_nice)


class SnapshotObserver:
    """What the service reports; the daemon points these at ``monitor.metrics``.
    Every method is called from service threads and must not block."""

    def on_stall(self, seconds: float) -> None:
        """snapshot() blocked the caller this long (phalanx_snapshot_stall_seconds)."""

    def on_seal(self, seconds: float, outcome: str) -> None:
        """A generation ended: ``committed`` or ``abandoned`` after ``seconds``."""

    def on_held_bytes(self, nbytes: int) -> None:
        """Own buffers + shards held for peers (phalanx_snapshot_held_bytes)."""

    def on_underprotected(self, generations: int) -> None:
        """Sealed generations that lost holders and are not repaired yet."""


@dataclass(frozen=True)
class SealInfo:
    generation: int
    step: int
    nbytes: int
    k: int
    m: int
    holders: tuple[str, ...]
    seal_s: float
    encode_s: float  # time inside the erasure coder (wall clock)
    checksum_s: float  # time computing piece checksums
    #: CPU time of the thread inside the erasure coder: what the coder itself costs,
    #: where ``encode_s`` also counts the time its thread waited for a core (the
    #: pieces go out while the next stripe is encoded, and on a small machine the
    #: sends, and the holders' receives, take the cores meanwhile)
    encode_cpu_s: float = 0.0


class _ViewLike(Protocol):
    @property
    def members(self) -> Sequence[Any]: ...


@dataclass(eq=False)
class _Gen:
    generation: int
    step: int
    manifest: Manifest
    buf: U8  # the whole pooled buffer; geometry capacity <= buf.size
    k: int
    m: int
    t0: float
    geo: Geometry
    event: threading.Event = field(default_factory=threading.Event)
    error: SnapshotAbandoned | None = None
    info: SealInfo | None = None
    meta: GenerationMeta | None = None
    pins: int = 0
    released: bool = False
    unmarked: set[str] = field(default_factory=set)  # holders that missed the seal marker
    # holder -> its incarnation when it was given its pieces (views that carry one)
    incarnations: dict[str, int] = field(default_factory=dict)


_NO_BUFFER: U8 = np.empty(0, np.uint8)  # a released generation's buffer


class PendingSeal:
    """Returned by :meth:`SnapshotService.snapshot` once the state is copied."""

    def __init__(self, gen: _Gen, stall_s: float, changed: tuple[str, ...], timeout: float):
        self._gen = gen
        self._timeout = timeout
        self.generation = gen.generation
        self.step = gen.step
        self.nbytes = gen.manifest.nbytes
        #: seconds snapshot() blocked the caller (the one memory copy, plus any wait
        #: for the previous generation to seal)
        self.stall_s = stall_s
        #: names of arrays added, removed or reshaped since the previous snapshot
        self.changes = changed

    def done(self) -> bool:
        return self._gen.event.is_set()

    def wait(self, timeout: float | None = None) -> SealInfo:
        """Block until the generation is sealed; raises :class:`SnapshotAbandoned` if it
        never will, ``TimeoutError`` after ``timeout`` (default: the seal timeout)."""
        if not self._gen.event.wait(self._timeout if timeout is None else timeout):
            raise TimeoutError(f"generation {self.generation} not sealed yet")
        if self._gen.error is not None:
            raise self._gen.error
        assert self._gen.info is not None
        return self._gen.info


def _peers_of(view: _ViewLike | Sequence[Peer | str]) -> tuple[list[Peer], dict[str, int]]:
    """The live peers, and the incarnation of those that carry one (membership
    ``Member``s; ``Peer``s and plain ids carry none)."""
    members = view.members if hasattr(view, "members") else view
    out: list[Peer] = []
    incarnations: dict[str, int] = {}
    for m in members:
        if isinstance(m, Peer):
            out.append(m)
        elif isinstance(m, str):
            out.append(Peer(m))
        else:
            out.append(Peer(str(m.id), str(getattr(m, "zone", "") or "")))
            inc = getattr(m, "incarnation", None)
            if isinstance(inc, int) and not isinstance(inc, bool):
                incarnations[out[-1].id] = inc
    return out, incarnations


def _lost_holders(
    gen: _Gen, holders: Sequence[str], peers: Sequence[Peer], incarnations: Mapping[str, int]
) -> set[str]:
    """The ``holders`` of ``gen`` whose pieces no longer count: gone from the view,
    missed the seal marker, or restarted since they got their pieces (another
    incarnation in the view than the one recorded: an empty store under the same id)."""
    live = {p.id for p in peers}
    restarted = {
        h
        for h, recorded in gen.incarnations.items()
        if h in holders and incarnations.get(h, recorded) != recorded
    }
    return {h for h in holders if h not in live} | (gen.unmarked & live) | restarted


def _wanted(got: int, step: int | None, since: int | None) -> bool:
    """A generation of step ``got`` is asked for: it is ``step`` (any when ``None``) and
    not older than step ``since`` (when given)."""
    return step in (None, got) and (since is None or got >= since)


def _abandon_reason(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ShardError):
        return exc.reason, exc.holder
    if isinstance(exc, PlacementError):
        return exc.reason, ""
    if isinstance(exc, SnapshotError):
        return exc.reason, exc.holder
    if isinstance(exc, TimeoutError):
        return "timeout", ""
    return "error", ""


class SnapshotService:
    """Snapshots of ``member_id``'s state, held by peers through ``channel``.

    ``store`` is this member's own holder store (counted in held bytes; the daemon
    serves it to peers). ``peers``: the live members (``Peer``/ids), updated by
    :meth:`on_view`. The service does not close ``channel`` or ``store``."""

    def __init__(
        self,
        member_id: str,
        channel: ShardChannel,
        store: ShardStore | None = None,
        *,
        peers: _ViewLike | Sequence[Peer | str] = (),
        config: SnapshotConfig | None = None,
        observer: SnapshotObserver | None = None,
    ) -> None:
        self.member_id = member_id
        self.config = config or SnapshotConfig()
        self._channel = channel
        self._store = store
        self._obs = observer or SnapshotObserver()
        self._lock = threading.Lock()
        self._peers, self._incarnations = _peers_of(peers)
        self._view_epoch = -1  # the newest view's epoch seen by on_view (-1: none)
        # peers that may hold keys of this owner older than the last sweep: every live
        # peer at the first sweep (a previous process of this member may have left
        # some; the daemon makes the service before its first view), then the holders
        # each seal and repair sends to (see _delete_older)
        self._touched: set[str] = set()
        self._swept = False
        self._sealed: _Gen | None = None
        self._inflight: _Gen | None = None
        self._last_manifest: Manifest | None = None
        self._last_gen = 0
        self._free: list[U8] = []
        self._coders: dict[tuple[int, int], ErasureCoder] = {}
        self._parity: dict[tuple[int, int], queue.Queue[list[U8]]] = {}
        self._seals = 0
        self._underprotected = 0
        self._warn = LogThrottle(log, _WARN_EVERY_S)  # per holder
        self._closed = False
        self._tasks: queue.Queue[tuple[str, _Gen | None]] = queue.Queue()
        self._io = ThreadPoolExecutor(
            self.config.io_threads,
            thread_name_prefix="snapshot-io",
            initializer=lower_own_priority,
            initargs=(self.config.io_nice,),
        )
        self._disk = (
            DiskTier(self.config.snapshot_dir, member_id) if self.config.snapshot_dir else None
        )
        self._worker = threading.Thread(target=self._run, name="snapshot-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public API
    def on_view(self, view: _ViewLike | Sequence[Peer | str]) -> None:
        """The live members changed: future placements use them, and the sealed
        generation is repaired in the background if it lost holders (gone, or restarted:
        a member whose incarnation changed). A view older than one already seen is
        ignored: views reach it from several threads (the daemon's start hands it the
        view its join returned, while the view callback may already have handed it a
        newer one)."""
        peers, incarnations = _peers_of(view)
        epoch = getattr(view, "epoch", None)
        with self._lock:
            if isinstance(epoch, int):
                if epoch < self._view_epoch:
                    return
                self._view_epoch = epoch
            self._peers, self._incarnations = peers, incarnations
        self._tasks.put(("repair", None))

    def reserve(self, nbytes: int) -> None:
        """Pre-fault two buffers for states of ``nbytes`` so the first snapshots copy
        into warm memory (optional; costs 2 x nbytes of memory now)."""
        k, _ = self._km()
        cap = Geometry(nbytes, k, self.config.shard_bytes).capacity
        with self._lock:
            while len(self._free) < 2:
                buf = np.empty(cap, np.uint8)
                buf.fill(0)  # touch every page now (np.zeros would map them lazily)
                self._free.append(buf)
        self._report_held()

    def snapshot(
        self, state: Mapping[str, Any], step: int, *, deadline: Deadline | None = None
    ) -> PendingSeal:
        """Copy ``state`` into service memory and start sealing it; returns after that
        one copy. Raises :class:`~phalanx.checkpoint.layout.LayoutError` for a state
        that cannot be snapshotted (nothing is copied; the sealed generation stays).
        While the previous generation still seals it waits, up to ``seal_timeout_s``
        (``SnapshotError('busy')``) and never past ``deadline`` (``TimeoutError``:
        passed or cancelled, nothing copied)."""
        t0 = time.perf_counter()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise LayoutError("bad-state", f"step must be an int >= 0, got {step!r}")
        manifest, sources = plan(state)
        with self._lock:
            if self._closed:
                raise SnapshotError("closed", "the snapshot service is closed")
            busy = self._inflight
        if busy is not None:
            end = time.monotonic() + self.config.seal_timeout_s
            while not busy.event.wait(_slice(end, deadline)):
                if deadline is not None and deadline.expired:
                    why = "was cancelled" if deadline.cancelled else "passed"
                    raise TimeoutError(
                        f"the snapshot's deadline {why} while generation "
                        f"{busy.generation} was still sealing (nothing was copied)"
                    )
                if time.monotonic() >= end:
                    raise SnapshotError("busy", f"generation {busy.generation} is still sealing")
        k, m = self._km()
        geo = Geometry(manifest.nbytes, k, self.config.shard_bytes)
        buf = self._take_buffer(geo.capacity)
        copy_into(manifest, sources, buf)
        buf[manifest.nbytes : geo.capacity] = 0
        stall = time.perf_counter() - t0
        with self._lock:
            generation = max(self._last_gen + 1, time.time_ns() // 1000)
            self._last_gen = generation
            gen = _Gen(generation, step, manifest, buf, k, m, t0, geo)
            self._inflight = gen
            changed = changes(self._last_manifest, manifest)
            self._last_manifest = manifest
        if changed:
            audit.info(
                "snapshot layout changed owner=%s generation=%d step=%d arrays=%s",
                self.member_id,
                generation,
                step,
                ",".join(changed[:20]),
            )
        self._tasks.put(("seal", gen))
        self._obs.on_stall(stall)
        self._report_held()
        return PendingSeal(gen, stall, changed, self.config.seal_timeout_s)

    def sealed(self) -> SealInfo | None:
        """The newest sealed generation this service holds, if any."""
        with self._lock:
            return self._sealed.info if self._sealed is not None else None

    @property
    def underprotected(self) -> int:
        return self._underprotected

    def restore(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """(step, state) of this member's newest sealed generation (of ``step`` when
        given): own copy, else the holders, else the disk tier. With ``step`` ``None``
        a newer step on disk wins over the own copy and the holders (steps are
        compared, not generation ids), which stay the fallback if it fails to read."""
        errors: list[str] = []
        disk_step = None
        if step is None and self._disk is not None:
            disk_step = self._disk.newest_step()
        got = self._restore_memory(step, disk_step, errors)
        if got is None:  # the disk's newest step exactly, if it is the newest
            got = self._restore_disk(step if disk_step is None else disk_step, errors)
        if got is None and disk_step is not None:  # it failed: memory at any step,
            got = self._restore_memory(step, None, errors)
            if got is None:  # then an older generation on disk
                got = self._restore_disk(None, errors)
        if got is None:
            want = "any step" if step is None else f"step {step}"
            raise SnapshotNotFound(
                "not-found", f"no sealed generation of {want}: {'; '.join(errors)}"
            )
        return got

    def restore_peer(
        self, owner: str, step: int | None = None, *, timeout: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Rebuild ``owner``'s newest sealed generation (of ``step`` when given) from
        the live holders: any k checked pieces per stripe, decoded, state checksums
        verified. Raises :class:`SnapshotNotFound` or :class:`RestoreError`."""
        return self._from_holders(owner, step, None, timeout)

    def restore_newest(
        self,
        *,
        timeout: float | None = None,
        accept: Callable[[int, dict[str, Any]], bool] | None = None,
    ) -> tuple[str, int, dict[str, Any]]:
        """(owner, step, state) of the newest sealed generation of *any* member that
        this member's own copy or the live holders can rebuild: newest step first
        (then newest generation), each checked as :meth:`restore_peer` checks.

        For a group that lost its training state altogether (every member that held
        it gone): the members of a data-parallel group snapshot the same state, so the
        newest step anyone sealed is the newest state the group can go back to.
        ``accept(step, state)`` skips candidates that do not fit (another layout).
        Raises :class:`SnapshotNotFound` when nothing sealed can be rebuilt."""
        deadline = time.monotonic() + (timeout or self.config.seal_timeout_s)
        have = self._listing(None, deadline)
        candidates: list[tuple[int, int, str, GenerationMeta | None]] = []
        with self._lock:
            own = self._sealed
        if own is not None and own.meta is not None:
            candidates.append((own.step, own.generation, self.member_id, None))
        sealed = sorted({(k.owner, k.generation) for k in have if k.is_seal},
                        key=lambda og: -og[1])  # fmt: skip
        for owner, generation in sealed:
            if owner == self.member_id and own is not None and generation == own.generation:
                continue
            meta = self._fetch_meta(owner, generation, have, deadline)
            if meta is not None:
                candidates.append((meta.step, meta.generation, owner, meta))
        errors: list[str] = []
        for step, generation, owner, meta in sorted(candidates, key=lambda c: (-c[0], -c[1])):
            try:
                if meta is None:
                    got, state = self.restore(step)
                else:
                    buf, _ = self._rebuild(meta, have, deadline)
                    got, state = meta.step, unflatten(meta.manifest, buf)
            except Exception as exc:  # this candidate fails: try the next
                if not isinstance(exc, SnapshotError):
                    log.warning(
                        "snapshot candidate failed owner=%s generation=%d: %s: %s",
                        owner,
                        generation,
                        type(exc).__name__,
                        exc,
                    )
                errors.append(f"{owner}/g{generation}: {exc}")
                continue
            if accept is not None and not accept(got, state):
                errors.append(f"{owner}/g{generation}: does not fit")
                continue
            audit.info(
                "snapshot newest restored owner=%s generation=%d step=%d candidates=%d",
                owner,
                generation,
                got,
                len(candidates),
            )
            return owner, got, state
        raise SnapshotNotFound(
            "not-found",
            "no sealed generation of any member can be rebuilt"
            + (f": {'; '.join(errors[:5])}" if errors else " (none is held by a live peer)"),
        )

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker (an unsealed generation is abandoned), join every thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._tasks.put(("stop", None))
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.error("snapshot worker did not stop within %.1fs", timeout)
        self._io.shutdown(wait=True, cancel_futures=True)
        if self._disk is not None:
            self._disk.close(timeout)

    def __enter__(self) -> SnapshotService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _km(self) -> tuple[int, int]:
        c = self.config
        if c.k is not None and c.m is not None:
            return c.k, c.m
        with self._lock:
            n = max(1, len(self._peers))
        return default_km(n)

    def _coder(self, k: int, m: int) -> ErasureCoder:
        key = (k, m)
        if key not in self._coders:
            # One backend call per piece: ctypes drops the GIL for the whole call, and
            # fewer calls mean fewer waits to get it back from the I/O threads.
            self._coders[key] = make_coder(
                k,
                m,
                self.config.backend,  # type: ignore[arg-type]
                stripe_bytes=self.config.shard_bytes,
            )
        return self._coders[key]

    def _parity_pool(self, m: int) -> queue.Queue[list[U8]]:
        key = (m, self.config.shard_bytes)
        pool = self._parity.get(key)
        if pool is None:
            pool = queue.Queue()
            for _ in range(self.config.inflight_stripes):
                bufs = [np.empty(self.config.shard_bytes, np.uint8) for _ in range(m)]
                for b in bufs:
                    b.fill(0)  # fault the pages in before the first encode
                pool.put(bufs)
            self._parity[key] = pool
        return pool

    def _take_buffer(self, capacity: int) -> U8:
        with self._lock:
            # pooled buffers that do not fit this state (it grew, or shrank by more
            # than half) never will again while it stays so: let them go
            self._free = [b for b in self._free if capacity <= b.size <= 2 * capacity + (1 << 20)]
            if self._free:
                buf = min(self._free, key=lambda b: b.size)
                self._free = [b for b in self._free if b is not buf]
                return buf
        return np.empty(capacity, np.uint8)

    def _release(self, gen: _Gen) -> None:
        """The generation is no longer offered: recycle its buffer when unpinned."""
        with self._lock:
            gen.released = True
            if gen.pins == 0:
                self._recycle(gen)
        self._report_held()

    def _unpin(self, gen: _Gen) -> None:
        with self._lock:
            gen.pins -= 1
            if gen.pins == 0 and gen.released:
                self._recycle(gen)

    def _recycle(self, gen: _Gen) -> None:
        """(Lock held.) The buffer of a released, unpinned generation goes back to the
        pool; the generation lets go of it (a caller's PendingSeal keeps the _Gen)."""
        if len(self._free) < 2 and gen.buf.size:
            self._free.append(gen.buf)
        gen.buf = _NO_BUFFER

    def _report_held(self) -> None:
        with self._lock:
            own = sum(g.buf.nbytes for g in (self._sealed, self._inflight) if g is not None)
            own += sum(b.nbytes for b in self._free)
        self._obs.on_held_bytes(own + (self._store.used_bytes() if self._store else 0))

    def _set_underprotected(self, n: int) -> None:
        if n != self._underprotected:
            self._underprotected = n
        self._obs.on_underprotected(n)

    def _wait_all(self, futures: Sequence[Future[Any]], deadline: float) -> BaseException | None:
        done, pending = wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()))
        for f in pending:
            f.cancel()
        for f in futures:
            if f in done and not f.cancelled() and f.exception() is not None:
                return f.exception()
        if pending:
            # A put that outlives the deadline still ends by its own call deadline.
            wait_futures(pending, timeout=self.config.call_timeout_s + 1.0)
            return TimeoutError(f"{len(pending)} shard transfers missed the seal deadline")
        return None

    def _call_timeout(self, deadline: float) -> float:
        return max(0.001, min(self.config.call_timeout_s, deadline - time.monotonic()))

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            kind, gen = self._tasks.get()
            if kind == "stop":
                with self._lock:
                    g = self._inflight
                if g is not None and not g.event.is_set():
                    self._fail(g, SnapshotAbandoned("closed", "service closed"))
                return
            try:
                if kind == "seal" and gen is not None:
                    self._seal(gen)
                    self._repair()
                elif kind == "repair":
                    self._repair()
            except Exception:  # a bug must not kill the worker; say it loudly
                log.exception("snapshot worker task %s failed", kind)

    def _send_stripes(
        self,
        gen: _Gen,
        holders: Sequence[str],
        indices: Sequence[int],
        deadline: float,
        crcs: list[list[int]],
    ) -> tuple[BaseException | None, float, float, float]:
        """Encode and put pieces ``indices`` of every stripe to ``holders[i]``;
        fill ``crcs``. Returns (first error, seconds encoding, CPU seconds encoding,
        seconds checksumming)."""
        geo = gen.geo
        k, m = gen.k, gen.m
        need_parity = any(i >= k for i in indices)
        coder = self._coder(k, m)
        pool = self._parity_pool(m)
        futures: list[Future[None]] = []
        encode_s = encode_cpu_s = checksum_s = 0.0
        failed = threading.Event()
        closed: SnapshotError | None = None
        for s in range(geo.stripes):
            if self._closed:
                # the stripes not sent have no checksums: this generation must never
                # be committed (it would replace the sealed one with nothing readable)
                closed = SnapshotError(
                    "closed", f"service closed after {s} of {geo.stripes} stripes"
                )
                break
            if failed.is_set():
                break
            try:
                par = pool.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                failed.set()
                break
            length = geo.shard_len(s)
            data = [gen.buf[a:b] for a, b in (geo.piece(s, i) for i in range(k))]
            parity = [p[:length] for p in par]
            te, cpu = time.perf_counter(), time.thread_time()
            if need_parity:
                coder.encode(data, parity)
            tc = time.perf_counter()
            encode_s += tc - te
            encode_cpu_s += time.thread_time() - cpu
            pieces = data + parity
            if not crcs[s]:
                crcs[s] = [crc32(p) for p in pieces]
            elif any(crc32(pieces[i]) != crcs[s][i] for i in indices):
                failed.set()
                pool.put(par)
                bad = SnapshotError("corrupt", f"own copy of stripe {s} changed")
                return bad, encode_s, encode_cpu_s, checksum_s
            row = crcs[s]
            checksum_s += time.perf_counter() - tc
            left = [len(indices)]
            lk = threading.Lock()

            def done(
                f: Future[None],
                par: list[U8] = par,
                left: list[int] = left,
                lk: threading.Lock = lk,
            ) -> None:
                if f.cancelled() or f.exception() is not None:
                    failed.set()
                with lk:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    pool.put(par)

            if not indices:
                pool.put(par)
            for i in indices:
                key = ShardKey(self.member_id, gen.generation, s, i)
                fut = self._io.submit(
                    self._channel.put,
                    holders[i],
                    key,
                    pieces[i],
                    row[i],
                    timeout=self._call_timeout(deadline),
                )
                fut.add_done_callback(done)
                futures.append(fut)
        err = self._wait_all(futures, deadline)
        if err is None and closed is not None:
            err = closed
        if err is None and failed.is_set():
            err = SnapshotError("timeout", "parity buffers not returned before the deadline")
        return err, encode_s, encode_cpu_s, checksum_s

    def _put_all(
        self, holders: Sequence[str], key: ShardKey, data: bytes, deadline: float
    ) -> dict[str, BaseException]:
        arr = np.frombuffer(data, np.uint8)
        crc = crc32(arr)
        futs = {
            h: self._io.submit(
                self._channel.put, h, key, arr, crc, timeout=self._call_timeout(deadline)
            )
            for h in holders
        }
        wait_futures(list(futs.values()), timeout=self.config.call_timeout_s + 1.0)
        errors: dict[str, BaseException] = {}
        for h, f in futs.items():
            if not f.done():
                f.cancel()
                errors[h] = TimeoutError("no answer")
            elif f.exception() is not None:
                errors[h] = f.exception()  # type: ignore[assignment]
        return errors

    def _delete_gen(self, generation: int, holders: Sequence[str], stripes: int, n: int) -> None:
        keys = [
            ShardKey(self.member_id, generation, s, i) for s in range(stripes) for i in range(n)
        ]
        keys += [
            ShardKey.meta(self.member_id, generation),
            ShardKey.seal(self.member_id, generation),
        ]
        futs = [
            self._io.submit(self._channel.delete, h, keys, timeout=self.config.call_timeout_s)
            for h in set(holders)
        ]
        wait_futures(futs, timeout=self.config.call_timeout_s + 1.0)

    def _seal(self, gen: _Gen) -> None:
        deadline = time.monotonic() + self.config.seal_timeout_s
        geo = gen.geo
        n = gen.k + gen.m
        with self._lock:
            peers, incarnations = list(self._peers), dict(self._incarnations)
        holders: tuple[str, ...] = ()
        try:
            manifest = with_checksums(gen.manifest, gen.buf)
            placement = place(self.member_id, peers, gen.k, gen.m)
            holders = placement.holders
            with self._lock:
                self._touched.update(holders)
            gen.incarnations = {h: incarnations[h] for h in holders if h in incarnations}
            crcs: list[list[int]] = [[] for _ in range(geo.stripes)]
            err, encode_s, encode_cpu_s, checksum_s = self._send_stripes(
                gen, holders, range(n), deadline, crcs
            )
            if err is not None:
                raise err
            meta = GenerationMeta(
                self.member_id,
                gen.generation,
                gen.step,
                gen.k,
                gen.m,
                self.config.shard_bytes,
                holders,
                tuple(tuple(r) for r in crcs),
                manifest,
            )
            errors = self._put_all(
                holders, ShardKey.meta(self.member_id, gen.generation), meta.to_bytes(), deadline
            )
            if errors:
                h, e = next(iter(errors.items()))
                if isinstance(e, ShardError):
                    raise e
                raise SnapshotError("unavailable", str(e), holder=h)
        except BaseException as exc:
            reason, holder = _abandon_reason(exc)
            if holders:  # drop what was stored before anyone hears of the failure
                self._delete_gen(gen.generation, holders, geo.stripes, n)
            self._fail(gen, SnapshotAbandoned(reason, str(exc), holder=holder))
            return
        # Phase 1 complete: every piece and the metadata are acknowledged. Commit.
        gen.meta = meta
        unmarked = self._put_all(
            holders, ShardKey.seal(self.member_id, gen.generation), b"\x01", deadline
        )
        gen.unmarked = set(unmarked)
        seal_s = time.perf_counter() - gen.t0
        gen.info = SealInfo(
            gen.generation,
            gen.step,
            manifest.nbytes,
            gen.k,
            gen.m,
            holders,
            seal_s,
            encode_s,
            checksum_s,
            encode_cpu_s,
        )
        with self._lock:
            prev, self._sealed, self._inflight = self._sealed, gen, None
            self._seals += 1
            to_disk = self._disk is not None and self._seals % self.config.disk_every == 0
            if to_disk:
                gen.pins += 1
        audit.info(
            "snapshot sealed owner=%s generation=%d step=%d bytes=%d k=%d m=%d holders=%s "
            "seal_s=%.3f encode_s=%.3f unmarked=%s",
            self.member_id,
            gen.generation,
            gen.step,
            manifest.nbytes,
            gen.k,
            gen.m,
            ",".join(holders),
            seal_s,
            encode_s,
            ",".join(sorted(unmarked)) or "-",
        )
        self._obs.on_seal(seal_s, "committed")
        if prev is not None:
            self._release(prev)
        if not unmarked:  # every holder knows the new seal: older generations may go
            self._delete_older(gen)
        if to_disk and self._disk is not None:
            self._disk.submit(
                DiskWrite(
                    gen.generation, gen.step, manifest, gen.buf, functools.partial(self._unpin, gen)
                )
            )
        self._report_held()
        gen.event.set()  # last: the previous generation is already gone from the holders

    def _delete_older(self, gen: _Gen) -> None:
        """Sweep every key of this owner's generations older than ``gen`` off the live
        peers that may hold some (listing what each holds): superseded sealed
        generations (also on holders a repair moved away from), and pieces of
        abandoned generations or failed repairs that landed after they were deleted.
        Only peers some seal or repair sent to since the last sweep are asked (every
        live one at the first sweep), so a seal costs a listing per holder, not per
        member.
        Newer generations (the one in flight) are left alone."""
        assert gen.meta is not None
        with self._lock:
            live = {p.id for p in self._peers}
            targets = (live if not self._swept else self._touched & live) | {self.member_id}
            self._swept = True
            # gen's own holders are owed the next sweep (the next seal supersedes
            # gen); peers outside the view are dropped (the daemon's channel cannot
            # reach a member that left)
            self._touched = set(gen.meta.holders)

        def drop(h: str) -> None:
            keys = [
                k
                for k in self._channel.list(h, self.member_id, timeout=self.config.call_timeout_s)
                if k.generation < gen.generation
            ]
            if keys:
                self._channel.delete(h, keys, timeout=self.config.call_timeout_s)

        futs = {h: self._io.submit(drop, h) for h in sorted(targets)}
        wait_futures(list(futs.values()), timeout=2 * self.config.call_timeout_s + 1.0)
        failed = {h for h, f in futs.items() if not f.done() or f.exception() is not None}
        with self._lock:
            self._touched |= failed  # asked again after the next clean seal

    def _fail(self, gen: _Gen, error: SnapshotAbandoned) -> None:
        gen.error = error
        with self._lock:
            if self._inflight is gen:
                self._inflight = None
        audit.warning(
            "snapshot abandoned owner=%s generation=%d step=%d reason=%s holder=%s detail=%s",
            self.member_id,
            gen.generation,
            gen.step,
            error.reason,
            error.holder or "-",
            error.detail,
        )
        self._obs.on_seal(time.perf_counter() - gen.t0, "abandoned")
        self._release(gen)
        gen.event.set()

    def _repair(self) -> None:
        with self._lock:
            gen = self._sealed
            peers, incarnations = list(self._peers), dict(self._incarnations)
        if gen is None or gen.meta is None:
            self._set_underprotected(0)
            return
        meta = gen.meta
        lost = _lost_holders(gen, meta.holders, peers, incarnations)
        if not lost:
            self._set_underprotected(0)
            return
        self._set_underprotected(1)
        old = Placement(self.member_id, meta.k, meta.m, meta.holders)
        try:
            new = replace_lost(old, peers, lost=lost)
            with self._lock:
                self._touched.update(new.holders)
        except PlacementError as exc:
            audit.warning(
                "snapshot repair impossible owner=%s generation=%d lost=%s reason=%s",
                self.member_id,
                gen.generation,
                ",".join(sorted(lost)),
                exc,
            )
            return
        slots = [i for i in range(new.n) if new.holders[i] != old.holders[i]]
        deadline = time.monotonic() + self.config.seal_timeout_s
        crcs = [list(r) for r in meta.crcs]
        with self._lock:
            gen.pins += 1
        try:
            err, _, _, _ = self._send_stripes(gen, new.holders, slots, deadline, crcs)
        finally:
            self._unpin(gen)
        new_meta = GenerationMeta(
            meta.owner,
            meta.generation,
            meta.step,
            meta.k,
            meta.m,
            meta.shard_bytes,
            new.holders,
            meta.crcs,
            meta.manifest,
        )
        errors: dict[str, BaseException] = {}
        if err is None:
            errors = self._put_all(
                new.holders,
                ShardKey.meta(self.member_id, gen.generation),
                new_meta.to_bytes(),
                deadline,
            )
            errors.update(
                self._put_all(
                    new.holders, ShardKey.seal(self.member_id, gen.generation), b"\x01", deadline
                )
            )
        if err is not None or errors:
            audit.warning(
                "snapshot repair failed owner=%s generation=%d lost=%s error=%s",
                self.member_id,
                gen.generation,
                ",".join(sorted(lost)),
                err or next(iter(errors.values())),
            )
            return
        gen.meta = new_meta
        gen.unmarked = set()
        gen.incarnations = {h: i for h, i in gen.incarnations.items() if h in new.holders}
        for h in (new.holders[i] for i in slots):
            if h in incarnations:
                gen.incarnations[h] = incarnations[h]
        audit.info(
            "snapshot repaired owner=%s generation=%d step=%d lost=%s new=%s",
            self.member_id,
            gen.generation,
            gen.step,
            ",".join(sorted(lost)),
            ",".join(new.holders[i] for i in slots),
        )
        with self._lock:
            still = self._sealed is gen and bool(
                _lost_holders(gen, new.holders, self._peers, self._incarnations)
            )
        self._set_underprotected(1 if still else 0)
        if still:
            self._tasks.put(("repair", None))

    # ------------------------------------------------------------------ restore side
    def _restore_memory(
        self, step: int | None, since: int | None, errors: list[str]
    ) -> tuple[int, dict[str, Any]] | None:
        """The own copy, else the holders (of ``step``; of a step >= ``since`` when
        given); ``None`` (the reason added to ``errors``) when neither has it."""
        with self._lock:
            gen = self._sealed
            if gen is not None and _wanted(gen.step, step, since):
                gen.pins += 1
            else:
                gen = None
        if gen is not None:
            try:
                assert gen.meta is not None
                bad = verify(gen.meta.manifest, gen.buf)
                if not bad:
                    return gen.step, unflatten(gen.meta.manifest, gen.buf)
                log.error(
                    "snapshot own copy fails checksums generation=%d arrays=%s",
                    gen.generation,
                    bad[:5],
                )
            finally:
                self._unpin(gen)
        try:
            return self._from_holders(self.member_id, step, since, None)
        except SnapshotError as exc:
            errors.append(f"holders: {exc}")
        return None

    def _restore_disk(
        self, step: int | None, errors: list[str]
    ) -> tuple[int, dict[str, Any]] | None:
        if self._disk is None:
            return None
        found = self._disk.read(step)
        if found is None:
            errors.append("disk: no intact generation")
            return None
        _, dstep, manifest, buf = found
        audit.info("snapshot restore from disk owner=%s step=%d", self.member_id, dstep)
        return dstep, unflatten(manifest, buf)

    def _from_holders(
        self, owner: str, step: int | None, since: int | None, timeout: float | None
    ) -> tuple[int, dict[str, Any]]:
        """:meth:`restore_peer`; ``since``: only generations of a step >= it."""
        deadline = time.monotonic() + (timeout or self.config.seal_timeout_s)
        t0 = time.perf_counter()
        have = self._listing(owner, deadline)
        sealed = sorted({k.generation for k in have if k.is_seal}, reverse=True)
        last: SnapshotError | None = None
        for generation in sealed:
            meta = self._fetch_meta(owner, generation, have, deadline)
            if meta is None or not _wanted(meta.step, step, since):
                continue
            try:
                buf, lost = self._rebuild(meta, have, deadline)
                got = unflatten(meta.manifest, buf)
            except Exception as exc:  # this generation fails, never the whole restore
                log.warning(
                    "snapshot rebuild failed owner=%s generation=%d: %s: %s",
                    owner,
                    generation,
                    type(exc).__name__,
                    exc,
                )
                last = (
                    exc
                    if isinstance(exc, RestoreError)
                    else RestoreError(
                        "error", f"generation {generation}: {type(exc).__name__}: {exc}"
                    )
                )
                continue
            audit.info(
                "snapshot restore from holders owner=%s generation=%d step=%d bytes=%d "
                "pieces_lost=%d seconds=%.3f",
                owner,
                generation,
                meta.step,
                meta.manifest.nbytes,
                lost,
                time.perf_counter() - t0,
            )
            return meta.step, got
        if last is not None:
            raise last
        want = "any step" if step is None else f"step {step}"
        if since is not None:
            want += f" from step {since} on"
        raise SnapshotNotFound(
            "not-found", f"no live holder has a sealed generation of {owner} ({want})"
        )

    def _listing(self, owner: str | None, deadline: float) -> dict[ShardKey, list[str]]:
        with self._lock:
            holders = sorted({p.id for p in self._peers} | {self.member_id})
        futs = {
            h: self._io.submit(self._channel.list, h, owner, timeout=self._call_timeout(deadline))
            for h in holders
        }
        wait_futures(list(futs.values()), timeout=self.config.call_timeout_s + 1.0)
        have: dict[ShardKey, list[str]] = {}
        for h, f in futs.items():
            if not f.done():
                f.cancel()
                self._warn.warning(h, "snapshot listing failed holder=%s: no answer in time", h)
            elif f.exception() is not None:
                exc = f.exception()
                self._warn.warning(
                    h, "snapshot listing failed holder=%s: %s: %s", h, type(exc).__name__, exc
                )
            else:
                for key in f.result():
                    have.setdefault(key, []).append(h)
        return have

    def _fetch_meta(
        self, owner: str, generation: int, have: Mapping[ShardKey, list[str]], deadline: float
    ) -> GenerationMeta | None:
        key = ShardKey.meta(owner, generation)
        for h in have.get(key, []):
            try:
                data, _ = self._channel.get(h, key, timeout=self._call_timeout(deadline))
                meta = GenerationMeta.from_bytes(data.tobytes())
            except Exception as exc:  # this holder's copy is unusable: try the next
                log.warning(
                    "snapshot metadata unreadable holder=%s key=%s: %s: %s",
                    h,
                    key,
                    type(exc).__name__,
                    exc,
                )
                continue
            if (meta.owner, meta.generation) != (owner, generation):
                log.warning(
                    "snapshot metadata of %s/g%d held under key %s holder=%s: ignored",
                    meta.owner,
                    meta.generation,
                    key,
                    h,
                )
                continue
            return meta
        return None

    def _rebuild(
        self, meta: GenerationMeta, have: Mapping[ShardKey, list[str]], deadline: float
    ) -> tuple[U8, int]:
        geo = meta.geometry
        k, n = meta.k, meta.k + meta.m
        coder = self._coder(meta.k, meta.m)
        out = np.empty(geo.capacity, np.uint8)

        def one(s: int) -> int:
            length = geo.shard_len(s)
            present: dict[int, U8] = {}
            for i in range(n):
                if len(present) == k:
                    break
                key = ShardKey(meta.owner, meta.generation, s, i)
                for h in have.get(key, []):
                    try:
                        data, crc = self._channel.get(h, key, timeout=self._call_timeout(deadline))
                    except ShardError as exc:
                        log.info("snapshot piece lost holder=%s key=%s: %s", h, key, exc)
                        continue
                    if crc != meta.crcs[s][i] or data.size != length:
                        log.warning("snapshot piece corrupt holder=%s key=%s", h, key)
                        continue
                    present[i] = data
                    break
            if len(present) < k:
                raise RestoreError(
                    "too-few-shards",
                    f"stripe {s}: {len(present)} of {n} pieces readable, {k} needed",
                )
            outs: dict[int, U8] = {}
            for i in range(k):
                a, b = geo.piece(s, i)
                if i in present:
                    out[a:b] = present[i]
                else:
                    outs[i] = out[a:b]
            if outs:
                coder.decode(present, outs)
            return len(outs)

        futs = [self._io.submit(one, s) for s in range(geo.stripes)]
        err = self._wait_all(futs, deadline)
        if err is not None:
            if isinstance(err, RestoreError):
                raise err
            raise RestoreError("timeout", str(err))
        lost = sum(f.result() for f in futs)
        bad = verify(meta.manifest, out)
        if bad:
            raise RestoreError("checksum", f"rebuilt arrays fail their checksums: {bad[:5]}")
        return out, lost


def _slice(end: float, deadline: Deadline | None) -> float:
    """One bounded wait: until ``end``, at most 0.1 s (a cancel is seen that soon)."""
    left = end - time.monotonic()
    if deadline is not None:
        left = min(left, deadline.left())
    return max(0.0, min(left, 0.1))

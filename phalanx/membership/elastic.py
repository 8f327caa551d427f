"""ElasticGroup: collectives over a group whose members change while training runs.

An :class:`ElasticGroup` is one peer's union of a membership :class:`Agent` and the
data-plane :class:`phalanx.comm.Group` of the current view. It

* advertises one data-plane address for the whole incarnation (a :class:`Door` that
  routes each incoming link to the group of the epoch named in its HELLO);
* on every new view (agent callback): aborts the collective in flight in the old view
  (its links are shut down, so the engine fails it at once with the caller's buffer
  restored — promise 2); its *installer* thread closes the old group and starts the
  build of the new view's group (rank = index in the view, address = each member's
  first address) on a *builder* thread of its own, so the build overlaps with the
  caller noticing the failure, and a stale build never delays the newest one;
* before the first collective in a new group, runs the state-sync exchange
  (:mod:`phalanx.membership.statesync`): members that hold another state than the
  majority receive it over the data plane, verified by hash, before contributing;
* reports data-plane :class:`PeerFailure` s to the coordinator (``report_failure``
  by member id, on a *reporter* thread so a slow coordinator never delays a retry);
* runs collectives with an opt-in ``retry=True``: on failure, wait for the next view
  and run again (exact: the input was restored); the :class:`ElasticResult` names the
  member ids that contributed;
* votes ``commit(step, ok)`` with the epoch of the step's first successful collective,
  so a step whose collectives ran in two views is never committed.

Errors: a collective aborted because the view changed raises :class:`ViewChanged` (a
:class:`PeerFailure` whose ``epoch`` is the **new** epoch; ``old_epoch`` is the one it
ran in); other data-plane failures raise the engine's :class:`PeerFailure`;
:class:`~phalanx.membership.errors.Evicted` once this incarnation was removed (call
:meth:`ElasticGroup.rejoin`).

Threads: the agent's two, the door's, the installer, the reporter and short-lived
builders (one per view, each bounded by ``build_timeout``); :meth:`close` joins all. The caller's thread runs collectives and the sync protocol; no lock
of this class is held while a collective or an RPC runs. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from phalanx.comm import CommOptions, Group
from phalanx.errors import (
    CommError,
    ConfigError,
    GroupClosed,
    HandshakeError,
    PeerFailure,
    ViewChanged,
)
from phalanx.membership._door import Door, EpochListener
from phalanx.membership.agent import Agent
from phalanx.membership.config import MembershipConfig
from phalanx.membership.errors import Evicted, MembershipError
from phalanx.membership.statesync import (
    Action,
    PeerRecord,
    StateSyncError,
    StepAborted,
    SyncReport,
    SyncState,
    gather_records,
    plan_sync,
    transfer,
)
from phalanx.membership.view import Member, View
from phalanx.ops import OpResult

__all__ = ["ElasticGroup", "ElasticResult", "StepInfo", "ViewChanged"]

log = logging.getLogger(__name__)

_UNSET = object()


@dataclass(frozen=True)
class ElasticResult:
    """A completed collective: the engine's info, the epoch it ran in, the member ids
    that contributed (view order = rank order) and how many attempts failed before."""

    info: OpResult
    epoch: int
    contributors: tuple[str, ...]
    failed_attempts: int


@dataclass(frozen=True)
class StepInfo:
    """What :meth:`ElasticGroup.begin_step` found: the view and, if one ran, the sync."""

    epoch: int
    members: tuple[str, ...]
    step: int
    sync: SyncReport | None


class _Epoch:
    """The data-plane group of one view (built or failed) and its install status."""

    def __init__(self, view: View, rank: int) -> None:
        self.view = view
        self.rank = rank
        self.group: Group | None = None
        self.listener: EpochListener | None = None
        self.error: BaseException | None = None
        self.exchanged = False  # state exchange done: collectives may run
        self.broken: PeerFailure | None = None  # a collective failed here
        self.sync: SyncReport | None = None


class ElasticGroup:
    """Collectives over the current view of an elastic group; see the module docstring.

    Args:
        coordinator: ``host:port`` of the coordinator.
        member_id: this peer's stable id.
        secret: the cluster secret (the data plane always needs one; >= 16 bytes).
        listen: data-plane address to bind (port 0: any); advertised to the group.
        incarnation: first incarnation (bump it when a process restarts under an id).
        state: the state kept identical across members (``SyncState.empty()`` for a
            newcomer); ``None`` disables state sync.
        options: data-plane options; ``connect_timeout_s`` is capped by ``build_timeout``.
        build_timeout: longest a per-view group build may take (a member that died
            during the build costs at most this; the next view is then built).
        on_view: observer called (installer thread) with every new view, before the build.
        advertise: more addresses to advertise after the data-plane one (the daemon's
            shard server); the data plane only ever uses ``addresses[0]``.
    """

    def __init__(
        self,
        coordinator: str,
        member_id: str,
        secret: bytes | str,
        *,
        listen: str = "127.0.0.1:0",
        incarnation: int = 1,
        zone: str = "",
        state: SyncState | None = None,
        config: MembershipConfig | None = None,
        options: CommOptions | None = None,
        build_timeout: float = 3.0,
        tls_root_cert: bytes | None = None,
        on_view: Callable[[View], None] | None = None,
        advertise: tuple[str, ...] = (),
    ) -> None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < 16:
            raise ConfigError("the cluster secret must be at least 16 bytes")
        if not build_timeout > 0:
            raise ConfigError("build_timeout must be > 0")
        self._secret = raw
        base = options or CommOptions()
        self.options = replace(base, connect_timeout_s=min(base.connect_timeout_s, build_timeout))
        self.state = state
        self._observer = on_view
        self._door = Door(listen, hold_s=max(build_timeout, self.options.handshake_timeout_s))
        member = Member(member_id, (self._door.address, *advertise), incarnation, zone)
        self.agent = Agent(
            coordinator,
            member,
            secret=raw,
            config=config,
            on_view=self._on_view,
            on_evicted=self._on_evicted,
            tls_root_cert=tls_root_cert,
        )
        self._cond = threading.Condition()
        self._pending: View | None = None
        self._current: _Epoch | None = None
        self._latest = 0  # newest epoch announced
        self._evicted = False
        self._closed = False
        self._stop = threading.Event()
        self._reports: queue.Queue[tuple[list[str], int, str] | None] = queue.Queue()
        # position inside the caller's training step (see statesync: PeerRecord)
        self._pos_step = -1
        self._done = 0
        self._step_epoch: int | None = None
        self._threads = [
            threading.Thread(target=self._installer, name="phalanx-elastic-install", daemon=True),
            threading.Thread(target=self._reporter, name="phalanx-elastic-report", daemon=True),
        ]
        self._builders: list[threading.Thread] = []
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ membership
    @property
    def member_id(self) -> str:
        return self.agent.member.id

    @property
    def address(self) -> str:
        """The data-plane address this member advertises."""
        return self._door.address

    @property
    def view(self) -> View:
        return self.agent.view

    @property
    def evicted(self) -> bool:
        return self._evicted

    def join(self, timeout: float = 15.0) -> View:
        """Join the group; returns the first view (the data-plane group is built in the
        background; the first collective or :meth:`begin_step` waits for it)."""
        return self.agent.join(timeout)

    def rejoin(self, timeout: float = 15.0) -> View:
        """After eviction: join again with a higher incarnation (state is re-synced)."""
        self._retire_current()
        with self._cond:
            self._evicted = False
            self._done = 0
            self._step_epoch = None
        return self.agent.rejoin(timeout)

    def leave(self, timeout: float | None = None, reason: str = "") -> None:
        """Leave gracefully: the others get a view without us at once."""
        self.agent.leave(timeout, reason)
        self._retire_current()

    def close(self) -> None:
        """Stop everything (no goodbye: :meth:`leave` first for that). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self.agent.close()
        self._stop.set()
        self._reports.put(None)
        for t in [*self._threads, *self._builders]:
            t.join(self.options.connect_timeout_s + self.options.handshake_timeout_s + 5.0)
            if t.is_alive():
                log.error("event=thread_not_joined name=%s", t.name)
        self._retire_current()
        self._door.close()

    def __enter__(self) -> ElasticGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ agent callbacks
    def _on_view(self, view: View) -> None:
        with self._cond:
            self._pending = view
            self._latest = max(self._latest, view.epoch)
            cur = self._current
            self._cond.notify_all()
        if cur is not None and cur.group is not None:
            _abort_links(cur.group)  # fail the op in flight now; the installer closes it

    def _on_evicted(self, epoch: int) -> None:
        with self._cond:
            self._evicted = True
            cur = self._current
            self._cond.notify_all()
        log.warning("event=elastic_evicted member=%s epoch=%d", self.member_id, epoch)
        if cur is not None and cur.group is not None:
            _abort_links(cur.group)

    # ------------------------------------------------------------------ installer thread
    def _installer(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while self._pending is None and not self._stop.is_set() and not self._closed:
                    self._cond.wait(0.1)
                if self._stop.is_set() or self._closed:
                    return
                view = self._pending
                self._pending = None
            assert view is not None
            if self._observer is not None:
                try:
                    self._observer(view)
                except Exception:
                    log.exception("event=observer_error member=%s", self.member_id)
            self._retire_current()
            # Each view is built on a thread of its own: a build of a view that is
            # already stale (waiting for a member that moved on) must not delay the
            # newest one, or the others give up on us (``build_timeout``) meanwhile.
            builder = threading.Thread(
                target=self._build, args=(view,), name="phalanx-elastic-build", daemon=True
            )
            self._builders = [b for b in self._builders if b.is_alive()]
            self._builders.append(builder)
            builder.start()

    def _build(self, view: View) -> None:
        me = self.member_id
        if me not in view:
            return
        ep = _Epoch(view, view.rank(me))
        t0 = time.monotonic()
        listener = self._door.listener(view.epoch)
        ep.listener = listener
        try:
            ep.group = Group(
                ep.rank,
                [m.addresses[0] for m in view.members],
                self._secret,
                listener=listener,
                epoch=view.epoch,
                options=self.options,
            )
        except Exception as exc:  # HandshakeError, OSError, ...: this epoch is unusable
            ep.error = exc
            listener.close()
            peer = exc.peer if isinstance(exc, HandshakeError) else None
            suspects = [view.members[peer].id] if peer is not None and peer < view.size else []
            log.warning(
                "event=group_build_failed member=%s epoch=%d error=%r", me, view.epoch, str(exc)
            )
            with self._cond:
                newer = self._latest > view.epoch
            if suspects and not newer:
                self._reports.put((suspects, view.epoch, "connect"))
        else:
            log.info(
                "event=group_built member=%s epoch=%d rank=%d world=%d build_s=%.4f",
                me,
                view.epoch,
                ep.rank,
                view.size,
                time.monotonic() - t0,
            )
        stale = None
        with self._cond:
            if self._closed or view.epoch < self._latest:
                stale = ep  # a newer view arrived during the build (or we are closing)
            else:
                self._current = ep
            self._cond.notify_all()
        if stale is not None:
            _close_epoch(stale)

    def _retire_current(self) -> None:
        with self._cond:
            cur = self._current
            self._current = None
        if cur is not None:
            _close_epoch(cur)

    # ------------------------------------------------------------------ reporter thread
    def _reporter(self) -> None:
        while True:
            try:
                item = self._reports.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is None:
                return
            ids, epoch, reason = item
            try:
                self.agent.report_failure(ids, epoch, reason)
            except MembershipError as exc:
                log.warning("event=report_failed member=%s error=%s", self.member_id, exc)

    # ------------------------------------------------------------------ caller side
    def _acquire(self, after: int, deadline: float) -> _Epoch:
        """The built group of the newest view with epoch > ``after``; waits for it."""
        with self._cond:
            while True:
                if self._closed:
                    raise GroupClosed("elastic group is closed")
                if self._evicted:
                    raise Evicted("this incarnation was removed from the group", epoch=self._latest)
                cur = self._current
                if (
                    cur is not None
                    and cur.view.epoch > after
                    and cur.view.epoch >= self._latest
                    and self._pending is None
                ):
                    if cur.error is None and cur.broken is None:
                        return cur
                    after = max(after, cur.view.epoch)  # unusable: wait for the next view
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.member_id}: no usable view after epoch {after} in time"
                    )
                self._cond.wait(min(left, 0.1))

    def _ensure_exchanged(self, ep: _Epoch, deadline: float, *, in_op: bool) -> None:
        """Run the state exchange (and the sync it calls for) once per group."""
        while not ep.exchanged:
            assert ep.group is not None
            st = self.state
            mine = PeerRecord(
                has_state=st is not None and st.valid,
                state_step=st.step if st is not None else -1,
                digest=st.digest() if st is not None else b"\0" * 32,
                pos_step=self._pos_step,
                done=self._done,
                in_op=in_op,
            )
            records = gather_records(ep.group, mine)
            plan = plan_sync(records)
            if plan.action is Action.ABORT:
                if ep.rank in plan.aborted:
                    raise StepAborted(
                        ep.view.epoch, self._pos_step, "members at a step boundary joined"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError("members did not realign at a step boundary in time")
                continue  # the mid-step members exchange again on their next call
            if st is not None and plan.receivers:
                try:
                    ep.sync = transfer(
                        ep.group, plan, st, epoch=ep.view.epoch, side=self._side_group(ep)
                    )
                except StateSyncError as exc:
                    with self._cond:
                        ep.broken = PeerFailure(
                            op="state_sync",
                            seq=-1,
                            epoch=ep.view.epoch,
                            suspects=exc.bad_ranks,
                            reason="protocol",
                            detail=str(exc),
                        )
                    if ep.rank in exc.bad_ranks:
                        # never contribute unverified state: step out, so that the
                        # others get a view without us; the caller may rejoin()
                        self.agent.leave(reason="state-sync-failed")
                    raise
            ep.exchanged = True
            log.info(
                "event=view_ready member=%s epoch=%d rank=%d members=%s source=%s receivers=%s",
                self.member_id,
                ep.view.epoch,
                ep.rank,
                ",".join(ep.view.ids),
                plan.source,
                list(plan.receivers),
            )

    def _side_group(self, ep: _Epoch) -> Callable[[tuple[int, ...]], Group]:
        """Builds a group of some ranks of ``ep``'s view, for the state transfer, under
        its own epoch id (bit 62 set: never a view's) through the same door."""

        def build(ranks: tuple[int, ...]) -> Group:
            side_epoch = (1 << 62) | ep.view.epoch
            listener = self._door.listener(side_epoch, advance=False)
            try:
                return Group(
                    ranks.index(ep.rank),
                    [ep.view.members[r].addresses[0] for r in ranks],
                    self._secret,
                    listener=listener,
                    epoch=side_epoch,
                    options=self.options,
                )
            except BaseException:
                listener.close()
                raise

        return build

    def _on_op_failure(self, ep: _Epoch, exc: CommError, op: str) -> PeerFailure:
        """Classify a failed collective; report real peer failures; return what to raise."""
        seq = exc.seq if isinstance(exc, PeerFailure) else -1
        with self._cond:
            latest = self._latest
            evicted = self._evicted
            if isinstance(exc, PeerFailure) and ep.broken is None:
                ep.broken = exc
            elif ep.broken is None:
                ep.broken = PeerFailure(
                    op=op,
                    seq=seq,
                    epoch=ep.view.epoch,
                    suspects=(),
                    reason="closed",
                    detail=str(exc),
                )
        if evicted:
            raise Evicted("this incarnation was removed from the group", epoch=latest) from exc
        if latest > ep.view.epoch:
            return ViewChanged(
                op=op,
                seq=seq,
                old_epoch=ep.view.epoch,
                epoch=latest,
                detail=f"view {latest} replaced view {ep.view.epoch}: {exc}",
            )
        if isinstance(exc, PeerFailure):
            if exc.reason not in ("closed", "view-change") and exc.suspects:
                ids = [ep.view.members[r].id for r in sorted(exc.suspects) if r < ep.view.size]
                self._reports.put((ids, ep.view.epoch, exc.reason))
            return exc
        return PeerFailure(
            op=op, seq=seq, epoch=ep.view.epoch, suspects=(), reason="closed", detail=str(exc)
        )

    def _collective(
        self, op: str, run: Callable[[Group], OpResult], retry: bool, timeout: float | None
    ) -> ElasticResult:
        deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
        failed = 0
        after = 0
        while True:
            ep = self._acquire(after, deadline)
            assert ep.group is not None
            try:
                self._ensure_exchanged(ep, deadline, in_op=True)
                info = run(ep.group)
            except (PeerFailure, GroupClosed) as exc:
                err = self._on_op_failure(ep, exc, op)
                failed += 1
                if not retry:
                    raise err from exc
                after = ep.view.epoch
                log.info(
                    "event=op_retry member=%s op=%s epoch=%d reason=%s",
                    self.member_id,
                    op,
                    ep.view.epoch,
                    err.reason,
                )
                continue
            self._done += 1
            if self._step_epoch is None:
                self._step_epoch = ep.view.epoch
            return ElasticResult(info, ep.view.epoch, ep.view.ids, failed)

    # ------------------------------------------------------------------ public ops
    def begin_step(self, step: int | None = None, timeout: float = 60.0) -> StepInfo:
        """Mark a training-step boundary: install a new view if one is pending and run
        the state exchange/sync there. ``step`` defaults to ``state.step``."""
        if step is None:
            step = self.state.step if self.state is not None else self._pos_step + 1
        self._pos_step = step
        self._done = 0
        self._step_epoch = None
        deadline = time.monotonic() + timeout
        after = 0
        while True:
            ep = self._acquire(after, deadline)
            assert ep.group is not None
            try:
                self._ensure_exchanged(ep, deadline, in_op=False)
            except (PeerFailure, GroupClosed) as exc:
                self._on_op_failure(ep, exc, "exchange")
                after = ep.view.epoch
                continue
            st = self.state
            return StepInfo(
                ep.view.epoch, ep.view.ids, st.step if st is not None else step, ep.sync
            )

    def all_reduce(
        self,
        x: np.ndarray,
        op: str = "sum",
        codec: str = "none",
        *,
        retry: bool = False,
        timeout: float | None = None,
    ) -> ElasticResult:
        """In-place all-reduce over the current view (see :meth:`phalanx.comm.Group.all_reduce`)."""
        return self._collective("all_reduce", lambda g: g.all_reduce(x, op, codec), retry, timeout)

    def broadcast(
        self, x: np.ndarray, root: int = 0, *, retry: bool = False, timeout: float | None = None
    ) -> ElasticResult:
        """Copy rank ``root``'s ``x`` to everyone (rank in the view the op runs in)."""
        return self._collective("broadcast", lambda g: g.broadcast(x, root), retry, timeout)

    def all_gather(
        self, x: np.ndarray, *, retry: bool = False, timeout: float | None = None
    ) -> ElasticResult:
        return self._collective("all_gather", lambda g: g.all_gather(x), retry, timeout)

    def barrier(self, *, retry: bool = False, timeout: float | None = None) -> ElasticResult:
        return self._collective("barrier", lambda g: g.barrier(), retry, timeout)

    def commit(self, step: int, ok: bool, *, timeout: float | None = None) -> bool:
        """The group's decision on ``step`` (same on every member): the vote carries
        the epoch of the step's first successful collective."""
        epoch = self._step_epoch if self._step_epoch is not None else self.agent.view.epoch
        return self.agent.commit(step, ok, epoch=epoch, timeout=timeout)


def _abort_links(group: Group) -> None:
    """Make the engine fail whatever it runs, at once (buffers restored, peers told)."""
    with contextlib.suppress(ConfigError):
        group.abort("view-change", "a new view was installed")


def _close_epoch(ep: _Epoch) -> None:
    if ep.listener is not None:
        ep.listener.close()  # ends the group's accept loop now instead of its next poll
    if ep.group is not None:
        _abort_links(ep.group)
        ep.group.close()

"""ElasticGroup: collectives over a group whose members change while training runs.

An :class:`ElasticGroup` is one member's union of a membership :class:`Agent` and the
data-plane :class:`phalanx.comm.Group` of the current view — what a training process
holds in-process, and what a daemon serves its client with. It

* advertises one data-plane address for the whole incarnation (a :class:`Door` that
  routes each incoming link to the group its HELLO names);
* on every new view (agent callback): aborts the collective in flight in the old view
  (the engine fails it at once with the caller's buffer restored — promise 2); its
  *installer* thread retires the old group and starts the build of the new one on a
  *builder* thread of its own, so a stale build never delays the newest one. Every
  group is built with the comm observer and handed to ``on_engine`` (the monitor);
* **heals**: a group whose collective failed while its members are still in the view
  (a rank broke the contract, a corrupt frame, a deadline) is rebuilt for the same
  view as the next *generation* (:func:`~phalanx.membership.lifecycle.data_epoch`);
  every member of the broken group does the same, and a member that learns from its
  door that a peer already runs a newer generation moves there too, so the group is
  usable again within the op's deadline without waiting for a view change;
* before the first collective in a group, runs the state-sync exchange
  (:mod:`phalanx.membership.statesync`): members that hold another state than the
  majority receive it over the data plane, verified by hash, before contributing;
* reports data-plane :class:`PeerFailure` s to the coordinator (``report_failure``
  by member id, on a *reporter* thread so a slow coordinator never delays a retry);
* runs every collective through one method, :meth:`ElasticGroup.run` of an
  :class:`~phalanx.ops.OpSpec`, with one :class:`~phalanx.deadline.Deadline` for the
  whole call (waits, retries, the exchange and the op in the engine) and an opt-in
  ``retry=True``: on failure, wait for the next view or generation and run again
  (exact: the input was restored). The :class:`~phalanx.ops.OpResult` names the
  member ids that contributed;
* keeps the step, each group's phase and its presence in the tables of
  :mod:`phalanx.membership.lifecycle`: ``commit`` votes with the epoch of the step's
  first successful collective (a step whose collectives ran in two views is never
  committed); a collective that would run over other members than the step began
  with (a retry on a smaller view) raises ``StepAborted`` instead — nothing of it ran,
  and a vote on that step is False — unless ``begin_step(allow_partial=True)``; losing the
  client mid-step (a daemon's :meth:`client_lost`) leaves and rejoins; an evicted
  member rejoins by the one rejoin policy when ``auto_rejoin`` (a daemon's setting);
* when the group lost its training state (every member that held it is gone and a
  member waits for it), calls :attr:`ElasticGroup.recover_state` on each member that
  waits -- a daemon rebuilds the newest sealed snapshot generation there -- and runs
  the exchange once more, so the newest recovered state spreads by the usual sync (a
  hook that raises is logged and counts as nothing recovered, since the others wait
  for that member in the second exchange).

Errors: a collective aborted because the view changed raises ``ViewChanged`` (a
``PeerFailure`` whose ``epoch`` is the **new** epoch; ``old_epoch`` is the one it ran
in); other data-plane failures raise the engine's ``PeerFailure`` (its ``epoch`` the
view's); ``TimeoutError`` once the caller's deadline passed (or it was cancelled);
``Evicted`` once this incarnation was removed (:meth:`rejoin`, or wait for the rejoin
policy).

Threads: the agent's two, the door's, the installer (views, rebuilds and the rejoin
policy), the reporter and short-lived builders (one per group, each bounded by
``build_timeout``); :meth:`close` joins all. The caller's thread runs collectives and
the sync protocol; no lock of this class is held while a collective or an RPC runs.
Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from phalanx.comm import CommOptions, Group
from phalanx.comm.engine import Engine
from phalanx.comm.observer import CommObserver, OpSample
from phalanx.deadline import Deadline
from phalanx.errors import (
    CommError,
    CommitUnknown,
    ConfigError,
    Evicted,
    GroupClosed,
    HandshakeError,
    MembershipError,
    PeerFailure,
    StateSyncError,
    StepAborted,
    ViewChanged,
)
from phalanx.membership._door import Door, EpochListener
from phalanx.membership.agent import Agent
from phalanx.membership.config import MembershipConfig
from phalanx.membership.lifecycle import (
    MAX_GENERATION,
    SIDE_BIT,
    GroupEvent,
    GroupPhase,
    Heal,
    Lifecycle,
    Loss,
    Presence,
    StepPhase,
    after_break,
    data_epoch,
    group_transition,
    rebuild_delay,
    rejoin_delay,
    split_epoch,
)
from phalanx.membership.statesync import (
    PeerRecord,
    SyncAction,
    SyncOutcome,
    SyncReport,
    SyncState,
    gather_records,
    plan_sync,
    transfer,
)
from phalanx.membership.view import Member, View
from phalanx.ops import OpResult, OpSpec, StepInfo, layout_tag

__all__ = ["ElasticGroup", "ViewChanged"]

_LEFT_DURING_JOIN = "this member left the group during its join (rejoin() to come back)"

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.elastic")

_DEFAULT_TIMEOUT = 60.0
_WAIT_SLICE = 0.1
# The installer sleeps until something is due or notifies it (a break through the
# group's on_break); this look is only the fallback for a wake it could not be given
# (_wake_installer found the lock held). It was a 0.1 s poll: ~1.1 ms of CPU a second
# and 10 wake-ups in every idle daemon, and more under load.
_LOOK_S = 1.0
# how long an engine's on_break waits for the installer's lock (nobody holds it while
# waiting on an engine; the bound is a guard should that ever change): a wake given up
# after it is no later than the installer's own next look
_WAKE_TRY_S = _LOOK_S


class _Plane:
    """The data-plane group of one view and generation, and its phase."""

    __slots__ = ("broken", "error", "exchanged_sync", "generation", "group", "listener",
                 "phase", "rank", "view")  # fmt: skip

    def __init__(self, view: View, rank: int, generation: int) -> None:
        self.view = view
        self.rank = rank
        self.generation = generation
        self.phase = GroupPhase.BUILDING
        self.group: Group | None = None
        self.listener: EpochListener | None = None
        self.error: BaseException | None = None
        self.broken: PeerFailure | None = None
        self.exchanged_sync: SyncReport | None = None

    @property
    def epoch(self) -> int:
        """This group's id on the wire."""
        return data_epoch(self.view.epoch, self.generation)

    @property
    def key(self) -> tuple[int, int]:
        return (self.view.epoch, self.generation)

    @property
    def usable(self) -> bool:
        return self.phase in (GroupPhase.READY, GroupPhase.EXCHANGED)

    def move(self, event: GroupEvent) -> None:
        self.phase = group_transition(self.phase, event)


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
        build_timeout: longest a group build may take (a member that died during the
            build costs at most this; the next view or generation is then built).
        join_timeout: every join attempt (the first, and each rejoin).
        on_view: observer called (installer thread) with every new view, before the build.
        advertise: more addresses to advertise after the data-plane one (the daemon's
            shard server); the data plane only ever uses ``addresses[0]``.
        observer: the data plane's per-op, per-link observer, given to every group.
        on_engine: called with every group's engine once it is built (the monitor).
        auto_rejoin: after an eviction, join again by itself (a daemon exists to be in
            the group; its client sees ``Evicted`` until then).
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
        join_timeout: float = 30.0,
        tls_root_cert: bytes | None = None,
        on_view: Callable[[View], None] | None = None,
        advertise: tuple[str, ...] = (),
        observer: CommObserver | None = None,
        on_engine: Callable[[Engine], None] | None = None,
        auto_rejoin: bool = False,
    ) -> None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < 16:
            raise ConfigError("the cluster secret must be at least 16 bytes")
        if not build_timeout > 0 or not join_timeout > 0:
            raise ConfigError("build_timeout and join_timeout must be > 0")
        self._secret = raw
        base = options or CommOptions()
        self.options = replace(base, connect_timeout_s=min(base.connect_timeout_s, build_timeout))
        self.join_timeout = join_timeout
        self.state = state
        self._on_view_cb = on_view
        self._observer = observer
        self._on_engine = on_engine
        self._door = Door(
            listen,
            hold_s=max(build_timeout, self.options.handshake_timeout_s),
            on_ahead=self._on_ahead,
        )
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
        self._life = Lifecycle(auto_rejoin=auto_rejoin)
        self._pending: View | None = None  # a view the installer has not taken yet
        self._rebuild: tuple[View, int] | None = None  # (view, generation) to build
        self._rebuild_at = 0.0  # not before (monotonic): failed builds back off
        self._failed_builds = 0  # consecutive failed builds of the current view
        self._view: View | None = None  # the view the newest build is for
        self._generation = 0  # of that view
        self._exhausted = False  # its last generation broke: cycle (see _heal)
        self._hint_quiet_until = 0.0  # the door's "peer ahead" hints wait until then
        self._current: _Plane | None = None
        self._latest = 0  # newest view epoch announced
        self._attached = False  # a client attached its arrays (attach_state): see commit
        self._sync_failures = 0  # verifications of a received state failed in a row
        #: called (on the caller's thread, lock not held) when nobody in the view holds
        #: the state this member waits for: fill ``state`` from elsewhere (snapshots) and
        #: say what moved, or None. The daemon sets it.
        self.recover_state: Callable[[SyncState, Deadline], SyncReport | None] | None = None
        #: called (lock not held) after each state transfer this member sent or
        #: received, ok or not: the daemon's metrics (phalanx_state_sync_*)
        self.on_state_sync: Callable[[SyncOutcome], None] | None = None
        self._rejoin_lock = threading.Lock()
        self._stop = threading.Event()
        self._reports: queue.Queue[tuple[list[str], int, str] | None] = queue.Queue()
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
        return self._life.presence in (Presence.EVICTED, Presence.REJOINING, Presence.CYCLING)

    @property
    def presence(self) -> Presence:
        return self._life.presence

    def join(self, timeout: float | None = None) -> View:
        """Join the group; returns the first view (the data-plane group is built in the
        background; the first collective or :meth:`begin_step` waits for it).
        If the group removed this incarnation before this call could take its
        admission (while it waited for it, or in a stall right after it): ``Evicted``
        (:meth:`rejoin` brings it back) -- or, with ``auto_rejoin``, the view (whether
        or not the policy's rejoin has already replaced this join; possibly one without
        this member, or empty), while the rejoin policy brings the
        member back (it is not a member until then: collectives and
        :meth:`begin_step` raise ``Evicted`` meanwhile, as after any eviction; the
        torch manager retries them)."""
        inc = self.agent.member.incarnation
        try:
            view = self.agent.join(self.join_timeout if timeout is None else timeout)
        except Exception as exc:
            with self._cond:
                presence = self._life.presence
                if presence is Presence.LEFT:  # the agent's own error says less than this
                    raise GroupClosed(_LEFT_DURING_JOIN) from None
                # removed while this join waited for its admission: the agent raises
                # Evicted, or -- when the rejoin policy's new incarnation came first --
                # says this join was replaced (as below, right after the admission)
                policy = (
                    self._life.auto_rejoin
                    and presence is not Presence.CLOSED
                    and (isinstance(exc, Evicted) or self.agent.member.incarnation != inc)
                    and self._removed_while_joining(presence)
                )
            if not policy:
                raise
            log.info("event=join_left_to_rejoin_policy member=%s error=%r", self.member_id,
                     str(exc))  # fmt: skip
            return self.agent.view
        with self._cond:
            presence = self._life.presence
            if presence is Presence.CLOSED:
                raise GroupClosed("elastic group closed during its join")
            if presence is Presence.LEFT:  # (feeding it "joined" raised IllegalTransition)
                raise GroupClosed(_LEFT_DURING_JOIN)
            if self.agent.evicted or presence in (
                Presence.EVICTED,
                Presence.REJOINING,
                Presence.CYCLING,
            ):
                # removed between the agent's admission and here (as _rejoin checks):
                # taken as joined, the table raised IllegalTransition, or a rejoin in
                # flight was marked a member while still out
                if self._removed_while_joining(presence):
                    return view
                raise Evicted(
                    f"{self.member_id}: removed right after its admission", epoch=self._latest
                )
            self._joined()
            if presence is Presence.MEMBER:
                view = self.agent.view  # the rejoin policy brought it back meanwhile
        return view

    def _joined(self) -> None:
        """(Lock held.) This member is in the group (again): say so, and heal a group of
        its view that broke while it was joining or rejoining. The rule said then to
        wait for the join (``after_break``: nothing, or a rejoin), the group stayed
        marked broken, and nothing else would rebuild it: calls waited for the next
        view while the peers rebuilt and waited for us."""
        self._life.joined()
        self._notice_break()
        cur = self._current
        if (
            cur is not None
            and cur.phase in (GroupPhase.BROKEN, GroupPhase.FAILED)
            and self._rebuild is None
        ):
            self._heal(cur)
        self._cond.notify_all()

    def _removed_while_joining(self, presence: Presence) -> bool:
        """(under the lock) This join's incarnation was removed: mark it evicted if the
        agent's callback has not yet (``presence`` still JOINING), so that the rejoin
        policy's rejoin is due. True when that policy brings the member back
        (``auto_rejoin``, a daemon): its start must not fail on a removal the policy
        undoes."""
        if presence is Presence.JOINING:
            self._life.evicted(time.monotonic())
            self._cond.notify_all()
        return self._life.auto_rejoin

    def rejoin(self, timeout: float | None = None) -> View:
        """After eviction (or leave): join again with a higher incarnation (the state is
        re-synced at the next exchange)."""
        return self._rejoin(self.join_timeout if timeout is None else timeout)

    def _rejoin(self, timeout: float) -> View:
        with self._rejoin_lock:
            with self._cond:
                closed = self._life.presence is Presence.CLOSED
                if closed:  # like every other call (the table has no way back from closed)
                    raise GroupClosed("elastic group is closed")
                self._life.rejoin_started()
                self._cond.notify_all()
            self._retire_current()
            try:
                view = self.agent.rejoin(timeout)
            except BaseException:
                with self._cond:
                    if self._life.presence is Presence.CLOSED:
                        raise GroupClosed("elastic group closed during its rejoin") from None
                    self._life.rejoin_failed(time.monotonic())
                    self._cond.notify_all()
                raise
            with self._cond:
                closed = self._life.presence is Presence.CLOSED
            if closed:
                # close() ran meanwhile (it does not wait for a rejoin): the new
                # incarnation must not stay in the group with nobody behind it
                with contextlib.suppress(Exception):
                    self.agent.leave(1.0, "closed during its rejoin")
                raise GroupClosed("elastic group closed during its rejoin")
            with self._cond:
                if self.agent.evicted:
                    # the new incarnation was removed before its join came back (it was
                    # stopped meanwhile): still out, and the policy tries again. Taken as
                    # joined, it counted as a member and rebuilt groups nobody else had
                    # for 20 s instead of rejoining (30-minute soak, stop 22)
                    self._life.rejoin_failed(time.monotonic())
                    self._cond.notify_all()
                    raise Evicted(f"{self.member_id}: the new incarnation was removed "
                                  "before its join returned")  # fmt: skip
                self._joined()
            return view

    def leave(self, timeout: float | None = None, reason: str = "") -> None:
        """Leave on purpose: the others get a view without us at once; no automatic
        return (:meth:`rejoin` comes back)."""
        # after a rejoin under way (bounded by its timeout), never beside it: one that
        # ended after this leave brought the member back while this side said "left"
        with self._rejoin_lock:
            with self._cond:
                self._life.leave()
                self._cond.notify_all()
            self.agent.leave(timeout, reason)
        self._retire_current()

    def close(self) -> None:
        """Stop everything (no goodbye: :meth:`leave` first for that). Idempotent."""
        with self._cond:
            if self._life.presence is Presence.CLOSED:
                return
            self._life.close()
            self._cond.notify_all()
        self._stop.set()
        self.agent.close()
        self._reports.put(None)
        join_s = self.options.connect_timeout_s + self.options.handshake_timeout_s + 5.0
        for t in [*self._threads, *self._builders]:
            t.join(max(join_s, self.join_timeout + 5.0))
            if t.is_alive():
                log.error("event=thread_not_joined name=%s", t.name)
        self._retire_current()
        self._door.close()

    def __enter__(self) -> ElasticGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sync_failures_in_row(self) -> int:
        """Received states that failed verification in a row (0 after any exchange
        that went through)."""
        with self._cond:
            return self._sync_failures

    def _sync_done(self, role: str, ok: bool, nbytes: int, began: float) -> None:
        """Tell :attr:`on_state_sync` about a transfer this member sent or received
        (one that went through ends any run of failures)."""
        hook = self.on_state_sync
        if hook is None or not role:
            return
        with self._cond:
            in_row = 0 if ok else self._sync_failures
        try:
            hook(SyncOutcome(role, ok, nbytes, time.monotonic() - began, in_row))
        except Exception:  # a metrics bug must not fail the sync
            log.exception("event=state_sync_hook_error member=%s", self.member_id)

    # ------------------------------------------------------------------ agent and door callbacks
    def _on_view(self, view: View) -> None:
        with self._cond:
            if view.epoch <= self._latest:
                # a callback that lost a race with a newer view's (the agent installs
                # from several threads): taking it would build a view the agent left
                return
            self._pending = view
            self._latest = max(self._latest, view.epoch)
            cur = self._current
            self._cond.notify_all()
        if cur is not None and cur.group is not None and cur.view.epoch < view.epoch:
            _abort(cur.group, "view-change", "a new view was installed")

    def _on_evicted(self, epoch: int) -> None:
        with self._cond:
            self._life.evicted(time.monotonic())
            cur = self._current
            self._cond.notify_all()
        log.warning("event=elastic_evicted member=%s epoch=%d", self.member_id, epoch)
        if cur is not None and cur.group is not None:
            _abort(cur.group, "view-change", "this member was evicted")

    def _on_ahead(self, epoch: int) -> None:
        """The door holds a link for a group not built here. The door read that epoch
        from the link's first header, before any proof of the secret: anyone who reaches
        the port can name any epoch. So this is only a hint to look at our own group,
        and it never breaks a working group nor skips a generation:

        * the generation this member backs off to build: build it now (a peer is
          already waiting in it);
        * a newer generation: look at the engine now (a peer that rebuilt closed its
          links, so a group that broke heals into the next generation at once instead
          of at the installer's next look); and if this member is backing off after a
          failed build -- its group is already unusable by its own account -- go to
          the next generation at once. A peer is never more than one generation
          ahead for long (it follows these rules too), and the generation never goes
          past the last one a group id can hold.

        A group that works is left alone: if the peer really moved on, that group
        breaks by itself (its links close) and heals there."""
        view_epoch, generation, side = split_epoch(epoch)
        with self._cond:
            view = self._view
            if side or view is None or view.epoch != view_epoch or generation < self._generation:
                return
            now = time.monotonic()
            if now < self._hint_quiet_until:
                return  # one hint per backoff step: a stranger's stream of HELLOs must
                # not cancel every backoff nor march the generations to the last one
            if generation == self._generation:
                # scheduled here too but backing off after a failed build: a peer is
                # already building it and waits for us, so build it now
                if self._rebuild is not None and self._rebuild[1] == generation:
                    self._rebuild_at = 0.0
                    self._hint_quiet_until = now + rebuild_delay(max(self._failed_builds, 1))
                    self._cond.notify_all()
                return
            before = self._generation
            self._notice_break()  # a broken engine: its next generation is due now
            if self._generation != before:
                return
            scheduled = self._rebuild
            if scheduled is None or scheduled[0] is not view:
                return  # a group works here, or is being built: the hint changes nothing
            nxt = before + 1
            try:
                data_epoch(view_epoch, nxt)
            except ValueError:
                return  # no generation after the last (a view change resets them)
            self._generation = nxt
            self._rebuild = (view, nxt)
            self._rebuild_at = 0.0
            self._hint_quiet_until = now + rebuild_delay(max(self._failed_builds, 1))
            self._cond.notify_all()
        log.info(
            "event=peer_rebuilt member=%s epoch=%d generation=%d",
            self.member_id,
            view_epoch,
            nxt,
        )

    # ------------------------------------------------------------------ installer thread
    def _installer(self) -> None:
        """Takes new views and rebuilds, and carries out the rejoin policy."""
        while not self._stop.is_set():
            view: View | None = None
            rebuild: tuple[View, int] | None = None
            rejoin = exhausted = False
            with self._cond:
                while not self._stop.is_set():
                    if self._life.presence is Presence.CLOSED:
                        return
                    if self._exhausted:
                        self._exhausted, exhausted = False, True
                        break
                    if self._pending is not None:
                        view, self._pending = self._pending, None
                        break
                    now = time.monotonic()
                    if self._rebuild is not None and now >= self._rebuild_at:
                        rebuild, self._rebuild = self._rebuild, None
                        break
                    if self._life.rejoin_due(now):
                        rejoin = True
                        break
                    scheduled = self._rebuild
                    self._notice_break()
                    if self._rebuild is not scheduled:
                        continue  # a rebuild was just scheduled: take it (when due)
                    # asleep until something is due: a rebuild, a rejoin, or what
                    # notifies (a view, a break: on_break, a leave, close)
                    wait = _LOOK_S
                    if self._rebuild is not None:
                        wait = max(0.0, min(wait, self._rebuild_at - now))
                    rejoin_in = self._life.rejoin_wait(now)
                    if rejoin_in is not None:
                        wait = min(wait, rejoin_in)
                    self._cond.wait(wait)
                else:
                    return
            if exhausted:
                audit.warning("event=generations_exhausted member=%s", self.member_id)
                self._cycle("generations-exhausted")
            elif view is not None:
                self._install(view)
            elif rebuild is not None:
                self._start_build(*rebuild)
            elif rejoin:
                self._rejoin_by_policy()

    def _wake_installer(self) -> None:
        """A group's engine broke (its thread, no engine lock held): the installer
        notices it now (``_notice_break``), so the peers' rebuild does not wait for us.
        The lock is waited for ``_WAKE_TRY_S`` at most, in case a holder ever waits on
        this very engine: a wake given up then is no later than the installer's own
        next look (``_LOOK_S``)."""
        if not self._cond.acquire(timeout=_WAKE_TRY_S):
            return
        try:
            self._cond.notify_all()
        finally:
            self._cond.release()

    def _install(self, view: View) -> None:
        if self._on_view_cb is not None:
            try:
                self._on_view_cb(view)
            except Exception:
                log.exception("event=observer_error member=%s", self.member_id)
        with self._cond:
            if self._view is not None and view.epoch <= self._view.epoch:
                return  # an old view delivered late
            self._view = view
            self._generation = 0
            self._rebuild = None
            self._failed_builds = 0
        self._retire_current()
        self._start_build(view, 0)

    def _start_build(self, view: View, generation: int) -> None:
        with self._cond:
            if self._view is not view or generation != self._generation:
                return  # superseded before it started
        if generation:
            self._retire_current()
        # Each group is built on a thread of its own: a build of a group that is already
        # stale (waiting for a member that moved on) must not delay the newest one, or
        # the others give up on us (``build_timeout``) meanwhile.
        builder = threading.Thread(
            target=self._build, args=(view, generation), name="phalanx-elastic-build", daemon=True
        )
        self._builders = [b for b in self._builders if b.is_alive()]
        self._builders.append(builder)
        builder.start()

    def _build(self, view: View, generation: int) -> None:
        me = self.member_id
        if me not in view:
            return
        plane = _Plane(view, view.rank(me), generation)
        t0 = time.monotonic()
        listener = self._door.listener(plane.epoch)
        plane.listener = listener
        try:
            observer = self._observer
            if observer is not None and generation:
                observer = _ViewEpoch(observer, view.epoch)
            plane.group = Group(
                plane.rank,
                [m.addresses[0] for m in view.members],
                self._secret,
                listener=listener,
                epoch=plane.epoch,
                options=self.options,
                observer=observer,
                names=view.ids,
                on_break=self._wake_installer,
            )
        except Exception as exc:  # HandshakeError, OSError, ...: this group is unusable
            plane.error = exc
            plane.move(GroupEvent.BUILD_FAILED)
            listener.close()
            peer = exc.peer if isinstance(exc, HandshakeError) else None
            suspects = [view.members[peer].id] if peer is not None and peer < view.size else []
            log.warning(
                "event=group_build_failed member=%s epoch=%d generation=%d error=%r",
                me,
                view.epoch,
                generation,
                str(exc),
            )
            with self._cond:
                newer = self._latest > view.epoch
            if suspects and not newer:
                self._reports.put((suspects, view.epoch, "connect"))
        else:
            plane.move(GroupEvent.BUILT)
            with self._cond:
                if self._view is view:
                    self._failed_builds = 0
            if self._on_engine is not None:
                try:
                    self._on_engine(plane.group.engine)
                except Exception:
                    log.exception("event=on_engine_failed member=%s", me)
            log.info(
                "event=group_built member=%s epoch=%d generation=%d rank=%d world=%d build_s=%.4f",
                me,
                view.epoch,
                generation,
                plane.rank,
                view.size,
                time.monotonic() - t0,
            )
        stale = None
        with self._cond:
            closed = self._life.presence is Presence.CLOSED
            if closed or self._view is not view or generation != self._generation:
                stale = plane  # a newer view or generation came during the build
                plane.move(GroupEvent.RETIRE)
            else:
                self._current = plane
                if plane.phase is GroupPhase.FAILED:
                    self._heal(plane)
            self._cond.notify_all()
        if stale is not None:
            _retire(stale)

    def _notice_break(self) -> None:
        """(Lock held.) A group can break while this member runs nothing — a peer's
        ABORT or a lost link reach an idle engine — and the peers then rebuild and wait
        for us; notice it here instead of at the next collective."""
        cur = self._current
        if cur is None or not cur.usable or cur.group is None:
            return
        broken = cur.group.engine.broken
        if broken is None:
            return
        if cur.broken is None and isinstance(broken, PeerFailure):
            cur.broken = _in_view(broken, cur.view.epoch)
        cur.move(GroupEvent.OP_FAILED)
        self._heal(cur)

    def _heal(self, plane: _Plane) -> None:
        """After ``plane`` broke or failed to build (caller holds the lock): the rule of
        :func:`after_break`; a rebuild is the view's next generation, once."""
        heal = after_break(self._life.presence, newer_view=self._latest > plane.view.epoch)
        if heal is not Heal.REBUILD:
            return
        view = self._view
        if view is None or view.epoch != plane.view.epoch or plane.generation != self._generation:
            return  # already superseded (a newer view or generation is on its way)
        if plane.generation >= MAX_GENERATION:
            # no group id after the last generation (data_epoch would raise in the
            # builder): leave and come back, a new view starts again at generation 0
            self._exhausted = True
            self._cond.notify_all()
            return
        self._generation = plane.generation + 1
        self._rebuild = (view, self._generation)
        if plane.group is None:  # it failed to build: back off (lifecycle.rebuild_delay)
            self._failed_builds += 1
        else:
            self._failed_builds = 0
        self._rebuild_at = time.monotonic() + rebuild_delay(self._failed_builds)
        audit.info(
            "event=group_rebuild member=%s epoch=%d generation=%d cause=%r",
            self.member_id,
            view.epoch,
            self._generation,
            str(plane.broken or plane.error),
        )
        self._cond.notify_all()

    def _rejoin_by_policy(self) -> None:
        try:
            view = self._rejoin(self.join_timeout)
        except Exception as exc:  # coordinator away, refused: the policy retries later
            log.warning("event=rejoin_failed member=%s error=%r", self.member_id, str(exc))
            return
        audit.warning(
            "event=rejoined member=%s incarnation=%d epoch=%d members=%s",
            self.member_id,
            self.agent.member.incarnation,
            view.epoch,
            ",".join(view.ids),
        )

    def _retire_current(self) -> None:
        with self._cond:
            cur = self._current
            self._current = None
            if cur is not None:
                cur.move(GroupEvent.RETIRE)
        if cur is not None:
            _retire(cur)

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
    def _acquire(
        self, after: tuple[int, int], deadline: Deadline, *, across_rejoin: bool = False
    ) -> _Plane:
        """The usable group of the newest view (and generation) past ``after``.
        ``across_rejoin``: while the rejoin policy brings this member back, wait for
        it (a step boundary) instead of raising ``Evicted``."""
        with self._cond:
            while True:
                presence = self._life.presence
                if presence is Presence.CLOSED:
                    raise GroupClosed("elastic group is closed")
                if presence is Presence.LEFT:
                    raise GroupClosed("this member left the group (rejoin() to come back)")
                if presence in (Presence.EVICTED, Presence.REJOINING, Presence.CYCLING) and not (
                    across_rejoin and self._life.coming_back()
                ):
                    raise Evicted("this incarnation was removed from the group", epoch=self._latest)
                cur = self._current
                if (
                    cur is not None
                    and cur.key > after
                    and cur.view.epoch >= self._latest
                    and self._pending is None
                    and self._rebuild is None
                ):
                    if cur.usable:
                        return cur
                    after = max(after, cur.key)  # broken: wait for the next view or generation
                    continue
                if deadline.expired:
                    why = "cancelled" if deadline.cancelled else "no usable view"
                    raise TimeoutError(
                        f"{self.member_id}: {why} after epoch {after[0]}"
                        + (f" generation {after[1]}" if after[1] else "")
                    )
                self._cond.wait(deadline.slice(_WAIT_SLICE))

    def _exchange(self, plane: _Plane, deadline: Deadline, *, in_op: bool) -> SyncReport | None:
        """Run the state exchange (and the sync it calls for) once per group; the sync
        report if this call ran one that moved state."""
        report: SyncReport | None = None
        recovered = False  # the lost-state recovery runs at most once per call
        while plane.phase is GroupPhase.READY:
            group = plane.group
            assert group is not None
            st = self.state
            with self._cond:
                pos_step, done = self._life.step, self._life.done
            mine = PeerRecord(
                has_state=st is not None and st.valid,
                state_step=st.step if st is not None else -1,
                digest=st.digest() if st is not None else b"\0" * 32,
                pos_step=pos_step,
                done=done,
                in_op=in_op,
                wants_state=st is not None and not st.valid and self._attached,
            )
            plan = plan_sync(gather_records(group, mine, deadline))
            if plan.action is SyncAction.ABORT:
                if plane.rank in plan.aborted:
                    with self._cond:
                        self._life.abort_step()
                    raise StepAborted(
                        plane.view.epoch, pos_step, "members at a step boundary joined"
                    )
                if deadline.expired:
                    raise TimeoutError("members did not realign at a step boundary in time")
                continue  # the mid-step members exchange again on their next call
            if plan.recover and not recovered:
                # every member saw the same plan: all of them exchange once more
                recovered = True
                hook = self.recover_state
                if st is not None and not st.valid and hook is not None:
                    report = self._recover(hook, st, deadline)
                continue
            if st is not None and plan.receivers:
                role = (
                    "sent"
                    if plan.source == plane.rank
                    else "received"
                    if plane.rank in plan.receivers
                    else ""
                )
                began = time.monotonic()
                try:
                    report = transfer(
                        group,
                        plan,
                        st,
                        epoch=plane.view.epoch,
                        side=self._side_group(plane),
                        deadline=deadline,
                    )
                except StateSyncError as exc:
                    failure = PeerFailure(
                        op="state_sync",
                        seq=-1,
                        epoch=plane.view.epoch,
                        suspects=exc.bad_ranks,
                        reason="protocol",
                        detail=str(exc),
                    )
                    with self._cond:
                        plane.broken = failure
                        plane.move(GroupEvent.OP_FAILED)
                        if plane.rank in exc.bad_ranks:
                            self._sync_failures += 1
                    self._sync_done(role, False, 0, began)
                    if plane.rank in exc.bad_ranks:
                        # never contribute unverified state: step out, so that the
                        # others get a view without us. A daemon (auto_rejoin) exists
                        # to be in the group: it comes back by the rejoin policy, later
                        # after each failure in a row (the source hashes its arrays
                        # again after a failure, statesync.transfer, so one that changed
                        # them without update() fails one try, not every one);
                        # otherwise the caller may rejoin()
                        with self._cond:
                            member = self._life.presence is Presence.MEMBER
                        if self._life.auto_rejoin and member:
                            delay = rejoin_delay(self._sync_failures)
                            self._cycle("state-sync-failed", delay=delay)
                        else:
                            with self._cond:
                                self._life.leave()
                            self.agent.leave(reason="state-sync-failed")
                    raise
                except BaseException:  # a peer lost, the deadline: the transfer failed
                    self._sync_done(role, False, 0, began)
                    raise
                self._sync_done(role, True, report.nbytes, began)
            with self._cond:
                self._sync_failures = 0  # an exchange went through: the run is over
                if plane.phase is GroupPhase.READY:
                    plane.move(GroupEvent.EXCHANGED)
                    plane.exchanged_sync = report
            log.info(
                "event=view_ready member=%s epoch=%d generation=%d rank=%d members=%s "
                "source=%s receivers=%s",
                self.member_id,
                plane.view.epoch,
                plane.generation,
                plane.rank,
                ",".join(plane.view.ids),
                plan.source,
                list(plan.receivers),
            )
        return report

    def _recover(
        self,
        hook: Callable[[SyncState, Deadline], SyncReport | None],
        st: SyncState,
        deadline: Deadline,
    ) -> SyncReport | None:
        """Run the lost-state hook. The other members go on to exchange once more and
        wait there for this one: a hook that raises must not end this member's call
        (they would wait for it until their deadline), so its error counts as
        nothing recovered, said loudly. The state stays invalid unless the hook
        finished the job (an error after it did is still only logged). Only a call
        that is over anyway ends here: its deadline passed, or this member is no
        longer one (closed, left, evicted) -- whatever the hook raised then (a
        TimeoutError of the hook's own I/O, say, is the hook's failure)."""
        try:
            return hook(st, deadline)
        except Exception as exc:
            with self._cond:
                over = deadline.expired or self._life.presence is not Presence.MEMBER
            if over:
                raise
            log.exception(
                "event=recover_state_failed member=%s error=%r: carrying on without the state",
                self.member_id,
                str(exc),
            )
            return None

    def _side_group(self, plane: _Plane) -> Callable[[tuple[int, ...]], Group]:
        """Builds a group of some ranks of ``plane``'s view, for the state transfer,
        under its own id (the side bit set: never a view's) through the same door."""

        def build(ranks: tuple[int, ...]) -> Group:
            side_epoch = SIDE_BIT | plane.epoch
            listener = self._door.listener(side_epoch, advance=False)
            try:
                return Group(
                    ranks.index(plane.rank),
                    [plane.view.members[r].addresses[0] for r in ranks],
                    self._secret,
                    listener=listener,
                    epoch=side_epoch,
                    options=self.options,
                )
            except BaseException:
                listener.close()
                raise

        return build

    def _failed(self, plane: _Plane, exc: CommError, op: str, deadline: Deadline) -> Exception:
        """A collective (or the exchange) failed in ``plane``: record it, heal, report
        real peer failures; return what to raise."""
        seq = exc.seq if isinstance(exc, PeerFailure) else -1
        view = plane.view
        failure = (
            _in_view(exc, view.epoch)
            if isinstance(exc, PeerFailure)
            else PeerFailure(
                op=op, seq=seq, epoch=view.epoch, suspects=(), reason="closed", detail=str(exc)
            )
        )
        with self._cond:
            if plane.phase is not GroupPhase.RETIRED and plane.broken is None:
                plane.broken = failure
            plane.move(GroupEvent.OP_FAILED)
            self._heal(plane)
            latest = self._latest
            presence = self._life.presence
        if presence in (Presence.EVICTED, Presence.REJOINING, Presence.CYCLING):
            return Evicted("this incarnation was removed from the group", epoch=latest)
        if deadline.expired:
            why = "cancelled" if deadline.cancelled else "its deadline passed"
            return TimeoutError(f"{op} in epoch {view.epoch}: {why} ({failure.detail or failure})")
        if latest > view.epoch:
            return ViewChanged(
                op=op,
                seq=seq,
                old_epoch=view.epoch,
                epoch=latest,
                detail=f"view {latest} replaced view {view.epoch}: {exc}",
            )
        if failure.reason not in ("closed", "view-change", "aborted") and failure.suspects:
            ids = [view.members[r].id for r in sorted(failure.suspects) if r < view.size]
            self._reports.put((ids, view.epoch, failure.reason))
        return failure

    def run(
        self,
        spec: OpSpec,
        x: np.ndarray | None,
        *,
        retry: bool = False,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        into: np.ndarray | None = None,
    ) -> OpResult:
        """Run the collective ``spec`` on ``x`` (in place; ``None`` for a barrier) over
        the current view: the one method every collective goes through.

        ``into``: see :meth:`phalanx.comm.Group.run` (the daemon's twin regions).

        ``retry=True``: when the view changes under the op (or its group must be
        rebuilt), run it again in the next one (exact: the input was restored) instead
        of raising. ``deadline`` (or ``timeout`` seconds, default 60) bounds the whole
        call: waits, retries, the state exchange and the op in the data plane; after it
        ``TimeoutError`` is raised with the array holding its input.
        """
        dl = deadline if deadline is not None else Deadline.after(timeout or _DEFAULT_TIMEOUT)
        with self._cond:
            self._life.op_started()
        failed = 0
        after = (0, -1)
        while True:
            plane = self._acquire(after, dl)
            group = plane.group
            assert group is not None
            with self._cond:
                admitted = self._life.admits(plane.view.ids)
                step = self._life.step
                if not admitted:
                    self._life.abort_step()
            if not admitted:
                audit.warning(
                    "event=step_aborted member=%s step=%d epoch=%d members=%s why=%s",
                    self.member_id,
                    step,
                    plane.view.epoch,
                    ",".join(plane.view.ids),
                    "the view changed since begin_step",
                )
                raise StepAborted(
                    plane.view.epoch,
                    step,
                    "the view changed since begin_step: the step's collectives would mix "
                    "contributions computed for another member set; begin the step again "
                    "(or begin_step(allow_partial=True))",
                )
            try:
                if plane.phase is GroupPhase.READY:
                    self._exchange(plane, dl, in_op=True)
                res = group.run(spec, x, deadline=dl, into=into)
            except (PeerFailure, GroupClosed) as exc:
                err = self._failed(plane, exc, spec.kind, dl)
                failed += 1
                if not retry or not isinstance(err, PeerFailure):
                    raise err from exc
                after = plane.key
                log.info(
                    "event=op_retry member=%s op=%s epoch=%d generation=%d reason=%s",
                    self.member_id,
                    spec.kind,
                    plane.view.epoch,
                    plane.generation,
                    err.reason,
                )
                continue
            assert isinstance(res, OpResult)
            epoch = plane.view.epoch
            with self._cond:
                self._life.op_succeeded(epoch, res.contributors)
            if failed or res.epoch != epoch:
                res = replace(res, epoch=epoch, failed_attempts=failed)
            return res

    def all_reduce(
        self, x: np.ndarray, op: str = "sum", codec: str = "none", *, retry: bool = False,
        timeout: float | None = None,
    ) -> OpResult:  # fmt: skip
        """In-place all-reduce over the current view (:meth:`run`)."""
        return self.run(OpSpec("all_reduce", op, codec), x, retry=retry, timeout=timeout)

    def reduce_scatter(
        self, x: np.ndarray, op: str = "sum", codec: str = "none", *, retry: bool = False,
        timeout: float | None = None, layout_epoch: int | None = None,
    ) -> OpResult:  # fmt: skip
        """Reduce over the view; only this member's chunk of ``x`` is written.
        ``layout_epoch``: the layout tag (:attr:`phalanx.ops.OpSpec.layout`)."""
        spec = OpSpec("reduce_scatter", op, codec, layout=layout_tag(layout_epoch))
        return self.run(spec, x, retry=retry, timeout=timeout)

    def all_gather(
        self, x: np.ndarray, codec: str = "none", *, retry: bool = False,
        timeout: float | None = None, layout_epoch: int | None = None,
    ) -> OpResult:  # fmt: skip
        """Every member's chunk of ``x`` (:meth:`chunk_of`) ends up in every ``x``.
        ``layout_epoch``: the layout tag (:attr:`phalanx.ops.OpSpec.layout`)."""
        spec = OpSpec("all_gather", codec=codec, layout=layout_tag(layout_epoch))
        return self.run(spec, x, retry=retry, timeout=timeout)

    def broadcast(
        self, x: np.ndarray, root: int = 0, codec: str = "none", *, retry: bool = False,
        timeout: float | None = None,
    ) -> OpResult:  # fmt: skip
        """Copy the ``x`` of the member at rank ``root`` (in the view the op runs in)."""
        spec = OpSpec("broadcast", codec=codec, root=root)
        return self.run(spec, x, retry=retry, timeout=timeout)

    def barrier(self, *, retry: bool = False, timeout: float | None = None) -> OpResult:
        return self.run(OpSpec("barrier"), None, retry=retry, timeout=timeout)

    def chunk_of(self, size: int) -> tuple[int, int]:
        """(start, stop) of this member's chunk of a ``size``-element array in the
        current view (what reduce_scatter writes and all_gather contributes)."""
        from phalanx.comm.schedules import partition

        view = self.view
        if self.member_id not in view:
            return (0, 0)
        a, b = partition(size, view.size)[view.rank(self.member_id)]
        return (int(a), int(b))

    # ------------------------------------------------------------------ steps
    def begin_step(
        self,
        step: int | None = None,
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        allow_partial: bool = False,
    ) -> StepInfo:
        """Mark a training-step boundary: install a new view if one is pending and run
        the state exchange/sync there. ``step`` defaults to ``state.step`` -- read after
        the exchange, so the step of a state this call received (``StepInfo.step``).

        No silent wrong step: a collective of this step that would run over other
        members than ``StepInfo.members`` (the view changed: a retry on a smaller view,
        a member joined) raises ``StepAborted`` without running, and ``commit`` of this
        step is then False on every member. ``allow_partial=True`` lets such collectives
        run (the caller weighs contributions by ``OpResult.contributors``).
        ``StepInfo.synced`` says whether *this* call received the group's state.
        """
        dl = deadline if deadline is not None else Deadline.after(timeout or _DEFAULT_TIMEOUT)
        st = self.state
        implicit = step is None and st is not None  # the state names the step
        if step is None:
            step = st.step if st is not None else self._life.step + 1
        with self._cond:
            stale = self._life.begin(step, self.view.ids, allow_partial=allow_partial)
            # a group a peer ended while we were idle (it re-syncs after an unknown
            # commit, or heals): rebuild now and exchange there, not run this step in it
            self._notice_break()
        if stale and st is not None:
            st.update()  # changed in place without update_state: hash again
        after = (0, -1)
        received: SyncReport | None = None
        while True:
            plane = self._acquire(after, dl, across_rejoin=True)
            try:
                report = self._exchange(plane, dl, in_op=False)
            except (PeerFailure, GroupClosed) as exc:
                err = self._failed(plane, exc, "exchange", dl)
                if not isinstance(err, PeerFailure):
                    raise err from exc
                after = plane.key
                continue
            if report is not None and report.received:
                received = report
            st = self.state
            with self._cond:
                # the step of the state held now (a newcomer's was -1 before the
                # exchange): what a later exchange of this step and a forced-False
                # vote on it must name, as on the members it received the state from
                self._life.begin_members(
                    plane.view.ids,
                    plane.view.epoch,
                    step=st.step if implicit and st is not None else None,
                )
            return StepInfo(
                plane.view.epoch,
                plane.view.ids,
                st.step if st is not None else step,
                received is not None,
                received.nbytes if received is not None else 0,
                received.seconds if received is not None else 0.0,
            )

    def commit(self, step: int, ok: bool = True, *, timeout: float | None = None) -> bool:
        """The group's decision on ``step`` (the same on every member). The vote carries
        the epoch of the step's first successful collective; it is False for a step
        that was aborted (see :meth:`begin_step`)."""
        with self._cond:
            vote = self._life.vote(step, ok, self.agent.view.epoch)
        if vote.why:
            audit.warning(
                "event=vote_forced_false member=%s step=%d epoch=%d why=%r",
                self.member_id,
                step,
                vote.epoch,
                vote.why,
            )
        try:
            committed = self.agent.commit(step, vote.ok, epoch=vote.epoch, timeout=timeout)
        except CommitUnknown:
            self._resync_after_unknown(step, vote.epoch)
            raise
        behind = committed and not vote.ok
        with self._cond:
            # committed although we voted no: an earlier vote of this member (a client
            # that died after voting yes) decided the round. This client holds no good
            # update for it, so the group moved on without us: receive its state again
            self._life.decided(committed and not behind, state_attached=self._attached)
            if behind:
                self._invalidate_state()
        if behind:
            audit.warning(
                "event=commit_behind member=%s step=%d epoch=%d", self.member_id, step, vote.epoch
            )
            self._cycle("committed-without-our-vote")
        return committed and not behind

    def _resync_after_unknown(self, step: int, epoch: int) -> None:
        """``commit`` raised ``CommitUnknown`` while this member stays in its view (its
        deadline passed; a restarted coordinator forgot the round): the round may have
        committed True with our earlier yes, and the others then apply the step while
        we must not. Nothing would re-sync us -- the group is exchanged, no view change
        comes -- so we would train the next step on the old state beside them. End the
        group as a heal does: it breaks here, the peers learn it (ABORT, then the
        closed links; an idle one's installer at once, woken by its engine's
        ``on_break``; a busy one's op fails with ``view-change`` and ``retry=True``
        runs again) and every member rebuilds
        the next generation, whose state exchange hands the newest step, the one the
        group committed, to every member before its first collective. No wait here:
        the abort only wakes the engine. Left, evicted, closed, a newer view or a
        group not exchanged yet: that group's exchange does it already."""
        with self._cond:
            cur = self._current
            if (
                self._life.presence is not Presence.MEMBER
                or self.agent.evicted
                or cur is None
                or cur.phase is not GroupPhase.EXCHANGED
                or self._latest > cur.view.epoch
            ):
                return
            cur.broken = PeerFailure(
                op="commit",
                seq=-1,
                epoch=cur.view.epoch,
                suspects=(),
                reason="view-change",
                detail=f"{self.member_id} holds no decision on step {step}: state exchange",
            )
            cur.move(GroupEvent.OP_FAILED)
            self._heal(cur)
            group = cur.group
        audit.warning(
            "event=commit_unknown_resync member=%s step=%d epoch=%d generation=%d",
            self.member_id,
            step,
            epoch,
            cur.generation,
        )
        if group is not None:
            _abort(group, "view-change", f"{self.member_id} re-syncs after an unknown commit")

    # ------------------------------------------------------------------ state and the client
    def attach_state(self, arrays: Mapping[str, np.ndarray], step: int | None) -> tuple[int, str]:
        """Make ``arrays`` the state (a daemon's client attaching its arrays). ``step``:
        the step they hold; ``None``: if this member still holds a valid state of the
        same layout (the client restarted) it is copied into them, else the group's
        state is received at the next exchange. Returns (step, source): ``given``,
        ``kept`` or ``to-receive``."""
        old = self.state
        with self._cond:
            # committed but never updated: the old arrays may be half-changed (the
            # client applying them died), so they are not handed back
            half = step is None and self._life.step_phase is StepPhase.APPLYING
            if half:
                self._life.void()
        if step is not None:
            new, how = SyncState(arrays, step), "given"
        elif not half and old is not None and old.valid and _same_layout(old.arrays, arrays):
            for name, a in arrays.items():
                np.copyto(a, old.arrays[name])  # kept here: hand it back
            new, how = SyncState(arrays, old.step), "kept"
        else:
            new, how = SyncState(arrays, -1, valid=False), "to-receive"
        with self._cond:
            self.state = new
            self._attached = True
        if half:
            self._cycle("attached-mid-update")  # the exchange of the view we come back to
        return new.step, how

    def update_state(self, step: int, changed: list[str] | None = None) -> None:
        """The state's arrays (all, or those named) now hold ``step``'s values."""
        st = self.state
        if st is None:
            raise ConfigError("no state attached")
        st.update(step, changed)
        st.valid = True
        with self._cond:
            self._life.updated()

    def client_lost(self) -> Loss:
        """The client's connection closed without a goodbye (a daemon's call). Mid-step
        nobody can finish the step: leave (the others' collectives and votes fail over
        to a view without us) and rejoin by the rejoin policy; with the state half
        changed, it is received again at the next exchange."""
        with self._cond:
            loss = self._life.client_lost()
            if loss is Loss.NOTHING:
                return loss
            if loss is Loss.CYCLE_AND_RESYNC:
                self._invalidate_state()
        audit.warning("event=client_lost_mid_step member=%s loss=%s", self.member_id, loss.value)
        self._cycle("client-lost-mid-step")
        return loss

    def client_closed(self) -> None:
        """The client said goodbye: the next one starts outside steps (a state left
        committed but not updated is received again, in the view we cycle to)."""
        with self._cond:
            half = self._life.client_closed()
            if half:
                self._invalidate_state()
        if half:
            self._cycle("client-closed-mid-update")

    def _invalidate_state(self) -> None:
        """(under the lock) The state's arrays no longer hold a step of the group."""
        if self.state is not None:
            self.state.valid = False

    def _cycle(self, reason: str, *, delay: float = 0.0) -> None:
        """Leave and come back by the rejoin policy (not under the lock), ``delay``
        seconds after the leave: the others' open ops and votes fail over to a view
        without us, and the view we return to runs a state exchange -- the only place
        an invalid state is received again (the current view's exchange has run)."""
        with self._cond:
            if self._life.presence is not Presence.MEMBER:
                return  # already on the way out (or back): that view change does it
            self._life.cycle()
            self._cond.notify_all()
        self.agent.leave(reason=reason)
        # the old group goes first: a rejoin due at once could otherwise install the
        # new incarnation's group before this retires "the current" one -- that one
        self._retire_current()
        with self._cond:
            self._life.cycle_left(time.monotonic() + delay)  # the rejoin is due then
            self._cond.notify_all()


class _ViewEpoch:
    """A rebuilt group's observer: its samples carry the view's epoch, not the wire
    epoch (which has the generation in its high bits)."""

    def __init__(self, inner: CommObserver, epoch: int) -> None:
        self._inner = inner
        self._epoch = epoch

    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        self._inner.op_started(op, seq, self._epoch, nbytes)

    def op_finished(self, sample: OpSample) -> None:
        self._inner.op_finished(replace(sample, epoch=self._epoch))


def _in_view(exc: PeerFailure, view_epoch: int) -> PeerFailure:
    """The engine's failure, named by the view's epoch (a rebuilt group's wire epoch
    carries its generation too)."""
    if exc.epoch == view_epoch:
        return exc
    return PeerFailure(
        op=exc.op,
        seq=exc.seq,
        epoch=view_epoch,
        suspects=exc.suspects,
        reason=exc.reason,
        detected_by=exc.detected_by,
        detail=exc.detail,
    )


def _same_layout(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape for n in a
    )


def _abort(group: Group, reason: str, detail: str) -> None:
    """Make the engine fail whatever it runs, at once (buffers restored, peers told)."""
    with contextlib.suppress(ConfigError):
        group.abort(reason, detail)


def _retire(plane: _Plane) -> None:
    """Close a retired group (its phase already moved, under the lock)."""
    if plane.listener is not None:
        plane.listener.close()  # ends the group's accept loop now instead of its next poll
    if plane.group is not None:
        _abort(plane.group, "view-change", "the group was replaced")
        plane.group.close()

"""The peer-side membership agent: join, heartbeat, watch, report, vote, leave.

One :class:`Agent` per peer process. It joins the group (id, data-plane addresses,
incarnation), sends a heartbeat every ``heartbeat_interval`` from one thread, follows
the view through the coordinator's Watch stream from another, and calls
``on_view(view)`` for every new view that contains this peer (in epoch order, from
the watch thread) and ``on_evicted(epoch)`` once if the group removed it. When the
coordinator goes away it keeps the current view (the data plane does not need the
coordinator in the steady state), retries, and re-registers with the view it holds
once a coordinator answers again.

It knows nothing about the data plane: the daemon connects ``on_view`` to rebuilding
its group and calls :meth:`Agent.report_failure` when a collective fails. It must
never block without a deadline, call a user callback while holding its lock, or
leave a thread running after :meth:`Agent.close`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, TypeVar, cast

import grpc

from phalanx.comm.reduce import bfloat16
from phalanx.errors import ConfigError
from phalanx.membership import _rpc
from phalanx.membership._group import Decision, Outcome
from phalanx.membership._proto import membership_pb2 as pb
from phalanx.membership._proto import membership_pb2_grpc as pb_grpc
from phalanx.membership.config import MembershipConfig
from phalanx.membership.errors import (
    CommitUnknown,
    CoordinatorUnavailable,
    Evicted,
    MembershipError,
    Rejected,
    RejectReason,
)
from phalanx.membership.view import Member, View

__all__ = ["Agent"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_WATCH_DEADLINE = 300.0  # a Watch stream is reopened at least this often
_RETRY_MIN, _RETRY_MAX = 0.05, 0.25  # backoff while the coordinator is unreachable
_VOTE_ATTEMPT = 5.0  # longest single Commit call; the vote is repeated after it
_SILENT_MIN = 2.5  # the least silence of the coordinator after which the channel is new


class Agent:
    """Membership client of one peer. See the module docstring.

    Args:
        coordinator: ``host:port`` of the coordinator.
        member: this peer (id, data-plane addresses, incarnation, zone).
        secret: the cluster secret; required unless ``insecure``.
        on_view: called with every new view that contains this peer.
        on_evicted: called once with the current epoch when this incarnation is
            removed (it can then :meth:`rejoin`).
        on_heartbeat: called after every heartbeat with whether the coordinator
            acknowledged it (the daemon points it at the monitor's
            ``phalanx_heartbeat_last_*`` gauges); also settable as an attribute after
            construction. It runs on the heartbeat thread and must not block.
        tls_root_cert: PEM root certificate(s): use TLS to reach the coordinator.
    """

    def __init__(
        self,
        coordinator: str,
        member: Member,
        *,
        secret: bytes | None = None,
        insecure: bool = False,
        config: MembershipConfig | None = None,
        on_view: Callable[[View], None] | None = None,
        on_evicted: Callable[[int], None] | None = None,
        on_heartbeat: Callable[[bool], None] | None = None,
        tls_root_cert: bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        if secret is None and not insecure:
            raise ConfigError("the agent needs the cluster secret (or insecure=True)")
        self.config = config or MembershipConfig()
        self._target = coordinator
        self._signer = _rpc.Signer(secret, max_skew=self.config.max_skew)
        self._on_view = on_view
        self._on_evicted = on_evicted
        self.on_heartbeat = on_heartbeat
        options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            # gRPC core takes this as the *connect timeout* (MIN_CONNECT_TIMEOUT of
            # doc/connection-backoff.md), not a backoff: at 100 ms every attempt was
            # abandoned before a lost SYN's first retransmission (1 s) could land, and
            # after a coordinator restart in the soak (seed 1205) old members failed
            # every attempt with "connect() timed out" for 20 s while fresh processes
            # connected. 2 s covers one retransmission; a refused connect still fails
            # at once, and attempts still start every 0.1-0.5 s. (Those SYNs were lost
            # by the harness's bridge changing its MAC address, fixed in
            # phalanx/testing/netns.py; a lost SYN is ordinary on real networks too.)
            ("grpc.min_reconnect_backoff_ms", 2000),
            ("grpc.max_reconnect_backoff_ms", 500),
            ("grpc.enable_retries", 0),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._options = options
        self._creds = (
            grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            if tls_root_cert is not None
            else None
        )
        self._channel, self._stub = self._new_channel()
        # the coordinator's last answer (any call or stream); silent for longer than
        # this, the channel is replaced (see _reset_channel_if_silent)
        self._last_answer = time.monotonic()
        self._silent_after = max(_SILENT_MIN, 4 * self.config.heartbeat_timeout)
        self._channel_resets = 0
        self._lock = threading.Condition()
        self._view_callbacks = threading.Lock()  # on_view calls, one at a time (_install)
        self._register_lock = threading.Lock()
        # leave() and rejoin()'s change of incarnation run one at a time: a rejoin that
        # slipped in while a leave was in flight had its fresh heartbeat and watch
        # threads stopped by that leave's clean-up, so the coordinator failed the new
        # incarnation 0.6 s after admitting it and nothing told this agent (a 30 s
        # begin_step hang in the 30-minute soak of seed 20261205)
        self._life_lock = threading.Lock()
        self._member = member
        self._view = View(0)
        self._run = ""
        self._interval = self.config.heartbeat_interval
        self._last_decision: Decision | None = None
        self._evicted = False
        self._left = False
        self._closed = False
        self._closing = threading.Event()  # set by close() alone (waits that end there)
        self._stop = threading.Event()
        self._watching = threading.Event()  # set by the first event of a Watch stream
        self._threads: list[threading.Thread] = []
        self._watch_call: Any = None
        self._beats_call: Any = None
        self._unary_beats = False  # the coordinator has no Beats stream: unary beats

    # -- read side -------------------------------------------------------------------

    @property
    def member(self) -> Member:
        return self._member

    @property
    def view(self) -> View:
        """The last installed view that contains this peer (epoch 0 before admission)."""
        with self._lock:
            return self._view

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between this agent's heartbeats: the pace the coordinator asked for."""
        return self._interval

    @property
    def evicted(self) -> bool:
        return self._evicted

    @property
    def coordinator_run(self) -> str:
        return self._run

    def wait_for_view(self, predicate: Callable[[View], bool], timeout: float) -> View:
        """Block until ``predicate(view)``; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self._view):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise TimeoutError(f"{self._member.id}: view condition not met ({self._view})")
                self._lock.wait(min(remaining, 0.5))
            return self._view

    # -- lifecycle ---------------------------------------------------------------------

    def join(self, timeout: float = 15.0) -> View:
        """Join (retrying while the coordinator is unreachable or the id is still held
        by a dying incarnation) and wait until admitted; returns the first view."""
        if self._closed:
            raise MembershipError("agent is closed")
        # A member must not import ml_dtypes later, mid-run: that import holds the GIL
        # for ~1 s (0.7.0), longer than heartbeat_timeout (0.6 s), and the heartbeat
        # thread would miss its beats and the member be evicted at its first bfloat16
        # array. Pay it once here, before the first beat.
        bfloat16()
        deadline = time.monotonic() + timeout
        delay = _RETRY_MIN
        with self._lock:
            inc = self._member.incarnation  # this join's (a rejoin meanwhile replaces it)
        while True:
            try:
                self._register()
                break
            except Rejected as err:
                if err.reason is not RejectReason.DUPLICATE_ID:
                    raise
                why: Exception = err
            except CoordinatorUnavailable as err:
                why = err
            self._left_while_joining(inc)  # and a leave() ends them (no more retries)
            if time.monotonic() + delay >= deadline:
                raise why
            if self._closing.wait(delay):  # close() ends the retries too
                raise MembershipError(f"agent closed while joining ({why})")
            delay = min(delay * 2, _RETRY_MAX)
        self._left_while_joining(inc)
        self._start_threads()
        remaining = max(0.0, deadline - time.monotonic())
        try:
            # an eviction ends the wait at once (a join refused while it waited for
            # admission would otherwise hold the caller for the whole timeout), and so
            # does a leave()
            view = self.wait_for_view(
                lambda v: v.has(self._member) or self._evicted or self._left, remaining
            )
            self._left_while_joining(inc)
            if self._evicted and not view.has(self._member):
                raise Evicted("removed before admission")
            # Joined means wired: the Watch stream is open (its loss is a fast death
            # signal for the coordinator) before we return.
            self._watching.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if self._evicted:
                raise Evicted("removed before admission") from None
            raise
        log.info(
            "event=joined member=%s incarnation=%d epoch=%d rank=%d",
            self._member.id,
            self._member.incarnation,
            view.epoch,
            view.rank(self._member.id),
        )
        return view

    def _left_while_joining(self, inc: int) -> None:
        """Raise if leave() ran during the join of incarnation ``inc``. A Leave that
        reached the coordinator before the Join registered us was refused (NOT_MEMBER),
        and the member then stayed in the group until its missing heartbeats removed
        it: say it again. (leave() stopped the threads; any started since stand down on
        ``_left`` by themselves. Stopping them here could stop a rejoin's new ones.)"""
        with self._lock:
            left, current = self._left, self._member.incarnation
        if current != inc:  # leave() and a rejoin() ran meanwhile: the rejoin's now
            raise MembershipError(f"{self._member.id}: this join was replaced by a rejoin")
        if not left:
            return
        try:
            self._call("Leave", pb.LeaveRequest(reason="left while joining"),
                       self.config.rpc_timeout, incarnation=inc)  # fmt: skip
        except (Rejected, CoordinatorUnavailable) as err:  # NOT_MEMBER: it got through
            log.debug("event=leave_repeated member=%s error=%s", self._member.id, err)
        raise MembershipError(f"{self._member.id}: leave() was called during its join")

    def rejoin(self, timeout: float = 15.0, *, incarnation: int | None = None) -> View:
        """After eviction (or leave): join again with a higher incarnation."""
        with self._life_lock:
            self._stop_threads()
            with self._lock:
                new_inc = self._member.incarnation + 1 if incarnation is None else incarnation
                if new_inc <= self._member.incarnation:
                    raise ConfigError("rejoin needs a higher incarnation")
                self._member = replace(self._member, incarnation=new_inc)
                self._view = View(0)
                self._evicted = False
                self._left = False
                self._last_decision = None
        return self.join(timeout)

    def leave(self, timeout: float | None = None, reason: str = "") -> None:
        """Leave gracefully: the group gets a view without this peer at once."""
        with self._life_lock:
            with self._lock:
                if self._left or self._evicted:
                    return
                self._left = True  # threads stand down from here on
                inc = self._member.incarnation
                self._lock.notify_all()  # a join waiting for its admission ends
            req = pb.LeaveRequest(reason=reason)
            try:
                self._call("Leave", req, timeout or self.config.rpc_timeout, incarnation=inc)
                log.info("event=left member=%s reason=%s", self._member.id, reason or "-")
            except (Rejected, CoordinatorUnavailable) as err:
                log.warning("event=leave_failed member=%s error=%s", self._member.id, err)
            finally:
                self._stop_threads()

    def close(self) -> None:
        """Stop threads and the channel (no goodbye: call :meth:`leave` first for that)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            self._lock.notify_all()
        self._stop_threads()
        self._channel.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data-plane hooks -------------------------------------------------------------

    def report_failure(
        self, peer_ids: Iterable[str], epoch: int, reason: str = "", timeout: float | None = None
    ) -> list[str]:
        """Tell the coordinator these peers failed in ``epoch``; returns the ids it now
        suspects (empty if the view already moved on or it is unreachable)."""
        ids = [p for p in peer_ids if p != self._member.id]
        if not ids:
            return []
        req = pb.ReportFailureRequest(suspect_ids=ids, reason=reason)
        try:
            resp = cast(
                pb.ReportFailureResponse,
                self._call("ReportFailure", req, timeout or self.config.rpc_timeout, epoch=epoch),
            )
        except Rejected as err:
            if err.reason in (RejectReason.STALE_EPOCH, RejectReason.NOT_MEMBER):
                return []
            raise
        except CoordinatorUnavailable:
            log.warning("event=report_undelivered member=%s suspects=%s", self._member.id, ids)
            return []
        return list(resp.suspected_ids)

    def commit(
        self, step: int, ok: bool, *, epoch: int | None = None, timeout: float | None = None
    ) -> bool:
        """Vote on ``step``; the group's decision (the same on every member of the view).

        ``epoch`` is the epoch the step started in (default: the current view's); if the
        view changed since, the answer is False. Raises :class:`CommitUnknown` if no
        decision could be had before ``timeout`` (then do not apply the step).
        """
        if not 0 <= step < 2**63:
            raise ConfigError(
                f"commit(step={step}): steps are 0 .. 2**63-1"
                + (" (begin_step() returns -1 until a state is attached)" if step == -1 else "")
            )
        vote_epoch = self.view.epoch if epoch is None else epoch
        if vote_epoch == 0:
            raise MembershipError("not a member of any view yet")
        budget = timeout if timeout is not None else self.config.commit_timeout + 5.0
        deadline = time.monotonic() + budget
        delay = _RETRY_MIN
        incarnation = self._member.incarnation
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise CommitUnknown(step, vote_epoch, "deadline passed")
            with self._lock:
                gone = self._evicted or self._member.incarnation != incarnation
                left = self._left
            if left:
                # it left the group: every vote is refused now, and leave() set _stop,
                # so the wait below would not pause between them (a busy loop of
                # refused Commit and Join calls until the deadline)
                raise CommitUnknown(step, vote_epoch, "this member left the group")
            if gone:
                # Evicted while voting (a re-registration refused): a vote from here on
                # would come from a later incarnation that never ran the step, and a
                # coordinator would count it as a fresh, late vote ("no") -- found by
                # the churn soak, seed 20261122.
                raise CommitUnknown(
                    step, vote_epoch, "this member was evicted while voting; decision unknown"
                )
            req = pb.CommitRequest(
                step=step, ok=ok, last_decision=_rpc.decision_to_pb(self._last_decision)
            )
            decision: Decision | None = None
            try:
                resp = cast(
                    pb.CommitResponse,
                    self._call(
                        "Commit",
                        req,
                        min(remaining, _VOTE_ATTEMPT),
                        epoch=vote_epoch,
                        incarnation=incarnation,
                    ),
                )
            except Evicted:
                # The group may have decided -- even True, with this member's vote -- before
                # the eviction (an answer lost in a partition, a restarted coordinator that
                # forgot the decision): "False" would be another answer than the group's.
                # Not knowing is the honest answer: do not apply, re-sync after rejoining.
                self._handle_evicted(incarnation)
                raise CommitUnknown(
                    step,
                    vote_epoch,
                    "this member was evicted; the group's decision is unknown here",
                ) from None
            except Rejected as err:
                if err.reason is not RejectReason.NOT_MEMBER:
                    raise
                self._reregister(incarnation)  # a restarted coordinator: register, vote again
            except CoordinatorUnavailable:
                pass
            else:
                decision = self._answer_to(resp, step, vote_epoch)
            if decision is not None:
                if decision.outcome is Outcome.UNKNOWN:
                    # A restarted coordinator that cannot know the round's decision.
                    raise CommitUnknown(
                        step,
                        vote_epoch,
                        "the coordinator does not know this round's decision (it restarted "
                        "or forgot it, and the view moved on); do not apply the step",
                    )
                with self._lock:
                    if self._last_decision is None or (decision.epoch, decision.step) >= (
                        self._last_decision.epoch,
                        self._last_decision.step,
                    ):
                        self._last_decision = decision
                log.info(
                    "event=commit member=%s epoch=%d step=%d ok=%s committed=%s outcome=%s",
                    self._member.id,
                    decision.epoch,
                    step,
                    ok,
                    decision.committed,
                    decision.outcome.name,
                )
                return decision.committed
            # not self._stop: set by leave() and eviction too, it would not wait at all
            if self._closing.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                raise CommitUnknown(step, vote_epoch, "agent closed")
            delay = min(delay * 2, _RETRY_MAX)

    def _answer_to(self, resp: pb.CommitResponse, step: int, epoch: int) -> Decision | None:
        """The decision a Commit response carries, or None (no answer) when it decides
        another round than the vote's: a signed answer to another vote (recorded and
        replayed on the path, where no TLS protects the channel) must not decide ours."""
        try:
            outcome = Outcome(resp.outcome)
        except ValueError:
            outcome = None
        if outcome is None or (int(resp.epoch), int(resp.step)) != (epoch, step):
            log.warning(
                "event=bad_response method=Commit member=%s voted=%d/%d answer=%d/%d",
                self._member.id,
                epoch,
                step,
                resp.epoch,
                resp.step,
            )
            return None
        return Decision(int(resp.epoch), int(resp.step), bool(resp.committed), outcome)

    # -- internals -------------------------------------------------------------------

    def _call(
        self,
        name: str,
        req: Any,
        timeout: float,
        *,
        epoch: int | None = None,
        incarnation: int | None = None,
    ) -> Any:
        """One signed unary call; raises Rejected/Evicted or CoordinatorUnavailable.

        ``incarnation``: send only as that incarnation (else :class:`Evicted`).
        """
        method = _rpc.SERVICE + name
        with self._lock:
            member = self._member
            held = self._view.epoch
        if incarnation is not None and member.incarnation != incarnation:
            raise Evicted(f"{member.id}#{incarnation} was replaced by #{member.incarnation}")
        self._signer.sign(
            req,
            method,
            "request",
            sender_id=member.id,
            incarnation=member.incarnation,
            epoch=held if epoch is None else epoch,
        )
        try:
            resp = self._start(name, req, timeout=timeout)
        except grpc.RpcError as err:
            refusal = _rpc.error_from_rpc(err, method)
            if refusal is not None:
                self._answered()
                raise refusal from None
            code = err.code() if callable(getattr(err, "code", None)) else None
            raise CoordinatorUnavailable(f"{name}: {code}: {err.details()}") from None
        self._answered()
        try:
            self._signer.verify(resp, method, "response")
        except Rejected as err:
            log.warning("event=bad_response method=%s error=%s", name, err)
            raise CoordinatorUnavailable(f"{name}: response failed verification") from None
        if not _rpc.addressed_to(resp, member.id, member.incarnation):
            log.warning("event=bad_response method=%s error='answers %s#%d'", name,
                        resp.header.sender_id, resp.header.incarnation)  # fmt: skip
            raise CoordinatorUnavailable(f"{name}: response addressed to another member")
        return resp

    def _start(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Start call ``name`` on the current channel. A channel replaced and closed by
        :meth:`_reset_channel_if_silent` between reading the stub and calling it makes
        gRPC raise ``ValueError`` ("Channel closed!"): that is CoordinatorUnavailable
        (try again, on the new channel), not a crash -- in a 30-minute soak (stop 22)
        it killed an agent's watch thread; the member kept beating, deaf to every new
        view, and the group could not form around it for 20 s."""
        with self._lock:
            stub = self._stub
        try:
            return getattr(stub, name)(*args, **kwargs)
        except ValueError as exc:
            raise CoordinatorUnavailable(f"{name}: {exc}") from None

    def _new_channel(self) -> tuple[grpc.Channel, Any]:
        if self._creds is not None:
            channel = grpc.secure_channel(self._target, self._creds, options=self._options)
        else:
            channel = grpc.insecure_channel(self._target, options=self._options)
        return channel, pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]

    def _answered(self) -> None:
        """The coordinator answered (a reply, a refusal, a stream message)."""
        self._last_answer = time.monotonic()

    def _silent(self) -> bool:
        return time.monotonic() - self._last_answer >= self._silent_after

    def _reset_channel_if_silent(self) -> None:
        """Replace the gRPC channel after the coordinator has been silent for
        ``_silent_after`` (a fresh channel reconnects at once).

        Why: twice in the 30-minute soak of seed 20261205, after a coordinator restart,
        every old member's calls went unanswered for 5.6 s and 11.9 s while daemons
        started meanwhile (fresh channels) joined the new coordinator at once; the
        restarted coordinator ended its recovery with no member, a newcomer formed a
        view without the training state, and commits hung 20 s. The cause there was the
        harness's bridge (its MAC address moved when a peer's namespace went, and old
        namespaces sent into nothing until their ARP entry expired; fixed in
        phalanx/testing/netns.py), but a connection whose end never arrives happens on
        real networks too (a NAT or firewall forgetting it): this is the safety net.
        Closing the old channel cancels its calls: the watch stream and a vote in
        flight reopen on the new one."""
        now = time.monotonic()
        with self._lock:
            silent = now - self._last_answer
            if self._closed or silent < self._silent_after:
                return
            old = self._channel
            self._channel, self._stub = self._new_channel()
            self._last_answer = now  # the new channel gets a whole period
            self._channel_resets += 1
            resets = self._channel_resets
        log.warning(
            "event=channel_reset member=%s silent_s=%.1f resets=%d",
            self._member.id,
            silent,
            resets,
        )
        old.close()

    def _register(self) -> None:
        with self._register_lock:
            with self._lock:
                member = self._member
                # Re-registration carries the view we hold (restart recovery).
                known = self._view if self._view.has(member) else View(0)
                last = self._last_decision
            req = pb.JoinRequest(
                member=_rpc.member_to_pb(member),
                known_view=_rpc.view_to_pb(known),
                last_decision=_rpc.decision_to_pb(last),
            )
            resp = cast(pb.JoinResponse, self._call("Join", req, self.config.rpc_timeout))
            view = _rpc.view_from_pb(resp.view)
            with self._lock:
                if resp.coordinator_run != self._run:
                    if self._run:
                        log.info(
                            "event=reregistered member=%s coordinator_run=%s epoch=%d",
                            member.id,
                            resp.coordinator_run,
                            view.epoch,
                        )
                    self._run = resp.coordinator_run
                self._follow_pace(resp.timing)
            if resp.admitted:
                self._install(view)

    def _reregister(self, incarnation: int) -> None:
        """Register again as ``incarnation`` (a restarted coordinator forgot us); an
        incarnation replaced meanwhile has nothing left to register."""
        with self._lock:
            if self._member.incarnation != incarnation:
                return
        try:
            self._register()
        except Evicted:
            self._handle_evicted(incarnation)
        except (Rejected, CoordinatorUnavailable) as err:
            log.debug("event=reregister_failed member=%s error=%s", self._member.id, err)

    def _install(self, view: View) -> None:
        with self._lock:
            if not view.has(self._member) or view.epoch <= self._view.epoch or self._evicted:
                return
            self._view = view
            self._lock.notify_all()
        log.info(
            "event=view_installed member=%s epoch=%d rank=%d members=%s",
            self._member.id,
            view.epoch,
            view.rank(self._member.id),
            ",".join(view.ids),
        )
        # several threads install (watch, heartbeat, join, commit): one callback at a
        # time, and none for a view a newer one replaced meanwhile (its own call
        # delivers that one), so that on_view sees the epochs in order
        with self._view_callbacks:
            with self._lock:
                if self._view is not view:
                    return
            self._callback(self._on_view, view)

    def _handle_evicted(self, incarnation: int) -> None:
        """``incarnation`` was removed from the group. Only the current incarnation's
        removal counts: an answer to a call made as an earlier one (a vote still in
        flight when the daemon rejoined) says nothing about the current one. Applying
        it anyway stopped the new incarnation's heartbeats right after its rejoin, so
        the coordinator failed it 0.6 s later and it stayed out for its whole 15 s join
        timeout -- four members at once in the soak of seed 20261206, and the newcomers
        left in the view had no training state (the release soak's stall)."""
        with self._lock:
            if incarnation != self._member.incarnation:
                log.info(
                    "event=stale_eviction_ignored member=%s incarnation=%d current=%d",
                    self._member.id,
                    incarnation,
                    self._member.incarnation,
                )
                return
            if self._evicted or self._left:
                return
            self._evicted = True
            epoch = self._view.epoch
            self._stop.set()
            calls = (self._watch_call, self._beats_call)
            self._lock.notify_all()
        for call in calls:
            if call is not None:
                call.cancel()
        log.warning(
            "event=evicted member=%s incarnation=%d epoch=%d",
            self._member.id,
            self._member.incarnation,
            epoch,
        )
        self._callback(self._on_evicted, epoch)

    def _callback(self, fn: Callable[[_T], None] | None, arg: _T) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:
            log.exception("event=callback_error member=%s", self._member.id)

    def _start_threads(self) -> None:
        """The heartbeat and watch threads of the current incarnation (they speak only
        as that incarnation and stand down when it is replaced)."""
        self._stop_threads()
        self._stop = threading.Event()
        self._watching = threading.Event()
        stop = self._stop
        inc = self._member.incarnation
        self._threads = [
            threading.Thread(
                target=self._guarded, args=(self._heartbeat_loop, stop, inc),
                name="phalanx-agent-hb", daemon=True,
            ),
            threading.Thread(
                target=self._guarded, args=(self._watch_loop, stop, inc),
                name="phalanx-agent-watch", daemon=True,
            ),
        ]  # fmt: skip
        for t in self._threads:
            t.start()

    def _guarded(
        self, loop: Callable[[threading.Event, int], None], stop: threading.Event, inc: int
    ) -> None:
        """Run a heartbeat or watch loop; an exception it did not expect is logged and
        the loop starts over. A thread that died silently left a member that beat but
        never heard a view (or the reverse): the group waited on it."""
        while True:
            try:
                loop(stop, inc)
                return
            except Exception:
                log.exception("event=agent_thread_error member=%s loop=%s", self._member.id,
                              loop.__name__)  # fmt: skip
            if self._standing_down(stop) or stop.wait(_RETRY_MAX):
                return

    def _stop_threads(self) -> None:
        self._stop.set()
        for call in (self._watch_call, self._beats_call):
            if call is not None:
                call.cancel()
        current = threading.current_thread()
        for t in self._threads:
            if t is not current:
                t.join(timeout=5.0)
                if t.is_alive():
                    log.error("event=thread_not_joined name=%s", t.name)
        self._threads = []

    def _standing_down(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._left or self._evicted or self._closed

    def _heartbeat_loop(self, stop: threading.Event, inc: int) -> None:
        """Heartbeats of incarnation ``inc``: on one ``Beats`` stream (a unary call per
        beat cost the coordinator five times the CPU), or unary ``Heartbeat`` calls
        against a coordinator that does not have ``Beats``."""
        delay = _RETRY_MIN
        while not self._standing_down(stop):
            if self._unary_beats:
                self._unary_heartbeats(stop, inc)
                return
            try:
                if self._beat_stream(stop, inc):
                    delay = _RETRY_MIN  # it ran; reopen at once
            except Evicted:
                self._handle_evicted(inc)
                return
            except Rejected as err:
                if self._standing_down(stop):
                    return
                if err.reason is RejectReason.NOT_MEMBER:
                    self._reregister(inc)  # the coordinator restarted and forgot us
                else:
                    log.warning("event=heartbeat_refused member=%s error=%s", self._member.id, err)
            except CoordinatorUnavailable as err:
                log.debug("event=heartbeat_failed member=%s error=%s", self._member.id, err)
                self._callback(self.on_heartbeat, False)  # a beat due, not delivered
            self._reset_channel_if_silent()
            if stop.wait(delay):
                return
            delay = min(delay * 2, _RETRY_MAX)

    def _beat_stream(self, stop: threading.Event, inc: int) -> bool:
        """One ``Beats`` call: a signed request per interval until this incarnation
        stands down; responses (the first beat, ~1/s, epoch changes) are the acks.
        Returns True if the coordinator answered; raises the refusal that ended it."""
        method = _rpc.SERVICE + "Beats"
        answered = False

        def beats() -> Iterator[pb.HeartbeatRequest]:
            next_beat = time.monotonic()
            while not self._standing_down(stop):
                with self._lock:
                    member, epoch = self._member, self._view.epoch
                if member.incarnation != inc:
                    return
                req = pb.HeartbeatRequest()
                self._signer.sign(req, method, "request", sender_id=member.id,
                                  incarnation=inc, epoch=epoch)  # fmt: skip
                yield req
                self._callback(self.on_heartbeat, False)  # sent
                if self._silent():
                    # no answer for a while: end this stream, so the loop can check
                    # the channel (the response iterator would wait on it for good)
                    with self._lock:
                        own = self._beats_call
                    if own is not None:
                        own.cancel()
                    return
                next_beat += self._interval
                now = time.monotonic()
                if next_beat < now:  # fell behind (stopped, starved): beat now, re-anchor
                    next_beat = now
                if stop.wait(next_beat - now):
                    return

        call = self._start("Beats", beats(), timeout=_WATCH_DEADLINE)
        with self._lock:
            self._beats_call = call
        try:
            for resp in call:
                try:
                    self._signer.verify(resp, method, "response")
                except Rejected as err:
                    log.warning("event=bad_response method=Beats error=%s", err)
                    raise CoordinatorUnavailable("Beats: response failed verification") from None
                if not _rpc.addressed_to(resp, self._member.id, inc):
                    log.warning("event=bad_response method=Beats error='another member's'")
                    raise CoordinatorUnavailable("Beats: response addressed to another member")
                answered = True
                self._answered()
                self._follow_pace(resp.timing)
                self._callback(self.on_heartbeat, True)
                if resp.coordinator_run != self._run:
                    self._reregister(inc)
        except grpc.RpcError as err:
            if self._standing_down(stop):
                return answered
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:  # an older coordinator
                self._unary_beats = True
                return answered
            refusal = _rpc.error_from_rpc(err, method)
            if refusal is not None:
                raise refusal from None
            if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                return True  # the call's own deadline: reopen
            raise CoordinatorUnavailable(f"Beats: {err.code()}: {err.details()}") from None
        finally:
            with self._lock:
                self._beats_call = None
            call.cancel()
        return answered

    def _unary_heartbeats(self, stop: threading.Event, inc: int) -> None:
        next_beat = time.monotonic()
        while not self._standing_down(stop):
            acked = False
            try:
                resp = cast(
                    pb.HeartbeatResponse,
                    self._call("Heartbeat", pb.HeartbeatRequest(), max(0.05, 2 * self._interval),
                               incarnation=inc),
                )  # fmt: skip
                acked = True
                self._follow_pace(resp.timing)
                self._callback(self.on_heartbeat, True)
                if resp.coordinator_run != self._run:
                    self._reregister(inc)
            except Evicted:
                self._handle_evicted(inc)
                return
            except Rejected as err:
                if self._standing_down(stop):
                    return
                if err.reason is RejectReason.NOT_MEMBER:
                    self._reregister(inc)  # the coordinator restarted and forgot us
                else:
                    log.warning("event=heartbeat_refused member=%s error=%s", self._member.id, err)
            except CoordinatorUnavailable as err:
                log.debug("event=heartbeat_failed member=%s error=%s", self._member.id, err)
            if not acked:
                self._reset_channel_if_silent()
                self._callback(self.on_heartbeat, False)  # sent, not acknowledged
            next_beat += self._interval
            now = time.monotonic()
            if next_beat < now:  # we fell behind (stopped, starved): beat now, re-anchor
                next_beat = now
            stop.wait(next_beat - now)

    def _watch_loop(self, stop: threading.Event, inc: int) -> None:
        method = _rpc.SERVICE + "Watch"
        delay = _RETRY_MIN
        while not self._standing_down(stop):
            req = pb.WatchRequest()
            with self._lock:
                member = self._member
                epoch = self._view.epoch
            if member.incarnation != inc:
                return  # replaced: that incarnation's threads do not speak for it
            self._signer.sign(
                req,
                method,
                "request",
                sender_id=member.id,
                incarnation=member.incarnation,
                epoch=epoch,
            )
            try:
                call = self._start("Watch", req, timeout=_WATCH_DEADLINE)
                with self._lock:
                    self._watch_call = call
                if self._standing_down(stop):
                    call.cancel()
                    return
                for event in call:
                    delay = _RETRY_MIN
                    self._on_event(cast(pb.WatchEvent, event), method, inc)
                    if self._standing_down(stop):
                        return
            except grpc.RpcError as err:
                if self._standing_down(stop):
                    return
                refusal = _rpc.error_from_rpc(err, method)
                if isinstance(refusal, Evicted):
                    self._handle_evicted(inc)
                    return
                code = err.code() if callable(getattr(err, "code", None)) else None
                log.debug("event=watch_broken member=%s code=%s", member.id, code)
                if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    if stop.wait(delay):
                        return
                    delay = min(delay * 2, _RETRY_MAX)
                    self._reregister(inc)
            except CoordinatorUnavailable as err:  # the channel was replaced under us
                log.debug("event=watch_broken member=%s error=%s", member.id, err)
                if stop.wait(_RETRY_MIN):
                    return
            finally:
                with self._lock:
                    self._watch_call = None

    def _follow_pace(self, timing: pb.Timing) -> None:
        """Beat at the interval the coordinator asks for (it grows with the group,
        pacing.py), and give it as much longer before taking its silence for a lost
        connection. Unset fields (an older coordinator) change nothing."""
        if timing.heartbeat_interval_ms and timing.heartbeat_timeout_ms:
            interval = timing.heartbeat_interval_ms / 1000.0
            if interval != self._interval:
                log.info("event=heartbeat_pace member=%s interval_s=%.3f timeout_s=%.3f",
                         self._member.id, interval, timing.heartbeat_timeout_ms / 1000.0)  # fmt: skip
            self._interval = interval
            self._silent_after = max(_SILENT_MIN, 4 * timing.heartbeat_timeout_ms / 1000.0)

    def _on_event(self, event: pb.WatchEvent, method: str, inc: int) -> None:
        self._answered()
        try:
            self._signer.verify(event, method, "event")
            view = _rpc.view_from_pb(event.view)
        except Rejected as err:
            log.warning("event=bad_watch_event member=%s error=%s", self._member.id, err)
            return
        if not _rpc.addressed_to(event, self._member.id, inc):
            # e.g. another member's eviction notice, replayed into this stream
            log.warning("event=bad_watch_event member=%s error='addressed to %s#%d'",
                        self._member.id, event.header.sender_id, event.header.incarnation)  # fmt: skip
            return
        if event.evicted:
            self._handle_evicted(inc)
            return
        self._install(view)
        self._watching.set()

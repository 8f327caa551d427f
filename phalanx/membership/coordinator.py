"""The membership coordinator: a gRPC service around :class:`GroupState`.

:class:`Coordinator` runs standalone (``phalanx coordinator --listen HOST:PORT``) or
embedded in any process (``start()``/``stop(grace)``, port 0 supported). It checks
every request (protocol version, HMAC and replay window, well-formedness) before it
touches the group, converts protobuf to dataclasses at the door, and answers
refusals with a gRPC status plus the ``phalanx-reject-reason`` trailer. A detector
thread drives the clock of :class:`GroupState` (heartbeat timeouts, confirmation of
suspicions, admission, recovery). It keeps no state that peers cannot rebuild: a
restarted coordinator adopts the view the peers re-register with.

It must never block a gRPC thread without a deadline, let an exception escape a
handler as a crash, hold its lock while doing network I/O, or leave a thread running
after ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc

from phalanx.errors import ConfigError
from phalanx.membership import _rpc
from phalanx.membership._group import Decision, GroupState, Published
from phalanx.membership._proto import membership_pb2 as pb
from phalanx.membership._proto import membership_pb2_grpc as pb_grpc
from phalanx.membership.config import MembershipConfig
from phalanx.membership.errors import Rejected, RejectReason
from phalanx.membership.pacing import Pace
from phalanx.membership.view import IN_VIEW_STATES, MemberState, View, parse_address

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_WAIT_SLICE = 0.5  # longest single condition wait inside a handler
_WATCH_LOOK_S = 5.0  # how often every Watch stream is woken without a new view
_ANSWER_EVERY_S = 1.0  # a Beats call is answered at least this often (while beats come)
_WATCH_EXPIRY_SLACK_S = 0.25  # a Watch call ending this close to its deadline ran out of time
SERVICE_NAME = _rpc.SERVICE.strip("/")


class Coordinator:
    """The membership authority, embeddable in a process.

    Args:
        listen: ``host:port`` to bind (port 0 picks a free one; see :attr:`address`).
        secret: the cluster secret (>= 16 bytes). Required unless ``insecure``.
        insecure: allow running without a secret (tests of the wire, demos).
        config: timings and limits.
        tls_cert, tls_key: PEM server certificate chain and key; gRPC over TLS when set.
        recover: start in recovery mode (adopt the view peers re-register with). Turn
            off only for a group that is known to be new.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        secret: bytes | None = None,
        insecure: bool = False,
        config: MembershipConfig | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        recover: bool = True,
    ) -> None:
        if secret is None and not insecure:
            raise ConfigError("the coordinator needs a cluster secret (or insecure=True)")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        try:
            parse_address(listen) if not listen.endswith(":0") else parse_address(listen[:-1] + "1")
        except ValueError as exc:
            raise ConfigError(f"bad listen address {listen!r}: {exc}") from None
        self.config = config or MembershipConfig()
        self._listen = listen
        self._signer = _rpc.Signer(secret, max_skew=self.config.max_skew)
        self._tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self._recover = recover
        self.run_id = os.urandom(8).hex()
        self._cond = threading.Condition()
        self._state: GroupState | None = None
        self._stopping = False
        # unary calls being answered (under _cond): stop() lets them end before it
        # stops the server, so that a waiting vote hears SHUTTING_DOWN (see stop())
        self._busy = 0
        self._stop_event = threading.Event()
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's (see start())
        self._loop_thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        # set (and replaced) on the loop when a view is published: every Watch stream
        # waits on it (see _wake_watchers)
        self._watch_wake: asyncio.Event | None = None
        self._detector: threading.Thread | None = None
        self._address = ""
        # the newest view's Watch event, signed and serialized once for every watcher
        # (per watcher that was N serializations of an N-member view per view change)
        self._event: tuple[int, bytes] | None = None
        self._event_lock = threading.Lock()  # one watcher builds it, the others wait
        self._first: tuple[int, bytes, set[tuple[str, int]]] | None = None  # same, opening

    # -- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (valid after :meth:`start`)."""
        return self._address

    def start(self) -> str:
        """Start the server and the detector; returns :attr:`address`.

        The gRPC server is an asyncio one on a loop thread of its own: the Beats and
        Watch streams (two per member) are coroutines on that loop, so a view goes out
        to a thousand watchers from one thread in one pass. On the thread-per-stream
        server every watcher was a thread woken in turn, and a failure reached the
        last of 1,000 members 0.4 s after it reached the coordinator (bench
        coordinator). The unary calls (Join, Leave, Heartbeat, ReportFailure, Commit)
        are coroutines there too, whose work -- a vote waits for its decision -- runs
        on a thread pool that never touches grpc (``_Servicer._unary``)."""
        if self._server is not None:
            raise RuntimeError("coordinator already started")
        cfg = self.config
        # A recovering coordinator numbers its first view from the wall clock (in ms), so
        # that it never reuses an epoch of a predecessor it learnt nothing from. That
        # holds while the clock does not step back and no predecessor published more
        # than one view per millisecond of its life.
        floor = time.time_ns() // 1_000_000
        with self._cond:
            self._state = GroupState(
                cfg, time.monotonic(), recovering=self._recover, epoch_floor=floor
            )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="phalanx-coord-loop", daemon=True)
        thread.start()
        self._loop, self._loop_thread = loop, thread
        try:
            port = asyncio.run_coroutine_threadsafe(self._start_server(), loop).result(30.0)
        except BaseException:
            self._stop_loop()
            raise
        host = self._listen.rpartition(":")[0]
        self._address = f"{host}:{port}"
        self._detector = threading.Thread(
            target=self._detect, name="phalanx-coord-detector", daemon=True
        )
        self._detector.start()
        log.info(
            "event=coordinator_started address=%s run=%s secure=%s tls=%s "
            "heartbeat_interval_s=%.3f heartbeat_timeout_s=%.3f confirm_window_s=%.3f "
            "recovery_grace_s=%.3f",
            self._address,
            self.run_id,
            self._signer.secure,
            self._tls is not None,
            cfg.heartbeat_interval,
            cfg.heartbeat_timeout,
            cfg.confirm_window,
            cfg.recovery_grace if self._recover else 0.0,
        )
        return self._address

    async def _start_server(self) -> int:
        """On the loop: build, bind and start the server; returns the port."""
        cfg = self.config
        self._watch_wake = asyncio.Event()
        # unary calls only: a vote waits for its decision on a pool thread, one per member
        self._pool = ThreadPoolExecutor(
            max_workers=cfg.max_members + 16, thread_name_prefix="phalanx-coord"
        )
        server = grpc.aio.server(
            migration_thread_pool=self._pool,
            maximum_concurrent_rpcs=3 * cfg.max_members + 16,  # Watch, Beats, a vote each
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
                ("grpc.max_receive_message_length", 4 << 20),
            ],
        )
        server.add_generic_rpc_handlers((_handlers(_Servicer(self)),))
        if self._tls is not None:
            creds = grpc.ssl_server_credentials([(self._tls[1], self._tls[0])])
            port = server.add_secure_port(self._listen, creds)
        else:
            port = server.add_insecure_port(self._listen)
        if port == 0:
            raise ConfigError(f"cannot listen on {self._listen}")
        await server.start()
        self._server = server
        return port

    def _wake_watchers(self) -> None:
        """On the loop: wake every Watch stream waiting for a view."""
        wake = self._watch_wake
        self._watch_wake = asyncio.Event()
        if wake is not None:
            wake.set()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        if not thread.is_alive():
            loop.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new work, let the unary handlers answer, end streams, stop the server
        and join the detector.

        The votes waiting for a decision are woken here and refused with SHUTTING_DOWN;
        every unary call ends (see ``_Servicer._unary``) before the server stops,
        within ``grace`` plus the longest a handler blocks (a vote's wait slice, a
        join's address probe). Before, ``server.stop`` cancelled them: their callers
        heard CANCELLED, not why."""
        with self._cond:
            again, self._stopping = self._stopping, True
            self._cond.notify_all()
            if not again:  # (a call the stopped loop left suspended never ends)
                self._drain(grace + self.config.probe_timeout + 2 * _WAIT_SLICE)
        self._stop_event.set()
        loop, server = self._loop, self._server
        if server is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: stopped already
                loop.call_soon_threadsafe(self._wake_watchers)
                stopping = asyncio.run_coroutine_threadsafe(server.stop(grace), loop)
                with contextlib.suppress(Exception):
                    stopping.result(grace + 5.0)
        self._stop_loop()
        if self._detector is not None:
            self._detector.join(timeout=5.0)
        log.info("event=coordinator_stopped address=%s run=%s", self._address, self.run_id)

    def _drain(self, timeout: float) -> None:
        """Wait (holding _cond) until no unary handler runs, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self._busy > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("event=coordinator_stop_undrained handlers=%d", self._busy)
                return
            self._cond.wait(min(remaining, _WAIT_SLICE))

    def __enter__(self) -> Coordinator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- introspection (tests, status) ------------------------------------------------

    @property
    def view(self) -> View:
        with self._cond:
            return self._group().view

    def wait_for(self, predicate: Callable[[View], bool], timeout: float) -> View:
        """Block until ``predicate(view)`` holds; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._group().view):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"view predicate not met; view={self._group().view}")
                self._cond.wait(min(remaining, _WAIT_SLICE))
            return self._group().view

    # -- internals ---------------------------------------------------------------------

    def _group(self) -> GroupState:
        if self._state is None:
            raise RuntimeError("coordinator not started")
        return self._state

    def _detect(self) -> None:
        look = time.monotonic() + _WATCH_LOOK_S
        while not self._stop_event.wait(self.config.tick):
            with self._cond:
                group = self._group()
                before, seq = group.revision, group.published.seq
                try:
                    group.tick(time.monotonic())
                except Exception:
                    # a bug in one tick must not end failure detection for good (the
                    # thread died silently and no member was ever failed again)
                    log.exception("event=detector_error")
                finally:
                    self._notify(group, before, seq)
            if time.monotonic() >= look and self._loop is not None:
                # every Watch stream looks at its member's state now and then, view
                # or not (a safety net: state changes come with a view)
                look = time.monotonic() + _WATCH_LOOK_S
                with contextlib.suppress(RuntimeError):  # the loop closed: stopping
                    self._loop.call_soon_threadsafe(self._wake_watchers)

    def _notify(self, group: GroupState, revision: int, seq: int) -> None:
        """Wake waiters after a change (caller holds the lock): votes and tests on any
        revision, Watch streams only on a new published view."""
        if group.revision != revision:
            self._cond.notify_all()
        if group.published.seq != seq and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: stopping
                self._loop.call_soon_threadsafe(self._wake_watchers)

    def _locked(self, fn: Callable[[GroupState, float], _T]) -> _T:
        with self._cond:
            if self._stopping:
                raise Rejected(RejectReason.SHUTTING_DOWN, "coordinator is stopping")
            group = self._group()
            before, seq = group.revision, group.published.seq
            try:
                return fn(group, time.monotonic())
            finally:
                self._notify(group, before, seq)


def _beat(who: tuple[str, int], group: GroupState, now: float) -> tuple[int, Pace]:
    return group.heartbeat(who[0], who[1], now), group.pace


def _raw(data: bytes) -> bytes:
    return data


def _handlers(servicer: _Servicer) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The Coordinator service's handlers, as the generated code registers them, but
    Watch streams bytes: its events are serialized once per view, not per watcher."""
    rpcs: dict[str, tuple[Callable[..., Any], Any, Any]] = {
        "Join": (servicer.Join, pb.JoinRequest, pb.JoinResponse),
        "Leave": (servicer.Leave, pb.LeaveRequest, pb.LeaveResponse),
        "Heartbeat": (servicer.Heartbeat, pb.HeartbeatRequest, pb.HeartbeatResponse),
        "ReportFailure": (
            servicer.ReportFailure,
            pb.ReportFailureRequest,
            pb.ReportFailureResponse,
        ),
        "Commit": (servicer.Commit, pb.CommitRequest, pb.CommitResponse),
    }
    handlers: dict[str, Any] = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
        for name, (fn, req, resp) in rpcs.items()
    }
    handlers["Beats"] = grpc.stream_stream_rpc_method_handler(
        servicer.Beats,
        request_deserializer=pb.HeartbeatRequest.FromString,
        response_serializer=pb.HeartbeatResponse.SerializeToString,
    )
    handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
        servicer.Watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=_raw
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class _Ended(Exception):
    """A call that ends without an answer, normally (cancelled, deadline): aborted once,
    with this status, and not logged as a handler error."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _claimed(request: Any) -> str:
    """Who a request says it comes from, for the log: its header's sender id, verified
    or not. (Never ``context.peer()``: grpc 1.85's aio server segfaults reading the
    peer of a call that has ended -- cancelled, past its deadline, its connection
    gone -- and a handler cannot know that its call has not just ended.)"""
    header = getattr(request, "header", None)
    sender = header.sender_id[:64] if header is not None else ""
    return repr(sender) if sender else "-"


def _log_rejected(err: Rejected, method: str, sender: str) -> None:
    log.info(
        "event=rejected method=%s reason=%s sender=%s detail=%r",
        method.rpartition("/")[2],
        err.reason.name,
        sender,
        err.detail,
    )


async def _abort_async(context: Any, err: Rejected, method: str, sender: str) -> NoReturn:
    """Log a refusal and end the call with its status (on the server's loop)."""
    _log_rejected(err, method, sender)
    await context.abort(
        _rpc.status_for(err.reason),
        err.detail or err.reason.name,
        trailing_metadata=((_rpc.REJECT_TRAILER, err.reason.name),),
    )
    raise AssertionError("unreachable: abort raises")


class _Servicer(pb_grpc.CoordinatorServicer):
    """Protobuf in, dataclasses to GroupState, protobuf out. One method per RPC."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    def _sign(
        self,
        msg: _rpc._Signed,
        method: str,
        direction: str,
        epoch: int,
        to: tuple[str, int] | None = None,
    ) -> None:
        """Sign ``msg``; an answer to one member names it (``to``: id, incarnation) in
        its header, so that it cannot be passed off to another member or to another
        incarnation of the same one (docs/membership.md, "Wire protocol")."""
        member_id, incarnation = to if to is not None else ("", 0)
        self._c._signer.sign(
            msg, method, direction, sender_id=member_id, incarnation=incarnation, epoch=epoch
        )

    async def _unary(
        self,
        context: Any,
        request: Any,
        method: str,
        fn: Callable[[], _T],
        ended: threading.Event | None = None,
    ) -> _T:
        """Run a unary call: ``fn`` (verify, decide, sign; a vote waits for its
        decision) on the pool, everything that touches the call here on the loop.

        A pool thread never touches grpc. On the aio server a sync handler's context
        is a wrapper whose abort() goes through this loop (it blocked for good on a
        stopped one) and whose peer() read a call the caller or stop() had ended (a
        segfault, CI); its add_callback() is never called, so a vote never heard that
        its caller went away. Here the caller going away (a cancel, its deadline, its
        connection) cancels this coroutine, which tells ``fn`` through ``ended``. The
        call counts as running until this returns: stop() waits for it (a cancelled
        call's ``fn`` may outlive it by a moment, touching nothing of the call)."""
        c = self._c
        with c._cond:
            c._busy += 1
        try:
            if c._stopping:
                raise Rejected(RejectReason.SHUTTING_DOWN, "coordinator is stopping")
            return await asyncio.get_running_loop().run_in_executor(c._pool, fn)
        except asyncio.CancelledError:
            if ended is not None:  # the vote stops waiting now, not at its next slice
                with c._cond:
                    ended.set()
                    c._cond.notify_all()
            raise
        except Rejected as err:
            await _abort_async(context, err, method, _claimed(request))
        except _Ended as end:  # the caller went away or its deadline passed: not an error
            await context.abort(end.code, end.detail)
        except Exception:
            log.exception("event=handler_error method=%s sender=%s", method, _claimed(request))
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error (logged by the coordinator)"
            )
        finally:
            with c._cond:
                c._busy -= 1
                if c._busy == 0 and c._stopping:
                    c._cond.notify_all()
        raise AssertionError("unreachable: abort raises")

    # -- Join --------------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        method = _rpc.SERVICE + "Join"
        return await self._unary(context, request, method, lambda: self._join(request, method))

    def _join(self, request: pb.JoinRequest, method: str) -> pb.JoinResponse:
        c = self._c
        info = c._signer.verify(request, method, "request")
        if not request.HasField("member"):
            raise Rejected(RejectReason.MALFORMED, "join without member")
        member = _rpc.member_from_pb(request.member)
        if member.id != info.sender_id or member.incarnation != info.incarnation:
            raise Rejected(RejectReason.MALFORMED, "header sender differs from the member")
        known = _rpc.view_from_pb(request.known_view)
        last = _rpc.decision_from_pb(request.last_decision)
        with c._cond:
            known_here = c._group().state_of(member.id, member.incarnation) is not None
        probe = c.config.probe_addresses and not known_here
        if probe and not _rpc.probe(member.addresses, c.config.probe_timeout):
            raise Rejected(
                RejectReason.UNREACHABLE_ADDRESS,
                f"no TCP connection to any of {', '.join(member.addresses)} "
                f"within {c.config.probe_timeout:.2f} s",
            )
        view, admitted, pace = c._locked(lambda g, now: (*g.join(member, known, last, now), g.pace))
        resp = pb.JoinResponse(
            view=_rpc.view_to_pb(view),
            admitted=admitted,
            timing=_rpc.timing_to_pb(pace),
            coordinator_run=c.run_id,
        )
        self._sign(resp, method, "response", view.epoch, (member.id, member.incarnation))
        return resp

    # -- Leave -------------------------------------------------------------------------

    async def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveResponse:
        method = _rpc.SERVICE + "Leave"

        def run() -> pb.LeaveResponse:
            info = self._c._signer.verify(request, method, "request")
            reason = request.reason[:200]
            view = self._c._locked(
                lambda g, now: g.leave(info.sender_id, info.incarnation, reason, now)
            )
            resp = pb.LeaveResponse(view=_rpc.view_to_pb(view))
            self._sign(resp, method, "response", view.epoch, (info.sender_id, info.incarnation))
            return resp

        return await self._unary(context, request, method, run)

    # -- Heartbeat ---------------------------------------------------------------------

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        method = _rpc.SERVICE + "Heartbeat"

        def run() -> pb.HeartbeatResponse:
            info = self._c._signer.verify(request, method, "request")
            epoch, pace = self._c._locked(
                functools.partial(_beat, (info.sender_id, info.incarnation))
            )
            resp = pb.HeartbeatResponse(epoch=epoch, coordinator_run=self._c.run_id,
                                        timing=_rpc.timing_to_pb(pace))  # fmt: skip
            self._sign(resp, method, "response", epoch, (info.sender_id, info.incarnation))
            return resp

        return await self._unary(context, request, method, run)

    # -- Beats -------------------------------------------------------------------------

    async def Beats(
        self, request_iterator: AsyncIterator[pb.HeartbeatRequest], context: Any
    ) -> None:
        """Heartbeats on one call (see the .proto): each request verified and counted
        as a Heartbeat; answered on the first beat, on an epoch or pace change and on
        the first beat a second or more after the last answer (the agent takes a long
        silence for a lost connection). A refusal ends the call with its status, as
        Heartbeat would answer. A coroutine on the server's loop (see start())."""
        method = _rpc.SERVICE + "Beats"
        c = self._c
        sender: tuple[str, int] | None = None
        last: tuple[int, Pace | None] = (-1, None)
        answered = 0.0
        request: pb.HeartbeatRequest | None = None
        try:
            async for request in request_iterator:
                info = c._signer.verify(request, method, "request")
                who = (info.sender_id, info.incarnation)
                if sender is None:
                    sender = who
                elif who != sender:
                    raise Rejected(RejectReason.MALFORMED, "one Beats call per member incarnation")
                epoch, pace = c._locked(functools.partial(_beat, who))
                now = time.monotonic()
                if (epoch, pace) != last or now - answered >= _ANSWER_EVERY_S:
                    last, answered = (epoch, pace), now
                    resp = pb.HeartbeatResponse(epoch=epoch, coordinator_run=c.run_id,
                                                timing=_rpc.timing_to_pb(pace))  # fmt: skip
                    self._sign(resp, method, "response", epoch, who)
                    # (a coroutine that writes, not an async generator: grpc's asyncio
                    # server runs stream-stream async generators as sync iterators)
                    await context.write(resp)
        except Rejected as err:
            await _abort_async(context, err, method, _claimed(request))

    # -- ReportFailure -----------------------------------------------------------------

    async def ReportFailure(
        self, request: pb.ReportFailureRequest, context: Any
    ) -> pb.ReportFailureResponse:
        method = _rpc.SERVICE + "ReportFailure"

        def run() -> pb.ReportFailureResponse:
            c = self._c
            info = c._signer.verify(request, method, "request")
            suspects = list(request.suspect_ids)
            if not suspects or len(suspects) > c.config.max_members:
                raise Rejected(RejectReason.MALFORMED, f"{len(suspects)} suspects")
            reason = request.reason[:64]

            def report(g: GroupState, now: float) -> list[str]:
                accepted = g.report(
                    info.sender_id, info.incarnation, info.epoch, suspects, reason, now
                )
                g.tick(now)  # a suspect whose Watch stream already dropped goes now
                return accepted

            out = c._locked(report)
            log.info(
                "event=failure_reported reporter=%s epoch=%d suspects=%s reason=%s accepted=%s",
                info.sender_id,
                info.epoch,
                ",".join(suspects),
                reason or "-",
                ",".join(out) or "-",
            )
            resp = pb.ReportFailureResponse(suspected_ids=out)
            self._sign(resp, method, "response", info.epoch, (info.sender_id, info.incarnation))
            return resp

        return await self._unary(context, request, method, run)

    # -- Commit ------------------------------------------------------------------------

    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        method = _rpc.SERVICE + "Commit"
        remaining = context.time_remaining()
        until = None if remaining is None else time.monotonic() + remaining
        ended = threading.Event()  # the call is over (the caller went away)

        def run() -> pb.CommitResponse:
            return self._commit(request, method, until, ended)

        return await self._unary(context, request, method, run, ended)

    def _commit(
        self, request: pb.CommitRequest, method: str, until: float | None, ended: threading.Event
    ) -> pb.CommitResponse:
        """A vote, then its decision: waits (on a pool thread) until the group decides,
        the caller goes away (``ended``) or its deadline (``until``, monotonic) nears."""
        c = self._c
        info = c._signer.verify(request, method, "request")
        step, ok = int(request.step), bool(request.ok)
        last = _rpc.decision_from_pb(request.last_decision)
        epoch = info.epoch
        if epoch == 0:
            raise Rejected(RejectReason.MALFORMED, "vote without an epoch")
        decision: Decision | None = c._locked(
            lambda g, now: g.vote(info.sender_id, info.incarnation, epoch, step, ok, now, last)
        )
        with c._cond:
            # decided between the vote above and this lock (its notify_all came before
            # we waited): the wake-up was missed, so look before waiting
            if decision is None:
                decision = c._group().decision(epoch, step)
            while decision is None:
                if c._stopping:
                    raise Rejected(RejectReason.SHUTTING_DOWN, "coordinator is stopping")
                remaining = None if until is None else until - time.monotonic()
                if ended.is_set():
                    raise _Ended(grpc.StatusCode.CANCELLED, "vote cancelled by the caller")
                if remaining is not None and remaining < 0.05:
                    raise _Ended(grpc.StatusCode.DEADLINE_EXCEEDED, "no decision yet: vote again")
                wait = _WAIT_SLICE if remaining is None else min(_WAIT_SLICE, remaining - 0.05)
                c._cond.wait(wait)
                decision = c._group().decision(epoch, step)
        resp = pb.CommitResponse(
            epoch=decision.epoch,
            step=decision.step,
            committed=decision.committed,
            outcome=decision.outcome.value,  # type: ignore[arg-type]
        )
        self._sign(resp, method, "response", epoch, (info.sender_id, info.incarnation))
        return resp

    # -- Watch -------------------------------------------------------------------------

    async def Watch(  # streams serialized events (see _handlers)
        self, request: pb.WatchRequest, context: Any
    ) -> AsyncIterator[bytes]:
        """The member's view stream: a snapshot first, then every published view, and
        an eviction notice before it ends. A coroutine on the server's loop: it waits
        for :meth:`Coordinator._wake_watchers`, never on a thread of its own. When the
        call ends and not by our doing (the member's process died, its connection
        broke), the member is suspected at once (``stream_lost``)."""
        method = _rpc.SERVICE + "Watch"
        c = self._c
        try:
            info = c._signer.verify(request, method, "request")
            with c._cond:
                c._group().check_sender(info.sender_id, info.incarnation)
        except Rejected as err:
            await _abort_async(context, err, method, _claimed(request))
        member_id, incarnation = info.sender_id, info.incarnation
        ended_by_us = False

        def on_done(_: object) -> None:
            # the call's own deadline (the agent reopens the stream every few minutes)
            # is no loss: suspecting the member then let any peer's report in that
            # window remove a healthy member at once
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= _WATCH_EXPIRY_SLACK_S
            with c._cond:
                group = c._group()
                before, seq = group.revision, group.published.seq
                if not c._stopping and not ended_by_us and not expired:
                    now = time.monotonic()
                    group.stream_lost(member_id, incarnation, now)
                    group.tick(now)  # corroborated by a report already: remove it now
                c._notify(group, before, seq)
                c._cond.notify_all()

        context.add_done_callback(on_done)
        last_seq = -1
        first = True
        while True:
            with c._cond:
                if c._stopping:
                    return
                group = c._group()
                state = group.state_of(member_id, incarnation)
                live = state is MemberState.JOINING or state in IN_VIEW_STATES
                published = group.published
                wake = c._watch_wake  # set by the next publication (under this lock)
            if published.seq == last_seq and live:
                if wake is not None:  # a new view, stop(), or the detector's look
                    await wake.wait()
                continue
            last_seq = published.seq
            evicted = not live and state is not MemberState.LEFT
            if evicted:  # this watcher's own notice
                data = self._event(
                    published, first=first, evicted=True, to=(member_id, incarnation)
                )
            elif first:  # a stream's snapshot: shared too, but never twice to one watcher
                data = self._first_event(published, (member_id, incarnation))
            else:  # the same bytes for every watcher of this view, built by the first
                with c._event_lock:
                    cached = c._event
                    if cached is None or cached[0] != published.seq:
                        cached = c._event = (published.seq, self._event(published, first=False,
                                                                        evicted=False))  # fmt: skip
                data = cached[1]
            first = False
            if not live:
                ended_by_us = True
                log.info(
                    "event=watch_closed member=%s incarnation=%d state=%s epoch=%d",
                    member_id,
                    incarnation,
                    state.value if state is not None else "unknown",
                    published.view.epoch,
                )
            yield data
            if not live:
                return

    def _first_event(self, published: Published, who: tuple[str, int]) -> bytes:
        """The snapshot event that opens a Watch stream, built once per view (a cluster
        starting at once opens N streams on N-member views). A watcher that reopens its
        stream within one view gets fresh bytes: its agent's replay cache would refuse
        the same nonce twice."""
        c = self._c
        with c._cond:
            cached = c._first
            if cached is None or cached[0] != published.seq:
                cached = c._first = (published.seq, b"", set())
            if who in cached[2] or not cached[1]:
                fresh = not cached[1]
            else:
                cached[2].add(who)
                return cached[1]
        data = self._event(published, first=True, evicted=False)
        if fresh:
            with c._cond:
                if c._first is not None and c._first[0] == published.seq and not c._first[1]:
                    c._first = (published.seq, data, {who})
        return data

    def _event(
        self,
        published: Published,
        *,
        first: bool,
        evicted: bool,
        to: tuple[str, int] | None = None,
    ) -> bytes:
        """A signed, serialized Watch event for ``published``. A broadcast event may go
        to many watchers with one nonce: each agent's replay cache sees it once. An
        eviction notice names its member (``to``): replayed to another, it is refused."""
        # an eviction notice ends the stream and its agent rejoins: it carries the
        # epoch, not the members (at 1,000 members each notice was a 1,000-member view
        # built, signed and serialized for one watcher)
        view = View(published.view.epoch) if evicted else published.view
        event = pb.WatchEvent(
            view=_rpc.view_to_pb(view),
            cause=(pb.VIEW_CAUSE_SNAPSHOT if first else published.cause.value),  # type: ignore[arg-type]
            removed_ids=[i for i, _ in published.removed],
            removed_causes=[why for _, why in published.removed],
            evicted=evicted,
        )
        self._sign(event, _rpc.SERVICE + "Watch", "event", published.view.epoch, to)
        return event.SerializeToString()

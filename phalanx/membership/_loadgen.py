"""Simulated members for ``phalanx bench coordinator``: many members, one process, asyncio.

(It lives in the membership package because it speaks the coordinator's wire -- signed
protobuf requests -- which only this package may touch; the bench imports it.)

One load process runs :func:`load_main` for a slice of the simulated members. Each
member speaks the coordinator's gRPC API directly, as :mod:`phalanx.membership.agent`
does (signed Join, a Heartbeat every ``heartbeat_interval``, a Watch stream, Leave,
ReportFailure), but as asyncio tasks over a few shared channels instead of two threads
per member, so the load generator stays cheap and the coordinator's own cost is what
gets measured (its CPU is read from /proc by the parent, apart from this process's).

Commands arrive on a pipe (read on a thread, handed to the loop): ``("fail", id,
reporter)`` stops a member's heartbeats and drops its Watch stream at once -- what the
coordinator sees of a SIGKILL -- and has ``reporter`` report it, as the data plane
would within milliseconds; ``("join", id)``, ``("leave", id)``, ``("stats",)`` (acked
heartbeats so far), ``("arrivals", id)`` (for every member still watching: when its
Watch first delivered a view without ``id``), ``("stop",)``. This module speaks the wire
(protobuf) like agent.py; it never waits without a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import threading
import time
from typing import Any

import grpc

from phalanx.membership import _rpc
from phalanx.membership._proto import membership_pb2 as pb
from phalanx.membership._proto import membership_pb2_grpc as pb_grpc
from phalanx.membership.view import Member, View
from phalanx.testing.launcher import die_with_parent

__all__ = ["load_main"]

# Real members each have their own connection. Channels to one target share one by
# default (gRPC's global subchannel pool), and one HTTP/2 connection carries at most
# ~100 concurrent streams: past that the heartbeats queued behind the Watch streams and
# every member was evicted. Each channel here gets a connection of its own.
_MEMBERS_PER_CHANNEL = 32
_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


class _Sim:
    """One simulated member's tasks and what it saw."""

    def __init__(self, member: Member, stub: Any, channel: grpc.aio.Channel) -> None:
        self.member = member
        self.stub = stub
        self.channel = channel
        self.ids: frozenset[str] = frozenset()
        self.tasks: list[asyncio.Task[None]] = []
        self.epoch = 0  # of the last view its Watch delivered
        self.gone: dict[str, float] = {}  # member id -> first view without it (monotonic)
        self.alive = True
        self.stopped = False  # failed or left on purpose: never rejoins


class _Load:
    def __init__(self, address: str, secret: bytes, interval: float, unary: bool = False) -> None:
        self.unary = unary  # unary Heartbeat calls instead of one Beats stream per member
        self.stream_acks = 0
        self.address = address
        self.signer = _rpc.Signer(secret)
        self.interval = interval
        self.channels: list[grpc.aio.Channel] = []
        self.sims: dict[str, _Sim] = {}
        self.acked = 0
        self.failed_beats = 0
        self.events = 0
        self.last_error = ""
        self._parsed: dict[bytes, tuple[int, bool, frozenset[str]]] = {}
        self._diffs: dict[
            tuple[int, int], tuple[frozenset[str], frozenset[str], tuple[str, ...]]
        ] = {}
        self.max_lag = 0.0
        self.beat_s: collections.deque[float] = collections.deque(maxlen=2000)
        self.rejoins = 0  # evicted members that came back as a later incarnation
        self._rejoining: set[asyncio.Task[None]] = set()

    def _channel(self) -> grpc.aio.Channel:
        if not self.channels or len(self.sims) >= len(self.channels) * _MEMBERS_PER_CHANNEL:
            self.channels.append(grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS))
        return self.channels[-1]

    def _sign(self, req: Any, name: str, m: Member, epoch: int = 0) -> Any:
        self.signer.sign(req, _rpc.SERVICE + name, "request", sender_id=m.id,
                         incarnation=m.incarnation, epoch=epoch)  # fmt: skip
        return req

    async def join(self, member_id: str, timeout: float = 30.0, incarnation: int = 1) -> None:
        m = Member(member_id, ("127.0.0.1:9",), incarnation)
        old = self.sims.get(member_id)
        ch = old.channel if old is not None else self._channel()
        sim = _Sim(m, pb_grpc.CoordinatorStub(ch), ch)  # type: ignore[no-untyped-call]
        self.sims[member_id] = sim
        req = pb.JoinRequest(member=_rpc.member_to_pb(m), known_view=_rpc.view_to_pb(View(0)))
        deadline = time.monotonic() + timeout
        while True:
            try:
                await sim.stub.Join(self._sign(req, "Join", m), timeout=5.0)
                break
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline:
                    raise
                if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    # a join that timed out here but registered there, then failed for
                    # want of beats: this incarnation is spent, as an agent's would be
                    m = Member(member_id, m.addresses, m.incarnation + 1)
                    sim.member = m
                    req = pb.JoinRequest(member=_rpc.member_to_pb(m),
                                         known_view=_rpc.view_to_pb(View(0)))  # fmt: skip
                await asyncio.sleep(0.1)
        sim.tasks = [asyncio.create_task(self._beat(sim)), asyncio.create_task(self._watch(sim))]

    def _evicted(self, sim: _Sim) -> None:
        """The coordinator removed ``sim``: it stops and, as an agent does, comes back
        as the next incarnation (once, however many of its tasks noticed)."""
        if not sim.alive:
            return
        sim.alive = False
        if sim.stopped or self.sims.get(sim.member.id) is not sim:
            return
        for t in sim.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.rejoins += 1
        task = asyncio.create_task(self.join(sim.member.id, incarnation=sim.member.incarnation + 1))
        self._rejoining.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._rejoining.discard)

    async def _beat(self, sim: _Sim) -> None:
        # spread the members' beats over the interval, as independent processes would
        await asyncio.sleep(self.interval * (hash(sim.member.id) % 1000) / 1000)
        if self.unary:
            await self._unary_beats(sim)
        else:
            await self._beat_stream(sim)

    async def _unary_beats(self, sim: _Sim) -> None:
        """One unary Heartbeat call per beat (an agent against an older coordinator)."""
        nxt = time.monotonic()
        while sim.alive:
            t0 = time.monotonic()
            try:
                await sim.stub.Heartbeat(
                    self._sign(pb.HeartbeatRequest(), "Heartbeat", sim.member, sim.epoch),
                    timeout=2 * self.interval,
                )
                self.acked += 1
                self.beat_s.append(time.monotonic() - t0)
            except grpc.aio.AioRpcError as exc:
                self.failed_beats += 1
                self.last_error = self.last_error or f"{exc.code().name}: {exc.details()}"
            nxt += self.interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def _beat_stream(self, sim: _Sim) -> None:
        """The agent's way: every beat on one Beats call; the coordinator answers about
        once a second. A beat counts once handed to the stream (``beat_s``: how long
        that took -- it queues when the coordinator falls behind)."""
        while sim.alive:
            open_beats: Any = sim.channel.stream_stream(
                _rpc.SERVICE + "Beats",
                request_serializer=pb.HeartbeatRequest.SerializeToString,
                response_deserializer=pb.HeartbeatResponse.FromString,
            )
            call = open_beats()  # requests are written with call.write()
            acks = asyncio.create_task(self._acks(call, sim))
            nxt = time.monotonic()
            try:
                while sim.alive and not acks.done():
                    t0 = time.monotonic()
                    req = self._sign(pb.HeartbeatRequest(), "Beats", sim.member, sim.epoch)
                    await call.write(req)
                    self.acked += 1
                    self.beat_s.append(time.monotonic() - t0)
                    nxt += self.interval
                    await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                self.failed_beats += 1
                self.last_error = self.last_error or f"Beats: {exc}"[:200]
            finally:
                call.cancel()
                acks.cancel()
            if sim.alive:
                await asyncio.sleep(0.1)

    async def _acks(self, call: Any, sim: _Sim) -> None:
        try:
            async for resp in call:
                self.stream_acks += 1
                self._follow_pace(resp.timing)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED:
                return
            self.failed_beats += 1
            self.last_error = self.last_error or f"{exc.code().name}: {exc.details()}"
            if _rpc.error_from_rpc(exc, _rpc.SERVICE + "Beats") is not None:
                self._evicted(sim)  # refused (evicted), as the Watch would say

    def _follow_pace(self, timing: pb.Timing) -> None:
        """Beat at the interval the coordinator asks for, as agents do (one group, so
        one interval for every simulated member of this process)."""
        if timing.heartbeat_interval_ms:
            self.interval = timing.heartbeat_interval_ms / 1000.0

    def _gone(self, before: frozenset[str], after: frozenset[str]) -> tuple[str, ...]:
        """``before - after``, computed once per pair of views for the whole process
        (the watchers share the parsed id sets): a set difference of two 1,000-member
        views per watcher was most of the time this process took to take in a view."""
        key = (id(before), id(after))
        hit = self._diffs.get(key)
        if hit is None or hit[0] is not before or hit[1] is not after:
            hit = (before, after, tuple(before - after))
            if len(self._diffs) > 256:
                self._diffs.clear()
            self._diffs[key] = hit
        return hit[2]

    def _parse(self, raw: bytes) -> tuple[int, bool, frozenset[str]]:
        """(epoch, evicted, member ids) of a Watch event, verified. The coordinator sends
        one event's bytes to every watcher, so a process parses each once: otherwise
        the load generator, not the coordinator, did O(N^2) work per view change. The
        ids are taken as they come (an agent checks each member; at 1,000 members that
        was half of this process's CPU, and starved its simulated members' beats)."""
        hit = self._parsed.get(raw)
        if hit is None:
            event = pb.WatchEvent.FromString(raw)
            self.signer.verify(event, _rpc.SERVICE + "Watch", "event", check_replay=False)
            hit = (int(event.view.epoch), bool(event.evicted),
                   frozenset(m.id for m in event.view.members))  # fmt: skip
            if len(self._parsed) > 64:
                self._parsed.clear()
            self._parsed[raw] = hit
        return hit

    async def _watch(self, sim: _Sim) -> None:
        while sim.alive:
            req = self._sign(pb.WatchRequest(), "Watch", sim.member, sim.epoch)
            watch = sim.channel.unary_stream(
                _rpc.SERVICE + "Watch",
                request_serializer=pb.WatchRequest.SerializeToString,
                response_deserializer=None,  # bytes: parsed once per process (_parse)
            )
            call = watch(req, timeout=300.0)
            try:
                async for raw in call:
                    now = time.monotonic()
                    self.events += 1
                    epoch, evicted, ids = self._parse(raw)
                    for gone in self._gone(sim.ids, ids):
                        sim.gone.setdefault(gone, now)
                    sim.epoch, sim.ids = epoch, ids
                    if evicted:
                        self._evicted(sim)
                        return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
            finally:
                call.cancel()

    async def fail(self, member_id: str, reporter: str) -> float | None:
        """Kill ``member_id`` as a SIGKILL looks from the coordinator; returns when
        (None if it was no longer in the group: evicted meanwhile)."""
        sim = self.sims.get(member_id)
        rep = self.sims.get(reporter)
        if sim is None or not sim.alive or rep is None or not rep.alive:
            return None
        del self.sims[member_id]
        t0 = time.monotonic()
        sim.alive = False
        sim.stopped = True
        for t in sim.tasks:
            t.cancel()  # the Watch stream drops now, the heartbeats stop
        req = pb.ReportFailureRequest(suspect_ids=[member_id], reason="disconnected")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await rep.stub.ReportFailure(
                self._sign(req, "ReportFailure", rep.member, rep.epoch), timeout=5.0
            )
        return t0

    async def leave(self, member_id: str) -> None:
        sim = self.sims.pop(member_id)
        sim.alive = False
        sim.stopped = True
        with contextlib.suppress(grpc.aio.AioRpcError):
            await sim.stub.Leave(self._sign(pb.LeaveRequest(reason="bench"), "Leave", sim.member,
                                            sim.epoch), timeout=5.0)  # fmt: skip
        for t in sim.tasks:
            t.cancel()

    def arrivals(self, member_id: str, since: float) -> tuple[list[float], int]:
        """When each live member first held a view without ``member_id`` (at or after
        ``since``), and how many live members there are."""
        live = [s for s in self.sims.values() if s.alive]
        got = [s.gone[member_id] for s in live if s.gone.get(member_id, -1.0) >= since]
        return got, len(live)

    def live(self) -> list[str]:
        return [m for m, s in self.sims.items() if s.alive]

    async def close(self) -> None:
        for task in self._rejoining:
            task.cancel()
        for sim in self.sims.values():
            sim.alive = False
            sim.stopped = True
            for t in sim.tasks:
                t.cancel()
        for ch in self.channels:
            await ch.close(None)


async def _serve(load: _Load, members: list[str], conn: Any) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def reader() -> None:
        try:
            while True:
                msg = conn.recv()
                loop.call_soon_threadsafe(inbox.put_nowait, msg)
                if msg[0] == "stop":
                    return
        except (EOFError, OSError):
            loop.call_soon_threadsafe(inbox.put_nowait, ("stop",))

    threading.Thread(target=reader, name="bench-load-pipe", daemon=True).start()

    async def lag() -> None:  # how late this process's loop runs (it starves members)
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            load.max_lag = max(load.max_lag, time.monotonic() - t - 0.05)

    lag_task = asyncio.create_task(lag())
    for i in range(0, len(members), 50):  # joins in waves, as a cluster would start
        await asyncio.gather(*(load.join(m) for m in members[i : i + 50]))
        await asyncio.sleep(0.1)  # the wave's first beats and Watch snapshots go through
    conn.send(("ready", len(members)))
    while True:
        msg = await inbox.get()
        kind = msg[0]
        if kind == "stop":
            break
        if kind == "fail":
            conn.send(("failed", await load.fail(msg[1], msg[2])))
        elif kind == "join":
            await load.join(msg[1])
            conn.send(("joined", msg[1]))
        elif kind == "leave":
            await load.leave(msg[1])
            conn.send(("left", msg[1]))
        elif kind == "stats":
            beats = sorted(load.beat_s)
            p50 = beats[len(beats) // 2] if beats else None
            p99 = beats[int(len(beats) * 0.99)] if beats else None
            alive = sum(1 for sim in load.sims.values() if sim.alive)
            conn.send(("stats", load.acked, load.failed_beats, load.events, alive,
                       load.last_error, p50, p99, load.max_lag, load.rejoins,
                       load.interval))  # fmt: skip
        elif kind == "arrivals":
            conn.send(("arrivals", *load.arrivals(msg[1], msg[2])))
        elif kind == "live":
            conn.send(("live", load.live()))
    lag_task.cancel()
    await load.close()


def load_main(
    address: str,
    secret: bytes,
    interval: float,
    members: list[str],
    conn: Any,
    unary: bool = False,
) -> None:
    """Entry point of one load process (multiprocessing *spawn*)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    load = _Load(address, secret, interval, unary)
    try:
        asyncio.run(_serve(load, members, conn))
    except Exception as exc:  # the parent reports it
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        with contextlib.suppress(OSError):
            conn.close()

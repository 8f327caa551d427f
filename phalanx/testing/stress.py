"""``phalanx stress``: churn at random times from a seed, every result checked.

Starts a coordinator, ``--peers`` daemons and as many training processes on this
machine (real processes; :mod:`._stress_cluster`). Each trainer runs checked steps
(:mod:`._stress_trainer`): ``begin_step``, one to three collectives whose inputs are a
known function of (member, step) so the exact result of every op is recomputed from
the contributors it reports (:mod:`._stress_model`), ``commit(step)``, the state
update; snapshots every few steps once the client has ``snapshot``. Meanwhile a fault
orchestrator driven by ``random.Random(seed)`` injects, every ``--churn`` seconds:

* ``kill``: SIGKILL a peer (trainer + daemon) and later start a replacement that
  joins, syncs state and restores the lost peer's snapshot; or SIGKILL only the
  trainer and restart it on the same daemon (it gets its state back);
* ``stop``: SIGSTOP a peer, SIGCONT after 0.2-2.5 s (past the heartbeat timeout it is
  evicted; a peer that cannot continue is replaced);
* ``join`` / ``leave``: a new peer; a trainer finishes its step and its daemon leaves
  gracefully (SIGTERM);
* ``coordinator``: SIGKILL the coordinator and restart it on the same port;
* ``slow``: duty-cycle one daemon (SIGSTOP 50 ms of every 200 ms) for 1-3 s;
* ``net``: with root and iproute2 every daemon runs in its own network namespace
  and a partition takes one peer's veth down for 0.3-2 s (no netem on this kernel, so
  no delay or loss at that layer); without them it is skipped with a message.

Never fewer than 2 live peers. Checks (:mod:`._stress_check`): exact results (lossy
codecs: within their stated error and bit-identical across members), the synced state
after every ``begin_step``, commit answers, restores, hangs (any call that runs
``--hang-s`` or hits its deadline, an eviction not over within ``--hang-s``, a trainer
silent for ``--hang-s`` + 10 s, a stall; during the stop too), crashes (a daemon or
coordinator that exits unclean unless the harness killed it, a trainer that dies
without a word), and leaks at the end (children, threads, sockets, namespaces, links).

Output: a progress bar on stderr; one JSON line on stdout. Exit status 1 when
``wrong_results``, ``hangs``, ``lost_snapshots``, ``crashes`` or ``leaks`` is not 0.
``--duration`` is the churn phase; start-up and the orderly stop come on top, and
the whole run is bounded by ``duration + 150`` s. This module must never signal a
process it did not start nor wait without a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing.connection
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from phalanx.testing._stress_check import Checker
from phalanx.testing._stress_cluster import Cluster, Peer, leaks, netns_unavailable, socket_fds
from phalanx.testing._stress_model import member_id
from phalanx.testing._stress_trainer import TrainerArgs

__all__ = ["FAULTS", "StressConfig", "register", "run_stress"]

log = logging.getLogger(__name__)

FAULTS = ("kill", "stop", "join", "leave", "coordinator", "slow", "net")
_DISRUPTIVE = frozenset({"kill", "stop", "leave", "coordinator", "net"})
_MAX_EXTRA_PEERS = 2  # joins may grow the group to peers + 2
# a coordinator is killed again only this long after its restart listened: one outage
# at a time (recovery grace 1.5 s + re-registration); back-to-back kills would starve
# every membership change (a peer that left cannot be removed) past --hang-s
_COORDINATOR_SPACING_S = 5.0
_STOP_STRAGGLER_S = 5.0  # at the end: members still stepping this long after the rest stopped
_MAX_REASONS = 25  # failure reasons in the JSON line (the rest: failures.log)
# a trainer whose pipe closed without "done": how long to wait for its exit status
_TRAINER_EXIT_S = 2.0
# a starting trainer's attach_state may wait out a daemon busy rejoining: the client
# waits op_timeout + the daemon's join timeout (30 s by default) for state calls
_STARTING_GRACE_S = 30.0


@dataclass(frozen=True)
class StressConfig:
    """One run's settings."""

    peers: int = 4
    duration: float = 60.0
    seed: int = 0
    faults: tuple[str, ...] = FAULTS
    churn: tuple[float, float] = (0.5, 2.0)
    hang_s: float = 20.0
    heartbeat_timeout: float | None = None
    snapshot_every: int = 5
    startup_timeout: float = 90.0
    log_level: str = "WARNING"
    keep_dir: bool = False

    def __post_init__(self) -> None:
        bad = set(self.faults) - set(FAULTS)
        if bad:
            raise ValueError(f"unknown faults {sorted(bad)}; choose from {','.join(FAULTS)}")
        if self.peers < 2:
            raise ValueError("--peers must be >= 2")
        if self.duration <= 0 or self.hang_s <= 0:
            raise ValueError("--duration and --hang-s must be > 0")
        lo, hi = self.churn
        if not 0 < lo <= hi:
            raise ValueError("--churn must be LO-HI seconds with 0 < LO <= HI")


class _Run:
    """The orchestrator's state: one loop drains trainer events, starts what is due,
    injects the next fault and watches for hangs."""

    def __init__(self, cfg: StressConfig, cluster: Cluster, say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.cl = cluster
        self.say = say
        self.rng = random.Random(cfg.seed)  # replaced at every fault tick (see inject)
        self.tick = 0
        # held while a fault or the slow duty cycle changes whether a daemon is stopped
        self.sig_lock = threading.Lock()
        self.t_finished: float | None = None  # when finish() ended
        self.check = Checker(cfg.seed, cfg.hang_s, on_finding=lambda m: say(f"FINDING {m}"),
                             on_failure=self.log_failure)  # fmt: skip
        # every clean failure, one line each, in failures.log (kept with the logs:
        # --keep-dir, or a red run); opened at the first failure
        self.failures: TextIO | None = None
        self.counts = {k: 0 for k in ("kills", "trainer_kills", "stops", "joins", "leaves",
                                      "coordinator_restarts", "slows", "nets",
                                      "replacements", "join_failures")}  # fmt: skip
        self.next_index = 0
        self.timers: list[tuple[float, str, Callable[[], None]]] = []
        self.slow_threads: list[threading.Thread] = []
        self.stop_slow = threading.Event()
        self.stopping = False
        self.coord_starting: float | None = None  # a restarted coordinator not up yet
        self.coord_up_at = 0.0  # when the last restarted coordinator listened
        self.founding = True  # founders attach w at step 0; later peers receive it

    # ------------------------------------------------------------------ helpers
    def log_failure(self, member: str, t: float, p: dict[str, Any]) -> None:
        extra = " ".join(f"{k}={p[k]}" for k in ("step", "op", "owner") if k in p)
        secs = p.get("secs")
        took = f" after {secs:.2f}s" if isinstance(secs, float) else ""
        with contextlib.suppress(OSError, ValueError):
            if self.failures is None:
                self.failures = open(self.cl.dir / "failures.log", "a", buffering=1)  # noqa: SIM115
            self.failures.write(f"{t:.3f} {member} {p.get('call')} {extra}{took}: "
                                f"{p.get('error', '')}\n")  # fmt: skip

    def new_member(self) -> str:
        m = member_id(self.next_index)
        self.next_index += 1
        return m

    def at(self, delay: float, what: str, fn: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, what, fn))

    def live(self) -> list[Peer]:
        """Peers whose trainer runs and that no fault holds right now."""
        return [p for p in self.cl.peers.values() if p.status == "running"]

    def trainer_args(self, peer: Peer, *, founding: bool, restore_own: bool = False) -> TrainerArgs:
        return TrainerArgs(
            member=peer.member,
            socket=peer.socket,
            seed=self.cfg.seed,
            founding=founding,
            call_timeout=self.cfg.hang_s,
            snapshot_every=self.cfg.snapshot_every,
            restore_peer=peer.restore_peer,
            restore_own=restore_own,
        )

    def crash(self, what: str) -> None:
        self.check.crashes += 1
        self.check.note(f"crash: {what}")

    def take_crashes(self) -> None:
        """Count what the cluster found: daemons and coordinators that exited with a
        status other than a clean stop, without the harness killing them."""
        self.cl.judge_coordinators()
        for what in self.cl.take_crashes():
            self.crash(what)

    def silent_limit(self, peer: Peer) -> float:
        """How long a trainer may send nothing before it is a hang."""
        grace = _STARTING_GRACE_S if peer.status == "starting" else 0.0
        return self.cfg.hang_s + 10.0 + grace

    def retire(self, peer: Peer, *, kill: bool) -> None:
        self.check.departed(time.monotonic(), peer.member)
        self.check.unavailable.discard(peer.member)
        self.cl.retire(peer, kill=kill)

    def start_peer(self, restore_peer: str | None = None) -> None:
        peer = self.cl.start_daemon(self.new_member())
        if restore_peer is not None and self.check.last_sealed(restore_peer) is not None:
            peer.restore_peer = restore_peer

    # ------------------------------------------------------------------ events
    def pump(self, timeout: float) -> None:
        conns = {id(p.conn): p for p in [*self.cl.peers.values(), *self.cl.retired]
                 if p.conn is not None and not p.conn.closed}  # fmt: skip
        if not conns:
            time.sleep(timeout)
            return
        ready = multiprocessing.connection.wait([p.conn for p in conns.values()], timeout)
        for c in ready:
            peer = conns[id(c)]
            try:
                # poll(0) says bytes are there, recv() reads a whole message. Events are
                # a few hundred bytes: Connection.send writes one (header included) with
                # a single send() on the socket pair, which the kernel copies whole, so
                # recv() does not wait on a half-written event (a trainer SIGSTOPped
                # mid-send). A reader thread per trainer would cover megabyte messages
                while peer.conn.poll(0):
                    ev = peer.conn.recv()
                    peer.t_last = time.monotonic()
                    self.on_event(peer, ev)
            except (EOFError, OSError):
                peer.conn.close()
                self.on_pipe_closed(peer)
                self.on_trainer_gone(peer, "pipe closed")

    def on_pipe_closed(self, peer: Peer) -> None:
        """A trainer's pipe closed. Without a "done" first, and not killed by the
        harness, it died (SIGSEGV, SIGBUS, the OOM killer...): a crash when its exit
        status (waited for, bounded) is not 0."""
        tr = peer.trainer
        if tr is None or peer.trainer_done or peer.trainer_killed:
            return
        tr.join(_TRAINER_EXIT_S)
        code = tr.exitcode
        if code is None or code == 0:
            return
        how = f"status {code}"
        if code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        self.crash(f"trainer {peer.member} died without a word ({how})")

    def on_event(self, peer: Peer, ev: tuple[str, str, float, dict[str, Any]]) -> None:
        self.check.event(ev)
        kind, payload = ev[0], ev[3]
        if kind == "ready" and peer.status == "starting":
            peer.status = "running"
        elif kind == "done":
            peer.trainer_done = True
            self.on_trainer_gone(peer, str(payload.get("why", "")))

    def on_trainer_gone(self, peer: Peer, why: str) -> None:
        # a trainer ends when its daemon died (DaemonUnavailable): judge the daemon's
        # exit status before the peer is retired (and SIGKILLed) as a replacement
        crashed = peer.daemon_crash()
        if crashed is not None:
            self.crash(crashed)
        if peer.member not in self.cl.peers or self.stopping:
            return
        if peer.status == "leaving":
            self.retire(peer, kill=False)  # SIGTERM: the daemon leaves gracefully
            return
        if peer.status == "restarting":
            return
        # the trainer ended on its own (evicted for good, daemon gone, crashed): replace it
        self.say(f"{peer.member} lost ({why}); replacing it")
        self.retire(peer, kill=True)
        self.counts["replacements"] += 1
        self.start_peer(restore_peer=peer.member)

    # ------------------------------------------------------------------ progress
    def advance(self) -> None:
        """Start trainers of daemons that became ready; notice dead daemons."""
        now = time.monotonic()
        for peer in list(self.cl.peers.values()):
            if peer.status == "starting" and peer.trainer is None:
                if peer.daemon_ready():
                    founding = self.founding
                    self.cl.start_trainer(peer, self.trainer_args(peer, founding=founding))
                elif (
                    peer.daemon.poll() is not None
                    or now - peer.t_started > self.cfg.startup_timeout
                ):
                    self.counts["join_failures"] += 1
                    self.check.note(f"join failed: {peer.member} daemon rc={peer.daemon.poll()}")
                    peer.judged = True  # a daemon that never got ready: a join failure
                    self.retire(peer, kill=True)
                    if not self.stopping:
                        self.start_peer()
            elif peer.daemon.poll() is not None:  # whatever the state: a crash unless clean
                self.on_trainer_gone(peer, "daemon exited")
            elif (
                peer.trainer is not None
                and peer.status != "restarting"  # its trainer was killed: no one to hear
                and now - peer.t_last > self.silent_limit(peer)
            ):
                self.check.hangs += 1
                self.check.note(f"hang: trainer {peer.member} ({peer.status}) silent for "
                                f"{now - peer.t_last:.1f}s")  # fmt: skip
                if peer.status == "leaving":
                    self.retire(peer, kill=True)
                else:
                    self.on_trainer_gone(peer, "silent")
        self.poll_coordinator(now)
        due = [t for t in self.timers if t[0] <= now]
        self.timers = [t for t in self.timers if t[0] > now]
        for _, _, fn in due:
            fn()
        self.cl.reap()
        self.take_crashes()

    def poll_coordinator(self, now: float) -> None:
        """Notice when a restarted coordinator listens; start it again if it failed."""
        if self.coord_starting is None:
            return
        try:
            if self.cl.coordinator_ready():
                self.coord_starting = None
                self.coord_up_at = now
            elif now - self.coord_starting > 30.0:
                raise RuntimeError("did not listen within 30 s")
        except RuntimeError as exc:  # e.g. the port was taken meanwhile: try again
            self.check.note(f"coordinator restart failed: {exc}")
            self.cl.kill_coordinator()
            self.cl.start_coordinator(wait=False)
            self.coord_starting = now

    # ------------------------------------------------------------------ faults
    def coordinator_may_fail(self, now: float) -> bool:
        """One coordinator outage at a time: not while a restart is pending or has not
        listened yet, nor within ``_COORDINATOR_SPACING_S`` of the last restart
        listening (back-to-back kills starve every view change; the soak of stop 11
        killed it 11 times in 60 s, 1.3 s apart at worst, and then committed no step
        for the last 290 s)."""
        if self.coord_starting is not None:
            return False
        if any(w == "coordinator" for _, w, _ in self.timers):
            return False
        return now - self.coord_up_at >= _COORDINATOR_SPACING_S

    def next_gap(self) -> float:
        """Seconds to the next fault tick: drawn from the seed and the tick only."""
        return random.Random(f"{self.cfg.seed}:gap:{self.tick}").uniform(*self.cfg.churn)

    def inject(self) -> None:
        # every tick draws from a generator of its own: how many draws an earlier tick
        # made (which depends on timing: who was running, who was below --peers) does
        # not shift the draws of the later ones
        self.tick += 1
        self.rng = random.Random(f"{self.cfg.seed}:{self.tick}")
        live = self.live()
        n_all = len(self.cl.peers)
        kinds = []
        for k in self.cfg.faults:
            if k in ("kill", "stop", "leave", "net", "slow") and len(live) < 3:
                continue
            if k == "join" and n_all >= self.cfg.peers + _MAX_EXTRA_PEERS:
                continue
            if k == "coordinator" and not self.coordinator_may_fail(time.monotonic()):
                continue
            kinds.append(k)
        if n_all < self.cfg.peers and "join" in self.cfg.faults and self.rng.random() < 0.5:
            kinds = ["join"]
        if not kinds:
            return
        kind = self.rng.choice(kinds)
        victim = self.rng.choice(live) if live else None
        now = time.monotonic()
        if kind in _DISRUPTIVE and kind != "kill":  # kill says which kind it chose
            self.check.fault(now, kind)
        getattr(self, f"_fault_{kind}")(victim)

    def _fault_kill(self, victim: Peer | None) -> None:
        assert victim is not None
        self.counts["kills"] += 1
        if self.rng.random() < 0.3:  # the training process only: its daemon keeps state
            self.counts["trainer_kills"] += 1
            self.check.fault(time.monotonic(), "kill_trainer")
            victim.status = "restarting"
            victim.signal(signal.SIGKILL, daemon=False)
            self.say(f"kill trainer of {victim.member}")

            def restart() -> None:
                if victim.member in self.cl.peers and not self.stopping:
                    own = self.check.last_sealed(victim.member) is not None
                    victim.restore_peer = None  # a replacement restores its peer once
                    args = self.trainer_args(victim, founding=False, restore_own=own)
                    self.cl.start_trainer(victim, args)
                    victim.status = "starting"

            self.at(self.rng.uniform(0.2, 1.0), "restart", restart)
            return
        self.say(f"kill {victim.member}")
        self.check.fault(time.monotonic(), "kill")
        self.retire(victim, kill=True)
        self.at(self.rng.uniform(0.3, 1.5), "replace", lambda: self.start_peer(victim.member))

    def _fault_stop(self, victim: Peer | None) -> None:
        assert victim is not None
        self.counts["stops"] += 1
        dur = self.rng.uniform(0.2, 2.5)
        self.say(f"stop {victim.member} for {dur:.1f}s")
        with self.sig_lock:  # the slow duty cycle must not continue it (see _duty_cycle)
            victim.status = "stopped"
            victim.signal(signal.SIGSTOP)
        self.check.unavailable.add(victim.member)

        def cont() -> None:
            with self.sig_lock:
                victim.signal(signal.SIGCONT)
                if victim.status == "stopped":
                    victim.status = "running"
            self.check.unavailable.discard(victim.member)
            victim.t_last = time.monotonic()

        self.at(dur, "cont", cont)

    def _fault_join(self, victim: Peer | None) -> None:
        self.counts["joins"] += 1
        self.say("join a new peer")
        self.start_peer()

    def _fault_leave(self, victim: Peer | None) -> None:
        assert victim is not None
        self.counts["leaves"] += 1
        self.say(f"leave {victim.member}")
        victim.status = "leaving"
        self.cl.send(victim, "stop")

    def _fault_coordinator(self, victim: Peer | None) -> None:
        self.counts["coordinator_restarts"] += 1
        self.say("kill the coordinator")
        self.cl.kill_coordinator()

        def restart() -> None:
            self.cl.start_coordinator(wait=False)  # polled in advance(): never blocks
            self.coord_starting = time.monotonic()

        self.at(self.rng.uniform(0.0, 1.0), "coordinator", restart)

    def _fault_slow(self, victim: Peer | None) -> None:
        assert victim is not None
        self.counts["slows"] += 1
        dur = self.rng.uniform(1.0, 3.0)
        self.say(f"slow {victim.member} for {dur:.1f}s")
        t = threading.Thread(target=self._duty_cycle, args=(victim, dur), name="stress-slow",
                             daemon=True)  # fmt: skip
        self.slow_threads = [s for s in self.slow_threads if s.is_alive()] + [t]
        t.start()

    def _duty_cycle(self, peer: Peer, dur: float) -> None:
        """SIGSTOP the daemon 50 ms of every 200 ms. It continues only a stop of its
        own, and never one a ``stop`` fault took over meanwhile (status "stopped": that
        fault's timer continues it); ``sig_lock`` orders the two."""
        end = time.monotonic() + dur
        held = False

        def release() -> None:
            nonlocal held
            with self.sig_lock:
                if held and peer.status != "stopped":
                    peer.signal(signal.SIGCONT, trainer=False)
                held = False

        try:
            while time.monotonic() < end and not self.stop_slow.is_set():
                with self.sig_lock:
                    if peer.status != "running":
                        return
                    peer.signal(signal.SIGSTOP, trainer=False)
                    held = True
                self.stop_slow.wait(0.05)
                release()
                self.stop_slow.wait(0.15)
        finally:
            release()

    def _fault_net(self, victim: Peer | None) -> None:
        assert victim is not None
        self.counts["nets"] += 1
        dur = self.rng.uniform(0.3, 2.0)
        self.say(f"partition {victim.member} for {dur:.1f}s")
        self.cl.set_link(victim, False)
        self.check.unavailable.add(victim.member)

        def heal() -> None:
            self.cl.set_link(victim, True)
            self.check.unavailable.discard(victim.member)

        self.at(dur, "heal", heal)

    # ------------------------------------------------------------------ the end
    def finish(self, deadline: float) -> None:
        """Fire pending timers early (heal, continue, restart), stop every trainer at
        a step boundary, wait for them (bounded), then the cluster stops the rest."""
        self.stop_slow.set()
        for t in self.slow_threads:
            t.join(2.0)
        for _, what, fn in sorted(self.timers, key=lambda x: x[0]):
            if what in ("cont", "heal", "coordinator"):
                fn()
        self.timers.clear()
        self.stopping = True
        for p in list(self.cl.peers.values()):
            if p.status not in ("running", "stopped"):  # no trainer: it would block the rest
                self.retire(p, kill=False)
        last = self.check.max_step + 2  # every member stops at the same boundary
        for p in self.cl.peers.values():
            p.signal(signal.SIGCONT)
            self.cl.set_link(p, True)
            self.cl.send(p, ("stop", last))
        t_stop = time.monotonic()
        n_first: int | None = None  # trainers told to stop
        n_left, t_change = -1, t_stop
        while time.monotonic() < deadline:
            now = time.monotonic()
            waiting = [p for p in self.cl.peers.values()
                       if p.trainer is not None and p.conn is not None and not p.conn.closed]  # fmt: skip
            if not waiting:
                break
            if n_first is None:
                n_first = len(waiting)
            if len(waiting) != n_left:
                n_left, t_change = len(waiting), now
            elif len(waiting) < n_first and now - t_change > _STOP_STRAGGLER_S:
                # the rest stopped at the boundary; these are caught in a view change
                # (e.g. a late joiner's state exchange) that needs members who are gone:
                # it is shut down (SIGKILL: a SIGTERMed daemon would drain that very call
                # first), so the run ends now instead of at the call's deadline. Waiting
                # on the stopped members is no hang; a call silent for hang_s already
                # (begun long before the stop) is
                for p in waiting:
                    silent = now - p.t_last
                    if silent >= self.cfg.hang_s:
                        self.check.hangs += 1
                        self.check.note(f"hang: {p.member} silent for {silent:.1f}s at the "
                                        f"stop, still in a step after the others stopped")  # fmt: skip
                    self.say(f"{p.member} still in a step after the others stopped: killing it")
                    self.retire(p, kill=True)
                n_left = -1
                continue
            for p in waiting:  # the churn phase's watchdogs go on to the end
                if now - p.t_last > self.silent_limit(p):
                    self.check.hangs += 1
                    self.check.note(f"hang: trainer {p.member} silent for "
                                    f"{now - p.t_last:.1f}s while the run stopped")  # fmt: skip
                    self.retire(p, kill=True)
            # a stall while every trainer still steps (once some stopped at the
            # boundary the others cannot commit without them: no stall)
            self.check.stalled(now, len(waiting) if len(waiting) == n_first else 0)
            self.pump(0.1)
            self.poll_coordinator(time.monotonic())
        patient = time.monotonic() - t_stop >= self.cfg.hang_s
        for p in self.cl.peers.values():
            if p.conn is not None and not p.conn.closed:
                if patient:  # hang_s and more to reach a boundary 2 steps away: a hang
                    self.check.hangs += 1
                    self.check.note(f"hang: {p.member}'s trainer did not stop within "
                                    f"{time.monotonic() - t_stop:.1f}s")  # fmt: skip
                else:
                    self.check.note(f"{p.member}'s trainer did not stop in time")
        self.t_finished = time.monotonic()


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """While the harness tears down, a second SIGTERM or Ctrl-C is ignored: it would
    cut the teardown short and leave processes, network namespaces and forwarding
    rules behind (the teardown is bounded: every wait in it has a deadline)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_stress(cfg: StressConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one stress session; returns the result row (see the module docstring)."""
    t0 = time.monotonic()
    bar = _Progress(cfg.duration, enabled=progress)
    threads_before = {t.ident for t in threading.enumerate() if t.ident is not None}
    sockets_before = socket_fds()
    faults = list(cfg.faults)
    row: dict[str, Any] = {"seed": cfg.seed, "peers": cfg.peers, "duration_s": cfg.duration}
    netns = False
    if "net" in faults:
        why = netns_unavailable()
        if why is None:
            netns = True
        else:
            bar.say(f"net faults skipped: {why}")
            row["net_skipped"] = why
            faults.remove("net")
    # every deadline of the system under test below the harness's patience: a snapshot
    # generation that cannot seal is abandoned, and a commit round missing votes is
    # decided "not committed" (clean failures), before the trainer's wait ends at
    # hang_s (which the checker counts as a hang). The defaults -- seal 300 s, commit
    # 30 s -- made one CI run's seal under 22 kills in 90 s and the soaks' commits
    # during eviction storms "hangs" of exactly hang_s.
    cl: Cluster | None = None
    run: _Run | None = None
    events: TextIO | None = None
    hard_end = t0 + cfg.duration + 150.0
    t_churn = t_end = float("inf")
    # everything from the first namespace on is inside the try: a Ctrl-C (or an error)
    # at any point still tears the cluster down (namespaces, bridge, forwarding rules)
    try:
        cl = Cluster(
            heartbeat_timeout=cfg.heartbeat_timeout,
            netns=netns,
            log_level=cfg.log_level,
            seal_timeout=cfg.hang_s / 2,
            commit_timeout=cfg.hang_s / 2,
        )
        if cl.net_skipped is not None:  # the namespaces could not reach each other: the cause
            bar.say(f"net faults skipped: {cl.net_skipped}")
            row["net_skipped"] = cl.net_skipped
            faults.remove("net")
        elif cl.bridge is not None and cl.bridge.rules:
            bar.say(f"opened forwarding for the stress bridge: {'; '.join(cl.bridge.rules)}")
        events = log = open(cl.dir / "events.log", "a", buffering=1)  # noqa: SIM115

        def say(msg: str) -> None:
            """Progress on stderr; with wall-clock and monotonic times in events.log, so
            faults line up with the daemons' logs and the trainers' failures.log."""
            bar.say(msg)
            with contextlib.suppress(OSError, ValueError):
                wall = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                log.write(f"{wall}.{int(time.time() * 1000) % 1000:03d}Z "
                          f"{time.monotonic():.3f} {msg}\n")  # fmt: skip

        run = _Run(StressConfig(**{**cfg.__dict__, "faults": tuple(faults)}), cl, say)
        say(f"stress seed={cfg.seed} peers={cfg.peers} faults={','.join(faults)} dir={cl.dir}")
        cl.start_coordinator()
        for _ in range(cfg.peers):
            run.start_peer()
        while time.monotonic() < t0 + cfg.startup_timeout:  # every founder in and stepping
            run.pump(0.05)
            run.advance()
            if len(run.live()) == cfg.peers and run.check.steps_committed >= cfg.peers:
                break
        else:
            raise RuntimeError(f"the founding peers did not start within {cfg.startup_timeout}s")
        run.founding = False
        t_churn = time.monotonic()
        t_end = t_churn + cfg.duration
        say(f"started in {t_churn - t0:.1f}s; churn for {cfg.duration:.0f}s")
        next_fault = t_churn + run.next_gap()
        while time.monotonic() < t_end:
            run.pump(0.05)
            run.advance()
            now = time.monotonic()
            if now >= next_fault:
                run.inject()
                next_fault = now + run.next_gap()
            run.check.stalled(now, len(run.live()))  # a stall is a hang as it happens
            bar.show(now - t_churn, run)
        run.finish(min(hard_end, time.monotonic() + cfg.hang_s + 10.0))
    except RuntimeError as exc:
        if run is None:
            raise
        run.check.note(f"harness: {exc}")
        row["error"] = str(exc)
    except (KeyboardInterrupt, SystemExit) as exc:  # SIGINT/SIGTERM: still report
        if run is None:
            raise
        row["error"] = f"interrupted ({type(exc).__name__})"
    finally:
        with _stop_signals_ignored():
            try:
                if run is not None:
                    run.stopping = True
                    run.stop_slow.set()
                    for t in run.slow_threads:
                        t.join(2.0)
            finally:
                try:
                    if cl is not None:
                        cl.close()
                finally:
                    if run is not None and run.failures is not None:
                        run.failures.close()
                    if events is not None:
                        events.close()
    assert cl is not None and run is not None
    run.take_crashes()  # daemons and coordinators that did not stop cleanly at the end
    bar.done()
    row.update(_summary(run))
    # faults pending when the trainers stopped (the stop commits two more steps, which
    # resolve them), not when the churn ended: a fault in its last hang_s counts too
    t_last = run.t_finished if run.t_finished is not None else min(time.monotonic(), t_end)
    unresolved = run.check.unresolved(t_last, cfg.hang_s)
    if unresolved:  # the group never committed a step after these faults
        row["hangs"] += len(unresolved)
        row["details"] = row.get("details", []) + [
            f"no step committed after {u}" for u in unresolved
        ]
    left = leaks(cl.dir, threads_before, sockets_before)
    row["leaks"] = left
    if "snapshot" not in dir(_client_class()):
        row["snapshots_sealed"] = None
        row["restores_ok"] = None
    failed = (row["wrong_results"] or row["hangs"] or row["lost_snapshots"] or row["crashes"]
              or left or "error" in row)  # fmt: skip
    row["ok"] = not failed
    row["wall_s"] = round(time.monotonic() - t0, 1)
    if failed or cfg.keep_dir:
        row["dir"] = str(cl.dir)
    else:
        cl.remove_dir()
    return row


def _client_class() -> type:
    from phalanx.client import Client

    return Client


def _summary(run: _Run) -> dict[str, Any]:
    c = run.check
    out: dict[str, Any] = {
        "ops": c.ops,
        "ops_ok": c.ops_ok,
        "ops_failed_clean": c.ops_failed_clean,
        "retried_attempts": c.retried_attempts,
        "wrong_results": c.wrong_results,
        "hangs": c.hangs,
        **{k: v for k, v in run.counts.items()},
        "snapshots_sealed": c.snapshots_sealed,
        "snapshot_failures_clean": c.snapshot_failures,
        "restores_ok": c.restores_ok,
        "lost_snapshots": c.lost_snapshots,
        "lost_beyond_m": c.lost_beyond_m,
        "lost_by_old_rule": c.lost_by_old_rule,
        "max_resume_s": round(c.max_resume_s, 3),
        "max_resume_s_by_fault": {k: round(v, 3) for k, v in sorted(c.resume_by_fault.items())},
        "steps_committed": c.steps_committed,
        "steps_failed_clean": c.steps_failed_clean,
        "commit_unknown": c.commit_unknown,
        "state_syncs": c.state_syncs,
        "crashes": c.crashes,
        "evictions": c.evictions,
        "max_rejoin_s": round(c.max_rejoin_s, 3),
        "state_lost": c.state_lost,
        "stalls": c.stalls,
        "longest_stall_s": round(c.longest_stall_s, 1),
        # why calls failed (clean failures by reason, most frequent first; the lines
        # themselves are in failures.log in the run's directory)
        "failure_reasons": dict(c.failure_reasons.most_common(_MAX_REASONS)),
    }
    if c.details:
        out["details"] = list(c.details)
    if c.beyond_m_details:  # which holders could not be read, for each restore beyond m
        out["beyond_m_details"] = c.beyond_m_details[:_MAX_REASONS]
    return out


class _Progress:
    """A one-line progress bar on stderr (a plain line every 10 s when not a tty)."""

    def __init__(self, total: float, *, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.drawn = False

    def say(self, msg: str) -> None:
        if self.enabled:
            self._clear()
            sys.stderr.write(f"stress: {msg}\n")
            sys.stderr.flush()

    def show(self, elapsed: float, run: _Run) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        c = run.check
        frac = min(1.0, elapsed / self.total)
        bar = "#" * int(frac * 30)
        quiet = c.since_commit(now)
        since = "-" if quiet is None else f"{quiet:.0f}s"
        line = (f"[{bar:<30}] {elapsed:5.0f}/{self.total:.0f}s live={len(run.live())} "
                f"ops={c.ops} steps={c.steps_committed} last_commit={since} "
                f"faults={sum(run.counts.values())} wrong={c.wrong_results} hangs={c.hangs}")  # fmt: skip
        if self.tty:
            sys.stderr.write("\r" + line[:150])
            self.drawn = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            self.drawn = False

    def done(self) -> None:
        if self.enabled:
            self._clear()


def _parse_churn(text: str) -> tuple[float, float]:
    try:
        lo, _, hi = text.removesuffix("s").partition("-")
        return float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--churn wants LO-HI seconds (e.g. 0.5-2s), got {text!r}"
        ) from None


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``phalanx stress``'s options to ``parser``; return the function that runs it."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--peers", type=int, default=4, help="founding peers (default 4)")
    a("--duration", type=float, default=60.0, help="seconds of churn (default 60)")
    a("--seed", type=int, default=None, help="fault schedule seed (default: random, printed)")
    a("--faults", default=",".join(FAULTS), help=f"comma list (default {','.join(FAULTS)})")
    a(
        "--churn",
        type=_parse_churn,
        default=(0.5, 2.0),
        help="LO-HI seconds between faults (0.5-2s)",
    )
    a("--hang-s", type=float, default=20.0, help="a call running this long is a hang (20)")
    a("--heartbeat-timeout", type=float, default=None, help="coordinator's (default 0.6)")
    a("--snapshot-every", type=int, default=5, help="steps between snapshots (when available)")
    a("--keep-dir", action="store_true", help="keep the run's directory (logs) even when green")
    a("--json", action="store_true", help="one JSON line on stdout (else key=value)")
    a("--quiet", action="store_true", help="no progress on stderr")

    def run(args: argparse.Namespace) -> int:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        try:
            cfg = StressConfig(
                peers=args.peers, duration=args.duration, seed=seed,
                faults=tuple(f for f in args.faults.split(",") if f), churn=args.churn,
                hang_s=args.hang_s, heartbeat_timeout=args.heartbeat_timeout,
                snapshot_every=args.snapshot_every, log_level=args.log_level or "WARNING",
                keep_dir=args.keep_dir,
            )  # fmt: skip
        except ValueError as exc:
            parser.error(str(exc))
        if not args.quiet:
            sys.stderr.write(f"phalanx stress: seed {seed}\n")
        row = run_stress(cfg, progress=not args.quiet)
        if args.json:
            print(json.dumps(row, sort_keys=False))
        else:
            print(" ".join(f"{k}={v}" for k, v in row.items()))
        sys.stdout.flush()
        return 0 if row["ok"] else 1

    return run

"""``phalanx daemon``: one per training process; wires membership, data plane, monitor, local API.

:class:`Daemon` is the engine shared by the command line and embedded mode
(:func:`phalanx.start`): an :class:`~phalanx.membership.elastic.ElasticGroup`
(membership agent + per-view data-plane groups + state sync + the step lifecycle, with
``auto_rejoin``) whose groups report to a :class:`~phalanx.monitor.Monitor` (/metrics,
/healthz, /anomalies), and the local API (:class:`~phalanx.local.server.LocalServer`)
that the training process talks to.

Wiring: every data-plane group is built with ``monitor.observer`` (deferred to a thread
of its own) and handed to ``monitor.attach(engine)``; every new view goes to
``monitor.set_view``, to the snapshot service (``on_view``: placement and repair) and,
as an EVENT, to clients that watch views.

Snapshots (issue 5): a :class:`~phalanx.checkpoint.MemoryShardStore` (``snapshot.
budget_bytes``) holds peers' shards and is served by a
:class:`~phalanx.checkpoint.tcp.ShardServer` whose address is advertised as the
member's **second** address (the data plane uses only the first); a
:class:`~phalanx.checkpoint.tcp.TcpShardChannel` resolves a member id to the second
address of that member in the current view; the
:class:`~phalanx.checkpoint.SnapshotService` reports to the monitor's snapshot metrics
through :class:`SnapshotMetrics`. It lives as long as the daemon, so a training process
that was SIGKILLed and restarted restores from it.

Stop (SIGTERM/SIGINT, or :meth:`Daemon.stop`): stop accepting clients, let the request
in flight finish (``drain_timeout``), leave the group (the others get a view without
us at once), close the snapshot service, the shard server and the shard channel (in
that order), close the local connections, join every thread, exit 0. A signal while
:meth:`Daemon.start` is still joining (an absent coordinator keeps it retrying for
``join_timeout``) cancels the start (:meth:`Daemon.cancel_start` closes the agent, so
the join ends at once), and the process exits 0 as well.

Secure by default: ``run`` refuses to start without a secret file unless
``--insecure``. With ``--insecure`` the data plane (which always authenticates) uses a
fixed, public secret: anyone who can reach the ports can join. This module must never
print outside :func:`run` nor hold logic the embeddable :class:`Daemon` lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import socket as _socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from phalanx.checkpoint._crc import crc32_backend
from phalanx.checkpoint.erasure import backend_summary
from phalanx.checkpoint.snapshot import SnapshotConfig, SnapshotObserver, SnapshotService
from phalanx.checkpoint.store import MemoryShardStore
from phalanx.checkpoint.tcp import ShardServer, TcpShardChannel
from phalanx.comm.observer import CommObserver, OpSample
from phalanx.config import PhalanxConfig, load_config
from phalanx.deadline import Deadline
from phalanx.errors import ConfigError, PhalanxError, SnapshotError
from phalanx.local.server import LocalServer
from phalanx.membership.config import INSECURE_SECRET
from phalanx.membership.elastic import ElasticGroup
from phalanx.membership.statesync import SyncReport, SyncState
from phalanx.membership.view import View
from phalanx.monitor import Monitor
from phalanx.monitor.metrics import Metrics

__all__ = [
    "INSECURE_SECRET",
    "Daemon",
    "SnapshotMetrics",
    "StartCancelled",
    "read_secret",
    "register",
    "run",
]

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.daemon")


def read_secret(cfg: PhalanxConfig) -> bytes:
    """The cluster secret from ``cfg.secret_file``; the public one under ``insecure``."""
    if not cfg.secret_file:
        if cfg.insecure:
            return INSECURE_SECRET
        raise ConfigError(
            "no cluster secret: pass --secret-file F (or set PHALANX_SECRET_FILE), "
            "or --insecure to run without authentication"
        )
    path = Path(cfg.secret_file)
    try:
        raw = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc}") from None
    if len(raw) < 16:
        raise ConfigError(f"secret in {path} is shorter than 16 bytes")
    return raw


#: the observer thread gathers finished-op samples this long before it feeds them
_OBSERVE_BATCH_S = 0.02


class _DeferredObserver:
    """Hands finished-op samples to the monitor on a thread of its own, in batches.

    The engine completes an op's future before it reports the sample, and here it only
    enqueues it: the monitor's work never sits in a collective's latency. The thread
    wakes on the first sample, waits ``_OBSERVE_BATCH_S`` (the reply leaves and the
    client's next op starts meanwhile) and feeds every sample queued by then in one
    call (``feed``: the monitor sums the counters and sets its gauges once per batch):
    one wake-up and one gauge update per batch, not per op. On a machine whose cores
    the ranks keep busy, the monitor's Python is CPU the ops do not get.
    ``op_started`` (two gauge updates) is passed through: hang checks need it at once.
    """

    def __init__(self, inner: CommObserver, feed: Callable[[Sequence[OpSample]], None]) -> None:
        self._inner = inner
        self._feed = feed
        self._q: queue.SimpleQueue[OpSample | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="phalanx-observe", daemon=True)
        self._thread.start()

    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        self._inner.op_started(op, seq, epoch, nbytes)

    def op_finished(self, sample: OpSample) -> None:
        self._q.put(sample)

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            if batch[0] is not None:
                time.sleep(_OBSERVE_BATCH_S)  # the op's reply leaves first; more samples come
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._q.get_nowait())
            stop = None in batch
            samples = [s for s in batch if s is not None]
            try:
                self._feed(samples)
            except Exception:
                log.exception("event=observer_error ops=%d", len(samples))
            if stop:
                return

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)


class SnapshotMetrics(SnapshotObserver):
    """The snapshot service's reports -> the monitor's ``phalanx_snapshot_*`` metrics.

    Held bytes = the service's own buffers + the shards held for peers; the service
    reports the sum when its own buffers change, the store (``on_store_change``) when
    a peer's shard arrives or goes, so the gauge follows both."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._own = 0
        self._store_used = 0

    def on_stall(self, seconds: float) -> None:
        self._m.snapshot_stall.observe(seconds)

    def on_seal(self, seconds: float, outcome: str) -> None:
        self._m.snapshot_seals.labels(outcome).inc()
        if outcome == "committed":
            self._m.snapshot_seal.observe(seconds)
            self._m.snapshot_last_sealed.set(time.time())

    def on_held_bytes(self, nbytes: int) -> None:
        self._own = max(0, nbytes - self._store_used)
        self._m.snapshot_held.set(nbytes)

    def on_store_change(self, used: int) -> None:
        self._store_used = used
        self._m.snapshot_held.set(self._own + used)

    def on_underprotected(self, generations: int) -> None:
        self._m.snapshot_underprotected.set(generations)


class StartCancelled(PhalanxError):
    """:meth:`Daemon.start` gave up because :meth:`Daemon.cancel_start` was called."""


class Daemon:
    """The daemon's parts, started and stopped in order (see the module docstring)."""

    def __init__(self, config: PhalanxConfig, secret: bytes) -> None:
        if not config.coordinator:
            raise ConfigError("the daemon needs --coordinator HOST:PORT")
        self.config = config
        self._secret = secret
        self.member_id = config.id or f"{_socket.gethostname()}-{os.getpid()}"
        self.socket_path = config.socket_path
        self.monitor = Monitor(
            0,
            config=config.monitor,
            on_evict=self._evict if config.monitor.evict_stragglers else None,
        )
        obs = self.monitor.observer
        self._observer = _DeferredObserver(obs, obs.ops_finished)
        self.metrics_address: tuple[str, int] | None = None
        self.group: ElasticGroup | None = None
        self.server: LocalServer | None = None
        self.snapshots: SnapshotService | None = None
        self.erasure_backend = "numpy"  # set at start(): what snapshots encode with
        self.shard_server: ShardServer | None = None
        self._shard_channel: TcpShardChannel | None = None
        self._store: MemoryShardStore | None = None
        self._snapshot_metrics = SnapshotMetrics(self.monitor.metrics)
        self._stopped = False
        self._started = False  # start() returned: cancel_start() no longer applies
        self._cancelled = False  # cancel_start() came first: start() gives up
        self._lock = threading.Lock()

    def _evict(self, peer_rank: int, detail: str) -> None:
        """The monitor's opt-in eviction policy: report a persistent straggler to the
        coordinator (on a short thread: the monitor must never wait on an RPC)."""
        group = self.group
        if group is None:
            return
        view = group.view
        if not 0 <= peer_rank < view.size:
            return
        member = view.members[peer_rank].id
        if member == self.member_id:
            return

        def report() -> None:
            try:
                group.agent.report_failure(
                    [member], view.epoch, f"straggler: {detail}", timeout=2.0
                )
            except Exception:  # a failed report only means no eviction
                log.exception("event=evict-report-failed member=%s", member)

        threading.Thread(target=report, name="phalanx-evict", daemon=True).start()

    def _recover_state(self, state: SyncState, deadline: Deadline) -> SyncReport | None:
        """The group lost its training state (every member that held it is gone): fill
        the client's attached arrays from the newest sealed snapshot generation this
        member or the live holders can rebuild (any owner's: the members of a
        data-parallel group snapshot the same state). None when nothing fits."""
        svc, group = self.snapshots, self.group
        if svc is None or group is None:
            return None
        layout = {n: (a.dtype, a.shape) for n, a in state.arrays.items()}

        def fits(_step: int, candidate: dict[str, Any]) -> bool:
            return set(candidate) == set(layout) and all(
                isinstance(v, np.ndarray) and (v.dtype, v.shape) == layout[n]
                for n, v in candidate.items()
            )

        t0 = time.monotonic()
        try:
            owner, step, found = svc.restore_newest(timeout=max(0.1, deadline.left()), accept=fits)
        except SnapshotError as exc:
            audit.warning(
                "event=state_lost member=%s recovered=false why=%r", self.member_id, str(exc)
            )
            return None
        nbytes = 0
        for name, arr in found.items():
            np.copyto(state.arrays[name], arr)
            nbytes += arr.nbytes
        state.update(step)
        state.valid = True
        seconds = time.monotonic() - t0
        audit.warning(
            "event=state_recovered member=%s step=%d from_snapshot_of=%s bytes=%d seconds=%.3f",
            self.member_id, step, owner, nbytes, seconds,
        )  # fmt: skip
        return SyncReport(group.view.epoch, None, (), True, step, nbytes, seconds)

    def _on_view(self, view: View) -> None:
        rank = view.rank(self.member_id) if self.member_id in view else 0
        self.monitor.set_view(view.epoch, list(range(view.size)), rank)
        svc = self.snapshots
        if svc is not None:
            svc.on_view(view)
        server = self.server
        if server is not None:
            server.publish(view)

    def _shard_address(self, member_id: str) -> str | None:
        """Where ``member_id`` serves shards: its second address in the current view."""
        group = self.group
        if group is None:
            return None
        for m in group.view.members:
            if m.id == member_id:
                return m.addresses[1] if len(m.addresses) > 1 else None
        return None

    def _start_snapshots(self) -> tuple[str, ...]:
        """The shard store, server and channel; returns the address to advertise."""
        sc = self.config.snapshot
        store = MemoryShardStore(sc.budget_bytes, on_change=self._snapshot_metrics.on_store_change)
        host = self.config.listen.rpartition(":")[0] or "127.0.0.1"
        max_message = max(sc.shard_bytes + (1 << 20), 64 << 20)
        self.shard_server = ShardServer(
            store,
            secret=self._secret,
            address=sc.listen or f"{host}:0",
            max_message=max_message,
            io_timeout=sc.call_timeout,
            io_nice=sc.io_nice,
        )
        self._shard_channel = TcpShardChannel(
            secret=self._secret, addresses=self._shard_address, max_message=max_message
        )
        self._store = store
        return (self.shard_server.address,)

    def _snapshot_service(self) -> SnapshotService:
        sc = self.config.snapshot
        assert self._shard_channel is not None
        return SnapshotService(
            self.member_id,
            self._shard_channel,
            self._store,
            peers=(),
            config=SnapshotConfig(
                k=sc.k or None,
                m=sc.m if sc.k else None,
                shard_bytes=sc.shard_bytes,
                call_timeout_s=sc.call_timeout,
                seal_timeout_s=sc.seal_timeout,
                snapshot_dir=sc.snapshot_dir or None,
                disk_every=sc.disk_every,
                io_nice=sc.io_nice,
            ),
            observer=self._snapshot_metrics,
        )

    def cancel_start(self) -> bool:
        """Make a :meth:`start` in progress give up soon, from any thread (SIGTERM while
        the daemon is still joining: the join may wait ``join_timeout`` for an absent
        coordinator). Closes the membership agent, which ends the join's retries and
        waits at once; ``start`` then stops what it started and raises
        :class:`StartCancelled` (or the join's own error). False, and nothing done,
        once ``start`` has returned: stop a running daemon with :meth:`stop`."""
        with self._lock:
            if self._started:
                return False
            self._cancelled = True
            group = self.group
        if group is not None:
            group.agent.close()  # idempotent; stop() closes the rest
        return True

    def _check_cancelled(self) -> None:
        with self._lock:
            if self._cancelled:
                raise StartCancelled(f"{self.member_id}: start-up cancelled")

    def start(self) -> None:
        """Serve the local API, join the group, serve /metrics. Raises on failure
        (everything started so far is stopped); :class:`StartCancelled` after
        :meth:`cancel_start`."""
        cfg = self.config
        # before any gRPC or worker thread runs: loading the erasure backend may start a
        # child process (a fork beside gRPC's threads can break gRPC's poller)
        erasure, erasure_detail = backend_summary()
        try:
            self._check_cancelled()
            advertise = self._start_snapshots()
            group = ElasticGroup(
                cfg.coordinator,
                self.member_id,
                self._secret,
                listen=cfg.listen,
                incarnation=cfg.incarnation or time.time_ns() // 1_000_000,
                zone=cfg.zone,
                state=SyncState.empty(),
                config=cfg.membership,
                options=cfg.comm,
                build_timeout=cfg.build_timeout,
                join_timeout=cfg.join_timeout,
                on_view=self._on_view,
                observer=self._observer,
                on_engine=self.monitor.attach,
                advertise=advertise,
                auto_rejoin=True,
            )
            with self._lock:  # from here on cancel_start() closes its agent
                self.group = group
            self._check_cancelled()
            # heartbeats -> phalanx_heartbeat_last_{sent,ack}_timestamp_seconds
            self.group.agent.on_heartbeat = self.monitor.metrics.heartbeat
            self.group.recover_state = self._recover_state
            self.group.on_state_sync = self.monitor.metrics.state_sync
            self.monitor.metrics.follow_sync_failures(lambda: group.sync_failures_in_row)
            self.snapshots = self._snapshot_service()
            self.server = LocalServer(
                self.socket_path,
                self.group,
                max_client_shm_bytes=cfg.max_client_shm_bytes,
                op_timeout=cfg.op_timeout,
                join_timeout=cfg.join_timeout,
                snapshots=self.snapshots,
                seal_timeout=cfg.snapshot.seal_timeout,
            )
            self.monitor.start()
            if cfg.metrics_port >= 0:
                self.metrics_address = self.monitor.serve(cfg.metrics_host, cfg.metrics_port)
            self.group.join(cfg.join_timeout)
            with self._lock:
                cancelled, self._started = self._cancelled, not self._cancelled
            if cancelled:  # the join may have succeeded just before its agent closed
                raise StartCancelled(f"{self.member_id}: start-up cancelled")
            self.snapshots.on_view(self.group.view)
        except BaseException as exc:
            with self._lock:
                cancelled = self._cancelled
            self.stop(leave=False)
            if cancelled and not isinstance(exc, StartCancelled):
                # the join's own error (its agent was closed under it): say why
                raise StartCancelled(f"{self.member_id}: start-up cancelled ({exc})") from exc
            raise
        self.erasure_backend = erasure
        # a member removed while its join waited is started all the same and comes
        # back by the rejoin policy: its presence says so (the view is one without it).
        # Presence first: a view read after it is never older than the presence says
        presence, view = self.group.presence.value, self.group.view
        audit.info(
            "event=daemon_started member=%s presence=%s epoch=%d members=%s socket=%s "
            "data=%s metrics=%s erasure=%s erasure_detail=%r checksum=%r",
            self.member_id,
            presence,
            view.epoch,
            ",".join(view.ids),
            self.socket_path,
            self.group.address,
            _hostport(self.metrics_address),
            erasure,
            erasure_detail,
            crc32_backend(),
        )

    def _stop_snapshots(self) -> None:
        # the service (abandons an unsealed generation, joins its threads), then the
        # server (peers lose the shards held here), then the channel
        if self.snapshots is not None:
            try:
                self.snapshots.close()
            except Exception:
                log.exception("event=snapshot_close_failed")
        if self.shard_server is not None:
            self.shard_server.close()
        if self._shard_channel is not None:
            self._shard_channel.close()

    def stop(self, *, leave: bool = True, drain_timeout: float | None = None) -> None:
        """Drain, leave the group (``leave``), close everything, join every thread.
        Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        t0 = time.monotonic()
        drain = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if self.server is not None:
            self.server.stop_accepting()
        drained = self.server.drain(drain) if self.server is not None else True
        if self.group is not None:
            if leave:
                try:
                    self.group.leave(reason="shutdown")
                except PhalanxError as exc:
                    log.warning("event=leave_failed error=%r", str(exc))
            self.group.close()
        self._stop_snapshots()
        if self.server is not None:
            self.server.release()
            self.server.close()
        self._observer.close()
        self.monitor.close()
        audit.info(
            "event=daemon_stopped member=%s left=%s drained=%s stop_s=%.3f",
            self.member_id,
            leave,
            drained,
            time.monotonic() - t0,
        )


def _hostport(addr: tuple[str, int] | None) -> str:
    return f"{addr[0]}:{addr[1]}" if addr is not None else "off"


# ----------------------------------------------------------------------------- CLI


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``phalanx daemon``'s options; return the function that runs it."""
    parser.description = (
        "One per training process: joins the group, runs collectives for the local "
        "training process (Unix socket + shared memory), serves /metrics."
    )
    a = parser.add_argument
    a("--coordinator", metavar="HOST:PORT", help="the membership coordinator")
    a("--listen", metavar="HOST:PORT", help="data-plane address (default 127.0.0.1:0)")
    a("--metrics-port", type=int, metavar="P", help="/metrics port (0 any, -1 off)")
    a("--metrics-host", metavar="HOST", help="/metrics address (default 127.0.0.1)")
    a("--secret-file", metavar="F", help="file holding the cluster secret (>= 16 bytes)")
    a("--id", metavar="ID", help="member id (default HOSTNAME-PID); also names the socket")
    a("--zone", metavar="Z", help="failure zone label")
    a(
        "--socket",
        metavar="PATH",
        help="local API socket (default: $XDG_RUNTIME_DIR/phalanx/ID.sock, else "
        "/tmp/phalanx-UID/ID.sock; daemon.sock without --id); clients find it with "
        "phalanx.connect(member_id=ID) or PHALANX_ID=ID",
    )
    a("--config", metavar="FILE.toml", help="settings file (flags > PHALANX_* env > file)")
    a("--incarnation", type=int, metavar="N",
      help="bump when restarting under one id (0: the wall clock in ms)")  # fmt: skip
    a("--snapshot-dir", metavar="DIR", help="disk tier for this member's sealed snapshots")
    a("--snapshot-budget", type=int, metavar="BYTES", help="bytes of peers' shards to hold")
    a("--insecure", action="store_true", default=None, help="run without a secret (tests)")
    parser.set_defaults(default_log_level="INFO")
    return run


#: how long gRPC's blocking waits sleep between looks in a daemon (gRPC's own: 0.1 s)
GRPC_WAIT_SLICE_S = 1.0


def quiet_grpc_waits(slice_s: float = GRPC_WAIT_SLICE_S) -> bool:
    """Let gRPC's blocking waits in this process sleep ``slice_s`` between looks.

    grpcio's synchronous API never blocks in one wait: every thread waiting on a call
    (a stream's next response, a send's completion) wakes each
    ``grpc._common.MAXIMUM_WAIT_TIMEOUT`` (0.1 s) to look again, so that a *main*
    thread blocked in gRPC still runs its signal handlers (grpc/grpc#19464). What
    ends a wait -- a message, a cancel, the call's end, its deadline -- notifies the
    condition, so the slice changes only how often a thread looks for nothing: a
    waited-for deadline still ends the wait on time. A daemon's main thread waits on
    its own event, never in gRPC, and its agent keeps two streams open for good
    (heartbeats, the view watch), each with a thread parked on the next response:
    measured, an idle daemon spent 10.8-11.0 ms of CPU a second at 0.1 s and 8.0-8.1
    at 1 s (two daemons, 15 s, ``schedstat``). Only the daemon's own process is
    tuned (an embedding program keeps gRPC's default). Returns False, changing
    nothing, where this grpcio has no such setting (the name is gRPC's, not a public
    API: a release without it costs only the wake-ups).
    """
    try:
        from grpc import _common
    except ImportError:  # pragma: no cover - another grpcio layout
        return False
    current = getattr(_common, "MAXIMUM_WAIT_TIMEOUT", None)
    if not isinstance(current, float | int):
        return False
    _common.MAXIMUM_WAIT_TIMEOUT = float(slice_s)
    return True


_FLAGS = ("coordinator", "listen", "metrics_port", "metrics_host", "secret_file", "id",
          "zone", "socket", "incarnation", "insecure")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT: 0 after a clean stop (a signal during start-up too:
    the join is given up at once), 1 if it could not start, 2 on a configuration
    error."""
    flags: dict[str, Any] = {k: getattr(args, k, None) for k in _FLAGS}
    snap = {"snapshot_dir": getattr(args, "snapshot_dir", None),
            "budget_bytes": getattr(args, "snapshot_budget", None)}  # fmt: skip
    if any(v is not None for v in snap.values()):
        flags["snapshot"] = {k: v for k, v in snap.items() if v is not None}
    try:
        cfg = load_config(flags, file=args.config)
        secret = read_secret(cfg)
        daemon = Daemon(cfg, secret)
    except ConfigError as exc:
        sys.stderr.write(f"phalanx daemon: {exc}\n")
        return 2
    # the daemon process is ours to tune (see config); validated there: finite, > 0
    sys.setswitchinterval(cfg.switch_interval_s)
    done = threading.Event()
    cancellers: list[threading.Thread] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not done.is_set():
            done.set()
            # a start-up still joining gives up at once (off the signal handler: it
            # closes the agent, which takes locks the interrupted code may hold)
            t = threading.Thread(target=daemon.cancel_start, name="phalanx-cancel", daemon=True)
            t.start()
            cancellers.append(t)

    # before the configuration is printed: whoever waits for that print may signal
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.stdout.write("phalanx daemon configuration:\n")
        for line in cfg.describe().splitlines():
            sys.stdout.write(f"  {line}\n")
        sys.stdout.flush()
        try:
            daemon.start()
        except (PhalanxError, TimeoutError, OSError) as exc:
            if not done.is_set():
                sys.stderr.write(f"phalanx daemon: could not start: {exc}\n")
                return 1
            # SIGTERM/SIGINT while joining: a clean stop (start() stopped what it began)
            audit.info("event=start_cancelled member=%s why=%r", daemon.member_id, str(exc))
        else:
            assert daemon.group is not None
            metrics = _hostport(daemon.metrics_address)
            shards = daemon.shard_server.address if daemon.shard_server is not None else "off"
            sys.stdout.write(
                f"phalanx daemon ready member={daemon.member_id} socket={daemon.socket_path} "
                f"data={daemon.group.address} shards={shards} metrics={metrics} "
                f"epoch={daemon.group.view.epoch} erasure={daemon.erasure_backend}\n"
            )
            sys.stdout.flush()
            # started (the join's calls are over): from now on gRPC's waits look for
            # signals rarely, which only this main thread would need and it waits here
            quiet_grpc_waits()
            while not done.wait(0.5):
                pass
            daemon.stop(leave=True)
    finally:
        daemon.stop(leave=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in cancellers:
            t.join(5.0)
    sys.stdout.write("phalanx daemon stopped\n")
    sys.stdout.flush()
    return 0

"""The churn harness's processes: a coordinator, daemons, trainers, and optional netns.

:class:`Cluster` starts real processes under one private temporary directory (the
generated cluster secret, 0600; the daemons' Unix sockets; every process's log):
``phalanx coordinator`` and ``phalanx daemon`` as subprocesses, trainers as
multiprocessing *spawn* children with one pipe each. Nothing here blocks on a child:
readiness is polled (:meth:`Peer.daemon_ready` reads the daemon's stdout file), so the
harness's single loop keeps draining events while processes start.

With ``netns=True`` (root and ``ip`` needed) every daemon runs in a network namespace
of its own, joined to a bridge by a veth pair; the coordinator listens on the bridge.
A partition is then ``ip link set <veth> down`` (this kernel has no ``netem``, so no
delay or loss at that layer). :func:`netns_unavailable` says why it cannot be done.

Processes are started through :class:`phalanx.testing.launcher.Launcher` (the one
launcher tests, the demo and the benchmarks share): every child dies with the harness
(``PR_SET_PDEATHSIG``, so a SIGKILLed harness leaves nothing behind) and is signalled
only by PID; :meth:`Cluster.close` SIGCONTs, stops (SIGTERM then
SIGKILL after a grace) and reaps all of them, removes the namespaces, and
:func:`leaks` reports any process, thread or socket left over. This module must never
signal a process it did not start nor wait without a deadline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from phalanx._parent import ENV as _PARENT_ENV
from phalanx.testing._stress_trainer import TrainerArgs, trainer_main
from phalanx.testing.launcher import Launcher, LaunchError, Proc
from phalanx.testing.netns import Bridge, BridgeError, leftover_rules
from phalanx.testing.netns import unavailable as _netns_unavailable

# Every process the harness starts carries RUN_ENV=<harness pid> in its environment.
# PHALANX_PARENT_PID is not enough: phalanx/_parent.py removes it from the environment
# at import, so a daemon's own children never inherit it, and once the daemon is killed
# they are reparented to PID 1 and the parent-chain walk no longer finds the harness.
# Nobody removes this one, and it is not a PHALANX_* name (the daemon's config rejects
# unknown ones: phalanx/config.py _FOREIGN_ENV).
RUN_ENV = "PXSTRESS_RUN"

__all__ = ["Cluster", "Peer", "leaks", "netns_unavailable", "open_fds", "socket_fds"]

_MP = multiprocessing.get_context("spawn")
# a deleted namespace's veth pair goes when the kernel gets round to destroying the
# namespace (asynchronously, later under load): how long the leak scan lets it
_LINK_SETTLE_S = 10.0
# exit statuses of a process that stopped because it was asked to (SIGTERM, or Ctrl-C's
# SIGINT to the whole process group): the default action, or a handler's 128 + signal
_CLEAN_EXITS = frozenset(
    {0, -signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT}
)


def _signal(pid: int | None, sig: int) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def netns_unavailable() -> str | None:
    """None if network namespaces can be used here, else why not."""
    return _netns_unavailable()


@dataclass
class Peer:
    """One member slot: a daemon process and the trainer process talking to it."""

    member: str
    slot: int
    daemon: subprocess.Popen[bytes]
    out: Path
    socket: str
    trainer: BaseProcess | None = None
    conn: Any = None
    status: str = "starting"  # starting | running | stopped | leaving | gone
    t_started: float = field(default_factory=time.monotonic)
    t_last: float = field(default_factory=time.monotonic)
    restore_peer: str | None = None
    netns: str | None = None
    veth: str | None = None
    host: int = 0  # last octet of its address in the namespace (0: loopback)
    killed: bool = False  # the harness SIGKILLed the daemon (any exit status is expected)
    judged: bool = False  # the daemon's exit status was looked at (once)
    trainer_killed: bool = False  # the harness SIGKILLed the current trainer
    trainer_done: bool = False  # the current trainer said "done" (it ended on its own)

    def daemon_crash(self) -> str | None:
        """Once the daemon has exited, the first call says whether that was a crash:
        an exit status other than a clean stop (0, or SIGTERM/SIGINT's) of a daemon the
        harness did not SIGKILL. None while it runs, when expected, or judged already;
        a daemon that never got a trainer (which starts once it is ready) failed to
        join: counted as a join failure, not here."""
        rc = self.daemon.poll()
        if rc is None or self.judged:
            return None
        self.judged = True
        if self.killed or rc in _CLEAN_EXITS or self.trainer is None:
            return None
        return f"daemon {self.member} exited rc={rc}"

    def daemon_ready(self) -> bool:
        try:
            return b"phalanx daemon ready" in self.out.read_bytes()
        except OSError:
            return False

    def pids(self) -> list[int]:
        out = [self.daemon.pid]
        if self.trainer is not None and self.trainer.pid is not None:
            out.append(self.trainer.pid)
        return out

    def signal(self, sig: int, *, trainer: bool = True, daemon: bool = True) -> None:
        if daemon and self.daemon.poll() is None:
            # a daemon that exited before this SIGKILL is judged on its own status
            self.killed |= sig == signal.SIGKILL
            _signal(self.daemon.pid, sig)
        if trainer and sig == signal.SIGKILL:
            self.trainer_killed = True
        if trainer and self.trainer is not None and self.trainer.exitcode is None:
            _signal(self.trainer.pid, sig)


class Cluster:
    """The processes of one stress run (see the module docstring)."""

    def __init__(
        self,
        *,
        heartbeat_timeout: float | None,
        netns: bool,
        log_level: str,
        seal_timeout: float | None = None,
        commit_timeout: float | None = None,
    ) -> None:
        self.launcher = Launcher(prefix="phalanx-stress-", log_level=log_level)
        # the run marker (RUN_ENV): inherited by every coordinator, daemon and their
        # children, so orphans are still recognised as ours (_ours)
        self.launcher.env[RUN_ENV] = str(os.getpid())
        self.dir = self.launcher.dir
        self.secret_file = self.launcher.secret_file
        self.heartbeat_timeout = heartbeat_timeout
        self.commit_timeout = commit_timeout
        self.log_level = log_level
        # daemons give up on a snapshot generation after this long (None: their default)
        self.daemon_env = dict(self.launcher.env)
        if seal_timeout is not None:
            self.daemon_env["PHALANX_SNAPSHOT_SEAL_TIMEOUT"] = str(seal_timeout)
        self.coordinator: subprocess.Popen[bytes] | None = None
        self._coord: Proc | None = None
        self.address = ""
        self.host = "127.0.0.1"
        self.port = 0
        self.peers: dict[str, Peer] = {}
        self.retired: list[Peer] = []
        # processes that exited with an unexpected status (daemons, coordinators): the
        # harness counts and empties it (:meth:`take_crashes`)
        self.crashes: list[str] = []
        self._coords_judged: set[int] = set()
        self._runs = 0
        self._slot = 0
        self.netns = netns
        self.net_skipped: str | None = None  # why net faults cannot run after all
        tag = os.getpid() % 100000
        # Host numbers of the /24, handed out oldest-freed first and returned when a
        # peer's namespace is removed: an address is never on two live namespaces, and
        # is reused as late as possible (no stale neighbour entries elsewhere). Handing
        # out ``slot % 250`` instead put a new peer on the address of an old namespace
        # still up on the bridge once a soak passed 250 peers: connections to it timed
        # out at random and the views churned for minutes (soak, seed 20261124).
        self._free_hosts: deque[int] = deque(range(2, 252))
        self.bridge: Bridge | None = None
        if netns:
            # on a host where dockerd ran, bridged frames are dropped unless the bridge
            # opens forwarding for itself (netns.Bridge does); then two namespaces must
            # reach each other before any peer starts, else the run goes on without
            # net faults and says why (it used to time out: "founding peers did not
            # start within 90 s", hangs)
            try:
                self.bridge = Bridge(f"pxb{tag}", f"10.{100 + tag % 100}.{(tag // 100) % 250}",
                                     str(tag), f"pxs{os.getpid()}-")  # fmt: skip
                why = self.bridge.probe()
            except (BridgeError, OSError, subprocess.SubprocessError) as exc:
                why = f"could not set up the stress bridge: {exc}"
            except BaseException:  # Ctrl-C meanwhile: nobody else could remove the bridge
                try:
                    if self.bridge is not None:
                        self.bridge.close()
                finally:
                    self.bridge = None
                    self.launcher.remove_dir()
                raise
            if why is not None or self.bridge is None:
                self.net_skipped = why
                if self.bridge is not None:
                    self.bridge.close()
                self.bridge = None
                self.netns = False
            else:
                self.host = self.bridge.host

    # ------------------------------------------------------------------ coordinator
    def start_coordinator(self, *, wait: bool = True) -> None:
        """Start (or restart on the same port) the coordinator. ``wait``: return once
        it listens (deadline 30 s); otherwise poll :meth:`coordinator_ready`."""
        self._runs += 1
        flags: list[str] = []
        if self.heartbeat_timeout is not None:
            flags += ["--heartbeat-timeout", str(self.heartbeat_timeout)]
        if self.commit_timeout is not None:
            flags += ["--commit-timeout", str(self.commit_timeout)]
        proc = self.launcher.start_coordinator(
            *flags, listen=f"{self.host}:{self.port}", name=f"coordinator-{self._runs}"
        )
        self._coord, self.coordinator = proc, proc.popen
        deadline = time.monotonic() + 30.0
        while wait and not self.coordinator_ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start within 30 s")
            time.sleep(0.05)

    def coordinator_ready(self) -> bool:
        """True once the current coordinator listens; raises RuntimeError if it exited."""
        if self._coord is None:
            return False
        try:
            if not self.launcher.ready(self._coord):
                return False
        except LaunchError as exc:
            raise RuntimeError(str(exc)) from None
        self.address = self._coord.info["address"]
        self.port = int(self.address.rpartition(":")[2])
        return True

    def kill_coordinator(self) -> None:
        if self._coord is not None:
            self._coord.kill()

    def judge_coordinators(self) -> None:
        """Every coordinator that listened and exited since the last call, without the
        harness killing it (a fault, or the end's SIGKILL after the grace): a crash
        unless it stopped cleanly (0, SIGTERM's or SIGINT's status). One that exits
        before it listens is a failed restart, which :meth:`coordinator_ready` reports."""
        for proc in self.launcher.procs:
            if proc.kind != "coordinator" or proc.pid in self._coords_judged or not proc.info:
                continue
            rc = proc.popen.poll()
            if rc is None:
                continue
            self._coords_judged.add(proc.pid)
            if not proc.killed and rc not in _CLEAN_EXITS:
                self.crashes.append(f"{proc.name} exited rc={rc}")

    def take_crashes(self) -> list[str]:
        out, self.crashes = self.crashes, []
        return out

    # ------------------------------------------------------------------ peers
    def start_daemon(self, member: str) -> Peer:
        """Start ``member``'s daemon (not waiting for it); the trainer comes later."""
        self._slot += 1
        slot = self._slot
        out = self.dir / f"{member}.out"
        sock = str(self.dir / f"{member}.sock")
        listen = "127.0.0.1:0"
        prefix: list[str] = []
        ns = veth = None
        host = 0
        if self.netns and self.bridge is not None:
            ns, veth, host = self._add_netns(slot)
            listen = f"{self.bridge.net}.{host}:0"
            prefix = ["ip", "netns", "exec", ns]
        env = self.daemon_env
        if slot % 2:  # zero-copy sends are off by default; every other daemon splices,
            # so that the soak keeps both send paths (and mixed links) under churn
            env = {**env, "PHALANX_COMM_ZERO_COPY_MIN_BYTES": str(256 << 10)}
        proc = self.launcher.start_daemon(member, coordinator=self.address, listen=listen,
                                          metrics_port=-1, prefix=prefix, env=env)  # fmt: skip
        assert proc.out_path == out and self.launcher.socket_of(member) == sock
        peer = Peer(member, slot, proc.popen, out, sock, netns=ns, veth=veth, host=host)
        self.peers[member] = peer
        return peer

    def _add_netns(self, slot: int) -> tuple[str, str, int]:
        assert self.bridge is not None
        if not self._free_hosts:
            raise RuntimeError("no free address left in the stress network (250 live peers)")
        host_no = self._free_hosts.popleft()
        ns = f"pxs{os.getpid()}-{slot}"
        try:
            veth = self.bridge.add(ns, host_no)
        except BridgeError as exc:
            self.bridge.remove(ns)
            self._free_hosts.append(host_no)
            raise RuntimeError(str(exc)) from exc
        return ns, veth, host_no

    def _drop_netns(self, peer: Peer) -> None:
        """Remove an exited peer's namespace (its veth pair goes with it) and free
        its address."""
        if peer.netns is None or self.bridge is None:
            return
        self.bridge.remove(peer.netns)
        peer.netns = peer.veth = None
        if peer.host:
            self._free_hosts.append(peer.host)
            peer.host = 0

    def set_link(self, peer: Peer, up: bool) -> None:
        """Partition (``up=False``) or heal one peer's network."""
        if peer.veth is not None and self.bridge is not None:
            with contextlib.suppress(BridgeError):
                self.bridge.set_link(peer.veth, up)

    def start_trainer(self, peer: Peer, args: TrainerArgs) -> None:
        parent, child = _MP.Pipe(duplex=True)
        proc = _MP.Process(target=trainer_main, args=(args, child), name=peer.member, daemon=True)
        proc.start()
        child.close()
        if peer.conn is not None:
            with contextlib.suppress(OSError):
                peer.conn.close()
        peer.trainer, peer.conn = proc, parent
        peer.trainer_killed = peer.trainer_done = False
        peer.t_last = time.monotonic()

    def send(self, peer: Peer, cmd: str | tuple[str, int]) -> None:
        if peer.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                peer.conn.send(cmd)

    def retire(self, peer: Peer, *, kill: bool) -> None:
        """Take ``peer`` out: SIGKILL (``kill``) or SIGTERM its daemon (a graceful
        leave) and its trainer if still there; reaped in :meth:`reap`."""
        peer.status = "gone"
        if kill:
            peer.signal(signal.SIGKILL)
        else:
            peer.signal(signal.SIGCONT)
            peer.signal(signal.SIGTERM, trainer=False)
        self.peers.pop(peer.member, None)
        self.retired.append(peer)

    def reap(self) -> None:
        """Reap retired processes that have exited (never blocks); forget the ones
        fully gone (both processes reaped, pipe closed)."""
        keep = []
        for p in self.retired:
            why = p.daemon_crash()
            if why is not None:
                self.crashes.append(why)
            if p.daemon.returncode is not None:
                self._drop_netns(p)
            if p.trainer is not None and p.trainer.exitcode is None and not p.trainer.is_alive():
                p.trainer.join(0)
            trainer_gone = p.trainer is None or p.trainer.exitcode is not None
            pipe_gone = p.conn is None or p.conn.closed
            if p.daemon.returncode is None or not trainer_gone or not pipe_gone:
                keep.append(p)
            elif p.trainer is not None:
                p.trainer.close()  # release the Process object's sentinel fd
        self.retired = keep

    # ------------------------------------------------------------------ the end
    def close(self, grace: float = 15.0) -> None:
        """Stop and reap every process started, remove the namespaces. Idempotent.
        Each step runs even if one before it failed (a Ctrl-C, an ``ip`` that timed
        out): the namespaces, the bridge and the forwarding rules outlive the run.
        Exit statuses that were crashes go to :attr:`crashes`."""
        try:
            everyone = list(self.peers.values()) + self.retired
            for p in everyone:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM, trainer=False)
            deadline = time.monotonic() + grace
            for p in everyone:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.daemon.wait(max(0.0, deadline - time.monotonic()))
            for p in everyone:
                why = p.daemon_crash()  # those that stopped within the grace
                if why is not None:
                    self.crashes.append(why)
            for p in everyone:
                p.signal(signal.SIGKILL)
            for p in everyone:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.daemon.wait(5.0)
                if p.trainer is not None:
                    p.trainer.join(5.0)
                if p.conn is not None:
                    with contextlib.suppress(OSError):
                        p.conn.close()
        finally:
            try:
                self.launcher.close(5.0)  # the coordinators, and anything else still running
                self.judge_coordinators()
            finally:
                bridge, self.bridge, self.netns = self.bridge, None, False
                if bridge is not None:  # namespaces, the bridge, the forwarding rules
                    bridge.close()

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def socket_fds() -> set[int]:
    return {fd for fd, target in open_fds().items() if target.startswith("socket:")}


def _children() -> list[tuple[int, str, str]]:
    """(pid, state, cmdline) of every process whose parent is this one."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text.rsplit(")", 1)[1].split()
            if int(fields[1]) != me:
                continue
            cmd = (
                (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except (OSError, IndexError, ValueError):
            continue
        out.append((int(stat.parent.name), fields[0], cmd.strip()[:160]))
    return out


def _helper(cmd: str) -> bool:
    return "multiprocessing.resource_tracker" in cmd or "multiprocessing.forkserver" in cmd


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _ours(pid: int, me: int) -> bool:
    """``pid`` was started by this process or by one of its processes (its environment
    has the run marker ``PXSTRESS_RUN`` or the launcher's ``PHALANX_PARENT_PID`` naming
    us: both stay so after its parent is gone; only the marker reaches grandchildren) or
    descends from us. Anyone else's process (a ``tail -f`` of the run's log) is not ours."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        env = []
    if f"{RUN_ENV}={me}".encode() in env or f"{_PARENT_ENV}={me}".encode() in env:
        return True
    for _ in range(64):
        ppid = _ppid(pid)
        if ppid is None or ppid <= 1:
            return False
        if ppid == me:
            return True
        pid = ppid
    return False


def _ip_links() -> str:
    """``ip -o link show`` (empty without ``ip``)."""
    if shutil.which("ip") is None:
        return ""
    try:
        r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.decode(errors="replace")


def leftover_links(text: str, tag: str) -> list[str]:
    """The links of run ``tag`` in ``ip -o link show`` output: its bridge ``pxb<tag>``
    and veth ends ``pxh<tag>k<n>`` / ``pxn<tag>k<n>`` (netns.Bridge's names)."""
    rx = re.compile(rf"pxb{tag}|px[hn]{tag}k\d+")
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and rx.fullmatch(parts[1].strip().split("@", 1)[0]):
            out.append(parts[1].strip().split("@", 1)[0])
    return out


def leaks(tmpdir: Path, threads_before: set[int], sockets_before: set[int]) -> list[str]:
    """What the run left behind: live children (ended ones are reaped, not counted),
    processes of ours that mention the run's directory (orphaned grandchildren, killed
    by PID here; other people's, e.g. a ``tail -f`` of its log, are left alone), harness
    threads, sockets, network namespaces, links, forwarding rules."""
    found = []
    me = os.getpid()
    for pid, state, cmd in _children():
        if _helper(cmd):
            continue
        if state == "Z":
            # it has ended: reap it quietly. (A subreaper -- pytest under the suite's
            # conftest -- also adopts the run's orphaned grandchildren, e.g. a killed
            # daemon's own children, which end up here as zombies.)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            continue
        found.append(f"child pid {pid} state {state}: {cmd}")
        _signal(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    needle = str(tmpdir).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            if needle in cmdline.read_bytes():
                pid = int(cmdline.parent.name)
                if pid == me or not _ours(pid, me):
                    continue
                found.append(f"orphan pid {pid} still runs in {tmpdir}")
                _signal(pid, signal.SIGKILL)
    extra = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    found += [f"thread {t.name} still alive" for t in extra]
    sockets = socket_fds() - sockets_before
    found += [f"socket fd {fd} still open" for fd in sorted(sockets)]
    r = (
        subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
        if shutil.which("ip")
        else None
    )
    if r is not None and f"pxs{os.getpid()}-".encode() in r.stdout:
        found.append("network namespaces of this run still exist")
    tag = str(me % 100000)
    links = leftover_links(_ip_links(), tag)
    settle = time.monotonic() + _LINK_SETTLE_S
    while links and time.monotonic() < settle:
        time.sleep(0.2)
        links = leftover_links(_ip_links(), tag)
    found += [f"network link left: {name}" for name in links]
    found += [f"iptables rule left: {rule}" for rule in leftover_rules(tag)]
    return found

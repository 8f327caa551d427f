"""Network namespaces on a private bridge, for tests and ``phalanx stress`` (``net`` faults).

:class:`Bridge` creates a Linux bridge with a /24 of its own, puts each peer in a
network namespace joined to it by a veth pair, takes a peer's link down and up (a
partition), and removes everything it created. Root and iproute2 are needed;
:func:`unavailable` says why it cannot be done here. The bridge gets a fixed (random,
locally administered) MAC address: left to itself, Linux gives a bridge the lowest MAC
of its ports and changes it when that port is deleted, and every namespace whose ARP
cache still holds the old one cannot reach the bridge's address for up to ~45 s.

**Hosts where dockerd has run.** dockerd sets the FORWARD chain's policy to DROP and
loads ``br_netfilter`` with ``net.bridge.bridge-nf-call-iptables=1``: frames crossing
*any* bridge then pass iptables' FORWARD chain and are dropped, so namespaces on our
bridge cannot reach each other (a stress run then reports hangs and "the founding
peers did not start"). :class:`Bridge` therefore

* opens forwarding for its own bridge explicitly: where frames are bridged through
  iptables and an iptables backend (``iptables-nft``, ``iptables-legacy``) has a
  FORWARD chain that is not plain ACCEPT, it inserts ``-i BRIDGE -o BRIDGE -j ACCEPT``
  (with a comment naming the run) at the top of that chain, and deletes exactly those
  rules when it closes -- the policy and every other rule stay as they were;
* checks before any peer starts that two namespaces on the bridge reach each other
  over TCP (:meth:`Bridge.probe`), and when they do not, names the cause (the
  sysctl, the FORWARD policy of each backend, whether iptables is installed) instead
  of letting the run time out.

This module must never change a host setting other than the rules it adds (no sysctl,
no policy), never touch a namespace, link or rule it did not create, and never wait
without a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "Bridge",
    "BridgeError",
    "bridged_through_iptables",
    "close_forwarding",
    "forward_chains",
    "leftover_rules",
    "open_forwarding",
    "unavailable",
]

_CLONE_NEWNET = 0x40000000
_BR_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
_BACKENDS = ("iptables-nft", "iptables-legacy")
_PROBE_PORT = 9
_PROBE_TIMEOUT_S = 3.0
T = TypeVar("T")


class BridgeError(RuntimeError):
    """The bridge or a namespace could not be set up; the message names the cause."""


def _run(*cmd: str, timeout: float = 10.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), capture_output=True, timeout=timeout)


def unavailable() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and veth pairs)"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip' not found)"
    name = f"pxprobe{os.getpid()}"
    r = _run("ip", "netns", "add", name)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.decode(errors='replace').strip()}"
    _run("ip", "netns", "del", name)
    return None


def bridged_through_iptables() -> bool | None:
    """Whether bridged frames pass iptables (``net.bridge.bridge-nf-call-iptables``);
    None when ``br_netfilter`` is not loaded (then they never do)."""
    try:
        return _BR_NF.read_text().strip() != "0"
    except OSError:
        return None


def open_forwarding(bridge: str, comment: str) -> list[tuple[str, list[str]]]:
    """Let frames between ports of ``bridge`` through FORWARD, in each iptables backend
    that would stop them (a DROP policy or any rule: what dockerd leaves), when bridged
    frames pass iptables at all. Returns the rules added, for :func:`close_forwarding`
    (which removes exactly those). A backend that refuses the rule is skipped."""
    if not bridged_through_iptables():
        return []
    spec = ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment", comment,
            "-j", "ACCEPT"]  # fmt: skip
    added: list[tuple[str, list[str]]] = []
    for tool, (policy, rules) in forward_chains().items():
        if policy == "ACCEPT" and rules == 0:
            continue  # nothing in that backend stops the bridge's frames
        if _run(tool, "-w", "5", "-I", *spec[:1], "1", *spec[1:]).returncode == 0:
            added.append((tool, spec))
    return added


def close_forwarding(rules: list[tuple[str, list[str]]]) -> None:
    """Remove the rules :func:`open_forwarding` added."""
    for tool, spec in rules:  # one that times out does not keep the others
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(tool, "-w", "5", "-D", *spec)


def forward_chains() -> dict[str, tuple[str, int]]:
    """For each iptables backend installed here: (FORWARD policy, number of rules)."""
    out: dict[str, tuple[str, int]] = {}
    for tool in _BACKENDS:
        if shutil.which(tool) is None or (tool == "iptables-legacy" and not _legacy_filter()):
            continue
        r = _run(tool, "-w", "5", "-S", "FORWARD")
        if r.returncode != 0:
            continue
        lines = r.stdout.decode(errors="replace").splitlines()
        policy = next((ln.split()[2] for ln in lines if ln.startswith("-P FORWARD")), "?")
        out[tool] = (policy, sum(ln.startswith("-A FORWARD") for ln in lines))
    return out


def _legacy_filter() -> bool:
    """Whether the legacy (x_tables) filter table exists in this namespace: listing it
    with iptables-legacy would otherwise create it, a change to the host."""
    try:
        return "filter" in Path("/proc/net/ip_tables_names").read_text().split()
    except OSError:
        return False


def leftover_rules(tag: str) -> list[str]:
    """FORWARD rules that a :class:`Bridge` tagged ``tag`` added and did not remove."""
    out = []
    for tool in _BACKENDS:
        if shutil.which(tool) is None or (tool == "iptables-legacy" and not _legacy_filter()):
            continue
        r = _run(tool, "-w", "5", "-S", "FORWARD")
        out += [f"{tool}: {ln}" for ln in r.stdout.decode(errors="replace").splitlines()
                if f"phalanx-stress-{tag}" in ln]  # fmt: skip
    return out


def _in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread that joined network namespace ``ns``
    (``setns`` is per thread: sockets made there belong to ``ns``; the caller's
    thread never changes namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="netns-probe", daemon=True)
    t.start()
    t.join(_PROBE_TIMEOUT_S + 5.0)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    if "value" not in box:
        raise TimeoutError(f"nothing came back from namespace {ns}")
    return box["value"]  # type: ignore[return-value]


class Bridge:
    """A bridge named ``name`` on ``net``.0/24 (the host side is ``net``.1) and the
    namespaces of the peers joined to it; ``tag`` (a few digits) names this run's links
    and rules, ``ns_prefix`` its probe namespaces (see the module docstring). Raises
    :class:`BridgeError`."""

    def __init__(self, name: str, net: str, tag: str, ns_prefix: str) -> None:
        self.name = name
        self.net = net
        self.tag = tag
        self.ns_prefix = ns_prefix
        self.host = f"{net}.1"
        self.namespaces: list[str] = []
        self._outer: dict[str, str] = {}  # namespace -> host end of its veth pair
        self._rules: list[tuple[str, list[str]]] = []  # (backend, rule spec) added by us
        self._links = 0
        # A fixed address: a Linux bridge left to itself takes the lowest address of its
        # ports and changes it when that port goes (a peer's namespace deleted). The
        # namespaces still holding the old address in their ARP cache then send into
        # nothing -- new connections to the bridge's address time out for the 15-45 s
        # an entry stays reachable, while namespaces created later connect at once.
        # That was the "coordinator unreachable after a restart" silence of the 30-minute
        # soaks (docs/stress.md).
        self.mac = "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))
        self._ip("link", "add", name, "address", self.mac, "type", "bridge")
        try:
            self._ip("addr", "add", f"{self.host}/24", "dev", name)
            self._ip("link", "set", name, "up")
            self._open_forwarding()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ rules
    def _open_forwarding(self) -> None:
        # the comment is what leftover_rules() looks for
        self._rules += open_forwarding(self.name, f"phalanx-stress-{self.tag}")

    def _close_forwarding(self) -> None:
        close_forwarding(self._rules)
        self._rules.clear()

    @property
    def rules(self) -> list[str]:
        """The rules this bridge added (``backend: spec``), for logs and tests."""
        return [f"{tool}: {' '.join(spec)}" for tool, spec in self._rules]

    # ------------------------------------------------------------------ peers
    def _ip(self, *args: str) -> None:
        r = _run("ip", *args)
        if r.returncode != 0:
            raise BridgeError(f"ip {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")

    def add(self, ns: str, host_no: int) -> str:
        """Namespace ``ns`` with address ``net``.``host_no`` on the bridge; returns the
        host side of its veth pair (what :meth:`set_link` takes)."""
        self._links += 1
        outer, inner = f"pxh{self.tag}k{self._links}", f"pxn{self.tag}k{self._links}"
        self._ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._outer[ns] = outer
        self._ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._ip("link", "set", inner, "netns", ns)
        self._ip("link", "set", outer, "master", self.name, "up")
        self._ip("-n", ns, "addr", "add", f"{self.net}.{host_no}/24", "dev", inner)
        self._ip("-n", ns, "link", "set", inner, "up")
        self._ip("-n", ns, "link", "set", "lo", "up")
        return outer

    def remove(self, ns: str) -> None:
        """Delete namespace ``ns`` and its veth pair. The pair would go with the
        namespace, but only once the kernel frees it, and a namespace can outlive its
        name for good (a socket of it still referenced): the host end is deleted too,
        which takes the pair down whatever holds the namespace (stop 31: two host ends
        of a short run were still up minutes later)."""
        try:
            _run("ip", "netns", "del", ns)
        finally:
            outer = self._outer.pop(ns, None)
            if outer is not None:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _run("ip", "link", "del", outer)  # already gone: ip says so, ignored
            with contextlib.suppress(ValueError):
                self.namespaces.remove(ns)

    def set_link(self, veth: str, up: bool) -> None:
        """Partition (``up=False``) or heal the peer behind host-side link ``veth``."""
        self._ip("link", "set", veth, "up" if up else "down")

    # ------------------------------------------------------------------ probe
    def probe(self) -> str | None:
        """Two throw-away namespaces on the bridge try a TCP connection to each other.
        None when it works; else the cause, named as precisely as the host allows."""
        a, b = f"{self.ns_prefix}probe-a", f"{self.ns_prefix}probe-b"
        try:
            self.add(a, 253)
            self.add(b, 254)
            addr = (f"{self.net}.254", _PROBE_PORT)

            def listen() -> socket.socket:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(addr)
                s.listen(1)
                return s

            def connect() -> None:
                with socket.create_connection(addr, timeout=_PROBE_TIMEOUT_S):
                    pass

            server = _in_netns(b, listen)
            try:
                _in_netns(a, connect)
            finally:
                server.close()
            return None
        except (OSError, TimeoutError) as exc:
            return self.diagnose(f"{type(exc).__name__}: {exc}")
        finally:
            self.remove(a)
            self.remove(b)

    def diagnose(self, symptom: str) -> str:
        through = bridged_through_iptables()
        chains = forward_chains()
        parts = [f"namespaces on bridge {self.name} cannot reach each other ({symptom})"]
        if through:
            drops = [f"{t} FORWARD policy {p}" for t, (p, _) in chains.items() if p != "ACCEPT"]
            parts.append(
                "bridged frames pass iptables (net.bridge.bridge-nf-call-iptables=1, "
                "as dockerd leaves a host)" + (f" and {', '.join(drops)}" if drops else "")
            )
            if not chains:
                parts.append(
                    "no iptables binary is installed, so the harness cannot open forwarding "
                    "for its bridge: install iptables (Debian: apt-get install iptables)"
                )
            elif self._rules:
                parts.append(f"the ACCEPT rules added for the bridge did not help: {self.rules}")
            else:
                parts.append("no iptables backend accepted a rule for the bridge")
        else:
            parts.append("bridged frames do not pass iptables here; check the bridge and veths")
        return "; ".join(parts)

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Remove every namespace, the bridge and the rules this bridge added. Each
        step runs even if one before it failed (an ``ip`` that timed out, a Ctrl-C):
        a namespace left behind must not keep the bridge and the rules too."""
        try:
            for ns in list(self.namespaces):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    self.remove(ns)
        finally:
            try:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _run("ip", "link", "del", self.name)
            finally:
                self._close_forwarding()

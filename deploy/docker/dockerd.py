#!/usr/bin/env python3
"""Run one command under a private, temporary ``dockerd`` and leave the host as found.

    python3 deploy/docker/dockerd.py run -- COMMAND [ARGS...]
    python3 deploy/docker/dockerd.py state        # print the host state it guards (JSON)

Used by ``.ci/docker`` (the compose smoke test); useful to anyone who wants Docker for
one command on a machine that does not run it as a service. If a Docker engine already
answers on the default socket, ``run`` uses it and starts nothing.

Why this exists: a stock ``dockerd`` sets ``iptables -P FORWARD DROP``, turns on
``net.ipv4.ip_forward`` and ``bridge-nf-call-iptables`` and creates ``docker0``; on a
machine where other programs join network namespaces with a Linux bridge (phalanx's
stress harness does), that silently cuts them off. So this ``dockerd`` is started with
``--iptables=false --ip-forward=false --ip-masq=false --bridge=none`` (containers reach
each other on the networks compose creates; nothing leaves the machine), on its own
socket, exec root and data root, and the host state is recorded before and restored
after, whatever happens (exceptions, SIGINT, SIGTERM):

* the bridge and forwarding sysctls (``net.bridge.bridge-nf-call-*``,
  ``net.ipv4.ip_forward``, ``net.ipv4.conf.all.forwarding``, ``net.ipv6.conf.all.forwarding``);
* every iptables / ip6tables table: the rules and chains dockerd makes (its ``DOCKER*``
  chains, rules naming them, ``docker0`` or a ``br-*`` bridge) that appeared are
  removed, the built-in chains' policies set back (``FORWARD`` above all); rules that
  other programs added meanwhile are left alone;
* network links named ``docker0``, ``br-*`` or ``veth*`` that appeared are deleted.

``dockerd`` and the ``containerd`` it spawned are stopped by PID (SIGTERM, then SIGKILL
after a deadline), never by name. The state before and after is printed to stderr as
one JSON line each; exit status: the command's, or 70 if the host could not be put
back exactly, or 77 if Docker cannot run here (not root, no dockerd, no network
namespaces).

This module must never stop a process it did not start, nor leave dockerd running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

__all__ = [
    "CANNOT_RUN",
    "HostState",
    "Table",
    "capture",
    "parse_save",
    "plan_table",
    "restore",
    "same",
    "session",
]

#: exit status when Docker cannot run on this machine (a skip outside CI)
CANNOT_RUN = 77
#: exit status when the host could not be put back as it was
NOT_RESTORED = 70

SYSCTLS = (
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/bridge/bridge-nf-call-arptables",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
)
_TABLES = ("filter", "nat", "mangle", "raw", "security")
_BUILTIN = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
_OUR_LINKS = ("docker0", "br-", "veth")

RUN_DIR = Path("/run/phalanx-docker")
DATA_ROOT = Path(os.environ.get("PHALANX_DOCKER_DATA_ROOT", "/var/lib/phalanx-docker"))
SOCKET = RUN_DIR / "docker.sock"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- host state


@dataclass(frozen=True)
class Table:
    """One iptables table as ``iptables-save`` prints it: chain policies and rules."""

    policies: dict[str, str]  # built-in chain -> policy; user chain -> "-"
    rules: tuple[str, ...]  # "-A CHAIN ..." lines, in order


@dataclass(frozen=True)
class HostState:
    sysctls: dict[str, str]
    iptables: dict[str, dict[str, Table]]  # "iptables"/"ip6tables" -> table -> Table
    links: frozenset[str]
    forward: str  # `iptables -S FORWARD`, the line a person checks first

    def summary(self) -> dict[str, object]:
        return {
            "forward": self.forward,
            "sysctls": {k.replace("/", "."): v for k, v in self.sysctls.items()},
            "iptables_rules": {
                tool: sum(len(t.rules) for t in tables.values())
                for tool, tables in self.iptables.items()
            },
            "links": len(self.links),
        }


def _run(cmd: Sequence[str], check: bool = True) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def parse_save(text: str) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    name = ""
    policies: dict[str, str] = {}
    rules: list[str] = []
    for line in text.splitlines():
        if line.startswith("*"):
            name, policies, rules = line[1:], {}, []
        elif line.startswith(":") and name:
            chain, policy = line[1:].split()[:2]
            policies[chain] = policy
        elif line.startswith("-A ") and name:
            rules.append(line)
        elif line == "COMMIT" and name:
            tables[name] = Table(dict(policies), tuple(rules))
            name = ""
    return tables


def _iptables(tool: str) -> dict[str, Table]:
    if shutil.which(f"{tool}-save") is None:
        return {}
    return parse_save(_run([f"{tool}-save"]))


def _links() -> frozenset[str]:
    return frozenset(p.name for p in Path("/sys/class/net").iterdir())


def capture() -> HostState:
    sysctls = {}
    for key in SYSCTLS:
        path = Path("/proc/sys") / key
        sysctls[key] = path.read_text().strip() if path.exists() else "absent"
    forward = ""
    if shutil.which("iptables"):
        forward = _run(["iptables", "-S", "FORWARD"], check=False).strip()
    return HostState(
        sysctls,
        {tool: _iptables(tool) for tool in ("iptables", "ip6tables")},
        _links(),
        forward or "(no iptables)",
    )


def restore(before: HostState) -> list[str]:
    """Undo what appeared since ``before``; returns what was done (one line each)."""
    done: list[str] = []
    now = capture()
    for key, value in before.sysctls.items():
        path = Path("/proc/sys") / key
        if value != "absent" and path.exists() and path.read_text().strip() != value:
            path.write_text(value)
            done.append(f"sysctl {key}={value}")
    for tool, tables in now.iptables.items():
        for name, table in tables.items():
            done.extend(_restore_table(tool, name, table, before.iptables[tool].get(name)))
    for link in sorted(now.links - before.links):
        if link.startswith(_OUR_LINKS):
            _run(["ip", "link", "delete", link], check=False)
            done.append(f"ip link delete {link}")
    return done


def _docker_made(text: str) -> bool:
    """A rule or chain dockerd makes: its chains, its bridges, its interfaces."""
    return "DOCKER" in text or "docker0" in text or " br-" in text


def plan_table(tool: str, name: str, now: Table, then: Table | None) -> list[list[str]]:
    """The commands that undo in ``now`` what dockerd did since ``then`` (pure):
    delete the rules and chains it made, set the built-in policies back. Rules that
    appeared but are not dockerd's (another program's, meanwhile) are left alone."""
    cmds: list[list[str]] = []
    then = then or Table({c: "ACCEPT" for c in _BUILTIN.get(name, ())}, ())
    extra = Counter(now.rules) - Counter(then.rules)
    for rule in reversed(now.rules):  # last added first: jumps go before their targets
        if extra[rule] > 0 and _docker_made(rule):
            extra[rule] -= 1
            args = shlex.split(rule)
            args[0] = "-D"
            cmds.append([tool, "-t", name, *args])
    for chain, policy in now.policies.items():
        if chain in then.policies:
            if policy not in ("-", then.policies[chain]):
                cmds.append([tool, "-t", name, "-P", chain, then.policies[chain]])
        elif policy == "-" and _docker_made(chain):  # a user chain dockerd made
            cmds.append([tool, "-t", name, "-F", chain])
            cmds.append([tool, "-t", name, "-X", chain])
        elif policy not in ("-", "ACCEPT"):  # a built-in chain of a table that was not there
            cmds.append([tool, "-t", name, "-P", chain, "ACCEPT"])
    return cmds


def _restore_table(tool: str, name: str, now: Table, then: Table | None) -> list[str]:
    done = []
    for cmd in plan_table(tool, name, now, then):
        _run(cmd, check=False)
        done.append(shlex.join(cmd))
    return done


def same(a: HostState, b: HostState) -> list[str]:
    """What differs between two states (empty: identical; other programs' links and
    rules added meanwhile are not counted, only ours)."""
    diffs = [f"sysctl {k}: {a.sysctls[k]} -> {b.sysctls.get(k)}"
             for k in a.sysctls if a.sysctls[k] != b.sysctls.get(k)]  # fmt: skip
    for tool, tables in a.iptables.items():
        for name, t in tables.items():
            u = b.iptables[tool].get(name)
            if u is not None and u.policies != t.policies:
                diffs.append(f"{tool} {name} policies {t.policies} -> {u.policies}")
    diffs += [f"link {n} appeared" for n in sorted(b.links - a.links) if n.startswith(_OUR_LINKS)]
    if a.forward != b.forward:
        diffs.append(f"FORWARD: {a.forward!r} -> {b.forward!r}")
    return diffs


# ----------------------------------------------------------------------------- dockerd


def cannot_run_reason() -> str:
    """Why a private dockerd cannot run here ('' if it can)."""
    if os.geteuid() != 0:
        return "not root (dockerd needs root)"
    if shutil.which("dockerd") is None:
        return "no dockerd binary (apt-get install docker.io)"
    if not Path("/proc/self/ns/net").exists():
        return "no network namespace support"
    return ""


def engine_answers(host: str | None = None) -> bool:
    docker = docker_binary()
    env = dict(os.environ)
    if host:
        env["DOCKER_HOST"] = host
    try:
        p = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"],
                           capture_output=True, env=env, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def docker_binary() -> str:
    """Debian's client (/usr/bin/docker) first: it matches Debian's engine and builds
    with the classic builder; a newer client elsewhere on PATH may need buildx."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(f"signal {signum}")


@contextlib.contextmanager
def session(log_path: Path) -> Iterator[dict[str, str]]:
    """A private dockerd for the ``with`` block; yields the environment to use it
    (``DOCKER_HOST``). The host state is restored on the way out, always."""
    before = capture()
    print("host before: " + json.dumps(before.summary()), file=sys.stderr, flush=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    host = f"unix://{SOCKET}"
    cmd = [
        "dockerd", "--host", host, "--exec-root", str(RUN_DIR / "exec"),
        "--data-root", str(DATA_ROOT), "--pidfile", str(RUN_DIR / "dockerd.pid"),
        "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
        "--bridge=none", "--storage-driver=overlay2", "--log-level=warn",
    ]  # fmt: skip
    old = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    proc: subprocess.Popen[bytes] | None = None
    restored_ok = True
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not engine_answers(host):
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({proc.returncode}); its log: {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not answer within {START_TIMEOUT_S}s: {log_path}")
            time.sleep(0.3)
        yield {"DOCKER_HOST": host}
    finally:
        try:
            if proc is not None:
                # this engine is ours: drop the untagged images builds leave behind
                # (multi-stage build stages, replaced tags), so its data root stays small
                subprocess.run([docker_binary(), "--host", host, "image", "prune", "--force"],
                               capture_output=True, timeout=120, check=False)  # fmt: skip
                kids = _children(proc.pid)  # containerd (and its shims, if any are left)
                _stop_pid(proc.pid, STOP_TIMEOUT_S)
                proc.wait(timeout=5)
                for kid in kids:
                    if _alive(kid):
                        _stop_pid(kid, 10.0)
                shutil.rmtree(RUN_DIR, ignore_errors=True)  # its socket, pid file, exec root
        finally:
            done = restore(before)
            after = capture()
            diffs = same(before, after)
            for line in done:
                print(f"restored: {line}", file=sys.stderr)
            print("host after: " + json.dumps(after.summary()), file=sys.stderr, flush=True)
            if diffs:
                restored_ok = False
                print("HOST NOT RESTORED: " + "; ".join(diffs), file=sys.stderr, flush=True)
            for s, h in old.items():
                signal.signal(s, h)
    if not restored_ok:
        raise SystemExit(NOT_RESTORED)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["state"]:
        print(json.dumps(capture().summary()))
        return 0
    if argv[:1] != ["run"] or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = list(argv[argv.index("--") + 1 :])
    if engine_answers():
        print("a Docker engine already answers: using it, starting none", file=sys.stderr)
        return subprocess.call(command)
    reason = cannot_run_reason()
    if reason:
        print(f"cannot run Docker here: {reason}", file=sys.stderr)
        return CANNOT_RUN
    log_path = Path(os.environ.get("PHALANX_DOCKERD_LOG", "/tmp/phalanx-dockerd.log"))
    try:
        with session(log_path) as env:
            child = subprocess.Popen(command, env={**os.environ, **env})
            try:
                return child.wait()
            except BaseException:
                child.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=30)
                if child.poll() is None:
                    child.kill()
                    child.wait()
                raise
    except _Terminated as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

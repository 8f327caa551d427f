#!/usr/bin/env python3
"""The compose stack, run for real: build, up, kill, restart, scale, Prometheus, down.

    python3 deploy/docker/smoke.py [--skip-build] [--peers 3] [--keep]

Needs a Docker engine (``DOCKER_HOST`` honoured; ``deploy/docker/dockerd.py run --``
provides a private one and restores the host afterwards) and docker-compose. What it
does and checks, in order (every wait has a deadline; a failed check exits 1 after
printing the containers' last log lines):

1. ``deploy/docker/build.sh --debian-base`` (no registry: a Debian base, Prometheus
   from Debian's package), then ``docker-compose up -d`` with ``--peers`` peers, a fresh
   cluster secret (a compose secret) and Prometheus on a free loopback port;
2. every peer commits training steps (its ``phalanx train`` JSON lines in the logs);
3. ``docker kill`` one peer: every other one commits again, in a view without it,
   within 10 s (``kill_resume_s``) of the kill landing -- which is some time after it
   was asked for (``kill_call_s``: the command; ``kill_landed_after_s``: the killed
   run's last line after the ask; once 3 s on a loaded CI host);
4. ``docker start`` the killed container: same hostname, so the same member id with a
   newer incarnation; its daemon is new, so its training process rebuilds its newest
   sealed snapshot from the peers that hold its shards: the restored bytes' SHA-256
   must equal what the killed run logged when it took that snapshot, at a step no
   older than the newest it logged as sealed (``restore_ok``); then it rejoins and
   commits;
5. ``--scale`` up by one: the new peer receives the group's state (``sync``, bytes > 0)
   and commits in a view with everybody (``join_contributing_s``: scale command ->
   its first commit); the others commit in that view too;
6. Prometheus's HTTP API: every running peer is a target with ``up == 1`` (found by
   DNS service discovery, no list), the ``phalanx`` rule group has every alert of
   deploy/prometheus/alerts.yml loaded;
7. ``docker-compose down -v``: no container, network or volume of the project is left.

Prints one JSON line of what it saw. This script must never touch containers,
networks or volumes of another compose project, nor wait without a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
PEER_UID_GID = 10001
RESUME_LIMIT_S = 10.0

_T = TypeVar("_T")


class SmokeError(Exception):
    pass


def sh(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120,
       check: bool = True) -> str:  # fmt: skip
    p = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise SmokeError(
            f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        )
    return p.stdout


def wait_for(what: str, fn: Callable[[], _T | None], timeout: float, every: float = 0.5) -> _T:
    """``fn()``'s first truthy answer (None, False, [] mean "not yet")."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise SmokeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: its containers, their events, Prometheus."""

    def __init__(self, project: str, env: dict[str, str], prom_port: int) -> None:
        self.project = project
        self.env = env
        self.prom = f"http://127.0.0.1:{prom_port}"
        self.rules: list[tuple[str, list[str]]] = []  # FORWARD rules added for the network

    def compose(self, *args: str, timeout: float = 180) -> str:
        return sh(["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
                  env=self.env, timeout=timeout)  # fmt: skip

    def open_forwarding(self) -> None:
        """FORWARD ACCEPT between the ports of the project's network bridge(s), where
        bridged frames pass iptables and something there would stop them; removed by
        :meth:`close_forwarding` (and dockerd.py restores the tables anyway)."""
        from phalanx.testing.netns import open_forwarding

        ids = sh([DOCKER, "network", "ls", "-q", "--no-trunc", "--filter",
                  f"label=com.docker.compose.project={self.project}"], env=self.env).split()  # fmt: skip
        for nid in ids:
            name = sh([DOCKER, "network", "inspect", "-f",
                       '{{index .Options "com.docker.network.bridge.name"}}', nid],
                      env=self.env).strip()  # fmt: skip
            bridge = name if name and name != "<no value>" else f"br-{nid[:12]}"
            self.rules += open_forwarding(bridge, f"phalanx-smoke-{self.project}")

    def close_forwarding(self) -> None:
        from phalanx.testing.netns import close_forwarding

        close_forwarding(self.rules)
        self.rules.clear()

    def peers(self, running_only: bool = True) -> list[str]:
        """Container ids of the peer service (running ones by default)."""
        args = ["ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", "label=com.docker.compose.service=peer"]  # fmt: skip
        if not running_only:
            args.insert(1, "-a")
        return sh([DOCKER, *args], env=self.env).split()

    def inspect(self, cid: str) -> dict[str, Any]:
        out: list[dict[str, Any]] = json.loads(sh([DOCKER, "inspect", cid], env=self.env))
        return out[0]

    def member(self, cid: str) -> str:
        return str(self.inspect(cid)["Config"]["Hostname"])

    def address(self, cid: str) -> str:
        nets = self.inspect(cid)["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])

    def events(self, cid: str) -> list[dict[str, Any]]:
        """The training process's JSON lines from the container's log (all runs)."""
        p = subprocess.run([DOCKER, "logs", cid], capture_output=True, text=True,
                           env=self.env, timeout=60)  # fmt: skip
        out = []
        for line in p.stdout.splitlines():
            if line.startswith('{"ev"'):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def api(self, path: str, **query: str) -> Any:
        url = f"{self.prom}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise SmokeError(f"Prometheus {path}: {body}")
        return body["data"]

    def tail_logs(self) -> str:
        out = []
        for cid in self.peers(running_only=False):
            p = subprocess.run([DOCKER, "logs", "--tail", "25", cid], capture_output=True,
                               text=True, env=self.env, timeout=30)  # fmt: skip
            out.append(f"--- {cid} ---\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return "\n".join(out)


def commits_after(events: list[dict[str, Any]], t: float, world: int | None = None,
                  without: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Commit events after ``t`` (in a view of ``world`` members, not naming ``without``)."""
    out = []
    view_members: list[str] = []
    for e in events:
        if e["ev"] == "view":
            view_members = list(e["members"])
        if e["ev"] != "commit" or e["t"] <= t:
            continue
        if world is not None and e["world"] != world:
            continue
        if without is not None and without in view_members:
            continue
        out.append(e)
    return out


def killed_run(
    events: list[dict[str, Any]], restore: dict[str, Any], t_kill: float
) -> tuple[dict[int, str], float | None, int | None]:
    """What a killed run logged: its snapshots (step: SHA-256), its last event's time
    and the newest step it logged as sealed.

    ``events`` is the container's whole log (the killed run, then the restarted one);
    ``restore`` the restarted run's restore event; ``t_kill`` when the kill was asked
    for. The killed run's events are those before the restarted run's first ``ready``
    (before its ``restore`` if none is seen): however long after ``t_kill`` the kill
    landed, a run logs ``ready`` before it restores, and restores before it trains.
    """
    later = [e["t"] for e in events if e["ev"] == "ready" and e["t"] > t_kill]
    cut = min([*later, restore["t"]])
    run = [e for e in events if e["t"] < cut]
    snaps = {int(e["step"]): str(e["sha256"]) for e in run if e["ev"] == "snapshot"}
    last = max((float(e["t"]) for e in run), default=None)
    sealed = max((int(e["step"]) for e in run if e["ev"] == "sealed"), default=None)
    return snaps, last, sealed


def alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert: (\S+)", ALERTS.read_text(), re.M))


def scenario(stack: Stack, peers: int) -> dict[str, Any]:
    seen: dict[str, Any] = {"peers_initial": peers}
    t_up = time.time()
    # the project's network first: where dockerd has left FORWARD DROP behind (our
    # private dockerd adds no iptables rules), containers reach each other only
    # through a rule for this network's bridge, added before any container starts
    stack.compose("up", "--no-start", "--scale", f"peer={peers}")
    stack.open_forwarding()
    stack.compose("up", "-d", "--scale", f"peer={peers}")
    ids = wait_for(f"{peers} running peers",
                   lambda: (lambda p: p if len(p) == peers else None)(stack.peers()), 60)  # fmt: skip

    # 2. every peer commits, in a view of everybody
    def all_commit(cids: list[str], world: int, after: float) -> bool:
        return all(commits_after(stack.events(c), after, world=world) for c in cids)

    wait_for("every peer to commit", lambda: all_commit(ids, peers, t_up), 150, every=1.0)
    seen["up_to_all_committing_s"] = round(time.time() - t_up, 1)

    # 3. docker kill one peer: the others commit again without it within 10 s
    victim = ids[0]
    victim_id = stack.member(victim)
    survivors = ids[1:]
    # its snapshot must be on its peers before it dies, or there is nothing to restore
    wait_for("a sealed snapshot of the peer to kill",
             lambda: [e for e in stack.events(victim) if e["ev"] == "sealed"], 90)  # fmt: skip
    t_kill = time.time()
    sh([DOCKER, "kill", victim], env=stack.env)
    # the kill is asked for at t_kill but lands later: on a loaded host the victim
    # once trained 3 s (three more snapshots) past it. Reported, and the snapshots
    # below are the ones its killed run took, whenever that run ended
    seen["kill_call_s"] = round(time.time() - t_kill, 2)

    def resumed() -> dict[str, float] | None:
        firsts = []
        for c in survivors:
            got = commits_after(stack.events(c), t_kill, without=victim_id)
            if not got:
                return None
            firsts.append(got[0]["t"])
        return {"t": max(firsts)}

    # when the survivors committed again; held against the limit once the killed
    # run's log says when the kill landed (below)
    t_resumed = wait_for("the survivors to commit without the killed peer", resumed, 30)["t"]

    # 4. the killed container comes back: its snapshot is rebuilt from the holders
    if not stack.inspect(victim)["State"]["Running"]:
        sh([DOCKER, "start", victim], env=stack.env)

    def restored() -> dict[str, Any] | None:
        evs = [e for e in stack.events(victim) if e["t"] > t_kill]
        return next((e for e in evs if e["ev"] in ("restore", "restore_failed")), None)

    restore = wait_for("the restarted peer's restore", restored, 90)
    # what the killed run logged as it took each snapshot (its log outlives it): a
    # restarted run restores before it trains, so every snapshot logged before its
    # restore is the killed run's
    snaps, last, sealed = killed_run(stack.events(victim), restore, t_kill)
    if not snaps:
        raise SmokeError("the killed peer had taken no snapshot before the kill")
    # the kill landed after the killed run's last line (at least this long after it
    # was asked for); the survivors' resume counts from there
    landed = max(t_kill, last if last is not None else t_kill)
    seen["kill_landed_after_s"] = round(landed - t_kill, 2)
    resume_s = t_resumed - landed
    seen["kill_resume_s"] = round(resume_s, 2)
    if resume_s > RESUME_LIMIT_S:
        raise SmokeError(
            f"survivors resumed {resume_s:.1f}s after the kill (limit {RESUME_LIMIT_S}s)"
        )
    seen["restore_step"] = restore.get("step")
    seen["restore_ok"] = (
        restore["ev"] == "restore"
        and snaps.get(restore["step"]) == restore["sha256"]
        # the newest sealed snapshot, or a newer one sealed after its last poll
        and (sealed is None or restore["step"] >= sealed)
    )
    if not seen["restore_ok"]:
        raise SmokeError(
            f"restore after the kill: {restore} (snapshots taken: {sorted(snaps)}, "
            f"newest sealed: {sealed})"
        )
    wait_for(
        "the restarted peer to commit",
        lambda: commits_after(stack.events(victim), restore["t"]),
        60,
    )

    # 5. scale up by one: the new peer syncs the state and contributes
    t_scale = time.time()
    stack.compose("up", "-d", "--no-recreate", "--scale", f"peer={peers + 1}")
    new = wait_for("the new peer", lambda: [c for c in stack.peers() if c not in ids] or None, 60)[
        0
    ]
    new_id = stack.member(new)
    everyone = [*ids, new]

    def contributing() -> dict[str, Any] | None:
        evs = stack.events(new)
        first = commits_after(evs, t_scale, world=peers + 1)
        return {"sync": [e for e in evs if e["ev"] == "sync"], "first": first[0]} if first else None

    got = wait_for("the new peer to commit", contributing, 120)
    if not got["sync"] or got["sync"][0]["bytes"] <= 0:
        raise SmokeError(f"the new peer committed without receiving the group's state: {got}")
    seen["join_contributing_s"] = round(got["first"]["t"] - t_scale, 2)
    seen["join_sync_bytes"] = got["sync"][0]["bytes"]
    wait_for("every peer to commit with the new one",
             lambda: all_commit(everyone, peers + 1, got["first"]["t"] - 1), 60)  # fmt: skip
    seen["peers_final"] = len(everyone)
    seen["members"] = sorted(stack.member(c) for c in everyone)
    del new_id

    # 6. Prometheus: every live peer up == 1 (found by DNS), the rules loaded
    addresses = {f"{stack.address(c)}:9464" for c in everyone}

    def targets_up() -> set[str] | None:
        # both views must agree: the up series, and the targets Prometheus scrapes
        # now. A peer that replaced a killed one may reuse its IP: the old series can
        # still read up == 1 while the new target was found but not yet scraped
        # (health "unknown"), which failed CI once after this wait had passed.
        try:
            data = stack.api("/api/v1/query", query='up{job="phalanx"} == 1')
            targets = stack.api("/api/v1/targets")["activeTargets"]
        except (OSError, SmokeError, KeyError):
            return None
        up = {r["metric"]["instance"] for r in data["result"]}
        healthy = {t["labels"]["instance"] for t in targets if t["health"] == "up"}
        return up if up >= addresses and healthy >= addresses else None

    up = wait_for("Prometheus to scrape every peer (up == 1)", targets_up, 90, every=2.0)
    targets = stack.api("/api/v1/targets")["activeTargets"]
    seen["prometheus_targets_up"] = sum(
        1 for t in targets if t["health"] == "up" and t["labels"]["instance"] in addresses
    )
    seen["prometheus_targets"] = len(targets)
    del up
    groups = stack.api("/api/v1/rules")["groups"]
    loaded = {r["name"] for g in groups if g["name"] == "phalanx" for r in g["rules"]}
    missing = alert_names() - loaded
    if missing or not loaded:
        raise SmokeError(f"alert rules not loaded: missing {sorted(missing)}")
    seen["prometheus_rules"] = len(loaded)
    if seen["prometheus_targets_up"] != len(everyone):
        raise SmokeError(
            f"targets up {seen['prometheus_targets_up']} != peers {len(everyone)}: {targets}"
        )
    return seen


def leftovers(stack: Stack) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={stack.project}"
    return {
        kind: sh([DOCKER, *cmd, "--filter", label], env=stack.env).split()
        for kind, cmd in (
            ("containers", ["ps", "-aq"]),
            ("networks", ["network", "ls", "-q"]),
            ("volumes", ["volume", "ls", "-q"]),
        )
    }


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="smoke.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true", help="use the images as they are")
    ap.add_argument("--keep", action="store_true", help="leave the stack up (debugging)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if shutil.which("docker-compose") is None:
        print(
            "smoke: docker-compose is not installed (apt-get install docker-compose)",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    result: dict[str, Any] = {"smoke": "compose"}
    if not args.skip_build:
        t = time.time()
        subprocess.run([str(HERE / "build.sh"), "--debian-base"], check=True, env=env, timeout=900)
        result["build_s"] = round(time.time() - t, 1)
    result["image_mb"] = {
        image: round(int(sh([DOCKER, "image", "inspect", "-f", "{{.Size}}", image], env=env)) / 1e6)
        for image in ("phalanx:latest", "phalanx/prometheus:bookworm")
    }
    tmp = Path(tempfile.mkdtemp(prefix="phalanx-smoke-"))
    secret = tmp / "cluster.secret"
    secret.write_text(os.urandom(32).hex() + "\n")
    os.chown(secret, -1, PEER_UID_GID)  # the image's user reads it through its group
    secret.chmod(0o640)
    port = free_port()
    env.update(
        PHALANX_IMAGE="phalanx:latest",
        PROMETHEUS_IMAGE="phalanx/prometheus:bookworm",
        CLUSTER_SECRET_FILE=str(secret),
        PROMETHEUS_PORT=str(port),
        TRAIN_LOG_EVERY="1",
        TRAIN_SNAPSHOT_EVERY="10",
        TRAIN_STEP_TIME="0.1",
        COMPOSE_HTTP_TIMEOUT="120",
    )
    stack = Stack(f"phalanxsmoke{os.getpid()}", env, port)
    status = 0
    try:
        result.update(scenario(stack, args.peers))
    except (SmokeError, subprocess.SubprocessError) as exc:
        status = 1
        result["error"] = str(exc)[:2000]
        print(f"SMOKE FAILED: {exc}\n{stack.tail_logs()}", file=sys.stderr)
    finally:
        if not args.keep:
            t = time.time()
            try:
                stack.compose("down", "-v", "--timeout", "20", timeout=240)
            except SmokeError as exc:
                status = 1
                result["error"] = result.get("error", "") + f" | down: {exc}"
            stack.close_forwarding()
            left = leftovers(stack)
            result["down_s"] = round(time.time() - t, 1)
            result["down_clean"] = not any(left.values())
            if not result["down_clean"]:
                status = 1
                result["left"] = left
        shutil.rmtree(tmp, ignore_errors=True)
    result["total_s"] = round(time.time() - t0, 1)
    result["ok"] = status == 0
    print(json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

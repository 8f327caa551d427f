"""deploy/k8s/ cannot rot: every flag, PHALANX_* variable, port and probe path the
manifests use must exist in phalanx's command line, config and daemon.

No cluster runs here. The manifests are parsed (PyYAML) and checked against the code
itself: each container's arguments go through the very parser its ``phalanx``
subcommand registers (an unknown flag fails), a daemon container's environment goes
through :func:`phalanx.config.load_config` (which refuses unknown ``PHALANX_*`` names
and badly typed values), ports are compared with the addresses that config yields,
and every HTTP probe path is requested from a real daemon monitor server on
127.0.0.1 (a 404 fails). Cross-references are followed too: Services and the
PodMonitor select the pods and name ports that exist, the coordinator address names
a Service port, the secret file lies in a mounted Secret key, the daemon and the
training container share the socket's emptyDir, a memory-backed /dev/shm and a user.

The negative cases break one thing each in a copy of the manifests and check that
the checker names it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phalanx.cli import COMMANDS
from phalanx.config import load_config
from phalanx.errors import ConfigError
from phalanx.membership.cli import SECRET_ENV
from phalanx.monitor import Monitor

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
ALERTS = K8S.parent / "prometheus" / "alerts.yml"
DEPLOY_DOC = K8S.parents[1] / "docs" / "deploy.md"
#: manifests the user reads or applies by hand, never part of the kustomization
EXAMPLES = ("secret.example.yaml",)
#: what the training process (the client) reads from the environment
CLIENT_ENV = {"PHALANX_SOCKET"}
#: sample values for the downward API, as a kubelet would fill them in
FIELD_SAMPLES = {"metadata.name": "phalanx-peer-0", "status.podIP": "10.244.1.7",
                 "metadata.namespace": "default", "spec.nodeName": "node-1"}  # fmt: skip

Doc = dict[str, Any]


def _read(name: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def applied() -> list[Doc]:
    """Every object of the manifests kustomization.yaml lists (which must be all but
    the examples): what ``kubectl apply -k deploy/k8s`` applies."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(
        p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", *EXAMPLES)
    )
    assert sorted(kust["resources"]) == files, "kustomization.yaml must list every manifest"
    assert not kust.get("secretGenerator"), "apply -k must not write the cluster secret"
    docs: list[Doc] = []
    for name in files:
        docs.extend(_read(name))
    return docs


def load() -> list[Doc]:
    """What runs once the user followed docs/deploy.md: the example Secret (standing
    for the one they create) and everything ``apply -k`` applies."""
    return [d for name in EXAMPLES for d in _read(name)] + applied()


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit; we report
        raise _Refused(message)


def _parse_args(args: list[str]) -> tuple[str, argparse.Namespace]:
    """(subcommand, namespace) through the parser ``phalanx <subcommand>`` registers."""
    if not args or args[0] not in COMMANDS:
        raise _Refused(f"no phalanx subcommand in {args!r}")
    module, _, attr = COMMANDS[args[0]][0].partition(":")
    register = getattr(importlib.import_module(module), attr)
    parser = _Parser(prog=f"phalanx {args[0]}")
    parser.add_argument("--log-level")  # phalanx.cli adds it to every command
    register(parser)
    return args[0], parser.parse_args(args[1:])


def _expand_env(container: Doc) -> tuple[dict[str, str], list[str]]:
    """The container's environment as a kubelet builds it ($(VAR) of earlier entries)."""
    env: dict[str, str] = {}
    problems = []
    for e in container.get("env", []):
        if "value" in e:
            value = str(e["value"])
            for ref in re.findall(r"\$\((\w+)\)", value):
                if ref not in env:
                    problems.append(
                        f"{container['name']}: {e['name']} uses $({ref}), not set before it"
                    )
                value = value.replace(f"$({ref})", env.get(ref, ""))
            env[e["name"]] = value
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = FIELD_SAMPLES[path]
    return env, problems


def _served(path: str) -> bool:
    """Does a daemon's monitor server answer ``path`` (anything but 404)?"""
    mon = Monitor(0)
    try:
        host, port = mon.serve("127.0.0.1", 0)
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
                return bool(r.status != 404)
        except urllib.error.HTTPError as exc:
            return exc.code != 404
    finally:
        mon.close()


def _pods(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, pod template) of every Deployment/StatefulSet."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]


def _port(container: Doc, ref: Any) -> int | None:
    for p in container.get("ports", []):
        if ref in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    return None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check(docs: list[Doc]) -> list[str]:
    """Every inconsistency between the manifests and phalanx (empty: none)."""
    problems: list[str] = []
    secrets = {d["metadata"]["name"]: {**d.get("stringData", {}), **d.get("data", {})}
               for d in docs if d["kind"] == "Secret"}  # fmt: skip
    services = [d for d in docs if d["kind"] == "Service"]
    for workload, pod in _pods(docs):
        labels = pod["metadata"]["labels"]
        if not _selects(workload["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{workload['metadata']['name']}: selector does not match its pods")
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        pod_user = spec.get("securityContext", {}).get("runAsUser")
        sockets: dict[str, str] = {}
        for c in spec["containers"]:
            name = f"{workload['metadata']['name']}/{c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            env, bad = _expand_env(c)
            problems += bad
            ours = {k: v for k, v in env.items() if k.startswith("PHALANX_")}
            try:
                cmd, args = _parse_args(list(c.get("args", [])))
            except _Refused as exc:
                problems.append(f"{name}: {exc}")
                continue
            # probes: paths the daemon serves, ports the container declares
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                act = probe.get("httpGet") or probe.get("tcpSocket") or {}
                if _port(c, act.get("port")) is None:
                    problems.append(
                        f"{name}: {kind} port {act.get('port')!r} is not a container port"
                    )
                if "httpGet" in probe and not _served(probe["httpGet"]["path"]):
                    problems.append(f"{name}: {kind} path {probe['httpGet']['path']} is not served")
            # the secret file lies in a mounted Secret, under one of its keys
            secret_file = ours.get("PHALANX_SECRET_FILE")
            if secret_file:
                folder, _, key = secret_file.rpartition("/")
                vol = volumes.get(mounts.get(folder, ""), {})
                sname = vol.get("secret", {}).get("secretName")
                if sname not in secrets or key not in secrets[sname]:
                    problems.append(f"{name}: {secret_file} is not a key of a mounted Secret")
            if cmd == "daemon":
                try:
                    cfg = load_config({"coordinator": args.coordinator, "listen": args.listen,
                                       "id": args.id, "insecure": args.insecure}, env=ours)  # fmt: skip
                except ConfigError as exc:
                    problems.append(f"{name}: the daemon refuses its environment: {exc}")
                    continue
                if _port(c, "metrics") != cfg.metrics_port:
                    problems.append(
                        f"{name}: port 'metrics' is not the daemon's metrics port {cfg.metrics_port}"
                    )
                if cfg.metrics_host not in ("0.0.0.0", "::"):
                    problems.append(
                        f"{name}: metrics on {cfg.metrics_host}: probes cannot reach it"
                    )
                if _port(c, "data") != int(cfg.listen.rpartition(":")[2]):
                    problems.append(
                        f"{name}: port 'data' is not the data-plane port of {cfg.listen}"
                    )
                if not cfg.id or cfg.incarnation != 0:
                    problems.append(f"{name}: set PHALANX_ID and PHALANX_INCARNATION=0 (restarts)")
                host, _, port = cfg.coordinator.rpartition(":")
                if not any(s["metadata"]["name"] == host and
                           any(p["port"] == int(port) for p in s["spec"]["ports"])
                           for s in services):  # fmt: skip
                    problems.append(f"{name}: coordinator {cfg.coordinator} is no Service port")
                sockets["daemon"] = cfg.socket
            elif cmd == "coordinator":
                extra = set(ours) - {SECRET_ENV}
                if extra:
                    problems.append(f"{name}: the coordinator reads no {sorted(extra)}")
                if _port(c, "grpc") != int(args.listen.rpartition(":")[2]):
                    problems.append(f"{name}: port 'grpc' is not --listen {args.listen}")
            elif cmd == "train":
                extra = set(ours) - CLIENT_ENV
                if extra:
                    problems.append(f"{name}: the training process reads no {sorted(extra)}")
                sockets["trainer"] = args.socket or ours.get("PHALANX_SOCKET", "")
            if cmd in ("daemon", "train"):
                user = c.get("securityContext", {}).get("runAsUser", pod_user)
                if user is None:
                    problems.append(f"{name}: no runAsUser: the daemon serves only its own uid")
                shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir", {})
                if shm.get("medium") != "Memory":
                    problems.append(f"{name}: /dev/shm is not a memory-backed emptyDir")
        if sockets:
            if set(sockets) != {"daemon", "trainer"} or len(set(sockets.values())) != 1:
                problems.append(
                    f"{workload['metadata']['name']}: daemon and trainer sockets differ: {sockets}"
                )
            else:
                folder = sockets["daemon"].rpartition("/")[0]
                users = [c for c in spec["containers"]
                         if any(m["mountPath"] == folder for m in c.get("volumeMounts", []))]  # fmt: skip
                vol = {
                    m["name"] for c in users for m in c["volumeMounts"] if m["mountPath"] == folder
                }
                if len(users) != 2 or len(vol) != 1 or "emptyDir" not in volumes.get(vol.pop(), {}):
                    problems.append(
                        f"{workload['metadata']['name']}: {folder} is not one shared emptyDir"
                    )
    # Services and the PodMonitor select pods and name their ports
    pods = [(p["metadata"]["labels"], p["spec"]["containers"]) for _, p in _pods(docs)]
    for s in services:
        hit = [cs for labels, cs in pods if _selects(s["spec"]["selector"], labels)]
        if not hit:
            problems.append(f"Service {s['metadata']['name']} selects no pods")
        for p in s["spec"]["ports"]:
            if not any(_port(c, p.get("targetPort", p["port"])) for cs in hit for c in cs):
                problems.append(
                    f"Service {s['metadata']['name']}: targetPort {p.get('targetPort')} not on its pods"
                )
    jobs = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    for m in (d for d in docs if d["kind"] == "PodMonitor"):
        hit = [
            (labels, cs)
            for labels, cs in pods
            if _selects(m["spec"]["selector"]["matchLabels"], labels)
        ]
        if not hit:
            problems.append(f"PodMonitor {m['metadata']['name']} selects no pods")
        for ep in m["spec"]["podMetricsEndpoints"]:
            if not any(_port(c, ep["port"]) for _, cs in hit for c in cs):
                problems.append(f"PodMonitor: port {ep['port']} not on its pods")
            if not _served(ep.get("path", "/metrics")):
                problems.append(f"PodMonitor: path {ep.get('path')} is not served")
        job = {labels.get(m["spec"].get("jobLabel", ""), "") for labels, _ in hit}
        if job != jobs:
            problems.append(f"PodMonitor: job label {job} is not the alerts' job {jobs}")
    return problems


def test_manifests_match_the_code() -> None:
    docs = load()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "PodMonitor", "Secret", "Service", "Service", "StatefulSet"]
    assert check(docs) == []


def test_apply_k_never_overwrites_the_cluster_secret() -> None:
    """``kubectl apply -k deploy/k8s`` after ``kubectl create secret ...`` (the docs'
    order) used to put the placeholder REPLACE-ME over the real secret, and again at
    every later apply (an image bump): the kustomization must apply no Secret."""
    assert [d["kind"] for d in applied() if d["kind"] == "Secret"] == []
    text = DEPLOY_DOC.read_text()
    k8s = text[text.index("## Kubernetes") :]
    create = k8s.index("kubectl create secret generic phalanx-cluster-secret")
    assert create < k8s.index("kubectl apply -k deploy/k8s"), "create the secret first"
    # the docs' command makes the Secret the pods mount (the example's name and key)
    (example,) = _read("secret.example.yaml")
    assert example["metadata"]["name"] == "phalanx-cluster-secret"
    assert f"--from-literal={next(iter(example['stringData']))}=" in k8s


def _container(docs: list[Doc], name: str) -> Doc:
    for _, pod in _pods(docs):
        for c in pod["spec"]["containers"]:
            if c["name"] == name:
                return c  # type: ignore[no-any-return]
    raise KeyError(name)


def _broken(change: str) -> list[Doc]:
    docs = copy.deepcopy(load())
    daemon = _container(docs, "daemon")
    if change == "flag":
        daemon["args"] = [*daemon["args"], "--snapshot-budgett", "10"]
    elif change == "env":
        daemon["env"].append({"name": "PHALANX_SNAPSHOT_BUDGET", "value": "10"})
    elif change == "probe":
        daemon["readinessProbe"]["httpGet"]["path"] = "/health"
    elif change == "port":
        daemon["ports"][1]["containerPort"] = 9465
    elif change == "socket":
        _container(docs, "trainer")["env"][0]["value"] = "/tmp/daemon.sock"
    elif change == "trainer-flag":
        _container(docs, "trainer")["args"].append("--snapshot-evry=5")
    return docs


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("flag", "--snapshot-budgett"),
        ("env", "PHALANX_SNAPSHOT_BUDGET"),
        ("probe", "/health"),
        ("port", "metrics"),
        ("socket", "sockets differ"),
        ("trainer-flag", "--snapshot-evry"),
    ],
)
def test_a_manifest_naming_what_phalanx_lacks_fails(change: str, named: str) -> None:
    problems = check(_broken(change))
    assert problems, f"{change}: the checker found nothing"
    assert any(named in p for p in problems), problems

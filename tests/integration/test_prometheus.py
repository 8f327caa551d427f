"""A real Prometheus (Debian's 2.42 binary) scrapes a 3-rank group's monitors.

The ranks are threads of this process, each with its own Monitor (own registry) and
HTTP port; every ring link goes through a LinkProxy adding 1 ms (an emulated network),
and a ClusterView feeds the sender x receiver matrix back into the monitors. After a
healthy stretch the 0 -> 1 link is slowed 20x; the PhalanxSlowLink alert expression
must then return that link through Prometheus's HTTP API. Also: ``promtool check
metrics`` is clean on a scrape, the alert rules load, and every query of the Grafana
dashboard returns data from this Prometheus.

Skipped only when the prometheus/promtool binaries are absent (CI installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phalanx.comm import CommOptions, Group, bind
from phalanx.monitor import ClusterView, Monitor, Verdict
from phalanx.testing.throttle import LinkProxy
from tests.integration._procs import stop

ROOT = Path(__file__).resolve().parents[2]
PROM = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROM is None or PROMTOOL is None,
    reason="the prometheus binary is absent (apt-get install prometheus; .ci/run does)",
)

WORLD = 3
BASE_S = 0.001
#: the slow link's added delay. It must stand far above the baseline's noise, which is
#: not the emulated 1 ms: on a loaded host the ranks and proxies share the GIL and a
#: couple of cores, and healthy latencies spike to 5-15 ms, so the slow-link detector's
#: robust scale (the q90 tail of the baseline) reaches 0.7-1.9 ms. A 5 ms link (4 ms
#: excess) then scores z ~ 5 < 6: no hit, so those samples join the baseline, lift its
#: q90 and mask the link for good -- by the detector's own rule that is noise-sized, not
#: a slow link. 20 ms (19 ms excess) is z >= 10 against the noisiest baseline seen.
SLOW_S = 20 * BASE_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data: bytes = resp.read()
        return data


class _Cluster:
    """WORLD ranks in threads, looping small all-reduces until stopped."""

    def __init__(self, secret: bytes) -> None:
        listeners = [bind("127.0.0.1:0") for _ in range(WORLD)]
        real = [listener.address for listener in listeners]
        lists = [list(real) for _ in range(WORLD)]
        self.proxies: dict[tuple[int, int], LinkProxy] = {}
        for r in range(WORLD):
            a, b = r, (r + 1) % WORLD
            lo, hi = min(a, b), max(a, b)
            proxy = LinkProxy(real[lo])
            proxy.set(down_delay_s=BASE_S, up_delay_s=BASE_S)
            self.proxies[(a, b)] = proxy
            lists[hi][lo] = proxy.address
        self.monitors: list[Monitor] = []
        self.view = ClusterView(WORLD, self._record)
        self.monitors = [Monitor(r, cluster=self.view) for r in range(WORLD)]
        self.groups: list[Group | None] = [None] * WORLD
        opts = CommOptions(small_bytes=0, piece_bytes=4096, crowded_piece_bytes=0, timeout_s=10.0)

        def build(r: int) -> None:
            self.groups[r] = Group(
                r, lists[r], secret, listener=listeners[r], options=opts,
                observer=self.monitors[r].observer,
            )  # fmt: skip

        threads = [threading.Thread(target=build, args=(r,)) for r in range(WORLD)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
        self.ports: list[int] = []
        for r, mon in enumerate(self.monitors):
            g = self.groups[r]
            assert g is not None
            mon.attach(g.engine)
            mon.start()
            self.ports.append(mon.serve("127.0.0.1", 0)[1])
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.loops = [threading.Thread(target=self._loop, args=(r,)) for r in range(WORLD)]
        for t in self.loops:
            t.start()

    def _record(self, v: Verdict) -> None:
        self.monitors[v.dst if v.dst is not None else 0].record(v)

    def _loop(self, r: int) -> None:
        g = self.groups[r]
        assert g is not None
        x = np.ones(4096, dtype=np.float32)
        try:
            while not self.stop.is_set():
                time.sleep(0.001)
                g.all_reduce(x)
        except BaseException as exc:  # the other ranks stop with an error too
            if not self.stop.is_set():
                self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        for t in self.loops:
            t.join(15.0)
        for g in self.groups:
            if g is not None:
                g.close()
        for m in self.monitors:
            m.close()
        for p in self.proxies.values():
            p.close()


@pytest.fixture
def cluster(secret: bytes) -> Iterator[_Cluster]:
    c = _Cluster(secret)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def prometheus(tmp_path: Path, cluster: _Cluster) -> Iterator[str]:
    (tmp_path / "targets").mkdir()
    targets = [
        {"targets": [f"127.0.0.1:{p}"], "labels": {"rank": str(r)}}
        for r, p in enumerate(cluster.ports)
    ]
    (tmp_path / "targets" / "phalanx.json").write_text(json.dumps(targets))
    # the shipped config, with 1 s intervals (no YAML library: plain substitutions)
    config = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    for key in ("scrape_interval", "evaluation_interval", "refresh_interval"):
        config, n = re.subn(rf"({key}): \S+", r"\1: 1s", config)
        assert n == 1, key
    shutil.copy(ROOT / "deploy/prometheus/alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(config)
    port = _free_port()
    assert PROM is not None
    proc = subprocess.Popen(
        [
            PROM,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                if _get(url + "/-/ready", 1.0):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        stop(proc, grace=10.0)


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr})
    body = json.loads(_get(f"{url}/api/v1/query?{q}"))
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _wait_for(url: str, expr: str, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        result = _query(url, expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def _alert_expr(name: str) -> str:
    """The one-line ``expr`` of alert ``name`` in the shipped rules."""
    text = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    m = re.search(rf"- alert: {name}\n\s+expr: (.+)\n", text)
    assert m is not None and not m.group(1).startswith(">"), name
    return m.group(1).strip()


def test_slow_link_alert_fires_in_real_prometheus(
    cluster: _Cluster, prometheus: str, tmp_path: Path
) -> None:
    url = prometheus
    # every daemon is scraped
    up = _wait_for(url, 'count(up{job="phalanx"} == 1) == 3', 30.0)
    assert up, _query(url, "up")
    # healthy: enough ops for every baseline, and the alert stays quiet
    deadline = time.monotonic() + 30.0
    while min(m.ops_seen for m in cluster.monitors) < 150 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not cluster.errors, cluster.errors
    slow = _alert_expr("PhalanxSlowLink")
    assert _query(url, slow) == []

    # promtool check metrics is clean on a real scrape (done while healthy)
    scrape = _get(f"http://127.0.0.1:{cluster.ports[1]}/metrics")
    assert PROMTOOL is not None
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()

    # slow the 0 -> 1 link 20x (1 ms -> 20 ms; see SLOW_S); rank 1 connected to rank 0,
    # so "down"
    cluster.proxies[(0, 1)].set(down_delay_s=SLOW_S, up_delay_s=BASE_S)
    fired = _wait_for(url, slow, 30.0)
    assert fired, [v.as_dict() for m in cluster.monitors for v in m.verdicts()]
    labels = {(r["metric"]["instance"], r["metric"]["peer"]) for r in fired}
    assert (f"127.0.0.1:{cluster.ports[1]}", "0") in labels
    verdicts = [v for m in cluster.monitors for v in m.verdicts() if v.kind == "slow_link"]
    assert verdicts and all((v.src, v.dst) == (0, 1) for v in verdicts), verdicts
    alerts = json.loads(_get(f"{url}/api/v1/alerts"))["data"]["alerts"]
    deadline = time.monotonic() + 10.0
    while not any(a["labels"]["alertname"] == "PhalanxSlowLink" for a in alerts):
        assert time.monotonic() < deadline, alerts
        time.sleep(0.5)
        alerts = json.loads(_get(f"{url}/api/v1/alerts"))["data"]["alerts"]

    # every query of the Grafana dashboard returns data from this Prometheus
    dash = json.loads((ROOT / "deploy/grafana/dashboards/phalanx.json").read_text())
    empty = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            if not _wait_for(url, target["expr"], 10.0):
                empty.append(f"{panel['title']}: {target['expr']}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    assert not cluster.errors, cluster.errors


def test_alert_rules_pass_promtool() -> None:
    assert PROMTOOL is not None
    d = ROOT / "deploy/prometheus"
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=d, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    test = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=d, capture_output=True, timeout=30
    )
    assert test.returncode == 0, test.stdout.decode() + test.stderr.decode()
    conf = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=d, capture_output=True, timeout=30
    )
    assert conf.returncode == 0, conf.stdout.decode() + conf.stderr.decode()
    assert os.path.exists(d / "alerts.yml")

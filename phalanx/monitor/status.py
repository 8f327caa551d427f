"""``phalanx status``: a live terminal view of a cluster, read from the daemons' monitors.

Each daemon's monitor serves ``/metrics`` (Prometheus text), ``/healthz`` and
``/anomalies`` (JSON). This command polls every target, turns counter deltas into
rates, and redraws one screen: the view (epoch, members), per daemon its health, op
rate and latency, per link the bytes per second both ways and the TCP round-trip
time (the slowest of the peer's streams), and the anomalies that are active now. A
counter that went down between two polls was reset (the daemon restarted) and counts
from zero, as in Prometheus' ``rate()``: rates are never negative. ``--once`` prints
one snapshot and exits (scripts, tests); ``--json`` prints the snapshot as one JSON
object per poll.

Pure helpers (:func:`parse_metrics`, :func:`summarize`, :func:`render`) do no I/O and
are tested alone; only :func:`poll` touches the network, with a deadline per request.
It never changes anything on a daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Snapshot", "TargetState", "parse_metrics", "poll", "register", "render", "summarize"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            if label in d:
                out[d[label]] = out.get(d[label], 0.0) + v
    return out


def _max_by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The largest value per ``label`` (a peer's RTT over its streams: the slowest
    stream, never their sum)."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            if label in d:
                out[d[label]] = max(out.get(d[label], v), v)
    return out


def _sum(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _increase(cur: Samples, old: Samples, name: str, label: str | None = None) -> dict[str, float]:
    """How much counter ``name`` grew between two polls, per series, summed per value
    of ``label`` (all series under ``""`` when ``label`` is None). As Prometheus'
    ``rate()`` does, a series that went down was reset (a restarted daemon): it counts
    from zero, so its increase is its current value."""
    out: dict[str, float] = {}
    for key, v in cur.items():
        if key[0] != name:
            continue
        group = "" if label is None else dict(key[1]).get(label)
        if group is None:
            continue
        before = old.get(key, 0.0)
        out[group] = out.get(group, 0.0) + (v - before if v >= before else v)
    return out


@dataclass
class TargetState:
    """What one poll of one daemon returned (``error`` set when it did not answer)."""

    target: str
    at: float
    samples: Samples = field(default_factory=dict)
    healthy: bool = False
    health_detail: str = ""
    anomalies: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Snapshot:
    """Rates and state of the whole cluster between two polls."""

    rows: tuple[dict[str, Any], ...]
    links: tuple[dict[str, Any], ...]
    anomalies: tuple[dict[str, Any], ...]
    epochs: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": list(self.epochs),
            "daemons": list(self.rows),
            "links": list(self.links),
            "anomalies": list(self.anomalies),
        }


def summarize(prev: Sequence[TargetState] | None, cur: Sequence[TargetState]) -> Snapshot:
    """Turn two consecutive polls into rates (the first poll: totals, no rates)."""
    before = {t.target: t for t in prev or ()}
    rows: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    anomalies: list[dict[str, Any]] = []
    epochs: set[int] = set()
    for t in cur:
        row: dict[str, Any] = {"target": t.target, "up": not t.error}
        if t.error:
            row["error"] = t.error
            rows.append(row)
            continue
        s = t.samples
        rank = _value(s, "phalanx_rank")
        epoch = _value(s, "phalanx_view_epoch")
        members = _value(s, "phalanx_view_members")
        ops = _sum(s, "phalanx_op_duration_seconds_count")
        row.update(
            rank=None if rank is None else int(rank),
            epoch=None if epoch is None else int(epoch),
            members=None if members is None else int(members),
            healthy=t.healthy,
            health=t.health_detail,
            ops=int(ops),
        )
        if epoch is not None:
            epochs.add(int(epoch))
        old = before.get(t.target)
        dt = (t.at - old.at) if old is not None and not old.error else 0.0
        sent = _by_label(s, "phalanx_link_sent_bytes_total", "peer")
        recv = _by_label(s, "phalanx_link_received_bytes_total", "peer")
        rtt = _max_by_label(s, "phalanx_link_rtt_seconds", "peer")
        d_sent: dict[str, float] = {}
        d_recv: dict[str, float] = {}
        if dt > 0 and old is not None:
            o = old.samples
            d_ops = _increase(s, o, "phalanx_op_duration_seconds_count").get("", 0.0)
            d_secs = _increase(s, o, "phalanx_op_duration_seconds_sum").get("", 0.0)
            row["ops_per_s"] = d_ops / dt
            row["mean_op_ms"] = (d_secs / d_ops * 1e3) if d_ops > 0 else None
            d_sent = _increase(s, o, "phalanx_link_sent_bytes_total", "peer")
            d_recv = _increase(s, o, "phalanx_link_received_bytes_total", "peer")
        for peer in sorted(set(sent) | set(recv), key=lambda p: (len(p), p)):
            link: dict[str, Any] = {"from": row["rank"], "peer": peer}
            if dt > 0:
                link["send_Bps"] = d_sent.get(peer, 0.0) / dt
                link["recv_Bps"] = d_recv.get(peer, 0.0) / dt
            link["sent_bytes"] = sent.get(peer, 0.0)
            link["recv_bytes"] = recv.get(peer, 0.0)
            if peer in rtt:
                link["rtt_ms"] = rtt[peer] * 1e3
            links.append(link)
        for a in t.anomalies.get("active", []) if isinstance(t.anomalies, dict) else []:
            anomalies.append({"seen_by": row["rank"], **a})
        rows.append(row)
    return Snapshot(tuple(rows), tuple(links), tuple(anomalies), tuple(sorted(epochs)))


def _fmt_rate(bps: float | None) -> str:
    if bps is None:
        return "-"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} B/s"


def render(snap: Snapshot, now: float | None = None) -> str:
    """The screen for one snapshot (plain text, no terminal codes)."""
    lines = []
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    if len(snap.epochs) > 1:
        view = f"epochs {', '.join(map(str, snap.epochs))} (daemons disagree: a view change is in progress)"
    elif snap.epochs:
        view = f"epoch {snap.epochs[0]}"
    else:
        view = "no view yet"
    lines.append(f"phalanx status  {stamp}  {view}")
    lines.append("")
    lines.append(
        f"{'daemon':<22} {'rank':>4} {'epoch':>5} {'members':>7} {'health':<10} {'ops/s':>8} {'mean op':>9}"
    )
    for r in snap.rows:
        if not r["up"]:
            lines.append(f"{r['target']:<22} {'DOWN':>4}  {r.get('error', '')}")
            continue
        health = "ok" if r["healthy"] else "UNHEALTHY"
        ops_s = r.get("ops_per_s")
        mean = r.get("mean_op_ms")
        lines.append(
            f"{r['target']:<22} {r['rank'] if r['rank'] is not None else '-':>4} "
            f"{r['epoch'] if r['epoch'] is not None else '-':>5} "
            f"{r['members'] if r['members'] is not None else '-':>7} {health:<10} "
            f"{'-' if ops_s is None else f'{ops_s:.1f}':>8} "
            f"{'-' if mean is None else f'{mean:.2f} ms':>9}"
        )
    lines.append("")
    lines.append(f"{'link':<12} {'send':>12} {'recv':>12} {'rtt':>9}")
    for link in snap.links:
        rtt = link.get("rtt_ms")
        lines.append(
            f"{str(link['from']) + ' -> ' + link['peer']:<12} {_fmt_rate(link.get('send_Bps')):>12} "
            f"{_fmt_rate(link.get('recv_Bps')):>12} {'-' if rtt is None else f'{rtt:.2f} ms':>9}"
        )
    lines.append("")
    if snap.anomalies:
        lines.append("anomalies (active):")
        for a in snap.anomalies:
            lines.append(f"  {a.get('kind')} peer={a.get('peer')} seen by rank {a.get('seen_by')}")
    else:
        lines.append("anomalies: none")
    return "\n".join(lines)


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def poll(targets: Sequence[str], timeout: float = 2.0) -> list[TargetState]:
    """One round of requests to every target (``host:port`` of a monitor endpoint)."""
    out = []
    for target in targets:
        state = TargetState(target, time.monotonic())
        base = f"http://{target}"
        try:
            code, text = _get(base + "/metrics", timeout)
            if code != 200:
                raise OSError(f"/metrics answered {code}")
            state.samples = parse_metrics(text)
            code, text = _get(base + "/healthz", timeout)
            state.healthy = code == 200
            state.health_detail = text.strip()[:120]
            code, text = _get(base + "/anomalies", timeout)
            state.anomalies = json.loads(text) if code == 200 else {}
        except (OSError, ValueError) as exc:
            state.error = str(exc)[:160]
        out.append(state)
    return out


def _targets(args: argparse.Namespace) -> list[str]:
    targets: list[str] = []
    for chunk in args.targets or []:
        targets.extend(t.strip() for t in chunk.split(",") if t.strip())
    if args.file_sd:
        data = json.loads(Path(args.file_sd).read_text())
        for group in data:
            targets.extend(str(t) for t in group.get("targets", []))
    return targets


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.description = (
        "Live view of a phalanx cluster: view, members, op rates, link rates and RTT, "
        "active anomalies -- polled from each daemon's monitor endpoint."
    )
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="HOST:PORT",
        help="monitor endpoints (a daemon's --metrics-port), comma or space separated",
    )
    parser.add_argument(
        "--file-sd",
        metavar="FILE",
        help="read targets from a Prometheus file_sd JSON file (as in deploy/prometheus)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls (default 1)"
    )
    parser.add_argument("--once", action="store_true", help="poll twice (for rates), print, exit")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per poll instead of a screen"
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="deadline per request (default 2 s)"
    )
    return _run


def _run(args: argparse.Namespace) -> int:
    targets = _targets(args)
    if not targets:
        sys.stderr.write("phalanx status: no targets (give HOST:PORT or --file-sd FILE)\n")
        return 2
    interval = max(0.1, float(args.interval))
    prev = poll(targets, args.timeout)
    try:
        while True:
            time.sleep(interval)
            cur = poll(targets, args.timeout)
            snap = summarize(prev, cur)
            if args.json:
                sys.stdout.write(json.dumps(snap.as_dict()) + "\n")
            else:
                if not args.once and sys.stdout.isatty():
                    sys.stdout.write("\x1b[2J\x1b[H")
                sys.stdout.write(render(snap) + "\n")
            sys.stdout.flush()
            prev = cur
            if args.once:
                return 0 if all(not t.error for t in cur) else 1
    except KeyboardInterrupt:
        return 0

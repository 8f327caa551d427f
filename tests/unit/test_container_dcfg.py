"""Pure parts of the container layer that the deploy files depend on: the peer
supervisor's training command (``--`` separators) and stop budget (against compose's
grace period), and the image's health check (what it asks, per container command)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from phalanx.container import peer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _peer_args(words: list[str]) -> argparse.Namespace:
    """``phalanx peer WORDS...`` parsed the way phalanx.cli does: the top-level parser
    (command + REMAINDER) first, then the parser ``peer.register`` fills."""
    top = argparse.ArgumentParser()
    top.add_argument("command")
    top.add_argument("args", nargs=argparse.REMAINDER)
    ns = top.parse_args(["peer", *words])
    leaf = argparse.ArgumentParser()
    leaf.add_argument("--log-level")
    peer.register(leaf)
    return leaf.parse_args(ns.args)


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        # the trainer's own `--` survives (every `--` used to be dropped)
        (["--", "python", "train.py", "--", "--lr", "0.1"],
         ["python", "train.py", "--", "--lr", "0.1"]),
        (["--stop-timeout", "5", "--", "python", "train.py", "--", "--lr", "0.1"],
         ["python", "train.py", "--", "--lr", "0.1"]),
        (["--", "python", "train.py", "--lr", "0.1"], ["python", "train.py", "--lr", "0.1"]),
        (["--stop-timeout", "5", "--", "phalanx", "train"], ["phalanx", "train"]),
    ],
)  # fmt: skip
def test_only_the_separator_before_the_training_command_is_dropped(
    words: list[str], expected: list[str]
) -> None:
    assert peer.trainer_command(_peer_args(words).trainer) == expected


def test_no_training_command_runs_phalanx_train() -> None:
    assert peer.trainer_command(_peer_args([]).trainer) == [
        sys.executable, "-m", "phalanx", "train"
    ]  # fmt: skip
    assert peer.trainer_command(["--"]) == [sys.executable, "-m", "phalanx", "train"]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text))
    assert m, text
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]


def test_the_whole_peer_stop_fits_in_the_containers_grace_period() -> None:
    """SIGTERM: trainer, then daemon, each used to get the full --stop-timeout (20 +
    20 s), past compose's 30 s stop_grace_period: Docker SIGKILLed the daemon before
    it left. Now the stop takes --stop-timeout in all, the trainer at most half."""
    total = _peer_args([]).stop_timeout
    for took in (0.0, 1.0, total / 2, total / 2 + 0.2, total):
        trainer_s, daemon_s = peer.stop_budget(total, took)
        assert trainer_s <= total / 2
        assert daemon_s >= total / 2  # the daemon always keeps time to drain and leave
        assert min(took, trainer_s) + daemon_s <= total
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    grace = _seconds(compose["x-phalanx"]["stop_grace_period"])
    assert total + 5.0 <= grace, (total, grace)
    # the peer service does not raise it above the grace period either
    assert "--stop-timeout" not in compose["services"]["peer"]["command"]


def test_the_k8s_grace_period_covers_the_daemons_stop() -> None:
    """On Kubernetes the daemon container gets SIGTERM itself: its drain plus its
    leave must end before terminationGracePeriodSeconds."""
    from phalanx.config import PhalanxConfig

    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "peers.yaml").read_text()) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    cfg = PhalanxConfig()
    assert cfg.drain_timeout + cfg.membership.rpc_timeout + 5.0 <= grace


# ---------------------------------------------------------------- the health check


@pytest.fixture(scope="module")
def hc() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "phalanx_healthcheck", DEPLOY / "docker" / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PY = ["/opt/phalanx/bin/python3", "/opt/phalanx/bin/phalanx"]  # the console script


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        # the image's default command: the supervisor gives its daemon 9464
        ([*PY, "peer"], {}, ("http", "127.0.0.1", 9464)),
        ([*PY, "peer"], {"PHALANX_METRICS_PORT": "9500", "PHALANX_METRICS_HOST": "0.0.0.0"},
         ("http", "127.0.0.1", 9500)),
        (["/sbin/docker-init", "--", *PY, "peer"], {}, ("http", "127.0.0.1", 9464)),
        # a daemon with a fixed port: from the flag, else the environment
        ([*PY, "daemon", "--metrics-port", "9400"], {}, ("http", "127.0.0.1", 9400)),
        ([*PY, "--log-level", "DEBUG", "daemon", "--metrics-port=9401"], {},
         ("http", "127.0.0.1", 9401)),
        (["python", "-m", "phalanx", "daemon"], {"PHALANX_METRICS_PORT": "9464"},
         ("http", "127.0.0.1", 9464)),
        ([*PY, "coordinator", "--listen", "0.0.0.0:7000"], {}, ("tcp", "127.0.0.1", 7000)),
        # not phalanx's command: as before, the variable or 9464
        (["/app/run.sh"], {}, ("http", "127.0.0.1", 9464)),
    ],
)  # fmt: skip
def test_the_health_check_asks_the_port_the_command_serves(
    hc: ModuleType, argv: list[str], env: dict[str, str], expected: tuple[str, str, int]
) -> None:
    assert hc.plan(argv, env) == expected


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        ([*PY, "daemon", "--coordinator", "c:7000"], {}),  # random port on 127.0.0.1
        ([*PY, "daemon"], {"PHALANX_METRICS_PORT": "0"}),
        ([*PY, "daemon", "--metrics-port", "-1"], {"PHALANX_METRICS_PORT": "9464"}),
        ([*PY, "train", "--step-time", "0.1"], {}),
        ([*PY, "peer"], {"PHALANX_METRICS_PORT": "-1"}),
    ],
)
def test_a_container_serving_no_fixed_metrics_port_is_healthy(
    hc: ModuleType,
    argv: list[str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A plain `phalanx daemon` (metrics on a random port) or a `phalanx train`
    container used to be reported unhealthy forever (port 9464 never answered)."""
    kind, message, _ = hc.plan(argv, env)
    assert kind == "none" and "nothing to check" in message
    monkeypatch.setattr(hc, "_main_argv", lambda: argv)
    for k in ("PHALANX_METRICS_PORT", "PHALANX_METRICS_HOST"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert hc.main([]) == 0
    assert capsys.readouterr().out.startswith("healthy:")


def test_the_health_check_reads_a_daemons_config_file(hc: ModuleType, tmp_path: Path) -> None:
    f = tmp_path / "phalanx.toml"
    f.write_text('metrics_port = 9410\nmetrics_host = "0.0.0.0"\n')
    assert hc.plan([*PY, "daemon", "--config", str(f)], {}) == ("http", "127.0.0.1", 9410)
    # precedence as the daemon's: flag > environment > file
    env = {"PHALANX_METRICS_PORT": "9411"}
    assert hc.plan([*PY, "daemon", "--config", str(f)], env)[2] == 9411

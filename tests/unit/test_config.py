"""PhalanxConfig: one precedence order (flags > PHALANX_* env > TOML file > defaults),
nested sections, unknown names refused, values validated, secrets never printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phalanx.config import PhalanxConfig, load_config
from phalanx.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "phalanx.toml"
    p.write_text(text)
    return p


def test_defaults_are_the_parts_own() -> None:
    cfg = load_config(env={})
    assert cfg == PhalanxConfig()
    assert cfg.comm.streams == 1 and cfg.membership.heartbeat_timeout == 0.6


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    f = _toml(
        tmp_path,
        'coordinator = "file:1"\nzone = "z-file"\nop_timeout = 7\n'
        "[comm]\nstreams = 3\ntimeout_s = 4\n[monitor.detectors]\nk = 2\n",
    )
    env = {"PHALANX_COORDINATOR": "env:2", "PHALANX_COMM_STREAMS": "2"}
    cfg = load_config({"coordinator": "flag:3", "zone": None}, env=env, file=f)
    assert cfg.coordinator == "flag:3"  # flag beats env and file
    assert cfg.comm.streams == 2  # env beats file
    assert cfg.comm.timeout_s == 4.0 and cfg.op_timeout == 7.0  # file (ints accepted as floats)
    assert cfg.zone == "z-file"  # a flag given as None is "not given"
    assert cfg.monitor.detectors.k == 2  # nested section


def test_env_values_are_typed() -> None:
    env = {
        "PHALANX_INSECURE": "yes",
        "PHALANX_METRICS_PORT": "9100",
        "PHALANX_MEMBERSHIP_PROBE_ADDRESSES": "false",
        "PHALANX_MONITOR_DETECTORS_HANG_FLOOR_S": "2.5",
    }
    cfg = load_config(env=env)
    assert cfg.insecure is True and cfg.metrics_port == 9100
    assert cfg.membership.probe_addresses is False
    assert cfg.monitor.detectors.hang_floor_s == 2.5
    with pytest.raises(ConfigError, match="PHALANX_METRICS_PORT"):
        load_config(env={"PHALANX_METRICS_PORT": "many"})


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PHALANX_COMM_STREEMS"):
        load_config(env={"PHALANX_COMM_STREEMS": "2"})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(env={}, file=_toml(tmp_path, "[comm]\nstreems = 2\n"))
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({"no_such_flag": 1}, env={})
    # variables of other tools are not ours to refuse
    assert load_config(env={"PHALANX_LOG_LEVEL": "DEBUG"}) == PhalanxConfig()


def test_values_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="streams"):
        load_config({"comm": {"streams": 0}}, env={})
    with pytest.raises(ConfigError, match="expected int"):
        load_config(env={}, file=_toml(tmp_path, '[comm]\nstreams = "two"\n'))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config({"coordinator": "nohostport"}, env={})
    with pytest.raises(ConfigError, match="heartbeat_timeout"):
        load_config(env={"PHALANX_MEMBERSHIP_HEARTBEAT_TIMEOUT": "0.1"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={}, file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError):
        load_config(env={}, file=_toml(tmp_path, "not toml ["))


def test_describe_lists_every_setting_and_no_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-s3cr3t-s3cr3t")
    cfg = load_config({"secret_file": str(secret_file), "coordinator": "h:1"}, env={})
    text = cfg.describe()
    assert "coordinator = 'h:1'" in text and "comm.streams = 1" in text
    assert "monitor.detectors.k = 4" in text and "membership.heartbeat_timeout" in text
    assert "s3cr3t" not in text  # the config holds the path, never the secret


def test_frozen() -> None:
    cfg = PhalanxConfig()
    with pytest.raises(AttributeError):
        cfg.coordinator = "x:1"  # type: ignore[misc]


def test_straggler_eviction_is_opt_in_and_set_from_the_environment() -> None:
    from phalanx.config import load_config

    assert load_config(env={}).monitor.evict_stragglers is False
    cfg = load_config(env={"PHALANX_MONITOR_EVICT_STRAGGLERS": "true"})
    assert cfg.monitor.evict_stragglers is True


def test_layers_are_merged_before_the_cross_field_checks(tmp_path: Path) -> None:
    """A file's heartbeat_interval with the environment's timeout and window is a valid
    combination; it was refused (blaming the file) because the file was validated with
    the defaults' timeout before the environment was applied."""
    f = _toml(tmp_path, "[membership]\nheartbeat_interval = 0.5\n")
    env = {
        "PHALANX_MEMBERSHIP_HEARTBEAT_TIMEOUT": "2.0",
        "PHALANX_MEMBERSHIP_CONFIRM_WINDOW": "0.5",
    }
    cfg = load_config(env=env, file=f)
    assert (cfg.membership.heartbeat_interval, cfg.membership.heartbeat_timeout) == (0.5, 2.0)
    assert cfg.membership.confirm_window == 0.5
    # a flag may repair what the environment and the file set, too
    cfg = load_config({"membership": {"heartbeat_timeout": 3.0, "confirm_window": 0.5}},
                      env={"PHALANX_MEMBERSHIP_HEARTBEAT_TIMEOUT": "0.7"}, file=f)  # fmt: skip
    assert cfg.membership.heartbeat_timeout == 3.0
    # the final combination is still checked, naming where its values came from
    with pytest.raises(ConfigError, match="heartbeat_timeout") as err:
        load_config(env={**env, "PHALANX_MEMBERSHIP_HEARTBEAT_TIMEOUT": "0.8"}, file=f)
    assert str(f) in str(err.value) and "$PHALANX_MEMBERSHIP_HEARTBEAT_TIMEOUT" in str(err.value)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"listen": "127.0.0.1:abc"}, "listen"),
        ({"listen": ":99999"}, "listen"),
        ({"listen": "127.0.0.1:65536"}, "listen"),
        ({"listen": "127.0.0.1:"}, "listen"),
        ({"listen": "::1:7100"}, "listen"),  # IPv6 goes in brackets
        ({"coordinator": "h:0"}, "coordinator"),  # a coordinator needs a real port
        ({"coordinator": "h:x"}, "coordinator"),
        ({"coordinator": ":7000"}, "coordinator"),
        ({"snapshot": {"listen": "0.0.0.0:70000"}}, "snapshot.listen"),
        ({"snapshot": {"listen": "0.0.0.0:p"}}, "snapshot.listen"),
    ],
)
def test_addresses_are_parsed(flags: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(named)} must be HOST:PORT"):
        load_config(flags, env={})


def test_good_addresses_are_accepted() -> None:
    cfg = load_config(
        {"listen": "[::1]:0", "coordinator": "coordinator:7000",
         "snapshot": {"listen": "10.0.0.5:0"}},
        env={},
    )  # fmt: skip
    assert (cfg.listen, cfg.coordinator, cfg.snapshot.listen) == (
        "[::1]:0", "coordinator:7000", "10.0.0.5:0"
    )  # fmt: skip
    assert load_config({"listen": "0.0.0.0:7100"}, env={}).listen == "0.0.0.0:7100"
    with pytest.raises(ConfigError, match="PHALANX_LISTEN"):  # names the variable
        load_config(env={"PHALANX_LISTEN": "127.0.0.1:abc"})


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "-inf"])
def test_switch_interval_must_be_finite_and_positive(value: str) -> None:
    with pytest.raises(ConfigError, match="switch_interval_s"):
        load_config(env={"PHALANX_SWITCH_INTERVAL_S": value})
    assert load_config(env={"PHALANX_SWITCH_INTERVAL_S": "0.001"}).switch_interval_s == 0.001


def test_every_phalanx_variable_the_project_uses_is_known() -> None:
    """A PHALANX_* name read or set anywhere in the project (a tool's, compose's
    PHALANX_IMAGE) is a daemon setting or listed as another tool's: the daemon refuses
    unknown names, so `PHALANX_IMAGE=... phalanx daemon` exited 2."""
    from phalanx.config import _FOREIGN_ENV, ENV_PREFIX, _env_names

    root = Path(__file__).resolve().parents[2]
    known = _env_names(PhalanxConfig, ENV_PREFIX) | _FOREIGN_ENV
    used: dict[str, str] = {}
    for folder in ("phalanx", "deploy", ".ci", "scripts"):
        for p in (root / folder).rglob("*"):
            if p.is_file() and p.suffix in ("", ".py", ".sh", ".yml", ".yaml", ".toml"):
                try:
                    text = p.read_text()
                except (OSError, UnicodeDecodeError):
                    continue
                for name in re.findall(r"\bPHALANX_[A-Z0-9_]*[A-Z0-9]\b", text):
                    used.setdefault(name, str(p.relative_to(root)))
    assert "PHALANX_IMAGE" in used  # the scan sees compose's variable
    unknown = {n: where for n, where in used.items() if n not in known}
    assert unknown == {}, unknown
    # and the daemon's loader takes them
    assert load_config(env={"PHALANX_IMAGE": "phalanx:1.2", "PHALANX_BENCH_DEBUG": "1"}) == (
        PhalanxConfig()
    )


def test_snapshot_io_nice_comes_from_the_environment_and_is_bounded() -> None:
    from phalanx.checkpoint._nice import MAX_NICE
    from phalanx.checkpoint.snapshot import SnapshotConfig

    assert load_config(env={}).snapshot.io_nice == SnapshotConfig.io_nice == 10
    for good in (0, MAX_NICE):
        cfg = load_config(env={"PHALANX_SNAPSHOT_IO_NICE": str(good)})
        assert cfg.snapshot.io_nice == good
    for bad in (-1, MAX_NICE + 1):
        with pytest.raises(ConfigError, match=r"snapshot\.io_nice"):
            load_config(env={"PHALANX_SNAPSHOT_IO_NICE": str(bad)})

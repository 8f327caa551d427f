"""The daemon's configuration: one frozen dataclass, one precedence order.

:class:`PhalanxConfig` holds every setting of a ``phalanx daemon`` (or of an embedded
one, :func:`phalanx.start`): the daemon's own fields at the top level, and one section
per part, each the part's own frozen dataclass (``comm`` =
:class:`~phalanx.comm.CommOptions`, ``membership`` =
:class:`~phalanx.membership.MembershipConfig`, ``monitor`` =
:class:`~phalanx.monitor.MonitorConfig`, with its nested ``detectors``), and
``snapshot`` = :class:`SnapshotSettings` (defined here: the daemon's view of the
snapshot service, turned into a :class:`~phalanx.checkpoint.SnapshotConfig` by the
daemon).

:func:`load_config` fills it from, in this order of precedence:

1. command-line flags (only those given: ``None`` means "not given");
2. the environment: ``PHALANX_<FIELD>`` for top-level fields (``PHALANX_COORDINATOR``,
   ``PHALANX_SECRET_FILE``), ``PHALANX_<SECTION>_<FIELD>`` inside a section
   (``PHALANX_COMM_STREAMS``, ``PHALANX_MONITOR_DETECTORS_K``);
3. an optional TOML file (top-level keys, ``[comm]``, ``[membership]``, ``[monitor]``,
   ``[monitor.detectors]``, ``[snapshot]``);
4. the defaults below.

Each layer is read and type-checked on its own, then the layers are merged and the
result is built once, so the dataclasses' cross-field checks see the final combination
(see :func:`load_config`). Unknown keys (file or ``PHALANX_*`` names that match no
field) are refused with the list of valid names, never ignored. :meth:`PhalanxConfig.describe` is what the daemon
prints at start-up; secrets never live in this object (only ``secret_file``, a path),
and any value whose key names a secret is printed as ``<redacted>`` anyway.

This module must never open a socket, start a thread, or read the secret itself.
"""

from __future__ import annotations

import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from phalanx.comm.options import CommOptions
from phalanx.errors import ConfigError
from phalanx.membership.config import MembershipConfig
from phalanx.monitor.monitor import MonitorConfig

__all__ = [
    "DAEMON_SWITCH_INTERVAL_S",
    "ENV_PREFIX",
    "PhalanxConfig",
    "SnapshotSettings",
    "check_address",
    "default_socket_path",
    "load_config",
]

ENV_PREFIX = "PHALANX_"
GiB = 1024**3

_T = TypeVar("_T")


def default_socket_path(member_id: str = "") -> str:
    """Where a daemon listens for its training process when ``--socket`` is not given:
    ``$XDG_RUNTIME_DIR/phalanx/<id>.sock`` (a per-user 0700 directory), else
    ``/tmp/phalanx-<uid>/<id>.sock``; ``<id>`` is ``daemon`` for an unnamed one."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "phalanx" if base else Path(f"/tmp/phalanx-{os.getuid()}")
    return str(root / f"{member_id or 'daemon'}.sock")


def check_address(address: str, name: str, *, any_port: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port), or :class:`ConfigError`
    naming ``name``. The port is 1..65535, or 0 ("any free port") where ``any_port``;
    the same rules as the membership layer's addresses, checked here so that a bad
    value is a configuration error (exit 2), not a failure at start."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{name} must be HOST:PORT ({why}), got {address!r}")

    if not isinstance(address, str) or len(address) > 300:
        raise bad("a string of at most 300 characters")
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise bad("a host, a colon and a port")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise bad("an IPv6 host in brackets, e.g. [::1]:7000")
        host = host[1:-1]
    elif ":" in host:
        raise bad("IPv6 hosts go in brackets, e.g. [::1]:7000")
    if any(c.isspace() for c in host):
        raise bad("no spaces in the host")
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad(f"the port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if any_port else 1
    if not low <= port <= 65535:
        raise bad(f"the port must be in {low}..65535" + ("; 0: any free port" if any_port else ""))
    return host, port


@dataclass(frozen=True)
class SnapshotSettings:
    """The ``[snapshot]`` section: the daemon's snapshot service and shard holder.

    ``budget_bytes``: shards this daemon holds for its peers (budget two generations of
    every owner it serves; 0 = hold nothing, so every snapshot that places a piece here
    is abandoned with ``reason=budget``). ``k``/``m``: data/parity pieces per stripe,
    ``k = 0`` = :func:`~phalanx.checkpoint.default_km` of the view size. ``snapshot_dir``
    (empty: off) and ``disk_every``: the disk tier. ``listen``: the shard server's
    address (empty: the data plane's host, any port); it is advertised as the member's
    second address. ``shard_bytes``, ``call_timeout``, ``seal_timeout``, ``io_nice``:
    see :class:`~phalanx.checkpoint.SnapshotConfig`."""

    budget_bytes: int = 4 * GiB
    k: int = 0
    m: int = 0
    snapshot_dir: str = ""
    disk_every: int = 1
    listen: str = ""
    shard_bytes: int = 4 * 1024 * 1024
    call_timeout: float = 30.0
    seal_timeout: float = 300.0
    io_nice: int = 10  # == phalanx.checkpoint._nice.DEFAULT_IO_NICE (test_config)

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ConfigError("snapshot.budget_bytes must be >= 0")
        if self.k < 0 or self.m < 0 or (self.k == 0 and self.m != 0):
            raise ConfigError("snapshot.k/m: k = m = 0 (default from the view size) or k >= 1")
        if self.k and self.k + self.m > 255:
            raise ConfigError("snapshot.k + snapshot.m must be <= 255")
        if self.disk_every < 1:
            raise ConfigError("snapshot.disk_every must be >= 1")
        if self.listen:
            check_address(self.listen, "snapshot.listen", any_port=True)
        # at most 1 GiB (phalanx.checkpoint.generation.MAX_SHARD_BYTES): one piece is one
        # PUT and one coder call
        if not 64 <= self.shard_bytes <= 1 << 30 or self.shard_bytes % 64:
            raise ConfigError("snapshot.shard_bytes must be a multiple of 64 from 64 to 1 GiB")
        if not (self.call_timeout > 0 and self.seal_timeout > 0):
            raise ConfigError("snapshot.call_timeout and snapshot.seal_timeout must be > 0")
        if not 0 <= self.io_nice <= 19:  # == phalanx.checkpoint._nice.MAX_NICE
            raise ConfigError("snapshot.io_nice must be from 0 to 19")


#: see PhalanxConfig.switch_interval_s
DAEMON_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class PhalanxConfig:
    """Every setting of one daemon. Times in seconds, sizes in bytes."""

    #: ``host:port`` of the membership coordinator (required by ``phalanx daemon``)
    coordinator: str = ""
    #: data-plane address to bind and advertise (port 0: any free port)
    listen: str = "127.0.0.1:0"
    #: /metrics, /healthz, /anomalies; port 0 = any free port, -1 = no HTTP endpoint
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    #: file holding the cluster secret (>= 16 bytes); required unless ``insecure``
    secret_file: str = ""
    #: run without a secret: only for tests and demos on one machine (the data plane
    #: still authenticates with a per-daemon random secret, so a world of 1 works)
    insecure: bool = False
    #: this member's stable id (default: ``<hostname>-<pid>``)
    id: str = ""
    zone: str = ""
    #: bump when restarting under the same ``id``; 0 = the wall clock in milliseconds
    #: at start, so every restart is newer (containers: a restarted daemon keeps its
    #: hostname id, and the coordinator refuses an incarnation it has seen)
    incarnation: int = 1
    #: Unix socket of the local API (default: :func:`default_socket_path`)
    socket: str = ""
    #: shared memory one client may map into the daemon
    max_client_shm_bytes: int = 64 * GiB
    #: default deadline of one collective (retries included) and of a commit vote
    op_timeout: float = 120.0
    #: longest a per-view data-plane build may take
    build_timeout: float = 3.0
    #: SIGTERM: time to finish the operation in flight before leaving
    drain_timeout: float = 10.0
    #: joining the group at start-up
    join_timeout: float = 30.0
    #: the interpreter's thread switch interval in the daemon (``sys.setswitchinterval``):
    #: Python's 5 ms default keeps a thread coming back from a C call (the erasure
    #: coder, numpy) waiting behind busy I/O threads; measured in the snapshot pipeline,
    #: 0.5 ms took ISA-L encode from 2.1-2.7 to 3.3 GB/s on this 2-core machine
    switch_interval_s: float = DAEMON_SWITCH_INTERVAL_S
    comm: CommOptions = field(default_factory=CommOptions)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    snapshot: SnapshotSettings = field(default_factory=SnapshotSettings)

    def __post_init__(self) -> None:
        if self.coordinator:
            check_address(self.coordinator, "coordinator", any_port=False)
        check_address(self.listen, "listen", any_port=True)
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port must be -1 (off), 0 (any) or a port number")
        if self.incarnation < 0:
            raise ConfigError("incarnation must be >= 1, or 0 (from the wall clock at start)")
        if self.max_client_shm_bytes < 1 << 20:
            raise ConfigError("max_client_shm_bytes must be >= 1 MiB")
        for name in ("op_timeout", "build_timeout", "drain_timeout", "join_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if not (math.isfinite(self.switch_interval_s) and self.switch_interval_s > 0):
            raise ConfigError(
                f"switch_interval_s must be a finite number of seconds > 0, "
                f"got {self.switch_interval_s!r}"
            )

    @property
    def socket_path(self) -> str:
        return self.socket or default_socket_path(self.id)

    def describe(self) -> str:
        """``key = value`` lines (sections dotted), secrets redacted: the start-up print."""
        return "\n".join(f"{k} = {v}" for k, v in _flatten(self, ""))


def _flatten(obj: object, prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    assert is_dataclass(obj)
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if is_dataclass(value):
            out.extend(_flatten(value, key + "."))
        elif "secret" in f.name and f.name != "secret_file" and value:
            out.append((key, "<redacted>"))
        else:
            out.append((key, repr(value)))
    return out


# ----------------------------------------------------------------------------- loading


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(text: str, typ: Any, where: str) -> Any:
    """An environment string as the field's type (bool, int, float, str, optional)."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() in ("", "none", "null"):
            return None
        typ = args[0]
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if typ is int:
            return int(text.strip(), 0)
        if typ is float:
            return float(text.strip())
        if typ is str:
            return text
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot read {text!r} as {typ.__name__}: {exc}") from None
    raise ConfigError(f"{where}: cannot be set from text")


def _check_value(value: Any, typ: Any, where: str) -> Any:
    """A TOML or flag value checked against the field's type (ints accepted as floats)."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        if value is None:
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (bool, int, float, str) and (
        not isinstance(value, typ) or (typ is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Given:
    """One value of one layer, with where it came from (for error messages)."""

    value: Any
    origin: str


#: a layer's values as a tree: section name -> subtree, field name -> _Given
_Tree = dict[str, Any]


def _is_section(typ: Any) -> bool:
    return isinstance(typ, type) and is_dataclass(typ)


def _layer(cls: type, values: Mapping[str, Any], where: str) -> _Tree:
    """One layer's raw values (nested mappings for sections) checked against ``cls``:
    unknown keys refused, each value's type checked; nothing is built yet (the
    cross-field checks run once, on the merge of every layer: :func:`_build`).
    ``where`` prefixes a key in messages and origins (``"f.toml: "``, ``"--"``)."""
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    out: _Tree = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}{key}: unknown setting (known: {', '.join(sorted(known))})")
        typ = hints[name]
        if _is_section(typ):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{key}: expected a section (table)")
            out[name] = _layer(typ, value, f"{where}{name}.")
        else:
            out[name] = _Given(_check_value(value, typ, f"{where}{name}"), f"{where}{name}")
    return out


def _merge(low: _Tree, high: _Tree) -> _Tree:
    """``low`` with ``high``'s values on top (sections merged field by field)."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(obj: _T, tree: _Tree, section: str) -> _T:
    """``obj`` with the merged values of every layer applied, each dataclass built (and
    validated) once; a refusal names the section and where its values came from."""
    assert is_dataclass(obj) and not isinstance(obj, type)
    changes: dict[str, Any] = {}
    origins: list[str] = []
    for name, value in tree.items():
        if isinstance(value, dict):
            changes[name] = _build(getattr(obj, name), value, f"{section}{name}.")
        else:
            changes[name] = value.value
            origins.append(value.origin)
    try:
        return replace(obj, **changes)
    except ConfigError as exc:
        source = f" (set by {', '.join(origins)})" if origins else ""
        raise ConfigError(f"{section.rstrip('.') or 'config'}: {exc}{source}") from None
    except TypeError as exc:  # pragma: no cover - a field type we cannot handle
        raise ConfigError(f"{section.rstrip('.') or 'config'}: {exc}") from None


def _env_tree(cls: type, env: Mapping[str, str], prefix: str, where: str) -> _Tree:
    """The ``PHALANX_*`` variables that name fields of ``cls`` (recursively), as a tree
    of typed values; leftover ``PHALANX_*`` names are checked by the caller."""
    out: _Tree = {}
    hints = _hints(cls)
    for f in fields(cls):
        typ = hints[f.name]
        var = prefix + f.name.upper()
        if isinstance(typ, type) and is_dataclass(typ):
            sub = _env_tree(typ, env, var + "_", f"{where}{f.name}.")
            if sub:
                out[f.name] = sub
        elif var in env:
            out[f.name] = _Given(_coerce(env[var], typ, f"${var}"), f"${var}")
    return out


def _env_names(cls: type, prefix: str) -> set[str]:
    names: set[str] = set()
    hints = _hints(cls)
    for f in fields(cls):
        var = prefix + f.name.upper()
        typ = hints[f.name]
        is_section = isinstance(typ, type) and is_dataclass(typ)
        names |= _env_names(typ, var + "_") if is_section else {var}
    return names


#: PHALANX_* variables that belong to other tools, not to the daemon's config
_FOREIGN_ENV = frozenset(
    {
        "PHALANX_LOG_LEVEL",
        "PHALANX_SOCKET_DIR",
        "PHALANX_PARENT_PID",
        "PHALANX_TWIN_MIN_BYTES",  # the client (docs/daemon.md, twin regions)
        "PHALANX_BENCH_DEBUG",  # phalanx bench anomaly
        "PHALANX_IMAGE",  # deploy/docker-compose.yml: the image to run
        "PHALANX_DOCKER_DATA_ROOT",  # deploy/docker/dockerd.py
        "PHALANX_DOCKERD_LOG",  # deploy/docker/dockerd.py
        "PHALANX_STRESS_SEED",  # .ci/stress
        "PHALANX_STRESS_DURATION",  # .ci/stress
        "PHALANX_STRESS_PEERS",  # .ci/stress
    }
)


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
    base: PhalanxConfig | None = None,
) -> PhalanxConfig:
    """Build the config: ``flags`` > ``env`` (default ``os.environ``) > TOML ``file`` >
    ``base`` (default: the defaults). ``flags`` maps field names (``"comm"`` may map to a
    dict) to values; ``None`` values are "not given". Raises :class:`ConfigError`.

    Every layer is read and checked on its own (unknown names, types), then merged,
    and the result is built and validated once: a cross-field rule (``heartbeat_timeout
    >= 2 x heartbeat_interval``) judges the final combination, never a half-applied one
    (a file's interval with the defaults' timeout), and its message names where each
    value of the section came from."""
    cfg = base or PhalanxConfig()
    tree: _Tree = {}
    if file is not None:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        tree = _layer(PhalanxConfig, data, f"{path}: ")
    environ = os.environ if env is None else env
    ours = {k for k in environ if k.startswith(ENV_PREFIX)} - _FOREIGN_ENV
    unknown = ours - _env_names(PhalanxConfig, ENV_PREFIX)
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s) {sorted(unknown)}: PHALANX_<FIELD> or "
            "PHALANX_<SECTION>_<FIELD> (e.g. PHALANX_COORDINATOR, PHALANX_COMM_STREAMS)"
        )
    tree = _merge(tree, _env_tree(PhalanxConfig, environ, ENV_PREFIX, ""))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    tree = _merge(tree, _layer(PhalanxConfig, given, "--"))
    return _build(cfg, tree, "")

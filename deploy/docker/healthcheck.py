#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 if this container's phalanx process answers.

    phalanx-healthcheck                  # whatever the container runs (below)
    phalanx-healthcheck --tcp HOST:PORT  # a TCP connect (the coordinator's gRPC port)

Without arguments it looks at the container's main command (``/proc/1/cmdline``; an
init such as ``docker-init``/``tini`` in front of it is skipped) and checks what that
command serves:

* ``phalanx peer``: its daemon's ``/healthz`` (200 = healthy; 503 with a reason while a
  collective hangs) on ``$PHALANX_METRICS_PORT``, which ``phalanx peer`` sets to 9464
  when unset;
* ``phalanx daemon``: ``/healthz`` on the port given by ``--metrics-port``, else
  ``$PHALANX_METRICS_PORT``, else ``metrics_port`` of its ``--config`` file; a daemon
  with none of them serves on a random port (0) that cannot be found from outside, or
  on none (-1): nothing to ask, so it reports healthy and says why (set
  ``PHALANX_METRICS_PORT=9464`` to have it checked);
* ``phalanx coordinator``: a TCP connect to its ``--listen`` port;
* any other phalanx command (``train``, ``status``, ...) serves no port: healthy, with a
  message;
* a command that is not phalanx's: ``/healthz`` on ``$PHALANX_METRICS_PORT`` (default
  9464), as before.

Standard library only, no phalanx import: it runs every few seconds and must stay
cheap. It must never wait more than 4 s. :func:`plan` is pure (unit-tested).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

DEFAULT_METRICS_PORT = 9464
#: init processes that may run in front of the container's command (``docker run --init``)
_INITS = ("docker-init", "tini", "tini-static", "dumb-init", "catatonit")

#: ("http", host, port) | ("tcp", host, port) | ("none", message, 0)
Plan = tuple[str, str, int]


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv`` (the last one wins)."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word[len(name) + 1 :]
    return value


def phalanx_command(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments) if ``argv`` runs phalanx (``phalanx CMD``,
    ``python -m phalanx CMD``, behind an init or not), else None."""
    words = list(argv)
    while words and os.path.basename(words[0]) in _INITS:  # tini -- phalanx peer
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    for i, word in enumerate(words):
        name = os.path.basename(word)
        is_script = name == "phalanx" and i <= 1  # phalanx, or python .../bin/phalanx
        is_module = word == "phalanx" and i >= 1 and words[i - 1] == "-m"
        if not (is_script or is_module):
            continue
        rest = words[i + 1 :]
        while rest and rest[0].startswith("-"):  # --log-level X before the command
            rest = rest[2:] if rest[0] == "--log-level" else rest[1:]
        return (rest[0], rest[1:]) if rest else ("", [])
    return None


def _local(host: str | None) -> str:
    """Where to reach a server bound to ``host`` from inside the container."""
    if not host or host in ("0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def _file_setting(path: str | None, key: str) -> object:
    if not path:
        return None
    import tomllib  # only for a daemon run with --config

    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get(key)
    except (OSError, tomllib.TOMLDecodeError):
        return None


def plan(argv: Sequence[str], env: Mapping[str, str]) -> Plan:
    """What to check for a container whose main process runs ``argv``. Pure but for
    reading a daemon's ``--config`` file."""
    found = phalanx_command(argv)
    env_port = env.get("PHALANX_METRICS_PORT")
    env_host = env.get("PHALANX_METRICS_HOST")
    if found is None:  # not phalanx's (a wrapper script?): the port it would use
        return ("http", _local(env_host), int(env_port or DEFAULT_METRICS_PORT))
    cmd, args = found
    if cmd == "peer":  # phalanx peer fills in 9464 for its daemon when unset
        port_text = env_port or str(DEFAULT_METRICS_PORT)
        host = env_host
    elif cmd == "daemon":
        port_text = _flag(args, "--metrics-port") or env_port
        if port_text is None:
            value = _file_setting(_flag(args, "--config"), "metrics_port")
            port_text = str(value) if isinstance(value, int) else None
        host = _flag(args, "--metrics-host") or env_host
        if host is None:
            value = _file_setting(_flag(args, "--config"), "metrics_host")
            host = value if isinstance(value, str) else None
    elif cmd == "coordinator":
        listen = _flag(args, "--listen") or ""
        host, _, port = listen.rpartition(":")
        if not port.isdigit() or int(port) == 0:
            return ("none", f"coordinator --listen {listen!r}: no fixed port to check", 0)
        return ("tcp", _local(host), int(port))
    else:
        return ("none", f"`phalanx {cmd}` serves no port: nothing to check", 0)
    try:
        port = int(port_text) if port_text is not None else 0
    except ValueError:
        return ("none", f"metrics port {port_text!r} is not a number: nothing to check", 0)
    if port <= 0:
        why = "no metrics endpoint (-1)" if port < 0 else "metrics on a random port"
        return (
            "none",
            f"`phalanx {cmd}` has {why}: nothing to check "
            "(set PHALANX_METRICS_PORT=9464 to have /healthz checked)",
            0,
        )
    return ("http", _local(host), port)


def _main_argv() -> list[str]:
    """The container's main command line (PID 1's); empty if unreadable."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [w.decode(errors="replace") for w in raw.split(b"\0") if w]


def _tcp(host: str, port: int) -> int:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        print(f"unhealthy: {host}:{port}: {exc}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tcp"] and len(argv) == 2:
        host, _, port = argv[1].rpartition(":")
        return _tcp(host.strip("[]"), int(port))
    kind, host, port = plan(_main_argv(), os.environ)
    if kind == "none":
        print(f"healthy: {host}")
        return 0
    if kind == "tcp":
        return _tcp(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.code} {exc.read(200).decode(errors='replace')}")
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

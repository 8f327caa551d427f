"""``phalanx coordinator``: the command line of the membership coordinator.

:func:`register` adds the ``coordinator`` sub-command to the main ``phalanx`` parser
(``phalanx/cli.py`` calls it); ``python -m phalanx.membership.cli coordinator ...``
runs the same thing without the main CLI (tests use it). Secure by default: it refuses
to start without a cluster secret unless told ``--insecure``. This is the only module
of the package that writes to stdout; it must never hold logic the embeddable
:class:`~phalanx.membership.coordinator.Coordinator` lacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from phalanx.errors import ConfigError
from phalanx.membership.config import INSECURE_SECRET, MembershipConfig
from phalanx.membership.coordinator import Coordinator

__all__ = ["build_coordinator", "command", "main", "register", "run_coordinator"]

SECRET_ENV = "PHALANX_SECRET_FILE"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coordinator`` to an ``argparse`` sub-parsers object; returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "coordinator",
        help="run the membership coordinator",
        description="Membership authority: joins, failure detection, views, commit votes.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_coordinator)
    return p


def command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Hook for the main ``phalanx`` CLI's command table: options in, runner out."""
    parser.description = "Membership authority: joins, failure detection, views, commit votes."
    _add_arguments(parser)
    parser.set_defaults(default_log_level="INFO")
    return run_coordinator


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to bind")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--secret-file",
        type=Path,
        metavar="F",
        help=f"file holding the cluster secret (>= 16 bytes; default: ${SECRET_ENV})",
    )
    auth.add_argument(
        "--insecure", action="store_true", help="run without a cluster secret (tests, demos)"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        metavar="S",
        help="declare a silent peer failed after S seconds (default 0.6)",
    )
    p.add_argument("--recovery-grace", type=float, metavar="S", help="default 1.5")
    p.add_argument(
        "--commit-timeout",
        type=float,
        metavar="S",
        help="decide a commit round with missing votes 'not committed' after S seconds "
        "(default 30)",
    )
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    p.add_argument(
        "--no-probe", action="store_true", help="do not check that joiners' addresses answer"
    )
    p.add_argument(
        "--max-members",
        type=int,
        metavar="N",
        help=f"members plus joiners accepted (default {MembershipConfig().max_members})",
    )
    p.add_argument(
        "--max-beat-rate",
        type=float,
        metavar="PER_S",
        help="heartbeats per second this coordinator is sized for; larger groups beat "
        "less often, with timeouts to match (default "
        f"{MembershipConfig().max_beat_rate:.0f}; docs/membership.md)",
    )


def _config(args: argparse.Namespace) -> MembershipConfig:
    base = MembershipConfig()
    kw: dict[str, Any] = {}
    if args.heartbeat_timeout is not None:
        t = float(args.heartbeat_timeout)
        interval = min(base.heartbeat_interval, t / 4)
        kw.update(
            heartbeat_timeout=t,
            heartbeat_interval=interval,
            confirm_window=max(interval, min(base.confirm_window, t / 2)),
        )
    if args.recovery_grace is not None:
        kw["recovery_grace"] = float(args.recovery_grace)
    if args.commit_timeout is not None:
        kw["commit_timeout"] = float(args.commit_timeout)
    if args.no_probe:
        kw["probe_addresses"] = False
    if args.max_members is not None:
        kw["max_members"] = int(args.max_members)
    if args.max_beat_rate is not None:
        kw["max_beat_rate"] = float(args.max_beat_rate)
    return MembershipConfig(**kw)


def build_coordinator(args: argparse.Namespace) -> Coordinator:
    """The coordinator the arguments describe (not started)."""
    secret: bytes | None = None
    secret_file = args.secret_file or (
        Path(os.environ[SECRET_ENV]) if SECRET_ENV in os.environ else None
    )
    if secret_file is None:
        if not args.insecure:
            raise ConfigError(
                "no cluster secret: pass --secret-file F (or set $PHALANX_SECRET_FILE), "
                "or --insecure to run without authentication"
            )
        # the public secret 'phalanx daemon --insecure' signs with (as the daemon does,
        # a secret file still wins): without it the two refused each other (BAD_AUTH)
        # and such a daemon never joined
        secret = INSECURE_SECRET
    else:
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {secret_file}: {exc}") from None
        if len(secret) < 16:
            raise ConfigError(f"secret in {secret_file} is shorter than 16 bytes")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    cert = args.tls_cert.read_bytes() if args.tls_cert is not None else None
    key = args.tls_key.read_bytes() if args.tls_key is not None else None
    return Coordinator(
        args.listen,
        secret=secret,
        insecure=bool(args.insecure),
        config=_config(args),
        tls_cert=cert,
        tls_key=key,
    )


def run_coordinator(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 2 on a configuration error."""
    try:
        coordinator = build_coordinator(args)
        address = coordinator.start()
    except ConfigError as exc:
        sys.stderr.write(f"phalanx coordinator: {exc}\n")
        return 2
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.stdout.write(f"phalanx coordinator listening on {address} run={coordinator.run_id}\n")
    sys.stdout.flush()
    try:
        while not done.wait(1.0):
            pass
    finally:
        coordinator.stop(grace=1.0)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phalanx")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("PHALANX_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``phalanx`` command line: a table of subcommands, imported only when asked for.

Every subcommand lives in its own module and is named in :data:`COMMANDS` as
``name -> ("module:attribute", one-line help)``. The attribute is either

* a *register function* ``register(parser) -> run``: it adds its options to the
  ``argparse`` parser it is given and returns ``run(args) -> exit status``; or
* another table of the same shape (a command group such as ``phalanx bench``, whose
  table is :data:`phalanx.bench.COMMANDS`).

``--log-level`` is accepted before or after the command name; a command may choose its
own default with ``parser.set_defaults(default_log_level="INFO")`` (otherwise WARNING).
``run`` finds the level in effect in ``args.log_level`` (to hand to child processes).

To add a command, add one line to the table (and, for a benchmark, to
``phalanx.bench.COMMANDS``); nothing else in this file changes. Only the chosen
command's module is imported, so a slow import (torch, grpc) costs only its own command.

This module owns logging set-up (``--log-level`` and a ``key=value`` formatter, on
stderr) and the process's signal handling (SIGTERM unwinds; SIGUSR1 writes every
thread's stack to stderr and the process goes on). It is the only place besides benchmark
output that writes to stdout.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

from phalanx import __version__

__all__ = ["COMMANDS", "KeyValueFormatter", "main", "setup_logging"]

RunFn = Callable[[argparse.Namespace], int]
RegisterFn = Callable[[argparse.ArgumentParser], RunFn]

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("phalanx.bench:COMMANDS", "benchmarks that print JSON lines (--json)"),
    "coordinator": ("phalanx.membership.cli:command", "membership authority (gRPC)"),
    "status": ("phalanx.monitor.status:register", "live view of members, links, anomalies"),
    "daemon": ("phalanx.daemon:register", "one per training process: group, data plane, /metrics"),
    "demo": ("phalanx.demo:register", "a local cluster trains through a kill and a join"),
    "stress": ("phalanx.testing.stress:register", "churn with every result checked"),
    "train": ("phalanx.container.train:register", "a small real training job via the local daemon"),
    "peer": (
        "phalanx.container.peer:register",
        "a daemon and a training job, supervised (containers)",
    ),
    # a new command is one more line here; its module owns its options
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"

# -- logging --------------------------------------------------------------------------

_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _kv(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg=... key=value ...`` on one line.

    Fields passed with ``extra={...}`` follow ``msg`` in insertion order; an exception
    goes last as ``exc="..."`` (newlines escaped), so every record is one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname}",
            f"logger={record.name}",
            f"msg={_kv(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                parts.append(f"{key}={_kv(value)}")
        if record.exc_info:
            parts.append(f"exc={_kv(self.formatException(record.exc_info))}")
        elif record.stack_info:
            parts.append(f"stack={_kv(record.stack_info)}")
        return " ".join(parts)


def setup_logging(level: str = DEFAULT_LOG_LEVEL) -> None:
    """Send every ``phalanx`` (and other) log record to stderr as key=value lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# -- the command table ----------------------------------------------------------------


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _command_list(table: Mapping[str, tuple[str, str]], prefix: str = "") -> list[str]:
    """Help lines for a table, descending into command groups (cheap: tables only)."""
    lines = []
    for name, (target, help_text) in table.items():
        lines.append(f"  {prefix}{name:<{max(12, len(name) + 1)}} {help_text}")
        if target.rsplit(":", 1)[-1].isupper():  # a sub-table, by convention UPPER_CASE
            try:
                sub = _resolve(target)
            except Exception as exc:  # a broken module must not break --help
                lines.append(f"    ({name}: unavailable: {exc})")
                continue
            lines.extend(_command_list(sub, prefix=f"{prefix}{name} "))
    return lines


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=None,
        help=f"log records at this level and above go to stderr (default {DEFAULT_LOG_LEVEL})",
    )


def _dispatch(
    words: Sequence[str],
    table: Mapping[str, tuple[str, str]],
    argv: Sequence[str],
    log_level: str | None,
) -> int:
    prog = " ".join(words)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "phalanx: fault-tolerant collectives and in-memory checkpoints for elastic training."
            if len(words) == 1
            else table_help(words)
        ),
        epilog="commands:\n" + "\n".join(_command_list(table)) + f"\n\n'{prog} COMMAND --help' "
        "explains one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if len(words) == 1:
        parser.add_argument("--version", action="version", version=f"phalanx {__version__}")
    _add_logging_options(parser)
    parser.add_argument("command", choices=list(table), metavar="COMMAND", help="see below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    log_level = ns.log_level or log_level
    target, help_text = table[ns.command]
    words = [*words, ns.command]
    obj = _resolve(target)
    if isinstance(obj, Mapping):
        return _dispatch(words, obj, ns.args, log_level)
    leaf = argparse.ArgumentParser(prog=" ".join(words), description=help_text)
    _add_logging_options(leaf)
    register: RegisterFn = obj
    run = register(leaf)
    args = leaf.parse_args(ns.args)
    default_level: str = getattr(args, "default_log_level", DEFAULT_LOG_LEVEL)
    args.log_level = args.log_level or log_level or default_level
    setup_logging(args.log_level)
    return run(args)


def table_help(words: Sequence[str]) -> str:
    """The one-line help of the command group named by ``words`` (e.g. phalanx bench)."""
    table: Mapping[str, tuple[str, str]] = COMMANDS
    help_text = ""
    for word in words[1:]:
        target, help_text = table[word]
        table = _resolve(target)
    return help_text


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds the stack, so every `finally` (which kills child processes) runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phalanx`` console script and of ``python -m phalanx``."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # `kill -USR1 <pid>`: every thread's stack on stderr, the process goes on (for
        # a process that seems stuck: which wait it is in, without stopping it)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return _dispatch(["phalanx"], COMMANDS, sys.argv[1:] if argv is None else argv, None)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

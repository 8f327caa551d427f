"""phalanx.bench: what ``phalanx bench ...`` runs; every benchmark prints JSON lines.

:data:`COMMANDS` is the table behind ``phalanx bench``: name -> (``"module:register"``,
one-line help). ``register(parser)`` adds the benchmark's options and returns the
function that runs it (``args -> exit status``); the module is imported only when its
benchmark is asked for. To add a benchmark, add one line here and one module.
"""

from __future__ import annotations

__all__ = ["COMMANDS"]

COMMANDS: dict[str, tuple[str, str]] = {
    "allreduce": (
        "phalanx.bench.allreduce:register",
        "all-reduce time and bandwidth on 127.0.0.1, every result checked; --vs gloo",
    ),
    # Later: "failover", "snapshot", "anomaly" (same shape: "phalanx.bench.<name>:register").
}

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
    "failover": (
        "phalanx.bench.failover:register",
        "kill/stop/leave/join/coordinator fault in a stream of checked all-reduces: detect_s, resume_s",
    ),
    "anomaly": (
        "phalanx.bench.anomaly:register",
        "time to detect an injected slow link, straggler or hang; false positives (healthy run)",
    ),
    "torch": (
        "phalanx.bench.torchtrain:register",
        "phalanx.torch under faults: kill -> next commit, replacement latency, state transfer, DiLoCo bytes",
    ),
    "coordinator": (
        "phalanx.bench.coordinator:register",
        "one coordinator under N simulated members: CPU per heartbeat, failure -> every member",
    ),
    "snapshot": (
        "phalanx.bench.snapshot:register",
        "erasure-coded snapshots over TCP: stall vs memcpy, seal, encode rate, restore after m losses",
    ),
}

"""How often this process's threads slept and were woken, read from /proc (Linux)."""

from __future__ import annotations

import threading


def wakeups(*prefixes: str) -> dict[str, int]:
    """Voluntary context switches so far of this process's threads named ``prefix*``."""
    out: dict[str, int] = {}
    for t in threading.enumerate():
        if t.native_id is None or not t.name.startswith(prefixes):
            continue
        with open(f"/proc/self/task/{t.native_id}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    out[t.name] = int(line.split()[1])
    return out

"""Rate-limited log lines: what strangers, dead holders or a failing ``accept()`` can
make a daemon say over and over is said at most once per interval per kind.

:class:`LogThrottle` logs the first line of a kind, drops the rest of that kind for
``interval`` seconds, and adds to the next line it logs how many it dropped. Kinds are
the caller's (a holder's id, a stage name); at most ``max_kinds`` are remembered, the
stale ones forgotten first, so ids that come and go cannot grow it without bound.
Thread-safe; it never raises and never blocks on anything but its own lock.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["LogThrottle"]


class LogThrottle:
    """At most one line per ``interval`` seconds per kind, on ``logger``."""

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, *, max_kinds: int = 4096
    ) -> None:
        self._log = logger
        self._interval = interval
        self._max_kinds = max_kinds
        self._next: dict[str, float] = {}  # kind -> when it may be logged again
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.ERROR, kind, msg, *args)

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(kind, 0.0):
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                return
            self._next[kind] = now + self._interval
            skipped = self._skipped.pop(kind, 0)
            if len(self._next) > self._max_kinds:  # kinds come and go: forget stale ones
                self._next = {k: t for k, t in self._next.items() if t > now}
                self._skipped = {k: n for k, n in self._skipped.items() if k in self._next}
        if skipped:
            msg, args = msg + " (and %d more not logged)", (*args, skipped)
        self._log.log(level, msg, *args)

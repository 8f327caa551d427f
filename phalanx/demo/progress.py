"""The demo's progress bar on stderr: redrawn in place on a terminal, plain lines elsewhere.

On a TTY the bar is one line rewritten with ``\\r`` (at most 10 times a second) and an
event line (a kill, a new view) is printed above it. Elsewhere (CI logs, pipes) there
is no cursor to move, so the bar is printed as a full line at every tenth of the run
and events are plain lines. This module must never write to stdout.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 30


class Progress:
    """``update(step, **facts)`` and ``event(text)``; ``close()`` ends the bar line."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = max(1, total)
        self.out = stream or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_decile = -1
        self._line = ""
        self._t0 = time.monotonic()

    def _render(self, step: int, facts: str) -> str:
        filled = _WIDTH * min(step, self.total) // self.total
        bar = "#" * filled + "." * (_WIDTH - filled)
        elapsed = time.monotonic() - self._t0
        return f"[{bar}] {step:>{len(str(self.total))}}/{self.total} {facts} {elapsed:5.1f}s"

    def update(self, step: int, facts: str) -> None:
        line = self._render(step, facts)
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or step >= self.total:
                self._last_draw = now
                self.out.write("\r\033[K" + line)
                self.out.flush()
            self._line = line
            return
        decile = 10 * min(step, self.total) // self.total
        if decile > self._last_decile:
            self._last_decile = decile
            self.out.write(line + "\n")
            self.out.flush()

    def event(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text + "\n" + self._line)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self._line:
            self.out.write("\n")
            self.out.flush()
            self._line = ""

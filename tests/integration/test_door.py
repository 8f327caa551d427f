"""The door (a member's data-plane listener shared by its epochs' groups) at rest."""

from __future__ import annotations

import threading
import time

from phalanx.membership._door import Door
from tests.integration._threads import wakeups


def test_an_idle_door_sleeps_and_close_wakes_it() -> None:
    # It polled every 50 ms (40 wake-ups in 2 s); now it sleeps until a connection,
    # a held connection's deadline or close(), with a 1 s backstop.
    door = Door("127.0.0.1:0")
    try:
        time.sleep(0.2)
        before = wakeups("phalanx-door")["phalanx-door"]
        time.sleep(2.0)
        assert wakeups("phalanx-door")["phalanx-door"] - before <= 6
    finally:
        t = time.monotonic()
        door.close()
        took = time.monotonic() - t
    assert not any(t.name == "phalanx-door" for t in threading.enumerate())
    assert took < 0.9, f"close() waited for the backstop ({took:.2f} s), not the wake"

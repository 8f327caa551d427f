"""Closing a listener wakes the thread blocked in its accept() at once.

Every short-lived group (the state-sync side group) paid its accept loop's poll
interval (0.1 s) at close before this: a fixed cost on every state sync, whatever its
size. The bound below is a liveness bound (the accept's own timeout is 10 s)."""

from __future__ import annotations

import threading

from phalanx.comm import bind


def test_close_wakes_a_blocked_accept() -> None:
    listener = bind("127.0.0.1:0")
    listener.sock.settimeout(10.0)
    ended: list[str] = []

    def accept() -> None:
        try:
            listener.sock.accept()
            ended.append("accepted")
        except TimeoutError:
            ended.append("timeout")
        except OSError:
            ended.append("closed")

    t = threading.Thread(target=accept)
    t.start()
    threading.Event().wait(0.2)  # let it block in accept()
    listener.close()
    t.join(5.0)
    assert not t.is_alive(), "accept() still blocked 5 s after close()"
    assert ended == ["closed"]

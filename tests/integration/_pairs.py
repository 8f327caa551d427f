"""Two ranks of one data-plane group in this process, for tests that drive both."""

from __future__ import annotations

import threading

from phalanx.comm import CommOptions, Group, bind


def pair(timeout_s: float = 30.0, options: CommOptions | None = None) -> tuple[Group, Group]:
    """Two ranks of one group, in this process (threads build them concurrently)."""
    listeners = [bind("127.0.0.1:0") for _ in range(2)]
    addresses = [lst.address for lst in listeners]
    groups: list[Group | None] = [None, None]

    def build(rank: int) -> None:
        groups[rank] = Group(
            rank,
            addresses,
            b"s" * 32,
            listener=listeners[rank],
            options=options or CommOptions(timeout_s=timeout_s),
        )

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    g0, g1 = groups
    assert g0 is not None and g1 is not None
    return g0, g1

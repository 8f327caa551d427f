"""Two ranks in this process, for tests that drive both: of one data-plane group
(:func:`pair`), or two embedded members with their daemons (:func:`embedded_pair`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import phalanx
from phalanx.comm import CommOptions, Group, Listener, bind
from phalanx.comm.observer import CommObserver
from phalanx.config import PhalanxConfig


def ranks(
    n: int,
    options: CommOptions,
    *,
    listeners: list[Listener] | None = None,
    via: dict[int, str] | None = None,
    observer: CommObserver | None = None,
) -> list[Group]:
    """``n`` ranks of one group, in this process (threads build them concurrently);
    ``listeners``: bound ones to use (fresh on 127.0.0.1 by default); ``via[r]``: the
    address rank ``r`` reaches rank 0 at (a proxy); ``observer`` watches rank 0."""
    listeners = listeners or [bind("127.0.0.1:0") for _ in range(n)]
    real = [lst.address for lst in listeners]
    groups: list[Group | None] = [None] * n

    def build(rank: int) -> None:
        addresses = list(real)
        if via and rank in via:
            addresses[0] = via[rank]
        groups[rank] = Group(rank, addresses, b"s" * 32, listener=listeners[rank],
                             options=options, observer=observer if rank == 0 else None)  # fmt: skip

    threads = [threading.Thread(target=build, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(g is not None for g in groups), "a rank was not built in time"
    return [g for g in groups if g is not None]


def on_both(body: Callable[[int], None], timeout_s: float = 60.0) -> None:
    """Run ``body(rank)`` for ranks 0 and 1, a thread each; fail if either raised or
    did not end within ``timeout_s``."""
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            body(rank)
        except BaseException as exc:  # reported below
            errors.append(exc)

    # daemon threads: a rank that hangs fails the test instead of holding pytest open
    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a rank did not end in time"
    assert not errors, errors


def pair(
    timeout_s: float = 30.0,
    options: CommOptions | None = None,
    observer: CommObserver | None = None,
) -> tuple[Group, Group]:
    """Two ranks of one group, in this process; ``observer`` watches rank 0."""
    g0, g1 = ranks(2, options or CommOptions(timeout_s=timeout_s), observer=observer)
    return g0, g1


@contextlib.contextmanager
def embedded_pair(
    timeout_s: float = 20.0, config: PhalanxConfig | None = None
) -> Iterator[tuple[phalanx.Client, phalanx.Client]]:
    """Two embedded members ``a`` and ``b`` (``phalanx.start``: a daemon each, in this
    process, a coordinator in ``a``), once both hold the two-member view."""
    secret = os.urandom(32)
    a = phalanx.start(secret=secret, member_id="a", config=config)
    try:
        b = phalanx.start(
            coordinator=a.coordinator_address, secret=secret, member_id="b", config=config
        )
        try:
            deadline = time.monotonic() + timeout_s
            while a.view().world != 2 or b.view().world != 2:
                assert time.monotonic() < deadline, "the two members never shared a view"
                time.sleep(0.05)
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


@contextlib.contextmanager
def embedded_members(
    names: str, timeout_s: float = 20.0, config: PhalanxConfig | None = None
) -> Iterator[dict[str, phalanx.Client]]:
    """Embedded members named by the letters of ``names`` (a daemon each, in this
    process, a coordinator in the first), once all hold one view of them all. Every
    client is closed on exit, last first (closing one early, to make it leave, is
    fine)."""
    secret = os.urandom(32)
    first = phalanx.start(secret=secret, member_id=names[0], config=config)
    clients = {names[0]: first}
    try:
        for name in names[1:]:
            clients[name] = phalanx.start(coordinator=first.coordinator_address,
                                          secret=secret, member_id=name, config=config)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while any(c.view().world != len(names) for c in clients.values()):
            assert time.monotonic() < deadline, f"the {len(names)} members never shared a view"
            time.sleep(0.05)
        yield clients
    finally:
        for c in reversed(list(clients.values())):
            with contextlib.suppress(Exception):
                c.close()

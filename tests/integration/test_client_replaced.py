"""A training process replaced while its step is being decided or applied, through
real daemon processes: the replacement is never handed half-updated arrays, and a
commit it did not vote for is never reported to it as its own.

Found by a 10-minute soak (stop 30, seed 20261208): a trainer voted, was killed while
the coordinator restarted, and its replacement attached while the vote was still in
flight. The daemon handed the replacement the pre-update arrays as "kept", counted the
dead client's loss against the new client's step, and answered the new client's "no"
vote with the round's earlier "committed": one wrong commit.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

import phalanx
from tests.integration.test_daemon import Daemons

pytestmark = pytest.mark.timeout(150)

_MP = multiprocessing.get_context("spawn")


def _both(*calls: Any) -> list[Any]:
    """Run the calls at once (collectives and votes need every member), return results."""
    out: list[Any] = [None] * len(calls)
    errs: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # reported to the test below
            errs.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errs, errs
    assert not any(t.is_alive() for t in threads)
    return out


def _settled(pgs: list[phalanx.Client], timeout: float = 40.0) -> None:
    """Wait until every client's daemon sees the same view of all of them (the first
    daemon left and came back: a begin_step on an older view would run alone)."""
    deadline = time.monotonic() + timeout
    while True:
        views = [pg.view() for pg in pgs]
        if all(v.world == len(pgs) and v.epoch == views[0].epoch for v in views):
            return
        assert time.monotonic() < deadline, views
        time.sleep(0.05)


def _one_step(pgs: list[phalanx.Client], step: int) -> list[bool]:
    """Every client: begin ``step``, all-reduce ones, vote yes; the decisions."""

    def member(pg: phalanx.Client) -> bool:
        pg.begin_step(step, timeout=40.0)
        pg.all_reduce(np.ones(16, np.float32), timeout=40.0)
        return pg.commit(step, timeout=40.0)

    return _both(*[lambda pg=pg: member(pg) for pg in pgs])


def test_a_replacement_attaching_mid_update_receives_the_groups_state(
    daemons: Daemons,
) -> None:
    """The first client committed step 0 and was changing its arrays (not yet
    ``update_state``) when a second client of the same daemon attached: it was given
    the half-changed arrays back as this member's state (step 0)."""
    with daemons(2) as cl:
        a = phalanx.connect(cl.sockets[0], op_timeout=40.0)
        b = phalanx.connect(cl.sockets[1], op_timeout=40.0)
        a2: phalanx.Client | None = None
        try:
            wa, wb = a.empty((8,), "float32"), b.empty((8,), "float32")
            wa[:], wb[:] = 1.0, 1.0
            assert a.attach_state({"w": wa}, step=0) == 0
            assert b.attach_state({"w": wb}, step=0) == 0
            assert _one_step([a, b], 0) == [True, True]
            wb += 10.0
            b.update_state(1)
            wa[:4] = 99.0  # half-way through applying when it is replaced
            a2 = phalanx.connect(cl.sockets[0], op_timeout=40.0)
            w2 = a2.empty((8,), "float32")
            assert a2.attach_state({"w": w2}, step=None) == -1  # not "kept"
            _settled([a2, b])
            infos = _both(lambda: a2.begin_step(timeout=60.0), lambda: b.begin_step(timeout=60.0))
            assert infos[0].synced and infos[0].step == 1, infos
            assert np.all(w2 == 11.0), w2
            assert _one_step([a2, b], 1) == [True, True]  # the group goes on
        finally:
            for pg in (a2, a, b):
                if pg is not None:
                    pg.close()


def _voter(sock: str, pipe: Connection) -> None:
    """A trainer that runs step 0 and votes; killed by the test while its vote waits."""
    pg = phalanx.connect(sock, op_timeout=60.0)
    w = pg.empty((8,), "float32")
    w[:] = 1.0
    pg.attach_state({"w": w}, step=0)
    pg.begin_step(0, timeout=40.0)
    pg.all_reduce(np.ones(16, np.float32), timeout=40.0)
    pipe.send("voting")
    pg.commit(0, timeout=60.0)
    pipe.send("committed")  # not reached: killed while the vote waits
    time.sleep(60)


def test_a_replacement_attaching_while_the_dead_clients_vote_is_decided(
    daemons: Daemons,
) -> None:
    """The soak's race: the first trainer votes yes and is SIGKILLed while the vote
    waits for the other member; its replacement attaches meanwhile (its request waits
    behind the vote). When the round commits, the replacement must get the group's
    state at its first begin_step -- not the arrays from before the update -- and the
    group must go on with it."""
    with daemons(2) as cl:
        b = phalanx.connect(cl.sockets[1], op_timeout=40.0)
        a2: phalanx.Client | None = None
        parent, child = _MP.Pipe()
        voter = _MP.Process(target=_voter, args=(cl.sockets[0], child))
        voter.start()
        try:
            wb = b.empty((8,), "float32")
            wb[:] = 1.0
            assert b.attach_state({"w": wb}, step=0) == 0
            b.begin_step(0, timeout=40.0)
            b.all_reduce(np.ones(16, np.float32), timeout=40.0)
            assert parent.poll(40) and parent.recv() == "voting"
            time.sleep(0.5)  # its vote is at the coordinator, waiting for b's
            assert voter.pid is not None
            os.kill(voter.pid, signal.SIGKILL)
            voter.join(10)
            a2 = phalanx.connect(cl.sockets[0], op_timeout=40.0)
            w2 = a2.empty((8,), "float32")
            got: list[int] = []
            attach = threading.Thread(target=lambda: got.append(a2.attach_state({"w": w2})))
            attach.start()
            time.sleep(0.5)  # the attach waits behind the dead client's vote
            assert b.commit(0, timeout=40.0) is True
            wb += 10.0
            b.update_state(1)
            attach.join(60)
            assert got == [-1], got  # the dead client never applied step 0
            _settled([a2, b])
            infos = _both(lambda: a2.begin_step(timeout=60.0), lambda: b.begin_step(timeout=60.0))
            assert infos[0].synced and infos[0].step == 1, infos
            assert np.all(w2 == 11.0), w2
            assert _one_step([a2, b], 1) == [True, True]
        finally:
            if voter.is_alive():
                voter.kill()
                voter.join(5)
            for pg in (a2, b):
                if pg is not None:
                    pg.close()

"""Agents in child processes that are SIGKILLed or SIGSTOPped under a live group.

The coordinator and the surviving agents run in this process (threads); each victim
is a real process running an Agent, so its death or freeze is the real thing (its
sockets close, or stay open but silent). Bounds are generous for a shared 2-core
machine; the measured times are printed (pytest -s).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from phalanx.errors import CommitUnknown
from phalanx.membership.agent import Agent
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.view import Member, View
from phalanx.testing.throttle import LinkProxy

pytestmark = pytest.mark.timeout(60)

SECRET = b"integration-test-secret-0123456789"
REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import socket, sys, threading
from phalanx.errors import CommitUnknown
from phalanx.membership.agent import Agent
from phalanx.membership.view import Member
address, name, secret = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(16)
evicted = threading.Event()
def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n"); sys.stdout.flush()
agent = Agent(address, Member(name, ("127.0.0.1:%d" % lst.getsockname()[1],), 1),
              secret=secret, on_evicted=lambda epoch: evicted.set())
view = agent.join(10)
say("JOINED", view.epoch)
threading.Thread(target=lambda: (sys.stdin.read(), evicted.set()), daemon=True).start()
while True:
    evicted.wait(30)
    if not agent.evicted:
        break  # stdin closed: the test is over
    say("EVICTED")
    evicted.clear()
    view = agent.rejoin(10)
    say("REJOINED", view.epoch, agent.member.incarnation)
agent.close()
"""


class Child:
    def __init__(self, address: str, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, address, name, SECRET.hex()],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def expect(self, word: str, timeout: float) -> list[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith(word):
                    return line.split()
        raise AssertionError(f"child did not say {word} within {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(secret=SECRET, config=MembershipConfig(recovery_grace=0.0))
    c.start()
    yield c
    c.stop(grace=0.5)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        child.kill()


@pytest.fixture
def survivors(coordinator: Coordinator) -> Iterator[list[Agent]]:
    listeners = []
    agents = []
    for name in ("s1", "s2"):
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        listeners.append(lst)
        member = Member(name, (f"127.0.0.1:{lst.getsockname()[1]}",), 1)
        agents.append(Agent(coordinator.address, member, secret=SECRET))
    for a in agents:
        a.join(10)
    yield agents
    for a in agents:
        a.close()
    for lst in listeners:
        lst.close()


def _listening_member(name: str) -> tuple[socket.socket, Member]:
    """A member whose data address is a real listener (closed by the caller)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    return lst, Member(name, (f"127.0.0.1:{lst.getsockname()[1]}",), 1)


def wait_all(agents: list[Agent], pred: object, timeout: float) -> list[View]:
    assert callable(pred)
    return [a.wait_for_view(pred, timeout) for a in agents]


def test_sigkilled_peer_is_removed_within_a_second(
    coordinator: Coordinator, survivors: list[Agent], children: list[Child]
) -> None:
    victim = Child(coordinator.address, "victim")
    children.append(victim)
    victim.expect("JOINED", 15)
    wait_all(survivors, lambda v: "victim" in v, 5)
    epoch = survivors[0].view.epoch
    t0 = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    views = wait_all(survivors, lambda v: "victim" not in v, 3)
    elapsed = time.monotonic() - t0
    print(f"\nSIGKILL: survivors had the new view after {elapsed:.3f} s")
    assert elapsed <= 1.0
    assert {v.epoch for v in views} == {epoch + 1}
    assert views[0].ids == ("s1", "s2")


def test_reported_peer_failure_is_confirmed_fast(
    coordinator: Coordinator, survivors: list[Agent], children: list[Child]
) -> None:
    """The data plane notices first (a reset connection) and reports it."""
    victim = Child(coordinator.address, "victim")
    children.append(victim)
    victim.expect("JOINED", 15)
    wait_all(survivors, lambda v: "victim" in v, 5)
    victim.proc.send_signal(signal.SIGSTOP)  # alive, silent, sockets open
    t0 = time.monotonic()
    accepted = survivors[0].report_failure(["victim"], survivors[0].view.epoch, "disconnected")
    assert accepted == ["victim"]
    wait_all(survivors, lambda v: "victim" not in v, 3)
    elapsed = time.monotonic() - t0
    print(f"\nreported failure: new view after {elapsed:.3f} s")
    assert elapsed <= 1.0


def test_sigstopped_peer_is_evicted_and_rejoins_after_sigcont(
    coordinator: Coordinator, survivors: list[Agent], children: list[Child]
) -> None:
    victim = Child(coordinator.address, "victim")
    children.append(victim)
    victim.expect("JOINED", 15)
    wait_all(survivors, lambda v: "victim" in v, 5)
    t0 = time.monotonic()
    victim.proc.send_signal(signal.SIGSTOP)
    wait_all(survivors, lambda v: "victim" not in v, 4)
    elapsed = time.monotonic() - t0
    print(f"\nSIGSTOP: evicted after {elapsed:.3f} s")
    assert elapsed <= 2.0
    victim.proc.send_signal(signal.SIGCONT)
    victim.expect("EVICTED", 10)
    words = victim.expect("REJOINED", 15)
    assert words[2] == "2"  # a new incarnation
    views = wait_all(survivors, lambda v: "victim" in v, 5)
    back = views[0].get("victim")
    assert back is not None and back.incarnation == 2
    assert views[0].ids == ("s1", "s2", "victim")


def test_frozen_peer_cannot_come_back_under_its_old_incarnation(
    coordinator: Coordinator, survivors: list[Agent]
) -> None:
    """An in-process agent whose threads stall (like a GC pause or SIGSTOP) learns
    it was evicted from its first heartbeat after waking."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    evicted_at: list[int] = []
    a = Agent(
        coordinator.address,
        Member("sleepy", (f"127.0.0.1:{lst.getsockname()[1]}",), 1),
        secret=SECRET,
        on_evicted=evicted_at.append,
    )
    try:
        a.join(10)
        wait_all(survivors, lambda v: "sleepy" in v, 5)
        a._stop.set()
        a._stop_threads()  # frozen: no heartbeats, no watch
        wait_all(survivors, lambda v: "sleepy" not in v, 3)
        a._start_threads()  # wakes up
        deadline = time.monotonic() + 5
        while not a.evicted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.evicted and evicted_at
        assert a.rejoin(10).ids[-1] == "sleepy" and a.member.incarnation == 2
    finally:
        a.close()
        lst.close()


class _Held:
    """Stands in for an agent's stub: ``method`` waits for ``release`` before it goes
    out (a call still in flight) -- or, ``answer_held``, goes out at once and its
    answer waits -- everything else passes straight through."""

    def __init__(self, stub: object, method: str, *, answer_held: bool = False) -> None:
        self._stub = stub
        self._method = method
        self._answer_held = answer_held
        self.release = threading.Event()
        self.sent = threading.Event()

    def __getattr__(self, name: str) -> object:
        real = getattr(self._stub, name)
        if name != self._method:
            return real

        def held(req: object, timeout: float) -> object:
            if self._answer_held:
                answer = real(req, timeout=timeout)
                self.sent.set()
                self.release.wait(20)
                return answer
            self.sent.set()
            self.release.wait(20)
            return real(req, timeout=timeout)

        return held


def test_a_stale_eviction_does_not_evict_the_rejoined_incarnation(
    coordinator: Coordinator, survivors: list[Agent]
) -> None:
    """A vote made as incarnation 1 that is answered EVICTED after the peer rejoined as
    incarnation 2 says nothing about incarnation 2. The old agent applied it to the
    current incarnation: its heartbeats stopped right after the rejoin, the coordinator
    failed it 0.6 s later and it stayed out for its 15 s join timeout (soak, seed
    20261206: four members at once, and the newcomers left in the view had no state)."""
    lst, member = _listening_member("v")
    agent = Agent(coordinator.address, member, secret=SECRET)
    try:
        view = agent.join(10)
        wait_all(survivors, lambda v: v.has(member), 10)
        stub = agent._stub
        held = _Held(stub, "Commit")
        agent._stub = cast(Any, held)
        answers: list[object] = []
        voter = threading.Thread(
            target=lambda: answers.append(_outcome(lambda: agent.commit(7, True, epoch=view.epoch,
                                                                        timeout=15.0))),
            daemon=True,
        )  # fmt: skip
        voter.start()
        assert held.sent.wait(10)  # the vote of incarnation 1 is in flight
        # the daemon rejoins meanwhile (a new incarnation replaces #1 on the coordinator)
        agent._stub = stub
        rejoined = agent.rejoin(10)
        assert agent.member.incarnation == 2 and rejoined.has(agent.member)
        held.release.set()  # the old vote now reaches the coordinator: "#1 was removed"
        voter.join(20)
        assert answers and answers[0] == "CommitUnknown", answers
        time.sleep(4 * coordinator.config.heartbeat_timeout)
        assert not agent.evicted
        current = coordinator.view
        assert current.has(agent.member), current  # incarnation 2 still heartbeats
    finally:
        agent.close()
        lst.close()


def _outcome(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as exc:
        return type(exc).__name__


def test_a_rejoin_during_a_leave_keeps_the_new_incarnation_alive(
    coordinator: Coordinator, survivors: list[Agent]
) -> None:
    """A daemon whose client died mid-step leaves and rejoins; the rejoin once ran
    while the leave was still in flight, the leave's clean-up then stopped the new
    incarnation's heartbeat and watch threads, the coordinator failed it 0.6 s after
    admitting it and the agent waited out its whole join timeout (a 20 s begin_step
    hang in the 30-minute soak of seed 20261205). Now the rejoin waits for the leave,
    and the leave speaks only as the incarnation it left."""
    lst, member = _listening_member("w")
    agent = Agent(coordinator.address, member, secret=SECRET)
    try:
        agent.join(10)
        wait_all(survivors, lambda v: v.has(member), 10)
        stub = agent._stub
        held = _Held(stub, "Leave", answer_held=True)
        agent._stub = cast(Any, held)
        leaver = threading.Thread(target=lambda: agent.leave(reason="test"), daemon=True)
        leaver.start()
        assert held.sent.wait(10)  # incarnation 1 has left; its leave() is not through
        rejoined: list[object] = []
        rejoiner = threading.Thread(
            target=lambda: rejoined.append(_outcome(lambda: agent.rejoin(15))), daemon=True
        )
        rejoiner.start()
        # the rejoin is under way while the leave is not through (the old agent
        # admitted incarnation 2 and started its threads meanwhile)
        time.sleep(1.0)
        held.release.set()
        leaver.join(15)
        rejoiner.join(20)
        assert rejoined and isinstance(rejoined[0], View), rejoined
        assert agent.member.incarnation == 2
        time.sleep(4 * coordinator.config.heartbeat_timeout)
        current = coordinator.view
        assert current.has(agent.member), current  # incarnation 2 still heartbeats
        assert not agent.evicted
    finally:
        agent.close()
        lst.close()


def test_an_agent_whose_connection_goes_silent_gets_back_on_a_new_channel(
    coordinator: Coordinator, survivors: list[Agent]
) -> None:
    """The coordinator's end of the agent's connection vanishes without a FIN (its
    packets stop, nothing closes): the heartbeat and watch streams would wait on it for
    good. Twice in the 30-minute soak of seed 20261205 old members stayed unheard by a
    restarted coordinator for 5.6 and 11.9 s while fresh processes joined at once. The
    agent replaces a channel the coordinator has been silent on, so it learns it was
    removed and rejoins."""
    lst, member = _listening_member("x")
    with LinkProxy(coordinator.address) as proxy:
        agent = Agent(proxy.address, member, secret=SECRET)
        try:
            agent.join(10)
            wait_all(survivors, lambda v: v.has(member), 10)
            t0 = time.monotonic()
            proxy.blackhole()
            # the coordinator stops hearing it and removes it ...
            wait_all(survivors, lambda v: not any(m.id == "x" for m in v.members), 10)
            # ... and the agent comes back as a later incarnation, on a new channel
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                back = coordinator.view.members
                if any(m.id == "x" and m.incarnation > 1 for m in back) or (
                    any(m.id == "x" for m in back) and agent._channel_resets
                ):
                    break
                if agent.evicted:
                    agent.rejoin(10)  # what a daemon does by itself
                time.sleep(0.05)
            print(f"back after {time.monotonic() - t0:.2f}s, resets={agent._channel_resets}")
            assert any(m.id == "x" for m in coordinator.view.members), coordinator.view
            assert agent._channel_resets >= 1
        finally:
            agent.close()
            lst.close()


def test_an_agent_whose_channel_is_closed_under_it_keeps_following_the_views(
    coordinator: Coordinator, survivors: list[Agent]
) -> None:
    """The channel reset closes the old channel while the watch or heartbeat thread may
    be about to start a call on it: gRPC then raises ValueError ("Channel closed!"),
    not an RpcError. In a 30-minute soak (stop 22) that killed an agent's watch thread:
    the member kept beating, never learnt a new view, and the group could not form
    around it for 20 s. Here the channel is closed behind the agent's back; it must
    keep (or get back) its place and see the views that follow."""
    lst, member = _listening_member("x")
    agent = Agent(coordinator.address, member, secret=SECRET)
    try:
        agent.join(10)
        wait_all(survivors, lambda v: v.has(member), 10)
        agent._channel.close()  # both streams end; every new call on it raises ValueError
        time.sleep(0.5)
        survivors[1].leave()  # a new view: the agent must hear of it
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if agent.evicted:
                agent.rejoin(10)  # what a daemon does by itself
            v = agent.view
            if v.ids and "s2" not in v.ids and any(m.id == "x" for m in v.members):
                break
            time.sleep(0.05)
        assert "s2" not in agent.view.ids and any(m.id == "x" for m in agent.view.members), (
            agent.view
        )
        assert all(t.is_alive() for t in agent._threads)  # heartbeat and watch threads
    finally:
        agent.close()
        lst.close()


def test_a_watch_call_ending_at_its_own_deadline_raises_no_suspicion(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every agent reopens its Watch stream when the call's deadline passes (300 s;
    1 s here). The coordinator took each such end for a lost stream and suspected a
    healthy member, so that any peer's report in that window removed it at once."""
    import phalanx.membership.agent as agent_module

    monkeypatch.setattr(agent_module, "_WATCH_DEADLINE", 1.0)
    caplog.set_level(logging.INFO, logger="phalanx.membership")
    made = [_listening_member(name) for name in ("w1", "w2")]
    agents = [Agent(coordinator.address, member, secret=SECRET) for _, member in made]
    try:
        for a in agents:
            a.join(10)
        time.sleep(3.5)  # three deadlines of each member's stream
        lost = [r.getMessage() for r in caplog.records if "watch-stream-lost" in r.getMessage()]
        assert not lost, lost
        # the streams were reopened: a later view still reaches both members
        lst, member = _listening_member("w3")
        late = Agent(coordinator.address, member, secret=SECRET)
        try:
            late.join(10)
            wait_all(agents, lambda v: "w3" in v, 5)
        finally:
            late.close()
            lst.close()
        assert all("w1" in a.view and "w2" in a.view for a in agents)
    finally:
        for a in agents:
            a.close()
        for lst, _ in made:
            lst.close()


def test_a_commit_after_leave_fails_at_once_without_calling_the_coordinator(
    coordinator: Coordinator,
) -> None:
    """leave() sets the threads' stop event, so the vote's retry pause did not pause: a
    commit after leave hammered the coordinator with refused Commit and Join calls
    (about 1,000 of each in 2 s) until its deadline, then said "deadline passed"."""
    lst, member = _listening_member("leaver")
    agent = Agent(coordinator.address, member, secret=SECRET)
    try:
        view = agent.join(10)
        agent.leave()
        t0 = time.monotonic()
        with pytest.raises(CommitUnknown, match="left the group"):
            agent.commit(3, True, epoch=view.epoch, timeout=3.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        agent.close()
        lst.close()

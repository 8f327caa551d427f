"""A coordinator's answers belong to one vote of one member (gRPC on 127.0.0.1).

Without TLS, someone on the path can record the coordinator's signed answers and play
them back within the replay window: to another member, or to the same member's next
vote. The agent takes a Commit answer only for the round it voted in, and an answer
or eviction notice only when it names this member incarnation (the coordinator puts
the addressee in the signed header).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from phalanx.errors import CommitUnknown
from phalanx.membership import _rpc
from phalanx.membership._group import GroupState, ViewCause
from phalanx.membership._proto import membership_pb2 as pb
from phalanx.membership._proto import membership_pb2_grpc as pb_grpc
from phalanx.membership.agent import Agent
from phalanx.membership.config import MembershipConfig
from phalanx.membership.coordinator import Coordinator
from phalanx.membership.view import Change, ChangeKind, Member

pytestmark = pytest.mark.timeout(60)

SECRET = b"coord-answers-test-secret-0123456789"


class _FakeCoordinator(pb_grpc.CoordinatorServicer):
    """Answers every vote with ``answer`` (epoch, step, addressee), signed with the
    cluster secret as a coordinator signs: what a recorded answer replayed looks like."""

    def __init__(self) -> None:
        self.signer = _rpc.Signer(SECRET)
        self.answer: tuple[int, int, tuple[str, int]] = (0, 0, ("", 0))
        self.votes = 0

    def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        self.votes += 1
        epoch, step, to = self.answer
        resp = pb.CommitResponse(epoch=epoch, step=step, committed=True, outcome=1)  # type: ignore[arg-type]
        self.signer.sign(resp, _rpc.SERVICE + "Commit", "response", sender_id=to[0],
                         incarnation=to[1], epoch=epoch)  # fmt: skip
        return resp


@pytest.fixture
def fake() -> Iterator[tuple[_FakeCoordinator, str]]:
    servicer = _FakeCoordinator()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0.5).wait(5)


def _agent(address: str, name: str = "a", incarnation: int = 1) -> Agent:
    return Agent(address, Member(name, ("127.0.0.1:9",), incarnation), secret=SECRET)


def test_a_commit_answer_for_another_round_is_no_answer(
    fake: tuple[_FakeCoordinator, str],
) -> None:
    """The agent voted (7, 5); a signed "committed" for (7, 4) -- its own answer to
    the previous vote, played back -- was taken as the decision of step 5."""
    servicer, address = fake
    servicer.answer = (7, 4, ("a", 1))
    agent = _agent(address)
    try:
        with pytest.raises(CommitUnknown):
            agent.commit(5, True, epoch=7, timeout=1.0)
        assert servicer.votes >= 2  # taken as no answer: the vote was repeated
        servicer.answer = (6, 5, ("a", 1))  # another epoch's step 5
        with pytest.raises(CommitUnknown):
            agent.commit(5, True, epoch=7, timeout=1.0)
        servicer.answer = (7, 5, ("a", 1))  # the real answer is still taken
        assert agent.commit(5, True, epoch=7, timeout=5.0) is True
    finally:
        agent.close()


def test_a_commit_answer_addressed_to_another_member_is_no_answer(
    fake: tuple[_FakeCoordinator, str],
) -> None:
    servicer, address = fake
    agent = _agent(address, "a", 2)
    try:
        servicer.answer = (7, 5, ("b", 2))  # b's answer to the same round
        with pytest.raises(CommitUnknown):
            agent.commit(5, True, epoch=7, timeout=1.0)
        servicer.answer = (7, 5, ("a", 1))  # a's previous incarnation's
        with pytest.raises(CommitUnknown):
            agent.commit(5, True, epoch=7, timeout=1.0)
        servicer.answer = (7, 5, ("", 0))  # unaddressed: a coordinator from before
        assert agent.commit(5, True, epoch=7, timeout=5.0) is True
    finally:
        agent.close()


def test_an_eviction_notice_for_another_member_is_ignored() -> None:
    signer = _rpc.Signer(SECRET)
    method = _rpc.SERVICE + "Watch"
    agent = _agent("127.0.0.1:9", "a", 3)
    try:
        for to in (("b", 3), ("a", 2)):  # another member's; an earlier incarnation's
            notice = pb.WatchEvent(view=pb.View(epoch=12), evicted=True)
            signer.sign(notice, method, "event", sender_id=to[0], incarnation=to[1], epoch=12)
            agent._on_event(notice, method, 3)
            assert not agent.evicted, to
        notice = pb.WatchEvent(view=pb.View(epoch=12), evicted=True)
        signer.sign(notice, method, "event", sender_id="a", incarnation=3, epoch=12)
        agent._on_event(notice, method, 3)
        assert agent.evicted
    finally:
        agent.close()


def test_the_coordinator_addresses_its_answers_and_eviction_notices() -> None:
    cfg = MembershipConfig(recovery_grace=0.0, join_batch=0.0)
    c = Coordinator(secret=SECRET, config=cfg, recover=False)
    c.start()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    agent = Agent(c.address, Member("a", (f"127.0.0.1:{lst.getsockname()[1]}",), 1),
                  secret=SECRET)  # fmt: skip
    signer = _rpc.Signer(SECRET)
    try:
        view = agent.join(10)
        req = pb.CommitRequest(step=3, ok=False)
        signer.sign(req, _rpc.SERVICE + "Commit", "request", sender_id="a", incarnation=1,
                    epoch=view.epoch)  # fmt: skip
        watch = pb.WatchRequest()
        signer.sign(watch, _rpc.SERVICE + "Watch", "request", sender_id="a", incarnation=1,
                    epoch=view.epoch)  # fmt: skip
        with grpc.insecure_channel(c.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            resp: pb.CommitResponse = stub.Commit(req, timeout=5)
            assert (resp.epoch, resp.step, resp.committed) == (view.epoch, 3, False)
            assert (resp.header.sender_id, resp.header.incarnation) == ("a", 1)
            events = stub.Watch(watch, timeout=10)
            first: pb.WatchEvent = next(events)
            assert not first.evicted and first.header.sender_id == ""  # a broadcast

            def remove_a(g: GroupState, now: float) -> None:  # as a confirmed failure
                g._publish([Change(ChangeKind.FAIL, g._entries["a"].member, "test")],
                           ViewCause.FAILURE, now)  # fmt: skip

            c._locked(remove_a)
            notices: list[pb.WatchEvent] = list(events)  # until it ends
        assert notices and notices[-1].evicted
        assert (notices[-1].header.sender_id, notices[-1].header.incarnation) == ("a", 1)
    finally:
        agent.close()
        c.stop(grace=0.5)
        lst.close()

"""Plan.freeze / Plan.rearm: a plan that ran is put back exactly as it was built
(node counts, queues, per-run fields), so the engine can run it again."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pytest

from phalanx.comm.buffers import BufferPool
from phalanx.comm.plan import ComputeNode, Node, Plan


class _Host:
    def __init__(self) -> None:
        self._links: dict[int, list[Hashable]] = {1: ["L1a", "L1b"], 2: ["L2"]}
        self._pool = BufferPool()
        self._twins = BufferPool()

    @property
    def links(self) -> Mapping[int, Sequence[Hashable]]:
        return self._links

    @property
    def pool(self) -> BufferPool:
        return self._pool

    @property
    def twins(self) -> BufferPool:
        return self._twins


def _built() -> tuple[Plan, list[str]]:
    """Two sends, two receives, a compute after them and a send after that."""
    ran: list[str] = []
    plan = Plan(_Host(), "all_reduce", algorithm="recursive-doubling", nbytes=16, codec="none")
    payload = (0, memoryview(b"abcd"))
    s1 = plan.send(1, 0, lambda: payload)
    s2 = plan.send(2, 0, lambda: payload)
    r1 = plan.recv(1, 1, direct=memoryview(bytearray(4)), max_encoded=0)
    r2 = plan.recv(2, 0, direct=memoryview(bytearray(4)), max_encoded=0)
    c = plan.compute(lambda: ran.append("compute"), after=(s1, s2, r1, r2))
    plan.send(1, 1, lambda: payload, after=(c,))
    plan.on_failure(lambda: ran.append("undo"))
    return plan, ran


def _run_to_the_end(plan: Plan) -> None:
    """What the engine does to a plan that succeeds: every node done, queues drained."""
    pending = list(plan.ready)
    plan.ready = []
    while pending:
        node = pending.pop()
        if isinstance(node, ComputeNode):
            node.fn()
        node.done = True
        plan.pending -= 1
        for child in node.children:
            child.waiting -= 1
            if child.waiting == 0:
                pending.append(child)
    for q in plan.sends.values():
        q.clear()
    for q2 in plan.recvs.values():
        q2.clear()
    plan.seq = 41
    plan.spliced.add(1)
    plan.receipts.add(2)
    plan.receipts_sent = True
    plan.mismatch = {}
    plan.mismatch_by = 1
    plan.failure.append(lambda: None)
    plan.future.set_result(None)  # type: ignore[arg-type]


def _state(plan: Plan) -> tuple[object, ...]:
    nodes: list[Node] = plan._nodes
    return (
        [(n.waiting, n.done) for n in nodes],
        [id(n) for n in plan.ready],
        plan.pending,
        {k: [id(n) for n in q] for k, q in plan.sends.items()},
        {k: [id(n) for n in q] for k, q in plan.recvs.items()},
        len(plan.failure),
        plan.seq,
    )


def test_rearm_puts_a_finished_plan_back_as_built() -> None:
    plan, _ = _built()
    built = _state(plan)
    assert plan.pending == 6 and len(plan.ready) == 4
    plan.freeze(("k", 4))
    _run_to_the_end(plan)
    assert _state(plan) != built  # the run changed everything rearm must restore
    old_future = plan.future
    plan.rearm()
    assert _state(plan) == built
    assert plan.reuse_key == ("k", 4)
    assert plan.future is not old_future and not plan.future.done()
    assert (plan.spliced, plan.receipts, plan.receipts_sent) == (set(), set(), False)
    assert plan.mismatch is None and plan.mismatch_by is None
    assert plan.deadline is None and not plan.patient


def test_a_rearmed_plan_runs_like_a_new_one_twice_over() -> None:
    plan, ran = _built()
    plan.freeze("k")
    for _ in range(3):
        _run_to_the_end(plan)
        plan.rearm()
    _run_to_the_end(plan)
    assert ran == ["compute"] * 4  # its compute ran once per run, its undo never
    plan.rearm()
    for q in plan.sends.values():  # the queues are fresh ones, in build order
        assert [n.ordinal for n in q] == sorted(n.ordinal for n in q)


def test_freezing_a_plan_that_borrowed_scratch_is_refused() -> None:
    plan, _ = _built()
    plan.scratch(4, np.dtype(np.float32))
    with pytest.raises(ValueError, match="borrowed"):
        plan.freeze("k")
    with pytest.raises(ValueError, match="frozen"):
        plan.rearm()

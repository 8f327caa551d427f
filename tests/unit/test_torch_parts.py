"""The pure parts of phalanx.torch: verdicts, layouts, bucket plans, optimizer-state
probes, DiLoCo fragments (no daemon, no sockets)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from phalanx.torch.buckets import plan_buckets  # noqa: E402
from phalanx.torch.diloco import fragment_plan  # noqa: E402
from phalanx.torch.errors import StateLayoutError  # noqa: E402
from phalanx.torch.layout import TensorSpec, plan_layout  # noqa: E402
from phalanx.torch.manager import shard_slice  # noqa: E402
from phalanx.torch.optimstate import SharedOptimizerState, probe  # noqa: E402
from phalanx.torch.verdict import SLOTS, AttemptVerdict, judge, opening_slots  # noqa: E402

MEMBERS = ("a", "b", "c")


def _reduce(rows: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(SLOTS)
    for r in rows:
        out += r
    return out


def test_verdict_agreement() -> None:
    rows = [opening_slots(7, MEMBERS, "job", 12, w) for w in (22, 21, 21)]
    v = judge(_reduce(rows), 7, MEMBERS, 12)
    assert v.verdict is AttemptVerdict.OK and v.world == 3 and v.weight == 64


@pytest.mark.parametrize(
    ("odd", "expect"),
    [
        (
            opening_slots(6, MEMBERS[:2], "job", 12, 1),
            AttemptVerdict.RETRY,
        ),  # began in another view
        (opening_slots(7, MEMBERS, "job", 13, 1), AttemptVerdict.RETRY),  # at another step
        (opening_slots(7, MEMBERS, "other-job", 12, 1), AttemptVerdict.FOREIGN),  # another job
    ],
)
def test_one_member_that_disagrees_is_seen_by_everyone(
    odd: np.ndarray, expect: AttemptVerdict
) -> None:
    rows = [opening_slots(7, MEMBERS, "job", 12, 1) for _ in range(2)] + [odd]
    assert judge(_reduce(rows), 7, MEMBERS, 12).verdict is expect


def test_an_op_in_another_view_than_everyone_assumed_does_not_count() -> None:
    # every contributor assumed view 7 of (a, b) but the op ran in view 8 among (a, b, c)
    rows = [opening_slots(7, MEMBERS[:2], "job", 3, 1) for _ in range(3)]
    assert judge(_reduce(rows), 8, MEMBERS, 3).verdict is AttemptVerdict.RETRY
    assert judge(_reduce(rows[:2]), 7, MEMBERS[:2], 3).verdict is AttemptVerdict.OK


def test_large_worlds_stay_exact() -> None:
    members = tuple(f"m{i}" for i in range(1500))
    rows = [opening_slots(2**40, members, "j", 10**9, 1) for _ in range(1500)]
    assert judge(_reduce(rows), 2**40, members, 10**9).verdict is AttemptVerdict.OK
    rows[-1] = opening_slots(2**40, members, "j", 10**9 + 1, 1)
    assert judge(_reduce(rows), 2**40, members, 10**9).verdict is AttemptVerdict.RETRY


def test_shards_cover_the_batch_once() -> None:
    for n in (0, 1, 7, 64, 65):
        for world in (1, 2, 3, 5):
            parts = [shard_slice(n, r, world) for r in range(world)]
            covered = [i for p in parts for i in range(n)[p]]
            assert covered == list(range(n))
            assert parts == [
                slice(int(c[0]), int(c[-1]) + 1) if len(c) else parts[i]
                for i, c in enumerate(np.array_split(np.arange(n), world))
            ]


def test_layout_is_aligned_and_signed() -> None:
    specs = [
        TensorSpec("w", "float32", (3, 5)),
        TensorSpec("b", "float32", (5,)),
        TensorSpec("n", "int64", ()),
    ]
    lay = plan_layout([("params", specs[:2]), ("buffers", specs[2:])])
    w, b = lay.slots("params")
    assert (w.offset, b.offset) == (0, 16)  # 15 floats, then the next 64-byte boundary
    assert lay.buffers == {"params.float32": ("float32", 21), "buffers.int64": ("int64", 1)}
    same = plan_layout([("params", specs[:2]), ("buffers", specs[2:])])
    assert lay.signature() == same.signature()
    other = plan_layout([("params", specs[:2][::-1]), ("buffers", specs[2:])])
    assert lay.signature() != other.signature()
    with pytest.raises(ValueError):
        plan_layout([("params", [specs[0], specs[0]])])


def test_bucket_plan() -> None:
    params = [
        (0, "float32", 1000),
        (1, "float32", 10),
        (2, "float64", 50),
        (3, "float32", 3000),
        (4, "float32", 20),
    ]
    plan = plan_buckets(params, cap_bytes=4 * 1100)
    # last parameter first; dtypes never share a bucket; the 3000-float param alone
    assert [b.params for b in plan] == [(4,), (3,), (2,), (1, 0)]
    assert {b.dtype for b in plan if 2 in b.params} == {"float64"}
    for b in plan:
        assert all(o % 16 == 0 for o in b.offsets)
    assert sorted(i for b in plan for i in b.params) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        plan_buckets([(0, "int64", 3)], 100)


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("make", "keys"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"momentum_buffer"}),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), {"step", "exp_avg", "exp_avg_sq"}),
        (
            lambda ps: torch.optim.AdamW(ps, lr=0.1, amsgrad=True),
            {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
        ),
    ],
)
def test_probe_finds_the_state_without_touching_the_optimizer(make, keys) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters())
    specs = probe(opt)
    assert not opt.state  # the real optimizer never stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert {s.name.split("/")[1] for s in specs} == keys
    assert {s.name.split("/")[0] for s in specs} == {"0", "1", "2", "3"}
    # adopt: the state moves into the slots; load: it comes back from them
    views = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in specs}
    shared = SharedOptimizerState(opt, views)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    plain = shared.adopt()
    assert plain["has"] == [0, 1, 2, 3]
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v.data_ptr() == views[f"{i}/{k}"].data_ptr()
    opt2 = make(_model().parameters())
    SharedOptimizerState(opt2, views).load(plain)
    assert len(opt2.state) == 4
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_closure_optimizers_are_refused() -> None:
    with pytest.raises(StateLayoutError):
        probe(torch.optim.LBFGS(_model().parameters()))


def test_fragments_are_whole_tensors_in_order() -> None:
    assert fragment_plan([10, 10, 10, 10], 2) == [0, 0, 1, 1]
    assert fragment_plan([100, 1, 1], 2) == [0, 1, 1]
    assert fragment_plan([5], 1) == [0]


def test_a_replay_meeting_a_fresh_attempt_is_a_retry_not_a_foreign_job() -> None:
    rows = [opening_slots(7, MEMBERS, "job", 12, 1, "replay") for _ in range(2)]
    rows.append(opening_slots(7, MEMBERS, "job", 12, 1, "fresh"))
    for tag in ("replay", "fresh"):
        assert judge(_reduce(rows), 7, MEMBERS, 12, tag).verdict is AttemptVerdict.RETRY

"""The other benchmarks' checks, without processes: ``bench snapshot``'s restore check
and checksum rate, ``bench coordinator``'s incomplete failures, ``bench torch``'s
transfer figures."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from phalanx.bench import coordinator, snapshot, torchtrain
from phalanx.demo.cluster import DemoError

SIZE = 4096


# -- bench snapshot ------------------------------------------------------------------------


def test_the_state_changes_in_every_element_each_generation() -> None:
    g1 = snapshot._state(0, SIZE, 1)
    g2 = snapshot._state(0, SIZE, 2)
    for a, b in zip(snapshot._leaves(g1), snapshot._leaves(g2), strict=True):
        assert not np.any(a == b)
    # the rank advances its live state in place; the check regenerates it: same bits
    live = snapshot._state(0, SIZE)
    snapshot._advance(live, 1)
    snapshot._advance(live, 1)
    assert snapshot._same(live, g2)


def test_restore_check_sees_stale_mixed_and_wrong_step_restores() -> None:
    last = snapshot._state(0, SIZE, 3)
    stale = snapshot._state(0, SIZE, 2)
    mixed = snapshot._state(0, SIZE, 3)
    mixed["opt"] = stale["opt"]  # some shards of the generation before
    assert snapshot._restore_ok(3, snapshot._state(0, SIZE, 3), 3, last)
    assert not snapshot._restore_ok(2, stale, 3, last)
    assert not snapshot._restore_ok(3, stale, 3, last)  # the right step, old bytes
    assert not snapshot._restore_ok(3, mixed, 3, last)
    assert not snapshot._restore_ok(2, snapshot._state(0, SIZE, 3), 3, last)  # step off


def test_checksum_rate_counts_k_plus_m_pieces() -> None:
    assert snapshot._checksum_Bps(1000, 4, 2, 1.0) == pytest.approx(1500)
    assert snapshot._checksum_Bps(1000, 3, 3, 1.0) == pytest.approx(2000)
    assert snapshot._checksum_Bps(1000, 10, 4, 2.0) == pytest.approx(700)
    assert snapshot._checksum_Bps(1000, 4, 2, 0.0) is None


# -- bench coordinator ---------------------------------------------------------------------


class _Loads:
    """One load process whose failure reaches ``arrived`` of ``expected`` members."""

    def __init__(self, arrived: int, expected: int) -> None:
        self.conns = [None]
        self.owner = {"m0": 0, "m1": 0, "m2": 0}
        self.arrived = arrived
        self.expected = expected
        self.t_fail = 0.0

    def ask(self, p: int, msg: tuple[Any, ...], timeout: float = 60.0) -> tuple[Any, ...]:
        if msg[0] == "live":
            return ("live", ["m0", "m1", "m2"])
        if msg[0] == "fail":
            self.t_fail = time.monotonic()
            return ("fail", self.t_fail)
        assert msg[0] == "arrivals"
        return ("arrivals", [self.t_fail + 0.01 * (i + 1) for i in range(self.arrived)],
                self.expected)  # fmt: skip


def test_a_failure_that_missed_a_member_has_no_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator, "_FAILURE_DEADLINE_S", 0.2, raising=False)
    t0 = time.monotonic()
    assert coordinator._failure(_Loads(1, 2), 0) == (None, None)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5.0
    assert coordinator._failure(_Loads(0, 2), 0) == (None, None)  # type: ignore[arg-type]
    lat = coordinator._failure(_Loads(2, 2), 0)  # type: ignore[arg-type]
    assert lat is not None and lat[0] == pytest.approx(0.02)


def test_a_run_with_an_incomplete_failure_is_not_ok() -> None:
    fields = coordinator._failure_fields([0.01, None, 0.03], [0.01, 0.02])
    assert fields["failure_to_all_s"] == {"median": 0.02, "max": 0.03,
                                          "samples": [0.01, None, 0.03]}  # fmt: skip
    assert fields["failures"] == 3 and fields["failures_incomplete"] == 1
    for incomplete, ok in ((0, True), (1, False)):
        assert coordinator._ok(median=0.02, incomplete=incomplete, cores=0.5, failed=0,
                               beats=1000, alive=20, members=20) is ok  # fmt: skip


# -- bench torch ---------------------------------------------------------------------------


def test_a_transfer_without_its_log_line_is_an_error_not_a_row() -> None:
    with pytest.raises(DemoError, match="state_synced"):
        torchtrain._sync_figures("event=state_synced received=False step=1 bytes=10 seconds=1.0\n")
    with pytest.raises(DemoError):
        torchtrain._sync_figures("")
    line = (
        "x event=state_synced epoch=3 source=0 receivers=[2] received=True step=7 "
        "bytes=1048576 seconds=0.2500 rate_MBps=4\n"
    )
    assert torchtrain._sync_figures(line) == (1048576, 0.25)

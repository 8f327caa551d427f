"""The daemon's deferred observer: samples reach the monitor in batches (one feed call
each), none lost, in order, op_started at once, and close() feeds what is queued and
joins the thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from phalanx import daemon
from phalanx.comm.observer import OpSample


class _Recorder:
    def __init__(self) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.threads: set[int] = set()
        self.batches: list[int] = []

    def op_started(self, op: str, seq: int, epoch: int, nbytes: int) -> None:
        self.started.append(seq)

    def op_finished(self, sample: OpSample) -> None:  # pragma: no cover - fed in batches
        raise AssertionError("the deferred observer feeds batches")

    def feed(self, samples: Sequence[OpSample]) -> None:
        self.batches.append(len(samples))
        self.finished.extend(s.seq for s in samples)
        self.threads.add(threading.get_ident())
        if any(s.seq == 3 for s in samples):
            raise RuntimeError("a broken monitor must not stop the feeding")


def _sample(seq: int) -> OpSample:
    return OpSample(
        op="all_reduce", seq=seq, epoch=1, algorithm="ring", codec="none", nbytes=4096,
        world=2, rank=0, ok=True, duration_s=0.001, reason="", suspects=frozenset(),
        links=(), started=time.monotonic(),
    )  # fmt: skip


def test_samples_arrive_in_batches_in_order_and_close_flushes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(daemon, "_OBSERVE_BATCH_S", 0.5)  # long: "not yet" is unambiguous
    rec = _Recorder()
    obs = daemon._DeferredObserver(rec, rec.feed)
    try:
        obs.op_started("all_reduce", 0, 1, 4096)
        assert rec.started == [0]  # passed through at once, on the caller's thread
        t0 = time.monotonic()
        for seq in range(50):
            obs.op_finished(_sample(seq))
        time.sleep(0.05)  # an unbatched feeder would have fed them all by now
        if time.monotonic() - t0 < 0.25:  # (a stalled test thread proves nothing here)
            assert rec.finished == []  # the first sample waits for the batch window
        deadline = time.monotonic() + 5.0
        while len(rec.finished) < 50 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rec.finished == list(range(50))  # none lost (seq 3 raised), in order
        assert len(rec.batches) < 50  # one call per batch, not one per op
        assert threading.get_ident() not in rec.threads  # fed on the observer's thread
        for seq in range(50, 60):
            obs.op_finished(_sample(seq))
    finally:
        t0 = time.monotonic()
        obs.close()
        assert time.monotonic() - t0 < 2.0
    assert rec.finished == list(range(60))  # queued before close(): still fed
    assert not obs._thread.is_alive()

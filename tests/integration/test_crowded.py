"""A crowded group (all ranks on one host, more ranks than CPUs) moves an all-reduce in
larger pieces -- the same larger pieces on every rank, so the op runs and is exact --
and an uncrowded one keeps ``piece_bytes`` (comm/options.py, ``pipelining_unit``)."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

import phalanx.comm.group as group_module
from phalanx.comm import CommOptions, Group, bind

KiB = 1024
WORLD = 3
# world 3: a 768 KiB float32 array is three 256 KiB chunks; 64 KiB pieces cut each
# into four, a 256 KiB unit leaves it whole
OPTS = CommOptions(
    timeout_s=20.0, piece_bytes=64 * KiB, crowded_piece_bytes=256 * KiB, small_bytes=64 * KiB
)
COUNT = 768 * KiB // 4


class _Frames:
    """Counts the DATA frames with a payload that rank 0 sends, per op."""

    def __init__(self) -> None:
        self.sent: Counter[int] = Counter()
        self._lock = threading.Lock()

    def outgoing(self, peer: int, seq: int, ordinal: int, header: bytes, payload: object) -> None:
        if len(memoryview(payload)):  # type: ignore[arg-type]
            with self._lock:
                self.sent[seq] += 1
        return None


def _run(cpus: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], int, bool]:
    """(each rank's piece_bytes, data frames rank 0 sent in the op, result exact)."""
    monkeypatch.setattr(group_module, "_cpus", lambda: cpus)
    listeners = [bind("127.0.0.1:0") for _ in range(WORLD)]
    addresses = [lst.address for lst in listeners]
    frames = _Frames()
    groups: list[Group | None] = [None] * WORLD
    arrays = [np.arange(COUNT, dtype=np.float32) * (r + 1) for r in range(WORLD)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            g = Group(r, addresses, b"s" * 32, listener=listeners[r], options=OPTS,
                      frame_hook=frames if r == 0 else None)  # fmt: skip
            groups[r] = g
            res = g.all_reduce(arrays[r], op="sum")
            assert res.algorithm == "ring"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "a rank did not end in time"
        assert not errors, errors
        expected = np.arange(COUNT, dtype=np.float32) * sum(range(1, WORLD + 1))
        exact = all(np.array_equal(a, expected) for a in arrays)
        (sent,) = frames.sent.values()
        return [g.options.piece_bytes for g in groups if g is not None], sent, exact
    finally:
        for g in groups:
            if g is not None:
                g.close()


def test_a_crowded_group_sends_whole_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    units, sent, exact = _run(2, monkeypatch)  # three ranks, two CPUs
    assert units == [256 * KiB] * WORLD
    # reduce-scatter and all-gather: world - 1 steps each, one piece per step
    assert sent == 2 * (WORLD - 1)
    assert exact


def test_an_uncrowded_group_keeps_its_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    units, sent, exact = _run(WORLD, monkeypatch)  # a CPU per rank
    assert units == [64 * KiB] * WORLD
    assert sent == 2 * (WORLD - 1) * 4
    assert exact

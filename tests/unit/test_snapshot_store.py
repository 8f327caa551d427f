"""Conformance test for every ShardStore implementation (STYLE habit 8)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from phalanx.checkpoint._crc import crc32
from phalanx.checkpoint.store import (
    BudgetExceeded,
    MemoryShardStore,
    ShardCorrupt,
    ShardKey,
    ShardMissing,
    ShardStore,
)

STORES: dict[str, Callable[[int], ShardStore]] = {
    "memory": lambda budget: MemoryShardStore(budget),
}


@pytest.fixture(params=sorted(STORES))
def make(request: pytest.FixtureRequest) -> Callable[[int], ShardStore]:
    return STORES[request.param]


def _blob(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_store_conformance(make: Callable[[int], ShardStore]) -> None:
    st = make(1000)
    k1, k2, k3 = ShardKey("a", 1, 0, 0), ShardKey("a", 1, 0, 1), ShardKey("b", 7, 3, 2)
    d1 = _blob(400, 1)
    st.put(k1, d1.copy(), crc32(d1))
    got, crc = st.get(k1)
    assert np.array_equal(got, d1) and crc == crc32(d1)
    assert st.used_bytes() == 400 and st.budget_bytes == 1000
    # wrong checksum on the way in: refused, nothing stored
    with pytest.raises(ShardCorrupt):
        st.put(k2, _blob(10), 12345)
    assert st.keys() == [k1]
    # budget: 400 + 700 > 1000 refused; replacing a key counts only the difference
    assert not st.can_fit(k2, 700)
    with pytest.raises(BudgetExceeded):
        st.put(k2, _blob(700), crc32(_blob(700)))
    assert st.can_fit(k1, 1000)
    d1b = _blob(900, 2)
    st.put(k1, d1b.copy(), crc32(d1b))
    assert st.used_bytes() == 900
    d3 = _blob(100, 3)
    st.put(k3, d3.copy(), crc32(d3))
    assert st.keys("a") == [k1] and st.keys("b") == [k3] and st.keys() == [k1, k3]
    with pytest.raises(ShardMissing):
        st.get(k2)
    assert st.delete([k1, k2]) == 1
    assert st.used_bytes() == 100 and st.keys() == [k3]


def test_memory_store_checks_every_read() -> None:
    st = MemoryShardStore(100)
    k = ShardKey("a", 1, 0, 0)
    d = _blob(50)
    st.put(k, d.copy(), crc32(d))
    held, _ = st._blobs[k]  # simulate memory corruption of the held bytes
    held.setflags(write=True)
    held[7] ^= 0x40
    with pytest.raises(ShardCorrupt):
        st.get(k)

"""Rules of ``phalanx.torch``'s process group, DiLoCo and DDP hook, with real embedded
daemons in this process:

* a gather/reduce-scatter whose layout (world, rank) was read before a view change
  raises ``ViewChanged`` instead of returning bytes laid out for another world;
* ``DiLoCo.close()`` (and a constructor that fails) leaves no shared region mapped,
  here or in the daemon;
* a DiLoCo sync bounds the BatchNorm-buffer all-reduces by its own timeout;
* the DDP hook's CUDA staging buffers are pinned through ``phalanx.torch.cuda.pin`` (so
  the client never gives them a twin region), and unpinned and unmapped when replaced
  or closed. Only the CUDA registration call is faked here (no GPU on this machine).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import phalanx  # noqa: E402
from phalanx.local import shm  # noqa: E402


def _wait(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def pg() -> Iterator[Any]:
    client = phalanx.start()
    yield client
    client.close()


def _daemon_bytes(client: Any) -> int:
    """Shared bytes the embedded daemon counts for its clients (max_client_shm_bytes)."""
    return sum(s.shm_bytes for s in list(client.daemon.server._sessions.values()))


# ---------------------------------------------------------------------- process group
@pytest.mark.parametrize("kind", ["gather", "reduce_scatter"])
def test_a_layout_read_before_a_view_change_is_never_returned(secret: bytes, kind: str) -> None:
    """World 3; a and b read the layout (3 members), then c leaves, then they submit.
    The op ran in the 2-member view over a buffer laid out for 3 (with retry=True it
    was also rerun there): wrong data came back as a result. Now: ViewChanged."""
    from phalanx.errors import ViewChanged
    from phalanx.torch.process_group import ProcessGroup

    a = phalanx.start(secret=secret, member_id="a")
    b = c = None
    try:
        b = phalanx.start(coordinator=a.coordinator_address, secret=secret, member_id="b")
        c = phalanx.start(coordinator=a.coordinator_address, secret=secret, member_id="c")
        _wait(lambda: all(x.view().world == 3 for x in (a, b, c)), "no 3-member view")
        laid_out = threading.Barrier(3, timeout=30)
        submit = threading.Event()
        pgs = [ProcessGroup(x, retry=True, timeout=20) for x in (a, b)]
        for p in pgs:
            take = p._take_buf

            def held(numel: int, dtype: Any, take: Any = take) -> Any:
                laid_out.wait()  # the layout was read: now the view changes
                assert submit.wait(30)
                return take(numel, dtype)

            p._take_buf = held  # type: ignore[method-assign]
        n = 4
        outs: dict[int, Any] = {}

        def run(i: int) -> None:
            try:
                if kind == "gather":
                    out = torch.zeros(3 * n)
                    pgs[i].all_gather_single(out, torch.full((n,), float(i + 1))).wait()
                else:
                    out = torch.zeros(n)
                    inp = torch.arange(3 * n, dtype=torch.float32) + 100 * i
                    pgs[i].reduce_scatter_single(out, inp).wait()
                outs[i] = out
            except Exception as exc:
                outs[i] = exc

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in (0, 1)]
        for t in threads:
            t.start()
        laid_out.wait()
        c.close()
        c = None
        _wait(lambda: a.view().world == 2 and b.view().world == 2, "c never left")
        submit.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        for i in (0, 1):
            assert isinstance(outs[i], ViewChanged), (kind, i, outs[i])
        # the group goes on in the new view, with the new layout
        got: dict[int, Any] = {}

        def again(i: int) -> None:
            out = torch.zeros(2 * n)
            pgs[i].all_gather_single(out, torch.full((n,), float(i + 1))).wait()
            got[i] = out

        for p in pgs:
            del p._take_buf
        threads = [threading.Thread(target=again, args=(i,), daemon=True) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        want = torch.cat([torch.full((n,), 1.0), torch.full((n,), 2.0)])
        assert all(torch.equal(got[i], want) for i in (0, 1)), got
    finally:
        for x in (c, b, a):
            if x is not None:
                x.close()


# ---------------------------------------------------------------------- DiLoCo memory
def _bn_net() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))


def test_diloco_close_unmaps_every_region(pg: Any) -> None:
    """Each DiLoCo open/close left its pseudo-gradient buffers (and its state) mapped
    here and in the daemon, counted against max_client_shm_bytes."""
    from phalanx.torch import DiLoCo

    before = len(pg._regions), _daemon_bytes(pg)
    for i in range(3):
        net = _bn_net()
        d = DiLoCo(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), sync_every=1,
                   codec="none", job=f"leak{i}", timeout=30, op_timeout=10)  # fmt: skip
        if i == 0:  # one that ran a sync too
            d.begin_step(timeout=30)
            net(torch.randn(8, 64)).pow(2).mean().backward()
            d.end_step(timeout=30)
        d.close()
        d.close()  # idempotent
        _wait(lambda: _daemon_bytes(pg) == before[1], "the daemon kept regions", 10)
        assert (len(pg._regions), _daemon_bytes(pg)) == before, i


def test_a_diloco_constructor_that_fails_unmaps_what_it_mapped(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phalanx.errors import LimitExceeded
    from phalanx.torch import DiLoCo

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise LimitExceeded("refused by the test")

    before = len(pg._regions), _daemon_bytes(pg)
    monkeypatch.setattr(pg, "attach_state", refuse)
    net = _bn_net()
    with pytest.raises(LimitExceeded):
        DiLoCo(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), sync_every=1, job="fail")
    _wait(lambda: _daemon_bytes(pg) == before[1], "the daemon kept regions", 10)
    assert (len(pg._regions), _daemon_bytes(pg)) == before


# ---------------------------------------------------------------------- DiLoCo timeout
def test_a_diloco_sync_bounds_the_buffer_ops_by_its_timeout(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """end_step(timeout=T) gave the BatchNorm-buffer all-reduces op_timeout each, so
    a stalled peer could hold the sync for T + 2 x op_timeout."""
    from phalanx.torch import DiLoCo

    net = _bn_net()
    d = DiLoCo(pg, net, torch.optim.SGD(net.parameters(), lr=0.1), sync_every=1,
               codec="none", job="bounded", timeout=300, op_timeout=200)  # fmt: skip
    try:
        d.begin_step(timeout=30)
        seen: list[tuple[int, float | None]] = []
        real = pg.all_reduce

        def spy(x: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append((id(x), kwargs.get("timeout")))
            return real(x, *args, **kwargs)

        monkeypatch.setattr(pg, "all_reduce", spy)
        net(torch.randn(8, 64)).pow(2).mean().backward()
        assert d.end_step(timeout=5) is not None
        ops = {id(d._bufsync._fop), id(d._bufsync._iop)}
        buffer_ops = [t for i, t in seen if i in ops]
        assert len(buffer_ops) == 2, seen
        assert all(t is not None and 0 < t <= 5 for _, t in seen), seen
    finally:
        d.close()


# ---------------------------------------------------------------------- DDP hook
class _FakeCudart:
    """Only the page-locking calls (there is no GPU here): they succeed."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.registered.pop(ptr, None)
        return 0


def test_the_hooks_staging_buffers_are_pinned_without_a_twin(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """host_buffer page-locked with a raw cudaHostRegister: shm never knew, so the
    client gave an 8 MiB bucket a twin region and swapped its pages under the GPU's
    registration. Replaced and closed buffers stayed pinned and mapped."""
    from phalanx.torch import cuda
    from phalanx.torch.hook import HookState

    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    regions = len(pg._regions)
    st = HookState(pg)
    try:
        like = torch.ones(2 << 20)  # an 8 MiB bucket: over the 4 MiB twin threshold
        host = st.host_buffer(0, like)
        nbytes = host.numel() * host.element_size()
        assert fake.registered.get(host.data_ptr()) == nbytes
        assert shm.pinned(host.data_ptr(), nbytes) and cuda.pinned(host)
        assert st.host_buffer(0, like) is host  # kept while the bucket keeps its size
        host.copy_(like)
        res = pg.all_reduce(host, "avg", timeout=20)
        rid = pg._locate(host.numpy()).region
        assert res.zero_copy and not res.in_twin and pg._twins.get(rid) is None
        assert torch.equal(host, like)
        # a bucket of another size: the old buffer is unpinned and unmapped
        old_ptr = host.data_ptr()
        new = st.host_buffer(0, torch.ones(1 << 20))
        assert old_ptr not in fake.registered and not shm.pinned(old_ptr, nbytes)
        assert shm.pinned(new.data_ptr(), new.numel() * 4)
        assert len(pg._regions) == regions + 1
        st.close()
        assert fake.registered == {} and not shm.pinned(new.data_ptr(), new.numel() * 4)
        assert len(pg._regions) == regions
    finally:
        st.close()

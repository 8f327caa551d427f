"""LocalSGD and DiLoCo over phalanx: inner steps alone, an outer sync every H steps.

Each member trains its own copy of the model (``model``, the *local* parameters) with
its *inner* optimizer for ``sync_every`` = H steps without talking to anyone. Then the
**outer sync**: the pseudo-gradient ``delta_i = global - local_i`` is averaged over the
members (an all-reduce with a chosen codec: ``int8`` sends about a quarter of float32's
bytes, once every H steps), the *outer* optimizer (default: SGD, lr 0.7, momentum 0.9,
Nesterov — the DiLoCo paper's) applies the average to the **global** parameters, and
every member restarts from them. LocalSGD is the same with an outer SGD of lr 1 and no
momentum: the global parameters become the plain average of the local ones.

What the group keeps in sync (hash-verified, sent to a newcomer): the global
parameters, the global BatchNorm buffers, the outer optimizer's state, the user's state
and the step. The inner optimizer's state and the local parameters are each member's
own (a newcomer starts them from the global parameters and a fresh inner optimizer).

**A dead peer costs the survivors none of their inner steps.** An outer sync is an
attempt like a DDP step (:mod:`~phalanx.torch.manager`): ``begin_step`` of the daemon
(the new view is installed here), an opening all-reduce on which every member reaches
the same verdict (:mod:`~phalanx.torch.verdict`), the pseudo-gradient and buffer
all-reduces, the commit vote. If any of it fails, the sync is simply run again in the
next view from the same local parameters: the survivors' pseudo-gradients are averaged
among themselves (the dead member's inner steps of that round are lost; such rounds
are counted in ``stats["short_rounds"]``).

**A newcomer** calls ``begin_step`` like everyone; its daemon is admitted at a commit
boundary and its first exchange happens at the others' next outer sync: it receives
the state, takes part in that sync with weight 0 (it has no inner steps), and starts
inner steps with everyone from the new global parameters.

The loop::

    algo = DiLoCo(pg, model, inner_opt, sync_every=50, codec="int8")
    while algo.step < total:
        s = algo.begin_step()          # a newcomer's first call waits for the next sync
        x, y = batch(s.step)[s.shard()]
        inner_opt.zero_grad(); loss_fn(model(x), y).backward(); inner_opt.step()
        algo.end_step()                # every H-th call runs the outer sync

**Streaming** (``fragments=F > 1``): the parameters are cut into F fragments (whole
tensors, in registration order, balanced by size) and fragment ``f`` is synced at the
steps where ``(step // (H / F)) % F == f``: one sync every H/F steps, each sending 1/F of
the parameters, so the peak bandwidth drops by F (streaming DiLoCo).

This module must never apply an outer step that the group did not commit, nor discard
a survivor's inner steps because an outer sync failed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phalanx.client import Client, OpResult
from phalanx.errors import CommError, ConfigError, DaemonUnavailable
from phalanx.membership.errors import CommitUnknown, Evicted, MembershipError
from phalanx.torch.bufsync import BufferSync
from phalanx.torch.errors import JobMismatch, StepTimeout
from phalanx.torch.layout import TensorSpec, plan_layout
from phalanx.torch.manager import StepContext, shard_slice
from phalanx.torch.state import SectionTensor, TrainingState, release_shared, shared_tensor
from phalanx.torch.verdict import SLOTS, AttemptVerdict, job_identity, judge, opening_slots

__all__ = ["DiLoCo", "LocalSGD", "OuterSyncReport", "fragment_plan"]

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.torch")

_RETRYABLE = (CommError, MembershipError, TimeoutError, Evicted, CommitUnknown)


def fragment_plan(sizes: Sequence[int], fragments: int) -> list[int]:
    """Fragment of each tensor (whole tensors, registration order, balanced by size)."""
    if fragments < 1:
        raise ConfigError("fragments must be >= 1")
    total = sum(sizes) or 1
    out, acc = [], 0
    for n in sizes:
        out.append(min(fragments - 1, (acc * fragments) // total))
        acc += n
    return out


@dataclass(frozen=True)
class OuterSyncReport:
    """One committed outer sync: its step, fragment, contributors and their weights'
    sum, attempts it took, bytes of pseudo-gradient handed to the daemon."""

    step: int
    fragment: int
    epoch: int
    contributors: tuple[str, ...]
    weight: float
    attempts: int
    nbytes: int
    seconds: float
    mine: float = 1.0  # this member's weight (0: it had no inner steps, e.g. it just joined)
    round_members: tuple[str, ...] = ()  # the view the round's inner steps were cut for


def _default_outer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


class DiLoCo:
    """See the module docstring.

    Args:
        client, model: as for :class:`~phalanx.torch.Manager` (the model's parameters
            stay private: they are the local ones).
        inner_optimizer: the model's optimizer (stepped by the caller every step).
        sync_every: H, inner steps between outer syncs.
        outer_optimizer: builds the outer optimizer from the global parameters
            (default Nesterov SGD lr 0.7 momentum 0.9).
        codec: the pseudo-gradient all-reduce's codec (``none``, ``bf16``, ``int8``, ...).
        fragments: streaming DiLoCo's fragment count (1: all parameters at once).
        global_batch: examples per inner step over the group (``StepContext.shard``).
        user_state, join, start_step, job, timeout, op_timeout, meta_bytes: as for
            :class:`~phalanx.torch.Manager`.
    """

    kind = "diloco"

    def __init__(
        self,
        client: Client,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        sync_every: int,
        outer_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
        codec: str = "int8",
        fragments: int = 1,
        global_batch: int | None = None,
        user_state: dict[str, Any] | None = None,
        join: bool = False,
        start_step: int = 0,
        job: str = "",
        timeout: float = 300.0,
        op_timeout: float = 60.0,
        meta_bytes: int = 1 << 20,
    ) -> None:
        if sync_every < 1:
            raise ConfigError("sync_every must be >= 1")
        if fragments < 1 or sync_every % fragments:
            raise ConfigError("fragments must be >= 1 and divide sync_every")
        if start_step % sync_every:
            raise ConfigError("start_step must be a multiple of sync_every")
        self.client = client
        self.model = model
        self.inner = inner_optimizer
        self.H = int(sync_every)
        self.F = int(fragments)
        self.codec = codec
        self.global_batch = global_batch
        self.timeout = float(timeout)
        self.op_timeout = float(op_timeout)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._local = [p for _, p in named]
        # the global parameters: CPU copies, rebound to shared slots by the state
        self._global = [torch.nn.Parameter(p.detach().to("cpu", copy=True)) for _, p in named]
        self.outer = (outer_optimizer or _default_outer)(self._global)
        keys = set(model.state_dict(keep_vars=True))
        self._buffers = [(n, b) for n, b in model.named_buffers() if n in keys and b is not None]
        gbufs = [b.detach().to("cpu", copy=True) for _, b in self._buffers]
        self._gbuf: list[torch.Tensor] = []

        def keep(lst: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
            return lst.append

        sections = [
            ("global", [SectionTensor(n, g, _binder(g)) for (n, _), g in zip(named, self._global,
                                                                             strict=True)]),
            ("gbuf", [SectionTensor(n, b, keep(self._gbuf)) for (n, _), b in zip(
                self._buffers, gbufs, strict=True)]),
        ]  # fmt: skip
        # what close() unmaps; set before the first region is mapped, so that a
        # constructor that fails after it unmaps what it mapped
        self._closed = False
        self._dflat: dict[str, torch.Tensor] = {}
        self._open: Any = None
        self.state = TrainingState(
            client, sections, optimizers={"outer": self.outer}, user_state=user_state,
            meta_bytes=meta_bytes,
        )  # fmt: skip
        try:
            self._build(client, named, join, start_step, job, global_batch, codec, op_timeout)
        except BaseException:
            self.close()
            raise

    def _build(
        self,
        client: Client,
        named: list[tuple[str, torch.nn.Parameter]],
        join: bool,
        start_step: int,
        job: str,
        global_batch: int | None,
        codec: str,
        op_timeout: float,
    ) -> None:
        """The rest of the constructor, once the state is mapped."""
        # pseudo-gradients: the global parameters' .grad, in shared memory
        specs = [TensorSpec(n, str(p.dtype).removeprefix("torch."), tuple(p.shape))
                 for (n, _), p in zip(named, self._global, strict=True)]  # fmt: skip
        self._frag = fragment_plan([p.numel() for p in self._global], self.F)
        lay = plan_layout([(f"delta{f}", [s for s, fr in zip(specs, self._frag, strict=True)
                                          if fr == f]) for f in range(self.F)])  # fmt: skip
        self._dflat = {name: shared_tensor(client, n, _dt(dt)) for name, (dt, n)
                       in lay.buffers.items()}  # fmt: skip
        self._frag_flats: list[list[torch.Tensor]] = [[] for _ in range(self.F)]
        for name, flat in self._dflat.items():
            self._frag_flats[int(name.split(".")[0].removeprefix("delta"))].append(flat)
        by_name = dict(zip([n for n, _ in named], self._global, strict=True))
        for f in range(self.F):
            for s in lay.slots(f"delta{f}"):
                flat = self._dflat[s.buffer]
                by_name[s.spec.name].grad = flat[s.offset : s.offset + s.spec.numel].view(
                    s.spec.shape)  # fmt: skip
        self._open = client.empty((SLOTS,), "float64")
        self._bufsync = BufferSync(client, [b for _, b in self._buffers], timeout=op_timeout)
        self.job = job_identity(
            self.kind, job, self.state.layout.signature(), str(global_batch), codec,
            str(self.H), str(self.F),
        )  # fmt: skip
        self.stats: dict[str, Any] = {
            "syncs": 0, "attempts_failed": 0, "short_rounds": 0, "state_syncs": 0,
            "sync_bytes": 0, "delta_bytes": 0, "inner_steps": 0, "last_failure": "",
        }  # fmt: skip
        self.reports: list[OuterSyncReport] = []
        self._t = start_step  # the next inner step this member runs
        self._sync_owed = False  # end_step counted a sync step whose sync did not finish
        self._joined = not join  # has the group's state (founders: their own)
        self._round_members: tuple[str, ...] = ()
        self.epoch = -1  # the view of the last sync point (the rounds' view)
        self._rank = 0
        self._fresh = True  # no inner step since the last sync: weight 0
        self._synced_at = start_step  # the group's state step this member started from
        got = self.client.attach_state(self.state.arrays(), step=None if join else start_step)
        if join and got >= 0:  # a restarted training process: its daemon kept the state
            self._receive(0)
        self._started = False

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """The next inner step (global count; -1 before a newcomer's first sync)."""
        return self._t if self._joined else -1

    @property
    def members(self) -> tuple[str, ...]:
        return self._round_members

    # ------------------------------------------------------------------ the loop
    def begin_step(self, *, timeout: float | None = None) -> StepContext:
        """The context of the next inner step. The first call (and a newcomer's) runs a
        sync point with the group (state received, everyone starts from the same
        global parameters)."""
        if not self._started:
            self._sync(timeout)
            self._started = True
        return StepContext(self._t, -1, self._round_members, self._rank, 1, False, 0,
                           self.global_batch)  # fmt: skip

    def end_step(self, *, timeout: float | None = None) -> OuterSyncReport | None:
        """Count one inner step (call it after ``inner_optimizer.step()``); at a sync
        step run the outer sync and return its report. If that sync raised
        (``StepTimeout``), the next ``end_step`` runs it again without counting
        another inner step: a retry never skips a sync."""
        if not self._sync_owed:
            self._t += 1
            self._fresh = False
            self.stats["inner_steps"] += 1
            if self._t % (self.H // self.F):
                return None
            self._sync_owed = True
        rep = self._sync(timeout)
        self._sync_owed = False
        return rep

    # ------------------------------------------------------------------ a sync point
    def _sync(self, timeout: float | None) -> OuterSyncReport | None:
        t = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + t
        last = ""
        attempts = 0
        t0 = time.monotonic()
        while True:
            if time.monotonic() > deadline:
                raise StepTimeout(self._t, t, last)
            attempts += 1
            try:
                rep = self._attempt(deadline, attempts, t0)
            except _Again as again:
                last = again.why
                self.stats["attempts_failed"] += 1
                self.stats["last_failure"] = last
                log.info("event=outer_sync_failed member=%s step=%d why=%r",
                         self.client.member_id, self._t, last)  # fmt: skip
                time.sleep(again.pause)
                continue
            return rep

    def _op_left(self, deadline: float) -> float:
        """An op's timeout within the sync's deadline (``end_step(timeout=...)``)."""
        return max(0.001, min(self.op_timeout, deadline - time.monotonic()))

    def _attempt(self, deadline: float, attempts: int, t0: float) -> OuterSyncReport | None:
        c = self.client
        left = max(0.1, deadline - time.monotonic())
        try:
            # all that is left: the exchange may move the whole state to a newcomer
            info = c.begin_step(timeout=left)
        except DaemonUnavailable:
            raise
        except _RETRYABLE as exc:
            raise _Again(f"begin_step: {type(exc).__name__}: {exc}", 0.02) from exc
        # load whenever *this* call received the group's state (StepInfo.synced is per
        # call), not once per view epoch: after an unanswered vote (CommitUnknown) the
        # daemon re-syncs in a new generation of the same view, and the outer state,
        # user_state and the step it received must replace this member's
        if info.synced:
            self._receive(info.sync_bytes)
        if info.step < 0:
            raise _Again("no member holds the group's state yet", 0.05)
        if c.member_id not in info.members:
            raise _Again("this member is not in the view yet", 0.05)
        if not self._joined:
            self._receive(0)
        # a member whose state is the group's and that ran inner steps since it
        # started from it contributes; the others (a newcomer) take part with weight 0
        w = 0.0 if (self._fresh or info.step != self._state_step()) else 1.0
        if w == 0.0 and not self._fresh:
            self._restart_round()  # this member's inner steps were not from the group's state
        self._open[:] = opening_slots(info.epoch, info.members, self.job, info.step, w)
        try:
            res = c.all_reduce(self._open, "sum", timeout=self._op_left(deadline))
        except DaemonUnavailable:
            raise
        except _RETRYABLE as exc:
            raise _Again(f"opening op: {type(exc).__name__}", 0.0) from exc
        v = judge(self._open, res.epoch, res.contributors, info.step)
        if v.verdict is AttemptVerdict.FOREIGN:
            raise JobMismatch(res.epoch, res.contributors, self.job)
        if v.verdict is AttemptVerdict.RETRY:
            raise _Again(f"{v.why} (state step {info.step}, weight {w})", 0.0)
        W = v.weight
        members = res.contributors
        if W == 0:  # nobody has inner steps (a start): everyone takes the global state
            self._adopt_global(members, res)
            return None
        # which sync this is follows from the group's state step alone (a newcomer
        # knows nothing else): the one that takes the state one period further
        per = self.H // self.F
        new_step = info.step + per
        frag = (new_step // per) % self.F
        frags = [frag]
        nbytes = 0
        with torch.no_grad():
            for f in frags:
                for g, loc, fr in zip(self._global, self._local, self._frag, strict=True):
                    if fr == f and g.grad is not None:
                        if w:
                            g.grad.copy_(g.detach() - loc.detach().to("cpu"))
                            g.grad.mul_(w / W)
                        else:
                            g.grad.zero_()
        try:
            results: list[OpResult] = []
            for f in frags:  # one op at a time: nothing stale queued after a failure
                for flat in self._frag_flats[f]:
                    results.append(c.all_reduce(flat, "sum", self.codec,
                                                timeout=self._op_left(deadline)))  # fmt: skip
                    nbytes += flat.numel() * flat.element_size()
            for r in results:
                if r.epoch != res.epoch or r.contributors != members:
                    raise _Again("a pseudo-gradient op ran in another view", 0.0)
            # the buffer ops are bounded by the sync's deadline too (positional: the
            # demo's fault injection replaces reduce with a *args lambda)
            why, means = self._bufsync.reduce(round(w), round(W), res.epoch, members,
                                              self._op_left(deadline))  # fmt: skip
            if why:
                raise _Again(why, 0.0)
            ok = c.commit(info.step, True, timeout=self._op_left(deadline))
        except DaemonUnavailable:
            raise
        except _RETRYABLE as exc:
            raise _Again(f"{type(exc).__name__}: {exc}", 0.0) from exc
        if not ok:
            raise _Again("not committed", 0.0)
        self.stats["delta_bytes"] += nbytes
        # apply: the outer step on the global parameters (only this fragment's grads)
        saved = []
        if self.F > 1:
            for g, fr in zip(self._global, self._frag, strict=True):
                if fr != frag:
                    saved.append((g, g.grad))
                    g.grad = None
        with torch.no_grad():
            self.outer.step()
        for g, grad in saved:
            g.grad = grad
        BufferSync.apply(self._gbuf, means)
        self._t = new_step
        self.state.extra = {"t": new_step}
        self.state.capture()
        c.update_state(new_step)
        round_members = self._round_members
        self._adopt_global(members, res, frag)
        if not set(round_members) <= set(members):
            self.stats["short_rounds"] += 1  # some member's inner steps of the round were lost
            log.warning("event=short_round step=%d lost=%s", new_step,
                        ",".join(sorted(set(round_members) - set(members))))  # fmt: skip
        self.stats["syncs"] += 1
        rep = OuterSyncReport(new_step, frag, res.epoch, members, W,
                         attempts, nbytes, time.monotonic() - t0, w, round_members)  # fmt: skip
        self.reports.append(rep)
        audit.info("event=outer_sync step=%d fragment=%d epoch=%d contributors=%d weight=%.0f "
                   "attempts=%d", new_step, rep.fragment, res.epoch, len(members), W,
                   attempts)  # fmt: skip
        return rep

    def _state_step(self) -> int:
        """The state step the group holds while this member runs step ``_t``: the last
        sync step (the daemon's state step)."""
        return self._synced_at

    def _receive(self, nbytes: int) -> None:
        """The group's state arrived (or this newcomer's first sync): load it, restart
        the local round from the global parameters."""
        self.state.load()
        self._t = int(self.state.extra.get("t", self._t))
        self._joined = True
        if nbytes:
            self.stats["state_syncs"] += 1
            self.stats["sync_bytes"] += nbytes
        self._restart_round()

    def _restart_round(self) -> None:
        with torch.no_grad():
            for g, loc in zip(self._global, self._local, strict=True):
                loc.copy_(g.detach())
            for (_, b), gb in zip(self._buffers, self._gbuf, strict=True):
                b.copy_(gb)
        self._synced_at = self._t
        self._fresh = True

    def _adopt_global(self, members: tuple[str, ...], res: OpResult, frag: int | None = None
                      ) -> None:  # fmt: skip
        """Every member restarts from the global parameters (of ``frag`` only, when
        streaming): the next round's view is the one this sync ran in."""
        with torch.no_grad():
            for g, loc, fr in zip(self._global, self._local, self._frag, strict=True):
                if frag is None or fr == frag:
                    loc.copy_(g.detach())
            for (_, b), gb in zip(self._buffers, self._gbuf, strict=True):
                b.copy_(gb)
        self._round_members = members
        self.epoch = res.epoch
        self._rank = members.index(self.client.member_id)
        self._synced_at = self._t
        self._fresh = True

    # ------------------------------------------------------------------ misc
    def shard(self, n: int | None = None) -> slice:
        total = self.global_batch if n is None else n
        if total is None:
            raise ConfigError("shard() needs n, or global_batch")
        return shard_slice(total, self._rank, max(1, len(self._round_members)))

    def close(self) -> None:
        """Unmap every shared region this object mapped, here and in the daemon
        (pseudo-gradients, buffer ops, opening slots, the state's buffers; idempotent).
        The daemon keeps serving the attached state until a new ``attach_state``
        replaces it (its own mappings keep the pages), and the global parameters stay
        readable here (this process's memory lives while tensors view it)."""
        if self._closed:
            return
        self._closed = True
        c = self.client
        with contextlib.suppress(Exception):
            for g in self._global:
                g.grad = None
        bufsync: BufferSync | None = getattr(self, "_bufsync", None)  # None: never made
        if bufsync is not None:
            bufsync.close()
        for flat in self._dflat.values():
            release_shared(c, flat)
        self._dflat = {}
        self._frag_flats = [[] for _ in range(self.F)]
        if self._open is not None:
            c._release(self._open)
        for arr in self.state.arrays().values():
            if isinstance(arr, torch.Tensor):
                release_shared(c, arr)
            else:
                c._release(arr)

    def __enter__(self) -> DiLoCo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalSGD(DiLoCo):
    """Periodic parameter averaging: :class:`DiLoCo` whose outer optimizer is SGD with
    lr 1 and no momentum (the global parameters become the members' plain average).
    Default codec ``none``."""

    kind = "localsgd"

    def __init__(
        self, client: Client, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer,
        *, sync_every: int, codec: str = "none", **kw: Any,
    ) -> None:  # fmt: skip
        if "outer_optimizer" in kw:
            raise ConfigError("LocalSGD's outer step is the plain average: use DiLoCo")
        super().__init__(
            client, model, inner_optimizer, sync_every=sync_every, codec=codec,
            outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), **kw,
        )  # fmt: skip


class _Again(Exception):
    def __init__(self, why: str, pause: float) -> None:
        super().__init__(why)
        self.why = why
        self.pause = pause


def _binder(p: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
    def bind(view: torch.Tensor) -> None:
        p.data = view

    return bind


def _dt(name: str) -> torch.dtype:
    dt: torch.dtype = getattr(torch, name)
    return dt

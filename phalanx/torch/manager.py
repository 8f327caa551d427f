"""Elastic data-parallel training with committed optimizer steps: :class:`Manager`.

No ``torch.distributed`` process group: gradients, BatchNorm statistics and the state a
newcomer receives all go through the local phalanx daemon, and a peer's death never
takes the survivors down. One step::

    s = mgr.begin_step()            # view installed, state received (a newcomer), and
                                    # every member agreed on (job, view, step): opening op
    x, y = batch(s.step)[s.shard()] # this member's part of the step's global batch
    loss_fn(model(x), y).backward() # buckets all-reduced while backward runs; when it
                                    # returns, .grad is the global gradient (clip here)
    if mgr.commit():                # grads + buffers checked, vote, then optimizer.step(),
        ...                         # scheduler.step(), update_state(step + 1)

**The rule every member applies the same way.** An attempt counts only if the opening
op, every gradient bucket and the buffer op ran in the view the step began in, among
exactly its members (:mod:`~phalanx.torch.verdict`: the verdict is computed from the
reduced bytes and ``OpResult.contributors``, which every member sees identically), and
the group's commit vote says yes. Otherwise the attempt is dropped on every member
(gradients discarded, BatchNorm statistics reverted, no vote cast: a "no" would settle
the (epoch, step) round for good) and ``begin_step`` redoes the **same step** — same
global batch, shards re-cut for the new view — so a step's gradient is always the mean
over its whole global batch: ``sum_i (n_i / N) * grad_i`` with ``n_i`` the examples of
member ``i``'s shard and ``N`` the global batch, whatever the world size.

**Opt-in partial steps** (``partial=True``): when an attempt fails because members
*left* (died, were evicted) after this member's backward, :meth:`commit` replays the
survivors' gradients in the new view without a second forward/backward, weighted over
the survivors' examples only (``sum_{i in S} n_i grad_i / sum_{i in S} n_i``): the dead
members' examples are dropped from that step. Such commits are counted
(``stats["partial_commits"]``) and logged, never silent. A replay reduces the kept *raw*
local gradients again, so it would undo whatever the loop did to the synced ones: it is
refused (the step is redone, counted in ``stats["partial_refused"]``, logged) once
:meth:`sync_gradients` returned True to the caller, or once the gradients changed after
they were synced (``clip_grad_norm_`` after ``backward()``).

**Which parameters train** is fixed when the manager is built (the bucket plan and its
hooks): a parameter whose ``requires_grad`` changed since, or a ``.grad`` on one outside
the plan, makes :meth:`begin_step` / :meth:`commit` raise ``ConfigError`` before anything
is applied (its gradient would never be averaged: the members would silently diverge).
Build a new manager after changing which parameters train.

**Unused parameters** (opt-in ``find_unused_parameters=True``, DDP's meaning): every
``.grad`` is a view into a shared bucket, so by default a parameter no member's forward
used ends the step with a zero gradient (weight decay and momentum still move it). With
the option, each attempt's gradient sync also sums the members' "used" flags (one small
all-reduce after the last bucket, :mod:`~phalanx.torch.gradsync`): parameters no member
used get ``.grad = None`` and ``optimizer.step()`` leaves them alone; those used by any
member get the averaged gradient as before. Every member must pass the same setting: it
is part of the job identity when on.

**Job identity.** The opening op also carries a hash of the job (``job=``, the state
layout, the global batch, the codec, the buffer rule): a daemon of another job on the
same coordinator makes every member raise :class:`~phalanx.torch.errors.JobMismatch`
instead of averaging with it.

This module must never apply an optimizer step that the group did not commit, nor let
torch wrap a phalanx error (collectives are submitted in autograd hooks, waited for
here).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from phalanx.client import Client, OpResult
from phalanx.comm.codecs import parse_codec
from phalanx.errors import CommError, ConfigError, DaemonUnavailable, StepAborted, ViewChanged
from phalanx.membership.errors import CommitUnknown, Evicted, MembershipError
from phalanx.torch.bufsync import BufferSync
from phalanx.torch.errors import JobMismatch, StepTimeout
from phalanx.torch.gradsync import GradSync
from phalanx.torch.state import SectionTensor, TrainingState, release_shared
from phalanx.torch.verdict import SLOTS, AttemptVerdict, job_identity, judge, opening_slots

__all__ = ["BUFFER_RULES", "Manager", "StepContext", "shard_slice"]

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.torch")

BUFFER_RULES = ("average", "rank0")
_RETRYABLE = (CommError, MembershipError, TimeoutError)


def shard_slice(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items split over ``world`` members
    (sizes differ by at most one, the larger parts first: ``numpy.array_split``)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class StepContext:
    """One attempt of a step, as :meth:`Manager.begin_step` opened it."""

    step: int
    epoch: int
    members: tuple[str, ...]
    rank: int
    attempt: int  # 1 for the first attempt of this step on this member
    synced: bool  # this begin_step installed the group's state (newcomer / diverged)
    sync_bytes: int
    global_batch: int | None

    @property
    def world(self) -> int:
        return len(self.members)

    def shard(self, n: int | None = None) -> slice:
        """This member's slice of ``n`` items (default: the global batch)."""
        total = self.global_batch if n is None else n
        if total is None:
            raise ConfigError("shard() needs n, or the manager's global_batch")
        return shard_slice(total, self.rank, self.world)


class _Attempt:
    def __init__(self, ctx: StepContext, open_res: OpResult, weight: float, total: float):
        self.ctx = ctx
        self.open = open_res
        self.weight = weight  # this member's share of the step's gradient
        self.total = total  # the sum of the contributors' example counts
        self.synced: bool | None = None  # gradients (and buffers) reduced and checked
        # sync_gradients() returned True to the caller: the loop has had the synced
        # gradients (and may have changed them), so this attempt is never replayed
        self.seen = False


def _seed(base: int, step: int, rank: int) -> int:
    d = hashlib.sha256(struct.pack("<qqq", base, step, rank)).digest()
    return int.from_bytes(d[:4], "little")


class Manager:
    """Elastic DDP with committed optimizer steps (see the module docstring).

    Args:
        client: a :class:`phalanx.Client` (``phalanx.connect()`` or ``phalanx.start()``).
        model: the ``torch.nn.Module``; its parameters and persistent buffers move into
            memory the daemon shares (``param.data`` is rebound; keep using ``model``).
        optimizer: any ``torch.optim`` optimizer over the model's parameters (state:
            fixed-shape tensors plus plain values; no closure). Its ``zero_grad`` is
            replaced by :meth:`zero_grad` so gradients stay in shared memory.
        scheduler: an LR scheduler, stepped only on committed steps, synced to joiners.
        user_state: a dict of plain values/tensors, **identical on every member** (data
            loader position, epoch, seeds); a joiner receives it (updated in place).
        global_batch: examples per step over the whole group; enables
            :meth:`StepContext.shard` and exact example weighting. ``None``: every member
            weighs ``1 / world``.
        join: this process joins a running job: it receives the group's state at its
            first ``begin_step`` before it contributes. Founders pass False.
        start_step: the step the founders' state is at (resuming from a checkpoint).
        job: a name for the job; part of the job identity checked at every step.
        bucket_cap_mb: gradient bucket size; ``codec``: the gradients' all-reduce codec.
        buffers: ``"average"`` (example-weighted mean over members at every commit) or
            ``"rank0"`` (rank 0's values, what DDP broadcasts).
        rng_seed: if given, torch/numpy/random are seeded at every attempt from
            ``(rng_seed, step, rank)``: a redone step or a replacement draws the same
            numbers, and no per-member RNG state has to travel.
        partial: opt-in partial steps (see the module docstring).
        find_unused_parameters: parameters no member used in the step get ``.grad =
            None`` (DDP's option; one more small all-reduce per attempt; see the module
            docstring). The same on every member.
        timeout: seconds ``begin_step`` may take (retries included) before
            :class:`~phalanx.torch.errors.StepTimeout`; ``op_timeout``: per collective.
        meta_bytes: capacity of the plain-value blob (same on every member).
    """

    def __init__(
        self,
        client: Client,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any = None,
        user_state: dict[str, Any] | None = None,
        global_batch: int | None = None,
        join: bool = False,
        start_step: int = 0,
        job: str = "",
        bucket_cap_mb: float = 25.0,
        codec: str = "none",
        buffers: str = "average",
        rng_seed: int | None = None,
        partial: bool = False,
        timeout: float = 120.0,
        op_timeout: float = 30.0,
        meta_bytes: int = 1 << 20,
        find_unused_parameters: bool = False,
    ) -> None:
        if buffers not in BUFFER_RULES:
            raise ConfigError(f"buffers must be one of {', '.join(BUFFER_RULES)}")
        if global_batch is not None and global_batch < 1:
            raise ConfigError("global_batch must be >= 1")
        if not timeout > 0 or not op_timeout > 0:
            raise ConfigError("timeouts must be > 0")
        if start_step < 0:
            raise ConfigError("start_step must be >= 0")
        self.client = client
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.global_batch = global_batch
        self.buffers_rule = buffers
        self.rng_seed = rng_seed
        self.partial = partial
        self.find_unused_parameters = find_unused_parameters
        self.timeout = float(timeout)
        self.op_timeout = float(op_timeout)
        parse_codec(codec)  # a ConfigError now, not at the first commit
        self.codec = codec
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = list(model.named_parameters())
        if not opt_params <= {id(p) for _, p in named}:
            raise ConfigError("the optimizer holds tensors that are not the model's parameters")
        self._named = named
        self._buffers = _persistent_buffers(model)
        self._stash_buffers: list[torch.Tensor] | None = None
        self._zero_grad_patched = False
        self._closed = False
        self._attempt: _Attempt | None = None
        # applying a step the group committed failed here (see commit): this member's
        # state is no longer the group's, so no further step may run on it
        self._broken: BaseException | None = None
        self._last_step = -1
        self._tries = 0
        self.stats: dict[str, Any] = {
            "commits": 0, "attempts_failed": 0, "partial_commits": 0, "partial_refused": 0,
            "syncs": 0, "sync_bytes": 0, "last_failure": "", "grad_bytes": 0, "foreign": 0,
        }  # fmt: skip
        self._step = -1 if join else start_step
        # what the parts below change, undone if one of them raises (client.empty over
        # the daemon's limit, attach_state timing out, a state too large for meta_bytes)
        before = [(p, p.data, p.grad) for _, p in named]
        mapped = _Mapped(client)  # notes every region the parts map
        grads: GradSync | None = None
        try:
            params = [SectionTensor(n, p, _param_binder(p)) for n, p in named]
            bufs = [SectionTensor(n, b, None) for n, b in self._buffers]
            sched = {"lr": scheduler} if scheduler is not None else {}
            self.state = TrainingState(
                cast(Client, mapped), [("params", params), ("buffers", bufs)],
                optimizers={"opt": optimizer}, schedulers=sched, user_state=user_state,
                meta_bytes=meta_bytes,
            )  # fmt: skip
            self.state.client = client
            grads = GradSync(
                client, [p for _, p in named],
                cap_bytes=max(1, int(bucket_cap_mb * (1 << 20))), codec=codec,
                timeout=op_timeout, keep_local=partial,
                find_unused_parameters=find_unused_parameters,
            )  # fmt: skip
            self.grads = grads
            # the usage op is one more op per attempt: members that disagree on it
            # must not meet (JobMismatch); off, the identity is what it always was
            unused = ["find_unused_parameters"] if find_unused_parameters else []
            self.job = job_identity(
                "ddp", job, self.state.layout.signature(), str(global_batch), codec, buffers,
                str([(b.dtype, b.numel) for b in self.grads.plan]), *unused,
            )  # fmt: skip
            self._open = mapped.empty((SLOTS,), "float64")
            self._bufsync = BufferSync(cast(Client, mapped), [b for _, b in self._buffers],
                                       timeout=op_timeout)  # fmt: skip
            self._bufsync.client = client
            optimizer.zero_grad = self.zero_grad  # type: ignore[method-assign]
            self._zero_grad_patched = True
            got = self.client.attach_state(self.state.arrays(), step=None if join else start_step)
            if join and got >= 0:
                # the daemon still held this member's state (this training process was
                # restarted): it is in the arrays now; install the plain values too
                self.state.load()
                self._step = got
        except BaseException:
            if grads is not None:
                grads.close()  # its hooks and buckets
            for arr in mapped.arrays:
                client._release(arr)
            if self._zero_grad_patched:
                with contextlib.suppress(AttributeError):
                    del optimizer.zero_grad
                self._zero_grad_patched = False
            with torch.no_grad():
                for p, data, grad in before:
                    p.data = data  # off the shared slots (same values)
                    p.grad = grad
            raise
        audit.info(
            "event=torch_attached member=%s join=%s step=%d state_bytes=%d buckets=%d job=%s",
            client.member_id, join, self._step, self.state.nbytes, len(self.grads.plan),
            self.job[:16],
        )  # fmt: skip

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """The step the group's state is at: the next step to train (-1: a newcomer
        that has not received the state yet)."""
        return self._step

    # ------------------------------------------------------------------ the step
    def begin_step(self, *, timeout: float | None = None) -> StepContext:
        """Open an attempt of the group's next step (see the module docstring).
        Retries through view changes until ``timeout``; raises
        :class:`~phalanx.torch.errors.JobMismatch` if another job is in the view,
        ``DaemonUnavailable`` if the daemon is gone."""
        self._check_broken()
        self._abandon("begin_step called again before commit")
        self._check_trainable()
        t = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + t
        last = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepTimeout(self._step, t, last)
            try:
                # all that is left: the exchange may move the whole state to a
                # newcomer, which can outlast any one op (the opening op itself is
                # still bounded by op_timeout)
                att = self._open_attempt(left, replay=False)
            except _Retry as r:
                last = r.why
                self._note_failure(r.why)
                time.sleep(r.pause)
                continue
            self._attempt = att
            if self.rng_seed is not None:
                s = _seed(self.rng_seed, att.ctx.step, att.ctx.rank)
                torch.manual_seed(s)
                np.random.seed(s)
                random.seed(s)
            self.grads.arm(att.weight)
            return att.ctx

    def _open_attempt(self, timeout: float, *, replay: bool) -> _Attempt:
        c = self.client
        deadline = time.monotonic() + timeout  # the opening op too: begin_step's bound
        try:
            info = c.begin_step(timeout=timeout)
        except DaemonUnavailable:
            raise
        except Evicted as exc:  # the daemon rejoins by itself; the state follows
            raise _Retry(f"evicted: {exc}", 0.05) from exc
        except _RETRYABLE as exc:
            raise _Retry(f"begin_step: {type(exc).__name__}: {exc}", 0.02) from exc
        synced = False
        # load whenever *this* call received the group's state (StepInfo.synced is per
        # call): the daemon has just overwritten the shared arrays, so the plain values
        # (optimizer settings, scheduler, user_state) and, on a GPU, the device copies
        # must follow. Not keyed on the view epoch: after an unanswered vote
        # (CommitUnknown) the daemon re-syncs in a new generation of the same view, and
        # a member may receive the state more than once in one epoch; loading what was
        # just received is always right (a load of an unchanged state changes nothing)
        if info.synced:
            self.state.load()
            synced = True
            self.stats["syncs"] += 1
            self.stats["sync_bytes"] += info.sync_bytes
            audit.info("event=torch_state_received member=%s epoch=%d step=%d bytes=%d",
                       c.member_id, info.epoch, info.step, info.sync_bytes)  # fmt: skip
        if info.step < 0:
            raise _Retry("no member holds the group's state yet", 0.05)
        if replay and info.step != self._step:
            raise _Retry("the group moved on", 0.0)
        self._step = info.step
        me = c.member_id
        if me not in info.members:
            raise _Retry("this member is not in the view yet", 0.05)
        rank = info.members.index(me)
        world = len(info.members)
        if replay:
            assert self._attempt is not None
            old = self._attempt.ctx
            n_i = float(_count(old.shard())) if old.global_batch else 1.0
        else:
            gb = self.global_batch
            n_i = float(_count(shard_slice(gb, rank, world))) if gb else 1.0
        # a replay and a fresh attempt must not meet: the kind is part of the step fact
        mode = "replay" if replay else "fresh"
        self._open[:] = opening_slots(info.epoch, info.members, self.job, info.step, n_i, mode)
        try:
            left = max(0.001, min(self.op_timeout, deadline - time.monotonic()))
            res = c.all_reduce(self._open, "sum", timeout=left)
        except DaemonUnavailable:
            raise
        except Evicted as exc:
            raise _Retry(f"evicted: {exc}", 0.05) from exc
        except (StepAborted, ViewChanged) as exc:
            # opened in a view that has since been replaced (the daemon answered the
            # vote before it installed the new view): opening again meets the others
            raise _Retry(f"opening op: {type(exc).__name__}: {exc}", 0.01, view_moved=True) from exc
        except _RETRYABLE as exc:
            raise _Retry(f"opening op: {type(exc).__name__}: {exc}", 0.0) from exc
        v = judge(self._open, res.epoch, res.contributors, info.step, mode)
        if v.verdict is AttemptVerdict.FOREIGN:
            self.stats["foreign"] += 1
            raise JobMismatch(res.epoch, res.contributors, self.job)
        if v.verdict is AttemptVerdict.RETRY:
            raise _Retry(v.why, 0.0)
        if not replay and self.global_batch is not None and v.weight != self.global_batch:
            raise _Retry(f"shards cover {v.weight:.0f} of {self.global_batch} examples", 0.0)
        if not v.weight > 0:
            raise _Retry("no contributor has examples", 0.0)
        attempt = 1 if info.step != self._last_step else self._tries + 1
        self._last_step, self._tries = info.step, attempt
        ctx = StepContext(info.step, res.epoch, res.contributors, rank, attempt, synced,
                          info.sync_bytes if synced else 0, self.global_batch)  # fmt: skip
        return _Attempt(ctx, res, n_i / v.weight, v.weight)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients over several backward passes (micro-batches) without
        communicating; the buckets go out at :meth:`sync_gradients`."""
        with self.grads.no_sync():
            yield

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place (they stay in shared memory); what the
        optimizer's ``zero_grad`` does under the manager. ``set_to_none`` is ignored."""
        del set_to_none
        self.grads.zero()

    def sync_gradients(self) -> bool:
        """Wait for every gradient bucket, average the buffers, check the attempt.
        True: ``param.grad`` now holds the step's global gradient (clip it here if you
        want; after a ``backward()`` outside :meth:`no_sync` it already did when
        ``backward()`` returned); False: the attempt is dropped (call ``begin_step``
        again). :meth:`commit` calls it if you did not. Once it returned True here, a
        ``partial=True`` manager no longer replays this attempt (see the module
        docstring)."""
        att = self._attempt
        if att is None:
            raise ConfigError("sync_gradients() outside a step: call begin_step() first")
        ok = self._sync_gradients(att)
        if ok:
            att.seen = True
        return ok

    def _sync_gradients(self, att: _Attempt) -> bool:
        if att.synced is not None:
            return att.synced
        if self.partial:
            self._stash_buffers = [b.detach().clone() for _, b in self._buffers]
        why = ""
        try:
            results = self.grads.finish()
            self.stats["grad_bytes"] += self.grads.nbytes
            for r in results:
                if r.epoch != att.open.epoch or r.contributors != att.open.contributors:
                    why = f"a gradient bucket ran among {len(r.contributors)} in epoch {r.epoch}"
                    break
            if not why:
                why = self._reduce_buffers(att)
        except DaemonUnavailable:
            raise
        except (*_RETRYABLE, Evicted) as exc:
            why = f"{type(exc).__name__}: {exc}"
        att.synced = not why
        if why:
            self._note_failure(why)
        return att.synced

    def _reduce_buffers(self, att: _Attempt) -> str:
        if not self._buffers:
            return ""
        if self.buffers_rule == "rank0":
            w, total = (1 if att.ctx.rank == 0 else 0), 1
        else:  # example counts (or 1 each): integral, so the weighted sum is exact
            w, total = round(att.weight * att.total), round(att.total)
        why, means = self._bufsync.reduce(w, total, att.open.epoch, att.open.contributors)
        if not why:  # the live buffers: reverted from the state if the step is dropped
            BufferSync.apply([b for _, b in self._buffers], means)
        return why

    def commit(self, apply: Callable[[], None] | None = None) -> bool:
        """Finish the attempt: gradients (:meth:`sync_gradients`), the group's vote,
        then — only if every member's answer is yes — ``optimizer.step()``,
        ``scheduler.step()``, ``apply()`` (change ``user_state`` here), and the new
        state is declared (``update_state(step + 1)``). False: nothing was applied;
        call ``begin_step`` again (the same step is redone)."""
        self._check_broken()
        att = self._attempt
        if att is None:
            raise ConfigError("commit() outside a step: call begin_step() first")
        try:
            self._check_trainable()
        except ConfigError as exc:
            self._abandon(str(exc))
            raise
        touched = self.grads.touched()  # before finish() puts replaced .grads back
        ok = self._sync_gradients(att) and self._vote(att)
        if not ok and self.partial and self._can_replay():
            refused = (
                "sync_gradients() returned the synced gradients to the loop" if att.seen
                else "the gradients changed after they were synced" if touched else ""
            )  # fmt: skip
            if refused:
                # a replay reduces the raw local gradients again: whatever the loop did
                # to the synced ones (clipping) would be lost for this step
                self.stats["partial_refused"] += 1
                audit.info("event=partial_refused member=%s step=%d why=%r",
                           self.client.member_id, att.ctx.step, refused)  # fmt: skip
            else:
                ok = self._replay()
                att = self._attempt
                assert att is not None
        if not ok:
            self._abandon("")
            return False
        # the group committed the step: from here a failure cannot be undone (the
        # weights may have moved), and redoing the step would apply it twice
        try:
            with torch.no_grad():
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if apply is not None:
                apply()
            self.state.capture()
            self.client.update_state(att.ctx.step + 1)
        except BaseException as exc:
            self._broken = exc
            self._attempt = None
            log.error("event=torch_apply_failed member=%s step=%d error=%r",
                      self.client.member_id, att.ctx.step, exc)  # fmt: skip
            raise
        self._step = att.ctx.step + 1
        self._attempt = None
        self._stash_buffers = None
        self.grads.forget_local()
        self.stats["commits"] += 1
        return True

    def _check_trainable(self) -> None:
        """The parameters that train are the ones the bucket plan covers, and no other
        parameter carries a ``.grad`` (it would be applied unaveraged: the members'
        weights would silently diverge)."""
        planned = {id(p) for p in self.grads.params}
        now = [n for n, p in self._named if p.requires_grad and id(p) not in planned]
        frozen = [n for n, p in self._named if not p.requires_grad and id(p) in planned]
        stray = [n for n, p in self._named if id(p) not in planned and p.grad is not None]
        what = []
        if now:
            what.append(f"now require grad but did not when the Manager was built: {now}")
        if frozen:
            what.append(f"no longer require grad: {frozen}")
        if stray:
            what.append(f"have a .grad but are outside the gradient plan: {stray}")
        if what:
            raise ConfigError(
                "the parameters that train changed after the Manager was built (its "
                "gradient buckets cover the ones that required grad then); parameters "
                + "; ".join(what)
                + ". Nothing was applied. Build a new Manager (close this one) after "
                "changing which parameters train, at the same step on every member, and "
                "leave .grad None on frozen parameters"
            )

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise ConfigError(
                f"step {self._step} was committed by the group but applying it here failed "
                f"({type(self._broken).__name__}: {self._broken}); this member's state is no "
                "longer the group's: close this Manager and restart this member (its daemon "
                "and training process), which then joins again and receives the group's state"
            ) from self._broken

    def _vote(self, att: _Attempt) -> bool:
        try:
            ok = self.client.commit(att.ctx.step, True, timeout=self.op_timeout)
        except DaemonUnavailable:
            raise
        except (*_RETRYABLE, CommitUnknown, Evicted) as exc:
            # not applied here; should the others have applied it, this member's state
            # now differs from theirs: CommitUnknown makes the daemon rebuild the group
            # (same view, next generation), eviction brings a new view, and either
            # exchange hands it the group's state (verified), which the next begin_step
            # loads (StepInfo.synced)
            self._note_failure(f"commit: {type(exc).__name__}")
            return False
        if not ok:
            self._note_failure("not committed")
        return ok

    # ------------------------------------------------------------------ partial steps
    def _can_replay(self) -> bool:
        att = self._attempt
        return (
            att is not None and self._stash_buffers is not None and att.ctx.global_batch is not None
        )

    def _replay(self) -> bool:
        """Replay this member's gradients of the failed attempt in the next view,
        weighted over the survivors' examples (opt-in ``partial``)."""
        att = self._attempt
        assert att is not None and self._stash_buffers is not None
        sbuf = self._stash_buffers
        self.grads.drain()
        old_members = set(att.ctx.members)
        deadline = time.monotonic() + self.op_timeout
        while True:
            try:
                new = self._open_attempt(max(0.001, deadline - time.monotonic()), replay=True)
                break
            except _Retry as r:
                # only a view that moved under the opening is worth another try; any
                # other refusal (the group moved on, members disagree) is final, and
                # the step is redone
                if not r.view_moved or time.monotonic() >= deadline:
                    return False
                time.sleep(r.pause)
            except JobMismatch:
                return False
        if not set(new.ctx.members) < old_members:
            return False  # a newcomer, or nobody left: redo the step instead
        new.synced = None
        self._attempt = new
        # the survivors' own gradients of the failed attempt, re-weighed over the
        # survivors' examples
        self.grads.arm(new.weight, replay=True)
        if not self.grads.restore_local():
            return False
        with torch.no_grad():
            for (_, b), v in zip(self._buffers, sbuf, strict=True):
                b.copy_(v)
        self._stash_buffers = None
        ok = self._sync_gradients(new) and self._vote(new)
        if ok:
            self.stats["partial_commits"] += 1
            log.warning(
                "event=partial_commit step=%d epoch=%d contributors=%d of %d examples=%.0f of %s",
                new.ctx.step, new.ctx.epoch, new.ctx.world, len(old_members), new.total,
                att.ctx.global_batch,
            )  # fmt: skip
        return ok

    # ------------------------------------------------------------------ housekeeping
    def _note_failure(self, why: str) -> None:
        self.stats["attempts_failed"] += 1
        self.stats["last_failure"] = why
        log.info("event=attempt_failed member=%s step=%d why=%r",
                 self.client.member_id, self._step, why)  # fmt: skip

    def _abandon(self, why: str) -> None:
        if self._attempt is None:
            return
        if why:
            self._note_failure(why)
        self.grads.drain()
        self.state.revert()  # BatchNorm statistics of the dropped forward pass
        self._attempt = None

    def close(self) -> None:
        """Remove the hooks, give the optimizer its own ``zero_grad`` back, and unmap
        every region this manager mapped (buckets, buffer ops, the opening slots, the
        state's arrays: the daemon keeps serving the state it holds, and the tensors
        viewing them stay valid in this process). The client stays open: it is the
        caller's. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._abandon("")
        self.grads.close()
        self._bufsync.close()
        self.client._release(self._open)
        for arr in self.state.arrays().values():
            if isinstance(arr, torch.Tensor):
                release_shared(self.client, arr)
            else:
                self.client._release(arr)
        if self._zero_grad_patched:
            with contextlib.suppress(AttributeError):
                del self.optimizer.zero_grad
            self._zero_grad_patched = False

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count(sl: slice) -> int:
    return int(sl.stop) - int(sl.start)


class _Mapped:
    """The client as the constructor's parts see it while they are built: every array
    ``empty`` maps is noted, so that a constructor failing part-way unmaps them; the
    rest is the client's own."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.arrays: list[np.ndarray] = []

    def empty(self, shape: int | tuple[int, ...], dtype: Any = "float32") -> np.ndarray:
        arr = self.client.empty(shape, dtype)
        self.arrays.append(arr)
        return arr

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class _Retry(Exception):
    def __init__(self, why: str, pause: float, *, view_moved: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.pause = pause
        self.view_moved = view_moved  # the attempt opened in a view since replaced


def _param_binder(p: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
    def bind(view: torch.Tensor) -> None:
        p.data = view

    return bind


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers that are part of the model's state_dict, in state_dict order."""
    keys = set(model.state_dict(keep_vars=True))
    return [(n, b) for n, b in model.named_buffers() if n in keys and b is not None]

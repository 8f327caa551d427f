"""Elastic DDP's gradient path: buckets in shared memory, all-reduced during backward.

:class:`GradSync` owns one flat buffer per bucket (:mod:`~phalanx.torch.buckets`) in
memory the daemon shares (``client.empty``), and points every parameter's ``.grad`` at
its slice: autograd accumulates straight into the shared pages, and the all-reduce runs
on them with **zero copies**. A ``post_accumulate_grad`` hook per parameter counts the
bucket's ready gradients; when a bucket is complete (and every bucket before it was
launched: buckets go out in plan order, identical on every member) it is scaled by this
member's weight and submitted as an **async** ``all_reduce(sum)``, so communication
overlaps with the rest of the backward pass. **One bucket is in flight at a time** (the
next goes out when the previous finished): after a failure no later bucket waits in
the daemon's queue, where it would run in the next view against another member's first
op of its next attempt (seen with a member frozen mid-step).

**backward() returns with the global gradient** (what DDP does): the first hook of a
backward that launches buckets (not inside :meth:`no_sync`) queues an end-of-backward
autograd callback, which launches whatever is left (unused parameters contribute zeros)
and waits for every bucket (each bounded by its op's own timeout, one in flight at a
time). So code between ``backward()`` and the commit (``clip_grad_norm_``) sees the
same, global gradient on every member, and never writes into a bucket the daemon is
still reducing. :meth:`GradSync.finish` then finds the work done and hands over its
results (or does it itself: a backward inside :meth:`no_sync`, a replay).

Errors never cross autograd: the hook only submits, and the end-of-backward callback
records what it meets (it never raises into autograd); the first error is raised by
:meth:`finish`, outside ``backward()``, as the typed phalanx error it is.
If something set a ``.grad`` to a tensor of its own (``optimizer.zero_grad()`` with
``set_to_none=True``, ``model.zero_grad()``), the hook copies it into the slot and
points ``.grad`` back at it (one copy, correct either way).

:meth:`touched` tells whether the gradients changed after the buckets were settled (the
user clipped or replaced them): the manager then never replays kept local gradients.

**Unused parameters** (opt-in ``find_unused_parameters``, DDP's meaning): every
``.grad`` is a view into a bucket, so a parameter the forward pass never used ends the
step with a zero gradient, and weight decay or momentum would still move it. With the
option on, each attempt's sync also agrees which parameters were used *anywhere*: a
local flag per parameter (its hook fired in this attempt: the union over the
micro-batches of :meth:`no_sync`) is summed by one more all-reduce (float32, codec
``none``, never scaled), issued after the last bucket was waited for, bounded by the
same op timeout, its errors recorded like a bucket's. A parameter whose global count is
zero gets ``.grad = None`` (``optimizer.step()`` then skips it, as under plain torch);
one used by any member keeps the averaged gradient (zeros from the others). The next
:meth:`arm` / :meth:`zero` points those ``.grad`` back at their views, and
:meth:`touched` does not count that deliberate ``None``. With ``keep_local`` the flags
are kept with the local gradients, so a replay reduces the usage of the attempt it
replays. Every member must use the same setting (the op sequences differ otherwise).

This module must never vote, never decide whether a step counts, and never leave an
op it submitted unwaited: the end-of-backward callback, :meth:`finish` and
:meth:`drain` settle every handle.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from phalanx.client import Client, Handle, OpResult
from phalanx.errors import ConfigError, DaemonUnavailable
from phalanx.torch.buckets import Bucket, plan_buckets
from phalanx.torch.state import release_shared, shared_tensor

__all__ = ["GradSync"]

log = logging.getLogger(__name__)


class _Slot:
    __slots__ = ("bucket", "device_bucket", "flat", "host", "ready", "views")

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.ready = 0
        self.views: list[torch.Tensor] = []
        self.flat: torch.Tensor  # where .grad views live (host shared, or device)
        self.host: torch.Tensor  # what the daemon reduces (shared memory)
        self.device_bucket: Any = None


class GradSync:
    """See the module docstring. ``params``: the trainable parameters in registration
    order; ``cap_bytes``: bucket size; ``codec``: the all-reduce codec;
    ``find_unused_parameters``: ``.grad = None`` on parameters no member used (one
    more small op per attempt; the same on every member)."""

    def __init__(
        self,
        client: Client,
        params: Sequence[torch.nn.Parameter],
        *,
        cap_bytes: int = 25 << 20,
        codec: str = "none",
        timeout: float = 60.0,
        keep_local: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        self.client = client
        self.keep_local = keep_local
        self.find_unused = find_unused_parameters
        self.codec = codec
        self.timeout = timeout
        self.params = [p for p in params if p.requires_grad]
        specs = [(i, str(p.dtype).removeprefix("torch."), p.numel())
                 for i, p in enumerate(self.params)]  # fmt: skip
        self.plan = plan_buckets(specs, cap_bytes)
        self._slots: list[_Slot] = []
        self._where: dict[int, tuple[_Slot, torch.Tensor]] = {}  # id(param) -> slot, view
        self._hooks: list[Any] = []
        # find_unused_parameters: the members' "used in this attempt" flags, summed
        self._usage: torch.Tensor | None = None
        old_grads = [p.grad for p in self.params]
        try:
            if self.find_unused and self.params:
                self._usage = shared_tensor(client, len(self.params), torch.float32)
            for b in self.plan:
                s = _Slot(b)
                dtype = self.params[b.params[0]].dtype
                device = self.params[b.params[0]].device
                s.host = shared_tensor(client, b.numel, dtype)
                self._slots.append(s)
                if device.type != "cpu":
                    from phalanx.torch.cuda import DeviceBucket

                    s.device_bucket = DeviceBucket(device, b.numel, dtype, s.host)
                    s.flat = s.device_bucket.flat
                else:
                    s.flat = s.host
                for i, off in zip(b.params, b.offsets, strict=True):
                    p = self.params[i]
                    view = s.flat[off : off + p.numel()].view_as(p)
                    s.views.append(view)
                    self._where[id(p)] = (s, view)
                    p.grad = view
            for p in self.params:
                self._hooks.append(
                    p.register_post_accumulate_grad_hook(self._hook)  # type: ignore[no-untyped-call]
                )
        except BaseException:
            # (client.empty over the daemon's limit, ...): nothing of this stays behind
            for h in self._hooks:
                h.remove()
            for p, g in zip(self.params, old_grads, strict=True):
                p.grad = g
            for s in self._slots:
                release_shared(client, s.host)
            if self._usage is not None:
                release_shared(client, self._usage)
            raise
        self._lock = threading.Lock()
        self._armed = False
        self._sync = True
        self._weight = 1.0
        self._next = 0  # next bucket to launch
        self._handles: list[tuple[_Slot, Handle]] = []
        self._errors: list[BaseException] = []
        self._failed = False
        self._counted: set[int] = set()  # id(param): its hook fired in this attempt
        # id(param): .grad set to None on purpose (no member used it: find_unused)
        self._unused: set[int] = set()
        # keep_local: each bucket's own (unweighted, unreduced) gradient, copied just
        # before it goes out: what a partial step replays in the next view
        self._local: list[torch.Tensor | None] = [None] * len(self._slots)
        self._attempt_no = 0  # arm() without replay counts attempts
        self._kept_at = [-1] * len(self._slots)  # the attempt each kept copy is of
        # keep_local + find_unused: the parameters used in the kept attempt, and which
        self._kept_used: frozenset[int] | None = None
        self._kept_used_at = -1
        self.nbytes_sent = 0  # bytes handed to the daemon (for the wire-bytes figures)
        # the end-of-backward settle (see the module docstring)
        self._arm_no = 0  # every arm(): a queued callback of an older attempt does nothing
        self._queued = False  # an end-of-backward callback is queued for this backward
        self._settled = False  # every bucket of this attempt was launched and waited for
        self._results: list[OpResult] = []
        self._versions: list[int] | None = None  # the buckets' versions once settled

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.plan)

    # ------------------------------------------------------------------ one attempt
    def arm(self, weight: float, *, replay: bool = False) -> None:
        """Start an attempt: zero every bucket, reset the counters; this member's
        gradients will be multiplied by ``weight`` before the sum. ``replay``: the
        same step again from the kept local gradients (:meth:`restore_local`), not a
        new backward."""
        self.drain()
        if not replay:
            self._attempt_no += 1  # copies kept by earlier attempts are stale from now
        with self._lock:
            for s in self._slots:
                s.ready = 0
                with torch.no_grad():
                    s.flat.zero_()
            for p in self.params:
                _, view = self._where[id(p)]
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view
            self._counted.clear()
            self._unused.clear()
            self._failed = False
            self._weight = float(weight)
            self._next = 0
            self._errors = []
            self._arm_no += 1
            self._queued = False
            self._settled = False
            self._results = []
            self._versions = None
            self._armed = True

    def zero(self) -> None:
        """Zero every gradient in place (``optimizer.zero_grad`` for the manager)."""
        with torch.no_grad():
            for s in self._slots:
                s.flat.zero_()
        for p in self.params:
            _, view = self._where[id(p)]
            p.grad = view
        self._unused.clear()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without launching buckets (micro-batches); the buckets
        go out at :meth:`finish`."""
        old = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = old

    def _hook(self, p: torch.Tensor) -> None:
        where = self._where.get(id(p))
        if where is None:
            return
        s, view = where
        g = p.grad
        if g is not None and g.data_ptr() != view.data_ptr():
            with torch.no_grad():
                view.copy_(g)  # someone replaced .grad: back into the shared slot
            p.grad = view
        if not self._armed:
            return
        with self._lock:
            if s.bucket.index < self._next:
                # a bucket already sent was summed and scaled in place: this backward's
                # gradient lands on top of the sum, different on every member (they
                # would commit diverging weights). A second backward outside no_sync(),
                # or any backward after the end-of-backward settle sent every bucket
                if not self._errors:
                    self._errors.append(
                        ConfigError(
                            "backward() ran again in this step after its gradients were "
                            "sent: accumulate micro-batches inside Manager.no_sync() (all "
                            "but the last backward), or call backward() once per step"
                        )
                    )
                return
            if id(p) in self._counted:
                # a later backward of accumulated micro-batches: counted once per
                # attempt, and its bucket waits (it may still be taking this backward's
                # part); the last one, outside no_sync(), settles at its end
                if self._sync:
                    self._queue_end()
                return
            self._counted.add(id(p))
            s.ready += 1
            if self._sync:
                self._queue_end()
                self._launch_ready()

    def _queue_end(self) -> None:
        """Queue the end-of-backward settle once per backward (lock held)."""
        if self._queued or self._settled:
            return
        # not inside a backward pass (a hook called by hand): finish() settles
        self._queued = self._queue_settle(self._arm_no)

    def _queue_settle(self, token: int) -> bool:
        """Queue :meth:`_end_of_backward` on the running backward; False outside one."""
        try:
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: self._end_of_backward(token))
        except RuntimeError:
            return False
        return True

    def _requeue(self, token: int) -> None:
        """(A post hook of the node that ran a nested backward, in the outer one.)
        Queue the settle again, now on the outer backward."""
        if not self._queue_settle(token):
            with self._lock:
                self._queued = False  # finish() settles

    def _end_of_backward(self, token: int) -> None:
        """Autograd's final callback: launch what is left and wait for every bucket, so
        ``.grad`` holds the global gradient when ``backward()`` returns. Never raises
        into autograd: what it meets is recorded and raised by :meth:`finish`."""
        try:
            with self._lock:
                if token != self._arm_no:
                    return  # an older attempt's (drained and re-armed since)
                if not self._armed or self._settled:
                    self._queued = False
                    return
                outer = torch._C._current_autograd_node()
                if outer is not None:
                    # the end of a backward nested in another (reentrant activation
                    # checkpointing runs one per segment): the outer backward has more
                    # gradients to accumulate. Settle at *its* end: a post hook of the
                    # node running this one queues the callback there
                    outer.register_hook(lambda *_: self._requeue(token))
                    return
                self._queued = False
                self._fix_grads()
                self._settle()
        except BaseException as exc:  # recorded, raised by finish()
            self._errors.append(exc)

    def touched(self) -> bool:
        """Whether the gradients changed since this attempt's buckets were settled (an
        in-place change bumps a bucket's version: ``clip_grad_norm_``), or a ``.grad``
        was replaced or removed (not one set to ``None`` here because no member used
        it). False if they were not settled yet."""
        versions = self._versions
        if versions is None:
            return False
        if any(s.flat._version != v for s, v in zip(self._slots, versions, strict=True)):
            return True
        for p in self.params:
            _, view = self._where[id(p)]
            if p.grad is None and id(p) in self._unused:
                continue
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                return True
        return False

    def _in_flight(self) -> bool:
        """Whether the last submitted bucket is still running (a non-blocking poll);
        a failed one stops further launches."""
        if not self._handles:
            return False
        _, h = self._handles[-1]
        if not h.done():
            return True
        try:
            h.wait(0.0)
        except BaseException:
            self._failed = True
        return False

    def _launch_ready(self) -> None:
        while self._next < len(self._slots) and not self._failed:
            s = self._slots[self._next]
            if s.ready < len(s.bucket.params) or self._in_flight():
                return
            self._launch(s)

    def _launch(self, s: _Slot) -> None:
        self._next += 1
        if self._failed:
            return
        try:
            if self.keep_local:
                i = s.bucket.index
                kept = self._local[i]
                if kept is None:
                    kept = self._local[i] = torch.empty_like(s.flat)
                with torch.no_grad():
                    kept.copy_(s.flat)
                self._kept_at[i] = self._attempt_no
                if self.find_unused and i == len(self._slots) - 1:
                    # the last bucket goes out: no hook counts anything more in this
                    # attempt (a later one is the "backward() ran again" error)
                    self._kept_used = frozenset(self._counted)
                    self._kept_used_at = self._attempt_no
            if self._weight != 1.0:
                with torch.no_grad():
                    s.flat.mul_(self._weight)
            host = s.device_bucket.stage_out() if s.device_bucket is not None else s.host
            h = self.client.all_reduce(host, "sum", self.codec, async_op=True,
                                       timeout=self.timeout)  # fmt: skip
            self._handles.append((s, h))
            self.nbytes_sent += s.bucket.nbytes
        except BaseException as exc:  # raised by finish(), outside autograd
            self._errors.append(exc)

    def restore_local(self) -> bool:
        """Put the kept local gradients of the last attempt back into the buckets
        (after :meth:`arm` with ``replay``); False if some bucket kept none in that
        attempt -- one that failed before sending every bucket left older copies in
        the rest, and a mix of two attempts' gradients must never be committed. With
        ``find_unused_parameters`` the parameters that attempt used count as this
        one's (the usage op then sums the replayed attempt's flags)."""
        if any(k is None for k in self._local) or any(t != self._attempt_no for t in self._kept_at):
            return False
        if self.find_unused and (self._kept_used is None or self._kept_used_at != self._attempt_no):
            return False
        with torch.no_grad():
            for s, k in zip(self._slots, self._local, strict=True):
                assert k is not None
                s.flat.copy_(k)
        if self._kept_used is not None:
            with self._lock:
                self._counted = set(self._kept_used)
        return True

    def forget_local(self) -> None:
        self._local = [None] * len(self._slots)
        self._kept_at = [-1] * len(self._slots)
        self._kept_used = None
        self._kept_used_at = -1

    def _fix_grads(self) -> None:
        """Every ``.grad`` back in its slot (lock held): one set to a tensor of its own
        is copied in; one unused in this backward contributes zeros; one that no member
        used (``find_unused_parameters``, once settled) stays ``None``."""
        for p in self.params:
            _, view = self._where[id(p)]
            if p.grad is None:
                if id(p) not in self._unused:
                    p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                with torch.no_grad():
                    view.copy_(p.grad)
                p.grad = view
                self._unused.discard(id(p))

    def _settle(self) -> None:
        """Launch what is left, wait for every bucket (lock held). One bucket in flight
        at a time: when an op fails, no later bucket is queued in the daemon, where it
        would run in the next view and meet another member's first op of its next
        attempt. Errors go to ``_errors`` (every handle is settled first)."""
        results: list[OpResult] = []
        waited = 0
        while not self._errors:
            if waited < len(self._handles):
                slot, h = self._handles[waited]
                waited += 1
                try:
                    results.append(h.wait())
                    if slot.device_bucket is not None:
                        slot.device_bucket.stage_in()
                except BaseException as exc:
                    self._errors.append(exc)
                continue
            if self._next >= len(self._slots):
                break
            self._launch(self._slots[self._next])
        for _, h in self._handles[waited:]:  # after a failure: settle them all
            try:
                h.wait()
            except BaseException as exc:
                self._errors.append(exc)
        self._handles = []
        if self._usage is not None and not self._errors:
            self._sync_usage(self._usage, results)
        self._results = results
        self._settled = True
        self._versions = [s.flat._version for s in self._slots]

    def _sync_usage(self, usage: torch.Tensor, results: list[OpResult]) -> None:
        """``find_unused_parameters``: sum the members' "used in this attempt" flags
        (after the last bucket: one op in flight at a time), then ``.grad = None`` on
        the parameters no member used (lock held). Its result joins ``results`` (the
        manager checks it ran among the step's contributors, like a bucket); an error
        goes to ``_errors``, and no ``.grad`` changes then."""
        flags = [1.0 if id(p) in self._counted else 0.0 for p in self.params]
        try:
            with torch.no_grad():
                usage.copy_(torch.tensor(flags, dtype=torch.float32))
            h = self.client.all_reduce(usage, "sum", "none", async_op=True,
                                       timeout=self.timeout)  # fmt: skip
            self.nbytes_sent += usage.numel() * usage.element_size()
            results.append(h.wait())
        except BaseException as exc:  # raised by finish(), outside autograd
            self._errors.append(exc)
            return
        for p, n in zip(self.params, usage.tolist(), strict=True):
            if n == 0.0:
                p.grad = None
                self._unused.add(id(p))

    def finish(self) -> list[OpResult]:
        """The results in bucket order (then the usage op's, with
        ``find_unused_parameters``), once every bucket was launched and waited for
        (here, unless the end-of-backward callback did it). Raises the first failure
        (``DaemonUnavailable`` before any other)."""
        with self._lock:
            if not self._armed:
                raise RuntimeError("GradSync.finish() without arm()")
            self._fix_grads()
            if not self._settled:
                self._settle()
            results, errors = self._results, list(self._errors)
            self._armed = False
            self._results = []
        if errors:
            fatal = [e for e in errors if isinstance(e, DaemonUnavailable)]
            raise fatal[0] if fatal else errors[0]
        return results

    def drain(self, timeout: float = 30.0) -> None:
        """Settle (and forget) the handles of an abandoned attempt, bounded by each op's
        own deadline or ``timeout`` overall."""
        with self._lock:
            handles, self._handles = self._handles, []
            self._armed = False
            self._settled = False
            self._results = []
        end = time.monotonic() + timeout
        for _, h in handles:
            with contextlib.suppress(Exception):
                h.wait(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        """Remove the hooks and unmap the buckets in the daemon (``.grad`` tensors keep
        this process's memory while they exist)."""
        self.drain()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        slots, self._slots = self._slots, []
        for s in slots:
            release_shared(self.client, s.host)
        usage, self._usage = self._usage, None
        if usage is not None:
            release_shared(self.client, usage)

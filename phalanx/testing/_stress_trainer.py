"""One ``phalanx stress`` training process: a stream of checked steps through its daemon.

The harness starts it (multiprocessing *spawn*) beside a ``phalanx daemon`` and gives
it one pipe of its own (never a queue shared by all trainers: a trainer SIGKILLed while
holding a shared lock would silence every other one). The loop is the client API's
intended use: ``begin_step`` (view install + state sync), the step's collectives
(:func:`phalanx.testing._stress_model.plan`) with ``retry=True``, ``commit(step)``, and
on True ``w += delta(step)`` and ``update_state(step + 1)``; every ``snapshot_every``
steps a snapshot of ``w`` (when the client has ``snapshot``).

``Evicted`` is transient: the daemon rejoins by itself with a new incarnation and the
state re-syncs at the next ``begin_step``; the trainer waits (``evicted`` / ``back``
events) and gives up only when its daemon stays out for ``call_timeout`` seconds
(``rejoin_timeout``, with how long it waited: the harness counts it as a hang).

It reports facts, not verdicts: every op's epoch, seq, contributors and result digest,
every commit answer, every clean failure with its type, and the state check after each
``begin_step``. The harness recomputes what each result must be. Events are tuples
``(kind, member, monotonic_time, payload_dict)``.

Commands from the harness: ``"stop"`` (finish the step, close, exit) and
``("stop", S)`` (stop at the boundary of step S: the whole group stops together, so
nobody waits for a member that already left). A replacement
for a lost peer first restores that peer's newest sealed snapshot (``restore_peer``),
a restarted trainer its own (``restore``), and reports what it got.

This module must never wait without a deadline nor exit without telling the harness.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from phalanx.testing import _stress_model as model
from phalanx.testing.launcher import die_with_parent

__all__ = ["TrainerArgs", "trainer_main"]


@dataclass(frozen=True)
class TrainerArgs:
    """What one trainer needs (picklable)."""

    member: str
    socket: str
    seed: int
    founding: bool  # attach w at step 0 (else receive the group's state)
    call_timeout: float  # deadline of every client call
    snapshot_every: int = 5
    restore_peer: str | None = None  # replacement: restore this lost peer's snapshot
    restore_own: bool = False  # restarted trainer: restore this member's own snapshot
    step_pause_s: float = 0.0


class _Out:
    def __init__(self, conn: Any, member: str) -> None:
        self.conn = conn
        self.member = member

    def put(self, kind: str, **payload: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send((kind, self.member, time.monotonic(), payload))


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _stop_at(conn: Any, current: float) -> float:
    """The step at which to stop: ``("stop", S)`` from the harness means "at the
    boundary of step S" (every member stops at the same one), ``"stop"`` means now."""
    try:
        while conn.poll(0):
            cmd = conn.recv()
            if cmd == "stop":
                return -1
            if isinstance(cmd, tuple) and cmd[0] == "stop":
                current = min(current, float(cmd[1]))
    except (EOFError, OSError):
        return -1  # the harness is gone
    return current


def _run_op(pg: Any, spec: model.OpSpec, x: np.ndarray | None, timeout: float) -> Any:
    kw: dict[str, Any] = {"retry": True, "timeout": timeout}
    if spec.kind == "barrier":
        return pg.barrier(**kw)
    if spec.kind == "all_reduce":
        return pg.all_reduce(x, spec.reduce, spec.codec, **kw)
    if spec.kind == "reduce_scatter":
        return pg.reduce_scatter(x, spec.reduce, spec.codec, **kw)
    if spec.kind == "all_gather":
        return pg.all_gather(x, spec.codec, **kw)
    return pg.broadcast(x, spec.root, spec.codec, **kw)


def _restore_checks(pg: Any, a: TrainerArgs, out: _Out) -> None:
    if not hasattr(pg, "snapshot"):
        return
    for what, fn in (
        ("peer", (lambda: pg.restore_peer(a.restore_peer)) if a.restore_peer else None),
        ("own", pg.restore if a.restore_own else None),
    ):
        if fn is None:
            continue
        t0 = time.monotonic()
        owner = a.restore_peer if what == "peer" else a.member
        before = _members(pg)
        try:
            step, state = fn()
            w = np.asarray(state["w"])
            exact = bool(np.array_equal(w, model.expected_state(int(step))))
            out.put("restored", what=what, owner=owner, step=int(step), exact=exact,
                    view=sorted(set(before) & set(_members(pg))),
                    secs=time.monotonic() - t0)  # fmt: skip
        except Exception as exc:
            # the views before and after: restores read holders through the view, so a
            # holder missing from either could not be read (the checker's accounting)
            out.put("restore_failed", what=what, owner=owner, error=_err(exc),
                    view=sorted(set(before) & set(_members(pg))),
                    secs=time.monotonic() - t0)  # fmt: skip


def _members(pg: Any) -> tuple[str, ...]:
    try:
        return tuple(pg.view().members)
    except Exception:
        return ()


def trainer_main(a: TrainerArgs, conn: Any) -> None:
    """Entry point of a trainer process (see the module docstring)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = _Out(conn, a.member)
    import phalanx
    from phalanx.errors import DaemonUnavailable, PhalanxError
    from phalanx.membership.errors import CommitUnknown, Evicted

    pg: Any = None
    why = "stopped"
    try:
        pg = phalanx.connect(a.socket, timeout=a.call_timeout, op_timeout=a.call_timeout)
        w = pg.empty((model.STATE_LEN,), "float64")
        at = pg.attach_state({"w": w}, step=0 if a.founding else None)
        out.put("ready", pid=os.getpid(), daemon_pid=pg.daemon_pid, step=at)
        _restore_checks(pg, a, out)
        T = a.call_timeout
        shared: dict[tuple[str, int], np.ndarray] = {}
        stop_at = float("inf")
        evicted_since: float | None = None
        while True:
            stop_at = _stop_at(conn, stop_at)
            if stop_at < 0:
                break
            t0 = time.monotonic()
            try:
                info = pg.begin_step(timeout=T)
            except Evicted as exc:
                evicted_since = _evicted(out, evicted_since, exc, T)
                continue
            except DaemonUnavailable:
                raise
            except (PhalanxError, TimeoutError) as exc:
                out.put("fail", call="begin_step", error=_err(exc), secs=time.monotonic() - t0)
                time.sleep(0.05)
                continue
            if evicted_since is not None:
                out.put("back", secs=time.monotonic() - evicted_since)
                evicted_since = None
            step = info.step
            if step >= stop_at:
                break
            state_ok = bool(np.array_equal(w, model.expected_state(step)))
            out.put("begin", step=step, epoch=info.epoch, secs=time.monotonic() - t0,
                    synced=info.synced, state_ok=state_ok,
                    members=tuple(info.members))  # fmt: skip
            ok, vote, epochs = True, True, []
            for i, spec in enumerate(model.plan(a.seed, step)):
                x = None
                if spec.kind != "barrier":
                    src = model.contribution(spec, model.index_of(a.member), step)
                    if (step + i) % 2:  # every other op zero-copy, on shared memory
                        key = (spec.dtype, spec.n)
                        if key not in shared:
                            shared[key] = pg.empty((spec.n,), spec.dtype)
                        x = shared[key]
                        x[:] = src
                    else:  # the others copied in and out by the client
                        x = src
                t1 = time.monotonic()
                try:
                    r = _run_op(pg, spec, x, T)
                except DaemonUnavailable:
                    raise
                except (PhalanxError, TimeoutError) as exc:  # Evicted too: no vote
                    out.put("fail", call=spec.kind, step=step, op=i, error=_err(exc),
                            secs=time.monotonic() - t1)  # fmt: skip
                    ok = False
                    vote = type(exc).__name__ not in ("StepAborted", "Evicted")
                    break
                err = None
                if spec.lossy and x is not None:
                    exact = model.expected(spec, step, r.contributors, a.member)
                    err = float(np.max(np.abs(x.astype(np.float64) - exact))) if x.size else 0.0
                epochs.append(r.epoch)
                out.put("op", step=step, op=i, epoch=r.epoch, seq=r.seq,
                        contributors=r.contributors, failed=r.failed_attempts,
                        digest=model.digest(x) if x is not None else "", err=err,
                        secs=time.monotonic() - t1)  # fmt: skip
            if not vote:
                continue  # StepAborted: the step never ran in this view; no vote
            t2 = time.monotonic()
            answer: bool | None
            try:
                answer = pg.commit(step, ok, timeout=T)
            except DaemonUnavailable:
                raise
            except Evicted as exc:  # the daemon rejoins by itself; the state re-syncs
                evicted_since = _evicted(out, evicted_since, exc, T)
                continue
            except CommitUnknown:
                answer = None
            except (PhalanxError, TimeoutError) as exc:
                out.put("fail", call="commit", step=step, error=_err(exc),
                        secs=time.monotonic() - t2)  # fmt: skip
                continue
            out.put("commit", step=step, ok=ok, answer=answer, epochs=epochs,
                    epoch=info.epoch, secs=time.monotonic() - t2)  # fmt: skip
            if answer:
                w += model.state_delta(step)
                pg.update_state(step + 1)
                if (
                    hasattr(pg, "snapshot")
                    and a.snapshot_every
                    and (step + 1) % a.snapshot_every == 0
                ):
                    _snapshot(pg, w, step + 1, T, out, len(info.members))
            if a.step_pause_s:
                time.sleep(a.step_pause_s)
    except (Evicted, DaemonUnavailable) as exc:
        why = _err(exc)
    except Exception as exc:
        why = f"crashed: {_err(exc)}"
    finally:
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.close()
        out.put("done", why=why)
        with contextlib.suppress(OSError):
            conn.close()


def _evicted(out: _Out, since: float | None, exc: BaseException, limit: float) -> float:
    """An ``Evicted`` answer: the daemon rejoins by itself (new incarnation), so wait
    and begin the step again; give up (raise) when it stays out for ``limit`` s."""
    now = time.monotonic()
    if since is None:
        out.put("evicted", error=_err(exc))
        since = now
    elif now - since > limit:
        out.put("rejoin_timeout", secs=now - since, error=_err(exc))
        raise exc
    time.sleep(0.1)
    return since


def _snapshot(pg: Any, w: np.ndarray, step: int, timeout: float, out: _Out, world: int) -> None:
    t0 = time.monotonic()
    try:
        handle = pg.snapshot({"w": w}, step)
        info = handle.wait(timeout)
    except Exception as exc:
        out.put("snapshot_failed", step=step, error=_err(exc), secs=time.monotonic() - t0)
        return
    out.put("sealed", step=step, world=world, secs=time.monotonic() - t0,
            generation=info.generation, k=info.k, m=info.m,
            holders=tuple(info.holders))  # fmt: skip

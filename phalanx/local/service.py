"""The daemon side of the local API: requests in, calls on the hosted group, results out.

:class:`Service` turns decoded requests (:mod:`phalanx.local.wire`) of one client
:class:`Session` into calls on the daemon's :class:`~phalanx.membership.hosted.HostedGroup`
on arrays that live in the client's shared memory (zero copies: the data plane reads
and writes the very pages the training process sees). It knows no sockets (that is
``server.py``) and returns plain JSON-able dicts or raises typed errors (encoded by
:mod:`phalanx.local.errcodec`).

One lock serializes every call that drives the group (collectives, step, commit,
state), so two connections can never interleave a collective; calls that only read
(HELLO, VIEW) or map memory do not take it.

A client that disconnects without ``close()`` (it died) keeps the daemon's state: the
view, the group, the state arrays (their pages stay mapped here). Where it died decides
the rest:

* at a step boundary (no collective since its last ``update_state``/failed commit): the
  view stays; the restarted process attaches its state (the daemon copies it back) and
  its next collective lines up with the others';
* inside a step (a collective ran, no decision yet): nobody can finish that step, so the
  daemon leaves and rejoins the group: the other members' collectives and votes of
  that step fail over to the new view (promise 4); the state is intact;
* between a True commit and ``update_state`` (the state was being changed in place):
  as above, and the daemon's state is marked invalid, so the group's state is received
  (verified by hash) at the next ``begin_step``.

Snapshots (``SNAPSHOT``, ``SNAPSHOT_WAIT``, ``RESTORE``) go to the daemon's
:class:`~phalanx.checkpoint.SnapshotService` and never take the group lock (a snapshot
does not wait for a collective). ``SNAPSHOT`` names arrays in the client's regions;
the service's ``snapshot()`` copies them once into its own memory (the one copy) and
the reply goes out after that copy. ``SNAPSHOT_WAIT`` waits (bounded) for a
generation's seal. ``RESTORE`` rebuilds a state (this member's, or a gone peer's) and
returns it in a fresh memfd (:class:`FdReply`): the daemon lays the arrays out at
64-byte offsets, copies them in, and the client maps the memfd; the daemon keeps no
mapping of it.

This module must never hold its lock while waiting for a client, nor keep a reference
to a region after its session ended unless the state holds it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phalanx.checkpoint.snapshot import SnapshotError, SnapshotHandle, SnapshotService
from phalanx.errors import ConfigError, GroupClosed, ProtocolError, UnsupportedError
from phalanx.local.shm import Region
from phalanx.local.wire import (
    BufRef,
    Frame,
    Kind,
    parse_op,
    parse_snapshot_entries,
    parse_state_entries,
)
from phalanx.membership.hosted import HostedGroup
from phalanx.membership.statesync import SyncState
from phalanx.membership.view import View

__all__ = ["FdReply", "Service", "Session", "dtype_str", "view_body"]

log = logging.getLogger(__name__)
audit = logging.getLogger("phalanx.audit.local")

PROTOCOL_VERSION = 1
_KEEP_HANDLES = 16  # snapshot handles kept for SNAPSHOT_WAIT (newest first)
_ALIGN = 64


@dataclass(frozen=True)
class FdReply:
    """A reply that carries a file descriptor (the server sends it, then closes it)."""

    body: dict[str, Any]
    fd: int


def dtype_str(dt: np.dtype[Any]) -> str:
    """A dtype as the local API names it: byte order kept (``<f4``), ml_dtypes by name."""
    return dt.name if dt.kind == "V" else dt.str


@dataclass
class Session:
    """One client connection's mapped regions."""

    sid: int
    pid: int = 0
    regions: dict[int, Region] = field(default_factory=dict)
    shm_bytes: int = 0
    closed_cleanly: bool = False


def view_body(view: View, member_id: str) -> dict[str, Any]:
    return {
        "epoch": view.epoch,
        "members": list(view.ids),
        "rank": view.rank(member_id) if member_id in view else None,
        "member": member_id,
    }


class Service:
    """Executes local API requests on ``group`` (see the module docstring)."""

    def __init__(
        self,
        group: HostedGroup,
        *,
        max_client_shm_bytes: int,
        op_timeout: float,
        join_timeout: float = 30.0,
        snapshots: SnapshotService | None = None,
        seal_timeout: float = 300.0,
    ) -> None:
        self.group = group
        self.snapshots = snapshots
        self.seal_timeout = seal_timeout
        self._snap_lock = threading.Lock()
        self._handles: dict[int, SnapshotHandle] = {}
        self.max_shm = max_client_shm_bytes
        self.op_timeout = op_timeout
        self.join_timeout = join_timeout
        self._lock = threading.Lock()
        # where the client is in its training step: "idle" (at a boundary), "stepping"
        # (a collective ran since the boundary), "applying" (the step committed and the
        # state is being changed in place: done at update_state)
        self._phase = "idle"
        self._step = -1
        self._attached: dict[str, np.ndarray] = {}
        self._closing = False
        self._held = False

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, drain_timeout: float) -> bool:
        """Refuse new group calls; wait up to ``drain_timeout`` for the one in flight,
        then hold the lock until :meth:`release`. True if it drained in time."""
        self._closing = True
        self._held = self._lock.acquire(timeout=drain_timeout)
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def _enter(self) -> None:
        if self._closing:
            raise GroupClosed("the daemon is shutting down")

    # ------------------------------------------------------------------ dispatch
    def handle(self, s: Session, frame: Frame, fd: int | None) -> dict[str, Any]:
        """The reply body for ``frame``; raises a typed error for an ERROR reply.
        ``fd`` (a received memfd) is consumed (mapped and closed) or closed."""
        k = frame.kind
        if k is not Kind.MAP and fd is not None:
            os.close(fd)
            raise ProtocolError(f"{k.name} must not carry a file descriptor")
        body = frame.body
        if k in (Kind.OP, Kind.COMMIT, Kind.BEGIN_STEP, Kind.STATE_ATTACH, Kind.STATE_UPDATE,
                 Kind.SNAPSHOT, Kind.RESTORE):  # fmt: skip
            self._enter()
        if k is Kind.OP:
            return self._op(s, body)
        if k is Kind.HELLO:
            pid = body.get("pid", 0)
            s.pid = pid if isinstance(pid, int) else 0
            audit.info("event=client_connected session=%d pid=%d", s.sid, s.pid)
            return {"version": PROTOCOL_VERSION, "daemon_pid": os.getpid(), "view": self.view(),
                    "seal_timeout": self.seal_timeout,
                    "rejoin_timeout": self.join_timeout}  # fmt: skip
        if k is Kind.MAP:
            return self._map(s, body, fd)
        if k is Kind.UNMAP:
            rid = body.get("region")
            region = s.regions.pop(rid, None) if isinstance(rid, int) else None
            if region is not None:
                s.shm_bytes -= region.size
            return {}
        if k is Kind.VIEW:
            return self.view()
        if k is Kind.COMMIT:
            return self._commit(body)
        if k is Kind.BEGIN_STEP:
            return self._begin_step(body)
        if k is Kind.STATE_ATTACH:
            return self._attach(s, body)
        if k is Kind.STATE_UPDATE:
            return self._update(body)
        raise ProtocolError(f"{k.name} is not a request")

    def handle_fd(self, s: Session, frame: Frame, fd: int | None) -> dict[str, Any] | FdReply:
        """:meth:`handle`, plus the requests whose reply carries a descriptor."""
        if frame.kind is Kind.RESTORE:
            if fd is not None:
                os.close(fd)
                raise ProtocolError("RESTORE must not carry a file descriptor")
            self._enter()
            return self._restore(frame.body)
        if frame.kind is Kind.SNAPSHOT:
            if fd is not None:
                os.close(fd)
                raise ProtocolError("SNAPSHOT must not carry a file descriptor")
            self._enter()
            return self._snapshot(s, frame.body)
        if frame.kind is Kind.SNAPSHOT_WAIT:
            if fd is not None:
                os.close(fd)
                raise ProtocolError("SNAPSHOT_WAIT must not carry a file descriptor")
            return self._snapshot_wait(frame.body)
        return self.handle(s, frame, fd)

    def view(self) -> dict[str, Any]:
        return view_body(self.group.view, self.group.member_id)

    # ------------------------------------------------------------------ memory
    def _map(self, s: Session, body: dict[str, Any], fd: int | None) -> dict[str, Any]:
        if fd is None:
            raise ProtocolError("MAP needs a file descriptor")
        rid = body.get("region")
        if not isinstance(rid, int) or rid in s.regions:
            os.close(fd)
            raise ProtocolError(f"bad or duplicate region id {rid!r}")
        region = Region.adopt(rid, fd, self.max_shm - s.shm_bytes)
        s.regions[rid] = region
        s.shm_bytes += region.size
        return {"size": region.size}

    def _array(self, s: Session, ref: BufRef) -> np.ndarray:
        region = s.regions.get(ref.region)
        if region is None:
            raise ProtocolError(f"unknown region {ref.region}")
        return region.array(ref.offset, ref.dtype, ref.shape)

    # ------------------------------------------------------------------ group calls
    def _op(self, s: Session, body: dict[str, Any]) -> dict[str, Any]:
        req = parse_op(body)
        x = None if req.buf is None else self._array(s, req.buf)
        timeout = req.timeout or self.op_timeout
        g = self.group
        with self._lock:
            if self._phase == "idle":
                self._phase = "stepping"
            if req.op == "barrier":
                res = g.barrier(retry=req.retry, timeout=timeout)
            else:
                assert x is not None
                if req.op == "all_reduce":
                    res = g.all_reduce(x, req.reduce, req.codec, retry=req.retry, timeout=timeout)
                elif req.op == "reduce_scatter":
                    res = g.reduce_scatter(
                        x, req.reduce, req.codec, retry=req.retry, timeout=timeout
                    )
                elif req.op == "broadcast":
                    res = g.broadcast(
                        x, req.root, codec=req.codec, retry=req.retry, timeout=timeout
                    )
                else:
                    res = g.all_gather(x, codec=req.codec, retry=req.retry, timeout=timeout)
        info = res.info
        return {
            "op": req.op,
            "epoch": res.epoch,
            "seq": info.seq,
            "contributors": list(res.contributors),
            "failed_attempts": res.failed_attempts,
            "algorithm": info.algorithm,
            "duration_s": info.duration_s,
            "nbytes": info.nbytes,
        }

    def _commit(self, body: dict[str, Any]) -> dict[str, Any]:
        step, ok = body.get("step"), body.get("ok", True)
        if not isinstance(step, int) or not isinstance(ok, bool):
            raise ProtocolError("COMMIT needs an integer step and a boolean ok")
        timeout = body.get("timeout")
        t = float(timeout) if isinstance(timeout, int | float) else None
        with self._lock:
            committed = self.group.commit(step, ok, timeout=t)
            # committed: the client now changes its state; it is consistent again at
            # update_state (if no state is attached, there is nothing to wait for)
            self._phase = "applying" if committed and self._attached else "idle"
        return {"committed": committed, "step": step}

    def _begin_step(self, body: dict[str, Any]) -> dict[str, Any]:
        step = body.get("step")
        if step is not None and not isinstance(step, int):
            raise ProtocolError("BEGIN_STEP: step must be an integer or null")
        timeout = body.get("timeout")
        t = float(timeout) if isinstance(timeout, int | float) else self.op_timeout
        with self._lock:
            info = self.group.begin_step(step, timeout=t)
            st = self.group.state
            moved = [
                n for n, a in self._attached.items() if st is None or st.arrays.get(n) is not a
            ]
            if st is not None and self._attached and set(st.arrays) != set(self._attached):
                moved = sorted(set(st.arrays) ^ set(self._attached) | set(moved))
            self._step = info.step
        if moved:
            raise ConfigError(
                f"the group's state does not fit the attached arrays (entries {moved}): "
                "attach arrays with the group's names, dtypes and shapes"
            )
        sync = info.sync
        return {
            "epoch": info.epoch,
            "members": list(info.members),
            "step": info.step,
            "synced": bool(sync is not None and sync.received),
            "sync_bytes": int(sync.nbytes) if sync is not None and sync.received else 0,
        }

    def _attach(self, s: Session, body: dict[str, Any]) -> dict[str, Any]:
        entries = parse_state_entries(body)
        step = body.get("step")
        if step is not None and not isinstance(step, int):
            raise ProtocolError("STATE_ATTACH: step must be an integer or null")
        arrays = {e.name: self._array(s, e.buf) for e in entries}
        if len(arrays) != len(entries):
            raise ConfigError("state entry names must be unique")
        with self._lock:
            old = self.group.state
            if step is not None:
                new = SyncState(arrays, step)
                how = "given"
            elif old is not None and old.valid and _same_layout(old.arrays, arrays):
                for name, a in arrays.items():
                    np.copyto(a, old.arrays[name])  # the daemon kept it: hand it back
                new = SyncState(arrays, old.step)
                how = "kept"
            else:
                new = SyncState(arrays, -1, valid=False)
                how = "to-receive"
            self.group.state = new
            self._attached = dict(arrays)
        audit.info(
            "event=state_attached session=%d step=%d entries=%d bytes=%d source=%s",
            s.sid,
            new.step,
            len(arrays),
            new.nbytes,
            how,
        )
        return {"step": new.step, "valid": new.valid, "source": how}

    def _update(self, body: dict[str, Any]) -> dict[str, Any]:
        step = body.get("step")
        changed = body.get("changed")
        if not isinstance(step, int):
            raise ProtocolError("STATE_UPDATE needs an integer step")
        if changed is not None and not (
            isinstance(changed, list) and all(isinstance(c, str) for c in changed)
        ):
            raise ProtocolError("STATE_UPDATE: changed must be a list of names or null")
        with self._lock:
            st = self.group.state
            if st is None or not self._attached:
                raise ConfigError("no state attached (call attach_state first)")
            st.update(step, changed)
            st.valid = True
            self._phase = "idle"
        return {"step": step}

    # ------------------------------------------------------------------ snapshots
    def _svc(self) -> SnapshotService:
        if self.snapshots is None:
            raise UnsupportedError("this daemon runs no snapshot service")
        return self.snapshots

    def _snapshot(self, s: Session, body: dict[str, Any]) -> dict[str, Any]:
        svc = self._svc()
        entries = parse_snapshot_entries(body)
        step = body.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ProtocolError("SNAPSHOT needs an integer step")
        state: dict[str, Any] = {}
        for e in entries:
            node = state
            for key in e.path[:-1]:
                nxt = node.setdefault(key, {})
                if not isinstance(nxt, dict):
                    raise ConfigError(f"snapshot path {'/'.join(e.path)!r} crosses an array")
                node = nxt
            if e.path[-1] in node:
                raise ConfigError(f"snapshot path {'/'.join(e.path)!r} given twice")
            node[e.path[-1]] = self._array(s, e.buf)
        with self._snap_lock:  # one generation at a time: the service rotates two buffers
            h = svc.snapshot(state, step)  # the one memory copy, from the client's pages
            self._handles[h.generation] = h
            for old in sorted(self._handles)[:-_KEEP_HANDLES]:
                del self._handles[old]
        return {
            "generation": h.generation,
            "step": h.step,
            "nbytes": h.nbytes,
            "stall_s": h.stall_s,
            "changes": list(h.changes),
        }

    def _snapshot_wait(self, body: dict[str, Any]) -> dict[str, Any]:
        gen, timeout = body.get("generation"), body.get("timeout")
        if not isinstance(gen, int) or not isinstance(timeout, int | float):
            raise ProtocolError("SNAPSHOT_WAIT needs an integer generation and a timeout")
        with self._snap_lock:
            h = self._handles.get(gen)
        if h is None:
            raise SnapshotError("unknown-generation", f"this daemon tracks no generation {gen}")
        try:
            info = h.wait(min(max(0.0, float(timeout)), self.seal_timeout))
        except TimeoutError:
            return {"sealed": False}
        return {
            "sealed": True,
            "generation": info.generation,
            "step": info.step,
            "nbytes": info.nbytes,
            "k": info.k,
            "m": info.m,
            "holders": list(info.holders),
            "seal_s": info.seal_s,
            "encode_s": info.encode_s,
        }

    def _restore(self, body: dict[str, Any]) -> FdReply:
        svc = self._svc()
        member, step, timeout = body.get("member"), body.get("step"), body.get("timeout")
        if member is not None and (not isinstance(member, str) or not 0 < len(member) <= 128):
            raise ProtocolError("RESTORE: member must be a member id or null")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise ProtocolError("RESTORE: step must be an integer or null")
        t = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None
        if member is None or member == self.group.member_id:
            got, state = svc.restore(step)
        else:
            got, state = svc.restore_peer(member, step, timeout=t)
        leaves: list[tuple[list[str], np.ndarray]] = []
        _leaves(state, [], leaves)
        entries: list[dict[str, Any]] = []
        offset = 0
        for path, arr in leaves:
            entries.append({"path": path, "dtype": dtype_str(arr.dtype),
                            "shape": list(arr.shape), "offset": offset})  # fmt: skip
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        region = Region.create(0, max(offset, 1), "phalanx-restore")
        try:
            for (_, arr), e in zip(leaves, entries, strict=True):
                if arr.nbytes:
                    dst = region.bytes[e["offset"] : e["offset"] + arr.nbytes]
                    np.copyto(dst, arr.reshape(-1).view(np.uint8))
        except BaseException:
            region.close_fd()
            raise
        fd = region.fd
        assert fd is not None
        del region  # the memfd keeps the pages; the client maps them
        audit.info(
            "event=restore_served member=%s step=%d arrays=%d bytes=%d",
            member or self.group.member_id,
            got,
            len(entries),
            offset,
        )
        return FdReply({"step": got, "size": max(offset, 1), "entries": entries}, fd)

    # ------------------------------------------------------------------ client loss
    def session_ended(self, s: Session) -> None:
        """The connection of ``s`` closed; if it died mid-step, leave and rejoin."""
        s.regions.clear()  # arrays the state holds keep their pages mapped
        if s.closed_cleanly or self._closing:
            audit.info("event=client_closed session=%d pid=%d", s.sid, s.pid)
            return
        with self._lock:
            phase = self._phase
            audit.warning(
                "event=client_lost session=%d pid=%d phase=%s step=%d epoch=%d",
                s.sid,
                s.pid,
                phase,
                self._step,
                self.group.view.epoch,
            )
            if phase == "idle":
                return  # at a boundary: the restarted process simply goes on
            self._phase = "idle"
            st = self.group.state
            if phase == "applying" and st is not None:
                st.valid = False  # changed half-way: receive the group's state again
            g = self.group
            try:
                g.leave(reason="client-lost-mid-step")
                view = g.rejoin(self.join_timeout)
                audit.info(
                    "event=rejoined reason=client-lost-mid-step epoch=%d members=%s",
                    view.epoch,
                    ",".join(view.ids),
                )
            except Exception as exc:  # the next client call will see the group's error
                log.error("event=rejoin_failed error=%r", str(exc))


def _leaves(
    node: dict[str, Any], prefix: list[str], out: list[tuple[list[str], np.ndarray]]
) -> None:
    """The arrays of a restored nested state, in order (torch tensors as numpy views)."""
    for key, value in node.items():
        path = [*prefix, key]
        if isinstance(value, dict):
            _leaves(value, path, out)
        elif isinstance(value, np.ndarray):
            out.append((path, value))
        else:  # a torch tensor (a state snapshotted in-process): its bytes as uint8
            out.append((path, np.asarray(value.numpy())))


def _same_layout(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape for n in a
    )

"""The local API's snapshot requests: SNAPSHOT, SNAPSHOT_WAIT and RESTORE.

Rows of :data:`phalanx.local.server.HANDLERS`: they go to the daemon's
:class:`~phalanx.checkpoint.SnapshotService` and never take the group lock (a snapshot
does not wait for a collective). ``SNAPSHOT`` names arrays in the client's regions;
the service's ``snapshot()`` copies them once into its own memory (the one copy) and
the reply goes out after that copy. ``SNAPSHOT_WAIT`` waits (bounded) for a
generation's seal. ``RESTORE`` rebuilds a state (this member's, or a gone peer's) and
returns it in a fresh memfd (:class:`WithFd`): the arrays laid out at 64-byte
offsets; the daemon keeps no mapping of it. A RESTORE whose deadline passed (it waited
behind a slow request, or took too long) answers ``TimeoutError`` instead: its client
has stopped waiting and drops the reply.

This module must never keep a reference to a client's region after the request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phalanx.deadline import Deadline
from phalanx.errors import ConfigError, SnapshotError, UnsupportedError
from phalanx.local.protocol import (
    Restore,
    RestoredArray,
    RestoreLayout,
    SealResult,
    SealStatus,
    SnapshotTaken,
    SnapshotWait,
    TakeSnapshot,
)
from phalanx.local.shm import Region

if TYPE_CHECKING:
    from phalanx.checkpoint.snapshot import SnapshotService
    from phalanx.local.server import LocalServer, Session

__all__ = ["WithFd", "dtype_name", "restore", "snapshot", "snapshot_wait"]

audit = logging.getLogger("phalanx.audit.local")

_ALIGN = 64
_KEEP = 16  # generations kept for SNAPSHOT_WAIT (newest first)


@dataclass(frozen=True)
class WithFd:
    """A RESTORE reply and the memfd that travels with it (the server closes it)."""

    layout: RestoreLayout
    fd: int


def dtype_name(dt: np.dtype[Any]) -> str:
    """A dtype as the local API names it: byte order kept (``<f4``), ml_dtypes by name."""
    return dt.name if dt.kind == "V" else dt.str


def _service(server: LocalServer) -> SnapshotService:
    if server.snapshots is None:
        raise UnsupportedError("this daemon runs no snapshot service")
    if server._closing:
        from phalanx.errors import GroupClosed

        raise GroupClosed("the daemon is shutting down")
    return server.snapshots


def snapshot(
    server: LocalServer, s: Session, req: TakeSnapshot, fd: int | None, dl: Deadline
) -> SnapshotTaken:
    svc = _service(server)
    state: dict[str, Any] = {}
    for e in req.entries:
        node = state
        for key in e.path[:-1]:
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"snapshot path {'/'.join(e.path)!r} crosses an array")
            node = nxt
        if e.path[-1] in node:
            raise ConfigError(f"snapshot path {'/'.join(e.path)!r} given twice")
        node[e.path[-1]] = s.array(e.buf)
    # one generation at a time (the service rotates two buffers); never past the
    # request's deadline, nor after a CANCEL (the client's arrays are named here)
    if not dl.acquire(server.snapshot_lock):
        why = "was cancelled" if dl.cancelled else "passed"
        raise TimeoutError(f"SNAPSHOT's deadline {why} while another snapshot ran")
    try:
        h = svc.snapshot(state, req.step, deadline=dl)  # the one copy, from the client's pages
        server.seals[h.generation] = h
        for old in sorted(server.seals)[:-_KEEP]:
            del server.seals[old]
    finally:
        server.snapshot_lock.release()
    return SnapshotTaken(h.generation, h.step, h.nbytes, h.stall_s, tuple(h.changes))


def snapshot_wait(
    server: LocalServer, s: Session, req: SnapshotWait, fd: int | None, dl: Deadline
) -> SealStatus:
    with server.snapshot_lock:
        h = server.seals.get(req.generation)
    if h is None:
        raise SnapshotError(
            "unknown-generation", f"this daemon tracks no generation {req.generation}"
        )
    try:
        info = h.wait(min(req.timeout, server.seal_timeout))
    except TimeoutError:
        return SealStatus(None)
    return SealStatus(
        SealResult(info.generation, info.step, info.nbytes, info.k, info.m,
                   tuple(info.holders), info.seal_s, info.encode_s)
    )  # fmt: skip


def restore(server: LocalServer, s: Session, req: Restore, fd: int | None, dl: Deadline) -> WithFd:
    svc = _service(server)
    member = server.group.member_id
    _in_time(dl)  # queued behind a slow request: its client has stopped waiting
    if req.member is None or req.member == member:
        got, state = svc.restore(req.step)  # (the service's own restore takes no deadline)
    else:
        got, state = svc.restore_peer(req.member, req.step, timeout=max(dl.left(), 0.001))
    _in_time(dl)  # no memfd of the whole state for a client that no longer waits
    leaves: list[tuple[tuple[str, ...], np.ndarray]] = []
    _leaves(state, (), leaves)
    entries: list[RestoredArray] = []
    offset = 0
    for path, arr in leaves:
        entries.append(RestoredArray(path, dtype_name(arr.dtype), tuple(arr.shape), offset))
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    region = Region.create(0, max(offset, 1), "phalanx-restore")
    try:
        for (_, arr), e in zip(leaves, entries, strict=True):
            if arr.nbytes:
                dst = region.bytes[e.offset : e.offset + arr.nbytes]
                np.copyto(dst, arr.reshape(-1).view(np.uint8))
    except BaseException:
        region.close_fd()
        raise
    out_fd = region.fd
    assert out_fd is not None
    del region  # the memfd keeps the pages; the client maps them
    audit.info(
        "event=restore_served member=%s step=%d arrays=%d bytes=%d",
        req.member or member,
        got,
        len(entries),
        offset,
    )
    return WithFd(RestoreLayout(got, max(offset, 1), tuple(entries)), out_fd)


def _in_time(dl: Deadline) -> None:
    if dl.expired:
        why = "was cancelled" if dl.cancelled else "passed"
        raise TimeoutError(f"RESTORE's deadline {why}")


def _leaves(
    node: dict[str, Any],
    prefix: tuple[str, ...],
    out: list[tuple[tuple[str, ...], np.ndarray]],
) -> None:
    """The arrays of a restored nested state, in order (torch tensors as numpy views)."""
    for key, value in node.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            _leaves(value, path, out)
        elif isinstance(value, np.ndarray):
            out.append((path, value))
        else:  # a torch tensor (a state snapshotted in-process)
            out.append((path, np.asarray(value.numpy())))

"""Typed errors across the local API: the daemon encodes them, the client re-raises them.

A failed request is answered with an ``ERROR`` frame whose body names one of the
classes in :data:`_TABLE` and carries its attributes, so the training process gets the
same exception types (and fields) as code that ran the group in-process:
``PeerFailure`` (epoch, op, seq, suspects, reason, detected_by), ``OpMismatch`` (epoch,
op, seq, each rank's arguments, the fields that differ, detected_by), ``ViewChanged``
(+ old_epoch), ``Evicted``, ``StepAborted``, ``StateSyncError``, ``CommitUnknown``,
``ConfigError``, ``UnsupportedError``, ``GroupClosed``, ``TimeoutError``, and the
snapshot errors ``SnapshotAbandoned``/``SnapshotNotFound``/``RestoreError``/
``SnapshotError`` (reason, detail, holder) and ``LayoutError`` (reason, detail, path),
... Anything else becomes a plain :class:`~phalanx.errors.PhalanxError` with the
daemon's message.

Decoding never looks a class up by an arbitrary name: only the table's entries exist.
This module must never import gRPC (``ViewChanged`` and ``Evicted`` are imported
lazily, only when such an error arrives; so are the snapshot errors).
"""

from __future__ import annotations

from typing import Any

from phalanx.errors import (
    CommError,
    ConfigError,
    GroupClosed,
    OpMismatch,
    PeerFailure,
    PhalanxError,
    ProtocolError,
    UnsupportedError,
)

__all__ = ["decode_error", "encode_error"]


def _type_name(exc: BaseException) -> str:
    names = [c.__name__ for c in type(exc).__mro__]
    for name in names:
        if name in _KNOWN:
            return name
    return "PhalanxError"


_KNOWN = frozenset(
    {
        "ViewChanged",
        "PeerFailure",
        "OpMismatch",
        "Evicted",
        "StepAborted",
        "StateSyncError",
        "CommitUnknown",
        "SnapshotAbandoned",
        "SnapshotNotFound",
        "RestoreError",
        "SnapshotError",
        "LayoutError",
        "CoordinatorUnavailable",
        "MembershipError",
        "GroupClosed",
        "CommError",
        "ConfigError",
        "UnsupportedError",
        "ProtocolError",
        "TimeoutError",
        "PhalanxError",
    }
)


def encode_error(exc: BaseException) -> dict[str, Any]:
    """The ERROR body for ``exc`` (its class name in the table, message, attributes)."""
    body: dict[str, Any] = {"type": _type_name(exc), "message": str(exc)}
    for attr in ("op", "seq", "epoch", "reason", "detected_by", "detail", "old_epoch", "step",
                 "holder", "path"):  # fmt: skip
        v = getattr(exc, attr, None)
        if isinstance(v, int | str) and not isinstance(v, bool):
            body[attr] = v
    for attr in ("suspects", "bad_ranks"):
        v = getattr(exc, attr, None)
        if v is not None:
            body[attr] = sorted(int(r) for r in v)
    if isinstance(exc, OpMismatch):
        body["descriptors"] = [[int(r), str(t)] for r, t in exc.descriptors.items()]
        body["fields"] = [str(f) for f in exc.fields]
    return body


def decode_error(body: dict[str, Any]) -> Exception:
    """The exception an ERROR body describes (always an instance of a known class)."""
    kind = body.get("type")
    msg = str(body.get("message", ""))
    detail = str(body.get("detail", ""))
    epoch = int(body.get("epoch", 0) or 0)
    if kind in ("PeerFailure", "ViewChanged"):
        op = str(body.get("op", "?"))
        seq = int(body.get("seq", -1))
        if kind == "ViewChanged":
            from phalanx.membership.elastic import ViewChanged

            return ViewChanged(
                op=op, seq=seq, old_epoch=int(body.get("old_epoch", 0)), epoch=epoch, detail=detail
            )
        by = body.get("detected_by")
        return PeerFailure(
            op=op,
            seq=seq,
            epoch=epoch,
            suspects=[int(r) for r in body.get("suspects", [])],
            reason=str(body.get("reason", "unknown")),
            detected_by=int(by) if isinstance(by, int) else None,
            detail=detail,
        )
    if kind == "OpMismatch":
        by = body.get("detected_by")
        pairs = body.get("descriptors")
        pairs = (
            [p for p in pairs if isinstance(p, list) and len(p) == 2]
            if isinstance(pairs, list)
            else []
        )
        return OpMismatch(
            op=str(body.get("op", "?")),
            seq=int(body.get("seq", -1)),
            epoch=epoch,
            descriptors={int(r): str(t) for r, t in pairs},
            fields=[str(f) for f in body.get("fields", [])],
            detected_by=int(by) if isinstance(by, int) else None,
            detail=detail,
        )
    if kind == "Evicted":
        from phalanx.membership.errors import Evicted

        return Evicted(msg, epoch=epoch)
    if kind == "StepAborted":
        from phalanx.membership.statesync import StepAborted

        e = StepAborted(epoch, int(body.get("step", -1)))
        e.args = (msg,)
        return e
    if kind == "StateSyncError":
        from phalanx.membership.statesync import StateSyncError

        return StateSyncError(msg, tuple(int(r) for r in body.get("bad_ranks", [])))
    if kind == "CommitUnknown":
        from phalanx.membership.errors import CommitUnknown

        e2 = CommitUnknown(int(body.get("step", -1)), epoch)
        e2.args = (msg,)
        return e2
    if kind in ("SnapshotAbandoned", "SnapshotNotFound", "RestoreError", "SnapshotError"):
        from phalanx.checkpoint import snapshot as snap

        scls: type[snap.SnapshotError] = getattr(snap, kind)
        return scls(str(body.get("reason", "error")), detail, holder=str(body.get("holder", "")))
    if kind == "LayoutError":
        from phalanx.checkpoint.layout import LayoutError

        return LayoutError(str(body.get("reason", "bad-state")), detail, str(body.get("path", "")))
    if kind in ("CoordinatorUnavailable", "MembershipError"):
        from phalanx.membership import errors as merr

        cls: type[Exception] = getattr(merr, kind)
        return cls(msg)
    simple: dict[str, type[Exception]] = {
        "GroupClosed": GroupClosed,
        "CommError": CommError,
        "ConfigError": ConfigError,
        "UnsupportedError": UnsupportedError,
        "ProtocolError": ProtocolError,
        "TimeoutError": TimeoutError,
    }
    return simple.get(str(kind), PhalanxError)(msg)

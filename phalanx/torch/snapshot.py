"""Snapshots of torch state: ``state_dict`` s in, the same ``state_dict`` s out.

:meth:`phalanx.Client.snapshot` keeps nested mappings of named arrays (erasure-coded in
the daemons' memory, docs/snapshots.md). A torch state is richer: optimizer state dicts
have integer keys, lists, tuples and plain values (``lr``, ``betas``, ``step``); tensors
may be bfloat16, bool, complex, zero-dimensional. :func:`snapshot` encodes any such tree
with :mod:`~phalanx.torch.treecodec` — one uint8 array per tensor (its exact bytes) plus
the structure as canonical JSON in one more uint8 array — and :func:`restore` /
:func:`restore_peer` give back the same tree: same nesting, key types, container types,
plain values, tensor dtypes, shapes and bytes (``torch.equal``), and Parameters as
Parameters. Restored tensors are CPU tensors over the memory the daemon handed back (no
further copy); ``load_state_dict`` copies them where they belong.

Non-contiguous and device tensors are made contiguous / copied to the CPU first (their
values are kept, not their strides or device). This module must never pickle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from phalanx.client import Client, SnapshotHandle
from phalanx.torch import treecodec
from phalanx.torch.errors import StateLayoutError

__all__ = ["restore", "restore_peer", "snapshot"]

_FORMAT = "phalanx.torch.state.v1"
_TREE = "tree"
_TENSORS = "tensors"
_FMT = "format"


def snapshot(client: Client, state: Any, step: int, *, timeout: float | None = None
             ) -> SnapshotHandle:  # fmt: skip
    """Snapshot ``state`` (a state dict, or any tree of dicts, lists, tuples, tensors and
    plain values) as ``step``; returns once the bytes are in daemon memory
    (``handle.wait()`` for the seal). Raises
    :class:`~phalanx.torch.errors.StateLayoutError` for a value it cannot encode."""
    header, arrays = treecodec.encode(state)
    payload: dict[str, Any] = {
        _FMT: np.frombuffer(_FORMAT.encode(), np.uint8).copy(),
        _TREE: np.frombuffer(header, np.uint8).copy(),
        _TENSORS: {str(i): a for i, a in enumerate(arrays)},
    }
    return client.snapshot(payload, step, timeout=timeout)


def _decode(got: tuple[int, dict[str, Any]]) -> tuple[int, Any]:
    step, raw = got
    fmt = raw.get(_FMT)
    if not isinstance(fmt, np.ndarray) or fmt.tobytes() != _FORMAT.encode():
        raise StateLayoutError(
            "this snapshot was not taken by phalanx.torch.snapshot (use client.restore)"
        )
    tensors = raw.get(_TENSORS, {})
    arrays = [tensors[str(i)] for i in range(len(tensors))]
    return step, treecodec.decode(raw[_TREE].tobytes(), arrays)


def restore(client: Client, step: int | None = None, *, timeout: float | None = None
            ) -> tuple[int, Any]:  # fmt: skip
    """(step, state) of this member's newest sealed snapshot (of ``step`` if given)."""
    return _decode(client.restore(step, timeout=timeout))


def restore_peer(client: Client, member_id: str, step: int | None = None, *,
                 timeout: float | None = None) -> tuple[int, Any]:  # fmt: skip
    """(step, state) of ``member_id``'s newest sealed snapshot, rebuilt from its
    holders: how a replacement takes over a gone member's torch state."""
    return _decode(client.restore_peer(member_id, step, timeout=timeout))

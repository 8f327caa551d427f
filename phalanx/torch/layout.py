"""Where each tensor of the training state lives in a few flat shared buffers.

Pure bookkeeping (no torch, no memory): :func:`plan_layout` takes named tensor specs
grouped by section (``params``, ``buffers``, ``optim``, ...) and returns a
:class:`StateLayout`: one flat buffer per (section, dtype), each tensor a contiguous slice
of it, 64-byte aligned. Every member computes the same layout from the same model and
optimizer, so the state phalanx keeps in sync is a handful of big named arrays (a fast
transfer, one hash each) instead of hundreds of small ones, and a newcomer can
allocate exactly the arrays the group's state has before it receives it.

:meth:`StateLayout.signature` is part of the job identity: two processes whose layouts
differ are not the same job. This module must never allocate or touch a tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Slot", "StateLayout", "TensorSpec", "plan_layout"]

_ALIGN_BYTES = 64

_ITEMSIZE = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8,
    "complex128": 16, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to place: its name (unique in its section), dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"{self.name}: dtype {self.dtype} has no shared-buffer layout")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"{self.name}: negative dimension in {self.shape}")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Slot:
    """Where a tensor lives: ``buffer`` (the flat array's name) at element ``offset``."""

    spec: TensorSpec
    buffer: str
    offset: int


@dataclass(frozen=True)
class StateLayout:
    """Flat buffers (name -> (dtype, elements)) and each section's slots, in order."""

    buffers: dict[str, tuple[str, int]]
    sections: dict[str, tuple[Slot, ...]]

    def slots(self, section: str) -> tuple[Slot, ...]:
        return self.sections.get(section, ())

    @property
    def nbytes(self) -> int:
        return sum(n * _ITEMSIZE[dt] for dt, n in self.buffers.values())

    def signature(self) -> str:
        """A digest of every buffer and slot: equal on every member of one job."""
        h = hashlib.sha256(b"phalanx.torch.layout\n")
        for name in sorted(self.buffers):
            dt, n = self.buffers[name]
            h.update(f"B {name} {dt} {n}\n".encode())
        for sec in sorted(self.sections):
            for s in self.sections[sec]:
                h.update(f"S {sec} {s.spec.name} {s.spec.dtype} {s.spec.shape} "
                         f"{s.buffer} {s.offset}\n".encode())  # fmt: skip
        return h.hexdigest()


def buffer_name(section: str, dtype: str) -> str:
    return f"{section}.{dtype}"


def plan_layout(sections: Iterable[tuple[str, Sequence[TensorSpec]]]) -> StateLayout:
    """Place every spec of every section: buffer ``section.dtype``, specs in the order
    given, each start aligned to 64 bytes."""
    buffers: dict[str, tuple[str, int]] = {}
    out: dict[str, tuple[Slot, ...]] = {}
    for section, specs in sections:
        if section in out:
            raise ValueError(f"section {section!r} given twice")
        if "." in section or not section:
            raise ValueError(f"bad section name {section!r}")
        seen: set[str] = set()
        slots = []
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"{section}: {spec.name!r} given twice")
            seen.add(spec.name)
            name = buffer_name(section, spec.dtype)
            dt, used = buffers.get(name, (spec.dtype, 0))
            per = max(1, _ALIGN_BYTES // _ITEMSIZE[dt])
            start = -(-used // per) * per
            slots.append(Slot(spec, name, start))
            buffers[name] = (dt, start + spec.numel)
        out[section] = tuple(slots)
    return StateLayout(buffers, out)

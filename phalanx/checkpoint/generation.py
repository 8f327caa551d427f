"""One snapshot generation's geometry and metadata: pure functions and a frozen record.

The flat state buffer of ``nbytes`` is cut into stripes of ``k * shard_bytes``; stripe
``s``'s data piece ``i`` is ``shard_len(s)`` consecutive bytes of the buffer, so data
pieces are slices (never copies) and the coder reads them in place. The last stripe
uses shorter pieces (rounded up to 64 bytes) and the buffer's *capacity* extends to
its end; bytes past ``nbytes`` are zeros. Every piece ``i`` of every stripe lives on
``holders[i]``.

:class:`GenerationMeta` is what a holder keeps beside the shards (key ``meta``) so a
replacement can rebuild a peer it never met: owner, generation, step, k, m, geometry,
holders, the CRC-32 of every piece, and the state manifest. This module must never do
I/O or hold a lock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from phalanx.checkpoint.layout import LayoutError, Manifest

__all__ = ["ALIGN", "GenerationMeta", "Geometry"]

ALIGN = 64
_MAX_META = 64 * 1024 * 1024


@dataclass(frozen=True)
class Geometry:
    """Where each piece of each stripe lies in a buffer of ``nbytes`` state bytes."""

    nbytes: int
    k: int
    shard_bytes: int

    def __post_init__(self) -> None:
        if self.nbytes < 0 or self.k < 1 or self.shard_bytes < ALIGN or self.shard_bytes % ALIGN:
            raise ValueError(f"bad geometry {self}")

    @property
    def stripe_bytes(self) -> int:
        return self.k * self.shard_bytes

    @property
    def stripes(self) -> int:
        return max(1, -(-self.nbytes // self.stripe_bytes))

    def base(self, stripe: int) -> int:
        return stripe * self.stripe_bytes

    def shard_len(self, stripe: int) -> int:
        if stripe < self.stripes - 1:
            return self.shard_bytes
        rem = self.nbytes - self.base(stripe)
        per_piece = -(-rem // self.k)
        return max(ALIGN, -(-per_piece // ALIGN) * ALIGN)

    @property
    def capacity(self) -> int:
        """Buffer bytes needed: through the end of the last stripe's last data piece."""
        last = self.stripes - 1
        return self.base(last) + self.k * self.shard_len(last)

    def piece(self, stripe: int, index: int) -> tuple[int, int]:
        """(start, end) of data piece ``index`` < k of ``stripe`` in the buffer."""
        n = self.shard_len(stripe)
        start = self.base(stripe) + index * n
        return start, start + n


@dataclass(frozen=True)
class GenerationMeta:
    owner: str
    generation: int
    step: int
    k: int
    m: int
    shard_bytes: int
    holders: tuple[str, ...]
    crcs: tuple[tuple[int, ...], ...]  # [stripe][index]
    manifest: Manifest

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.manifest.nbytes, self.k, self.shard_bytes)

    def to_bytes(self) -> bytes:
        doc = {
            "v": 1,
            "owner": self.owner,
            "generation": self.generation,
            "step": self.step,
            "k": self.k,
            "m": self.m,
            "shard_bytes": self.shard_bytes,
            "holders": list(self.holders),
            "crcs": [list(c) for c in self.crcs],
            "manifest": self.manifest.to_bytes().decode(),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> GenerationMeta:
        if len(data) > _MAX_META:
            raise LayoutError("bad-manifest", f"generation metadata of {len(data)} bytes")
        try:
            doc = json.loads(data)
            if doc.get("v") != 1:
                raise LayoutError("bad-manifest", f"unknown metadata version {doc.get('v')!r}")
            meta = cls(
                str(doc["owner"]),
                int(doc["generation"]),
                int(doc["step"]),
                int(doc["k"]),
                int(doc["m"]),
                int(doc["shard_bytes"]),
                tuple(str(h) for h in doc["holders"]),
                tuple(tuple(int(c) for c in row) for row in doc["crcs"]),
                Manifest.from_bytes(str(doc["manifest"]).encode()),
            )
            geo = meta.geometry
        except LayoutError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise LayoutError("bad-manifest", f"generation metadata: {exc}") from None
        n = meta.k + meta.m
        if len(meta.holders) != n or len(meta.crcs) != geo.stripes:
            raise LayoutError("bad-manifest", "holders or checksums do not match the geometry")
        if any(len(row) != n for row in meta.crcs):
            raise LayoutError("bad-manifest", "checksum rows do not match k + m")
        return meta

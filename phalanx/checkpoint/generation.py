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

from phalanx.checkpoint._gf256 import MAX_SHARDS
from phalanx.checkpoint.layout import LayoutError, Manifest, load_json, wire_int
from phalanx.checkpoint.store import MAX_OWNER_LEN

__all__ = ["ALIGN", "MAX_SHARD_BYTES", "GenerationMeta", "Geometry"]

ALIGN = 64
#: Largest piece (``shard_bytes``): 1 GiB. Every coder call and every PUT carries at
#: most one piece; ISA-L takes C ``int`` lengths (the coder also chunks its calls).
MAX_SHARD_BYTES = 1 << 30
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
        """Parse metadata a holder kept: anything :meth:`to_bytes` of a real generation
        could not have written is a :class:`LayoutError` ``bad-manifest`` (owner and
        generation within :class:`ShardKey`'s ranges, ``1 <= k``, ``0 <= m``,
        ``k + m <= 255``, ``step >= 0``, ``shard_bytes`` a multiple of 64 up to
        :data:`MAX_SHARD_BYTES`, one holder per piece, one CRC-32 row per stripe, and
        the manifest's own rules). Whether it is the generation it was read *for* is the
        reader's check (its key)."""
        if len(data) > _MAX_META:
            raise LayoutError("bad-manifest", f"generation metadata of {len(data)} bytes")
        try:
            doc = load_json(data)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise LayoutError("bad-manifest", "not version 1 generation metadata")
            owner, holders, rows, manifest = (
                doc["owner"],
                doc["holders"],
                doc["crcs"],
                doc["manifest"],
            )
            k = wire_int(doc["k"], "k", 1, MAX_SHARDS)
            m = wire_int(doc["m"], "m", 0, MAX_SHARDS - k)
            n = k + m
            if not isinstance(owner, str) or not 0 < len(owner.encode()) <= MAX_OWNER_LEN:
                raise LayoutError("bad-manifest", f"bad owner {owner!r:.80}")
            if not isinstance(holders, list) or len(holders) != n:
                raise LayoutError("bad-manifest", "holders do not match k + m")
            if not all(isinstance(h, str) and h for h in holders):
                raise LayoutError("bad-manifest", "holders must be non-empty str")
            if not isinstance(manifest, str):
                raise LayoutError("bad-manifest", "the manifest is not a str")
            shard_bytes = wire_int(doc["shard_bytes"], "shard_bytes", ALIGN, MAX_SHARD_BYTES)
            if shard_bytes % ALIGN:
                raise LayoutError("bad-manifest", f"shard_bytes {shard_bytes} not a multiple of 64")
            man = Manifest.from_bytes(manifest.encode())
            geo = Geometry(man.nbytes, k, shard_bytes)
            if not isinstance(rows, list) or len(rows) != geo.stripes:
                raise LayoutError("bad-manifest", "checksum rows do not match the geometry")
            if not all(isinstance(r, list) and len(r) == n for r in rows):
                raise LayoutError("bad-manifest", "checksum rows do not match k + m")
            crcs = tuple(tuple(wire_int(c, "a crc", 0, 2**32 - 1) for c in r) for r in rows)
            return cls(
                owner,
                wire_int(doc["generation"], "generation", 0, 2**63 - 1),
                wire_int(doc["step"], "step", 0, 2**63 - 1),
                k,
                m,
                shard_bytes,
                tuple(holders),
                crcs,
                man,
            )
        except LayoutError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise LayoutError("bad-manifest", f"generation metadata: {exc}") from None

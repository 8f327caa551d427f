"""The disk tier: this member's own sealed generations on local disk, written in the
background, for a restart of the whole cluster (every in-memory copy gone).

Layout under ``<dir>/<member>/``: one folder per generation, ``g<generation>``, holding
``data.bin`` (the flat state buffer) and ``meta.json`` (step + manifest with per-array
checksums). A write goes to ``g<generation>.tmp``: data first, fsync, meta last, fsync,
then an atomic rename and an fsync of the parent; so a folder without ``.tmp`` is
complete, and a crash mid-write leaves only a ``.tmp`` that the next start removes.
Older generations are removed after a newer one is in place. Reads check every array's
checksum; :meth:`DiskTier.newest_step` reads only ``meta.json`` (the snapshot service
compares it with the step the holders offer before reading any data).

This module must never block the caller of :meth:`DiskTier.submit` on I/O, never write
a folder in place (always tmp + rename), and never read a file whose size does not match
its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from phalanx.checkpoint.layout import LayoutError, Manifest, verify

__all__ = ["DiskTier", "DiskWrite"]

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class DiskWrite:
    """One generation to write: ``buf[:manifest.nbytes]`` must not change until
    ``done()`` is called (written, failed or replaced; the service pins the buffer)."""

    generation: int
    step: int
    manifest: Manifest
    buf: U8
    done: Callable[[], None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskTier:
    """Background writer and reader of ``<root>/<member>/g*``; one writer thread."""

    def __init__(self, root: str | os.PathLike[str], member_id: str) -> None:
        self.dir = Path(root) / member_id
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("g*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        self._pending: DiskWrite | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="snapshot-disk", daemon=True)
        self._thread.start()

    def submit(self, write: DiskWrite) -> None:
        """Queue ``write``; a queued write not yet started is replaced (its ``done`` set)."""
        with self._cond:
            if self._pending is not None:
                self._pending.done()
            self._pending = write
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            if self._pending is not None:  # closed before it started: never written
                self._pending.done()
                self._pending = None
        if self._thread.is_alive():
            log.error("snapshot disk writer did not stop within %.1fs dir=%s", timeout, self.dir)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait(1.0)
                if self._pending is None:
                    return
                w, self._pending = self._pending, None
            try:
                self._write(w)
            except OSError as exc:
                log.error(
                    "snapshot disk write failed generation=%d dir=%s error=%s",
                    w.generation,
                    self.dir,
                    exc,
                )
            finally:
                w.done()

    def _write(self, w: DiskWrite) -> None:
        final = self.dir / f"g{w.generation:020d}"
        tmp = self.dir / f"g{w.generation:020d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "data.bin", "wb") as f:
            f.write(w.buf[: w.manifest.nbytes].data)
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "generation": w.generation,
            "step": w.step,
            "manifest": w.manifest.to_bytes().decode(),
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        for old in self.dir.glob("g*"):
            if old != final and not old.name.endswith(".tmp") and old.name < final.name:
                shutil.rmtree(old, ignore_errors=True)
        log.info(
            "snapshot disk write generation=%d step=%d bytes=%d path=%s",
            w.generation,
            w.step,
            w.manifest.nbytes,
            final,
        )

    def generations(self) -> list[int]:
        """Complete generations on disk, newest first."""
        out = []
        for p in self.dir.glob("g*"):
            if not p.name.endswith(".tmp") and (p / "meta.json").exists():
                try:
                    out.append(int(p.name[1:]))
                except ValueError:
                    continue
        return sorted(out, reverse=True)

    def _meta(self, gen: int) -> tuple[int, Manifest]:
        """(step, manifest) of generation ``gen`` from its ``meta.json``, once its
        ``data.bin`` has the manifest's size (its checksums are not read here)."""
        path = self.dir / f"g{gen:020d}"
        meta = json.loads((path / "meta.json").read_text())
        manifest = Manifest.from_bytes(str(meta["manifest"]).encode())
        if (path / "data.bin").stat().st_size != manifest.nbytes:
            raise ValueError("truncated data file")
        return int(meta["step"]), manifest

    def newest_step(self) -> int | None:
        """The step of the newest complete generation, from its ``meta.json`` alone
        (cheap: ``data.bin`` is not read, so :meth:`read` may still refuse it), or
        ``None``."""
        for gen in self.generations():
            try:
                return self._meta(gen)[0]
            except (OSError, ValueError, KeyError, LayoutError) as exc:
                log.warning("snapshot disk generation=%d unreadable: %s", gen, exc)
        return None

    def read(self, step: int | None = None) -> tuple[int, int, Manifest, U8] | None:
        """(generation, step, manifest, buffer) of the newest complete, intact generation
        (with that ``step`` when given), or ``None``."""
        for gen in self.generations():
            try:
                got, manifest = self._meta(gen)
                if step is not None and got != step:
                    continue
                buf = np.fromfile(self.dir / f"g{gen:020d}" / "data.bin", dtype=np.uint8)
            except (OSError, ValueError, KeyError, LayoutError) as exc:
                log.warning("snapshot disk generation=%d unreadable: %s", gen, exc)
                continue
            bad = verify(manifest, buf)
            if bad:
                log.warning("snapshot disk generation=%d fails checksums arrays=%s", gen, bad[:5])
                continue
            return gen, got, manifest, buf
        return None

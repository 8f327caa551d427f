"""State sync: a newcomer or a diverged peer gets the group's state before it contributes.

The group's *state* is a step number plus named numpy arrays (:class:`SyncState`). Its
identity is a SHA-256 digest over the step and every entry's name, dtype, shape and
bytes (:func:`state_digest`). When a new data-plane group is installed (one per view,
see :mod:`phalanx.membership.elastic`) every member runs this protocol **over the data
plane** — bulk bytes never travel through protobuf/gRPC:

1. *exchange*: an ``all_gather`` of one fixed 64-byte :class:`PeerRecord` per rank
   (has-state flag, state step, digest, and where the member is inside its training
   step: ``pos_step``/``done``);
2. *plan* (:func:`plan_sync`, pure, deterministic on the gathered table, so every
   member reaches the same decision without talking again): the source is the lowest
   rank of the largest (step, digest) class among members that hold a state (ties:
   the higher step, then the smaller digest); every other member is a *receiver*.
   If the members are not at the same point of a training step the plan is ``ABORT``
   (see below) and nothing is transferred;
3. *transfer* (:func:`transfer`): the source ``broadcast`` s a JSON manifest (length
   first, then the bytes: names, dtypes, shapes, per-entry SHA-256 and CRC-32), then
   each entry's bytes (8 MiB broadcasts, a few in flight). Receivers write into fresh
   buffers, never into the live state (or into their own arrays when those hold
   nothing valid);
4. *verify*: each receiver checks every entry's CRC-32 as its bytes arrive and the
   manifest against the planned state digest, then a second tiny ``all_gather`` tells
   everyone whether all receivers verified. Only then does a receiver install the
   arrays (copied into its existing arrays where name, shape and dtype match, so
   references the caller holds stay valid) and adopt the source's SHA-256 of each
   entry. A mismatch raises :class:`StateSyncError` on every member — the receiver
   never contributes a collective with unverified state.

Why a CRC-32 checks the bytes and the SHA-256 names the state: the digest is the
state's identity (members compare it to pick the source, so it must not collide by
design), while the transfer check has to catch bytes that changed on the way or at the
source after it hashed them; a CRC-32 catches every burst up to 32 bits and all but
2**-32 of the rest. A relay that forges bytes is outside what the data plane defends
(no per-frame MAC guards any collective's bytes: docs/comm.md). The receiver's SHA-256
of every byte was the critical path of a large sync (1 GB/s here against the wire's
~1 GB/s); the CRC-32 runs at ~10 GB/s through ISA-L (:mod:`phalanx.checkpoint._crc`,
what the snapshots use too). Adopted hashes are checked once more after install
(:meth:`SyncState.adopt`).

Positions and ``ABORT``: a member that already finished collectives of the current
training step (``done > 0``) cannot take new state mid-step, and its next collective
would not line up with a member that is at the step boundary; nor can a member that
must receive state while inside a collective call (``in_op``: a retry whose input was
computed from the old state). If no member is in either situation, or every member is
at the very same (step, done) and none needs state, the plan is ``PROCEED`` (a retry
of a step's first collective lines up with the first collective of members coming
from ``begin_step``); otherwise ``ABORT``: those members get :class:`StepAborted`
(they call ``begin_step`` again; no vote is needed: the step never ran in this view),
the others exchange again, which lines up with the aborted members' next call.

This module must never talk gRPC, hold a lock while a collective runs, or write a
caller's array that holds a valid state before the new bytes were verified.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phalanx.checkpoint._crc import crc32
from phalanx.comm import Group, Handle
from phalanx.deadline import Deadline
from phalanx.errors import CommError, ConfigError, PeerFailure, StateSyncError, StepAborted
from phalanx.ops import OpSpec

__all__ = [
    "RECORD_BYTES",
    "PeerRecord",
    "StateEntry",
    "StateManifest",
    "StateSyncError",
    "StepAborted",
    "SyncAction",
    "SyncPlan",
    "SyncReport",
    "SyncState",
    "entry_digest",
    "plan_sync",
    "state_digest",
    "transfer",
]

log = logging.getLogger(__name__)

RECORD_BYTES = 64
_RECORD = struct.Struct("<4sIqqq32s")  # magic, flags, state_step, pos_step, done, digest
_MAGIC = b"PXS1"
_F_HAS_STATE = 1
_F_IN_OP = 2  # the exchange runs inside a collective call (a retry), not at begin_step
_F_WANTS_STATE = 4  # a state is attached but holds nothing yet (it waits to receive one)
_FLAGS = _F_HAS_STATE | _F_IN_OP | _F_WANTS_STATE
_MAX_ENTRIES = 65536
_MAX_MANIFEST = 8 << 20
_MANIFEST_VERSION = 2  # 2: each entry carries its CRC-32
_MAX_ENTRY_BYTES = 1 << 48  # one entry of the state: 256 TiB, beyond any host's memory
_MAX_NAME = 1024
CHUNK_BYTES = 8 << 20  # state bytes per broadcast
WINDOW = 3  # broadcasts in flight during a transfer


# --------------------------------------------------------------------------- digests


def entry_digest(array: np.ndarray) -> bytes:
    """SHA-256 of an array's bytes in C order (what goes over the wire)."""
    data = np.ascontiguousarray(array)
    return hashlib.sha256(data.reshape(-1).view(np.uint8).data).digest()


def _combine(step: int, entries: Sequence[tuple[str, str, tuple[int, ...], bytes]]) -> bytes:
    h = hashlib.sha256(b"phalanx.state.v1\n")
    h.update(struct.pack("<qI", step, len(entries)))
    for name, dtype, shape, sha in entries:
        raw = name.encode()
        h.update(struct.pack("<I", len(raw)) + raw)
        dt = dtype.encode()
        h.update(struct.pack("<I", len(dt)) + dt)
        h.update(struct.pack(f"<I{len(shape)}q", len(shape), *shape))
        h.update(sha)
    return h.digest()


def state_digest(step: int, arrays: Mapping[str, np.ndarray]) -> bytes:
    """The state's identity: step + every entry (sorted by name) and its SHA-256."""
    entries = [
        (name, arrays[name].dtype.str, tuple(arrays[name].shape), entry_digest(arrays[name]))
        for name in sorted(arrays)
    ]
    return _combine(step, entries)


class SyncState:
    """The state a group keeps identical on its members: ``step`` + named arrays.

    Mutable on purpose (it is the training loop's state, not a message). Entry hashes
    and the digest are computed lazily and cached; after changing arrays in place call
    :meth:`update` (naming the changed entries keeps the others' cached hashes).
    ``SyncState.empty()`` is a newcomer's: it holds nothing and receives everything.
    """

    def __init__(
        self, arrays: Mapping[str, np.ndarray] | None = None, step: int = 0, *, valid: bool = True
    ) -> None:
        self.arrays: dict[str, np.ndarray] = dict(arrays or {})
        self.step = int(step)
        self.valid = valid
        self._digest: bytes | None = None
        self._entry: dict[str, tuple[bytes, int]] = {}  # name -> (SHA-256, CRC-32)
        for name in self.arrays:
            _check_name(name)

    @classmethod
    def empty(cls) -> SyncState:
        return cls({}, -1, valid=False)

    def update(self, step: int | None = None, changed: Iterable[str] | None = None) -> None:
        """The arrays (all, or those named in ``changed``) or the step changed."""
        if step is not None:
            self.step = int(step)
        if changed is None:
            self._entry.clear()
        else:
            for name in changed:
                self._entry.pop(name, None)
        self._digest = None

    def entry_hash(self, name: str) -> bytes:
        return self._hashes(name)[0]

    def _hashes(self, name: str) -> tuple[bytes, int]:
        got = self._entry.get(name)
        if got is None:
            data = _bytes_of(np.ascontiguousarray(self.arrays[name]))
            got = self._entry[name] = (entry_digest(data), crc32(data))
        return got

    def adopt(self, manifest: StateManifest) -> None:
        """The arrays were just installed from ``manifest``'s bytes (each passed its
        CRC-32 on arrival): take its SHA-256s instead of hashing every byte again, for
        each entry whose installed bytes still pass their CRC-32 (~10 GB/s). One that
        does not -- two entries sharing memory, an array overlapping itself: a later
        write changed bytes already checked -- is hashed from what it holds, so the
        digest this member announces is that of its bytes, never the source's."""
        self._entry = {}
        self._digest = None
        for e in manifest.entries:
            if crc32(_bytes_of(np.ascontiguousarray(self.arrays[e.name]))) == e.crc32:
                self._entry[e.name] = (e.sha256, e.crc32)
            else:
                log.warning(
                    "event=state_sync_install_changed entry=%s step=%d (its bytes changed "
                    "after they were checked: does it share memory with another entry?)",
                    e.name,
                    manifest.step,
                )

    def manifest(self) -> StateManifest:
        entries = []
        for n in sorted(self.arrays):
            a = self.arrays[n]
            sha, crc = self._hashes(n)
            entries.append(StateEntry(n, a.dtype.str, tuple(a.shape), sha, crc))
        return StateManifest(self.step, tuple(entries))

    def digest(self) -> bytes:
        if not self.valid:
            return b"\0" * 32
        if self._digest is None:
            self._digest = self.manifest().digest
        return self._digest

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def _int(v: Any, field: str) -> int:
    if type(v) is not int:  # JSON's true and 1.0 are no checksums
        raise StateSyncError(f"state manifest: {field} {v!r} is not an integer")
    return v


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name.encode()) > _MAX_NAME:
        raise ConfigError(f"state entry names must be non-empty strings, got {name!r}")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PeerRecord:
    """What one member says about itself in the exchange (64 bytes on the wire)."""

    has_state: bool
    state_step: int
    digest: bytes
    pos_step: int = -1  # the training step it is in (-1: not tracking steps)
    done: int = 0  # collectives it finished in that step
    in_op: bool = False  # inside a collective (its input is computed from its state)
    wants_state: bool = False  # attached arrays that wait for the group's state

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise ValueError("digest must be 32 bytes")
        if self.done < 0:
            raise ValueError("done must be >= 0")

    def encode(self) -> bytes:
        flags = (
            (_F_HAS_STATE if self.has_state else 0)
            | (_F_IN_OP if self.in_op else 0)
            | (_F_WANTS_STATE if self.wants_state else 0)
        )
        return _RECORD.pack(_MAGIC, flags, self.state_step, self.pos_step, self.done, self.digest)

    @classmethod
    def decode(cls, data: bytes) -> PeerRecord:
        if len(data) != RECORD_BYTES:
            raise StateSyncError(f"state record of {len(data)} bytes, want {RECORD_BYTES}")
        magic, flags, state_step, pos_step, done, digest = _RECORD.unpack(data)
        if magic != _MAGIC or flags & ~_FLAGS or done < 0:
            raise StateSyncError("malformed state record (peer speaks another version?)")
        return cls(
            bool(flags & _F_HAS_STATE),
            state_step,
            digest,
            pos_step,
            done,
            bool(flags & _F_IN_OP),
            bool(flags & _F_WANTS_STATE),
        )


class SyncAction(enum.Enum):
    PROCEED = "proceed"  # (sync if needed, then) run collectives
    ABORT = "abort"  # members are at different points of a step: realign first


@dataclass(frozen=True)
class SyncPlan:
    """The decision every member derives from the same gathered records."""

    action: SyncAction
    source: int | None  # rank holding the majority state (None: nobody has state)
    receivers: tuple[int, ...]  # ranks that must receive the state
    step: int  # the majority state's step (-1 without state)
    digest: bytes  # the majority state's digest
    majority: int  # how many ranks hold it
    aborted: tuple[int, ...] = ()  # ranks that are mid-step (they raise StepAborted)
    #: nobody holds the state and somebody waits for it: the group lost its state (every
    #: member that held it is gone); members rebuild it from snapshots, then exchange again
    recover: bool = False


def plan_sync(records: Sequence[PeerRecord]) -> SyncPlan:
    """Pick the source and the receivers, and whether ranks are aligned (pure)."""
    classes: dict[tuple[int, bytes], list[int]] = {}
    for rank, rec in enumerate(records):
        if rec.has_state:
            classes.setdefault((rec.state_step, rec.digest), []).append(rank)
    if classes:
        # the newest step first: steps only advance by a commit every member applied,
        # so an older state is behind, however many hold it (two replacements that
        # attached their initial arrays as step 0 outvoted the survivor at step 100);
        # among states of one step, the majority, then the lowest digest
        (step, digest), holders = max(
            classes.items(), key=lambda kv: (kv[0][0], len(kv[1]), [-b for b in kv[0][1]])
        )
        source: int | None = min(holders)
        receivers = tuple(r for r in range(len(records)) if r not in holders)
    else:
        step, digest, holders, source, receivers = -1, b"\0" * 32, [], None, ()
    # A member that finished collectives of its step, or that must receive state while
    # inside a collective (its input was computed from the old state), cannot go on.
    mid = tuple(
        r for r, rec in enumerate(records) if rec.done > 0 or (rec.in_op and r in receivers)
    )
    positions = {(rec.pos_step, rec.done) for rec in records}
    aligned = not mid or (len(positions) == 1 and not receivers)
    action = SyncAction.PROCEED if aligned else SyncAction.ABORT
    recover = source is None and any(rec.wants_state for rec in records)
    return SyncPlan(
        action, source, receivers, step, digest, len(holders), mid if not aligned else (), recover
    )


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class StateEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: bytes  # part of the state's identity (the digest)
    crc32: int  # checks the bytes on arrival (the module's head says why not the SHA-256)

    def __post_init__(self) -> None:
        _check_name(self.name)
        try:
            dt = np.dtype(self.dtype)
        except TypeError:
            raise StateSyncError(
                f"manifest entry {self.name!r}: bad dtype {self.dtype!r}"
            ) from None
        if dt.hasobject:
            raise StateSyncError(f"manifest entry {self.name!r}: object dtype refused")
        if len(self.shape) > 32 or any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise StateSyncError(f"manifest entry {self.name!r}: bad shape {self.shape!r}")
        if len(self.sha256) != 32:
            raise StateSyncError(f"manifest entry {self.name!r}: bad hash")
        if type(self.crc32) is not int or not 0 <= self.crc32 < 1 << 32:
            raise StateSyncError(f"manifest entry {self.name!r}: bad crc32")
        if self.nbytes > _MAX_ENTRY_BYTES:  # int64 products wrapped to negative or 0
            raise StateSyncError(f"manifest entry {self.name!r}: shape {self.shape!r} too large")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize  # Python ints: exact


@dataclass(frozen=True)
class StateManifest:
    """What the source sends before the bytes: step, entries (sorted), state digest."""

    step: int
    entries: tuple[StateEntry, ...]

    @property
    def digest(self) -> bytes:
        return _combine(self.step, [(e.name, e.dtype, e.shape, e.sha256) for e in self.entries])

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def encode(self) -> bytes:
        doc = {
            "v": _MANIFEST_VERSION,
            "step": self.step,
            "entries": [
                {
                    "name": e.name,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "sha256": e.sha256.hex(),
                    "crc32": e.crc32,
                }
                for e in self.entries
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> StateManifest:
        if len(data) > _MAX_MANIFEST:
            raise StateSyncError("state manifest too large")
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise StateSyncError("state manifest is not a JSON object")
            if doc.get("v") != _MANIFEST_VERSION:
                raise StateSyncError(
                    f"state manifest version {doc.get('v')!r} not understood (this member "
                    f"reads version {_MANIFEST_VERSION}: are the daemons of one release?)"
                )
            raw = doc["entries"]
            if not isinstance(raw, list) or len(raw) > _MAX_ENTRIES:
                raise StateSyncError("state manifest: bad entry list")
            entries = tuple(
                StateEntry(
                    str(e["name"]),
                    str(e["dtype"]),
                    tuple(int(d) for d in e["shape"]),
                    bytes.fromhex(str(e["sha256"])),
                    _int(e["crc32"], "crc32"),
                )
                for e in raw
            )
            return cls(int(doc["step"]), entries)
        except StateSyncError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateSyncError(f"malformed state manifest: {exc}") from None


# --------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class SyncReport:
    """What a sync did on this member."""

    epoch: int
    source: int | None
    receivers: tuple[int, ...]
    received: bool  # this member installed new state
    step: int
    nbytes: int  # state bytes moved
    seconds: float  # manifest + bytes + verification

    @property
    def rate_bytes_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SyncOutcome:
    """One transfer this member took part in, as the monitor counts it: ``role`` is
    "sent" (the source) or "received"; ``ok`` False when verification or the transfer
    failed (then ``nbytes`` is 0). ``failures_in_row`` is this member's received
    states that failed verification in a row, 0 once an exchange went through."""

    role: str
    ok: bool
    nbytes: int
    seconds: float
    failures_in_row: int


def gather_records(
    group: Group, mine: PeerRecord, deadline: Deadline | None = None
) -> list[PeerRecord]:
    """The exchange: an all_gather of every rank's 64-byte record (ends by ``deadline``)."""
    buf = np.zeros(group.world * RECORD_BYTES, dtype=np.uint8)
    own = group.chunk(buf.size)
    if own != slice(group.rank * RECORD_BYTES, (group.rank + 1) * RECORD_BYTES):
        raise StateSyncError(f"unexpected all_gather partition {own}")
    buf[own] = np.frombuffer(mine.encode(), dtype=np.uint8)
    group.all_gather(buf, deadline=deadline)
    raw = buf.tobytes()
    return [
        PeerRecord.decode(raw[r * RECORD_BYTES : (r + 1) * RECORD_BYTES])
        for r in range(group.world)
    ]


#: a rank's verdict on the transfer (step 4)
_VERIFIED, _BAD, _NO_TRANSPORT = 1, 0, 2


def _verdicts_all(group: Group, mine: int, deadline: Deadline | None) -> list[int]:
    """A tiny all_gather of one verdict per rank (8 bytes each, to stay word aligned).

    Patient: ranks reach it when their part is done -- a bystander at once, the
    source when its last bytes are queued -- and wait there while the receivers take
    the rest, which may last longer than the engine's no-progress window (a large
    state, a slow link: the window would fail it, every member rebuild, and the
    transfer start over for ever). Live peers keep it waiting until the deadline; a
    dead or silent one fails it as any op."""
    buf = np.zeros(group.world, dtype=np.int64)
    own = group.chunk(buf.size)
    buf[own] = mine
    group.run(OpSpec("all_gather"), buf, deadline=deadline, patient=True)
    return [int(v) for v in buf]


def _bytes_of(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


def transfer(
    group: Group,
    plan: SyncPlan,
    state: SyncState,
    *,
    epoch: int,
    side: Callable[[tuple[int, ...]], Group] | None = None,
    deadline: Deadline | None = None,
) -> SyncReport:
    """Run steps 3-4 of the protocol for ``plan`` (every rank calls it); installs the
    state on receivers after verification. Raises :class:`StateSyncError` everywhere
    if any receiver failed verification.

    ``side(ranks)``, if given, builds a group of just those ranks of ``group`` (source
    first, then receivers, in rank order): the bytes then go one hop from the source to
    the receivers instead of down the whole broadcast chain, and the other members
    only wait for the verdict."""
    t0 = time.monotonic()
    if plan.source is None or not plan.receivers:
        return SyncReport(epoch, plan.source, plan.receivers, False, plan.step, 0, 0.0)
    me = group.rank
    src = plan.source
    receiving = me in plan.receivers
    parts = tuple(sorted({src, *plan.receivers}))
    manifest, error, transport = StateManifest(plan.step, ()), "", ""
    fresh: dict[str, np.ndarray] = {}
    if side is None or len(parts) == group.world:
        manifest, fresh, error = _move(group, src, receiving, plan, state, deadline)
    elif me in parts:
        try:
            sub = side(parts)
        except Exception as exc:  # HandshakeError, OSError: no transfer, say so
            transport = f"transfer group: {exc}"
        else:
            log.debug(
                "event=side_group_up epoch=%d ranks=%s build_s=%.4f",
                epoch,
                list(parts),
                time.monotonic() - t0,
            )
            try:
                manifest, fresh, error = _move(
                    sub, parts.index(src), receiving, plan, state, deadline
                )
            except StateSyncError as exc:  # a malformed manifest, a changed source
                error = error or f"transfer: {exc}"
            except CommError as exc:  # the link failed: nobody's state is to blame
                transport = f"transfer: {exc}"
            finally:
                sub.close()
    else:
        manifest = StateManifest(plan.step, ())
    mine = _BAD if error else _NO_TRANSPORT if transport else _VERIFIED
    verdicts = _verdicts_all(group, mine, deadline)
    seconds = time.monotonic() - t0
    if _BAD not in verdicts and _NO_TRANSPORT in verdicts:
        # a side group that did not come up, a link that broke: no bytes (or not all)
        # moved, nothing is installed. Not a verification failure -- blaming it would
        # make the source, maybe the only holder of the state, leave the group -- but
        # a failure of this group: every member rebuilds it and exchanges again
        cut = tuple(r for r, v in enumerate(verdicts) if v == _NO_TRANSPORT)
        log.warning(
            "event=state_sync_interrupted epoch=%d source=%d ranks=%s detail=%r",
            epoch,
            src,
            list(cut),
            transport,
        )
        raise PeerFailure(
            op="state_sync",
            seq=-1,
            epoch=epoch,
            suspects=(),
            reason="aborted",
            detail=f"state transfer interrupted on ranks {list(cut)}"
            + (f": {transport}" if transport else ""),
        )
    if _BAD in verdicts:
        bad = [r for r, v in enumerate(verdicts) if v == _BAD]
        log.error(
            "event=state_sync_failed epoch=%d source=%d bad_receivers=%s detail=%r",
            epoch,
            src,
            bad,
            error,
        )
        if me == src:
            # the links are authenticated, so bytes that do not match the source's
            # hashes most likely changed after it hashed them (arrays written in place
            # without update()): hash them again, or every later try sends the same
            # stale hashes and fails the same way. The next exchange then picks its
            # source by the true digests, by the usual rule: the largest class of
            # holders at the newest step (the others' state if this one's arrays went
            # astray among three or more holders; with two holders that now differ,
            # the lower digest; these arrays if it is the only holder)
            state.update()
            log.warning(
                "event=state_sync_source_rehashed epoch=%d source=%d step=%d "
                "(the arrays were hashed again; were they changed without update()?)",
                epoch,
                src,
                state.step,
            )
        raise StateSyncError(
            f"state sync in epoch {epoch} failed on ranks {bad}" + (f": {error}" if error else ""),
            tuple(bad),
        )
    if receiving:
        _install(state, manifest, fresh)
    log.info(
        "event=state_synced epoch=%d source=%d receivers=%s received=%s step=%d bytes=%d "
        "seconds=%.4f rate_MBps=%.0f",
        epoch,
        src,
        list(plan.receivers),
        receiving,
        manifest.step,
        manifest.nbytes,
        seconds,
        manifest.nbytes / seconds / 1e6 if seconds > 0 else 0.0,
    )
    return SyncReport(
        epoch, src, plan.receivers, receiving, manifest.step, manifest.nbytes, seconds
    )


def _move(
    g: Group,
    root: int,
    receiving: bool,
    plan: SyncPlan,
    state: SyncState,
    deadline: Deadline | None,
) -> tuple[StateManifest, dict[str, np.ndarray], str]:
    """The manifest, then every entry's bytes, from ``root`` to every rank of ``g``;
    returns (manifest, received arrays, verification error or "")."""
    # -- manifest: length, then bytes
    if g.rank == root:
        manifest = state.manifest()
        blob = manifest.encode()
        if manifest.digest != state.digest():  # the arrays changed without update()
            raise StateSyncError("source state changed without SyncState.update()")
    else:
        blob = b""
    length = np.array([len(blob)], dtype=np.int64)
    g.broadcast(length, root=root, deadline=deadline)
    n = int(length[0])
    if not 0 < n <= _MAX_MANIFEST:
        raise StateSyncError(f"state manifest length {n} out of range")
    raw = np.zeros(n, dtype=np.uint8)
    if g.rank == root:
        raw[:] = np.frombuffer(blob, dtype=np.uint8)
    g.broadcast(raw, root=root, deadline=deadline)
    error = ""
    try:
        manifest = StateManifest.decode(raw.tobytes())
    except StateSyncError as exc:
        manifest, error = StateManifest(plan.step, ()), str(exc)
    if not error and (manifest.digest != plan.digest or manifest.step != plan.step):
        error = "manifest does not match the majority digest"
    # -- bytes: every rank takes part in every broadcast, whatever the manifest says.
    # Entries go in chunks of CHUNK_BYTES, up to WINDOW broadcasts in flight, so a
    # receiver checks chunk k (the CRC drops the GIL) while the engine moves k+1...
    # A receiver that holds nothing valid (a newcomer's attached arrays, a half-applied
    # copy) receives straight into its arrays: no second buffer of the state's size, no
    # copy at install, no fresh memory to fault in during the transfer. One that holds
    # a valid older state keeps it until the new one verified (it may be all that is
    # left if the source dies mid-transfer).
    in_place = receiving and not state.valid
    if in_place:
        state.update()  # the arrays are about to change: forget their cached hashes
    fresh: dict[str, np.ndarray] = {}
    for entry in manifest.entries:
        have = state.arrays.get(entry.name)
        buf: np.ndarray | None = None
        # the source's own bytes, a bystander's identical copy (overwritten with the same
        # bytes: harmless), or a receiver's arrays that hold nothing valid
        usable = g.rank == root or not receiving or in_place
        if (
            usable
            and have is not None
            and _same(have, entry)
            and have.flags.c_contiguous
            and have.flags.writeable
        ):
            buf = _bytes_of(have)
        if buf is None:
            buf = np.empty(entry.nbytes, dtype=np.uint8)
            if g.rank == root and have is not None:
                buf[:] = _bytes_of(np.ascontiguousarray(have))
        crc = 0
        inflight: deque[tuple[Handle, np.ndarray]] = deque()
        for a in range(0, max(entry.nbytes, 1), CHUNK_BYTES):
            piece = buf[a : a + CHUNK_BYTES]
            handle = g.broadcast(piece, root=root, async_op=True, deadline=deadline)
            inflight.append((handle, piece))
            if len(inflight) >= WINDOW:
                crc = _finish(inflight, crc, receiving)
        while inflight:
            crc = _finish(inflight, crc, receiving)
        if receiving:
            if crc != entry.crc32 and not error:
                error = f"entry {entry.name!r}: crc32 mismatch after transfer"
            fresh[entry.name] = buf
    return manifest, fresh, error


def _finish(inflight: deque[tuple[Handle, np.ndarray]], crc: int, check: bool) -> int:
    handle, piece = inflight.popleft()
    handle.wait()
    return crc32(piece, crc) if check else crc


def _same(a: np.ndarray, entry: StateEntry) -> bool:
    return a.dtype.str == entry.dtype and tuple(a.shape) == entry.shape


def _install(state: SyncState, manifest: StateManifest, fresh: Mapping[str, np.ndarray]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for entry in manifest.entries:
        value = fresh[entry.name].view(np.dtype(entry.dtype)).reshape(entry.shape)
        have = state.arrays.get(entry.name)
        if have is not None and _same(have, entry) and have.flags.writeable:
            if not np.may_share_memory(have, value):  # received in place: already there
                np.copyto(have, value)  # keep the caller's references valid
            arrays[entry.name] = have
        else:
            arrays[entry.name] = value
    state.arrays = arrays
    state.step = manifest.step
    state.valid = True
    state.adopt(manifest)  # the bytes passed their CRC-32: no SHA-256 of them again

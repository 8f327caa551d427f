"""Whether an attempt of a training step ran among exactly the members it was cut for.

Pure arithmetic: no torch, no sockets, no threads. The manager runs one small lossless
**opening all-reduce** (float64, ``sum``) at the start of every attempt, built by
:func:`opening_slots` from what *this* member assumed at ``begin_step``:

* ``1`` and this member's **weight** (examples it contributes, or 1),
* three independent 21-bit hashes of the **view** (epoch + member ids in rank order),
  of the **job** identity and of the **step**, each as ``(h, h * h)``.

After the sum every member holds the same bytes (promise 1) and the same
``OpResult.contributors``, so :func:`judge` — a function of those shared facts only —
gives the same verdict on every member, and nobody ever waits for a vote that another
member decided not to cast:

* ``n * sum(h*h) == sum(h)**2`` holds iff every contributor's ``h`` was equal
  (Cauchy-Schwarz; exact: 21-bit values keep every sum below 2**53 for up to 2,048
  members, and the comparison runs on Python ints);
* the common view hash must equal the hash of the view the op *ran* in (epoch and
  contributors from the ``OpResult``): everyone began the step in that very view;
* a job hash that differs is not a transient: :data:`AttemptVerdict.FOREIGN` (someone else's
  job is in the view), the manager raises :class:`~phalanx.torch.errors.JobMismatch`.

This module must never read a clock or anything but its arguments.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "HASHES",
    "SLOTS",
    "AttemptVerdict",
    "Opening",
    "hashes",
    "job_identity",
    "judge",
    "opening_slots",
    "view_hashes",
]

HASHES = 3  # independent hashes per fact: a false "equal" needs a 63-bit collision
_BITS = 21  # n * h**2 < 2**53 for n <= 2**11: float64 sums stay exact
_FACTS = ("view", "job", "step")
SLOTS = 2 + 2 * HASHES * len(_FACTS)


class AttemptVerdict(enum.Enum):
    OK = "ok"  # every contributor began this step in the view the op ran in
    RETRY = "retry"  # they did not all agree (a view change got in between): redo
    FOREIGN = "foreign"  # a contributor runs another job: nothing may be committed


@dataclass(frozen=True)
class Opening:
    """The opening op's outcome as every member sees it."""

    verdict: AttemptVerdict
    world: int  # contributors
    weight: float  # the sum of the contributors' weights
    why: str = ""


def hashes(kind: str, payload: bytes) -> tuple[int, ...]:
    """:data:`HASHES` independent 21-bit values of ``payload`` (domain ``kind``)."""
    d = hashlib.sha256(b"phalanx.torch.verdict\n" + kind.encode() + b"\n" + payload).digest()
    out = []
    for i in range(HASHES):
        (v,) = struct.unpack_from("<Q", d, 8 * i)
        out.append(v & ((1 << _BITS) - 1))
    return tuple(out)


def view_hashes(epoch: int, members: Sequence[str]) -> tuple[int, ...]:
    return hashes("view", struct.pack("<q", epoch) + "\0".join(members).encode())


def step_hashes(step: int, tag: str = "") -> tuple[int, ...]:
    return hashes("step", struct.pack("<q", step) + tag.encode())


def job_identity(*parts: str) -> str:
    """A job's identity (hex): a SHA-256 of the parts that make two processes one job
    (the job name, the state layout, the global batch, the gradient codec, ...)."""
    h = hashlib.sha256(b"phalanx.torch.job\n")
    for p in parts:
        raw = p.encode()
        h.update(struct.pack("<I", len(raw)) + raw)
    return h.hexdigest()


def opening_slots(
    epoch: int, members: Sequence[str], job: str, step: int, weight: float, tag: str = ""
) -> np.ndarray:
    """This member's contribution to the opening all-reduce (float64, sum). ``tag``
    names the kind of attempt (members must agree on it, like on the step)."""
    out = [1.0, float(weight)]
    for hs in (view_hashes(epoch, members), hashes("job", job.encode()), step_hashes(step, tag)):
        for h in hs:
            out += [float(h), float(h * h)]
    return np.array(out, dtype=np.float64)


def _all_equal(n: int, s1: float, s2: float) -> bool:
    a, b = int(s1), int(s2)
    return float(a) == s1 and float(b) == s2 and n * b == a * a


def judge(
    reduced: np.ndarray, epoch: int, contributors: Sequence[str], step: int, tag: str = ""
) -> Opening:
    """The verdict on an opening op that ran in ``epoch`` among ``contributors``, from
    its reduced slots (the same on every member)."""
    n = len(contributors)
    if reduced.shape != (SLOTS,) or float(reduced[0]) != n:
        return Opening(
            AttemptVerdict.RETRY, n, 0.0, f"{reduced[0]:.0f} slots summed by {n} contributors"
        )
    weight = float(reduced[1])
    pos = 2
    common: dict[str, tuple[int, ...]] = {}
    for fact in _FACTS:
        vals = []
        for _ in range(HASHES):
            s1, s2 = float(reduced[pos]), float(reduced[pos + 1])
            pos += 2
            if not _all_equal(n, s1, s2):
                if fact == "job":
                    return Opening(
                        AttemptVerdict.FOREIGN, n, weight, "contributors run different jobs"
                    )
                return Opening(
                    AttemptVerdict.RETRY, n, weight, f"contributors assumed different {fact}s"
                )
            vals.append(int(s1) // n)
        common[fact] = tuple(vals)
    if common["view"] != view_hashes(epoch, contributors):
        return Opening(
            AttemptVerdict.RETRY, n, weight,
            f"the op ran in epoch {epoch} among {n}, not in the view the step began in",
        )  # fmt: skip
    if common["step"] != step_hashes(step, tag):
        return Opening(AttemptVerdict.RETRY, n, weight, "contributors are at another step")
    return Opening(AttemptVerdict.OK, n, weight)

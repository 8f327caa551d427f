"""The errors :mod:`phalanx.torch` adds to phalanx's hierarchy (:mod:`phalanx.errors`).

Everything else that reaches a training loop is one of phalanx's own typed errors
(``PeerFailure``, ``ViewChanged``, ``StepAborted``, ``Evicted``, ``DaemonUnavailable``,
...), never torch's ``RuntimeError`` wrapping of them: the gradient hooks only *submit*
collectives inside autograd and every result is collected, and raised, by the manager
outside of it. This module imports nothing from torch.
"""

from __future__ import annotations

from phalanx.errors import CommError, ConfigError, PhalanxError

__all__ = ["JobMismatch", "StateLayoutError", "StepTimeout"]


class JobMismatch(PhalanxError):
    """The members of the view do not all run the same job: another training job (or
    the same script with another model, optimizer or ``job=``) joined the coordinator.

    Its contributions would silently change this job's averages, so no step is
    committed while it is in the view. ``epoch`` is the view, ``members`` its member
    ids; ``job`` this process's job identity (hex)."""

    def __init__(self, epoch: int, members: tuple[str, ...], job: str) -> None:
        self.epoch = epoch
        self.members = members
        self.job = job
        super().__init__(
            f"the view of epoch {epoch} ({', '.join(members)}) mixes training jobs: some "
            f"member does not run job {job[:16]}; no step is committed while it is in the "
            "view (start jobs on separate coordinators, or stop the stray daemon)"
        )


class StepTimeout(CommError, TimeoutError):
    """No attempt of ``step`` could be completed before the deadline (the group kept
    changing, or a member never came). ``last`` names the last attempt's failure."""

    def __init__(self, step: int, seconds: float, last: str) -> None:
        self.step = step
        self.seconds = seconds
        self.last = last
        super().__init__(f"step {step} could not be completed in {seconds:.1f}s (last: {last})")


class StateLayoutError(ConfigError):
    """The training state cannot be laid out in shared memory: an optimizer whose state
    is not tensors of a fixed shape plus plain values, a value the state codec cannot
    encode, or plain values larger than the ``meta_bytes`` capacity. ``path`` names
    the offending entry."""

    def __init__(self, detail: str, path: str = "") -> None:
        self.detail = detail
        self.path = path
        where = f" at {path!r}" if path else ""
        super().__init__(f"{detail}{where}")

"""The heartbeat pace: how often members beat, given how many there are.

Every member heartbeats the coordinator, so its load grows with the group: at the
default 0.15 s, 1,000 members send 6,700 beats/s, and one coordinator process (a
Python gRPC server, ~250-400 us of CPU per beat) needs ~2 cores for them alone, falls
behind, fails members by timeout and feeds their rejoins back into the load
(``phalanx bench coordinator``, stop 21). The pace bounds the beats the coordinator is
sent to ``MembershipConfig.max_beat_rate``: past that, the interval doubles -- and the
heartbeat timeout and the confirm window with it, or a member beating at the new
interval would be failed for it -- until ``size / interval <= max_beat_rate``.
Level ``L`` is the configured timings times ``2**L``.

What this costs is detection time for a member that goes *silent* (stopped,
partitioned) in a large group: 2.4 s instead of 0.6 s at 1,000 members with the
defaults. A member that dies is still removed in milliseconds: its Watch stream drops
and a peer reports it (two signals: no confirm window to wait out).

Members learn the pace on joining (``JoinResponse.timing``) and from heartbeat
answers (``HeartbeatResponse.timing``; a Beats call is answered on the first beat
after the pace changed). The pace slows at once (a longer timeout never fails anyone
early). It quickens only once the group has fit the faster level, with a quarter of
it to spare, for ``max(quicken_after, 10 x the current timeout)`` (60 s by default):
a mass eviction whose members are about to rejoin must not speed up everyone's beats
and feed the overload that caused it (``phalanx bench coordinator`` at 1,000 members on 2 cores spiralled that
way). After quickening, silences are judged by the slower timeouts for one slower
timeout, while members still beat at the old interval.

Pure logic: no clock of its own (callers pass ``now``), no threads, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from phalanx.membership.config import MembershipConfig

__all__ = ["Pace", "Pacer", "level_for"]

_MAX_LEVEL = 16
_SPARE = 0.75  # quicken only when the group fills at most this much of the faster level


@dataclass(frozen=True)
class Pace:
    """The configured timings times ``2**level``."""

    level: int
    interval: float
    timeout: float
    confirm_window: float

    @classmethod
    def at(cls, config: MembershipConfig, level: int) -> Pace:
        f = float(1 << level)
        return cls(level, config.heartbeat_interval * f, config.heartbeat_timeout * f,
                   config.confirm_window * f)  # fmt: skip


def level_for(size: int, config: MembershipConfig, current: int = 0) -> int:
    """The level for a group of ``size`` entries now at level ``current``: the lowest
    one whose beats fit ``max_beat_rate``; below ``current`` only with a quarter of
    that level to spare."""

    def capacity(level: int) -> float:  # members a level's interval allows
        return config.max_beat_rate * config.heartbeat_interval * (1 << level)

    need = 0
    while need < _MAX_LEVEL and size > capacity(need):
        need += 1
    if need >= current:
        return need
    lower = need
    while lower < current and size > _SPARE * capacity(lower):
        lower += 1
    return lower


class Pacer:
    """The pace of one group: :attr:`told` is what members are sent; :meth:`judging`
    what their silence is judged by (see the module docstring)."""

    def __init__(self, config: MembershipConfig) -> None:
        self.config = config
        self.told = Pace.at(config, 0)
        self._slower: tuple[Pace, float] | None = None  # (pace, until) still judged by
        self._fits_since: float | None = None  # since when a faster level would do

    def update(self, size: int, now: float) -> bool:
        """Follow a group of ``size`` entries (members and joiners) at ``now``; True
        when the pace members are told changed."""
        level = level_for(size, self.config, self.told.level)
        if level >= self.told.level:
            self._fits_since = None
            if level == self.told.level:
                return False
        else:
            if self._fits_since is None:
                self._fits_since = now
            if now - self._fits_since < max(self.config.quicken_after, 10 * self.told.timeout):
                return False
            self._fits_since = None
            old = self.told
            until = now + old.timeout
            if self._slower is not None and self._slower[0].level > old.level:
                self._slower = (self._slower[0], max(self._slower[1], until))
            else:
                self._slower = (old, until)
        self.told = Pace.at(self.config, level)
        return True

    def judging(self, now: float) -> Pace:
        """The pace silences are judged by at ``now``: the told one, or a slower one
        members may still be beating at."""
        if self._slower is not None:
            pace, until = self._slower
            if now < until and pace.level > self.told.level:
                return pace
            self._slower = None
        return self.told

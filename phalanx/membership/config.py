"""Timings and limits of the membership layer, in one frozen dataclass.

Defaults are tuned for loopback/LAN training groups (see docs/membership.md for the
reasoning): a peer that stops heartbeating is declared failed after 0.6 s; a peer
accused by another peer (or whose Watch stream drops) is removed after 0.3 s unless
a fresh heartbeat refutes the accusation. The lead's project-wide config embeds this
object. This module must never read the environment or files itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from phalanx.errors import ConfigError

__all__ = ["INSECURE_SECRET", "MembershipConfig"]

#: the cluster secret of ``--insecure`` daemons and coordinators alike: public on
#: purpose (anyone may join); both sides sign with it, so the two flags pair up
INSECURE_SECRET = b"phalanx-insecure-mode-public-secret"


@dataclass(frozen=True)
class MembershipConfig:
    """All durations in seconds."""

    #: Agents send one heartbeat this often (the coordinator tells them the value).
    heartbeat_interval: float = 0.15
    #: No heartbeat for this long: the member has failed.
    heartbeat_timeout: float = 0.6
    #: A suspected member (peer report, lost Watch stream, replacement incarnation)
    #: is removed unless a heartbeat arrives within this window after the suspicion.
    confirm_window: float = 0.3
    #: After a coordinator (re)start, members of the adopted view get this long to
    #: re-register before they count as failed; joins wait until then.
    recovery_grace: float = 1.5
    #: A group that decided a commit within this window is "stepping": joiners wait
    #: for the next decision (the operation boundary) instead of being admitted now.
    step_window: float = 1.0
    #: A joiner is admitted at the latest this long after it asked, boundary or not.
    admit_deadline: float = 5.0
    #: A commit round with missing votes is decided "not committed" after this long.
    commit_timeout: float = 30.0
    #: Members plus joiners the coordinator accepts.
    max_members: int = 256
    #: Heartbeats per second the coordinator is sized for. A group whose members would
    #: send more at ``heartbeat_interval`` beats at 2x, 4x, ... that interval, with the
    #: heartbeat timeout and the confirm window scaled alike (``pacing.py``): with the
    #: defaults, up to 300 members beat every 0.15 s, 1,000 every 0.6 s.
    max_beat_rate: float = 2000.0
    #: A group that shrank keeps its slower pace this long (and at least ten of that
    #: pace's heartbeat timeouts) before its beats quicken: members evicted en masse
    #: are usually about to rejoin.
    quicken_after: float = 60.0
    #: Allowed clock difference for the replay window of signed requests.
    max_skew: float = 30.0
    #: Refuse joins whose advertised addresses the coordinator cannot TCP-connect to.
    probe_addresses: bool = True
    probe_timeout: float = 0.5
    #: How often the coordinator's detector wakes up.
    tick: float = 0.05
    #: Joins arriving within this long of the last admission are admitted together at
    #: the next tick (one view for a burst of joins, not one view per join); 0: each
    #: join is admitted on its own as soon as the admission rules allow.
    join_batch: float = 0.05
    #: Default deadline of one unary RPC made by an agent.
    rpc_timeout: float = 2.0

    def __post_init__(self) -> None:
        positive = (
            "heartbeat_interval",
            "heartbeat_timeout",
            "confirm_window",
            "admit_deadline",
            "commit_timeout",
            "max_skew",
            "probe_timeout",
            "tick",
            "rpc_timeout",
            "max_beat_rate",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"membership.{name} must be a positive number, got {value!r}")
        for name in ("recovery_grace", "step_window", "join_batch", "quicken_after"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"membership.{name} must be >= 0")
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ConfigError("membership.heartbeat_timeout must be >= 2 x heartbeat_interval")
        if self.confirm_window < self.heartbeat_interval:
            raise ConfigError("membership.confirm_window must be >= heartbeat_interval")
        if not isinstance(self.max_members, int) or not 1 <= self.max_members <= 65536:
            raise ConfigError("membership.max_members must be in 1..65536")

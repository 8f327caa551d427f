"""The heartbeat pace (membership/pacing.py) on its own and as GroupState applies it."""

from __future__ import annotations

import pytest

from phalanx.errors import ConfigError
from phalanx.membership._group import GroupState
from phalanx.membership.config import MembershipConfig
from phalanx.membership.pacing import Pace, Pacer, level_for
from phalanx.membership.view import Member, View

# capacity of level L: 40 beats/s x 0.05 s x 2**L = 2, 4, 8, 16 ... members
CFG = MembershipConfig(heartbeat_interval=0.05, heartbeat_timeout=0.2, confirm_window=0.1,
                       max_beat_rate=40.0, recovery_grace=0.0, probe_addresses=False,
                       join_batch=0.0)  # fmt: skip


def test_the_defaults_keep_a_thousand_members_within_the_beat_rate() -> None:
    cfg = MembershipConfig()
    assert level_for(300, cfg) == 0  # 2,000 beats/s at 0.15 s
    assert level_for(301, cfg) == 1
    for size in (100, 300, 1000, 3000, 10_000):
        pace = Pace.at(cfg, level_for(size, cfg))
        assert size / pace.interval <= cfg.max_beat_rate
        assert pace.timeout / pace.interval == cfg.heartbeat_timeout / cfg.heartbeat_interval
    assert Pace.at(cfg, level_for(1000, cfg)).interval == pytest.approx(0.6)


def test_the_pace_quickens_only_with_a_quarter_to_spare() -> None:
    assert level_for(5, CFG) == 2  # 5 > 4 members: level 2 (8)
    assert level_for(4, CFG, current=2) == 2  # 4 fits level 1 exactly: stays (no flapping)
    assert level_for(3, CFG, current=2) == 1  # 3 <= 0.75 x 4
    assert level_for(1, CFG, current=2) == 0
    assert level_for(9, CFG, current=0) == 3  # grows as far as it must at once


def test_the_pace_slows_at_once_and_quickens_only_after_a_while() -> None:
    p = Pacer(CFG)
    assert p.update(6, 10.0) and p.told.level == 2  # 0.2 s beats, 0.8 s timeout
    assert not p.update(1, 10.0)  # small now, but a mass eviction may be rejoining
    assert not p.update(1, 69.9)
    assert p.update(6, 70.0) is False and p.told.level == 2  # back: the wait restarts
    assert not p.update(1, 71.0) and not p.update(1, 130.9)
    assert p.update(1, 131.0) and p.told.level == 0  # 60 s small
    # members may still beat every 0.2 s: judged by the 0.8 s timeout until 131.8
    assert p.judging(131.5).timeout == pytest.approx(0.8)
    assert p.judging(131.81).timeout == pytest.approx(0.2)
    assert p.update(6, 132.0) and p.judging(132.0).level == 2  # slows at once


def test_a_group_beating_at_a_slow_pace_is_not_failed_for_it() -> None:
    g = GroupState(CFG, 0.0, recovering=False)
    names = [f"m{i}" for i in range(6)]
    for n in names:
        g.join(Member(n, ("127.0.0.1:1",), 1), View(0), None, 0.0)
    assert g.pace.level == 2
    # joiners past the first level enter at most one interval apart: the rest together
    assert len(g.view.ids) < 6
    g.tick(0.2)
    assert len(g.view.ids) == 6
    epoch = g.view.epoch
    # everyone beats every 0.2 s, four times the configured interval: nobody fails
    now = 0.2
    for _ in range(20):
        now += 0.2
        for n in names:
            g.heartbeat(n, 1, now)
        g.tick(now)
    assert g.view.epoch == epoch and len(g.view.ids) == 6
    # five leave; the last member keeps beating at 0.2 s until the pace quickens
    # (60 s later), and for a while after it: it is not failed for it
    for n in names[1:]:
        g.leave(n, 1, "done", now)
    left_at = now
    while g.pace.level != 0:
        now += 0.2
        g.heartbeat("m0", 1, now)
        g.tick(now)
        assert now - left_at < 61.0
    assert now - left_at >= 60.0
    for _ in range(3):
        now += 0.2
        g.heartbeat("m0", 1, now)
        g.tick(now)
    assert list(g.view.ids) == ["m0"]
    # once it beats at the new pace, a silence of 0.25 s fails it
    now += 0.25
    g.tick(now)
    assert not g.view.ids


def test_silence_is_still_detected_at_the_slow_pace() -> None:
    g = GroupState(CFG, 0.0, recovering=False)
    for i in range(6):
        g.join(Member(f"m{i}", ("127.0.0.1:1",), 1), View(0), None, 0.0)
    now = 0.0
    for _ in range(5):
        now += 0.2
        for i in range(5):  # m5 is silent
            g.heartbeat(f"m{i}", 1, now)
        g.tick(now)
    assert "m5" not in g.view.ids  # 1.0 s > the 0.8 s timeout of level 2


def test_max_beat_rate_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        MembershipConfig(max_beat_rate=0)


def test_the_coordinator_command_takes_a_beat_rate() -> None:
    import argparse

    from phalanx.membership import cli

    p = argparse.ArgumentParser()
    cli._add_arguments(p)
    cfg = cli._config(
        p.parse_args(["--listen", "127.0.0.1:0", "--insecure", "--max-beat-rate", "500"])
    )
    assert cfg.max_beat_rate == 500.0
    assert level_for(300, cfg) == 2  # 500/s x 0.15 s = 75 members a level-0 group
    assert (
        cli._config(p.parse_args(["--listen", "127.0.0.1:0", "--insecure"])).max_beat_rate
        == MembershipConfig().max_beat_rate
    )

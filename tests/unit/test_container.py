"""The pure parts of ``phalanx.container``: the training job's step check, the peer
supervisor's exit table and restart delays, and the environment it gives the daemon
(which the daemon's own config loader must accept)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from phalanx.config import load_config
from phalanx.container.peer import (
    ON_EXIT,
    Backoff,
    Exit,
    OnExit,
    classify,
    peer_env,
    restart_delay,
)
from phalanx.demo.model import EPOCH_MOD, check_slots, verdict

# views are numbered from the wall clock in milliseconds: epochs of this size are real
EPOCH = 1_796_438_642_579


def _reduced(epochs: list[int]) -> np.ndarray:
    """The sum over members of ``[loss, 1, e, e**2]`` as the all-reduce computes it."""
    out = np.zeros(4)
    for ep in epochs:
        out += np.array([0.5, 1.0, *check_slots(ep)])
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7, 64])
def test_same_epoch_passes_for_any_world_with_wall_clock_epochs(world: int) -> None:
    members = tuple(f"m{i}" for i in range(world))
    assert verdict(_reduced([EPOCH] * world), EPOCH, members, members) == ""


def test_raw_epoch_squares_would_not_be_exact() -> None:
    # why the slots carry the residue: the raw square of a wall-clock epoch rounds, and
    # with three members the check s2 * n == s1**2 fails although all agree
    raw = np.zeros(2)
    for _ in range(3):
        raw += np.array([float(EPOCH), float(EPOCH) ** 2])
    assert raw[1] * 3 != raw[0] * raw[0]
    assert check_slots(EPOCH)[0] == EPOCH % EPOCH_MOD


def test_mixed_epochs_and_wrong_members_are_refused() -> None:
    members = ("a", "b", "c")
    assert "different views" in verdict(
        _reduced([EPOCH, EPOCH, EPOCH + 1]), EPOCH, members, members
    )
    assert "different views" in verdict(_reduced([EPOCH, EPOCH]), EPOCH, members, members)
    assert "ran among 2" in verdict(_reduced([EPOCH] * 3), EPOCH, members, ("a", "b"))


def test_every_exit_of_every_child_has_an_action() -> None:
    assert set(ON_EXIT) == set(itertools.product(("daemon", "trainer"), Exit))
    assert all(ON_EXIT[("daemon", how)] is OnExit.STOP for how in Exit)
    # a finished job stops the peer; a crashed or killed training process is restarted
    assert ON_EXIT[("trainer", Exit.DONE)] is OnExit.STOP
    assert ON_EXIT[("trainer", Exit.FAILED)] is OnExit.RESTART
    assert ON_EXIT[("trainer", Exit.KILLED)] is OnExit.RESTART


def test_classify() -> None:
    assert classify(0) is Exit.DONE
    assert classify(3) is Exit.FAILED
    assert classify(-9) is Exit.KILLED


def test_restart_delay_doubles_up_to_the_maximum_and_resets_after_a_long_run() -> None:
    b = Backoff(initial=1.0, maximum=5.0, reset_after=60.0)
    d = 0.0
    seen = []
    for _ in range(5):
        d = restart_delay(d, 0.5, b)
        seen.append(d)
    assert seen == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert restart_delay(5.0, 61.0, b) == 1.0


def test_peer_env_fills_defaults_from_the_container_and_keeps_what_is_set() -> None:
    env = peer_env({"PHALANX_COORDINATOR": "coordinator:7000"}, "c0ffee123456", "172.18.0.5")
    assert env["PHALANX_ID"] == "c0ffee123456"
    assert env["PHALANX_INCARNATION"] == "0"
    assert env["PHALANX_LISTEN"] == "172.18.0.5:7100"
    assert env["PHALANX_METRICS_HOST"] == "0.0.0.0"
    assert env["PHALANX_METRICS_PORT"] == "9464"
    assert env["PHALANX_SOCKET"].endswith("c0ffee123456.sock")
    kept = peer_env(
        {"PHALANX_ID": "peer-0", "PHALANX_SOCKET": "/run/phalanx/d.sock"}, "h", "1.2.3.4"
    )
    assert kept["PHALANX_ID"] == "peer-0" and kept["PHALANX_SOCKET"] == "/run/phalanx/d.sock"


def test_the_daemon_accepts_the_peer_environment() -> None:
    # every variable the supervisor sets must be a daemon setting (the daemon refuses
    # unknown PHALANX_* names), with a value of the right type
    env = peer_env({"PHALANX_COORDINATOR": "coordinator:7000"}, "host1", "10.1.2.3")
    cfg = load_config(env={k: v for k, v in env.items() if k.startswith("PHALANX_")})
    assert (cfg.id, cfg.incarnation, cfg.listen) == ("host1", 0, "10.1.2.3:7100")
    assert (cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", 9464)

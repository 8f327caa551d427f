"""The pipelining unit of a crowded group (comm/options.py): every member on one host
and more members than its CPUs -> larger pieces; anything else -> ``piece_bytes``."""

from __future__ import annotations

import pytest

from phalanx.comm.options import CommOptions, crowded, largest_payload, pipelining_unit
from phalanx.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB


def test_one_host_with_more_members_than_cpus_is_crowded() -> None:
    assert crowded(["127.0.0.1"] * 4, 2)
    assert crowded(["10.0.0.5"] * 3, 2)


def test_as_many_members_as_cpus_is_not_crowded() -> None:
    assert not crowded(["127.0.0.1"] * 2, 2)
    assert not crowded(["127.0.0.1"], 1)


def test_members_on_several_hosts_are_never_crowded() -> None:
    # each host could run more ranks than it has CPUs, but the members could not
    # agree on one count: the unit must be the same on every rank
    assert not crowded(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"], 1)
    assert not crowded(["127.0.0.1", "localhost", "127.0.0.1"], 1)


def test_an_unknown_cpu_count_is_never_crowded() -> None:
    assert not crowded(["127.0.0.1"] * 8, None)


def test_a_crowded_group_takes_the_larger_unit() -> None:
    opts = CommOptions()
    assert pipelining_unit(opts, ["127.0.0.1"] * 4, 2) == 16 * MiB
    assert pipelining_unit(opts, ["127.0.0.1"] * 2, 2) == opts.piece_bytes == 4 * MiB
    assert pipelining_unit(opts, ["a", "b", "c", "d"], 2) == 4 * MiB


def test_the_crowded_unit_never_shrinks_pieces_and_zero_turns_it_off() -> None:
    hosts = ["127.0.0.1"] * 4
    assert pipelining_unit(CommOptions(piece_bytes=32 * MiB), hosts, 2) == 32 * MiB
    assert pipelining_unit(CommOptions(crowded_piece_bytes=0), hosts, 2) == 4 * MiB
    assert pipelining_unit(CommOptions(crowded_piece_bytes=8 * MiB), hosts, 2) == 8 * MiB


def test_the_crowded_unit_is_capped_by_what_one_frame_carries() -> None:
    opts = CommOptions(max_frame_bytes=1 * MiB, piece_bytes=64 * KiB, small_bytes=64 * KiB)
    unit = pipelining_unit(opts, ["127.0.0.1"] * 4, 2)
    assert unit == largest_payload(1 * MiB)
    assert 64 * KiB < unit < 1 * MiB


def test_a_crowded_unit_below_4_kib_is_refused() -> None:
    with pytest.raises(ConfigError, match="crowded_piece_bytes"):
        CommOptions(crowded_piece_bytes=1000)
    CommOptions(crowded_piece_bytes=0)
    CommOptions(crowded_piece_bytes=4 * KiB)

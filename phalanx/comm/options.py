"""Settings of the data plane, in one frozen dataclass.

Every time in here is in seconds and every size in bytes. The defaults are the
measured ones (docs/comm.md says how); the daemon's configuration (flags > env > file)
fills this object, and a :class:`~phalanx.comm.group.Group` takes it whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from phalanx.errors import ConfigError

__all__ = ["CommOptions", "crowded", "largest_payload", "pipelining_unit"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class CommOptions:
    #: parallel TCP connections per pair of ranks; an op's pieces are striped over them
    streams: int = 1
    #: an operation that makes no progress for this long probes the peers it waits
    #: on; a peer that does not answer within ``probe_s`` is declared failed
    timeout_s: float = 10.0
    probe_s: float = 0.5
    #: building a group: every link up (connect, handshake) within this time
    connect_timeout_s: float = 30.0
    #: one handshake (HELLO .. WELCOME) within this time
    handshake_timeout_s: float = 5.0
    #: SO_SNDBUF / SO_RCVBUF of every data-plane socket; 0 leaves them to the
    #: kernel's autotuning (measured at least as fast here, and it can grow the
    #: receive side past net.core.rmem_max, which caps explicit sizes)
    socket_buffer_bytes: int = 0
    #: pipelining unit: collectives move data in pieces of at most this many bytes.
    #: Every piece costs the engine thread a frame's Python on each side; 4 MiB
    #: measured 3-6 % faster than 1 MiB at 64 MiB (world 2 and 4) and no slower at
    #: 8-32 MiB on the 2-core machine (docs/comm.md, "Piece size")
    piece_bytes: int = 4 * MiB
    #: the pipelining unit of a *crowded* group instead, when larger than
    #: piece_bytes: every member on one host, more members than the host has CPUs
    #: (see :func:`crowded`). There no core is idle for a piece's receive, reduce and
    #: send to overlap on, so smaller pieces only add frames, wake-ups and switches
    #: between the ranks: 16 MiB ran a 64 MiB world-4 ring on 2 cores up to ~12 %
    #: faster than 4 MiB (docs/comm.md, "Piece size"). Capped, like every piece, by
    #: what one frame carries (``largest_payload(max_frame_bytes)``). Every rank must
    #: decide alike: where one address reaches several machines (a tunnel, a port
    #: forward), set 0 on every rank. 0: never
    crowded_piece_bytes: int = 16 * MiB
    #: all-reduces of at most this many bytes use recursive doubling (latency-bound);
    #: larger ones use the pipelined ring (bandwidth-bound); measured, see docs/comm.md
    small_bytes: int = 256 * KiB
    #: largest frame payload accepted from a peer; bigger length fields close the link
    max_frame_bytes: int = 64 * MiB
    #: frames of at least this many bytes that a plan sends from its own memory (the
    #: page-swapped ring's twin) go out zero-copy (vmsplice + splice, Linux; see
    #: comm/zerocopy.py), and the op then ends once the receivers confirmed reading
    #: them; 0 (the default) sends everything with sendmsg. Off: on the 2-core
    #: machine splicing gained 4-5 % at 64 MiB on one day (stop 27) and lost 8 % at
    #: world 2 and 20 % at world 4 on others (stop 36), its sends pushing many more,
    #: smaller TCP writes (docs/comm.md, "Zero-copy sends")
    zero_copy_min_bytes: int = 0
    #: a ring all-reduce of at least this many bytes, on an array in private
    #: anonymous memory, reduces into a twin buffer and hands the caller the result
    #: by exchanging pages (mremap) once it has succeeded, instead of saving the
    #: array for promise 2 (comm/pageswap.py; 10-20 % faster at 64 MiB here). 0
    #: turns it off -- needed when the arrays' pages are pinned for a device by
    #: physical address (cudaHostRegister of a numpy array, an RDMA memory region)
    page_swap_min_bytes: int = 4 * MiB

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= 64:
            raise ConfigError(f"streams must be in 1..64, got {self.streams}")
        for name in ("timeout_s", "probe_s", "connect_timeout_s", "handshake_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.socket_buffer_bytes and self.socket_buffer_bytes < 64 * KiB:
            raise ConfigError("socket_buffer_bytes must be 0 (kernel autotuning) or >= 64 KiB")
        # a frame carries one piece (or a whole small array), raw or encoded; int8 with
        # one-element blocks on 4-byte floats is the largest encoding in use (5 bytes
        # per 4): a piece that cannot travel in one frame breaks the group at its op
        if not 4 * KiB <= self.piece_bytes <= largest_payload(self.max_frame_bytes):
            raise ConfigError(
                "piece_bytes must be between 4 KiB and 4/5 of max_frame_bytes (its "
                f"largest encoding must fit one frame), got {self.piece_bytes}"
            )
        if self.crowded_piece_bytes and self.crowded_piece_bytes < 4 * KiB:
            raise ConfigError(
                f"crowded_piece_bytes must be 0 (off) or >= 4 KiB, got {self.crowded_piece_bytes}"
            )
        if not 0 <= self.small_bytes <= largest_payload(self.max_frame_bytes):
            raise ConfigError(
                "small_bytes must be between 0 and 4/5 of max_frame_bytes (a small "
                f"all-reduce or broadcast sends the whole array in one frame), got "
                f"{self.small_bytes}"
            )
        if self.page_swap_min_bytes < 0:
            raise ConfigError("page_swap_min_bytes must be >= 0 (0 turns page swap off)")
        if self.zero_copy_min_bytes < 0:
            raise ConfigError("zero_copy_min_bytes must be >= 0 (0 turns zero-copy off)")


def largest_payload(max_frame_bytes: int) -> int:
    """The most raw bytes whose every encoding fits a frame of ``max_frame_bytes``."""
    return (max_frame_bytes - 64) * 4 // 5


def crowded(hosts: Sequence[str], cpus: int | None) -> bool:
    """Whether a group whose members' addresses name ``hosts`` (one per member) is
    crowded: all of them name one host, and the members outnumber its ``cpus``
    (``None``: unknown, never crowded).

    Every member computes the same answer, as the pipelining unit it decides must be
    the same on every rank (it is in the op descriptor): the hosts come from the
    group's one address list, and members that all name one host share its CPU
    count. A group spread over several hosts is never crowded, however many ranks
    each one runs: its members could not agree on a count. An address that reaches
    several machines (a tunnel, a port forward) breaks the premise: the ranks' units
    may then differ, and every large op fails with a mismatch naming piece_bytes."""
    return cpus is not None and len(set(hosts)) == 1 and len(hosts) > cpus


def pipelining_unit(options: CommOptions, hosts: Sequence[str], cpus: int | None) -> int:
    """The ``piece_bytes`` a group of these members runs with (see :func:`crowded`)."""
    if crowded(hosts, cpus):
        fits = largest_payload(options.max_frame_bytes)
        return max(options.piece_bytes, min(options.crowded_piece_bytes, fits))
    return options.piece_bytes

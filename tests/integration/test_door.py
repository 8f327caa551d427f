"""The door (a member's data-plane listener shared by its epochs' groups) at rest."""

from __future__ import annotations

import os
import socket
import threading
import time

from phalanx.comm.frames import FrameKind, encode_header
from phalanx.membership._door import Door
from tests.integration._threads import wakeups


def test_an_idle_door_sleeps_and_close_wakes_it() -> None:
    # It polled every 50 ms (40 wake-ups in 2 s); now it sleeps until a connection,
    # a held connection's deadline or close(), with a 1 s backstop.
    door = Door("127.0.0.1:0")
    try:
        time.sleep(0.2)
        before = wakeups("phalanx-door")["phalanx-door"]
        time.sleep(2.0)
        assert wakeups("phalanx-door")["phalanx-door"] - before <= 6
    finally:
        t = time.monotonic()
        door.close()
        took = time.monotonic() - t
    assert not any(t.name == "phalanx-door" for t in threading.enumerate())
    assert took < 0.9, f"close() waited for the backstop ({took:.2f} s), not the wake"


def _thread_cpu_s(name: str) -> float:
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_connection_stalled_mid_header_costs_no_cpu_and_is_still_read() -> None:
    """Anyone can connect and send part of a header: the selector reported the unread
    bytes again at once, and the door thread spun a core until the hold deadline."""
    door = Door("127.0.0.1:0", hold_s=5.0, header_s=5.0)  # this test takes its time
    host, port = door.address.rsplit(":", 1)
    try:
        hello = encode_header(FrameKind.HELLO, epoch=(7 << 32) | 1, seq=0, chunk=0, length=0)
        with socket.create_connection((host, int(port))) as stalled:
            stalled.sendall(hello[:10])
            time.sleep(0.2)
            cpu0 = _thread_cpu_s("phalanx-door")
            time.sleep(1.0)
            burnt = _thread_cpu_s("phalanx-door") - cpu0
            assert burnt < 0.3, f"the door thread spun: {burnt:.2f} s of CPU in 1 s"
            stalled.sendall(hello[10:])  # the rest: an epoch not open yet is held
            deadline = time.monotonic() + 3.0
            while not door._held and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(door._held) == 1
    finally:
        door.close()


def _hello(epoch: int) -> bytes:
    return encode_header(FrameKind.HELLO, epoch=epoch, seq=0, chunk=0, length=0)


def test_a_stranger_reopening_idle_sockets_from_one_address_does_not_block_a_peer() -> None:
    """Before any proof of the secret the door held up to 256 connections, each up to
    hold_s (5 s): one stranger that kept 256 idle sockets open (from one address)
    had every real peer's connection closed. A source address gets 32 waiting
    connections at most, and a connection must bring its header within 2 s."""
    door = Door("127.0.0.1:0", hold_s=5.0)
    host, port = door.address.rsplit(":", 1)
    epoch = (9 << 32) | 3
    es = door.listener(epoch)
    es.sock.settimeout(3.0)
    stranger: list[socket.socket] = []
    try:
        for _ in range(300):  # all from 127.0.0.2 (loopback too, another address)
            s = socket.socket()
            s.settimeout(2.0)
            s.bind(("127.0.0.2", 0))
            try:
                s.connect((host, int(port)))
            except OSError:
                s.close()
                continue
            stranger.append(s)
        assert len(stranger) >= 256
        with socket.create_connection((host, int(port)), timeout=2.0) as peer:
            peer.sendall(_hello(epoch))
            conn, _ = es.sock.accept()  # was: closed by the door (too-many-pending)
            try:
                assert conn.recv(48, socket.MSG_PEEK) == _hello(epoch)  # nothing consumed
            finally:
                conn.close()
    finally:
        for s in stranger:
            s.close()
        door.close()


def test_a_connection_that_sends_no_header_is_closed_well_before_hold_s() -> None:
    door = Door("127.0.0.1:0", hold_s=5.0)
    host, port = door.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2.0) as idle:
            idle.settimeout(4.5)  # header_s is 2 s; hold_s (5 s) would time this out
            assert idle.recv(1) == b""  # closed by the door (it held it 5 s)
    finally:
        door.close()


def test_links_held_for_a_group_not_built_yet_do_not_use_up_their_sources_quota() -> None:
    """Review, stop 31: the 32-per-source quota also counted connections held for a
    group this member had not built yet. A full mesh of peers behind one address (a
    NAT, many members on one host) holds one link each per stream while the group here
    is not up: the 33rd was dropped and the build failed, again and again."""
    door = Door("127.0.0.1:0", hold_s=10.0)
    host, port = door.address.rsplit(":", 1)
    epoch = (9 << 32) | 5
    held: list[socket.socket] = []
    try:
        for _ in range(40):
            s = socket.create_connection((host, int(port)), timeout=2.0)
            s.sendall(_hello(epoch))
            held.append(s)
            time.sleep(0.02)  # read and held before the next one
        es = door.listener(epoch)  # the group is built now: every held link is handed over
        es.sock.settimeout(3.0)
        got = []
        for _ in range(40):
            conn, _ = es.sock.accept()
            got.append(conn)
        assert len(got) == 40
        for c in got:
            c.close()
    finally:
        for s in held:
            s.close()
        door.close()

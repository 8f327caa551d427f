"""The stress harness's bridge: namespaces keep reaching the bridge's address when
other peers' namespaces come and go."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from phalanx.testing import netns
from phalanx.testing.netns import Bridge, _in_netns

pytestmark = pytest.mark.skipif(netns.unavailable() is not None,
                                reason=str(netns.unavailable()))  # fmt: skip


def _connect(ns: str, addr: tuple[str, int]) -> None:
    def go() -> None:
        with socket.create_connection(addr, timeout=2.0):
            pass

    _in_netns(ns, go)


def test_a_namespace_reaches_the_bridge_after_the_lowest_addressed_port_leaves() -> None:
    """Linux gives a bridge without an address of its own the lowest MAC of its ports
    and changes it when that port is deleted; a namespace that cached the old one in
    its ARP table then cannot connect to the bridge's address for 15-45 s (what the
    30-minute soaks saw as the coordinator going silent after a restart)."""
    tag = str(os.getpid() % 100000)
    bridge = Bridge(f"pxt{tag}", f"10.{150 + os.getpid() % 50}.{os.getpid() % 250}", tag,
                    ns_prefix=f"pxt{tag}")  # fmt: skip
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        a, b = f"pxt{tag}a", f"pxt{tag}b"
        bridge.add(a, 2)
        b_port = bridge.add(b, 3)
        # b's port gets the lowest address there is, so a bridge that follows its
        # ports would take it
        subprocess.run(["ip", "link", "set", b_port, "address", "02:00:00:00:00:01"],
                       check=True, capture_output=True, timeout=10)  # fmt: skip
        server.bind((bridge.host, 0))
        server.listen(8)
        addr = (bridge.host, server.getsockname()[1])
        mac = Path(f"/sys/class/net/{bridge.name}/address").read_text().strip()
        _connect(a, addr)  # a now holds the bridge's address in its ARP cache
        bridge.remove(b)
        deadline = time.monotonic() + 10.0  # the kernel deletes a namespace's links later
        while Path(f"/sys/class/net/{b_port}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/sys/class/net/{b_port}").exists()
        assert Path(f"/sys/class/net/{bridge.name}/address").read_text().strip() == mac
        _connect(a, addr)  # times out (2 s) when the bridge's address moved
    finally:
        server.close()
        bridge.close()

"""The client's connection to its daemon, against a bare Unix socket: what it writes."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from phalanx.local import protocol
from phalanx.local.conn import Connection


def test_request_ids_reach_the_daemon_in_the_order_they_were_taken(tmp_path: Path) -> None:
    """Two threads send at once. The daemon answers a CANCEL of a request id it has
    passed with "finished", so ids must arrive in order: one taken first and sent
    second (the sender paused between the two) used to arrive after a higher one."""
    path = str(tmp_path / "d.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    conn = Connection(path, timeout=5.0)
    peer, _ = server.accept()
    try:
        first = threading.Thread(
            target=lambda: conn.send(protocol.Unmap(1), before=lambda rid: time.sleep(0.3))
        )
        first.start()
        time.sleep(0.1)  # the first thread holds its id and pauses before sending
        conn.send(protocol.Unmap(2))
        first.join(5.0)
        decoder = protocol.Decoder()
        frames: list[protocol.WireFrame] = []
        peer.settimeout(5.0)
        while len(frames) < 2:
            frames += decoder.feed(peer.recv(4096))
        assert [f.rid for f in frames] == sorted(f.rid for f in frames)
        assert [getattr(f.message, "region", None) for f in frames] == [1, 2]
    finally:
        conn.close()
        peer.close()
        server.close()

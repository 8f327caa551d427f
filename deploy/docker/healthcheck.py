#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 if this container's phalanx process answers.

    phalanx-healthcheck                  # a peer: the daemon's /healthz (200 = healthy)
    phalanx-healthcheck --tcp HOST:PORT  # the coordinator: its gRPC port accepts

The daemon's /healthz answers 503 with a reason while a collective hangs; the port
is $PHALANX_METRICS_PORT (default 9464). Standard library only, no phalanx import:
it runs every few seconds and must stay cheap. It must never wait more than 4 s.
"""

import os
import socket
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tcp"] and len(argv) == 2:
        host, _, port = argv[1].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
        except OSError as exc:
            print(f"unhealthy: {argv[1]}: {exc}")
            return 1
        return 0
    url = f"http://127.0.0.1:{os.environ.get('PHALANX_METRICS_PORT', '9464')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.code} {exc.read(200).decode(errors='replace')}")
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

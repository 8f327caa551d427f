"""phalanx.local: the local API between a training process (client) and its daemon.

Control goes over a Unix socket in small length-prefixed frames (:mod:`.wire`, pure);
tensor data lives in memfd shared memory (:mod:`.shm`) that both processes map, so
the daemon runs collectives on the client's pages. Daemon side: :mod:`.server`
(socket, threads) and :mod:`.service` (requests -> hosted group calls); client side:
:mod:`.conn`; typed errors cross with :mod:`.errcodec`. Users import
:mod:`phalanx.client` instead; nothing here is public API.
"""

__all__: list[str] = []

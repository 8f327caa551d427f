"""Running phalanx as containers: a training job and a peer supervisor.

* :mod:`~phalanx.container.train` — ``phalanx train``: a small, real, long-running
  data-parallel job (the demo's MLP in numpy) through the local daemon: commits steps,
  snapshots every N steps, restores its snapshot when it restarts, founds the group's
  state when nobody holds one and receives it otherwise. It reports JSON lines.
* :mod:`~phalanx.container.peer` — ``phalanx peer``: one container = one peer: a
  ``phalanx daemon`` and a training process side by side (Unix socket + shared
  memory), ids and addresses derived from the container's hostname, the training
  process restarted when it dies (the daemon keeps its snapshots), everything stopped
  in order on SIGTERM.

``deploy/docker`` builds the image, ``deploy/docker-compose.yml`` and ``deploy/k8s/``
run it (docs/deploy.md). Nothing in the library imports this package.
"""

"""Load a script of deploy/docker/ (not a package) as a module, for its pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DOCKER_DIR = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def load(script: str) -> ModuleType:
    """``deploy/docker/<script>.py`` as module ``phalanx_deploy_<script>``."""
    spec = importlib.util.spec_from_file_location(
        f"phalanx_deploy_{script}", DOCKER_DIR / f"{script}.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod

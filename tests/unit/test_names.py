"""One name, one class: no two public classes of the package share a name (issue 15:
Handle, StepInfo, SnapshotHandle and Manifest each named two)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import phalanx


def test_no_two_public_classes_share_a_name() -> None:
    owners: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages(phalanx.__path__, "phalanx."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue  # private modules (generated protobuf code, harness internals)
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if inspect.isclass(obj):
                owners.setdefault(name, set()).add(f"{obj.__module__}.{obj.__qualname__}")
    clashes = {name: sorted(where) for name, where in owners.items() if len(where) > 1}
    assert not clashes, clashes
    for name in ("Handle", "StepInfo", "OpResult", "ViewInfo"):
        assert owners[name] == {f"phalanx.ops.{name}"}

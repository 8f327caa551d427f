"""Regenerate the Python code for proto/phalanx/v1/*.proto. The ONE command:

    .venv/bin/python scripts/gen_proto.py            # from anywhere; writes into the repo

What it does: runs grpc_tools.protoc (the protoc bundled with grpcio-tools, so the
output depends only on that package's version) with the include path remapped

    -I phalanx/membership/_proto=proto/phalanx/v1

so protoc sees each file as ``phalanx/membership/_proto/<name>.proto``. The generated
modules therefore land in the real package ``phalanx.membership._proto`` and the gRPC
module imports its message module as ``from phalanx.membership._proto import ...``:
no sys.path tricks and no regex rewriting. The protobuf *package* stays ``phalanx.v1``,
so wire names (``/phalanx.v1.Coordinator/Join``) do not depend on where Python code
lives. Outputs: ``<name>_pb2.py``, ``<name>_pb2.pyi`` (types for mypy),
``<name>_pb2_grpc.py`` and an ``__init__.py`` that says how they were made.

``--out-root DIR`` writes under DIR instead of the repo root (the freshness test uses
it). Never edit the generated files by hand. This script must never touch anything
outside the output package directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto" / "phalanx" / "v1"
PACKAGE_PATH = Path("phalanx") / "membership" / "_proto"

INIT_TEXT = '''"""Generated from proto/phalanx/v1/ by `python scripts/gen_proto.py`.

Generator: grpcio-tools {version}.

DO NOT EDIT. Only phalanx.membership imports these modules.
"""
'''


def generate(out_root: Path) -> list[Path]:
    """Generate every .proto under proto/phalanx/v1 into out_root/phalanx/membership/_proto."""
    import grpc_tools
    from grpc_tools import protoc

    version = _tools_version()
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    out_pkg = out_root / PACKAGE_PATH
    out_pkg.mkdir(parents=True, exist_ok=True)
    for stale in list(out_pkg.glob("*_pb2*.py")) + list(out_pkg.glob("*_pb2.pyi")):
        stale.unlink()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    virtual = [f"{PACKAGE_PATH.as_posix()}/{p.name}" for p in protos]
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_PATH.as_posix()}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *virtual,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")
    (out_pkg / "__init__.py").write_text(INIT_TEXT.format(version=version))
    return sorted(p for p in out_pkg.iterdir() if p.is_file())


def _tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", type=Path, default=REPO, help="root to write under")
    ns = parser.parse_args(argv)
    for path in generate(ns.out_root.resolve()):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

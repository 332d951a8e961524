"""Regenerate trio_bridge/proto from proto/unified_bridge.proto and proto/etcd/*.proto (the subset of
etcd v3's API the etcd store uses) with betterproto2, and the descriptor set that server reflection
describes the service with (``trio_bridge/proto/unified_bridge.binpb``, read by ``_reflection``).

Build time only: needs the ``codegen`` extra (grpcio-tools' protoc and betterproto2-compiler).
Run it through ``nox -s protos``. ``tests/test_codegen.py`` calls :func:`generate` into a temporary
folder and fails when the committed code differs, so the two never drift apart.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_OUT = PROTO_DIR.parent / "trio_bridge" / "proto"
SOURCES = ["unified_bridge.proto", "etcd/kv.proto", "etcd/rpc.proto"]
# Well-known types the value encoding packs into google.protobuf.Any; unified_bridge.proto itself does
# not import them, so they are named here to have betterproto2 generate them.
WELL_KNOWN = ["google/protobuf/wrappers.proto"]
PLUGIN_OPTIONS = "client_generation=async,server_generation=async"
# A serialized google.protobuf.FileDescriptorSet: unified_bridge.proto, every file it imports, and the
# well-known types values are packed as, so that reflection clients resolve every message without the
# .proto (betterproto2's classes carry no protobuf descriptors). etcd's files are not served: left out.
DESCRIPTOR_SET = "unified_bridge.binpb"
DESCRIBED = ["unified_bridge.proto", *WELL_KNOWN]


def _plugin_path() -> str:
    name = "protoc-gen-python_betterproto2"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the 'codegen' extra (pip install -e .[codegen])")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Write the generated package into ``out_dir`` (created if missing); return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    plugin = _plugin_path()
    well_known_include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known_include}",
        f"--plugin=protoc-gen-python_betterproto2={plugin}",
        f"--python_betterproto2_out={PLUGIN_OPTIONS}:{out_dir}",
        *SOURCES,
        *WELL_KNOWN,
    ]
    # The plugin formats its output with the `ruff` found on PATH, configured by the pyproject.toml of
    # the working directory: make both ours, so the output is the same from wherever this runs.
    old_path, old_cwd = os.environ.get("PATH", ""), Path.cwd()
    os.environ["PATH"] = os.pathsep.join([str(Path(plugin).parent), old_path])
    os.chdir(PROTO_DIR.parent)
    try:
        status = protoc.main(args)
    finally:
        os.environ["PATH"] = old_path
        os.chdir(old_cwd)
    if status == 0:
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"-I{well_known_include}",
                f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
                "--include_imports",
                *DESCRIBED,
            ]
        )
    if status != 0:
        raise SystemExit("protoc failed: see the messages above")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "proto"
        generate(staged)
        if PACKAGE_OUT.exists():
            shutil.rmtree(PACKAGE_OUT)
        shutil.copytree(staged, PACKAGE_OUT)
    print(f"generated {PACKAGE_OUT.relative_to(PROTO_DIR.parent)}")


if __name__ == "__main__":
    main()

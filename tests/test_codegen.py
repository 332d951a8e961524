"""The committed generated code, and the descriptor set that server reflection serves, must be exactly
what proto/unified_bridge.proto generates today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "trio_bridge" / "proto"
#: The serialized FileDescriptorSet that server reflection describes the service with (``_reflection``).
DESCRIPTOR_SET = "unified_bridge.binpb"


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_current(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh = tmp_path / "proto"
    generator.generate(fresh)  # type: ignore[attr-defined]
    committed, regenerated = _tree(COMMITTED), _tree(fresh)
    assert DESCRIPTOR_SET in regenerated, "generate.py no longer writes the descriptor set reflection serves"
    assert sorted(committed) == sorted(regenerated), "generated files differ: run `nox -s protos`"
    assert committed[DESCRIPTOR_SET] == regenerated[DESCRIPTOR_SET], (
        f"stale {DESCRIPTOR_SET}: reflection would describe an older .proto; run `nox -s protos` and commit it"
    )
    stale = [name for name in committed if committed[name] != regenerated[name]]
    assert not stale, f"stale generated code in {stale}: run `nox -s protos` and commit the result"


def test_descriptor_set_holds_the_service_and_what_it_needs() -> None:
    """The service's file, the files it imports and the well-known types values are packed as: each
    file whole (so a client resolves every message without the .proto), and nothing of etcd's."""
    files = descriptor_pb2.FileDescriptorSet.FromString((COMMITTED / DESCRIPTOR_SET).read_bytes()).file
    assert sorted(f.name for f in files) == [
        "google/protobuf/any.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
        "unified_bridge.proto",
    ]
    (bridge,) = (f for f in files if f.name == "unified_bridge.proto")
    assert [s.name for s in bridge.service] == ["UnifiedBridge"]
    assert list(bridge.dependency) == ["google/protobuf/any.proto", "google/protobuf/timestamp.proto"]

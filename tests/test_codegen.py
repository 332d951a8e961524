"""The committed generated code must be exactly what proto/unified_bridge.proto generates today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "trio_bridge" / "proto"


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
    assert sorted(committed) == sorted(regenerated), "generated files differ: run `nox -s protos`"
    stale = [name for name in committed if committed[name] != regenerated[name]]
    assert not stale, f"stale generated code in {stale}: run `nox -s protos` and commit the result"

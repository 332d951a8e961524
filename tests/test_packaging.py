"""What the package imports at run time is installed by `pip install trio-bridge`, not only by the test extras."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _runtime_closure(distribution: str) -> set[str]:
    """The distribution and everything its (extra-free) requirements pull in, transitively."""
    seen: set[str] = set()
    pending = [(distribution, frozenset[str]())]
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if key in seen and not extras:
            continue
        seen.add(key)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in (*extras, "")):
                continue
            pending.append((requirement.name, frozenset(requirement.extras)))
    return seen


def _modules_after(imports: str) -> set[str]:
    listing = subprocess.run(
        [sys.executable, "-c", f"import sys{imports}; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {name.split(".")[0] for name in listing}


def test_runtime_imports_are_declared_dependencies() -> None:
    # What the interpreter loads by itself (site hooks of the environment) is not ours.
    ours = _modules_after(", trio_bridge._cli") - _modules_after("")
    top_level = ours - set(sys.stdlib_module_names)
    declared = _runtime_closure("trio-bridge")
    owners = importlib.metadata.packages_distributions()
    undeclared = {
        module: owners[module]
        for module in top_level
        if module in owners and not {canonicalize_name(d) for d in owners[module]} & declared
    }
    assert not undeclared, f"imported at run time but not a dependency of trio-bridge: {undeclared}"


#: The pure core (paths under trio_bridge/): the in-memory store and what it is built on.
PURE_MODULES = {
    "_observers",
    "_types",
    "_errors",
    "_limits",
    "storage/__init__",
    "storage/records",
    "storage/cache",
    "storage/checks",
    "storage/interface",
    "storage/memory",
    "storage/location",
}


def _module_path(importer: str, level: int, module: str | None) -> str:
    """The PURE_MODULES-style name of what a relative import in ``importer`` names."""
    parts = importer.split("/")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    target = "/".join([*parts, *(module or "__init__").split(".")])
    return target


def _runtime_nodes(tree: Any) -> Iterator[Any]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for type checkers only)."""
    import ast

    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def test_store_and_observers_import_no_grpc() -> None:
    """The core is pure Trio: it imports only the standard library, trio, re2 (linear-time regular
    expressions for ``pattern``) and other pure modules; and numpy (the optional extra) inside the
    functions that a caller's arrays reach, never on import."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "trio_bridge"
    for name in sorted(PURE_MODULES):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must be another pure module
                    target = _module_path(name, node.level, node.module)
                    assert target in PURE_MODULES, f"{name} imports {target}"
                    continue
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                if root == "numpy":
                    assert node not in tree.body, f"{name} imports numpy on import"
                    continue
                assert root in sys.stdlib_module_names or root in ("trio", "re2"), f"{name} imports {root}"

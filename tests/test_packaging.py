"""What the package imports at run time is installed by `pip install trio-bridge`, not only by the test extras."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

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

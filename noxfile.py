"""Developer entry points: ``nox -s tests``, ``nox -s serve``, ``nox -s protos``, ``nox -s bench``,
``nox -s stress``, ``nox -s screenshot``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    """Lint, type-check and run the test suite (what CI runs)."""
    session.install("-e", ".[test,lint]")
    # What a newcomer's `pip install .` needs, as wheels: tests/test_install.py follows the README's
    # first commands in a fresh virtualenv, offline (tests use no network beyond loopback).
    wheelhouse = Path(session.create_tmp()).resolve() / "wheelhouse"
    session.run(
        "python",
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--wheel-dir",
        str(wheelhouse),
        ".[numpy]",
        "setuptools>=69",
        "wheel",
    )
    session.env["TRIO_BRIDGE_WHEELHOUSE"] = str(wheelhouse)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "trio_bridge")
    session.run("pytest", *session.posargs)


@nox.session(reuse_venv=True)
def serve(session: nox.Session) -> None:
    """Run the server; extra arguments go to `trio-bridge serve` (e.g. `nox -s serve -- --port 6000`).
    Its virtualenv is kept, and installed into again only when pyproject.toml changes: it starts in
    about two seconds."""
    install_once(session, "-e", ".")
    session.run("trio-bridge", "serve", *session.posargs)


def install_once(session: nox.Session, *args: str) -> None:
    """``session.install(*args)``, skipped when this virtualenv already holds exactly that (the same
    arguments, the same pyproject.toml: an editable install follows the code by itself)."""
    location = getattr(session.virtualenv, "location", None)
    wanted = hashlib.sha256(Path("pyproject.toml").read_bytes() + "\0".join(args).encode()).hexdigest()
    stamp = Path(location) / ".trio-bridge-installed" if location else None
    if stamp is not None and stamp.exists() and stamp.read_text() == wanted:
        session.log("trio-bridge is installed already (pyproject.toml unchanged)")
        return
    session.install(*args)
    if stamp is not None:
        stamp.write_text(wanted)


@nox.session
def screenshot(session: nox.Session) -> None:
    """The README's picture of the web view (docs/web-view.png), taken from the real page in the
    system's headless Chromium (Debian: `apt-get install chromium chromium-driver`)."""
    session.install("-e", ".[browser,numpy]")
    session.run("python", "-m", "tests.screenshot", "docs/web-view.png", *session.posargs)


@nox.session
def protos(session: nox.Session) -> None:
    """Regenerate trio_bridge/proto from proto/unified_bridge.proto."""
    session.install("-e", ".[codegen]")
    session.run("python", "proto/generate.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (never part of `tests`): `nox -s bench -- --quick`, `-- --json figures.json`."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "bench.run", *session.posargs)


@nox.session
def stress(session: nox.Session) -> None:
    """The heavy forms of the hardening tests (never part of `tests`): hostile input, 10,000 streams of
    churn, 100,000 updates under faults, SIGTERM under load, HTTP/2 abuse, etcd's leader killed and
    every etcd member and server restarted, replicas. Each prints its counts."""
    session.install("-e", ".[test]")
    session.env["TRIO_BRIDGE_STRESS"] = "1"
    files = [
        "tests/test_hostile.py",
        "tests/test_churn.py",
        "tests/test_shutdown_load.py",
        "tests/test_abuse_process.py",
        "tests/test_etcd_faults.py",
        "tests/test_replicas.py",
    ]
    session.run("pytest", "-q", "-s", *files, *session.posargs)

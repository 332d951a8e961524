"""Every code block of the README and of docs/ runs as written in a test: each has an example marker
naming it, and a test that runs it names it (docs/protocol.md's own list is in test_protocol_docs)."""

from __future__ import annotations

import inspect
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests import test_install, test_readme, test_security
from tests.doc_blocks import DOCS, README, ROOT, blocks, commands


async def test_the_profile_commands_run_as_written(tmp_path: Path) -> None:
    """performance.md's "profile" commands, with fewer calls (and the profile written to tmp_path):
    each measures the server's CPU per update and prints py-spy's top functions."""
    for command in commands(DOCS / "performance.md", "profile"):
        arguments = shlex.split(command)
        assert arguments[:3] == [".nox/tests/bin/python", "-m", "bench.write_load"]
        calls = arguments.index("--calls") + 1
        arguments[calls] = "200"
        profile = arguments.index("--profile") + 1
        arguments[profile] = str(tmp_path / Path(arguments[profile]).name)
        result = await trio.run_process(
            [sys.executable, *arguments[1:]], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
        output = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert "server CPU" in output and "self%  total%  function" in output, output


async def test_the_fan_out_profile_commands_run_as_written(tmp_path: Path) -> None:
    """performance.md's "profile-fan-out" commands, smaller (10 watchers, a quick run; the profiles
    written to tmp_path): each prints its figures and py-spy's top functions."""
    for command in commands(DOCS / "performance.md", "profile-fan-out"):
        arguments = shlex.split(command)
        assert arguments[:2] == [".nox/tests/bin/python", "-m"]
        assert arguments[2] in ("bench.run", "bench.fan_out_engine")
        arguments[arguments.index("--watchers") + 1] = "10"
        if arguments[2] == "bench.run":
            arguments.append("--quick")
        else:
            arguments[arguments.index("--writes") + 1] = "20"
        profile = arguments.index("--profile") + 1
        arguments[profile] = str(tmp_path / Path(arguments[profile]).name)
        result = await trio.run_process(
            [sys.executable, *arguments[1:]], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
        output = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert "self%  total%  function" in output, output
        assert (
            "server_cpu_ms_per_write" if arguments[2] == "bench.run" else "µs of CPU per delivery"
        ) in output


#: Which test runs each example, per file (the test's source names the example).
RUN_BY: dict[str, dict[str, Callable[..., object]]] = {
    "README.md": {
        "install": test_install.test_the_readmes_first_commands_in_a_fresh_virtualenv,
        "two-commands": test_readme.test_the_two_commands_are_what_ci_runs,
        "client": test_readme.test_client_examples_run_as_written,
        "sync": test_readme.test_client_examples_run_as_written,
        "numpy": test_readme.test_numpy_example_runs_as_written,
        "cli": test_readme.test_command_line_example_runs_as_written,
        "tls-cli": test_readme.test_tls_command_line_example_runs_as_written,
        "tls": test_security.test_the_readme_tls_example_runs_as_written,
    },
    "watch.md": {
        "quickstart": test_readme.test_quickstart_runs_as_written,
        "watch": test_readme.test_watch_example_runs_as_written,
    },
    "several-servers.md": {"several-servers": test_readme.test_several_servers_run_as_written},
    "security.md": {"token-file": test_readme.test_the_token_file_example_is_a_token_file},
    "performance.md": {
        "profile": test_the_profile_commands_run_as_written,
        "profile-fan-out": test_the_fan_out_profile_commands_run_as_written,
    },
}
FILES = [README, *sorted(path for path in DOCS.glob("*.md") if path.name != "protocol.md")]


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_every_block_is_an_example_a_test_runs(path: Path) -> None:
    found = blocks(path)
    for block in found:
        assert block.name or block.output_of, (
            f"{path.name}: a ```{block.language} block with no example marker:\n{block.text}"
        )
    names = [block.name for block in found if block.name]
    expected = RUN_BY.get(path.name, {})
    assert sorted(names) == sorted(expected), f"{path.name}: each example once, each run by a test"
    for name, test in expected.items():
        assert f'"{name}"' in inspect.getsource(test), f"{test.__name__} does not run {name!r}"


def test_the_readme_is_short_and_says_where_the_state_lives() -> None:
    # Issue #12: it was 35 KB, a third of it benchmark and GC notes, and never said that the state is
    # in one process's memory while its health section suggested a load balancer.
    text = README.read_text()
    assert len(text.encode()) <= 15_000
    assert "every session lives in the memory of one server process" in text
    assert "do not put several behind a load balancer" in text

"""The README's client example runs as written (only the port differs) against a real server."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import trio

from trio_bridge import RunningServer

README = Path(__file__).resolve().parent.parent / "README.md"


def _example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README has no example {name!r}"
    return match.group(1)


async def test_quickstart_runs_as_written(server: RunningServer) -> None:
    code = _example("quickstart")
    assert 'HOST, PORT = "127.0.0.1", 50051' in code
    code = code.replace("50051", str(server.port))
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "temperature = 22.0 (version 2)\n"


async def test_watch_example_runs_as_written(server: RunningServer) -> None:
    code = _example("watch").replace("50051", str(server.port))
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == (
        "initial_value temperature=21.5 v1\nsynced\nvalue_change temperature=22.0 v2\n"
        "value_change temperature=23.0 v3\n"
    )
    assert "initial_value temperature=21.5 v1" in README.read_text()


async def test_client_example_runs_as_written(server: RunningServer) -> None:
    code = _example("client").replace("50051", str(server.port))
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    shown = (
        README.read_text().split("<!-- example: client -->", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    )
    assert result.stdout.decode() == shown


async def test_command_line_example_runs_as_written(server: RunningServer) -> None:
    block = README.read_text().split("<!-- example: cli -->\n```console\n", 1)[1].split("```", 1)[0]
    steps = [step.split("\n", 1) for step in block.split("$ ")[1:]]
    assert len(steps) == 7
    for command, expected in steps:
        arguments = shlex.split(command)
        assert arguments[0] == "trio-bridge"
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bridge", *arguments[1:], "--port", str(server.port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert (result.stdout + result.stderr).decode() == expected, command

"""The command line against a real server: typed values in and out, errors as one line, and a watch
that prints a change made by `var set`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import trio

from trio_bridge import Constraints, RunningServer, VariableType


async def cli(server: RunningServer, *args: str, expect: int = 0) -> str:
    command, *rest = args
    result = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", command, *rest[:1], "--port", str(server.port), *rest[1:]],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == expect, result.stderr.decode()
    if expect:
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trio-bridge: "), lines
        assert b"Traceback" not in result.stderr
        return lines[0]
    return result.stdout.decode()


async def test_sessions_and_typed_variables(server: RunningServer) -> None:
    assert await cli(server, "session", "create", "--id", "lab", "--meta", "owner=me") == "lab\n"
    cases = [
        (
            ["temperature", "float", "21.5", "--min", "-40", "--max", "60"],
            "temperature = 21.5 (float, version 1)",
        ),
        (["count", "integer", "3"], "count = 3 (integer, version 1)"),
        (["label", "string", "hello world"], "label = hello world (string, version 1)"),
        (["on", "boolean", "yes"], "on = true (boolean, version 1)"),
        (["mode", "choice", "low", "--allowed", "low,high"], "mode = low (choice, version 1)"),
        (
            ["program", "module", "Predict", "--allowed", "Predict,React"],
            "program = Predict (module, version 1)",
        ),
        (["vec", "embedding", "0.5,1,2", "--dimension", "3"], "vec = [0.5, 1.0, 2.0] (embedding, version 1)"),
        (
            ["grid", "tensor", '{"shape": [2, 1], "dtype": "int16", "data": [-1, 7]}'],
            'grid = {"shape": [2, 1], "dtype": "int16", "data": [-1, 7]} (tensor, version 1)',
        ),
    ]
    for arguments, shown in cases:
        assert await cli(server, "var", "register", "lab", *arguments) == shown + "\n"
    assert (
        await cli(server, "var", "set", "lab", "temperature", "22")
        == "temperature = 22.0 (float, version 2)\n"
    )
    assert (
        await cli(server, "var", "set", "lab", "vec", "[1, 2, 3]")
        == "vec = [1.0, 2.0, 3.0] (embedding, version 2)\n"
    )
    got = json.loads(await cli(server, "var", "get", "lab", "grid", "--json"))
    assert (got["type"], got["value"], got["version"]) == (
        "tensor",
        {"shape": [2, 1], "dtype": "int16", "data": [-1, 7]},
        1,
    )
    # JSON Lines, as --help says: one object per line (issue #12: it was one array)
    listed = [json.loads(line) for line in (await cli(server, "var", "list", "lab", "--json")).splitlines()]
    assert [v["name"] for v in listed] == [name for (name, *_), _ in cases]
    assert await cli(server, "var", "delete", "lab", "count") == "deleted count\n"
    sessions = [json.loads(line) for line in (await cli(server, "session", "list", "--json")).splitlines()]
    assert [(s["session_id"], s["variables"], s["metadata"]) for s in sessions] == [
        ("lab", 7, {"owner": "me"})
    ]
    assert await cli(server, "session", "delete", "lab") == "deleted lab (7 variable(s))\n"


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["var", "get", "nope", "x"], 1, "trio-bridge: NOT_FOUND: session 'nope' not found"),
        (
            ["var", "set", "lab", "temperature", "99"],
            1,
            "trio-bridge: INVALID_ARGUMENT: variable 'temperature' (float): value 99.0 is above maximum 60.0",
        ),
        (
            ["var", "set", "lab", "temperature", "warm"],
            2,
            "trio-bridge: value 'warm' for float variable 'temperature' is not a number (for example: 21.5)",
        ),
        (
            ["var", "set", "lab", "temperature", "1", "--expect-version", "5"],
            1,
            "trio-bridge: ABORTED: variable 'temperature': expected version 5, but the current version is 1",
        ),
        (
            ["session", "create", "--id", "lab"],
            1,
            "trio-bridge: ALREADY_EXISTS: session 'lab' already exists",
        ),
    ],
)
async def test_errors_are_one_line_on_stderr(
    server: RunningServer, args: list[str], code: int, line: str
) -> None:
    await server.store.create_session("lab")
    await server.store.register_variable(
        "lab", "temperature", VariableType.FLOAT, 20.0, constraints=Constraints(maximum=60.0)
    )
    assert (await cli(server, *args, expect=code)).startswith(line)


async def test_unreachable_server_is_one_line() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", "session", "list", "--port", "1"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 3
    assert result.stderr.decode().startswith("trio-bridge: cannot reach 127.0.0.1:1: connection refused")


async def test_watch_prints_a_change_made_by_set(server: RunningServer) -> None:
    await cli(server, "session", "create", "--id", "lab")
    await cli(server, "var", "register", "lab", "temperature", "float", "21.5")
    watch = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trio_bridge",
            "watch",
            "lab",
            "temperature",
            "--port",
            str(server.port),
            "--json",
        ],
        stdout=subprocess.PIPE,
    )
    assert watch.stdout is not None
    lines: list[dict[str, object]] = []
    buffer = b""

    async def until(kind: str) -> None:
        nonlocal buffer
        with trio.fail_after(30):
            while not any(line["event"] == kind for line in lines):
                chunk = await watch.stdout.receive_some()  # type: ignore[union-attr]
                assert chunk, f"watch ended early: {lines}"
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                lines.extend(json.loads(line) for line in complete if line)

    try:
        await until("synced")
        assert [line["event"] for line in lines] == ["initial_value", "synced"]
        await cli(server, "var", "set", "lab", "temperature", "23.5")
        await until("value_change")
        change = lines[-1]
        assert change["type"] == "float"
        assert (
            change["name"],
            change["value"],
            change["old_value"],
            change["version"],
            change["source"],
        ) == (
            "temperature",
            23.5,
            21.5,
            2,
            "cli",
        )
        watch.send_signal(signal.SIGINT)  # Ctrl-C
        with trio.fail_after(30):
            assert await watch.wait() == 0
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()


def test_settle_heap_freezes_what_start_up_made_and_collects_the_young_less_often() -> None:
    # In a process of its own: freezing is for the whole process.
    script = (
        "import gc\n"
        "from trio_bridge._cli import GC_YOUNG_THRESHOLD, settle_heap\n"
        "before = gc.get_threshold()\n"
        "settle_heap()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()\n"
        "assert gc.isenabled()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

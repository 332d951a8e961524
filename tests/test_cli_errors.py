"""A newcomer's error paths (issue #12), through the real `trio-bridge` process: every failure is one
line on stderr naming its real cause, with the exit code the README's table gives; a watch says when it
cannot reach the server, retries, gives up, and tells a lost state from an expired session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio

from tests.h2raw import RawH2
from tests.support import start_server
from trio_bridge import MemoryStore, NotFound, RunningServer, Unavailable, VariableType
from trio_bridge.client import RECONNECTING, BridgeClient, Reconnect

PYTHON = [sys.executable, "-m", "trio_bridge"]


async def run(*args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process([*PYTHON, *args], capture_stdout=True, capture_stderr=True, check=False)


def one_line(result: trio.CompletedProcess[bytes], code: int) -> str:
    """The single stderr line of a failed command that exited with ``code``."""
    errors = result.stderr.decode()
    assert result.returncode == code, errors
    assert b"Traceback" not in result.stderr, errors
    lines = errors.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trio-bridge: "), lines
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ---- connections that cannot work: exit 3, the cause named ---------------------------------------


async def test_plain_text_client_at_a_tls_server(nursery: trio.Nursery, pki: dict[str, Path]) -> None:
    server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"])
    line = one_line(await run("session", "list", "--port", str(server.port)), 3)
    assert f"cannot reach 127.0.0.1:{server.port}: the server speaks TLS" in line
    assert "--tls" in line


async def test_tls_client_at_a_plain_text_server(server: RunningServer, pki: dict[str, Path]) -> None:
    line = one_line(await run("session", "list", "--port", str(server.port), "--tls-ca", str(pki["ca"])), 3)
    assert "the server plain text: connect without --tls" in line


async def test_no_client_certificate_at_a_mutual_tls_server(
    nursery: trio.Nursery, pki: dict[str, Path]
) -> None:
    server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"])
    line = one_line(await run("session", "list", "--port", str(server.port), "--tls-ca", str(pki["ca"])), 3)
    assert "requires a client certificate" in line and "--tls-cert" in line
    ok = await run(
        "session",
        "list",
        "--port",
        str(server.port),
        "--tls-ca",
        str(pki["ca"]),
        "--tls-cert",
        str(pki["client_cert"]),
        "--tls-key",
        str(pki["client_key"]),
    )
    assert ok.returncode == 0, ok.stderr


async def test_tls_with_the_system_cas_at_a_self_signed_server(
    nursery: trio.Nursery, pki: dict[str, Path]
) -> None:
    # It exited 2, the code for unreadable values.
    server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"])
    line = one_line(await run("session", "list", "--port", str(server.port), "--tls"), 3)
    assert "certificate is not trusted" in line and "--tls-ca" in line


async def test_the_metrics_port_is_not_a_grpc_server(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, metrics_port=0)
    assert server.metrics_port is not None
    line = one_line(await run("session", "list", "--port", str(server.metrics_port)), 3)
    assert "not a trio-bridge gRPC server" in line


async def test_nothing_listening(nursery: trio.Nursery) -> None:
    port = free_port()
    line = one_line(await run("session", "list", "--port", str(port)), 3)
    assert (
        line
        == f"trio-bridge: cannot reach 127.0.0.1:{port}: connection refused (is the server running, on this port?)"
    )


# ---- bad settings: exit 2, the flag and the file named -------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-ca", "{missing}"], "--tls-ca: cannot read {missing}: No such file or directory"),
        (["--token-file", "{missing}"], "--token-file: cannot read {missing}: No such file or directory"),
        (["--tls-ca", "{key}"], "--tls-ca: {key} holds no CA certificate (PEM)"),
        (["--tls-cert", "{cert}"], "give both --tls-cert and --tls-key, or neither"),
        (["--tls-key", "{key}"], "give both --tls-cert and --tls-key, or neither"),
    ],
)
async def test_bad_client_settings_name_the_flag_and_file(
    server: RunningServer, pki: dict[str, Path], tmp_path: Path, flags: list[str], message: str
) -> None:
    # Each said "cannot reach HOST:PORT: ...", without the file.
    names = {"missing": str(tmp_path / "missing.pem"), "key": str(pki["key"]), "cert": str(pki["cert"])}
    flags = [flag.format(**names) for flag in flags]
    line = one_line(await run("session", "list", "--port", str(server.port), *flags), 2)
    assert line == "trio-bridge: " + message.format(**names)


# ---- the library: only trio_bridge errors ---------------------------------------------------------


async def test_client_raises_unavailable_with_the_address(
    aio_loop: Any, nursery: trio.Nursery, pki: dict[str, Path]
) -> None:
    # It raised a bare ConnectionRefusedError, which `except BridgeError` missed.
    port = free_port()
    tls_server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"])

    async def calls() -> list[Unavailable]:
        caught = []
        for target in (port, tls_server.port):
            async with BridgeClient("127.0.0.1", target, timeout=10) as client:
                try:
                    await client.list_sessions()
                except Unavailable as exc:
                    caught.append(exc)
        return caught

    refused, plain_at_tls = await trio_asyncio.aio_as_trio(calls)()
    assert refused.address == ("127.0.0.1", port) and refused.retryable
    assert "connection refused" in str(refused)
    assert plain_at_tls.address == ("127.0.0.1", tls_server.port) and not plain_at_tls.retryable
    assert "speaks TLS" in str(plain_at_tls)


async def test_a_server_refusing_new_connections_is_worth_retrying(
    aio_loop: Any, nursery: trio.Nursery
) -> None:
    # A server at its --max-connections closes new connections at once: the watch gave up at once,
    # calling it "not a trio-bridge gRPC server".
    server = await start_server(nursery, max_connections=1)
    held = await RawH2.open(server.port)

    async def call() -> Unavailable:
        async with BridgeClient("127.0.0.1", server.port, timeout=10) as client:
            with pytest.raises(Unavailable) as caught:
                await client.ping()
            return caught.value

    error = await trio_asyncio.aio_as_trio(call)()
    assert error.retryable, error
    assert "refusing new connections" in str(error) or "refuses new connections" in str(error)
    await held.aclose()


async def test_client_watch_reports_reconnects_and_gives_up(aio_loop: Any) -> None:
    port = free_port()

    async def watch() -> tuple[list[str], BaseException | None]:
        kinds: list[str] = []
        async with BridgeClient(
            "127.0.0.1", port, reconnect=Reconnect(initial_delay=0.01, max_delay=0.05, give_up_after=0.5)
        ) as client:
            try:
                async for event in client.watch("lab", include_reconnects=True):
                    kinds.append(event.kind)
                    assert event.kind == RECONNECTING and isinstance(event.error, Unavailable)
                    assert event.attempt == len(kinds)
            except Unavailable as exc:
                return kinds, exc
        return kinds, None

    kinds, error = await trio_asyncio.aio_as_trio(watch)()
    assert len(kinds) >= 2
    assert error is not None and "gave up after" in str(error) and str(port) in str(error)


async def _silent_server(nursery: trio.Nursery) -> int:
    """A port that accepts connections and never answers (a hung process, a black hole)."""

    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, hold, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_a_calls_deadline_is_unavailable_not_a_lost_connection(
    aio_loop: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # A `timeout=` that ran out was reported as "the connection was lost" (a TimeoutError is an OSError).
    port = await _silent_server(nursery)

    async def call() -> Unavailable:
        async with BridgeClient("127.0.0.1", port, timeout=2) as client:
            with pytest.raises(Unavailable) as caught:
                await client.ping()
            return caught.value

    error = await trio_asyncio.aio_as_trio(call)()
    assert (
        str(error) == f"127.0.0.1:{port} did not answer within 2s; the call may or may not have been applied"
    )
    assert error.address == ("127.0.0.1", port) and error.retryable


async def test_a_watch_gives_up_on_a_server_that_never_answers_in_time(
    aio_loop: Any, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # With give_up_after=1 it gave up after 6 s (two liveness windows), saying "3s"; with the defaults,
    # after about 180 s where the README says 30.
    port = await _silent_server(nursery)

    async def watch() -> tuple[Unavailable, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with BridgeClient("127.0.0.1", port, reconnect=Reconnect(give_up_after=1)) as client:
            with pytest.raises(Unavailable) as caught:
                async for _ in client.watch("lab", heartbeat_interval=1):
                    pass
            return caught.value, loop.time() - start

    error, waited = await trio_asyncio.aio_as_trio(watch)()
    assert "(gave up after 1s without an answer)" in str(error)
    assert waited == pytest.approx(1.0, abs=0.01)  # mock time: the bound itself, not a measurement


async def test_a_resumed_watch_raises_when_the_state_it_followed_is_gone(aio_loop: Any) -> None:
    # After an in-memory server restarted and a producer made the session again, the watch resumed
    # with a silent gap (the new variables' first versions never came, no resync).
    first_store, second_store = MemoryStore(), MemoryStore()
    await first_store.create_session("lab")
    await first_store.register_variable("lab", "t", VariableType.INTEGER, 1)
    await second_store.create_session("lab")  # what a producer made on the restarted server
    await second_store.register_variable("lab", "t", VariableType.INTEGER, 100)
    await second_store.register_variable("lab", "u", VariableType.INTEGER, 0)
    for value in range(1, 10):
        await second_store.set_variable("lab", "u", value)
    async with trio.open_nursery() as outer:
        first = trio.CancelScope()
        stopped = trio.Event()

        async def serve_first(*, task_status: trio.TaskStatus[RunningServer]) -> None:
            with first:
                async with trio.open_nursery() as inner:
                    task_status.started(await start_server(inner, store=first_store))
            stopped.set()  # its port is free again

        server = await outer.start(serve_first)
        synced = trio.Event()

        async def watch() -> list[str]:
            kinds = []
            reconnect = Reconnect(initial_delay=0.01, max_delay=0.05)
            async with BridgeClient("127.0.0.1", server.port, reconnect=reconnect) as client:

                async def follow() -> None:
                    async for event in client.watch("lab", include_reconnects=True):
                        kinds.append(event.kind)
                        if event.kind == "synced" and not synced.is_set():
                            synced.set()

                with pytest.raises(NotFound) as caught:
                    await follow()
                kinds.append(str(caught.value))
            return kinds

        async def restart() -> None:
            await synced.wait()
            first.cancel()
            await stopped.wait()
            await start_server(outer, store=second_store, port=server.port)

        outer.start_soon(restart)
        with trio.fail_after(30):  # a safety bound: before the fix the watch went on, never ending
            kinds = await trio_asyncio.aio_as_trio(watch)()
        outer.cancel_scope.cancel()
    assert kinds[:2] == ["initial_value", "synced"]
    assert "value_change" not in kinds and "initial_value" not in kinds[2:]  # nothing of the new state
    assert "lost the state this watch was following (it keeps state in memory and restarted)" in kinds[-1]


# ---- the CLI watch: retries you can see ------------------------------------------------------------


async def test_watch_without_a_server_retries_visibly_then_gives_up() -> None:
    # It printed nothing for 10 minutes, and exited 0 on Ctrl-C.
    port = free_port()
    result = await run("watch", "lab", "--port", str(port), "--wait", "1")
    errors = result.stderr.decode().splitlines()
    assert result.returncode == 3, errors
    assert errors[0] == (
        f"trio-bridge: cannot reach 127.0.0.1:{port}: connection refused (is the server running, on this "
        "port?); retrying (1, giving up after 1s)"
    )
    assert "gave up after" in errors[-1]
    assert b"Traceback" not in result.stderr


class _Lines:
    """The lines a process writes to one of its pipes, as they come."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[str] = []

    async def until(self, fragment: str) -> str:
        with trio.fail_after(30):
            while True:
                for line in self.seen:
                    if fragment in line:
                        self.seen.remove(line)
                        return line
                chunk = await self._stream.receive_some()
                assert chunk, f"ended before {fragment!r}; saw {self.seen}"
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\n")
                self.seen.extend(line.decode() for line in lines)


@contextlib.asynccontextmanager
async def watch_then_lose_the_server(
    store: MemoryStore, *flags: str
) -> AsyncIterator[tuple[RunningServer, trio.Process, _Lines, _Lines]]:
    """A server on ``store``, a `trio-bridge watch lab` of it that has synced, and then that server
    stopped; yields the stopped server, the watch process and its stdout and stderr lines."""
    async with trio.open_nursery() as outer:
        first = trio.CancelScope()

        async def serve_first(*, task_status: trio.TaskStatus[RunningServer]) -> None:
            with first:
                async with trio.open_nursery() as inner:
                    task_status.started(await start_server(inner, store=store))

        server = await outer.start(serve_first)
        process = await trio.lowlevel.open_process(
            [*PYTHON, "watch", "lab", "--port", str(server.port), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = _Lines(process.stdout), _Lines(process.stderr)
            await out.until("synced")
            first.cancel()
            yield server, process, out, err
        finally:
            process.kill()
            await process.wait()


async def test_watch_reports_a_lost_server_and_carries_on_when_it_is_back() -> None:
    store = MemoryStore()  # the state outlives the first server
    await store.create_session("lab")
    await store.register_variable("lab", "temperature", VariableType.FLOAT, 21.5)
    async with watch_then_lose_the_server(store, "--wait", "forever") as (server, _, out, err):
        retrying = await err.until("retrying (1)")
        assert retrying.startswith("trio-bridge: ") and f"127.0.0.1:{server.port}" in retrying
        async with trio.open_nursery() as second:
            await start_server(second, store=store, port=server.port)
            await err.until(f"watching again on 127.0.0.1:{server.port}")
            await store.set_variable("lab", "temperature", 22.5, source="thermostat")
            change = await out.until("value_change")
            assert "temperature = 22.5 (v2)  was 21.5  by thermostat" in change
            second.cancel_scope.cancel()


async def test_watch_says_when_a_restarted_in_memory_server_lost_the_session() -> None:
    # It said the session "may have expired".
    store = MemoryStore()
    await store.create_session("lab")
    async with watch_then_lose_the_server(store) as (server, process, _, err):
        await err.until("retrying (1")
        async with trio.open_nursery() as second:
            await start_server(second, store=MemoryStore(), port=server.port)  # a restart: empty
            with trio.fail_after(30):
                code = await process.wait()
            gone = await err.until("is gone")
            second.cancel_scope.cancel()
    assert code == 1
    assert "lost the state this watch was following (it keeps state in memory and restarted)" in gone
    assert not [line for line in err.seen if "Traceback" in line]


# ---- the CLI's rough edges ---------------------------------------------------------------------------


async def test_global_options_go_before_or_after_the_command(server: RunningServer) -> None:
    # `trio-bridge --port 50051 session list` said "invalid choice: '50051'".
    await server.store.create_session("lab")
    before = await run("--port", str(server.port), "--json", "session", "list")
    after = await run("session", "list", "--json", "--port", str(server.port))
    assert before.returncode == after.returncode == 0, before.stderr
    assert before.stdout == after.stdout
    assert json.loads(before.stdout)["session_id"] == "lab"


async def test_ping_and_session_get(server: RunningServer) -> None:
    from trio_bridge import __version__

    ping = await run("ping", "--port", str(server.port))
    assert ping.stdout.decode() == f"trio-bridge {__version__} at 127.0.0.1:{server.port}\n"
    await server.store.create_session("lab", metadata={"owner": "me"})
    got = await run("session", "get", "lab", "--port", str(server.port), "--json")
    assert json.loads(got.stdout)["metadata"] == {"owner": "me"}
    text = await run("session", "get", "lab", "--port", str(server.port))
    assert text.stdout.decode().startswith("lab  0 variable(s)  expires ")
    assert text.stdout.decode().endswith("  owner=me\n")


async def test_empty_listings_say_so(server: RunningServer) -> None:
    # An empty list printed nothing.
    assert (await run("session", "list", "--port", str(server.port))).stdout == b"(no sessions)\n"
    assert (await run("session", "list", "--json", "--port", str(server.port))).stdout == b""
    await server.store.create_session("lab")
    assert (await run("var", "list", "lab", "--port", str(server.port))).stdout == b"(no variables)\n"


async def test_var_set_records_metadata_and_the_type_key_is_the_same_everywhere(
    server: RunningServer,
) -> None:
    # `watch --json` called the variable's type `variable_type`, `var get --json` called it `type`.
    await server.store.create_session("lab")
    await server.store.register_variable("lab", "temperature", VariableType.FLOAT, 21.5)
    port = ["--port", str(server.port)]
    got = json.loads((await run("var", "get", "lab", "temperature", "--json", *port)).stdout)
    assert got["type"] == "float"
    process = await trio.lowlevel.open_process(
        [*PYTHON, "watch", "lab", "--json", *port],
        stdout=subprocess.PIPE,
    )
    try:
        out = _Lines(process.stdout)
        initial = json.loads(await out.until("initial_value"))
        assert (initial["event"], initial["type"], initial["value"]) == ("initial_value", "float", 21.5)
        await out.until('"synced"')
        result = await run("var", "set", "lab", "temperature", "22.5", "--meta", "why=test", *port)
        assert result.returncode == 0, result.stderr
        change = json.loads(await out.until("value_change"))
        assert (change["event"], change["type"], change["old_value"]) == ("value_change", "float", 21.5)
        assert change["update_metadata"] == {"why": "test"}
        assert set(change) >= set(got) - {"last_updated_at"}
    finally:
        process.kill()
        await process.wait()


async def test_value_errors_name_the_variable_and_its_type(server: RunningServer) -> None:
    # "could not convert string to float: '22,5'" named neither.
    await server.store.create_session("lab")
    await server.store.register_variable("lab", "temperature", VariableType.FLOAT, 21.5)
    await server.store.register_variable("lab", "count", VariableType.INTEGER, 1)
    port = ["--port", str(server.port)]
    line = one_line(await run("var", "set", "lab", "temperature", "22,5", *port), 2)
    assert "'temperature'" in line and "float" in line and "22,5" in line
    line = one_line(await run("var", "set", "lab", "count", "1.5", *port), 2)
    assert "'count'" in line and "integer" in line and "1.5" in line
    line = one_line(await run("var", "register", "lab", "n", "integer", "x", *port), 2)
    assert "'n'" in line and "integer" in line


async def test_embeddings_print_in_float32s_shortest_form(server: RunningServer) -> None:
    await server.store.create_session("lab")
    port = ["--port", str(server.port)]
    result = await run("var", "register", "lab", "e", "embedding", "0.1,0.2,0.3", *port)
    assert result.stdout.decode() == "e = [0.1, 0.2, 0.3] (embedding, version 1)\n"


async def test_name_rule_errors_show_the_rule_once(server: RunningServer) -> None:
    # The rule showed with a doubled backslash.
    await server.store.create_session("lab")
    line = one_line(
        await run("var", "register", "lab", "9 lives", "integer", "9", "--port", str(server.port)), 1
    )
    assert "\\\\" not in line and "must match" in line and "starting with a letter" in line


async def test_var_register_help_explains_values() -> None:
    result = await run("var", "register", "--help")
    text = result.stdout.decode()
    for example in ("21.5", "true or false", '"shape"', "module"):
        assert example in text

"""TLS, mutual TLS and bearer tokens: who may connect, who may use which session, and what a refused
caller learns (nothing about other sessions)."""

from __future__ import annotations

import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.doc_blocks import README, example
from tests.support import start_server
from trio_bridge import NotFound, RunningServer, Unauthenticated, Unavailable, VariableType
from trio_bridge._security import Tokens
from trio_bridge._server import _warn_if_exposed
from trio_bridge.client import BridgeClient, tls_context

T = TypeVar("T")

ALICE = "alice-token-0123456789abcdef"  # scope all
BOB = "bob-token-0123456789abcdef"  # scope own
CAROL = "carol-token-0123456789abcdef"  # scope own


async def in_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    result: T = await trio_asyncio.aio_as_trio(fn)()
    return result


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who token scope\nalice {ALICE}\nbob {BOB} own\n\ncarol {CAROL} own\n")
    return path


async def _ping(server: RunningServer, **options: Any) -> None:
    async def call() -> None:
        async with BridgeClient(server.host, server.port, timeout=10, **options) as client:
            await client.ping()

    await in_asyncio(call)


# ---- TLS ---------------------------------------------------------------------------------------------


async def test_tls_serves_a_client_that_trusts_the_ca(
    nursery: trio.Nursery, aio_loop: Any, pki: dict[str, Path]
) -> None:
    server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"])
    await _ping(server, tls=tls_context(pki["ca"]))

    # A client that does not trust the server's CA; plain text to a TLS port: refused, no hang, and
    # a trio_bridge error that says why (it was an ssl.SSLError, a bare StreamTerminatedError).
    with pytest.raises(Unavailable, match="its TLS certificate is not trusted") as untrusted:
        await _ping(server, tls=tls_context())
    assert untrusted.value.address == (server.host, server.port) and not untrusted.value.retryable
    with pytest.raises(Unavailable, match="the server speaks TLS and this client plain text"):
        with trio.fail_after(10):
            await _ping(server)


async def test_mutual_tls_requires_a_client_certificate(
    nursery: trio.Nursery, aio_loop: Any, pki: dict[str, Path]
) -> None:
    server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"])
    await _ping(server, tls=tls_context(pki["ca"], pki["client_cert"], pki["client_key"]))
    with pytest.raises(Unavailable, match="requires a client certificate"):
        with trio.fail_after(10):
            await _ping(server, tls=tls_context(pki["ca"]))


# ---- tokens ------------------------------------------------------------------------------------------


async def test_every_rpc_needs_a_valid_token(nursery: trio.Nursery, aio_loop: Any, token_file: Path) -> None:
    server = await start_server(nursery, token_file=token_file)
    for token, fragment in ((None, "requires a token"), ("not-a-real-token-at-all", "not valid")):
        with pytest.raises(Unauthenticated, match=fragment) as caught:
            await _ping(server, token=token)
        assert "not-a-real-token" not in str(caught.value)  # never echoed
    await _ping(server, token=ALICE)

    session = (await server.store.create_session(owner="alice")).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)

    async def watch_without_token() -> None:
        async with BridgeClient(server.host, server.port, reconnect=None) as client:
            async for _ in client.watch(session, ["t"]):
                raise AssertionError("a watch without a token must get no message")

    with pytest.raises(Unauthenticated):
        await in_asyncio(watch_without_token)


async def test_own_scope_sees_only_its_sessions_and_others_look_absent(
    nursery: trio.Nursery, aio_loop: Any, token_file: Path
) -> None:
    server = await start_server(nursery, token_file=token_file)

    async def scenario() -> None:
        async with (
            BridgeClient(server.host, server.port, token=BOB) as bob,
            BridgeClient(server.host, server.port, token=CAROL) as carol,
            BridgeClient(server.host, server.port, token=ALICE) as alice,
        ):
            bobs = (await bob.create_session("bobs")).session_id
            carols = (await carol.create_session("carols")).session_id
            await carol.register_variable(carols, "secret", VariableType.INTEGER, 42)

            with pytest.raises(NotFound) as other:
                await bob.get_session(carols)
            with pytest.raises(NotFound) as absent:
                await bob.get_session("nobody-has-this")
            assert str(other.value) == str(absent.value).replace("nobody-has-this", carols)
            for attempt in (
                bob.get(carols, "secret"),
                bob.set(carols, "secret", 1),
                bob.list_variables(carols),
                bob.cleanup_session(carols),
            ):
                with pytest.raises(NotFound):
                    await attempt

            async def bob_watches_carols() -> None:
                async for _ in bob.watch(carols):
                    raise AssertionError("nothing of another's session may be streamed")

            with pytest.raises(NotFound):
                await bob_watches_carols()

            assert [s.session_id for s in await bob.list_sessions()] == [bobs]
            assert {s.session_id for s in await alice.list_sessions()} == {bobs, carols}  # scope all
            assert (await alice.get(carols, "secret")).value == 42

    await in_asyncio(scenario)
    assert (await server.store.get_variable("carols", "secret")).value == 42  # bob changed nothing


async def test_health_answers_without_a_token(nursery: trio.Nursery, aio_loop: Any, token_file: Path) -> None:
    server = await start_server(nursery, token_file=token_file)

    async def check() -> Any:
        channel = Channel(server.host, server.port)
        try:
            return await HealthStub(channel).Check(HealthCheckRequest())
        finally:
            channel.close()

    reply = await in_asyncio(check)
    assert reply.status == HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("alice\n", ":1: expected 'NAME TOKEN [all|own]'"),
        ("alice short\n", ":1: the token for 'alice' is shorter than 16 characters"),
        (f"alice {ALICE} everything\n", ":1: expected"),
        (f"alice {ALICE}\nbob {ALICE}\n", ":2: this token is already given to 'alice'"),
        ("# nothing\n", "at least one token"),
    ],
)
def test_token_file_errors_name_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        Tokens.load(path)


async def test_serve_refuses_a_bad_token_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice short\n")
    result = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--token-file", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        f"trio-bridge: {path}:1: the token for 'alice' is shorter than 16 characters"
    ]


async def test_cli_client_speaks_tls_with_a_token(
    nursery: trio.Nursery, pki: dict[str, Path], token_file: Path, tmp_path: Path
) -> None:
    server = await start_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"], token_file=token_file)
    mine = tmp_path / "my-token"
    mine.write_text(BOB + "\n")
    base = [sys.executable, "-m", "trio_bridge", "session", "create", "--port", str(server.port)]
    ok = await trio.run_process(
        [*base, "--tls-ca", str(pki["ca"]), "--token-file", str(mine), "--id", "from-cli"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr.decode()
    assert await server.store.owner_of("from-cli") == "bob"
    refused = await trio.run_process(
        [*base, "--tls-ca", str(pki["ca"]), "--id", "no-token"], capture_stderr=True, check=False
    )
    assert refused.returncode == 1
    assert b"UNAUTHENTICATED" in refused.stderr


def test_plain_text_off_loopback_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trio_bridge"):
        _warn_if_exposed("127.0.0.1", tls=False, tokens=False)
        assert caplog.records == []
        _warn_if_exposed("0.0.0.0", tls=False, tokens=False)
        _warn_if_exposed("0.0.0.0", tls=True, tokens=False)
        _warn_if_exposed("0.0.0.0", tls=True, tokens=True)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "SERVING PLAIN TEXT ON 0.0.0.0" in messages[0] and "--token-file" in messages[0]
    assert "no --token-file" in messages[1]


def test_the_readme_tls_example_runs_as_written(
    pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = example(README, "tls").text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_bytes(pki["ca"].read_bytes())
    namespace: dict[str, Any] = {}
    exec(block, namespace)  # builds the client; connecting is lazy
    client = namespace["client"]
    assert isinstance(client, BridgeClient) and isinstance(client._tls, ssl.SSLContext)

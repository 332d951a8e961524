"""Every limit: going over it refuses that request alone, with a status whose message names the limit
and its value, and the server goes on serving everything else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
import trio_asyncio
from grpclib.const import Status

from tests.support import connect, eventually, start_server, start_watch
from tests.test_rpcs import expect_status, new_session, packed, register
from trio_bridge import Limits, ResourceExhausted
from trio_bridge._cli import build_parser
from trio_bridge._limits import describe
from trio_bridge.client import BridgeClient
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import DoubleValue, StringValue

VT = pb.VariableType
README = Path(__file__).resolve().parent.parent / "README.md"


def _watch(session: str, *names: str, **options: str) -> pb.WatchVariablesRequest:
    return pb.WatchVariablesRequest(session_id=session, variable_identifiers=list(names), options=options)


async def test_max_sessions(nursery: trio.Nursery, aio_loop: object) -> None:
    server = await start_server(nursery, max_sessions=2)
    with connect(server) as client:
        first = await new_session(client, "a")
        await new_session(client, "b")
        await expect_status(
            client,
            client.stub.create_session(pb.CreateSessionRequest(session_id="c")),
            Status.RESOURCE_EXHAUSTED,
            "2 sessions",
            "max_sessions=2",
        )
        await client(client.stub.cleanup_session(pb.CleanupSessionRequest(session_id=first)))
        await new_session(client, "c")  # room again

    async def with_the_client() -> ResourceExhausted:
        async with BridgeClient(server.host, server.port) as bridge:
            with pytest.raises(ResourceExhausted) as caught:
                await bridge.create_session("d")
            return caught.value

    refused = await trio_asyncio.aio_as_trio(with_the_client)()
    assert refused.limit == "max_sessions"  # from trailing metadata, for programs to act on
    assert refused.details["trio-bridge-limit-value"] == "2"


async def test_max_variables_per_session(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_variables_per_session=2)
    with connect(server) as client:
        full, other = await new_session(client), await new_session(client)
        for name in ("x", "y"):
            await register(client, full, name, VT.FLOAT, packed(DoubleValue(value=1.0)))
        request = pb.RegisterVariableRequest(
            session_id=full, name="z", type=VT.FLOAT, initial_value=packed(DoubleValue(value=1.0))
        )
        await expect_status(
            client,
            client.stub.register_variable(request),
            Status.RESOURCE_EXHAUSTED,
            f"session {full!r} holds 2 variables",
            "max_variables_per_session=2",
        )
        await register(client, other, "z", VT.FLOAT, packed(DoubleValue(value=1.0)))  # unaffected
        await client(
            client.stub.delete_variable(pb.DeleteVariableRequest(session_id=full, variable_identifier="x"))
        )
        await register(client, full, "z", VT.FLOAT, packed(DoubleValue(value=1.0)))


@pytest.mark.parametrize(
    ("vtype", "small", "big"),
    [
        (VT.STRING, StringValue(value="ok"), StringValue(value="x" * 100)),
        (VT.EMBEDDING, pb.Embedding(values=[0.5, 1.5]), pb.Embedding(values=[0.5] * 50)),
    ],
)
async def test_max_value_bytes(
    nursery: trio.Nursery, vtype: pb.VariableType, small: object, big: object
) -> None:
    server = await start_server(nursery, max_value_bytes=64)
    with connect(server) as client:
        session = await new_session(client)
        await register(client, session, "v", vtype, packed(small))
        await expect_status(
            client,
            client.stub.set_variable(
                pb.SetVariableRequest(session_id=session, variable_identifier="v", value=packed(big))
            ),
            Status.INVALID_ARGUMENT,
            "'v'",
            "max_value_bytes=64",
        )
        await expect_status(
            client,
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=session, name="w", type=vtype, initial_value=packed(big)
                )
            ),
            Status.INVALID_ARGUMENT,
            "max_value_bytes=64",
        )
        variable = await client(
            client.stub.get_variable(pb.GetVariableRequest(session_id=session, variable_identifier="v"))
        )
        assert variable.variable is not None and variable.variable.version == 1  # nothing was written


async def test_max_value_bytes_covers_tensors(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_value_bytes=64)
    with connect(server) as client:
        session = await new_session(client)
        tensor = pb.Tensor(shape=[100], dtype="float32", data=bytes(400))
        await expect_status(
            client,
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=session, name="t", type=VT.TENSOR, initial_value=packed(tensor)
                )
            ),
            Status.INVALID_ARGUMENT,
            "max_value_bytes=64",
        )


async def test_max_message_bytes_refuses_before_reading_and_keeps_the_connection(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, max_message_bytes=1024)
    with connect(server) as client:
        huge = pb.CreateSessionRequest(metadata={"note": "x" * 100_000})
        await expect_status(
            client,
            client.stub.create_session(huge),
            Status.RESOURCE_EXHAUSTED,
            "request message is",
            "max_message_bytes=1024",
        )
        assert server.store.cache.session_count == 0
        reply = await client(client.stub.ping(pb.PingRequest(message="still here")))  # same connection
        assert reply.message == "still here"


async def test_max_watch_streams_in_all(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_watch_streams=2)
    with connect(server) as one, connect(server) as two:
        session = await new_session(one)
        await register(one, session, "v", VT.FLOAT, packed(DoubleValue(value=1.0)))
        first = await start_watch(nursery, one, _watch(session, "v"))
        await first.wait_synced()
        await (await start_watch(nursery, two, _watch(session, "v"))).wait_synced()
        refused = await start_watch(nursery, two, _watch(session, "v"))
        await refused.wait_ended()
        assert refused.updates == []
        assert "the server has 2 watch streams open" in str(refused.error)
        assert "max_watch_streams=2" in str(refused.error)
        first.cancel_scope.cancel()
        await eventually(lambda: server.service.open_watches == 1)
        await (await start_watch(nursery, one, _watch(session, "v"))).wait_synced()  # room again


async def test_max_watch_streams_per_connection(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_watch_streams_per_connection=2)
    with connect(server) as crowded, connect(server) as other:
        session = await new_session(crowded)
        await register(crowded, session, "v", VT.FLOAT, packed(DoubleValue(value=1.0)))
        for _ in range(2):
            await (await start_watch(nursery, crowded, _watch(session, "v"))).wait_synced()
        refused = await start_watch(nursery, crowded, _watch(session, "v"))
        await refused.wait_ended()
        assert "this connection has 2 watch streams open" in str(refused.error)
        assert "max_watch_streams_per_connection=2" in str(refused.error)
        await (await start_watch(nursery, other, _watch(session, "v"))).wait_synced()
        assert (await crowded(crowded.stub.ping(pb.PingRequest()))) is not None  # unary calls still fit


async def test_more_than_a_hundred_streams_fit_on_one_connection(nursery: trio.Nursery) -> None:
    # h2's default of 100 concurrent streams would make the 101st wait without a word.
    server = await start_server(nursery, max_watch_streams_per_connection=110)
    with connect(server) as client:
        session = await new_session(client)
        await register(client, session, "v", VT.FLOAT, packed(DoubleValue(value=1.0)))
        watchers = [await start_watch(nursery, client, _watch(session, "v")) for _ in range(105)]
        with trio.fail_after(20):
            for watcher in watchers:
                await watcher.wait_synced()


async def test_heartbeat_bounds_are_limits(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, min_heartbeat_interval_ms=1000, max_heartbeat_interval_ms=2000)
    with connect(server) as client:
        session = await new_session(client)
        await register(client, session, "v", VT.FLOAT, packed(DoubleValue(value=1.0)))
        for value in ("999", "2001"):
            watcher = await start_watch(nursery, client, _watch(session, "v", heartbeat_interval_ms=value))
            await watcher.wait_ended()
            assert "min_heartbeat_interval_ms" in str(watcher.error)
            assert "max_heartbeat_interval_ms" in str(watcher.error)
        await (await start_watch(nursery, client, _watch(session, "v"))).wait_synced()  # default clamped


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        Limits(max_sessions=0)
    with pytest.raises(ValueError, match="min_heartbeat_interval_ms"):
        Limits(min_heartbeat_interval_ms=10, max_heartbeat_interval_ms=5)


def test_every_limit_is_a_serve_flag_and_a_readme_row() -> None:
    table = README.read_text().split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = {
        match.group(1): int(match.group(2).replace(",", ""))
        for match in re.finditer(r"^\| `--([a-z-]+)` \| ([\d,]+) \|", table, re.MULTILINE)
    }
    parser = build_parser()
    defaults = parser.parse_args(["serve"])
    for name, default, _ in describe():
        flag = name.replace("_", "-")
        assert rows.get(flag) == default, f"README Limits table: --{flag} should show {default}"
        assert getattr(defaults, name) == default
        assert getattr(parser.parse_args(["serve", f"--{flag}", "7"]), name) == 7
        if default == 0:  # documented as "0: worked out": it must be accepted (it was refused)
            assert getattr(parser.parse_args(["serve", f"--{flag}", "0"]), name) == 0


# ---- sizes of what a request may make the server keep (issue #10, observation 3) ----------------------


async def test_metadata_and_source_sizes(nursery: trio.Nursery) -> None:
    # A write with 3.9 MB of metadata cost ~9.8 MB of RSS and the history kept it; a 3.9 MB source on
    # 10 writes watched by 100 streams became 4.3 GB out.
    server = await start_server(nursery, max_metadata_entries=3, max_metadata_bytes=100, max_source_bytes=20)
    with connect(server) as client:
        session = await new_session(client)
        await register(client, session, "t", VT.FLOAT, packed(DoubleValue(value=1.0)))
        value = packed(DoubleValue(value=2.0))
        many = {f"k{i}": "v" for i in range(4)}
        big = {"k": "v" * 100}
        cases = [
            (
                pb.CreateSessionRequest(metadata=many),
                "session metadata has 4 entries",
                "max_metadata_entries=3",
            ),
            (
                pb.CreateSessionRequest(metadata=big),
                "session metadata is 101 bytes",
                "max_metadata_bytes=100",
            ),
            (
                pb.RegisterVariableRequest(
                    session_id=session, name="u", type=VT.FLOAT, initial_value=value, metadata=big
                ),
                "variable 'u' metadata is 101 bytes",
                "max_metadata_bytes=100",
            ),
            (
                pb.RegisterVariableRequest(
                    session_id=session, name="u", type=VT.FLOAT, initial_value=value, source="s" * 21
                ),
                "source is 21 bytes",
                "max_source_bytes=20",
            ),
            (
                pb.SetVariableRequest(
                    session_id=session, variable_identifier="t", value=value, metadata=many
                ),
                "update metadata has 4 entries",
                "max_metadata_entries=3",
            ),
            (
                pb.SetVariablesRequest(
                    session_id=session,
                    writes=[pb.VariableWrite(variable_identifier="t", value=value)],
                    source="é" * 11,
                ),
                "source is 22 bytes",
                "max_source_bytes=20",
            ),
        ]
        calls = {
            pb.CreateSessionRequest: client.stub.create_session,
            pb.RegisterVariableRequest: client.stub.register_variable,
            pb.SetVariableRequest: client.stub.set_variable,
            pb.SetVariablesRequest: client.stub.set_variables,
        }
        for request, *fragments in cases:
            await expect_status(client, calls[type(request)](request), Status.INVALID_ARGUMENT, *fragments)
        assert (await server.store.get_variable(session, "t")).version == 1  # nothing was written
        await client(  # at the limits: accepted
            client.stub.set_variable(
                pb.SetVariableRequest(
                    session_id=session,
                    variable_identifier="t",
                    value=value,
                    metadata={"a": "b" * 98},
                    source="s" * 20,
                )
            )
        )


async def test_constraint_sizes(nursery: trio.Nursery) -> None:
    # A CHOICE with 100,000 allowed values (850 ms of server CPU) and a tensor constraint of 200,000
    # dimensions were accepted and copied into every update.
    server = await start_server(nursery)
    with connect(server) as client:
        session = await new_session(client)
        choice = pb.RegisterVariableRequest(
            session_id=session,
            name="c",
            type=VT.CHOICE,
            initial_value=packed(StringValue(value="v0")),
            constraints=pb.Constraints(allowed_values=[f"v{i}" for i in range(100_000)]),
        )
        await expect_status(
            client,
            client.stub.register_variable(choice),
            Status.INVALID_ARGUMENT,
            "100000 allowed values",
            "max_allowed_values=1000",
        )
        tensor = pb.RegisterVariableRequest(
            session_id=session,
            name="t",
            type=VT.TENSOR,
            initial_value=packed(pb.Tensor(shape=[1], dtype="float32", data=b"\0" * 4)),
            constraints=pb.Constraints(shape=[1] * 200_000),
        )
        await expect_status(
            client,
            client.stub.register_variable(tensor),
            Status.INVALID_ARGUMENT,
            "200000 dimensions",
            "max_tensor_dimensions=32",
        )
        wide = pb.RegisterVariableRequest(
            session_id=session,
            name="w",
            type=VT.CHOICE,
            initial_value=packed(StringValue(value="a")),
            constraints=pb.Constraints(allowed_values=["a", "b" * 70_000]),
        )
        await expect_status(
            client,
            client.stub.register_variable(wide),
            Status.INVALID_ARGUMENT,
            "70001 bytes",
            "max_constraint_bytes=65536",
        )
        assert await server.store.list_variables(session) == []


async def test_max_session_ttl_seconds(nursery: trio.Nursery) -> None:
    # Issue #10, observation 5: CreateSession up to max_sessions with ten-year TTLs locked every other
    # client out.
    server = await start_server(nursery, max_session_ttl_seconds=3600)
    with connect(server) as client:
        await expect_status(
            client,
            client.stub.create_session(pb.CreateSessionRequest(ttl_seconds=10 * 365 * 86_400)),
            Status.INVALID_ARGUMENT,
            "up to 3600",
            "max_session_ttl_seconds",
        )
        await client(client.stub.create_session(pb.CreateSessionRequest(ttl_seconds=3600)))
    with pytest.raises(ValueError, match="max_session_ttl_seconds"):
        await start_server(nursery, max_session_ttl_seconds=3600, session_ttl=7200.0)


async def test_max_sessions_per_token(nursery: trio.Nursery, aio_loop: object, tmp_path: Path) -> None:
    # Issue #10, observation 5: no quota per token.
    alice, bob = "a" * 20, "b" * 20
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {alice} all\nbob {bob} own\n")
    server = await start_server(nursery, token_file=tokens, max_sessions_per_token=2)

    async def scenario() -> None:
        async with (
            BridgeClient(server.host, server.port, token=alice) as as_alice,
            BridgeClient(server.host, server.port, token=bob) as as_bob,
        ):
            for client in (as_alice, as_bob):
                first = (await client.create_session()).session_id
                await client.create_session()
                with pytest.raises(ResourceExhausted) as caught:
                    await client.create_session()
                assert caught.value.limit == "max_sessions_per_token"
                assert "holds 2 sessions, its limit max_sessions_per_token=2" in str(caught.value)
                await client.cleanup_session(first)
                await client.create_session()  # room again

    await trio_asyncio.aio_as_trio(scenario)()
    assert server.store.cache.session_count == 4

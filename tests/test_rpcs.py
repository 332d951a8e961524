"""Every unary RPC over a real server on loopback, through the generated betterproto2 client."""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.support import Client, connect, eventually, real_seconds, start_server
from trio_bridge import RunningServer
from trio_bridge._status import INTERNAL_MESSAGE
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import BoolValue, DoubleValue, Int64Value, StringValue

VT = pb.VariableType


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def packed(message: Any) -> PbAny:
    return PbAny.pack(message)


async def expect_status(client: Client, call: Any, status: Status, *fragments: str) -> str:
    with pytest.raises(GRPCError) as caught:
        await client(call)
    assert caught.value.status == status, caught.value.message
    message = caught.value.message or ""
    for fragment in fragments:
        assert fragment in message
    return message


async def new_session(client: Client, session_id: str = "") -> str:
    response = await client(client.stub.create_session(pb.CreateSessionRequest(session_id=session_id)))
    assert response.session is not None
    return response.session.session_id


async def register(
    client: Client,
    session_id: str,
    name: str,
    vtype: pb.VariableType,
    value: PbAny,
    constraints: pb.Constraints | None = None,
) -> pb.Variable:
    response = await client(
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id=session_id,
                name=name,
                type=vtype,
                initial_value=value,
                constraints=constraints,
                metadata={"unit": "test"},
                source="pytest",
            )
        )
    )
    assert response.variable is not None
    return response.variable


async def test_ping(client: Client) -> None:
    response = await client(client.stub.ping(pb.PingRequest(message="hello")))
    assert response.message == "hello"
    assert response.server_version
    assert response.server_time is not None


async def test_session_lifecycle(client: Client) -> None:
    created = await client(
        client.stub.create_session(
            pb.CreateSessionRequest(session_id="lab-1", metadata={"owner": "ada"}, ttl_seconds=120)
        )
    )
    assert created.session is not None
    assert created.session.session_id == "lab-1"
    assert created.session.ttl_seconds == 120
    assert created.session.metadata == {"owner": "ada"}
    generated = await new_session(client)
    assert generated and generated != "lab-1"

    got = await client(client.stub.get_session(pb.GetSessionRequest(session_id="lab-1")))
    assert got.session is not None and got.session.created_at == created.session.created_at
    listed = await client(client.stub.list_sessions(pb.ListSessionsRequest()))
    assert {s.session_id for s in listed.sessions} == {"lab-1", generated}

    await register(client, "lab-1", "x", VT.INTEGER, packed(Int64Value(value=1)))
    cleaned = await client(client.stub.cleanup_session(pb.CleanupSessionRequest(session_id="lab-1")))
    assert cleaned.variables_removed == 1
    await expect_status(
        client,
        client.stub.get_session(pb.GetSessionRequest(session_id="lab-1")),
        Status.NOT_FOUND,
        "session 'lab-1' not found",
    )


# (type, constraints, initial value, a later value, how to read the native value back)
ROUND_TRIPS: list[tuple[pb.VariableType, pb.Constraints | None, Any, Any, Callable[[Any], Any]]] = [
    (VT.FLOAT, pb.Constraints(minimum=-50, maximum=150), DoubleValue(value=21.5), DoubleValue(value=-3.25), lambda m: m.value),
    (VT.INTEGER, None, Int64Value(value=2**62), Int64Value(value=-7), lambda m: m.value),
    (VT.STRING, pb.Constraints(pattern="[a-z ]*"), StringValue(value="hello"), StringValue(value=""), lambda m: m.value),
    (VT.BOOLEAN, None, BoolValue(value=True), BoolValue(value=False), lambda m: m.value),
    (VT.CHOICE, pb.Constraints(allowed_values=["low", "high"]), StringValue(value="low"), StringValue(value="high"), lambda m: m.value),
    (VT.MODULE, pb.Constraints(allowed_values=["Predict", "ChainOfThought"]), StringValue(value="Predict"), StringValue(value="ChainOfThought"), lambda m: m.value),
    (VT.EMBEDDING, pb.Constraints(dimension=3), pb.Embedding(values=[0.5, -1.0, 2.0]), pb.Embedding(values=[1.0, 0.0, 0.25]), lambda m: list(m.values)),
    (VT.TENSOR, pb.Constraints(shape=[2, 2], dtype="float32"), pb.Tensor(shape=[2, 2], dtype="float32", data=f32(1, 2, 3, 4)), pb.Tensor(shape=[2, 2], dtype="float32", data=f32(0, 0, 0, 1)), lambda m: (list(m.shape), m.dtype, bytes(m.data))),
]  # fmt: skip


@pytest.mark.parametrize(("vtype", "constraints", "initial", "later", "native"), ROUND_TRIPS)
async def test_every_type_round_trips(
    client: Client,
    vtype: pb.VariableType,
    constraints: pb.Constraints | None,
    initial: Any,
    later: Any,
    native: Callable[[Any], Any],
) -> None:
    session = await new_session(client)
    variable = await register(client, session, "v", vtype, packed(initial), constraints)
    assert (variable.version, variable.type, variable.name, variable.session_id) == (1, vtype, "v", session)
    assert variable.metadata == {"unit": "test"} and variable.last_update_source == "pytest"
    assert variable.created_at is not None and variable.created_at == variable.last_updated_at
    assert variable.value is not None
    assert variable.value.type_url == packed(initial).type_url
    assert native(variable.value.unpack()) == native(initial)

    set_response = await client(
        client.stub.set_variable(
            pb.SetVariableRequest(
                session_id=session, variable_identifier="v", value=packed(later), source="writer"
            )
        )
    )
    assert set_response.variable is not None and set_response.variable.version == 2
    by_id = await client(
        client.stub.get_variable(pb.GetVariableRequest(session_id=session, variable_identifier=variable.id))
    )
    assert by_id.variable is not None and by_id.variable.value is not None
    assert native(by_id.variable.value.unpack()) == native(later)
    assert (by_id.variable.version, by_id.variable.last_update_source) == (2, "writer")
    if constraints is not None:
        assert by_id.variable.constraints == constraints


# (type, constraints, a valid initial value, a value breaking a rule, words the message must contain)
REFUSALS: list[tuple[pb.VariableType, pb.Constraints | None, Any, Any, list[str]]] = [
    (VT.FLOAT, pb.Constraints(maximum=100), DoubleValue(value=1), DoubleValue(value=100.5), ["above maximum 100", "100.5"]),
    (VT.FLOAT, pb.Constraints(minimum=0), DoubleValue(value=1), DoubleValue(value=-1), ["below minimum 0", "-1.0"]),
    (VT.FLOAT, None, DoubleValue(value=1), DoubleValue(value=math.nan), ["NaN"]),
    (VT.INTEGER, pb.Constraints(minimum=1, maximum=10), Int64Value(value=5), Int64Value(value=11), ["above maximum 10", "11"]),
    (VT.INTEGER, pb.Constraints(minimum=1), Int64Value(value=5), Int64Value(value=0), ["below minimum 1", "0"]),
    (VT.STRING, pb.Constraints(max_length=3), StringValue(value="abc"), StringValue(value="abcd"), ["longer than max_length 3", "'abcd'"]),
    (VT.STRING, pb.Constraints(min_length=2), StringValue(value="ab"), StringValue(value="a"), ["shorter than min_length 2", "'a'"]),
    (VT.STRING, pb.Constraints(pattern="[0-9]+"), StringValue(value="42"), StringValue(value="4x"), ["does not match pattern '[0-9]+'", "'4x'"]),
    (VT.CHOICE, pb.Constraints(allowed_values=["a", "b"]), StringValue(value="a"), StringValue(value="c"), ["not one of the allowed values", "'c'"]),
    (VT.MODULE, pb.Constraints(allowed_values=["Predict"]), StringValue(value="Predict"), StringValue(value="React"), ["not one of the allowed values", "'React'"]),
    (VT.EMBEDDING, pb.Constraints(dimension=2), pb.Embedding(values=[1, 2]), pb.Embedding(values=[1, 2, 3]), ["has 3 values but the dimension constraint is 2"]),
    (VT.EMBEDDING, None, pb.Embedding(values=[1, 2]), pb.Embedding(values=[1, math.inf]), ["element 1 is inf"]),
    (VT.TENSOR, pb.Constraints(shape=[2]), pb.Tensor(shape=[2], dtype="int8", data=b"ab"), pb.Tensor(shape=[3], dtype="int8", data=b"abc"), ["differs from the shape constraint [2]"]),
    (VT.TENSOR, pb.Constraints(dtype="int8"), pb.Tensor(shape=[2], dtype="int8", data=b"ab"), pb.Tensor(shape=[2], dtype="uint8", data=b"ab"), ["differs from the dtype constraint 'int8'"]),
    (VT.TENSOR, None, pb.Tensor(shape=[2], dtype="int8", data=b"ab"), pb.Tensor(shape=[2], dtype="int16", data=b"ab"), ["needs 4 bytes of data, got 2"]),
    # A value of another type than the variable's.
    (VT.BOOLEAN, None, BoolValue(value=True), Int64Value(value=1), ["expects an Any of 'type.googleapis.com/google.protobuf.BoolValue'", "Int64Value"]),
    (VT.INTEGER, None, Int64Value(value=1), DoubleValue(value=1.0), ["google.protobuf.Int64Value", "DoubleValue"]),
]  # fmt: skip


@pytest.mark.parametrize(("vtype", "constraints", "initial", "bad", "fragments"), REFUSALS)
async def test_constraint_failures_are_invalid_argument_and_change_nothing(
    client: Client,
    vtype: pb.VariableType,
    constraints: pb.Constraints | None,
    initial: Any,
    bad: Any,
    fragments: list[str],
) -> None:
    session = await new_session(client)
    before = await register(client, session, "knob", vtype, packed(initial), constraints)
    await expect_status(
        client,
        client.stub.set_variable(
            pb.SetVariableRequest(session_id=session, variable_identifier="knob", value=packed(bad))
        ),
        Status.INVALID_ARGUMENT,
        "variable 'knob'",
        *fragments,
    )
    # A refused initial value is refused the same way, and registers nothing.
    await expect_status(
        client,
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id=session,
                name="other",
                type=vtype,
                initial_value=packed(bad),
                constraints=constraints,
            )
        ),
        Status.INVALID_ARGUMENT,
        "variable 'other'",
        *fragments,
    )
    after = await client(client.stub.list_variables(pb.ListVariablesRequest(session_id=session)))
    assert after.variables == [before]


async def test_malformed_requests_are_invalid_argument(client: Client) -> None:
    session = await new_session(client)
    cases = [
        (pb.RegisterVariableRequest(session_id=session, name="x", type=VT.FLOAT), ["a value is required"]),
        (
            pb.RegisterVariableRequest(
                session_id=session, name="x", type=VT.UNSPECIFIED, initial_value=packed(DoubleValue(value=1))
            ),
            ["type 0 is not one of"],
        ),
        (
            pb.RegisterVariableRequest(
                session_id=session,
                name="x",
                type=VT.FLOAT,
                initial_value=PbAny(
                    type_url="type.googleapis.com/google.protobuf.DoubleValue", value=b"\xff"
                ),
            ),
            ["payload is not a valid google.protobuf.DoubleValue"],
        ),
        (
            pb.RegisterVariableRequest(
                session_id=session, name="9 lives", type=VT.FLOAT, initial_value=packed(DoubleValue(value=1))
            ),
            ["variable name '9 lives' must match"],
        ),
        (
            # A name of an id's form could never be reached by name (ids are looked up first).
            pb.RegisterVariableRequest(
                session_id=session,
                name="var_" + "0" * 32,
                type=VT.FLOAT,
                initial_value=packed(DoubleValue(value=1)),
            ),
            ["has the form of a variable id"],
        ),
        (
            pb.RegisterVariableRequest(
                session_id=session,
                name="x",
                type=VT.STRING,
                initial_value=packed(StringValue(value="a")),
                constraints=pb.Constraints(minimum=1),
            ),
            ["constraint 'minimum' applies only to float, integer"],
        ),
    ]
    for request, fragments in cases:
        await expect_status(
            client, client.stub.register_variable(request), Status.INVALID_ARGUMENT, *fragments
        )
    await expect_status(
        client,
        client.stub.get_variable(pb.GetVariableRequest(session_id="", variable_identifier="x")),
        Status.INVALID_ARGUMENT,
        "session_id is required",
    )
    await expect_status(
        client,
        client.stub.create_session(pb.CreateSessionRequest(session_id="bad id!")),
        Status.INVALID_ARGUMENT,
        "session_id 'bad id!' must match",
    )
    await expect_status(
        client,
        client.stub.create_session(pb.CreateSessionRequest(ttl_seconds=-5)),
        Status.INVALID_ARGUMENT,
        "ttl_seconds must be a positive number",
    )


async def test_not_found_and_already_exists(client: Client) -> None:
    session = await new_session(client, "s")
    await register(client, session, "a", VT.BOOLEAN, packed(BoolValue(value=True)))
    await expect_status(
        client,
        client.stub.create_session(pb.CreateSessionRequest(session_id="s")),
        Status.ALREADY_EXISTS,
        "'s'",
    )
    await expect_status(
        client,
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id="s", name="a", type=VT.BOOLEAN, initial_value=packed(BoolValue(value=False))
            )
        ),
        Status.ALREADY_EXISTS,
        "already has a variable named 'a'",
    )
    not_found_calls = [
        client.stub.get_session(pb.GetSessionRequest(session_id="nope")),
        client.stub.cleanup_session(pb.CleanupSessionRequest(session_id="nope")),
        client.stub.list_variables(pb.ListVariablesRequest(session_id="nope")),
        client.stub.get_variable(pb.GetVariableRequest(session_id="nope", variable_identifier="a")),
        client.stub.get_variable(pb.GetVariableRequest(session_id="s", variable_identifier="zzz")),
        client.stub.delete_variable(pb.DeleteVariableRequest(session_id="s", variable_identifier="zzz")),
        client.stub.set_variable(
            pb.SetVariableRequest(
                session_id="s", variable_identifier="zzz", value=packed(BoolValue(value=True))
            )
        ),
    ]
    for call in not_found_calls:
        await expect_status(client, call, Status.NOT_FOUND)
    await expect_status(
        client,
        client.stub.get_variables(
            pb.GetVariablesRequest(session_id="s", variable_identifiers=["a", "b", "c"])
        ),
        Status.NOT_FOUND,
        "has no variables 'b', 'c'",
    )


async def test_batch_get_set_list_delete(client: Client) -> None:
    session = await new_session(client)
    x = await register(client, session, "x", VT.INTEGER, packed(Int64Value(value=1)))
    await register(
        client, session, "y", VT.STRING, packed(StringValue(value="a")), pb.Constraints(max_length=2)
    )

    got = await client(
        client.stub.get_variables(
            pb.GetVariablesRequest(session_id=session, variable_identifiers=["y", x.id])
        )
    )
    assert [v.name for v in got.variables] == ["y", "x"]

    batch = await client(
        client.stub.set_variables(
            pb.SetVariablesRequest(
                session_id=session,
                writes=[
                    pb.VariableWrite(
                        variable_identifier="x", value=packed(Int64Value(value=2)), expected_version=1
                    ),
                    pb.VariableWrite(variable_identifier="y", value=packed(StringValue(value="b"))),
                ],
                source="batch",
            )
        )
    )
    assert [(v.name, v.version, v.last_update_source) for v in batch.variables] == [
        ("x", 2, "batch"),
        ("y", 2, "batch"),
    ]

    # One bad write refuses the whole batch: x keeps version 2.
    await expect_status(
        client,
        client.stub.set_variables(
            pb.SetVariablesRequest(
                session_id=session,
                writes=[
                    pb.VariableWrite(variable_identifier="x", value=packed(Int64Value(value=3))),
                    pb.VariableWrite(variable_identifier="y", value=packed(StringValue(value="too long"))),
                ],
            )
        ),
        Status.INVALID_ARGUMENT,
        "variable 'y'",
        "longer than max_length 2",
    )
    await expect_status(
        client,
        client.stub.set_variables(pb.SetVariablesRequest(session_id=session, writes=[])),
        Status.INVALID_ARGUMENT,
        "at least one write",
    )
    listed = await client(client.stub.list_variables(pb.ListVariablesRequest(session_id=session)))
    assert [(v.name, v.version) for v in listed.variables] == [("x", 2), ("y", 2)]

    await client(
        client.stub.delete_variable(pb.DeleteVariableRequest(session_id=session, variable_identifier="x"))
    )
    listed = await client(client.stub.list_variables(pb.ListVariablesRequest(session_id=session)))
    assert [v.name for v in listed.variables] == ["y"]


async def test_compare_and_set_conflict_is_aborted_with_the_current_version(client: Client) -> None:
    session = await new_session(client)
    await register(client, session, "n", VT.INTEGER, packed(Int64Value(value=0)))
    write = pb.SetVariableRequest(
        session_id=session, variable_identifier="n", value=packed(Int64Value(value=1)), expected_version=1
    )
    first = await client(client.stub.set_variable(write))
    assert first.variable is not None and first.variable.version == 2
    await expect_status(
        client,
        client.stub.set_variable(write),
        Status.ABORTED,
        "variable 'n'",
        "expected version 1, but the current version is 2",
    )
    await expect_status(
        client,
        client.stub.set_variables(
            pb.SetVariablesRequest(
                session_id=session,
                writes=[
                    pb.VariableWrite(
                        variable_identifier="n", value=packed(Int64Value(value=5)), expected_version=9
                    )
                ],
            )
        ),
        Status.ABORTED,
        "current version is 2",
    )


async def test_unexpected_fault_is_internal_without_a_traceback(
    client: Client, server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(server.store, "list_sessions", explode)
    with caplog.at_level(logging.ERROR, logger="trio_bridge"):
        message = await expect_status(
            client, client.stub.list_sessions(pb.ListSessionsRequest()), Status.INTERNAL
        )
    assert message == INTERNAL_MESSAGE
    assert "secret" not in message and "Traceback" not in message
    assert any("secret internals" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    # The server keeps serving.
    assert (await client(client.stub.ping(pb.PingRequest(message="still here")))).message == "still here"


async def test_ttl_expiry_over_the_wire(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery, aio_loop: Any, store_kind: str
) -> None:
    # In memory, TTLs run on the server's (mock) clock; on etcd, leases run on etcd's real time.
    ttl = 30.0 if store_kind == "memory" else 3.0
    server = await start_server(nursery, session_ttl=ttl)

    with connect(server) as client:
        await new_session(client, "short-lived")
        await new_session(client, "kept-alive")
        for _ in range(3):
            if store_kind == "memory":
                mock_clock.jump(ttl * 2 / 3)
            else:
                await real_seconds(ttl / 2)
            await client(client.stub.get_session(pb.GetSessionRequest(session_id="kept-alive")))
        # Two TTLs or more idle for "short-lived": it was removed without anyone asking.
        if store_kind == "memory":
            await trio.testing.wait_all_tasks_blocked()
            assert server.store.cache.session_count == 1
        else:
            await eventually(lambda: server.store.cache.session_count == 1)  # etcd's expiry, then the feed
        await expect_status(
            client,
            client.stub.get_session(pb.GetSessionRequest(session_id="short-lived")),
            Status.NOT_FOUND,
            "'short-lived' not found",
        )
        listed = await client(client.stub.list_sessions(pb.ListSessionsRequest()))
        assert [s.session_id for s in listed.sessions] == ["kept-alive"]


def _raw_call(target: str, path: str, payload: bytes) -> tuple[Any, str]:
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(path)  # no serializers: the payload goes out as given
        try:
            call(payload, timeout=10)
        except grpc.RpcError as error:
            return error.code(), error.details()
    raise AssertionError("the server accepted an undecodable request")


async def test_undecodable_request_is_invalid_argument(server: RunningServer, client: Client) -> None:
    import grpc

    code, details = await trio.to_thread.run_sync(
        _raw_call,
        f"{server.host}:{server.port}",
        "/unified_bridge.UnifiedBridge/CreateSession",
        b"\x0a\x02\xff\xfe",  # session_id with invalid UTF-8
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed CreateSessionRequest message" in details
    assert server.metrics.rpc_count("CreateSession", "INVALID_ARGUMENT") == 1
    assert (await client(client.stub.ping(pb.PingRequest(message="ok")))).message == "ok"


async def test_a_malformed_session_id_is_invalid_argument_from_every_rpc(client: Client) -> None:
    # Issue #10, observation 11: CreateSession said INVALID_ARGUMENT, Watch, GetSession and
    # ListVariables said NOT_FOUND. One rule: a malformed id is malformed input.
    bad = "bad id!"
    value = packed(DoubleValue(value=1.0))
    stub = client.stub
    calls = {
        "CreateSession": stub.create_session(pb.CreateSessionRequest(session_id=bad)),
        "GetSession": stub.get_session(pb.GetSessionRequest(session_id=bad)),
        "CleanupSession": stub.cleanup_session(pb.CleanupSessionRequest(session_id=bad)),
        "ListVariables": stub.list_variables(pb.ListVariablesRequest(session_id=bad)),
        "RegisterVariable": stub.register_variable(
            pb.RegisterVariableRequest(session_id=bad, name="t", type=VT.FLOAT, initial_value=value)
        ),
        "GetVariable": stub.get_variable(pb.GetVariableRequest(session_id=bad, variable_identifier="t")),
        "GetVariables": stub.get_variables(
            pb.GetVariablesRequest(session_id=bad, variable_identifiers=["t"])
        ),
        "SetVariable": stub.set_variable(
            pb.SetVariableRequest(session_id=bad, variable_identifier="t", value=value)
        ),
        "SetVariables": stub.set_variables(
            pb.SetVariablesRequest(
                session_id=bad, writes=[pb.VariableWrite(variable_identifier="t", value=value)]
            )
        ),
        "DeleteVariable": stub.delete_variable(
            pb.DeleteVariableRequest(session_id=bad, variable_identifier="t")
        ),
    }
    for method, call in calls.items():
        message = await expect_status(
            client, call, Status.INVALID_ARGUMENT, "session_id 'bad id!' must match"
        )
        assert message, method
    too_long = "s" * 129
    await expect_status(
        client,
        stub.get_session(pb.GetSessionRequest(session_id=too_long)),
        Status.INVALID_ARGUMENT,
        "129 characters",
    )

    async def watch() -> None:
        async for _ in stub.watch_variables(pb.WatchVariablesRequest(session_id=bad)):
            pass

    with pytest.raises(GRPCError) as caught:
        await trio_asyncio.aio_as_trio(watch)()
    assert caught.value.status == Status.INVALID_ARGUMENT
    assert "session_id 'bad id!' must match" in (caught.value.message or "")

"""gRPC server reflection, v1 and v1alpha: what grpcurl, evans and Postman see of the server without the
.proto. The client is a stock one, grpcio-reflection's, on a grpcio channel (blocking: it runs in a
thread, the server in the test's Trio run)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import trio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest, ServerReflectionResponse
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub

from tests.support import start_server
from trio_bridge import RunningServer, VariableType
from trio_bridge._encoding import type_url_for

T = TypeVar("T")

BRIDGE = "unified_bridge.UnifiedBridge"
HEALTH = "grpc.health.v1.Health"
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
#: The reflection method of each version. grpcio-reflection has stubs for v1alpha only; v1 has the same
#: messages in another package, so the same bytes reach it under its own path.
PATHS = {version: f"/{version}/ServerReflectionInfo" for version in (V1, V1ALPHA)}
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
TOKEN = "alice-token-0123456789abcdef"


def _target(server: RunningServer) -> str:
    return f"{server.host}:{server.port}"


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking grpcio code off the Trio thread (the server runs on it)."""
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fn, *args)


def _ask(
    channel: grpc.Channel, version: str, requests: list[ServerReflectionRequest], **call: Any
) -> list[ServerReflectionResponse]:
    """Send ``requests`` on one reflection stream of ``version``; return the answers, in order."""
    method = channel.stream_stream(
        PATHS[version],
        request_serializer=ServerReflectionRequest.SerializeToString,
        response_deserializer=ServerReflectionResponse.FromString,
    )
    return list(method(iter(requests), timeout=10, **call))


def _reachable(pool: descriptor_pool.DescriptorPool, service: str) -> dict[str, Descriptor | EnumDescriptor]:
    """Every message and enum type a service's methods use, through every field, by full name; each
    one resolved by the pool (which asks the server for the files it lacks)."""
    found: dict[str, Descriptor | EnumDescriptor] = {}
    pending = [t for m in pool.FindServiceByName(service).methods for t in (m.input_type, m.output_type)]
    while pending:
        message = pending.pop()
        if message.full_name in found:
            continue
        found[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None:
                pending.append(field.message_type)
            if field.enum_type is not None:
                found[field.enum_type.full_name] = field.enum_type
    return found


@pytest.fixture
def reflected(server: RunningServer) -> Iterator[tuple[grpc.Channel, descriptor_pool.DescriptorPool]]:
    """A grpcio channel to ``server`` and a descriptor pool fed only by its reflection service."""
    with grpc.insecure_channel(_target(server)) as channel:
        yield channel, descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))


async def test_lists_every_service(reflected: tuple[grpc.Channel, Any]) -> None:
    channel, _ = reflected
    services = await _in_thread(lambda: ProtoReflectionDescriptorDatabase(channel).get_services())
    assert sorted(services) == sorted([BRIDGE, HEALTH, V1, V1ALPHA])


async def test_describes_every_method_and_message_without_the_proto(
    server: RunningServer, reflected: tuple[grpc.Channel, descriptor_pool.DescriptorPool]
) -> None:
    _, pool = reflected
    bridge = await _in_thread(pool.FindServiceByName, BRIDGE)
    served = {path.rsplit("/", 1)[1]: handler for path, handler in server.service.__mapping__().items()}
    described = {method.name: method for method in bridge.methods}
    assert sorted(described) == sorted(served)  # every method the server answers, and no other
    for name, handler in served.items():
        method = described[name]
        assert method.input_type.name == handler.request_type.__name__, name
        assert method.output_type.name == handler.reply_type.__name__, name
        assert (method.client_streaming, method.server_streaming) == (
            handler.cardinality.client_streaming,
            handler.cardinality.server_streaming,
        ), name

    types = await _in_thread(_reachable, pool, BRIDGE)
    assert {"google.protobuf.Any", "google.protobuf.Timestamp", "unified_bridge.VariableType"} <= set(types)
    assert {"unified_bridge.Variable", "unified_bridge.Session", "unified_bridge.VariableUpdate"} <= set(
        types
    )
    # And what the Anys carry: a client decodes values with no .proto either.
    for vtype in VariableType:
        name = type_url_for(vtype).rsplit("/", 1)[1]
        assert (await _in_thread(pool.FindMessageTypeByName, name)).full_name == name

    health = await _in_thread(pool.FindServiceByName, HEALTH)
    assert sorted(m.name for m in health.methods) == ["Check", "Watch"]
    assert "grpc.health.v1.HealthCheckResponse.ServingStatus" in await _in_thread(_reachable, pool, HEALTH)
    for version in (V1, V1ALPHA):  # every service listed is described, reflection's own too
        reflection = await _in_thread(pool.FindServiceByName, version)
        assert [m.name for m in reflection.methods] == ["ServerReflectionInfo"]


async def test_a_client_built_from_reflection_alone_calls_the_server(
    reflected: tuple[grpc.Channel, descriptor_pool.DescriptorPool],
) -> None:
    """As grpcurl does: messages built from the reflected descriptors, values packed as Anys."""
    channel, pool = reflected

    def scenario() -> None:
        def message(full_name: str, /, **fields: Any) -> Any:
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))(**fields)

        def call(method: str, request: Any) -> Any:
            descriptor = pool.FindMethodByName(f"{BRIDGE}.{method}")
            unary = channel.unary_unary(
                f"/{BRIDGE}/{method}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=message_factory.GetMessageClass(descriptor.output_type).FromString,
            )
            return unary(request, timeout=10)

        pong = call("Ping", message("unified_bridge.PingRequest", message="reflected"))
        assert pong.message == "reflected" and pong.server_time.seconds > 0
        session = call("CreateSession", message("unified_bridge.CreateSessionRequest")).session.session_id
        packed = message(
            "google.protobuf.Any",
            type_url=type_url_for(VariableType.FLOAT),
            value=message("google.protobuf.DoubleValue", value=21.5).SerializeToString(),
        )
        registered = call(
            "RegisterVariable",
            message(
                "unified_bridge.RegisterVariableRequest",
                session_id=session,
                name="temperature",
                type=pool.FindEnumTypeByName("unified_bridge.VariableType")
                .values_by_name["VARIABLE_TYPE_FLOAT"]
                .number,
                initial_value=packed,
            ),
        )
        got = call(
            "GetVariable",
            message(
                "unified_bridge.GetVariableRequest",
                session_id=session,
                variable_identifier=registered.variable.id,
            ),
        ).variable
        assert got.value.type_url == type_url_for(VariableType.FLOAT)
        value = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.protobuf.DoubleValue"))
        assert value.FromString(got.value.value).value == 21.5

    await _in_thread(scenario)


@pytest.mark.parametrize("version", [V1, V1ALPHA])
async def test_each_version_answers_on_one_stream(server: RunningServer, version: str) -> None:
    requests = [
        ServerReflectionRequest(list_services=""),
        ServerReflectionRequest(file_containing_symbol=BRIDGE),
        ServerReflectionRequest(file_by_filename="google/protobuf/timestamp.proto"),
        ServerReflectionRequest(file_containing_symbol="unified_bridge.NoSuchThing"),
        ServerReflectionRequest(file_by_filename="no/such/file.proto"),
    ]

    def ask() -> list[ServerReflectionResponse]:
        with grpc.insecure_channel(_target(server)) as channel:
            if version == V1ALPHA:  # grpcio-reflection's own stub
                return list(ServerReflectionStub(channel).ServerReflectionInfo(iter(requests), timeout=10))
            return _ask(channel, version, requests)

    listed, bridge, timestamp, no_symbol, no_file = await _in_thread(ask)
    assert sorted(s.name for s in listed.list_services_response.service) == sorted(
        [BRIDGE, HEALTH, V1, V1ALPHA]
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in bridge.file_descriptor_response.file_descriptor_proto
    ]
    # The file first, then what it imports, in one answer (as the protocol asks: grpclib's alone sent
    # only the file, leaving clients to ask for each import).
    assert files[0].name == "unified_bridge.proto"
    assert sorted(f.name for f in files[1:]) == [
        "google/protobuf/any.proto",
        "google/protobuf/timestamp.proto",
    ]
    assert files[0].package == "unified_bridge"
    assert [s.name for s in files[0].service] == ["UnifiedBridge"]
    (timestamp_file,) = timestamp.file_descriptor_response.file_descriptor_proto
    assert descriptor_pb2.FileDescriptorProto.FromString(timestamp_file).message_type[0].name == "Timestamp"
    for missing in (no_symbol, no_file):
        assert missing.error_response.error_code == NOT_FOUND


@pytest.mark.parametrize("version", [V1, V1ALPHA])
async def test_reflection_describes_itself_as_grpc_does(server: RunningServer, version: str) -> None:
    """Its own messages and service, as it describes them, are grpc's reflection.proto (here:
    grpcio-reflection's v1alpha, moved to the version's package)."""

    def shape(file: descriptor_pb2.FileDescriptorProto) -> str:
        file.ClearField("name")
        file.ClearField("options")
        for message in file.message_type:
            for field in message.field:
                field.ClearField("json_name")
        return text_format.MessageToString(file)

    def served() -> descriptor_pb2.FileDescriptorProto:
        with grpc.insecure_channel(_target(server)) as channel:
            (reply,) = _ask(channel, version, [ServerReflectionRequest(file_containing_symbol=version)])
        return descriptor_pb2.FileDescriptorProto.FromString(
            reply.file_descriptor_response.file_descriptor_proto[0]
        )

    official = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(official)
    assert shape(await _in_thread(served)) == shape(official).replace(
        V1ALPHA.rsplit(".", 1)[0], version.rsplit(".", 1)[0]
    )


async def test_a_method_is_found_by_its_full_name(server: RunningServer) -> None:
    """grpcurl's ``describe unified_bridge.UnifiedBridge.Ping`` asks for the file of the method."""
    requests = [
        ServerReflectionRequest(file_containing_symbol=f"{BRIDGE}.Ping"),
        ServerReflectionRequest(file_containing_symbol=f"{BRIDGE}.NoSuchMethod"),
    ]

    def ask() -> list[ServerReflectionResponse]:
        with grpc.insecure_channel(_target(server)) as channel:
            return _ask(channel, V1, requests)

    found, missing = await _in_thread(ask)
    first = found.file_descriptor_response.file_descriptor_proto[0]
    assert descriptor_pb2.FileDescriptorProto.FromString(first).name == "unified_bridge.proto"
    assert found.original_request == requests[0]
    assert missing.error_response.error_code == NOT_FOUND
    assert f"{BRIDGE}.NoSuchMethod" in missing.error_response.error_message


# ---- tokens --------------------------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"alice {TOKEN}\n")
    return path


@pytest.mark.parametrize("version", [V1, V1ALPHA])
async def test_a_token_server_describes_itself_only_to_a_token(
    nursery: trio.Nursery, token_file: Path, version: str
) -> None:
    server = await start_server(nursery, token_file=token_file)
    listing = [ServerReflectionRequest(list_services="")]

    def refused(metadata: list[tuple[str, str]]) -> grpc.RpcError:
        with grpc.insecure_channel(_target(server)) as channel, pytest.raises(grpc.RpcError) as caught:
            _ask(channel, version, listing, metadata=metadata)
        return caught.value

    def answered() -> list[str]:
        with grpc.insecure_channel(_target(server)) as channel:
            (reply,) = _ask(channel, version, listing, metadata=[("authorization", f"Bearer {TOKEN}")])
        return [s.name for s in reply.list_services_response.service]

    for metadata, fragment in (
        ([], "this server requires a token"),
        ([("authorization", "Bearer not-a-real-token-at-all")], "the token is not valid"),
        ([("authorization", TOKEN)], "must be 'Bearer TOKEN'"),
    ):
        error = await _in_thread(refused, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert fragment in error.details()
        assert "not-a-real-token" not in error.details()  # never echoed
    assert sorted(await _in_thread(answered)) == sorted([BRIDGE, HEALTH, V1, V1ALPHA])

"""WriteVariables (issue #13): a producer's stream of writes over a real server, each answered in order
with what SetVariables would have answered, and BridgeClient pipelining its writes over one such
stream (falling back to SetVariables where the server has none)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h2.events
import pytest
import trio
import trio.testing
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import decode_metadata

import trio_bridge._service
from tests.h2raw import RawH2, grpc_message, messages_in, request_headers
from tests.support import LOOPBACK, Client, DroppingProxy, eventually, start_server, start_watch
from trio_bridge import (
    BridgeError,
    Constraints,
    InvalidArgument,
    MemoryStore,
    NotFound,
    ResourceExhausted,
    RunningServer,
    Unavailable,
    VariableType,
    VersionConflict,
)
from trio_bridge._bridge import run_in_asyncio
from trio_bridge._client_writes import MAX_WRITES_IN_FLIGHT
from trio_bridge._service import WRITE_PATH, WRITE_RUN_REQUESTS, WRITE_STREAM_LABEL, UnifiedBridgeService
from trio_bridge.client import BridgeClient
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import Int64Value, StringValue

T = TypeVar("T")

WRITES = "WriteVariables"  # each request of a stream is counted as a call of this name
ALICE = "alice-token-0123456789abcdef"  # scope all
BOB = "bob-token-0123456789abcdef"  # scope own


async def in_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a plain-asyncio coroutine function (what a user's program is) from the Trio test."""
    result: T = await trio_asyncio.aio_as_trio(fn)()
    return result


def integer(value: int) -> PbAny:
    return PbAny.pack(Int64Value(value=value))


def text(value: str) -> PbAny:
    return PbAny.pack(StringValue(value=value))


def write(identifier: str, value: PbAny, expected_version: int | None = None) -> pb.VariableWrite:
    return pb.VariableWrite(variable_identifier=identifier, value=value, expected_version=expected_version)


def request(request_id: int, session: str, *writes: pb.VariableWrite, **fields: Any) -> pb.WriteRequest:
    return pb.WriteRequest(request_id=request_id, session_id=session, writes=list(writes), **fields)


@dataclass
class Answer:
    """What a stream, or a unary call, ended with: the status, its message and trailers."""

    status: Status
    message: str = ""
    trailers: dict[str, str] | None = None


async def exchange(
    server: RunningServer, requests: Sequence[pb.WriteRequest], *, token: str | None = None
) -> tuple[list[pb.WriteResult], Answer]:
    """Send ``requests`` on one WriteVariables stream and end it; every result, and how it ended."""

    async def run() -> tuple[list[pb.WriteResult], Answer]:
        metadata = {"authorization": f"Bearer {token}"} if token else None
        channel = Channel(server.host, server.port)
        results: list[pb.WriteResult] = []
        stream = channel.request(
            WRITE_PATH, Cardinality.STREAM_STREAM, pb.WriteRequest, pb.WriteResult, metadata=metadata
        )
        try:
            async with stream:
                try:
                    for message in requests:
                        await stream.send_message(message)
                    await stream.end()
                except StreamTerminatedError:  # it ended with a status (and a reset) as we sent
                    stream._maybe_raise()
                    raise
                results.extend([result async for result in stream])
        except GRPCError as exc:
            return results, Answer(exc.status, exc.message or "", _trailers(stream))
        finally:
            channel.close()
        return results, Answer(Status.OK)

    return await in_asyncio(run)


def _trailers(stream: Any) -> dict[str, str]:
    raw = stream.trailing_metadata
    if raw is None:
        raw = decode_metadata(stream._stream.trailers or stream._stream.headers or [])
    return {str(k): str(v) for k, v in raw.items()}


async def unary_set(
    server: RunningServer, session: str, *writes: pb.VariableWrite, token: str | None = None
) -> Answer:
    """The same writes by SetVariables: how the call ended."""

    async def run() -> Answer:
        metadata = {"authorization": f"Bearer {token}"} if token else None
        channel = Channel(server.host, server.port)
        stream = channel.request(
            "/unified_bridge.UnifiedBridge/SetVariables",
            Cardinality.UNARY_UNARY,
            pb.SetVariablesRequest,
            pb.SetVariablesResponse,
            metadata=metadata,
        )
        try:
            async with stream:
                await stream.send_message(
                    pb.SetVariablesRequest(session_id=session, writes=list(writes)), end=True
                )
                await stream.recv_message()
        except GRPCError as exc:
            return Answer(exc.status, exc.message or "", _trailers(stream))
        finally:
            channel.close()
        return Answer(Status.OK, "", {})

    return await in_asyncio(run)


def answer_of(result: pb.WriteResult) -> Answer:
    return Answer(Status(result.status), result.message, dict(result.details))


def streams_ended(server: RunningServer) -> float:
    """WriteVariables streams the server has seen end, whatever their status."""
    return sum(server.metrics.rpc_count(WRITE_STREAM_LABEL, status.name) for status in Status)


async def session_with(server: RunningServer, owner: str = "", **variables: tuple[VariableType, Any]) -> str:
    session = (await server.store.create_session(owner=owner)).session_id
    for name, (vtype, value) in variables.items():
        await server.store.register_variable(session, name, vtype, value)
    return session


# ---- the RPC -------------------------------------------------------------------------------------


async def test_results_come_in_request_order_with_their_versions(server: RunningServer) -> None:
    session = await session_with(server, n=(VariableType.INTEGER, 0), m=(VariableType.INTEGER, 0))
    requests = [
        request(100 + i, session, write("n", integer(i)), versions_only=i % 2 == 1) for i in range(40)
    ]
    requests.append(request(7, session, write("n", integer(-1)), write("m", integer(-2))))
    results, ended = await exchange(server, requests)

    assert ended == Answer(Status.OK)
    assert [r.request_id for r in results] == [*range(100, 140), 7]
    assert all(r.status == 0 and r.message == "" for r in results)
    for i, result in enumerate(results[:40]):
        if i % 2:  # versions_only: id, version and revision, no Variable
            (written,) = result.written
            assert (result.variables, written.version) == ([], i + 2)
        else:
            (variable,) = result.variables
            assert (variable.name, variable.version, variable.value) == ("n", i + 2, integer(i))
            assert result.written == []
    assert [(v.name, v.version) for v in results[-1].variables] == [("n", 42), ("m", 2)]
    revisions = [r.written[0].revision for r in results[1:40:2]]
    assert revisions == sorted(set(revisions))  # one revision per write, rising
    assert (await server.store.get_variable(session, "n")).version == 42
    assert server.metrics.rpc_count(WRITES, "OK") == 41  # each request, counted as a call
    assert server.metrics.rpc_count(WRITE_STREAM_LABEL, "OK") == 1  # and the stream, once
    assert server.metrics.rpc_count("SetVariables", "OK") == 0


async def test_a_refused_write_gets_what_set_variables_answers_and_the_stream_goes_on(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, max_session_bytes=20_000)
    session = await session_with(
        server, n=(VariableType.INTEGER, 0), s=(VariableType.STRING, ""), m=(VariableType.INTEGER, 0)
    )
    await server.store.set_variable(session, "n", 1)  # version 2
    refused = {  # (first, the one whose message depends on what the session holds)
        "a value over max_session_bytes": write("s", text("x" * 30_000)),
        "a compare-and-set conflict": write("n", integer(5), expected_version=1),
        "a value of the wrong type": write("n", text("five")),
        "an unknown variable": write("nope", integer(1)),
    }
    expected = {why: await unary_set(server, session, bad) for why, bad in refused.items()}
    # SetVariables refuses each with a status and trailers, and changes nothing:
    assert [(a.status, a.trailers) for a in expected.values()] == [
        (
            Status.RESOURCE_EXHAUSTED,
            {"trio-bridge-limit": "max_session_bytes", "trio-bridge-limit-value": "20000"},
        ),
        (
            Status.ABORTED,
            {
                "trio-bridge-variable": "n",
                "trio-bridge-expected-version": "1",
                "trio-bridge-current-version": "2",
            },
        ),
        (Status.INVALID_ARGUMENT, {}),
        (Status.NOT_FOUND, {}),
    ]
    requests = []
    for index, bad in enumerate(refused.values()):  # each refusal followed by a write that succeeds
        requests += [
            request(2 * index + 1, session, bad),
            request(2 * index + 2, session, write("m", integer(10))),
        ]
    results, ended = await exchange(server, requests)

    assert ended == Answer(Status.OK)
    assert [answer_of(r) for r in results[0::2]] == list(expected.values())
    assert [r.variables[0].version for r in results[1::2]] == [2, 3, 4, 5]
    assert server.metrics.rpc_count(WRITES, "OK") == 4
    for status in (Status.ABORTED, Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.RESOURCE_EXHAUSTED):
        assert server.metrics.rpc_count(WRITES, status.name) == 1
    n, s = await server.store.get_variables(session, ["n", "s"])
    assert (n.version, s.version) == (2, 1)


async def test_a_batch_is_applied_whole_or_not_at_all(server: RunningServer) -> None:
    session = await session_with(server, a=(VariableType.INTEGER, 0), b=(VariableType.STRING, ""))
    results, _ = await exchange(
        server,
        [
            request(1, session, write("a", integer(1)), write("b", integer(2))),  # b's value is refused
            request(2, session, write("a", integer(3)), write("b", text("ok")), versions_only=True),
        ],
    )
    assert results[0].status == Status.INVALID_ARGUMENT.value and "variable 'b'" in results[0].message
    assert results[1].status == 0
    assert [(w.version, w.revision) for w in results[1].written] == [(2, results[1].written[0].revision)] * 2
    a, b = await server.store.get_variables(session, ["a", "b"])
    assert (a.value, a.version, b.value, b.version) == (3, 2, "ok", 2)  # the refused batch left nothing


async def test_a_batch_is_checked_in_the_order_a_client_fixes_it(server: RunningServer) -> None:
    """Names first, then every value decoded, then versions: the store decodes each value as it looks
    the variable up (one look-up per write), and the order is SetVariables' own."""
    session = await session_with(server, a=(VariableType.INTEGER, 0), b=(VariableType.STRING, ""))
    stale, bad_value, unknown = (
        write("a", integer(1), expected_version=7),
        write("b", integer(2)),
        write("c", text("x")),
    )
    cases = [
        ((stale, bad_value), Status.INVALID_ARGUMENT, "variable 'b' (string): expects an Any of"),
        ((stale, bad_value, unknown), Status.NOT_FOUND, "'c'"),
        ((stale, write("b", text("ok"))), Status.ABORTED, "version"),
        # More writes than one etcd transaction takes (the etcd store's own limit): the client's
        # errors come first there too.
        ((unknown, *[stale] * 64), Status.NOT_FOUND, "'c'"),
        ((bad_value, *[stale] * 64), Status.INVALID_ARGUMENT, "variable 'b' (string): expects an Any of"),
    ]
    results, _ = await exchange(
        server, [request(i, session, *writes) for i, (writes, _, _) in enumerate(cases)]
    )
    for result, (writes, status, fragment) in zip(results, cases, strict=True):
        assert (Status(result.status), fragment in result.message) == (status, True), result.message
        assert await unary_set(server, session, *writes) == answer_of(result)  # as SetVariables answers
    a, b = await server.store.get_variables(session, ["a", "b"])
    assert (a.version, b.version) == (1, 1)


async def test_tokens_are_checked_once_for_the_stream_and_the_scope_for_each_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB} own\n")
    server = await start_server(nursery, token_file=tokens)
    alices = await session_with(server, owner="alice", n=(VariableType.INTEGER, 0))
    bobs = await session_with(server, owner="bob", n=(VariableType.INTEGER, 0))

    results, ended = await exchange(server, [request(1, bobs, write("n", integer(1)))])  # no token
    assert (results, ended.status) == ([], Status.UNAUTHENTICATED)
    assert "requires a token" in ended.message
    assert server.metrics.rpc_count(WRITE_STREAM_LABEL, "UNAUTHENTICATED") == 1

    hidden = await unary_set(server, alices, write("n", integer(1)), token=BOB)
    assert (hidden.status, hidden.message) == (
        Status.NOT_FOUND,
        f"session {alices!r} not found (it may have expired)",
    )
    requests = [request(1, alices, write("n", integer(1))), request(2, bobs, write("n", integer(1)))]
    results, ended = await exchange(server, requests, token=BOB)
    assert ended == Answer(Status.OK)
    assert answer_of(results[0]) == hidden  # as if alice's session did not exist
    assert results[1].status == 0
    results, _ = await exchange(server, requests, token=ALICE)  # scope all
    assert [r.status for r in results] == [0, 0]
    assert [v.version for v in await server.store.get_variables(alices, ["n"])] == [2]


async def test_a_message_that_cannot_be_read_ends_the_stream_after_the_results_before_it(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, max_message_bytes=10_000)
    session = await session_with(server, n=(VariableType.INTEGER, 0))
    good = grpc_message(request(1, session, write("n", integer(1))))
    for bad, status, fragment in [
        (b"\x00\x00\x00\x00\x02\xff\xff", Status.INVALID_ARGUMENT, "malformed WriteRequest message"),
        (
            b"\x00" + (20_000).to_bytes(4, "big") + b"x" * 100,
            Status.RESOURCE_EXHAUSTED,
            "max_message_bytes=10000",
        ),
    ]:
        raw = await RawH2.open(server.port)
        stream_id = raw.conn.get_next_available_stream_id()
        raw.conn.send_headers(stream_id, request_headers(WRITE_PATH, server.port))
        raw.conn.send_data(stream_id, good + bad + good)
        await raw.flush()
        with trio.fail_after(10):
            await raw.read_until(
                lambda e, s=stream_id: (
                    isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) and e.stream_id == s
                )
            )
        (result,) = [pb.WriteResult.parse(m) for m in messages_in(raw.data_of(stream_id))]
        assert (result.request_id, result.status) == (1, 0)
        trailers = raw.trailers_of(stream_id)
        assert trailers is not None and trailers["grpc-status"] == str(status.value)
        assert fragment in trailers["grpc-message"]
        await raw.aclose()
    assert (await server.store.get_variable(session, "n")).version == 3  # the good ones before


async def test_requests_that_arrived_together_are_answered_together_in_order(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests already received whole are applied in a run and their results leave in one DATA
    frame; a refused one keeps its place; an unreadable message after them ends the stream once the
    results before it are sent; past WRITE_RUN_REQUESTS, a run ends and the next begins."""
    monkeypatch.setattr(trio_bridge._service, "WRITE_SLICE_SECONDS", 60.0)  # runs end by count here
    server = await start_server(nursery)
    session = await session_with(server, n=(VariableType.INTEGER, 0))
    count = WRITE_RUN_REQUESTS + 6
    messages = [
        grpc_message(
            request(
                i, session, write("n", text("no")) if i == 3 else write("n", integer(i)), versions_only=True
            )
        )
        for i in range(1, count + 1)
    ]
    raw = await RawH2.open(server.port)
    stream_id = raw.conn.get_next_available_stream_id()
    raw.conn.send_headers(stream_id, request_headers(WRITE_PATH, server.port))
    raw.conn.send_data(stream_id, b"".join(messages) + b"\x00\x00\x00\x00\x02\xff\xff")
    await raw.flush()  # one DATA frame: every request is there before the first is read
    with trio.fail_after(10):
        await raw.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
    frames = [
        event.data
        for event in raw.events
        if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id
    ]
    results = [pb.WriteResult.parse(m) for m in messages_in(b"".join(frames))]
    assert [r.request_id for r in results] == list(range(1, count + 1))
    assert [r.status for r in results[:4]] == [0, 0, Status.INVALID_ARGUMENT.value, 0]
    assert [r.written[0].version for r in results[3:6]] == [4, 5, 6]
    # A run of WRITE_RUN_REQUESTS results, then the rest (the first request may have been read, and
    # answered alone, before the others arrived).
    assert [len(list(messages_in(frame))) for frame in frames] in (
        [WRITE_RUN_REQUESTS, count - WRITE_RUN_REQUESTS],
        [1, WRITE_RUN_REQUESTS, count - WRITE_RUN_REQUESTS - 1],
    )
    trailers = raw.trailers_of(stream_id)
    assert trailers is not None and trailers["grpc-status"] == str(Status.INVALID_ARGUMENT.value)
    assert "malformed WriteRequest message" in trailers["grpc-message"]
    await raw.aclose()


async def test_a_client_that_stops_reading_results_stops_the_stream_and_its_bytes_are_bounded(
    nursery: trio.Nursery,
) -> None:
    """Results wait for the client's HTTP/2 window, which it never opens: the server applies one
    write, holds its result, and reads no more; what the client sends meanwhile waits in the
    connection's buffer, up to max_connection_buffer_bytes, past which it is refused."""
    server = await start_server(nursery, max_message_bytes=10_000, max_connection_buffer_bytes=20_000)
    session = await session_with(server, s=(VariableType.STRING, ""))
    raw = await RawH2.open(server.port, initial_window=0)  # the server may send no DATA at all
    stream_id = raw.conn.get_next_available_stream_id()
    raw.conn.send_headers(stream_id, request_headers(WRITE_PATH, server.port))

    def send(first: int, last: int) -> None:  # requests of 2 KB each
        for index in range(first, last + 1):
            message = request(
                index, session, write("s", text(f"{index:04d}" + "x" * 2000)), versions_only=True
            )
            raw.conn.send_data(stream_id, grpc_message(message))

    async def read_by_the_server() -> None:
        """Until the server has read every frame sent so far (a call answered by a status alone: it
        needs no window)."""
        probe = raw.start_call(
            "/unified_bridge.UnifiedBridge/GetSession", pb.GetSessionRequest(session_id="none")
        )
        await raw.flush()
        with trio.fail_after(10):
            await raw.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == probe)

    send(1, 1)
    await raw.flush()
    with trio.fail_after(10):
        await eventually(lambda: server.metrics.rpc_count(WRITES, "OK") == 1)
    send(2, 6)  # 10 KB: they wait, unread
    await read_by_the_server()
    assert server.metrics.rpc_count(WRITES, "OK") == 1
    assert raw.data_of(stream_id) == b""  # the first result waits for the window
    send(7, 16)  # 20 KB more: over the connection's budget
    await read_by_the_server()
    assert server.metrics.rpc_count(WRITES, "OK") == 1

    raw.conn.increment_flow_control_window(2**16, stream_id=stream_id)
    await raw.flush()
    with trio.fail_after(10):
        await raw.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
    (result,) = [pb.WriteResult.parse(m) for m in messages_in(raw.data_of(stream_id))]
    assert (result.request_id, result.status, result.written[0].version) == (1, 0, 2)
    trailers = raw.trailers_of(stream_id)
    assert trailers is not None and trailers["grpc-status"] == str(Status.RESOURCE_EXHAUSTED.value)
    assert trailers["trio-bridge-limit"] == "max_connection_buffer_bytes"
    assert server.metrics.rpc_count(WRITES, "OK") == 1  # the only write ever applied
    assert (await server.store.get_variable(session, "s")).value.startswith("0001")
    await raw.aclose()


async def test_watchers_see_every_written_version_once_and_in_order(
    server: RunningServer, client: Client, nursery: trio.Nursery
) -> None:
    session = await session_with(server, t=(VariableType.INTEGER, 0), u=(VariableType.INTEGER, 0))
    watcher = await start_watch(
        nursery, client, pb.WatchVariablesRequest(session_id=session, include_initial_values=True)
    )
    await watcher.wait_synced()
    requests = [
        request(i, session, write("t", integer(i)), *([write("u", integer(i))] if i % 10 == 0 else []))
        for i in range(1, 301)
    ]
    results, _ = await exchange(server, requests)
    assert all(r.status == 0 for r in results)
    t, u = await server.store.get_variables(session, ["t", "u"])
    with trio.fail_after(30):
        await watcher.wait_for(lambda w: u.version in w.versions(u.id) and t.version in w.versions(t.id))
    assert watcher.versions(t.id) == list(range(1, 302))
    assert watcher.versions(u.id) == list(range(1, 32))
    changes = [x for x in watcher.updates if x.update_type == "value_change"]
    revisions = [x.revision for x in changes]
    assert revisions == sorted(revisions)


# ---- BridgeClient ----------------------------------------------------------------------------------


async def test_concurrent_sets_are_pipelined_over_one_stream_in_call_order(
    server: RunningServer, aio_loop: Any
) -> None:
    session = await session_with(server, n=(VariableType.INTEGER, 0))

    async def scenario() -> list[tuple[int, int]]:
        async with BridgeClient(server.host, server.port) as client:
            await client.set(session, "n", -1)  # learns the type: version 2
            written = await asyncio.gather(*(client.set(session, "n", i) for i in range(1000)))
            assert server.service.open_write_streams == 1
            return [(v.value, v.version) for v in written]

    assert await in_asyncio(scenario) == [(i, i + 3) for i in range(1000)]  # applied in call order
    await eventually(lambda: streams_ended(server) == 1)  # close() ended the one stream of 1,001 writes
    assert server.service.open_write_streams == 0
    assert server.metrics.rpc_count(WRITES, "OK") == 1001
    assert server.metrics.rpc_count("SetVariables", "OK") == 0


@contextlib.contextmanager
def older_server_code(how: str) -> Iterator[None]:
    """Servers started in the block answer WriteVariables as one without it does: with UNIMPLEMENTED
    from the generated base class ("generated", what this server did before it had the RPC), or as
    grpclib answers a method it does not know ("unknown": a server built from an older .proto)."""
    with pytest.MonkeyPatch.context() as patch:
        if how == "generated":

            async def as_generated(self: UnifiedBridgeService, stream: Any) -> None:
                await pb.UnifiedBridgeBase.__mapping__(self)[WRITE_PATH].func(stream)

            patch.setattr(UnifiedBridgeService, "_write_variables", as_generated)
        else:
            mapping = UnifiedBridgeService.__mapping__

            def without(self: UnifiedBridgeService) -> dict[str, Any]:
                return {path: handler for path, handler in mapping(self).items() if path != WRITE_PATH}

            patch.setattr(UnifiedBridgeService, "__mapping__", without)
        yield


@pytest.mark.parametrize("how", ["generated", "unknown"])
async def test_writes_to_a_server_without_write_variables_go_by_set_variables(
    nursery: trio.Nursery, aio_loop: Any, how: str
) -> None:
    with older_server_code(how):
        server = await start_server(nursery)
    session = await session_with(server, n=(VariableType.INTEGER, 0))

    async def scenario() -> list[int]:
        async with BridgeClient(server.host, server.port) as client:
            first = await client.set(session, "n", 0)
            assert (server.host, server.port) in client._writes.unsupported  # remembered
            written = await asyncio.gather(*(client.set(session, "n", i) for i in range(50)))
            return [first.version, *sorted(v.version for v in written)]

    assert await in_asyncio(scenario) == list(range(2, 53))
    assert server.metrics.rpc_count("SetVariables", "OK") == 51
    if how == "generated":  # asked once; the answer is remembered
        assert streams_ended(server) == server.metrics.rpc_count(WRITE_STREAM_LABEL, "UNIMPLEMENTED") == 1


async def test_refused_writes_raise_what_set_variables_raises(
    nursery: trio.Nursery, aio_loop: Any, store_kind: str
) -> None:
    store = MemoryStore(max_session_bytes=20_000) if store_kind == "memory" else None
    new = await start_server(nursery, store=store, max_session_bytes=20_000)
    with older_server_code("unknown"):
        old = await start_server(nursery, store=store, max_session_bytes=20_000)

    async def refusals(server: RunningServer, session: str) -> list[tuple[Any, ...]]:
        await server.store.create_session(session)
        await server.store.register_variable(
            session, "n", VariableType.INTEGER, 0, constraints=Constraints(maximum=10)
        )
        await server.store.register_variable(session, "s", VariableType.STRING, "")
        await server.store.register_variable(session, "gone", VariableType.INTEGER, 0)

        async def scenario() -> list[BaseException]:
            caught: list[BaseException] = []
            async with BridgeClient(server.host, server.port) as client:
                await client.set(session, "n", 1)
                await client.set(session, "gone", 1)  # its type is known: the next one is sent
                await trio_asyncio.trio_as_aio(server.store.delete_variable)(session, "gone")
                for attempt in (
                    lambda: client.set(session, "n", 5, expected_version=1),
                    lambda: client.set(session, "n", 11),
                    lambda: client.set(session, "gone", 2),
                    lambda: client.set(session, "s", "x" * 30_000),
                    lambda: client.set_many(session, {"n": 2, "s": "y" * 30_000}),
                ):
                    with pytest.raises(BridgeError) as refused:
                        await attempt()
                    caught.append(refused.value)
            return caught

        caught = await in_asyncio(scenario)
        return [
            (
                type(e),
                str(e).replace(session, "SESSION"),
                getattr(e, "current", None),
                getattr(e, "limit", None),
            )
            for e in caught
        ]

    by_stream = await refusals(new, "s-new")
    assert [kind for kind, *_ in by_stream] == [
        VersionConflict,
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        ResourceExhausted,
    ]
    assert by_stream[0][2] == 2 and by_stream[3][3] == by_stream[4][3] == "max_session_bytes"
    assert by_stream == await refusals(old, "s-old")
    assert new.metrics.rpc_count("SetVariables", "OK") == 0
    assert old.metrics.rpc_count(WRITES, "OK") == 0


async def test_writes_sent_when_the_stream_breaks_raise_unavailable_and_the_others_go_on_a_new_one(
    server: RunningServer, nursery: trio.Nursery
) -> None:
    session = await session_with(server, n=(VariableType.INTEGER, 0))
    proxy = DroppingProxy(server.port)
    await nursery.start(proxy.run)

    async def break_once_sent() -> None:
        await trio.testing.wait_all_tasks_blocked()  # every write the window lets out is sent
        assert proxy.drop_all() == 1

    async def scenario() -> tuple[list[Any], int]:
        async with BridgeClient(LOOPBACK, proxy.port) as client:
            await client.set(session, "n", 0)  # the stream is open: version 2
            proxy.freeze_all()  # what is sent from now on never arrives
            calls = [
                asyncio.ensure_future(client.set(session, "n", i)) for i in range(1, MAX_WRITES_IN_FLIGHT + 7)
            ]
            await trio_asyncio.trio_as_aio(break_once_sent)()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            return outcomes, (await client.set(session, "n", 100)).version

    outcomes, later = await in_asyncio(scenario)
    sent, waiting = outcomes[:MAX_WRITES_IN_FLIGHT], outcomes[MAX_WRITES_IN_FLIGHT:]
    assert all(isinstance(e, Unavailable) and "lost the connection" in str(e) for e in sent), sent[:3]
    assert [(v.value, v.version) for v in waiting] == [(MAX_WRITES_IN_FLIGHT + i, 2 + i) for i in range(1, 7)]
    assert later == 9
    assert proxy.connections_made == 2
    assert server.metrics.rpc_count(WRITES, "OK") == 8  # the writes that were sent never arrived


async def test_shutdown_answers_the_write_being_applied_then_ends_the_stream(
    server: RunningServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await session_with(server, n=(VariableType.INTEGER, 0))
    applying, release = trio.Event(), trio.Event()
    real_set = server.store.set_variables

    async def held(*args: Any, **kwargs: Any) -> Any:
        if not release.is_set():
            applying.set()
            await release.wait()
        return await real_set(*args, **kwargs)

    monkeypatch.setattr(server.store, "set_variables", held)
    outcomes: list[Any] = []
    finished = trio.Event()

    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            await client.get(session, "n")  # learns the type
            calls = [asyncio.ensure_future(client.set(session, "n", i)) for i in (1, 2, 3)]
            outcomes.extend(await asyncio.gather(*calls, return_exceptions=True))
            with pytest.raises(Unavailable) as refused:
                await client.set(session, "n", 4)
            outcomes.append(refused.value)

    async def write() -> None:
        await in_asyncio(scenario)
        finished.set()

    drained = trio.Event()

    async def drain() -> None:
        await server.service.drain()
        drained.set()

    nursery.start_soon(write)
    with trio.fail_after(10):
        await applying.wait()
    nursery.start_soon(drain)
    await trio.testing.wait_all_tasks_blocked()
    assert not drained.is_set()  # it waits for the write being applied
    release.set()
    with trio.fail_after(10):
        await drained.wait()
        await finished.wait()
    first, *others = outcomes
    assert (first.value, first.version) == (1, 2)
    assert [type(e) for e in others] == [Unavailable] * 3
    assert all(str(e).endswith("the server is shutting down") for e in others)
    assert (await server.store.get_variable(session, "n")).version == 2  # the one being applied only
    assert server.metrics.rpc_count(WRITES, "OK") == 1
    assert server.metrics.rpc_count(WRITE_STREAM_LABEL, "UNAVAILABLE") == 2  # drained; then refused


async def test_the_timeout_applies_to_each_write_and_the_stream_goes_on(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(nursery)
    session = await session_with(server, n=(VariableType.INTEGER, 0))
    release = trio.Event()
    real_set = server.store.set_variables

    async def held(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await real_set(*args, **kwargs)

    monkeypatch.setattr(server.store, "set_variables", held)

    async def scenario() -> int:
        async with BridgeClient(server.host, server.port, timeout=5) as client:
            await client.get(session, "n")
            with pytest.raises(Unavailable, match="did not answer a write within 5s; it may or may not"):
                await client.set(session, "n", 1)
            release.set()  # it is applied after all
            version = (await client.set(session, "n", 2)).version
            assert server.service.open_write_streams == 1  # the same stream
            return version

    assert await in_asyncio(scenario) == 3
    assert server.metrics.rpc_count(WRITES, "OK") == 2


async def test_writes_move_on_to_the_next_address_when_theirs_is_gone(
    nursery: trio.Nursery, aio_loop: Any, store_kind: str
) -> None:
    store = MemoryStore() if store_kind == "memory" else None
    first = trio.CancelScope()

    async def run_first(task_status: trio.TaskStatus[RunningServer]) -> None:
        with first:
            async with trio.open_nursery() as inner:
                task_status.started(await start_server(inner, store=store))

    a: RunningServer = await nursery.start(run_first)
    b = await start_server(nursery, store=store)
    session = await session_with(a, n=(VariableType.INTEGER, 0))

    async def stop_a() -> None:
        first.cancel()  # a's write stream ends UNAVAILABLE, its connections close
        with trio.fail_after(10):
            await eventually(lambda: a.service.open_write_streams == 0)

    async def scenario() -> tuple[int, int, int]:
        async with BridgeClient(a.host, a.port, also=[(b.host, b.port)]) as client:
            before = (await client.set(session, "n", 1)).version
            await trio_asyncio.trio_as_aio(stop_a)()
            after = (await client.set(session, "n", 2)).version
            return before, after, client.port

    assert await in_asyncio(scenario) == (2, 3, b.port)
    assert b.metrics.rpc_count(WRITES, "OK") == 1


async def test_the_write_stream_counts_as_a_held_open_stream(nursery: trio.Nursery, aio_loop: Any) -> None:
    server = await start_server(nursery, max_watch_streams_per_connection=1)
    session = await session_with(server, n=(VariableType.INTEGER, 0))

    async def scenario() -> list[int]:
        versions = []
        async with BridgeClient(server.host, server.port) as client:
            async with contextlib.aclosing(client.watch(session, ["n"])) as events:
                async for event in events:
                    if event.kind == "synced":  # the watch holds the connection's one stream
                        versions.append((await client.set(session, "n", 1)).version)
                        break
            await trio_asyncio.trio_as_aio(eventually)(lambda: server.service.open_watches == 0)
            versions.append((await client.set(session, "n", 2)).version)
        return versions

    assert await in_asyncio(scenario) == [2, 3]
    assert server.metrics.rpc_count(WRITE_STREAM_LABEL, "RESOURCE_EXHAUSTED") == 1  # then SetVariables
    assert server.metrics.rpc_count("SetVariables", "OK") == 1
    assert server.metrics.rpc_count(WRITES, "OK") == 1  # once the watch was gone


# ---- the bridge under a write stream ----------------------------------------------------------------


async def test_a_read_cancelled_as_its_data_arrives_leaves_its_task_alone(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    """A write stream's read (run_in_asyncio) cancelled in the same turn as its data arrived (the
    client ended its call as its last request came, or the server drained): asyncio had already
    queued the read's wake-up, which then rescheduled the task wherever it waited next, or after it
    had ended (TrioInternalError: KeyError in task_exited, seen at a server's shutdown)."""
    future: asyncio.Future[str] = aio_loop.create_future()
    reading = trio.CancelScope()
    never = trio.Event()
    woken: list[str] = []

    async def read() -> str:
        return await future

    async def reader() -> None:
        with reading:
            await run_in_asyncio(read)
        await never.wait()  # only the end of the test ends this
        woken.append("woken by the read's late wake-up")

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    future.set_result("data")  # asyncio queues the wake-up
    reading.cancel()  # before it runs
    await trio.testing.wait_all_tasks_blocked()
    assert reading.cancelled_caught
    assert woken == []

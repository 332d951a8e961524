"""The trio↔asyncio bridge on its own: eager ``run_in_asyncio`` and the coalescing transport."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from typing import Any

import grpclib.const
import grpclib.server
import pytest
import trio
import trio.testing
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration

from trio_bridge._bridge import (
    BoundAddress,
    _run_callbacks_in_batches,
    open_asyncio_loop,
    release_request_buffers,
    run_in_asyncio,
    send_messages,
    serve_grpc,
)
from trio_bridge._connections import ServerH2Connection, _CoalescingTransport
from trio_bridge.proto import unified_bridge as pb


async def test_a_coroutine_that_never_waits_finishes_in_the_calling_trio_task(aio_loop: Any) -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def immediate(value: int) -> int:
        ran_in.append(asyncio.current_task())
        return value * 2

    assert await run_in_asyncio(immediate, 21) == 42
    assert ran_in == [None]  # no asyncio task was needed


async def test_a_coroutine_that_waits_goes_on_in_the_calling_trio_task(aio_loop: Any) -> None:
    steps: list[str] = []
    caller = trio.lowlevel.current_task()

    async def waits_twice() -> str:
        for label in ("started", "after a bare yield", "after a future"):
            assert asyncio.current_task() is None  # never handed to an asyncio task
            assert trio.lowlevel.current_task() is caller
            steps.append(label)
            if label == "started":
                await asyncio.sleep(0)
            elif label == "after a bare yield":
                await asyncio.sleep(0.001)
        return "done"

    assert await run_in_asyncio(waits_twice) == "done"
    assert steps == ["started", "after a bare yield", "after a future"]


async def test_cancelling_the_trio_caller_cancels_the_future_it_waits_for(aio_loop: Any) -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        await future

    with trio.move_on_after(0.01) as scope:
        await run_in_asyncio(waits)
    assert scope.cancelled_caught
    assert future.cancelled()  # as asyncio's Task.cancel does: nothing is left waiting on it


@pytest.mark.parametrize("wait_first", [False, True])
async def test_errors_reach_the_trio_caller(aio_loop: Any, wait_first: bool) -> None:
    async def fails() -> None:
        if wait_first:
            await asyncio.sleep(0)
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        await run_in_asyncio(fails)


async def test_the_result_of_an_awaited_future_is_passed_in(aio_loop: Any) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    async def waits_for_future() -> str:
        return "got " + await future

    async with trio.open_nursery() as nursery:
        results: list[str] = []

        async def call() -> None:
            results.append(await run_in_asyncio(waits_for_future))

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        future.set_result("it")
    assert results == ["got it"]


async def test_cancelling_the_trio_caller_cancels_the_coroutine_where_it_waits(aio_loop: Any) -> None:
    events: list[str] = []
    waiting = trio.Event()

    async def waits_forever() -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            events.append("finally")

    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_in_asyncio, waits_forever)
            await waiting.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert events == ["cancelled", "finally"]


async def test_a_coroutine_cancelled_at_its_first_wait_is_cancelled_there(aio_loop: Any) -> None:
    events: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(0)
            events.append("resumed")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            events.append("finally")

    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled before the first wait began
        await run_in_asyncio(waits)
    assert scope.cancelled_caught
    assert events == ["cancelled", "finally"]


async def test_a_coroutine_that_will_not_be_cancelled_is_closed(aio_loop: Any) -> None:
    events: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            events.append("cancelled, waits again")
        try:
            await asyncio.sleep(0)
        finally:
            events.append("closed")

    with trio.CancelScope() as scope:
        scope.cancel()
        await run_in_asyncio(stubborn)
    assert scope.cancelled_caught
    assert events == ["cancelled, waits again", "closed"]


async def test_asyncio_callbacks_ready_together_run_together_in_order(aio_loop: Any) -> None:
    # trio-asyncio ran one callback per round of Trio's scheduler: a call's every step waited behind
    # every callback queued before it, a round each (issue #10: the good client's p99 under attack).
    _run_callbacks_in_batches(aio_loop)
    rounds = 0
    ran: list[tuple[int, int]] = []
    all_ran = trio.Event()

    async def count_rounds() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await trio.lowlevel.checkpoint()

    def callback(index: int) -> None:
        ran.append((index, rounds))
        if index == 19:
            all_ran.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_rounds)
        for index in range(20):
            aio_loop.call_soon(callback, index)
        await all_ran.wait()
        nursery.cancel_scope.cancel()
    assert [index for index, _ in ran] == list(range(20))
    assert len({round_ for _, round_ in ran}) <= 2  # one batch (the first callback may come alone)


async def test_trio_tasks_started_from_asyncio_in_one_batch_all_run(aio_loop: Any) -> None:
    _run_callbacks_in_batches(aio_loop)
    results: list[int] = []

    async def in_trio(value: int) -> int:
        await trio.lowlevel.checkpoint()
        return value

    async def many() -> None:
        results.extend(await asyncio.gather(*(trio_asyncio.trio_as_aio(in_trio)(i) for i in range(50))))

    await trio_asyncio.aio_as_trio(many)()
    assert results == list(range(50))


class _RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


def _in_asyncio(fn: Any) -> Any:
    return trio_asyncio.aio_as_trio(fn)()


async def test_writes_of_one_turn_leave_in_one_write_in_order(aio_loop: Any) -> None:
    real = _RecordingTransport()
    transport = _CoalescingTransport(real)

    async def scenario() -> None:
        transport.write(b"a")
        transport.write(bytearray(b"b"))
        transport.write(b"")
        transport.write(memoryview(b"c"))
        assert real.writes == []  # nothing left before the end of the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert real.writes == [b"abc"]
        transport.write(b"d")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert real.writes == [b"abc", b"d"]

    await _in_asyncio(scenario)


async def test_a_calls_trailers_leave_at_once_with_what_was_gathered(aio_loop: Any) -> None:
    """Issue #13: with 1,000 watchers, a writer's reply waited behind every delivery its write woke
    (47 ms): deliveries run before the loop's next turn, where the coalesced bytes left."""
    real = _RecordingTransport()
    transport = _CoalescingTransport(real)
    delivery = _frame(0x0, 0x0, 3, b"upd")  # DATA on a watch stream: waits for the turn
    reply = _frame(0x1, 0x4, 1, b"hdr") + _frame(0x0, 0x0, 1, b"msg")  # a reply's headers and message
    trailers = _frame(0x1, 0x5, 1, b"tr")  # HEADERS with END_STREAM (and END_HEADERS)

    async def scenario() -> None:
        transport.write(delivery)
        transport.write(reply)
        assert real.writes == []
        transport.write(trailers)
        assert real.writes == [delivery + reply + trailers]  # at once, in order
        transport.write(b"a")  # not frames: gathered as before
        assert real.writes == [delivery + reply + trailers]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert real.writes == [delivery + reply + trailers, b"a"]

    await _in_asyncio(scenario)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


async def test_close_sends_what_is_gathered_and_abort_drops_it(aio_loop: Any) -> None:
    async def scenario() -> None:
        closing = _RecordingTransport()
        transport = _CoalescingTransport(closing)
        transport.write(b"goaway")
        transport.close()
        assert closing.writes == [b"goaway"]
        assert closing.closed and transport.is_closing()

        aborting = _RecordingTransport()
        transport = _CoalescingTransport(aborting)
        transport.write(b"lost")
        transport.abort()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert aborting.writes == [] and aborting.aborted

    await _in_asyncio(scenario)


class _OneMethod:
    """A server of one method, /test.One/Call, handled by ``handler``."""

    def __init__(self, handler: Any, cardinality: grpclib.const.Cardinality) -> None:
        self.handler = handler
        self.cardinality = cardinality

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/test.One/Call": grpclib.const.Handler(
                self.handler, self.cardinality, pb.PingRequest, pb.PingResponse
            )
        }


async def _no_drain() -> None:
    pass


async def _serve(
    nursery: trio.Nursery,
    handler: Any,
    cardinality: grpclib.const.Cardinality = grpclib.const.Cardinality.UNARY_STREAM,
) -> BoundAddress:
    async def serve(task_status: trio.TaskStatus[BoundAddress]) -> None:
        async with open_asyncio_loop():
            await serve_grpc(
                [_OneMethod(handler, cardinality)],
                host="127.0.0.1",
                port=0,
                drain=_no_drain,
                grace=1,
                task_status=task_status,
            )

    bound: BoundAddress = await nursery.start(serve)
    return bound


def _message(size: int) -> pb.PingResponse:
    return pb.PingResponse(server_version=chr(ord("a") + size % 26) * size)


async def test_a_batch_reaches_the_client_as_the_same_messages_in_order(nursery: trio.Nursery) -> None:
    # Messages larger than a frame (16 KiB) and batches larger than the client's stream window (64 KiB):
    # the batch is split where HTTP/2 demands, and waits for the window to open.
    batches = [
        [0, 1, 200],
        [],
        [20_000],
        [30_000, 5, 40_000, 70_000],
        [3],
        [100_000, 100_000, 7],
        [5, 200_000],
    ]
    counted: list[int] = []

    async def send(stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.recv_message()
        for batch in batches:
            await send_messages(stream, [_message(size) for size in batch])
        counted.append(stream._messages_sent)

    bound = await _serve(nursery, send)

    async def receive() -> list[pb.PingResponse]:
        config = Configuration(http2_stream_window_size=65_535, http2_connection_window_size=65_535)
        async with Channel(bound.host, bound.port, config=config) as channel:
            stream = channel.request(
                "/test.One/Call", grpclib.const.Cardinality.UNARY_STREAM, pb.PingRequest, pb.PingResponse
            )
            async with stream:
                await stream.send_message(pb.PingRequest(), end=True)
                return [message async for message in stream]

    received = await _in_asyncio(receive)
    expected = [_message(size) for batch in batches for size in batch]
    assert [m.server_version for m in received] == [m.server_version for m in expected]
    assert counted == [len(expected)]


async def test_a_stream_lets_go_of_its_receive_buffer_once_its_request_is_read_to_the_end(
    nursery: trio.Nursery,
) -> None:
    released: list[bool] = []
    buffers: list[object] = []

    async def handler(stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.recv_message()
        released.append(release_request_buffers(stream))  # the client has not ended its side yet
        await send_messages(stream, [_message(1)])
        assert await stream.recv_message() is None  # now it has
        released.append(release_request_buffers(stream))
        released.append(release_request_buffers(stream))  # again: nothing more to do
        buffers.append(stream._stream.buffer)
        await send_messages(stream, [_message(2), _message(70_000)])  # sending is unaffected

    bound = await _serve(nursery, handler, grpclib.const.Cardinality.STREAM_STREAM)

    async def call() -> list[pb.PingResponse]:
        async with Channel(bound.host, bound.port) as channel:
            stream = channel.request(
                "/test.One/Call", grpclib.const.Cardinality.STREAM_STREAM, pb.PingRequest, pb.PingResponse
            )
            async with stream:
                await stream.send_message(pb.PingRequest())
                first = await stream.recv_message()
                await stream.end()
                rest = [message async for message in stream]
            assert first is not None
            return [first, *rest]

    received = await _in_asyncio(call)
    assert [len(m.server_version) for m in received] == [1, 2, 70_000]
    assert released == [False, True, True]
    assert type(buffers[0]).__name__ == "_ReadToEnd"


def _body_without_docstring_and_trace(function: Any) -> str:
    """``function``'s body as an AST dump, less its docstring and any trace logging."""
    (definition,) = ast.parse(textwrap.dedent(inspect.getsource(function))).body
    assert isinstance(definition, ast.FunctionDef)
    body = [
        statement
        for statement in definition.body
        if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))
        and "logger.trace" not in ast.unparse(statement)
    ]
    return "\n".join(ast.dump(statement) for statement in body)


def test_the_untraced_h2_connection_receives_frames_as_h2_does() -> None:
    """Our copy of h2's ``_receive_frame`` less its trace line: when an h2 upgrade changes the
    original, this fails (the copy must be made again from the new one)."""
    import h2.connection

    original = h2.connection.H2Connection._receive_frame
    assert "logger.trace" in inspect.getsource(original)  # what the copy leaves out
    assert _body_without_docstring_and_trace(ServerH2Connection._receive_frame) == (
        _body_without_docstring_and_trace(original)
    )


def _connected_pair() -> tuple[ServerH2Connection, Any]:
    """A server connection (ours) and h2's client, handshaken, with stream 1 open both ways."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.__class__ = ServerH2Connection
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")])
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the client's SETTINGS acknowledgement
    assert isinstance(server, ServerH2Connection)
    return server, client


def _windows(connection: Any) -> tuple[int, int]:
    return connection.outbound_flow_control_window, connection.streams[1].outbound_flow_control_window


def test_a_data_frame_made_without_h2_is_what_h2_makes() -> None:
    ours, _ = _connected_pair()
    theirs, _ = _connected_pair()
    for data in [b"", b"x", b"\x00" * 1000, bytes(range(256)) * 60]:
        made = ours.data_frame(1, data)
        theirs.send_data(1, data)
        assert made == theirs.data_to_send()
        assert _windows(ours) == _windows(theirs)
    # What h2 had waiting to send goes first (here, a PING).
    for connection in (ours, theirs):
        connection.ping(b"12345678")
    made = ours.data_frame(1, b"after")
    theirs.send_data(1, b"after")
    assert made == theirs.data_to_send() and ours.data_to_send() == b""
    # Past the window, the frame size, or once the stream is closed: nothing made, nothing changed.
    window = min(_windows(ours))
    assert ours.data_frame(1, b"y" * (window + 1)) is None
    assert ours.data_frame(1, b"y" * (ours.max_outbound_frame_size + 1)) is None
    assert ours.data_frame(3, b"y") is None  # no such stream
    assert _windows(ours) == _windows(theirs)
    ours.end_stream(1)
    assert ours.data_frame(1, b"y") is None
    ours.data_to_send()
    fresh, _ = _connected_pair()
    fresh.reset_stream(1)
    assert fresh.data_frame(1, b"y") is None

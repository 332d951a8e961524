"""Abuse (issue #10): what a client that breaks the rules on purpose can and cannot do to the server.

Raw HTTP/2 (``tests.h2raw``) where no gRPC library would send the frames. The attacks against a server
process, with a well-behaved client measuring its latency beside them, are in ``test_abuse_process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from typing import Any

import h2.errors
import h2.events
import pytest
import trio
import trio.testing
import trio_asyncio
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest
from grpclib.const import Status
from grpclib.health.v1.health_pb2 import HealthCheckRequest

from tests.h2raw import PING, RawH2, grpc_message, request_headers
from tests.support import eventually, start_server
from trio_bridge import RunningServer
from trio_bridge.client import BridgeClient
from trio_bridge.proto import unified_bridge as pb

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("header", [True, False])
async def test_a_compressed_message_is_unimplemented_without_a_traceback(
    header: bool, server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue #10, observation 6: `grpc-encoding: gzip` was answered INTERNAL with a traceback in the log.
    raw = await RawH2.open(server.port)
    body = zlib.compress(bytes(pb.PingRequest(message="hi")))
    stream_id = raw.conn.get_next_available_stream_id()
    extra = {"grpc-encoding": "gzip"} if header else {}
    raw.conn.send_headers(stream_id, request_headers(PING, server.port, **extra))
    raw.conn.send_data(stream_id, b"\x01" + len(body).to_bytes(4, "big") + body, end_stream=True)
    await raw.flush()
    await _wait_ended(raw, stream_id)
    trailers = raw.trailers_of(stream_id)
    assert trailers is not None and trailers["grpc-status"] == str(Status.UNIMPLEMENTED.value)
    assert "compressed" in trailers["grpc-message"] and "identity" in trailers["grpc-message"]
    assert server.metrics.rpc_count("Ping", "UNIMPLEMENTED") == 1
    assert _errors(caplog) == []
    await raw.aclose()


@pytest.mark.parametrize(
    ("path", "request_message", "end"),
    [
        (HEALTH_WATCH, HealthCheckRequest(), True),
        # Held open by not ending the request stream: reflection answers each request as it comes.
        (REFLECTION, ServerReflectionRequest(list_services=""), False),
    ],
)
async def test_held_open_streams_of_other_services_count_toward_the_watch_stream_limits(
    nursery: trio.Nursery, path: str, request_message: Any, end: bool
) -> None:
    # Issue #10, observation 6: 150 unauthenticated health Watch streams were accepted, held, and
    # counted by no limit. Reflection streams, added for issue #12, count the same way.
    server = await start_server(nursery, max_watch_streams_per_connection=3, max_watch_streams=5)
    raws = [await RawH2.open(server.port) for _ in range(2)]
    first, second = raws
    opened = []
    for _ in range(4):
        opened.append(first.start_call(path, request_message, end=end))
    await first.flush()
    await _wait_ended(first, opened[3])
    trailers = first.trailers_of(opened[3])
    assert trailers is not None and trailers["grpc-status"] == str(Status.RESOURCE_EXHAUSTED.value)
    assert "max_watch_streams_per_connection=3" in trailers["grpc-message"]
    assert trailers["trio-bridge-limit"] == "max_watch_streams_per_connection"
    assert server.service.open_watches == 3

    more = [second.start_call(path, request_message, end=end) for _ in range(3)]
    await second.flush()
    await _wait_ended(second, more[2])
    trailers = second.trailers_of(more[2])
    assert trailers is not None and "max_watch_streams=5" in trailers["grpc-message"]
    assert server.service.open_watches == 5
    for raw in raws:
        await raw.aclose()
    await eventually(lambda: server.service.open_watches == 0)


# ---- HTTP/2 abuse, one connection at a time ------------------------------------------------------------


def _ping_call(raw: RawH2) -> int:
    return raw.start_call(PING, pb.PingRequest(message="x"))


def _partial_ping(raw: RawH2) -> int:
    """Queue a call whose 10,000-byte message stops 4 bytes short: 10,001 bytes wait for the rest."""
    stream_id = raw.conn.get_next_available_stream_id()
    raw.conn.send_headers(stream_id, request_headers(PING, raw.port))
    raw.conn.send_data(stream_id, b"\x00" + (10_000).to_bytes(4, "big") + b"z" * 9_996)
    return stream_id


async def _wait_ended(raw: RawH2, stream_id: int) -> None:
    with trio.fail_after(10):
        await raw.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)


async def _good_ping(server: RunningServer) -> None:
    """A well-behaved call on a connection of its own still works."""
    raw = await RawH2.open(server.port)
    stream_id = _ping_call(raw)
    await raw.flush()
    await _wait_ended(raw, stream_id)
    trailers = raw.trailers_of(stream_id)
    assert trailers is not None and trailers["grpc-status"] == "0"
    await raw.aclose()


async def _expect_calm(raw: RawH2) -> None:
    with trio.fail_after(10):
        await raw.read_to_close()
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_rapid_reset_gets_goaway_enhance_your_calm(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue #10, observation 1: HEADERS + RST_STREAM as fast as possible on one connection grew the
    # server by gigabytes and starved every other client; grpclib started a task per stream, and one
    # reset before its task ran was never released.
    raw = await RawH2.open(server.port)
    for _ in range(20):  # 20 writes of 250 streams opened and reset
        for _ in range(250):
            stream_id = _ping_call(raw)
            raw.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        try:
            await raw.flush()
        except trio.BrokenResourceError:
            break
    await _expect_calm(raw)
    assert any("max_stream_resets_per_second=200" in r.getMessage() for r in caplog.records)
    goaway = raw.goaway()
    assert goaway is not None and b"max_stream_resets_per_second=200" in (goaway.additional_data or b"")
    assert server.metrics.rpc_count("Ping", "OK") == 0  # no reset stream ever reached a handler
    await _good_ping(server)


async def test_streams_reset_in_the_read_that_opened_them_never_start_a_handler(
    server: RunningServer,
) -> None:
    raw = await RawH2.open(server.port)
    for _ in range(150):  # within the budget of 200 resets a second
        stream_id = _ping_call(raw)
        raw.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    last = _ping_call(raw)
    await raw.flush()
    await _wait_ended(raw, last)
    assert raw.goaway() is None
    assert server.metrics.rpc_count("Ping", "OK") == 1  # only the last one
    assert server.metrics.rpc_count("Ping", "CANCELLED") == 0
    await raw.aclose()


async def test_a_ping_flood_gets_goaway_enhance_your_calm(server: RunningServer) -> None:
    # Issue #10, observation 4 (the flood itself; a client that does not read is in the process tests).
    raw = await RawH2.open(server.port)
    for i in range(3000):
        raw.conn.ping(i.to_bytes(8, "big"))
    await raw.flush()
    await _expect_calm(raw)
    goaway = raw.goaway()
    assert goaway is not None and b"max_control_frames_per_second=1000" in (goaway.additional_data or b"")
    await _good_ping(server)


async def test_a_message_in_tiny_frames_gets_goaway_enhance_your_calm(server: RunningServer) -> None:
    # Issue #10, observation 3: a 1 MB message in 1-byte DATA frames cost ~430 bytes of memory a byte.
    raw = await RawH2.open(server.port)
    stream_id = raw.conn.get_next_available_stream_id()
    raw.conn.send_headers(stream_id, request_headers(PING, server.port))
    data = grpc_message(pb.PingRequest(message="y" * 3000))
    for i in range(len(data)):
        raw.conn.send_data(stream_id, data[i : i + 1])
    with contextlib.suppress(trio.BrokenResourceError):  # closed under the flood
        await raw.flush()
    await _expect_calm(raw)
    await _good_ping(server)


async def test_request_bytes_buffered_per_connection_are_bounded(nursery: trio.Nursery) -> None:
    # Issue #10, observation 3: 190 streams each holding a 4 MiB message less 4 bytes, on one connection,
    # held 895 MB.
    server = await start_server(nursery, max_message_bytes=10_000, max_connection_buffer_bytes=25_000)
    raw = await RawH2.open(server.port)
    partial = []
    for _ in range(3):
        stream_id = _partial_ping(raw)
        partial.append(stream_id)
    await raw.flush()
    await _wait_ended(raw, partial[2])
    trailers = raw.trailers_of(partial[2])
    assert trailers is not None and trailers["grpc-status"] == str(Status.RESOURCE_EXHAUSTED.value)
    assert "max_connection_buffer_bytes=25000" in trailers["grpc-message"]
    assert trailers["trio-bridge-limit"] == "max_connection_buffer_bytes"
    assert raw.goaway() is None  # the other calls go on
    for stream_id in partial[:2]:  # and are answered once their message is whole
        raw.conn.send_data(stream_id, b"z" * 4, end_stream=True)
    await raw.flush()
    with trio.fail_after(10):
        for stream_id in partial[:2]:
            await raw.read_until(
                lambda e, s=stream_id: isinstance(e, h2.events.StreamEnded) and e.stream_id == s
            )
    await raw.aclose()


async def test_a_silent_connection_is_closed_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    # Issue #10, observation 2: connections that never sent the preface were held forever.
    server = await start_server(nursery, handshake_timeout_seconds=5)
    silent = await trio.open_tcp_stream("127.0.0.1", server.port)
    started = trio.current_time()
    with trio.fail_after(60):
        while await silent.receive_some():  # the server's SETTINGS, then its end
            pass
    assert trio.current_time() - started >= 5
    await silent.aclose()
    await _good_ping(server)


async def test_an_idle_connection_gets_goaway_then_is_closed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, idle_connection_timeout_seconds=30)
    raw = await RawH2.open(server.port)
    stream_id = _ping_call(raw)
    await raw.flush()
    await raw.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
    answered = trio.current_time()
    with trio.fail_after(120):
        await raw.read_to_close()
    assert trio.current_time() - answered >= 30
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR


async def test_connections_past_max_connections_are_closed_and_later_ones_served(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(nursery, max_connections=3)
    held = [await RawH2.open(server.port) for _ in range(3)]
    refused = await trio.open_tcp_stream("127.0.0.1", server.port)
    with trio.fail_after(10):
        with contextlib.suppress(trio.BrokenResourceError):  # reset: closed at once
            assert await refused.receive_some() == b""
    assert any("max_connections=3" in r.getMessage() for r in caplog.records)
    await held.pop().aclose()
    await eventually(lambda: server.metrics.gauge("trio_bridge_connections_open") < 3)
    await _good_ping(server)
    for raw in held:
        await raw.aclose()


async def test_request_bytes_buffered_on_all_connections_are_bounded(nursery: trio.Nursery) -> None:
    server = await start_server(
        nursery, max_message_bytes=10_000, max_connection_buffer_bytes=25_000, max_request_buffer_bytes=35_000
    )
    raws = [await RawH2.open(server.port) for _ in range(4)]
    streams = []
    for raw in raws:  # 10,001 bytes waiting on each: the fourth goes over 35,000
        stream_id = _partial_ping(raw)
        streams.append(stream_id)
        probe = _ping_call(raw)  # answered once the server has read what came before it
        await raw.flush()
        await _wait_ended(raw, probe)
    last, last_stream = raws[-1], streams[-1]
    await _wait_ended(last, last_stream)
    trailers = last.trailers_of(last_stream)
    assert trailers is not None and "max_request_buffer_bytes=35000" in trailers["grpc-message"]
    for raw in raws:
        await raw.aclose()


async def test_a_connection_that_goes_away_gives_back_its_buffered_bytes(nursery: trio.Nursery) -> None:
    server = await start_server(
        nursery, max_message_bytes=10_000, max_connection_buffer_bytes=25_000, max_request_buffer_bytes=25_000
    )
    for _ in range(5):  # 20,002 bytes waiting each time: over the server's 25,000 unless given back
        raw = await RawH2.open(server.port)
        for _ in range(2):
            _partial_ping(raw)
        probe = _ping_call(raw)
        await raw.flush()
        await _wait_ended(raw, probe)
        assert all(raw.trailers_of(s) is None for s in (1, 3))  # still waiting for the rest
        await raw.aclose()
        await eventually(lambda: server.metrics.gauge("trio_bridge_connections_open") == 0)


async def test_a_client_whose_idle_connection_was_closed_reconnects_on_its_next_call(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, aio_loop: object
) -> None:
    server = await start_server(nursery, idle_connection_timeout_seconds=30)

    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session()).session_id
            await asyncio.sleep(120)  # the server closed the idle connection meanwhile
            assert server.metrics.gauge("trio_bridge_connections_open") == 0
            assert (await client.get_session(session)).session_id == session

    await trio_asyncio.aio_as_trio(scenario)()
    assert server.metrics.rpc_count("GetSession", "OK") == 1

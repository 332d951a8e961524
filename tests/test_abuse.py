"""Abuse (issue #10): what a client that breaks the rules on purpose can and cannot do to the server.

Raw HTTP/2 (``tests.h2raw``) where no gRPC library would send the frames. The attacks against a server
process, with a well-behaved client measuring its latency beside them, are in ``test_abuse_process``.
"""

from __future__ import annotations

import logging
import zlib

import h2.events
import pytest
import trio
from grpclib.const import Status
from grpclib.health.v1.health_pb2 import HealthCheckRequest

from tests.h2raw import PING, RawH2, request_headers
from tests.support import eventually, start_server
from trio_bridge import RunningServer
from trio_bridge.proto import unified_bridge as pb

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


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
    with trio.fail_after(10):
        await raw.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
    trailers = raw.trailers_of(stream_id)
    assert trailers is not None and trailers["grpc-status"] == str(Status.UNIMPLEMENTED.value)
    assert "compressed" in trailers["grpc-message"] and "identity" in trailers["grpc-message"]
    assert server.metrics.rpc_count("Ping", "UNIMPLEMENTED") == 1
    assert _errors(caplog) == []
    await raw.aclose()


async def test_health_watch_streams_count_toward_the_watch_stream_limits(nursery: trio.Nursery) -> None:
    # Issue #10, observation 6: 150 unauthenticated health Watch streams were accepted, held, and
    # counted by no limit.
    server = await start_server(nursery, max_watch_streams_per_connection=3, max_watch_streams=5)
    raws = [await RawH2.open(server.port) for _ in range(2)]
    first, second = raws
    opened = []
    for _ in range(4):
        opened.append(first.start_call(HEALTH_WATCH, HealthCheckRequest(), end=True))
    await first.flush()
    with trio.fail_after(10):
        await first.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == opened[3])
    trailers = first.trailers_of(opened[3])
    assert trailers is not None and trailers["grpc-status"] == str(Status.RESOURCE_EXHAUSTED.value)
    assert "max_watch_streams_per_connection=3" in trailers["grpc-message"]
    assert trailers["trio-bridge-limit"] == "max_watch_streams_per_connection"
    assert server.service.open_watches == 3

    more = [second.start_call(HEALTH_WATCH, HealthCheckRequest(), end=True) for _ in range(3)]
    await second.flush()
    with trio.fail_after(10):
        await second.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == more[2])
    trailers = second.trailers_of(more[2])
    assert trailers is not None and "max_watch_streams=5" in trailers["grpc-message"]
    assert server.service.open_watches == 5
    for raw in raws:
        await raw.aclose()
    await eventually(lambda: server.service.open_watches == 0)

"""Graceful shutdown in-process: draining refuses new calls, and stopping closes client connections."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.support import Client, start_server
from trio_bridge import RunningServer
from trio_bridge.proto import unified_bridge as pb


async def test_draining_refuses_new_calls_with_unavailable(client: Client, server: RunningServer) -> None:
    await client(client.stub.ping(pb.PingRequest()))
    await server.service.drain()  # nothing in flight: returns at once
    with pytest.raises(GRPCError) as caught:
        await client(client.stub.ping(pb.PingRequest()))
    assert caught.value.status == Status.UNAVAILABLE
    assert caught.value.message == "the server is shutting down"
    assert server.metrics.rpc_count("Ping", "UNAVAILABLE") == 1


async def test_stopping_closes_connections_so_clients_do_not_hang(aio_loop: Any) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery)
        channel = Channel(server.host, server.port)
        client = Client(channel)
        assert (await client(client.stub.ping(pb.PingRequest(message="a")))).message == "a"
        protocol = channel._protocol
        assert protocol is not None and not protocol.handler.connection_lost
        nursery.cancel_scope.cancel()
    try:
        # The server sent GOAWAY and closed the connection: the client knows without sending anything.
        assert protocol.handler.connection_lost
        with trio.fail_after(5), pytest.raises((ConnectionError, OSError, GRPCError)):
            await client(client.stub.ping(pb.PingRequest(message="b")))
    finally:
        channel.close()

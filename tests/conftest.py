"""Shared test fixtures: a real server on a free loopback port and a generated client talking to it.

The server runs in pytest-trio's ``nursery`` fixture, so it shuts down when the test ends. Tests that
stop a server themselves start it in their own nursery instead (see ``start_server``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel

from trio_bridge import RunningServer, ServerConfig, SessionStore, serve
from trio_bridge.proto import unified_bridge as pb

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


async def start_server(
    nursery: trio.Nursery, *, store: SessionStore | None = None, **config: Any
) -> RunningServer:
    """Start a server on a free loopback port in ``nursery``; return once it is listening."""
    settings = ServerConfig(host=LOOPBACK, port=0, **config)
    running: RunningServer = await nursery.start(
        lambda task_status: serve(settings, store=store, task_status=task_status)
    )
    return running


class Client:
    """The generated betterproto2 async stub, called from Trio through trio-asyncio."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.stub = pb.UnifiedBridgeStub(channel)

    async def __call__(self, call: Awaitable[T]) -> T:
        """``await client(client.stub.ping(...))``: run one stub call from Trio."""
        result: T = await trio_asyncio.aio_as_trio(call)
        return result


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
async def server(nursery: trio.Nursery, aio_loop: Any) -> RunningServer:
    return await start_server(nursery)


@pytest.fixture
async def client(server: RunningServer, aio_loop: Any) -> AsyncIterator[Client]:
    channel = Channel(server.host, server.port)
    try:
        yield Client(channel)
    finally:
        channel.close()

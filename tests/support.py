"""Test helpers: start a real server on a free loopback port; call the generated client from Trio."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

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

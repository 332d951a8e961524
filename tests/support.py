"""Test helpers: start a real server on a free loopback port; call the generated client from Trio."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio
import trio_asyncio
from grpclib.client import Channel

from trio_bridge import Limits, RunningServer, ServerConfig, Store, serve
from trio_bridge.proto import unified_bridge as pb

T = TypeVar("T")

LOOPBACK = "127.0.0.1"

#: Where the servers of the running test keep their state when it does not say: "memory", or an etcd
#: URL with a prefix of the test's own (set by conftest's ``store_kind`` fixture).
STORE_URL = "memory"


@contextlib.contextmanager
def connect(server: RunningServer, **channel_options: Any) -> Iterator[Client]:
    """A client on a new connection to ``server``, closed when the block ends."""
    channel = Channel(server.host, server.port, **channel_options)
    try:
        yield Client(channel)
    finally:
        channel.close()


async def start_server(
    nursery: trio.Nursery, *, store: Store | None = None, store_url: str | None = None, **config: Any
) -> RunningServer:
    """Start a server on a free loopback port in ``nursery``; return once it is listening. ``config``
    holds ServerConfig fields and Limits fields alike. The server keeps its state in ``store``, else at
    ``store_url``, else in the test's store (``STORE_URL``)."""
    limit_names = {field.name for field in dataclasses.fields(Limits)}
    limits = Limits(**{k: v for k, v in config.items() if k in limit_names})
    others = {k: v for k, v in config.items() if k not in limit_names}
    if store is None:
        others["store"] = store_url or STORE_URL
    settings = ServerConfig(**{"host": LOOPBACK, "port": 0, "limits": limits, **others})
    running: RunningServer = await nursery.start(
        lambda task_status: serve(settings, store=store, task_status=task_status)
    )
    return running


@contextlib.contextmanager
def writes_at_once(server: RunningServer) -> Iterator[None]:
    """The writes made through ``server`` in the block reach its watch streams together, as one
    burst, when the block ends. The in-memory store's writes do anyway (they never suspend); the etcd
    store's feed is held meanwhile (``Feed.held``, a test hook), as a feed that fell behind catches up."""
    feed = getattr(server.store, "feed", None)
    with feed.held() if feed is not None else contextlib.nullcontext():
        yield


async def compact_etcd(server: RunningServer) -> None:
    """With the etcd store: compact etcd's history up to the revision the server has applied, as a
    deployment's auto-compaction would, so that only the server's own bounded history (``history_size``)
    can replay older changes, as with the in-memory store. With the in-memory store: nothing."""
    feed = getattr(server.store, "feed", None)
    if feed is not None:
        await server.store.client.compact(feed.applied)  # type: ignore[attr-defined]


class Client:
    """The generated betterproto2 async stub, called from Trio through trio-asyncio."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.stub = pb.UnifiedBridgeStub(channel)

    async def __call__(self, call: Awaitable[T]) -> T:
        """``await client(client.stub.ping(...))``: run one stub call from Trio."""
        result: T = await trio_asyncio.aio_as_trio(call)
        return result


class Watcher:
    """One WatchVariables stream consumed by a Trio task: updates land in ``updates`` as they arrive,
    the status that ended the stream in ``error``. ``wait_for`` blocks until a condition on them holds.
    """

    def __init__(self, client: Client, request: pb.WatchVariablesRequest, **call_options: Any) -> None:
        self.client = client
        self.request = request
        self.call_options = call_options
        self.updates: list[pb.VariableUpdate] = []
        self.error: BaseException | None = None
        self.ended = trio.Event()
        self.cancel_scope = trio.CancelScope()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

        async def consume() -> None:
            # The whole loop runs on the asyncio side, so a cancellation closes the stub's async
            # generator there too (closing it later from Trio's side would run asyncio code in Trio).
            async for update in self.client.stub.watch_variables(self.request, **self.call_options):
                self.updates.append(update)
                self._notify()

        with self.cancel_scope:
            try:
                await trio_asyncio.aio_as_trio(consume)()
            except Exception as exc:
                self.error = exc
        self.ended.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[Watcher], bool]) -> None:
        """Wait until ``condition(self)`` holds; fail if the stream ends first without it."""
        while not condition(self):
            if self.ended.is_set():
                raise AssertionError(
                    f"stream ended ({self.error!r}) before the condition held: {self.kinds()}"
                )
            await self._changed.wait()

    async def wait_synced(self) -> None:
        await self.wait_for(lambda w: "synced" in w.kinds())

    async def wait_ended(self) -> None:
        await self.ended.wait()

    def kinds(self) -> list[str]:
        return [u.update_type for u in self.updates]

    def of(self, variable_id: str) -> list[pb.VariableUpdate]:
        return [u for u in self.updates if u.variable_id == variable_id]

    def versions(self, variable_id: str) -> list[int]:
        return [u.variable.version for u in self.of(variable_id) if u.variable is not None]


async def start_watch(
    nursery: trio.Nursery, client: Client, request: pb.WatchVariablesRequest, **call_options: Any
) -> Watcher:
    watcher = Watcher(client, request, **call_options)
    await nursery.start(watcher.run)
    return watcher


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes, *, limit: float = 60.0) -> bytes:
    """What ``stream`` (a process's pipe) sends up to and including the first ``marker``, and all of
    that chunk; fails if it ends first or takes longer than ``limit`` (a safety bound, not a timing)."""
    received = b""
    with trio.fail_after(limit):
        while marker not in received:
            chunk = await stream.receive_some()
            assert chunk, f"ended before {marker!r}: {received[-2000:]!r}"
            received += chunk
    return received


async def serving_port(process: trio.Process) -> int:
    """The port a `trio-bridge serve` process says it listens on, once it says so."""
    assert process.stdout is not None
    said = await read_until(process.stdout, b"serving on")
    found = re.search(rb"trio-bridge serving on [\d.]+:(\d+)", said)
    assert found, said
    return int(found.group(1))


async def eventually(condition: Callable[[], bool], *, limit: float = 10.0) -> None:
    """Wait for ``condition`` to hold, e.g. server-side cleanup after a client went away over the network.

    Polls; ``limit`` (seconds of the run's clock) only bounds a failure, it is no timing assertion.
    """
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 (the condition lives in another process or socket)
            await trio.sleep(0.005)


async def real_seconds(seconds: float) -> None:
    """Let ``seconds`` of real time pass, on whatever clock the run has (an autojumping or running mock
    clock included): for what runs on real time outside this process, such as etcd's lease TTLs."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # noqa: ASYNC110 (real time, which a mock clock does not follow)
        await trio.sleep(0.01)


_LINGER_ZERO = struct.pack("ii", 1, 0)


class DroppingProxy:
    """A loopback TCP proxy in front of a server that can cut, or silence, every connection through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections_made = 0
        self._pipes: set[trio.CancelScope] = set()
        self._pumps: set[trio.CancelScope] = set()
        self._resetting: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.connections_made += 1
        with trio.CancelScope() as scope:
            self._pipes.add(scope)
            try:
                upstream = await trio.open_tcp_stream(LOOPBACK, self.target_port)
                async with downstream, upstream:
                    try:
                        with trio.CancelScope() as pumping:
                            self._pumps.add(pumping)
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(self._pump, downstream, upstream)
                                nursery.start_soon(self._pump, upstream, downstream)
                        self._pumps.discard(pumping)
                        if pumping.cancelled_caught:  # frozen: silent, but open, until dropped
                            await trio.sleep_forever()
                    finally:
                        if scope in self._resetting:  # close with RST, not FIN
                            for stream in (downstream, upstream):
                                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            finally:
                self._pipes.discard(scope)
                self._resetting.discard(scope)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                await sink.send_all(chunk)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()

    def freeze_all(self) -> int:
        """Stop forwarding on every open connection, leaving it open: a peer that went silent."""
        frozen = len(self._pumps)
        for scope in list(self._pumps):
            scope.cancel()
        return frozen

    def drop_all(self) -> int:
        """Cut every open connection (both sides see it closed); return how many were cut."""
        cut = len(self._pipes)
        for scope in list(self._pipes):
            scope.cancel()
        return cut

    def reset_all(self) -> int:
        """Reset every open connection (both sides get a TCP RST); return how many were reset."""
        self._resetting.update(self._pipes)
        return self.drop_all()

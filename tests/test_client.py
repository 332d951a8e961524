"""trio_bridge.client.BridgeClient against a real server: typed values, typed errors, and a watch that
resumes without loss however its stream is interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration

from tests.support import DroppingProxy, eventually, start_server
from trio_bridge import (
    AlreadyExists,
    Constraints,
    InvalidArgument,
    MemoryStore,
    NotFound,
    RunningServer,
    Tensor,
    Unavailable,
    VariableType,
    VersionConflict,
)
from trio_bridge.client import BridgeClient, Reconnect, WatchEvent

T = TypeVar("T")


async def in_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a plain-asyncio coroutine function (what a user's program is) from the Trio test."""
    result: T = await trio_asyncio.aio_as_trio(fn)()
    return result


TYPED_VALUES = [
    ("float", 21.5, -3.0),
    ("integer", 2**40, -7),
    ("string", "héllo", ""),
    ("boolean", True, False),
    ("embedding", (0.5, 1.0, -2.0), (1.0, 0.0, 0.25)),
    ("tensor", Tensor((2,), "float32", struct.pack("<2f", 1, 2)), Tensor((1, 1), "int8", b"\x07")),
]


async def test_every_type_round_trips_as_native_values(server: RunningServer, aio_loop: Any) -> None:
    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            assert await client.ping() == "0.1.0"
            session = (await client.create_session(metadata={"who": "test"})).session_id
            for name, initial, later in TYPED_VALUES:
                registered = await client.register_variable(session, name, name, initial)
                assert (registered.value, registered.version, registered.type.label) == (initial, 1, name)
                updated = await client.set(session, name, later, source="test")
                assert (updated.value, updated.version, updated.last_update_source) == (later, 2, "test")
                assert (await client.get(session, registered.id)).value == later
            await client.register_variable(
                session,
                "mode",
                VariableType.CHOICE,
                "low",
                constraints=Constraints(allowed_values=("low", "high")),
            )
            await client.register_variable(
                session,
                "program",
                "module",
                "Predict",
                constraints=Constraints(allowed_values=("Predict", "React")),
            )
            batch = await client.set_many(session, {"float": 1, "mode": "high", "program": "React"})
            assert [(v.name, v.value) for v in batch] == [
                ("float", 1.0),
                ("mode", "high"),
                ("program", "React"),
            ]
            assert [v.name for v in await client.get_many(session, ["mode", "float"])] == ["mode", "float"]
            assert len(await client.list_variables(session)) == len(TYPED_VALUES) + 2
            await client.delete_variable(session, "mode")
            assert session in {s.session_id for s in await client.list_sessions()}
            assert (await client.get_session(session)).variable_count == len(TYPED_VALUES) + 1
            assert await client.cleanup_session(session) == len(TYPED_VALUES) + 1

    await in_asyncio(scenario)


async def test_statuses_become_typed_errors_with_the_servers_message(
    server: RunningServer, aio_loop: Any
) -> None:
    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session("s")).session_id
            await client.register_variable(session, "n", "integer", 0, constraints=Constraints(maximum=10))
            with pytest.raises(NotFound, match="session 'nope' not found"):
                await client.get_session("nope")
            with pytest.raises(InvalidArgument, match="above maximum 10"):
                await client.set(session, "n", 11)
            with pytest.raises(AlreadyExists, match="'s' already exists"):
                await client.create_session("s")
            await client.set(session, "n", 1, expected_version=1)
            with pytest.raises(VersionConflict) as conflict:
                await client.set(session, "n", 2, expected_version=1)
            assert (conflict.value.variable, conflict.value.expected, conflict.value.current) == ("n", 1, 2)
            with pytest.raises(ValueError, match="unknown variable type 'decimal'"):
                await client.register_variable(session, "d", "decimal", 1)

    await in_asyncio(scenario)


class Collector:
    """Consumes ``client.watch(...)`` in an asyncio task; events land in ``events``."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None

    def versions(self, name: str) -> list[int]:
        return [e.variable.version for e in self.events if e.variable is not None and e.variable.name == name]


async def _consume(client: BridgeClient, collector: Collector, session: str, **options: Any) -> None:
    try:
        async for event in client.watch(session, **options):
            collector.events.append(event)
    except Exception as exc:
        collector.error = exc


async def test_watch_yields_typed_events_and_filters_heartbeats(server: RunningServer, aio_loop: Any) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.FLOAT, 1.0)

    async def scenario() -> list[WatchEvent]:
        events = []
        async with (
            BridgeClient(server.host, server.port) as client,
            contextlib.aclosing(client.watch(session, ["t"], heartbeat_interval=0.1)) as stream,
        ):
            async for event in stream:
                events.append(event)
                if event.kind == "synced":
                    await asyncio.sleep(0.35)  # quiet: heartbeats go by, filtered out
                    await client.set(session, "t", 2.0, source="me", metadata={"k": "v"})
                if event.kind == "value_change":
                    break
        return events

    events = await in_asyncio(scenario)
    assert [e.kind for e in events] == ["initial_value", "synced", "value_change"]
    change = events[-1]
    assert change.variable is not None and (change.variable.value, change.variable.version) == (2.0, 2)
    assert (change.old_value, change.source, change.metadata) == (1.0, "me", {"k": "v"})
    await eventually(lambda: server.store.cache.observers.observer_count == 0)  # aclose ended the stream


async def _watch_across(
    server_port: int,
    session: str,
    interrupt: Callable[[], Awaitable[None]],
    *,
    writes: int,
    last: int,
    write: Callable[[int], Awaitable[object]],
    config: Configuration | None = None,
    pause_while_writing: bool = False,
    heartbeat_interval: float | None = None,
) -> list[WatchEvent]:
    """Watch variable "t" through an interruption until it reaches version ``last``; return every
    event the client yielded."""
    events: list[WatchEvent] = []
    synced_once = trio.Event()
    done = trio.Event()

    async def consume() -> None:
        reconnect = Reconnect(initial_delay=0.01, max_delay=0.05)
        async with (
            BridgeClient("127.0.0.1", server_port, reconnect=reconnect, config=config) as client,
            contextlib.aclosing(
                client.watch(session, ["t"], heartbeat_interval=heartbeat_interval)
            ) as stream,
        ):
            async for event in stream:
                events.append(event)
                if event.kind == "synced" and not synced_once.is_set():
                    synced_once.set()
                    if pause_while_writing:  # read nothing while all the writes happen
                        for i in range(writes):
                            await trio_asyncio.trio_as_aio(write)(i)  # Trio code
                if event.variable is not None and event.variable.version == last:
                    done.set()
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio_asyncio.aio_as_trio(consume))
        await synced_once.wait()
        await interrupt()
        if not pause_while_writing:
            for i in range(writes):
                await write(i)
        with trio.fail_after(30):
            await done.wait()
    return events


def _assert_every_version_once(events: list[WatchEvent], last: int) -> None:
    versions = [e.variable.version for e in events if e.variable is not None]
    assert versions == list(range(1, last + 1)), f"{versions}"
    assert all(e.kind != "resync" for e in events)


async def test_watch_resumes_after_resource_exhausted(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, watch_queue_size=4)
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.STRING, "")
    small_window = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)

    async def nothing() -> None:
        pass

    events = await _watch_across(
        server.port,
        session,
        nothing,
        writes=150,
        last=151,
        write=lambda i: server.store.set_variable(session, "t", "x" * 4000 + str(i)),
        config=small_window,
        pause_while_writing=True,
    )
    assert server.metrics.rpc_count("WatchVariables", "RESOURCE_EXHAUSTED") >= 1
    _assert_every_version_once(events, 151)


async def test_watch_resumes_across_a_server_restart(nursery: trio.Nursery, aio_loop: Any) -> None:
    store = MemoryStore()
    session = (await store.create_session()).session_id
    await store.register_variable(session, "t", VariableType.INTEGER, 0)
    first_server = trio.CancelScope()
    port_holder: list[int] = []

    async def run_first(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with first_server:
            async with trio.open_nursery() as inner:
                running = await start_server(inner, store=store)
                port_holder.append(running.port)
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(run_first)

    async def restart() -> None:
        first_server.cancel()  # the stream ends with UNAVAILABLE
        await eventually(lambda: store.cache.observers.observer_count == 0)
        for i in range(5):
            await store.set_variable(session, "t", 100 + i)  # changes while no server runs
        await start_server(nursery, store=store, port=port_holder[0])

    events = await _watch_across(
        port_holder[0],
        session,
        restart,
        writes=10,
        last=16,
        write=lambda i: store.set_variable(session, "t", i),
    )
    _assert_every_version_once(events, 16)


async def test_watch_resumes_when_the_connection_is_cut(server: RunningServer, nursery: trio.Nursery) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    proxy = DroppingProxy(server.port)
    await nursery.start(proxy.run)

    async def cut() -> None:
        assert proxy.drop_all() >= 1
        for i in range(5):
            await server.store.set_variable(session, "t", 100 + i)

    events = await _watch_across(
        proxy.port,
        session,
        cut,
        writes=10,
        last=16,
        write=lambda i: server.store.set_variable(session, "t", i),
    )
    _assert_every_version_once(events, 16)
    assert proxy.connections_made >= 2


async def test_a_connection_lost_while_it_is_made_is_a_connection_error_and_the_watch_resumes(
    server: RunningServer, aio_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpclib hands out a connection that was lost between being made and being used (a peer that
    resets it at once), and the call then fails inside grpclib with an AttributeError. Seen in the
    100,000-update fault run; here the loss is made to happen at exactly that moment."""
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 7)
    lost = 0
    real_create = Channel._create_connection

    async def create_then_lose(self: Channel) -> Any:
        nonlocal lost
        protocol = await real_create(self)
        if lost < 2:  # the first two connections die at once
            lost += 1
            protocol.connection_lost(ConnectionResetError("reset by peer"))
        return protocol

    monkeypatch.setattr(Channel, "_create_connection", create_then_lose)

    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            with pytest.raises(
                Unavailable, match="the connection was lost \\(reset as soon as it was made\\)"
            ):
                await client.ping()
            reconnect = Reconnect(initial_delay=0.001, max_delay=0.01)
            async with BridgeClient(server.host, server.port, reconnect=reconnect) as watcher:
                async for event in watcher.watch(session, ["t"]):
                    if event.kind == "initial_value":
                        assert event.variable is not None and event.variable.value == 7
                        break

    await in_asyncio(scenario)
    assert lost == 2


async def test_many_watches_are_spread_over_connections(server: RunningServer, aio_loop: Any) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)

    async def scenario() -> int:
        async with BridgeClient(server.host, server.port) as client:
            streams = [client.watch(session, ["t"]) for _ in range(200)]
            for stream in streams:
                assert (await anext(stream)).kind == "initial_value"
            connections = client.connections
            for stream in streams:
                await stream.aclose()
            return connections

    assert await in_asyncio(scenario) == 3  # 90 streams per connection at most
    await eventually(lambda: server.store.cache.observers.observer_count == 0)


async def test_the_client_spreads_watches_thinner_when_the_server_allows_fewer(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, max_watch_streams_per_connection=3)
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)

    async def scenario() -> int:
        fast = Reconnect(initial_delay=0.001, max_delay=0.01)
        async with BridgeClient(server.host, server.port, reconnect=fast) as client:
            streams = [client.watch(session, ["t"]) for _ in range(7)]
            async with asyncio.timeout(30):  # a client that never adapts retries forever
                for stream in streams:
                    assert (await anext(stream)).kind == "initial_value"
            connections = client.connections
            for stream in streams:
                await stream.aclose()
            return connections

    assert await in_asyncio(scenario) == 3  # told "3 per connection" once, it keeps to it


async def test_a_silent_connection_counts_as_dead_and_the_watch_resumes(
    server: RunningServer, nursery: trio.Nursery
) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    proxy = DroppingProxy(server.port)
    await nursery.start(proxy.run)

    async def go_silent() -> None:
        assert proxy.freeze_all() >= 1  # no FIN, no RST: only heartbeats stop coming

    events = await _watch_across(
        proxy.port,
        session,
        go_silent,
        writes=10,
        last=11,
        write=lambda i: server.store.set_variable(session, "t", i),
        heartbeat_interval=0.2,  # dead after 3 x 0.2 s of silence
    )
    _assert_every_version_once(events, 11)
    assert proxy.connections_made >= 2


async def test_watch_raises_typed_errors_for_statuses_it_cannot_resume_from(
    server: RunningServer, aio_loop: Any
) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.FLOAT, 1.0)

    kinds: list[str] = []

    async def watch(client: BridgeClient, names: list[str]) -> None:
        async for event in client.watch(session, names):
            kinds.append(event.kind)
            if event.kind == "synced":
                await client.cleanup_session(session)

    async def scenario() -> list[str]:
        async with BridgeClient(server.host, server.port) as client:
            with pytest.raises(NotFound, match="has no variable 'nope'"):
                await watch(client, ["nope"])
            with pytest.raises(NotFound, match="was cleaned up"):
                await watch(client, ["t"])
        return kinds

    assert await in_asyncio(scenario) == ["initial_value", "synced"]


def test_the_reconnect_delay_stays_bounded_however_many_attempts_failed() -> None:
    # The 100,000-update fault run: a watcher whose long replays were cut short before `synced` counted
    # ~1,000 failures in a row, and 0.1 * 2**1030 overflowed (OverflowError from the watch).
    import random

    from trio_bridge.client import Reconnect

    policy = Reconnect(initial_delay=0.1, max_delay=5.0)
    rng = random.Random(1)
    for attempt in (0, 10, 1_030, 100_000):
        assert 0 <= policy.delay(attempt, rng) <= 5.0

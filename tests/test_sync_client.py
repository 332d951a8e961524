"""trio_bridge.sync_client.SyncBridgeClient against a real server, tested like the async client (typed
values, typed errors, watches that resume), plus what being blocking brings: its methods are the async
client's, it works under a running asyncio loop, Ctrl-C cancels what it interrupts, leaving a watch
ends its stream at once, a slow consumer holds the stream back, and closing leaves nothing behind.

The tests run in Trio; the blocking client runs in worker threads (``in_thread``), or in a subprocess
where a real asyncio loop or a real SIGINT is needed."""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import itertools
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio_asyncio

from tests.support import LOOPBACK, eventually, start_server
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
from trio_bridge.sync_client import ClientClosed, SyncBridgeClient, SyncWatch

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run blocking code (what a user's script is) in a worker thread of the Trio test."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """What asyncio logs rather than warns must not happen either: "Task was destroyed but it is
    pending", "Task exception was never retrieved", an exception in a callback."""
    yield
    gc.collect()  # a task left pending would be destroyed here
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert errors == []


def take_until(events: Iterator[WatchEvent], kind: str) -> list[WatchEvent]:
    """Events from ``events`` up to and including the first of ``kind``."""
    taken = []
    for event in events:
        taken.append(event)
        if event.kind == kind:
            return taken
    raise AssertionError(f"the watch ended before a {kind!r}: {[e.kind for e in taken]}")


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("SyncBridgeClient(")]


# ---- the same API ---------------------------------------------------------------------------------


def test_the_methods_are_the_async_clients_with_the_same_parameters() -> None:
    """Every public method, property and attribute of BridgeClient is on SyncBridgeClient, with the
    same parameters (names, kinds, defaults, annotations) and the same return type (watch aside), and
    blocking (no coroutine functions): so the two cannot drift apart."""
    assert inspect.signature(SyncBridgeClient.__init__) == inspect.signature(BridgeClient.__init__)
    methods = {
        name: member
        for name, member in inspect.getmembers(BridgeClient)
        if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property))
    }
    assert {"ping", "create_session", "set_many", "watch", "close", "connections"} <= set(methods)
    for name, member in methods.items():
        sync = inspect.getattr_static(SyncBridgeClient, name, None)
        assert sync is not None, f"SyncBridgeClient has no {name}"
        if isinstance(member, property):
            assert isinstance(sync, property), name
            continue
        assert inspect.isfunction(sync), name
        assert not inspect.iscoroutinefunction(sync) and not inspect.isasyncgenfunction(sync), name
        expected, actual = inspect.signature(member), inspect.signature(sync)
        assert list(actual.parameters.values()) == list(expected.parameters.values()), name
        if name == "watch":
            assert actual.return_annotation == "SyncWatch"
        else:
            assert actual.return_annotation == expected.return_annotation, name
        assert sync.__doc__, f"SyncBridgeClient.{name} has no docstring"
    attributes = {name for name in vars(BridgeClient("127.0.0.1", 1)) if not name.startswith("_")}
    assert {"host", "port", "timeout", "reconnect"} <= attributes
    for name in attributes:
        assert isinstance(inspect.getattr_static(SyncBridgeClient, name, None), property), name
    assert issubclass(SyncWatch, Iterator)
    assert hasattr(SyncWatch, "__enter__") and hasattr(SyncWatch, "__exit__") and hasattr(SyncWatch, "close")


# ---- values and errors ----------------------------------------------------------------------------


TYPED_VALUES = [
    ("float", 21.5, -3.0),
    ("integer", 2**40, -7),
    ("string", "héllo", ""),
    ("boolean", True, False),
    ("embedding", (0.5, 1.0, -2.0), (1.0, 0.0, 0.25)),
    ("tensor", Tensor((2,), "float32", struct.pack("<2f", 1, 2)), Tensor((1, 1), "int8", b"\x07")),
]


async def test_every_type_round_trips_as_native_values(server: RunningServer) -> None:
    def scenario() -> None:
        with SyncBridgeClient(server.host, server.port) as client:
            assert client.ping() == "0.1.0"
            session = client.create_session(metadata={"who": "test"}).session_id
            for name, initial, later in TYPED_VALUES:
                registered = client.register_variable(session, name, name, initial)
                assert (registered.value, registered.version, registered.type.label) == (initial, 1, name)
                updated = client.set(session, name, later, source="test")
                assert (updated.value, updated.version, updated.last_update_source) == (later, 2, "test")
                assert client.get(session, registered.id).value == later
            client.register_variable(
                session,
                "mode",
                VariableType.CHOICE,
                "low",
                constraints=Constraints(allowed_values=("low", "high")),
            )
            client.register_variable(
                session,
                "program",
                "module",
                "Predict",
                constraints=Constraints(allowed_values=("Predict", "React")),
            )
            batch = client.set_many(session, {"float": 1, "mode": "high", "program": "React"})
            assert [(v.name, v.value) for v in batch] == [
                ("float", 1.0),
                ("mode", "high"),
                ("program", "React"),
            ]
            # The other spelling of writes, from a generator (read in the caller's thread).
            batch = client.set_many(session, ((n, v, None) for n, v in [("integer", 5), ("string", "x")]))
            assert [(v.name, v.value, v.version) for v in batch] == [("integer", 5, 3), ("string", "x", 3)]
            assert [v.name for v in client.get_many(session, ["mode", "float"])] == ["mode", "float"]
            assert len(client.list_variables(session)) == len(TYPED_VALUES) + 2
            client.delete_variable(session, "mode")
            assert session in {s.session_id for s in client.list_sessions()}
            assert client.get_session(session).variable_count == len(TYPED_VALUES) + 1
            assert client.connections == 1
            assert client.cleanup_session(session) == len(TYPED_VALUES) + 1

    await in_thread(scenario)


async def test_statuses_become_typed_errors_with_the_servers_message(server: RunningServer) -> None:
    def scenario() -> None:
        with SyncBridgeClient(server.host, server.port) as client:
            session = client.create_session("s").session_id
            client.register_variable(session, "n", "integer", 0, constraints=Constraints(maximum=10))
            with pytest.raises(NotFound, match="session 'nope' not found"):
                client.get_session("nope")
            with pytest.raises(InvalidArgument, match="above maximum 10"):
                client.set(session, "n", 11)
            with pytest.raises(AlreadyExists, match="'s' already exists"):
                client.create_session("s")
            client.set(session, "n", 1, expected_version=1)
            with pytest.raises(VersionConflict) as conflict:
                client.set(session, "n", 2, expected_version=1)
            assert (conflict.value.variable, conflict.value.expected, conflict.value.current) == ("n", 1, 2)
            with pytest.raises(NotFound, match="'nope'"):
                client.set_many(session, {"n": 3, "nope": 4})
            assert client.get(session, "n").value == 1  # all or nothing
            with pytest.raises(ValueError, match="unknown variable type 'decimal'"):
                client.register_variable(session, "d", "decimal", 1)

    await in_thread(scenario)


def _error_of(call: Callable[[], object]) -> Exception:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


async def _async_error_of(call: Callable[[], Awaitable[object]]) -> Exception:
    try:
        await call()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


async def test_an_unreachable_server_raises_what_the_async_client_raises(aio_loop: Any) -> None:
    once = Reconnect(max_attempts=0)
    with socket.socket() as unused:
        unused.bind((LOOPBACK, 0))  # bound but not listening: connections to it are refused
        port = unused.getsockname()[1]

        async def drain(client: BridgeClient) -> None:
            async for _ in client.watch("s", ["t"]):
                pass

        async def async_errors() -> list[Exception]:
            async with BridgeClient(LOOPBACK, port, reconnect=once) as client:
                return [await _async_error_of(client.ping), await _async_error_of(lambda: drain(client))]

        def sync_errors() -> list[Exception]:
            with SyncBridgeClient(LOOPBACK, port, reconnect=once) as client:
                return [_error_of(client.ping), _error_of(lambda: list(client.watch("s", ["t"])))]

        expected = await trio_asyncio.aio_as_trio(async_errors)()
        errors = await in_thread(sync_errors)
    for error, wanted in zip(errors, expected, strict=True):
        assert (type(error), str(error)) == (type(wanted), str(wanted))
        assert isinstance(error, Unavailable), repr(error)


# ---- watch ----------------------------------------------------------------------------------------


async def test_watch_yields_typed_events_and_filters_heartbeats(server: RunningServer) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.FLOAT, 1.0)

    def scenario() -> tuple[list[WatchEvent], int]:
        with (
            SyncBridgeClient(server.host, server.port) as client,
            client.watch(session, ["t"], heartbeat_interval=0.1) as quiet,
            client.watch(session, ["t"], heartbeat_interval=0.1, include_heartbeats=True) as loud,
        ):
            events = take_until(quiet, "synced")
            take_until(loud, "synced")
            for _ in range(3):  # heartbeats go by (on both streams; the quiet one drops them)
                take_until(loud, "heartbeat")
            client.set(session, "t", 2.0, source="me", metadata={"k": "v"})
            events += take_until(quiet, "value_change")
            open_streams: int = trio.from_thread.run_sync(lambda: server.service.open_watches)
        return events, open_streams

    events, open_streams = await in_thread(scenario)
    assert open_streams == 2
    assert [e.kind for e in events] == ["initial_value", "synced", "value_change"]
    change = events[-1]
    assert change.variable is not None and (change.variable.value, change.variable.version) == (2.0, 2)
    assert (change.old_value, change.source, change.metadata) == (1.0, "me", {"k": "v"})
    # Leaving the `with` block ended both streams.
    await eventually(lambda: server.service.open_watches == 0)
    await eventually(lambda: server.store.cache.observers.observer_count == 0)


async def test_every_way_of_leaving_a_watch_ends_its_server_stream(server: RunningServer) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    client = await in_thread(lambda: SyncBridgeClient(server.host, server.port))

    def open_streams() -> int:
        count: int = trio.from_thread.run_sync(lambda: server.service.open_watches)
        return count

    def with_block() -> int:
        with client.watch(session, ["t"]) as events:
            take_until(events, "synced")
            return open_streams()

    def close() -> int:
        events = client.watch(session, ["t"])
        take_until(events, "synced")
        count = open_streams()
        events.close()
        events.close()  # idempotent
        assert list(events) == []  # a closed watch is exhausted
        return count

    def break_out() -> int:
        for event in client.watch(session, ["t"]):
            if event.kind == "synced":
                return open_streams()  # the watch is dropped: it ends its stream
        raise AssertionError("no synced")

    try:
        for leave in (with_block, close, break_out):
            assert await in_thread(leave) == 1, leave.__name__
            await eventually(lambda: server.service.open_watches == 0)
            await eventually(lambda: server.store.cache.observers.observer_count == 0)
    finally:
        await in_thread(client.close)


async def test_closing_a_watch_while_updates_stream_in_ends_it_every_time(
    server: RunningServer, nursery: trio.Nursery
) -> None:
    """A cancellation that comes as a message arrives is not lost (on Python 3.11 asyncio.wait_for
    dropped it; the async watch no longer reads with it): each close returns, and its stream ends."""
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)

    async def keep_writing() -> None:
        for i in itertools.count(1):
            await server.store.set_variable(session, "t", i)
            await trio.sleep(0.001)  # a steady stream of updates

    def scenario() -> None:
        with SyncBridgeClient(server.host, server.port) as client:
            for _ in range(30):
                with client.watch(session, ["t"]) as events:
                    take_until(events, "value_change")

    writing = trio.CancelScope()

    async def writer() -> None:
        with writing:
            await keep_writing()

    nursery.start_soon(writer)
    with trio.fail_after(30):
        await in_thread(scenario)
    writing.cancel()
    await eventually(lambda: server.service.open_watches == 0)


async def test_watch_raises_typed_errors_for_statuses_it_cannot_resume_from(server: RunningServer) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.FLOAT, 1.0)
    kinds: list[str] = []

    def watch(client: SyncBridgeClient, names: list[str]) -> None:
        with client.watch(session, names) as events:
            try:
                for event in events:
                    kinds.append(event.kind)
                    if event.kind == "synced":
                        client.cleanup_session(session)
            finally:
                assert list(events) == []  # ended by its error

    def scenario() -> None:
        with SyncBridgeClient(server.host, server.port) as client:
            with pytest.raises(NotFound, match="has no variable 'nope'"):
                watch(client, ["nope"])
            with pytest.raises(NotFound, match="was cleaned up"):
                watch(client, ["t"])

    await in_thread(scenario)
    assert kinds == ["initial_value", "synced"]


async def test_a_slow_consumer_holds_the_stream_back_instead_of_buffering(server: RunningServer) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    client = await in_thread(lambda: SyncBridgeClient(server.host, server.port))
    client.watch_buffer = 4
    try:
        events = await in_thread(lambda: client.watch(session, ["t"]))
        await in_thread(lambda: take_until(events, "synced"))
        for i in range(1, 51):
            await server.store.set_variable(session, "t", i)  # nobody reads meanwhile
        queue = events._feed.queue
        await eventually(lambda: queue.qsize() == 4)  # and there it stays: no slot is free
        versions: list[int] = []

        def consume() -> None:
            for event in events:
                assert event.variable is not None, event
                versions.append(event.variable.version)
                assert queue.qsize() <= 4
                if event.variable.version == 51:
                    events.close()

        await in_thread(consume)
        assert versions == list(range(2, 52))  # held back, nothing lost
    finally:
        await in_thread(client.close)
    await eventually(lambda: server.service.open_watches == 0)


async def _watch_across(
    server_port: int,
    session: str,
    interrupt: Callable[[], Awaitable[None]],
    *,
    writes: int,
    last: int,
    write: Callable[[int], Awaitable[object]],
) -> list[WatchEvent]:
    """Watch variable "t" (in a thread) through an interruption until it reaches version ``last``;
    return every event the client yielded."""
    events: list[WatchEvent] = []
    synced_once = trio.Event()

    def consume() -> None:
        reconnect = Reconnect(initial_delay=0.01, max_delay=0.05)
        with (
            SyncBridgeClient(LOOPBACK, server_port, reconnect=reconnect) as client,
            client.watch(session, ["t"], include_reconnects=True) as stream,
        ):
            for event in stream:
                events.append(event)
                if event.kind == "synced" and not synced_once.is_set():
                    trio.from_thread.run_sync(synced_once.set)
                if event.variable is not None and event.variable.version == last:
                    return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, consume)
            await synced_once.wait()
            await interrupt()
            for i in range(writes):
                await write(i)
    return events


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
    versions = [e.variable.version for e in events if e.variable is not None]
    assert versions == list(range(1, 17)), f"{versions}"
    assert all(e.kind != "resync" for e in events)
    reconnects = [e for e in events if e.kind == "reconnecting"]
    assert reconnects and all(isinstance(e.error, Unavailable) for e in reconnects)


# ---- threads, loops, closing ----------------------------------------------------------------------


async def test_one_client_serves_several_threads_at_once(server: RunningServer) -> None:
    def scenario() -> list[int]:
        with SyncBridgeClient(server.host, server.port) as client:
            session = client.create_session().session_id

            def work(n: int) -> int:
                name = f"v{n}"
                client.register_variable(session, name, "integer", 0)
                for i in range(1, 21):
                    client.set(session, name, i, expected_version=i)
                return int(client.get(session, name).value)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                return list(pool.map(work, range(8)))

    assert await in_thread(scenario) == [20] * 8


async def test_closing_ends_watches_and_calls_in_flight_and_leaves_nothing_behind(
    server: RunningServer, nursery: trio.Nursery
) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    silent = SilentServer()
    await nursery.start(silent.run)
    client = await in_thread(lambda: SyncBridgeClient(server.host, server.port))
    stuck = await in_thread(lambda: SyncBridgeClient(LOOPBACK, silent.port))
    events = await in_thread(lambda: client.watch(session, ["t"]))
    await in_thread(lambda: take_until(events, "synced"))
    outcomes: list[BaseException] = []

    def blocked(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as waiting:
        waiting.start_soon(in_thread, lambda: blocked(lambda: next(events)))
        waiting.start_soon(in_thread, lambda: blocked(stuck.ping))
        with trio.fail_after(10):
            await silent.requested.wait()  # the ping is in flight
        await eventually(lambda: server.service.open_watches == 1)
        await in_thread(client.close)
        await in_thread(stuck.close)
    assert {str(e) for e in outcomes} == {
        f"SyncBridgeClient({LOOPBACK}:{silent.port}) was closed while the call was in flight",
        f"SyncBridgeClient({server.host}:{server.port}) was closed, which ended the watch",
    }
    assert all(isinstance(e, ClientClosed) for e in outcomes)
    await eventually(lambda: server.service.open_watches == 0)
    assert client_threads() == []

    # Closed: idempotent, and every use says so.
    await in_thread(client.close)
    assert client.closed and repr(client) == f"<SyncBridgeClient {server.host}:{server.port} (closed)>"
    for use in (client.ping, lambda: client.watch(session), lambda: client.connections):
        with pytest.raises(ClientClosed, match=rf"SyncBridgeClient\({server.host}:{server.port}\) is closed"):
            await in_thread(use)
    assert list(events) == []

    # Abandoned without close(): closed when collected.
    def abandon() -> None:
        SyncBridgeClient(server.host, server.port).ping()

    await in_thread(abandon)
    gc.collect()
    assert client_threads() == []


class SilentServer:
    """Accepts connections and reads their HTTP/2 frames, never answering: a call to it blocks.
    ``requested``: a request came in; ``reset``: the client reset a stream (it cancelled the call)."""

    def __init__(self) -> None:
        self.port = 0
        self.requested = trio.Event()
        self.reset = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()  # what it would send stays unsent
        async with stream:
            while data := await stream.receive_some():
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.requested.set()
                    elif isinstance(event, h2.events.StreamReset):
                        self.reset.set()


# ---- under an asyncio loop, and Ctrl-C (in subprocesses) ------------------------------------------


class Script:
    """A Python script run with ``-W error`` in a subprocess: lines of its stdout as they come, its
    stderr at the end."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""
        self._stderr = bytearray()

    @classmethod
    async def start(cls, nursery: trio.Nursery, code: str, *args: object) -> Script:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-W", "error", "-c", code, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        script = cls(process)
        nursery.start_soon(script._drain_stderr)
        return script

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some():
            self._stderr += chunk

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"the script ended; it said {self.lines}, stderr: {self.stderr}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        self.lines.append(line.decode())
        return self.lines[-1]

    async def expect(self, *lines: str) -> None:
        for expected in lines:
            assert await self.line() == expected, (self.lines, self.stderr)

    async def send_line(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(b"\n")

    async def finish(self) -> int:
        returncode = await self.process.wait()
        while True:  # what it said last
            try:
                await self.line()
            except AssertionError:
                break
        return returncode

    @property
    def stderr(self) -> str:
        return self._stderr.decode()


JUPYTER = """
import asyncio, sys
from trio_bridge.sync_client import SyncBridgeClient

async def main() -> None:  # like a notebook cell: this thread runs an event loop
    loop = asyncio.get_running_loop()
    with SyncBridgeClient(sys.argv[1], int(sys.argv[2])) as client:
        session = client.create_session().session_id
        client.register_variable(session, "t", "integer", 1)
        with client.watch(session, ["t"]) as events:
            for event in events:
                if event.kind == "synced":
                    client.set(session, "t", 2)
                elif event.kind == "value_change":
                    print(event.variable.name, event.variable.value, event.old_value)
                    break
        print(await asyncio.sleep(0, "still running"), asyncio.get_running_loop() is loop)

asyncio.run(main())
"""


async def test_it_works_from_a_coroutine_under_asyncio_run(
    server: RunningServer, nursery: trio.Nursery
) -> None:
    script = await Script.start(nursery, JUPYTER, server.host, server.port)
    with trio.fail_after(30):
        assert await script.finish() == 0, script.stderr
    assert script.lines == ["t 2 1", "still running True"]
    assert script.stderr == ""


#: Prints "blocked" once the main thread waits in ``function`` (the moment to press Ctrl-C).
ANNOUNCER = """
import sys, threading, time

def announce_when_blocked_in(function):
    def look():
        main = threading.main_thread().ident
        while True:
            frame, names = sys._current_frames().get(main), []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            if names and names[0] == "wait" and function in names:
                print("blocked", flush=True)
                return
            time.sleep(0.005)
    threading.Thread(target=look, daemon=True).start()
"""

CTRL_C_IN_A_WATCH = (
    ANNOUNCER
    + """
from trio_bridge.sync_client import SyncBridgeClient

with SyncBridgeClient(sys.argv[1], int(sys.argv[2])) as client:
    events = client.watch(sys.argv[3], ["t"])
    try:
        for event in events:
            print(event.kind, flush=True)
            if event.kind == "synced":
                announce_when_blocked_in("take")
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.stdin.readline()  # meanwhile the server sees the stream end, though `events` is still here
    print(client.ping(), list(events), flush=True)  # the client still works; the watch is over
"""
)


async def test_ctrl_c_in_a_watch_ends_its_stream_and_propagates_at_once(
    server: RunningServer, nursery: trio.Nursery
) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    script = await Script.start(nursery, CTRL_C_IN_A_WATCH, server.host, server.port, session)
    try:
        with trio.fail_after(30):
            await script.expect("initial_value", "synced", "blocked")
        assert server.service.open_watches == 1
        script.process.send_signal(signal.SIGINT)
        with trio.fail_after(5):
            await script.expect("interrupted")
        await eventually(lambda: server.service.open_watches == 0)  # while the script still runs
        assert script.process.returncode is None
        await script.send_line()
        with trio.fail_after(30):
            assert await script.finish() == 0, script.stderr
    finally:
        if script.process.returncode is None:
            script.process.kill()
    assert script.lines[-1] == "0.1.0 []"
    assert script.stderr == ""  # no traceback, no warning, no "Task was destroyed"


CTRL_C_IN_A_CALL = (
    ANNOUNCER
    + """
from trio_bridge.sync_client import SyncBridgeClient

with SyncBridgeClient(sys.argv[1], int(sys.argv[2]), timeout=120) as client:
    announce_when_blocked_in("_await_future")
    try:
        client.ping()  # a server that never answers
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.stdin.readline()  # meanwhile the server sees the call reset
print("closed", flush=True)
"""
)


async def test_ctrl_c_in_a_call_cancels_it_and_propagates_at_once(nursery: trio.Nursery) -> None:
    silent = SilentServer()
    await nursery.start(silent.run)
    script = await Script.start(nursery, CTRL_C_IN_A_CALL, LOOPBACK, silent.port)
    try:
        with trio.fail_after(30):
            await script.expect("blocked")
            await silent.requested.wait()
        assert not silent.reset.is_set()
        script.process.send_signal(signal.SIGINT)
        with trio.fail_after(5):
            await script.expect("interrupted")
            await silent.reset.wait()  # the call was cancelled on the client's loop: RST_STREAM
        assert script.process.returncode is None
        await script.send_line()
        with trio.fail_after(30):
            assert await script.finish() == 0, script.stderr
    finally:
        if script.process.returncode is None:
            script.process.kill()
    assert script.lines == ["blocked", "interrupted", "closed"]
    assert script.stderr == ""

"""WatchVariables over a real server, one test (or more) per line of the watch contract."""

from __future__ import annotations

import itertools
import json
from typing import Any

import h2.errors
import h2.events
import pytest
import trio
import trio.testing
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from tests.h2raw import RawH2, messages_in
from tests.support import (
    Client,
    Watcher,
    compact_etcd,
    connect,
    eventually,
    real_seconds,
    start_server,
    start_watch,
    writes_at_once,
)
from trio_bridge import RunningServer
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import DoubleValue, Int64Value, StringValue

VT = pb.VariableType
WATCH = "/unified_bridge.UnifiedBridge/WatchVariables"


def number(value: float) -> PbAny:
    return PbAny.pack(DoubleValue(value=value))


def value_of(update: pb.VariableUpdate) -> Any:
    assert update.variable is not None and update.variable.value is not None
    return update.variable.value.unpack().value  # type: ignore[union-attr]


async def new_session(client: Client, **variables: float) -> tuple[str, dict[str, str]]:
    response = await client(client.stub.create_session(pb.CreateSessionRequest()))
    assert response.session is not None
    session = response.session.session_id
    ids = {}
    for name, initial in variables.items():
        registered = await client(
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=session, name=name, type=VT.FLOAT, initial_value=number(initial)
                )
            )
        )
        assert registered.variable is not None
        ids[name] = registered.variable.id
    return session, ids


async def write(client: Client, session: str, name: str, value: float, **extra: Any) -> pb.Variable:
    response = await client(
        client.stub.set_variable(
            pb.SetVariableRequest(session_id=session, variable_identifier=name, value=number(value), **extra)
        )
    )
    assert response.variable is not None
    return response.variable


def watch_request(
    session: str, *names: str, initial: bool = True, **options: str
) -> pb.WatchVariablesRequest:
    return pb.WatchVariablesRequest(
        session_id=session, variable_identifiers=list(names), include_initial_values=initial, options=options
    )


# ---- 1. subscribe, then read ------------------------------------------------------------------------


async def test_a_write_between_subscribe_and_read_is_seen_exactly_once(
    client: Client, server: RunningServer, nursery: trio.Nursery
) -> None:
    session, ids = await new_session(client, temperature=20.0)
    injected = []

    async def write_at_the_worst_moment(checkpoint: str) -> None:
        if checkpoint == "watch.subscribed" and not injected:
            injected.append(await server.store.set_variable(session, "temperature", 99.0, source="racer"))

    server.store.cache.checkpoint_hook = write_at_the_worst_moment
    watcher = await start_watch(nursery, client, watch_request(session, "temperature"))
    await watcher.wait_synced()
    assert injected, "the checkpoint hook did not run"
    await write(client, session, "temperature", 100.0)
    await watcher.wait_for(lambda w: 3 in w.versions(ids["temperature"]))
    updates = watcher.of(ids["temperature"])
    assert [(u.update_type, value_of(u), u.variable.version) for u in updates if u.variable] == [
        ("initial_value", 99.0, 2),
        ("value_change", 100.0, 3),
    ]


# ---- 2. exactly once, in order ------------------------------------------------------------------------


async def test_every_change_arrives_once_in_version_order(client: Client, nursery: trio.Nursery) -> None:
    session, ids = await new_session(client, a=0.0, b=0.0)
    watcher = await start_watch(nursery, client, watch_request(session, "a", "b"))
    await watcher.wait_synced()
    for i in range(1, 51):
        await write(client, session, "a" if i % 3 else "b", float(i))
    await watcher.wait_for(lambda w: len(w.of(ids["a"])) + len(w.of(ids["b"])) == 2 + 50)
    for name in ("a", "b"):
        versions = watcher.versions(ids[name])
        assert versions == list(range(1, len(versions) + 1))
        changes = [u for u in watcher.of(ids[name]) if u.update_type == "value_change"]
        for previous, change in zip([watcher.of(ids[name])[0], *changes], changes, strict=False):
            assert change.old_value is not None
            assert change.old_value.unpack().value == value_of(previous)  # type: ignore[union-attr]


async def test_a_writers_reply_leaves_before_the_deliveries_its_write_fans_out_to(
    client: Client,
    server: RunningServer,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    store_kind: str,
) -> None:
    # Issue #13: with 1,000 watchers the writer's own SetVariable call returned after 47 ms (p50; etcd:
    # 13 ms), its reply waiting behind the deliveries. Idle streams now get the change after the reply,
    # each handed its update directly (not a Trio task woken per stream); every one gets it. (With
    # etcd, the change reaches the watches from etcd's watch, which may come before etcd's answer to
    # the write itself: then the deliveries may go first.)
    import trio_bridge._connections as connections
    import trio_bridge._service as service

    order: list[str] = []
    real_send_now = service.send_message_now
    real_write = connections._CoalescingTransport.write

    def send_now(stream: Any, message: Any) -> bool:
        sent = real_send_now(stream, message)
        order.append("delivered" if sent else "queued")
        return sent

    def write_to_socket(transport: Any, data: Any) -> None:
        if connections._ends_a_stream(data):
            order.append("a call ended")
        real_write(transport, data)

    monkeypatch.setattr(service, "send_message_now", send_now)
    monkeypatch.setattr(connections._CoalescingTransport, "write", write_to_socket)
    session, ids = await new_session(client, x=0.0)
    watchers = [await start_watch(nursery, client, watch_request(session, "x")) for _ in range(20)]
    for watcher in watchers:
        await watcher.wait_synced()
    order.clear()
    await write(client, session, "x", 1.0)
    for watcher in watchers:
        await watcher.wait_for(lambda w: 2 in w.versions(ids["x"]))
    if store_kind == "memory":
        assert order == ["a call ended", *["delivered"] * 20]
    else:
        assert sorted(order) == ["a call ended", *["delivered"] * 20]


# ---- 3. initial values, then a marker ------------------------------------------------------------


async def test_initial_values_then_synced_then_full_changes(client: Client, nursery: trio.Nursery) -> None:
    session, ids = await new_session(client, t=1.0, p=2.0)
    watcher = await start_watch(nursery, client, watch_request(session, "t", "p"))
    await watcher.wait_synced()
    assert watcher.kinds() == ["initial_value", "initial_value", "synced"]
    assert {u.variable_id: value_of(u) for u in watcher.updates[:2]} == {ids["t"]: 1.0, ids["p"]: 2.0}
    assert all(u.update_source == "initial" and u.timestamp is not None for u in watcher.updates[:2])
    synced = watcher.updates[2]
    assert synced.variable_id == "" and synced.variable is None and synced.timestamp is not None

    await write(client, session, "t", 1.5, source="thermostat", metadata={"reason": "sun"})
    await watcher.wait_for(lambda w: len(w.updates) == 4)
    change = watcher.updates[3]
    assert change.update_type == "value_change"
    assert change.variable_id == ids["t"]
    assert change.variable is not None and change.variable.name == "t" and change.variable.version == 2
    assert value_of(change) == 1.5
    assert change.old_value is not None and change.old_value.unpack() == DoubleValue(value=1.0)
    assert change.update_source == "thermostat"
    assert change.update_metadata == {"reason": "sun"}
    assert change.timestamp is not None


async def test_without_initial_values_synced_comes_first(client: Client, nursery: trio.Nursery) -> None:
    session, _ = await new_session(client, t=1.0)
    watcher = await start_watch(nursery, client, watch_request(session, "t", initial=False))
    await watcher.wait_synced()
    assert watcher.kinds() == ["synced"]
    await write(client, session, "t", 2.0)
    await watcher.wait_for(lambda w: len(w.updates) == 2)
    assert watcher.kinds() == ["synced", "value_change"]


# ---- 4. heartbeats ------------------------------------------------------------------------------------


async def test_heartbeats_in_quiet_intervals_none_while_changes_flow(
    autojump_clock: trio.testing.MockClock, client: Client, nursery: trio.Nursery
) -> None:
    session, _ = await new_session(client, t=0.0)
    watcher = await start_watch(nursery, client, watch_request(session, "t", heartbeat_interval_ms="1000"))
    await watcher.wait_synced()
    quiet_start = trio.current_time()
    await watcher.wait_for(lambda w: w.kinds().count("heartbeat") >= 2)
    assert trio.current_time() - quiet_start >= 2.0  # one per whole quiet interval, never sooner
    heartbeat = next(u for u in watcher.updates if u.update_type == "heartbeat")
    assert heartbeat.variable_id == "" and heartbeat.timestamp is not None

    before = len(watcher.updates)
    for i in range(20):  # a change every 0.5 s for 10 s
        await write(client, session, "t", float(i))
        await trio.sleep(0.5)
    await watcher.wait_for(lambda w: len(w.updates) >= before + 20)
    assert watcher.kinds()[before:].count("heartbeat") == 0


async def test_default_heartbeat_is_30_seconds(
    autojump_clock: trio.testing.MockClock, client: Client, nursery: trio.Nursery
) -> None:
    session, _ = await new_session(client, t=0.0)
    watcher = await start_watch(nursery, client, watch_request(session, "t"))
    await watcher.wait_synced()
    start = trio.current_time()
    await watcher.wait_for(lambda w: "heartbeat" in w.kinds())
    assert trio.current_time() - start == pytest.approx(30.0, abs=0.5)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (
            {"heartbeat_interval_ms": "99"},
            "heartbeat_interval_ms must be a whole number from 100 (limit min_heartbeat_interval_ms) to 600000",
        ),
        ({"heartbeat_interval_ms": "600001"}, "got '600001'"),
        ({"heartbeat_interval_ms": "soon"}, "got 'soon'"),
        ({"slow_consumer": "drop"}, "slow_consumer must be 'close' or 'coalesce'"),
        ({"heartbeat": "1"}, "unknown watch option(s) ['heartbeat']"),
    ],
)
async def test_bad_options_are_invalid_argument_before_any_message(
    client: Client, nursery: trio.Nursery, options: dict[str, str], fragment: str
) -> None:
    session, _ = await new_session(client, t=0.0)
    watcher = await start_watch(nursery, client, watch_request(session, "t", **options))
    await watcher.wait_ended()
    assert watcher.updates == []
    assert isinstance(watcher.error, GRPCError) and watcher.error.status == Status.INVALID_ARGUMENT
    assert fragment in (watcher.error.message or "")


# ---- 5. bad requests; watching a whole session -------------------------------------------------------------


async def test_bad_requests_fail_before_any_message(
    client: Client, server: RunningServer, nursery: trio.Nursery
) -> None:
    session, _ = await new_session(client, t=0.0)
    too_many = [f"v{i}" for i in range(server.service.limits.max_watch_identifiers + 1)]
    cases = [
        (watch_request("no-such-session", "t"), Status.NOT_FOUND, "session 'no-such-session' not found"),
        (watch_request(session, "t", "x", "y"), Status.NOT_FOUND, "has no variables 'x', 'y'"),
        (
            watch_request(session, *too_many),
            Status.INVALID_ARGUMENT,
            "names 1001 variables, more than its limit max_watch_identifiers=1000",
        ),
        (
            pb.WatchVariablesRequest(
                session_id=session, variable_identifiers=["t"], resume_versions={"zz": 1}
            ),
            Status.NOT_FOUND,
            "resume_versions names 'zz'",
        ),
    ]
    for request, status, fragment in cases:
        watcher = await start_watch(nursery, client, request)
        await watcher.wait_ended()
        assert watcher.updates == []
        assert isinstance(watcher.error, GRPCError) and watcher.error.status == status
        assert fragment in (watcher.error.message or "")


async def test_an_empty_list_watches_the_whole_session_including_later_variables(
    client: Client, nursery: trio.Nursery
) -> None:
    session, _ = await new_session(client, a=1.0)
    watcher = await start_watch(nursery, client, watch_request(session))
    await watcher.wait_synced()
    assert watcher.kinds() == ["initial_value", "synced"]
    later = await client(
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id=session,
                name="later",
                type=VT.INTEGER,
                initial_value=PbAny.pack(Int64Value(value=7)),
            )
        )
    )
    assert later.variable is not None
    await client(
        client.stub.set_variable(
            pb.SetVariableRequest(
                session_id=session, variable_identifier="later", value=PbAny.pack(Int64Value(value=8))
            )
        )
    )
    await write(client, session, "a", 2.0)
    await watcher.wait_for(lambda w: len(w.updates) == 5)
    assert [(u.update_type, u.variable.name if u.variable else "") for u in watcher.updates[2:]] == [
        ("variable_registered", "later"),
        ("value_change", "later"),
        ("value_change", "a"),
    ]
    assert watcher.updates[2].variable is not None and watcher.updates[2].variable.version == 1


# ---- 6. lifecycle ----------------------------------------------------------------------------------------


async def test_deleted_variable_then_session_cleanup_ends_with_not_found(
    client: Client, nursery: trio.Nursery
) -> None:
    session, ids = await new_session(client, a=1.0, b=2.0)
    watcher = await start_watch(nursery, client, watch_request(session, "a", "b"))
    await watcher.wait_synced()
    await client(
        client.stub.delete_variable(pb.DeleteVariableRequest(session_id=session, variable_identifier="a"))
    )
    await watcher.wait_for(lambda w: "variable_deleted" in w.kinds())
    deleted = watcher.updates[-1]
    assert deleted.variable_id == ids["a"] and deleted.variable is not None and deleted.variable.name == "a"
    await write(client, session, "b", 3.0)  # the stream goes on for the others
    await watcher.wait_for(lambda w: w.kinds()[-1] == "value_change")
    await client(client.stub.cleanup_session(pb.CleanupSessionRequest(session_id=session)))
    await watcher.wait_ended()
    assert isinstance(watcher.error, GRPCError) and watcher.error.status == Status.NOT_FOUND
    assert "was cleaned up" in (watcher.error.message or "")


@pytest.mark.parametrize(("server_ttl", "session_ttl"), [(3.0, 0.0), (3600.0, 1.5)])
async def test_an_open_watch_keeps_its_session_alive_whatever_the_heartbeat_interval(
    server_ttl: float,
    session_ttl: float,
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    aio_loop: Any,
    store_kind: str,
) -> None:
    # Issue #10, observation 10: with `--session-ttl 3` (or a session TTL of 1.5 s) and the default
    # 30 s heartbeat, the watch ended NOT_FOUND "expired" after the TTL.
    server = await start_server(nursery, session_ttl=server_ttl)
    ttl = session_ttl or server_ttl
    with connect(server) as client:
        response = await client(client.stub.create_session(pb.CreateSessionRequest(ttl_seconds=session_ttl)))
        assert response.session is not None
        session = response.session.session_id
        await server.store.register_variable(session, "t", VT.FLOAT, 0.0)
        watcher = await start_watch(nursery, client, watch_request(session, "t"))
        await watcher.wait_synced()
        await trio.sleep(100.0)  # three default heartbeat intervals, many TTLs
        if store_kind == "etcd":
            await real_seconds(2 * ttl)  # etcd's leases run on real time: many TTLs of that too
        assert not watcher.ended.is_set() and server.store.cache.session_count == 1
        assert watcher.kinds().count("heartbeat") == 3
        info = await client(client.stub.get_session(pb.GetSessionRequest(session_id=session)))
        assert info.session is not None

        watcher.cancel_scope.cancel()
        await eventually(lambda: server.service.open_watches == 0)
        if store_kind == "memory":
            await trio.sleep(ttl / 2)
            assert server.store.cache.session_count == 1  # the TTL counts from the end of the last watch
            await trio.sleep(ttl)
            assert server.store.cache.session_count == 0
        else:  # on etcd's real time; a lease's TTL is whole seconds, counted from its last keep-alive
            await real_seconds(ttl / 3)
            assert server.store.cache.session_count == 1
            await eventually(lambda: server.store.cache.session_count == 0)


async def test_heartbeats_keep_a_watched_session_alive(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, session_ttl=60.0)
    with connect(server) as client:
        session, _ = await new_session(client, t=0.0)
        watcher = await start_watch(
            nursery, client, watch_request(session, "t", heartbeat_interval_ms="20000")
        )
        await watcher.wait_for(lambda w: w.kinds().count("heartbeat") >= 10)  # 200 s, TTL 60 s
        assert server.store.cache.session_count == 1
        assert watcher.error is None


async def test_server_shutdown_ends_streams_with_unavailable(nursery: trio.Nursery, aio_loop: Any) -> None:
    async with trio.open_nursery() as server_nursery:
        server = await start_server(server_nursery)
        channel = Channel(server.host, server.port)
        client = Client(channel)
        session, _ = await new_session(client, t=0.0)
        watcher = await start_watch(nursery, client, watch_request(session, "t"))
        await watcher.wait_synced()
        server_nursery.cancel_scope.cancel()
    await watcher.wait_ended()
    channel.close()
    assert isinstance(watcher.error, GRPCError) and watcher.error.status == Status.UNAVAILABLE
    assert "shutting down" in (watcher.error.message or "")
    assert server.store.cache.observers.observer_count == 0 and server.service.open_watches == 0


# ---- 7. resume -------------------------------------------------------------------------------------------


async def test_resume_replays_exactly_what_was_missed(client: Client, nursery: trio.Nursery) -> None:
    session, ids = await new_session(client, a=0.0, b=0.0)
    for i in range(1, 6):
        await write(client, session, "a", float(i))  # a: versions 2..6
    await write(client, session, "b", 9.0)  # b: version 2
    request = watch_request(session, "a", "b", initial=True)
    request.resume_versions = {"a": 3, ids["b"]: 2}
    watcher = await start_watch(nursery, client, request)
    await watcher.wait_synced()
    assert [(u.update_type, u.variable.version, value_of(u)) for u in watcher.updates if u.variable] == [
        ("value_change", 4, 3.0),
        ("value_change", 5, 4.0),
        ("value_change", 6, 5.0),
    ]
    assert watcher.kinds()[-1] == "synced"


async def test_resume_beyond_the_history_is_a_resync(nursery: trio.Nursery, aio_loop: Any) -> None:
    server = await start_server(nursery, history_size=3)
    with connect(server) as client:
        session, ids = await new_session(client, a=0.0)
        for i in range(1, 11):
            await write(client, session, "a", float(i))  # versions 2..11; history keeps 9..11
        await compact_etcd(server)
        request = watch_request(session, "a")
        request.resume_versions = {"a": 8}
        replay = await start_watch(nursery, client, request)
        await replay.wait_synced()
        assert replay.versions(ids["a"]) == [9, 10, 11]

        request.resume_versions = {"a": 7}
        resync = await start_watch(nursery, client, request)
        await resync.wait_synced()
        assert resync.kinds() == ["resync", "synced"]
        assert resync.updates[0].variable is not None and resync.updates[0].variable.version == 11
        assert value_of(resync.updates[0]) == 10.0
        assert resync.updates[0].update_metadata == {"resume_version": "7"}


async def test_resume_of_a_session_watch_reports_variables_that_went_away(
    client: Client, nursery: trio.Nursery
) -> None:
    session, ids = await new_session(client, a=0.0, b=0.0)
    await client(
        client.stub.delete_variable(pb.DeleteVariableRequest(session_id=session, variable_identifier="b"))
    )
    request = watch_request(session)
    request.resume_versions = {ids["a"]: 1, ids["b"]: 1}
    watcher = await start_watch(nursery, client, request)
    await watcher.wait_synced()
    assert [(u.update_type, u.variable_id) for u in watcher.updates] == [
        ("variable_deleted", ids["b"]),
        ("synced", ""),
    ]


# ---- 8. slow consumers -------------------------------------------------------------------------------------


async def _stalled_then_drained(
    server: RunningServer, session: str, names: list[str], writes: int, options: dict[str, str]
) -> tuple[list[pb.VariableUpdate], GRPCError | None, dict[str, str]]:
    """Open a watch on a connection with the smallest HTTP/2 window, read nothing while ``writes``
    changes are made, then read everything; return the updates, the ending status and its trailers."""
    small_window = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)
    channel = Channel(server.host, server.port, config=small_window)
    received: list[pb.VariableUpdate] = []
    error: GRPCError | None = None
    trailers: dict[str, str] = {}

    async def write_all() -> None:
        big = "x" * 4000
        with writes_at_once(server):  # the writer never waits on the stalled watcher
            for i in range(writes):
                await server.store.set_variable(session, names[i % len(names)], f"{big}{i}")

    async def scenario() -> None:
        nonlocal error, trailers
        request = watch_request(session, *names, **options)
        stream = channel.request(WATCH, Cardinality.UNARY_STREAM, pb.WatchVariablesRequest, pb.VariableUpdate)
        try:
            async with stream:
                await stream.send_message(request, end=True)
                first = await stream.recv_message()
                assert first is not None
                received.append(first)
                await trio_asyncio.trio_as_aio(write_all)()  # store calls are Trio code
                async for update in stream:
                    received.append(update)
                    if final_versions(received) == {name: writes // len(names) + 1 for name in names}:
                        await stream.cancel()  # caught up; a coalescing stream would go on forever
                        break
        except GRPCError as exc:
            error = exc
            trailers = {k: str(v) for k, v in (stream.trailing_metadata or {}).items()}

    try:
        await trio_asyncio_aio(scenario)
    finally:
        channel.close()
    return received, error, trailers


def final_versions(updates: list[pb.VariableUpdate]) -> dict[str, int]:
    return {u.variable.name: u.variable.version for u in updates if u.variable}


async def trio_asyncio_aio(fn: Any) -> Any:
    import trio_asyncio

    return await trio_asyncio.aio_as_trio(fn)()


async def _string_session(client: Client, *names: str) -> str:
    response = await client(client.stub.create_session(pb.CreateSessionRequest()))
    assert response.session is not None
    for name in names:
        await client(
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=response.session.session_id,
                    name=name,
                    type=VT.STRING,
                    initial_value=PbAny.pack(StringValue(value="")),
                )
            )
        )
    return response.session.session_id


async def test_a_slow_consumer_is_closed_with_resume_versions_and_loses_nothing(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, watch_queue_size=8, history_size=10_000)
    with connect(server) as client:
        session = await _string_session(client, "s0", "s1")
        received, error, trailers = await _stalled_then_drained(server, session, ["s0", "s1"], 200, {})
        assert error is not None and error.status == Status.RESOURCE_EXHAUSTED
        assert "slow_consumer=coalesce" in (error.message or "")
        resume = json.loads(trailers["trio-bridge-resume-versions"])
        got = {u.variable_id: u.variable.version for u in received if u.variable}
        assert resume == got  # exactly what the client holds
        # ... and the revision up to which it holds every change: the last one delivered
        assert int(trailers["trio-bridge-resume-revision"]) == max(u.revision for u in received)

        request = watch_request(session, "s0", "s1")
        request.resume_versions = resume
        rest = await start_watch(nursery, client, request)
        await rest.wait_synced()
        for variable_id, version in resume.items():
            versions = [v for v in rest.versions(variable_id)]
            assert versions == list(range(version + 1, 101 + 1))  # 100 writes each: versions 2..101
        assert server.store.cache.observers.observer_count == 1  # only `rest` is left


async def test_coalesce_keeps_the_newest_change_and_says_how_many_it_replaces(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, watch_queue_size=8)
    with connect(server) as client:
        session = await _string_session(client, "s0", "s1")
        received, error, _ = await _stalled_then_drained(
            server,
            session,
            ["s0", "s1"],
            200,
            {"slow_consumer": "coalesce", "heartbeat_interval_ms": "600000"},
        )
    assert error is None or error.status != Status.RESOURCE_EXHAUSTED
    for name in ("s0", "s1"):
        updates = [u for u in received if u.variable and u.variable.name == name]
        versions = [u.variable.version for u in updates if u.variable]
        assert versions == sorted(set(versions)) and versions[-1] == 101
        for before, after in itertools.pairwise(updates):
            assert after.variable is not None and before.variable is not None
            gap = after.variable.version - before.variable.version
            assert gap == 1 or after.update_metadata["coalesced_versions"] == str(gap)
        assert any("coalesced_versions" in u.update_metadata for u in updates)


async def _watch_stalled_after_synced(
    server: RunningServer, request: pb.WatchVariablesRequest, make_changes: Any
) -> tuple[GRPCError | None, dict[str, str]]:
    """A watch on a connection with the smallest HTTP/2 window that reads up to ``synced`` and then
    nothing while ``make_changes()`` runs; then it reads on to the end. Returns the ending status and
    its trailers."""
    small_window = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)
    channel = Channel(server.host, server.port, config=small_window)
    error: GRPCError | None = None
    trailers: dict[str, str] = {}

    async def burst() -> None:
        with writes_at_once(server):
            await make_changes()

    async def scenario() -> None:
        nonlocal error, trailers
        stream = channel.request(WATCH, Cardinality.UNARY_STREAM, pb.WatchVariablesRequest, pb.VariableUpdate)
        try:
            async with stream:
                await stream.send_message(request, end=True)
                while (update := await stream.recv_message()) is not None:
                    if update.update_type == "synced":
                        break
                await trio_asyncio.trio_as_aio(burst)()  # store calls are Trio code
                async for _ in stream:
                    pass
        except GRPCError as exc:
            error = exc
            trailers = {k: str(v) for k, v in (stream.trailing_metadata or {}).items()}

    try:
        await trio_asyncio_aio(scenario)
    finally:
        channel.close()
    return error, trailers


@pytest.mark.parametrize("first_watch", ["fresh", "resumed"])
async def test_the_resume_trailer_names_every_watched_variable_so_a_resume_loses_nothing(
    first_watch: str, nursery: trio.Nursery, aio_loop: Any
) -> None:
    # Issue #10, observation 7: no initial values, queue 32, x and y at version 1; x written 4 times
    # with 200 KB strings, then y 96 times. The trailer named x alone, and a resume from it lost y's
    # versions 2..97 without a word.
    server = await start_server(nursery, watch_queue_size=32, history_size=10_000)
    with connect(server) as client:
        session = await _string_session(client, "x", "y")
        ids = {s.name: s.id for s in await server.store.list_variables(session)}
        request = watch_request(session, "x", "y", initial=False)
        if first_watch == "resumed":
            request.resume_versions = {"x": 1, "y": 1}

        async def changes() -> None:
            for i in range(4):
                await server.store.set_variable(session, "x", f"{i}" + "x" * 200_000)
            for i in range(96):
                await server.store.set_variable(session, "y", f"y{i}")

        error, trailers = await _watch_stalled_after_synced(server, request, changes)
        assert error is not None and error.status == Status.RESOURCE_EXHAUSTED
        resume = json.loads(trailers["trio-bridge-resume-versions"])
        assert resume == {ids["x"]: 1, ids["y"]: 1}  # both, at the versions the stream started from

        again = watch_request(session, "x", "y", initial=False)
        again.resume_versions = resume
        rest = await start_watch(nursery, client, again)
        await rest.wait_synced()
        assert rest.versions(ids["x"]) == [2, 3, 4, 5]
        assert rest.versions(ids["y"]) == list(range(2, 98))


async def test_the_resume_trailer_of_a_session_watch_names_variables_registered_meanwhile(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, watch_queue_size=8, history_size=10_000)
    with connect(server) as client:
        session = await _string_session(client, "x")

        async def changes() -> None:
            await server.store.register_variable(session, "late", VT.STRING, "first")
            for i in range(20):
                await server.store.set_variable(session, "x", f"x{i}")

        error, trailers = await _watch_stalled_after_synced(
            server, watch_request(session, initial=False), changes
        )
        assert error is not None and error.status == Status.RESOURCE_EXHAUSTED
        ids = {s.name: s.id for s in await server.store.list_variables(session)}
        resume = json.loads(trailers["trio-bridge-resume-versions"])
        assert resume == {ids["x"]: 1, ids["late"]: 0}  # 0: never delivered, it came after the start

        again = watch_request(session, initial=False)
        again.resume_versions = resume
        rest = await start_watch(nursery, client, again)
        await rest.wait_synced()
        assert rest.versions(ids["x"]) == list(range(2, 22))
        late = rest.of(ids["late"])
        assert [u.update_type for u in late] == ["resync"] and value_of(late[0]) == "first"


async def test_an_overflowed_stream_ends_at_once_though_its_client_reads_nothing(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    # Issue #10, observations 7 and 9, the exact steps: no initial values, queue 32, a client whose
    # HTTP/2 window is full after `synced` and the first bytes of x's first 200 KB update; x written 4
    # times, then y 96 times. The stream stayed open (and held its queue) until the client read again.
    # Now it ends at once: cut inside an update, it can carry no status, so it is reset with
    # ENHANCE_YOUR_CALM (gRPC clients read RESOURCE_EXHAUSTED), and the client resumes from the
    # updates it received whole.
    server = await start_server(nursery, watch_queue_size=32, history_size=10_000)
    with connect(server) as client:
        session = await _string_session(client, "x", "y")
        ids = {s.name: s.id for s in await server.store.list_variables(session)}
        raw = await RawH2.open(server.port)
        stream_id = raw.start_call(WATCH, watch_request(session, "x", "y", initial=False))
        await raw.flush()
        with trio.fail_after(10):
            await raw.read_until(lambda e: isinstance(e, h2.events.DataReceived))  # synced
        for i in range(4):
            await write_string(client, session, "x", f"{i}" + "x" * 200_000)
        for i in range(96):
            await write_string(client, session, "y", f"y{i}")
        with trio.fail_after(10):  # the client only reads frames; its window never opens
            await raw.read_until(lambda e: isinstance(e, h2.events.StreamReset))
        assert raw.reset_of(stream_id) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        await eventually(lambda: server.service.open_watches == 0)
        assert server.store.cache.observers.observer_count == 0
        assert server.metrics.rpc_count("WatchVariables", "RESOURCE_EXHAUSTED") == 1
        whole = [pb.VariableUpdate().parse(m) for m in messages_in(raw.data_of(stream_id))]
        assert [u.update_type for u in whole] == ["synced"]  # x's first update was cut short
        await raw.aclose()

        again = watch_request(session, "x", "y", initial=False)
        again.resume_versions = {ids["x"]: 1, ids["y"]: 1}  # what the client holds
        rest = await start_watch(nursery, client, again)
        await rest.wait_synced()
        assert rest.versions(ids["x"]) == [2, 3, 4, 5]
        assert rest.versions(ids["y"]) == list(range(2, 98))


async def write_string(client: Client, session: str, name: str, value: str) -> None:
    await client(
        client.stub.set_variable(
            pb.SetVariableRequest(
                session_id=session, variable_identifier=name, value=PbAny.pack(StringValue(value=value))
            )
        )
    )


async def test_a_watch_falls_behind_by_at_most_watch_queue_bytes(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    # Issue #10, observation 3: a stalled watch stream with 1 MB values held ~3 MB each and could queue
    # 1,024 of them (a gigabyte); the queue is bounded in bytes too.
    server = await start_server(nursery, watch_queue_bytes=3 * 2**20)
    with connect(server) as client:
        session = await _string_session(client, "x")

        async def changes() -> None:
            for i in range(6):
                await server.store.set_variable(session, "x", f"{i}" + "x" * 2**20)

        error, trailers = await _watch_stalled_after_synced(
            server, watch_request(session, "x", initial=False), changes
        )
    assert error is not None and error.status == Status.RESOURCE_EXHAUSTED
    assert "watch_queue_bytes=3145728" in (error.message or "")
    x = (await server.store.get_variable(session, "x")).id
    assert json.loads(trailers["trio-bridge-resume-versions"]) == {x: 1}


# ---- revisions ------------------------------------------------------------------------------------------


async def test_every_update_carries_its_revision_and_heartbeats_are_bookmarks(
    autojump_clock: trio.testing.MockClock, client: Client, nursery: trio.Nursery
) -> None:
    session, ids = await new_session(client, t=0.0)
    other, _ = await new_session(client, u=0.0)
    watcher = await start_watch(nursery, client, watch_request(session, "t", heartbeat_interval_ms="1000"))
    await watcher.wait_synced()
    initial, synced = watcher.updates
    assert initial.revision == synced.revision > 0  # both at the revision the stream read at
    await write(client, session, "t", 1.0)
    await watcher.wait_for(lambda w: 2 in w.versions(ids["t"]))
    change = watcher.updates[-1]
    assert change.revision > synced.revision
    await write(client, other, "u", 1.0)  # elsewhere: the stream has nothing to send for it
    later = len(watcher.updates)
    await watcher.wait_for(lambda w: len(w.updates) > later)
    heartbeat = watcher.updates[-1]
    assert heartbeat.update_type == "heartbeat"
    assert heartbeat.revision > change.revision  # the bookmark moved past the other session's write


async def test_a_resume_by_revision_replays_only_what_changed_after_it(
    client: Client, nursery: trio.Nursery
) -> None:
    session, ids = await new_session(client, x=0.0, y=0.0)
    first = await start_watch(nursery, client, watch_request(session))
    await first.wait_synced()
    held = first.updates[-1].revision  # "synced": the client holds everything up to it
    first.cancel_scope.cancel()
    await first.wait_ended()
    await write(client, session, "x", 1.0)  # after `held`: the client lacks it
    registered = await client(
        client.stub.register_variable(
            pb.RegisterVariableRequest(session_id=session, name="z", type=VT.FLOAT, initial_value=number(5.0))
        )
    )
    assert registered.variable is not None
    request = watch_request(session)  # initial values asked for, but the revision says what is held
    request.resume_revision = held
    resumed = await start_watch(nursery, client, request)
    await resumed.wait_synced()
    got = [(u.variable_id, u.update_type, value_of(u)) for u in resumed.updates if u.variable is not None]
    assert got == [  # replayed from the history; not y: unchanged
        (ids["x"], "value_change", 1.0),
        (registered.variable.id, "variable_registered", 5.0),
    ]
    request.resume_revision = held + 1_000_000  # not reached here (another deployment's): all resync
    unknown = await start_watch(nursery, client, request)
    await unknown.wait_synced()
    assert {u.variable_id for u in unknown.updates if u.update_type == "resync"} == {
        ids["x"],
        ids["y"],
        registered.variable.id,
    }
    # And it says that every variable held and not sent is gone: from an unknown revision, the server
    # cannot tell which (synced said nothing, and a client kept variables of the other state).
    assert unknown.updates[-1].update_type == "synced"
    assert unknown.updates[-1].update_metadata == {"resync": "all"}
    # Nor does a later resume point claim that revision: the changes up to it would never come.
    request.options = {"heartbeat_interval_ms": "100"}
    beating = await start_watch(nursery, client, request)
    await beating.wait_for(lambda w: w.kinds()[-1:] == ["heartbeat"])
    assert beating.updates[-1].revision < held + 1_000_000  # (it said held + 1,000,000)
    request.resume_revision = -1
    refused = await start_watch(nursery, client, request)
    await refused.wait_ended()
    assert refused.updates == [] and isinstance(refused.error, GRPCError)
    assert refused.error.status == Status.INVALID_ARGUMENT
    assert "resume_revision must not be negative" in (refused.error.message or "")


async def test_a_replayed_update_is_the_live_one_field_for_field(
    client: Client, nursery: trio.Nursery
) -> None:
    # A registration replayed by a resume from a revision came with no source and a 1970 timestamp.
    session, ids = await new_session(client, x=0.0)
    live = await start_watch(nursery, client, watch_request(session))  # open throughout: sees them live
    await live.wait_synced()
    held = live.updates[-1].revision
    await write(client, session, "x", 1.0, source="writer", metadata={"why": "calibration"})
    registered = await client(
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id=session,
                name="z",
                type=VT.FLOAT,
                initial_value=number(5.0),
                metadata={"unit": "m"},
                source="registrar",
            )
        )
    )
    assert registered.variable is not None
    z = registered.variable.id
    await live.wait_for(lambda w: bool(w.of(z)))
    change, registration = [u for u in live.updates if u.variable is not None and u.revision > held]
    assert (change.variable_id, change.update_type, change.update_source) == (
        ids["x"],
        "value_change",
        "writer",
    )
    assert change.update_metadata == {"why": "calibration"} and change.old_value == number(0.0)
    assert (registration.variable_id, registration.update_type) == (z, "variable_registered")
    assert registration.update_source == "registrar"
    assert registration.timestamp is not None and registration.timestamp.year > 2000

    by_revision = watch_request(session)
    by_revision.resume_revision = held
    resumed = await start_watch(nursery, client, by_revision)
    await resumed.wait_synced()
    assert [u for u in resumed.updates if u.variable is not None] == [change, registration]

    by_version = watch_request(session, "x", initial=False)
    by_version.resume_versions = {ids["x"]: 1}
    again = await start_watch(nursery, client, by_version)
    await again.wait_synced()
    assert [u for u in again.updates if u.variable is not None] == [change]


async def test_a_replay_beyond_the_servers_history_is_etcds_history_or_a_resync(
    store_kind: str, nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, history_size=1)  # the server's own history: one change
    with connect(server) as client:
        session, ids = await new_session(client, x=0.0)
        live = await start_watch(nursery, client, watch_request(session))
        await live.wait_synced()
        held = live.updates[-1].revision
        registered = await client(
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=session, name="z", type=VT.FLOAT, initial_value=number(5.0), source="registrar"
                )
            )
        )
        assert registered.variable is not None
        z = registered.variable.id
        for i in (1, 2):  # x and z changed twice each since `held`: z registered and changed since
            await write(client, session, "x", float(i), source=f"x{i}", metadata={"i": str(i)})
            await write(client, session, "z", 5.0 + i, source=f"z{i}", metadata={"i": str(i)})
        await live.wait_for(lambda w: w.versions(z) == [1, 2, 3])
        sent_live = {v: [u for u in live.of(v) if u.revision > held] for v in (ids["x"], z)}

        request = watch_request(session)
        request.resume_revision = held
        resumed = await start_watch(nursery, client, request)
        await resumed.wait_synced()
        if store_kind == "etcd":  # read back from etcd's history (not compacted): as sent live
            assert {v: resumed.of(v) for v in (ids["x"], z)} == sent_live
        else:  # lost: the current value, standing for the changes missed, from where the client stood
            assert [(u.variable_id, u.update_type, value_of(u)) for u in resumed.updates[:2]] == [
                (ids["x"], "resync", 2.0),
                (z, "resync", 7.0),
            ]
            for update in resumed.updates[:2]:
                assert update.update_source == "resync"
                assert update.update_metadata == {"resume_revision": str(held)}


async def delete(client: Client, session: str, identifier: str) -> None:
    await client(
        client.stub.delete_variable(
            pb.DeleteVariableRequest(session_id=session, variable_identifier=identifier)
        )
    )


async def register(client: Client, session: str, name: str, value: float) -> pb.Variable:
    response = await client(
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id=session, name=name, type=VT.FLOAT, initial_value=number(value)
            )
        )
    )
    assert response.variable is not None
    return response.variable


def seen(watcher: Watcher) -> list[tuple[str, str, bool]]:
    """Each update as (type, variable id, whether it carries the variable)."""
    return [(u.update_type, u.variable_id, u.variable is not None) for u in watcher.updates]


async def _away_while_variables_go(
    client: Client, nursery: trio.Nursery
) -> tuple[str, dict[str, str], int, pb.Variable]:
    """A session of x, y and w, watched whole until ``synced`` (at the revision returned); then, with
    no watch open, y is deleted, z registered and deleted, and w deleted and registered anew (the new
    variable, returned, has the old one's name and a new id)."""
    session, ids = await new_session(client, x=0.0, y=0.0, w=0.0)
    first = await start_watch(nursery, client, watch_request(session))
    await first.wait_synced()
    held = first.updates[-1].revision
    first.cancel_scope.cancel()
    await first.wait_ended()
    await delete(client, session, "y")
    await register(client, session, "z", 1.0)  # registered and deleted since `held`: never held
    await delete(client, session, "z")
    await delete(client, session, "w")
    new_w = await register(client, session, "w", 2.0)
    return session, ids, held, new_w


async def test_a_resume_by_revision_reports_the_variables_deleted_since(
    client: Client, nursery: trio.Nursery
) -> None:
    # A whole-session watch resumed with resume_revision alone was sent just `synced`: y and the old
    # w, deleted meanwhile, stayed with the client for ever.
    session, ids, held, new_w = await _away_while_variables_go(client, nursery)
    request = watch_request(session)
    request.resume_revision = held
    resumed = await start_watch(nursery, client, request)
    await resumed.wait_synced()
    assert seen(resumed) == [
        ("variable_deleted", ids["y"], False),  # gone since `held`: only its id
        ("variable_deleted", ids["w"], False),
        ("variable_registered", new_w.id, True),  # its successor, replayed; z: nothing (never held)
        ("synced", "", False),
    ]
    assert resumed.updates[-1].update_metadata == {}  # the server could tell: nothing to resync

    for named in ("y", ids["y"]):  # named in resume_versions too: one notice, under the name given
        request.resume_versions = {named: 1}
        both = await start_watch(nursery, client, request)
        await both.wait_synced()
        assert seen(both) == [
            ("variable_deleted", named, False),
            ("variable_deleted", ids["w"], False),
            ("variable_registered", new_w.id, True),
            ("synced", "", False),
        ]


async def test_a_watch_by_name_resumed_by_revision_reports_the_variable_the_name_had(
    client: Client, nursery: trio.Nursery
) -> None:
    session, ids, held, new_w = await _away_while_variables_go(client, nursery)
    request = watch_request(session, "w", "x")
    request.resume_revision = held
    resumed = await start_watch(nursery, client, request)
    await resumed.wait_synced()
    assert seen(resumed) == [
        ("variable_deleted", ids["w"], False),  # the w the client held, by its id
        ("variable_registered", new_w.id, True),
        ("synced", "", False),
    ]


async def test_a_resume_by_revision_beyond_the_history_is_etcds_history_or_a_full_resync(
    store_kind: str, nursery: trio.Nursery, aio_loop: Any
) -> None:
    server = await start_server(nursery, history_size=1)  # the server's own history: one change
    with connect(server) as client:
        session, ids = await new_session(client, x=0.0, y=0.0, u=0.0)
        first = await start_watch(nursery, client, watch_request(session))
        await first.wait_synced()
        held = first.updates[-1].revision
        first.cancel_scope.cancel()
        await first.wait_ended()
        await delete(client, session, "y")
        await write(client, session, "x", 1.0)  # the deletion falls out of the one-change history
        request = watch_request(session)
        request.resume_revision = held
        if store_kind == "etcd":  # etcd's history tells which variables the session had at `held`
            exact = await start_watch(nursery, client, request)
            await exact.wait_synced()
            assert seen(exact) == [
                ("variable_deleted", ids["y"], False),
                ("value_change", ids["x"], True),
                ("synced", "", False),
            ]
            assert exact.updates[-1].update_metadata == {}
            await compact_etcd(server)
        # Nothing can tell any more which variables went: every variable comes, and `synced` says
        # that any other the client holds is gone.
        resynced = await start_watch(nursery, client, request)
        await resynced.wait_synced()
        assert seen(resynced) == [
            ("value_change", ids["x"], True),  # replayed: its own change is still in the history
            ("resync", ids["u"], True),  # unchanged, but sent, so that the client can tell it is there
            ("synced", "", False),
        ]
        assert resynced.updates[1].update_metadata == {"resume_revision": str(held)}
        assert resynced.updates[-1].update_metadata == {"resync": "all"}


async def test_a_resume_by_revision_on_a_server_started_since_is_exact(
    store_kind: str, nursery: trio.Nursery, aio_loop: Any
) -> None:
    # A server that loaded the state after `held` replayed x's registration again (the client held it),
    # waited etcd's request timeout (5 s) for y's changes since (none) before resyncing it, and said
    # nothing of w.
    if store_kind == "memory":
        pytest.skip("an in-memory server's state is its own: another server does not have the session")
    first = await start_server(nursery)
    with connect(first) as client:
        session, ids = await new_session(client, x=0.0, y=0.0, w=0.0)
        await write(client, session, "y", 1.0)
        watcher = await start_watch(nursery, client, watch_request(session))
        await watcher.wait_synced()
        held = watcher.updates[-1].revision
        watcher.cancel_scope.cancel()
        await watcher.wait_ended()
        await delete(client, session, "w")
        u = await register(client, session, "u", 3.0)
    second = await start_server(nursery)  # loads the state as it is now
    with connect(second) as client:
        request = watch_request(session)
        request.resume_revision = held
        resumed = await start_watch(nursery, client, request)
        await resumed.wait_synced()
        assert seen(resumed) == [
            ("variable_deleted", ids["w"], False),
            ("variable_registered", u.id, True),
            ("synced", "", False),
        ]

"""The web view over HTTP (no browser): its JSON, its live feed, its writes, its security and limits.
The pages themselves, in a real browser: test_web_browser.py."""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from tests.support import LOOPBACK, Client, connect, eventually, start_server, start_watch
from tests.web_client import Feed, WebClient
from trio_bridge import RunningServer, Store
from trio_bridge import _encoding as enc
from trio_bridge._types import VariableType
from trio_bridge._web.app import CONTENT_SECURITY_POLICY
from trio_bridge._web.views import MAX_BARS, MAX_CELLS, TEXT_CHARS, value_view
from trio_bridge.proto import unified_bridge as pb


async def web_server(nursery: trio.Nursery, **config: Any) -> tuple[RunningServer, WebClient]:
    server = await start_server(nursery, web_port=0, **config)
    assert server.web_port is not None
    return server, WebClient(server.web_port)


async def make_session(client: Client, session_id: str = "lab", **variables: tuple[str, object]) -> None:
    await client(client.stub.create_session(pb.CreateSessionRequest(session_id=session_id)))
    for name, (vtype, value) in variables.items():
        kind = VariableType[vtype.upper()]
        await client(
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=session_id,
                    name=name,
                    type=pb.VariableType(int(kind)),
                    initial_value=enc.pack_value(kind, value),
                )
            )
        )


async def set_value(client: Client, name: str, value: float, session_id: str = "lab", **kwargs: Any) -> int:
    reply = await client(
        client.stub.set_variable(
            pb.SetVariableRequest(
                session_id=session_id,
                variable_identifier=name,
                value=enc.pack_value(VariableType.FLOAT, value),
                **kwargs,
            )
        )
    )
    return reply.variable.version


async def delete_variable(client: Client, name: str, session_id: str = "lab") -> None:
    await client(
        client.stub.delete_variable(pb.DeleteVariableRequest(session_id=session_id, variable_identifier=name))
    )


def values_of(events: list[Any], name: str) -> list[tuple[int, str]]:
    return [
        (e.data["variable"]["version"], e.data["variable"]["value"]["text"])
        for e in events
        if e.event == "update" and e.data.get("variable", {}).get("name") == name
    ]


async def next_update(feed: Feed) -> dict[str, Any]:
    event = await feed.until(lambda e: e.event in ("update", "end") and e.data.get("type") != "heartbeat")
    assert event.event == "update", event
    data: dict[str, Any] = event.data
    return data


# ---- pages and JSON ---------------------------------------------------------------------------------


async def test_sessions_are_listed_with_their_variables_watches_and_ttl(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, web = await web_server(nursery, session_ttl=60)
    with connect(server) as client:
        await make_session(client, "lab", t=("float", 1.5), mode=("string", "idle"))
        watcher = await start_watch(nursery, client, pb.WatchVariablesRequest(session_id="lab"))
        await watcher.wait_synced()
        await make_session(client, "idle-one")
        listing = (await web.get("/api/sessions")).json()
        by_id = {s["id"]: s for s in listing["sessions"]}
        assert by_id["lab"]["variables"] == 2
        assert by_id["lab"]["watches"] == 1
        assert by_id["lab"]["expires_in"] is None  # held open by its watch
        assert by_id["idle-one"]["watches"] == 0
        assert 0 < by_id["idle-one"]["expires_in"] <= 60
        assert by_id["lab"]["created_at"] > 0


async def test_the_sessions_listing_is_bounded_and_filtered(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery)
    with connect(server) as client:
        for number in range(12):
            await make_session(client, f"run-{number:02}" if number % 2 else f"job-{number:02}")
    listing = (await web.get("/api/sessions?limit=3")).json()
    assert [s["id"] for s in listing["sessions"]] == ["job-00", "run-01", "job-02"] and listing["total"] == 12
    runs = (await web.get("/api/sessions?filter=run-&limit=2")).json()
    assert [s["id"] for s in runs["sessions"]] == ["run-01", "run-03"] and runs["total"] == 6
    assert (await web.get("/api/sessions?limit=lots")).json() == {
        "status": "INVALID_ARGUMENT",
        "message": "limit must be a whole number, got 'lots'",
    }


async def test_pages_and_static_files_are_served_with_a_strict_policy(nursery: trio.Nursery) -> None:
    _, web = await web_server(nursery)
    for path, kind in [
        ("/", "text/html"),
        ("/sessions/lab", "text/html"),
        ("/login", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/api/sessions", "application/json"),
    ]:
        response = await web.get(path)
        assert response.status == 200, path
        assert response.headers["content-type"].startswith(kind), path
        policy = response.headers["content-security-policy"]
        assert policy == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    html = (await web.get("/")).body.decode()
    assert "<script>" not in html and "style=" not in html  # nothing inline
    missing = await web.get("/static/secrets.txt")
    assert missing.status == 404
    assert missing.json() == {"status": "NOT_FOUND", "message": "no page GET /static/secrets.txt"}


async def test_a_request_naming_another_host_is_refused_unless_allowed(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, web_allowed_hosts=("bridge.lab.example",))
    assert server.web_port is not None
    rebinding = await web.get("/api/sessions", headers=[("Host", f"evil.example:{server.web_port}")])
    assert rebinding.status == 403
    assert rebinding.json()["message"] == (
        "the web view does not answer to host 'evil.example': allow it with --web-allowed-host "
        "evil.example (this guards against DNS rebinding)"
    )
    for host in ("localhost", "bridge.lab.example", "[::1]", "10.0.0.7"):
        allowed = await web.get("/api/sessions", headers=[("Host", f"{host}:{server.web_port}")])
        assert allowed.status == 200, host


# ---- the live feed ------------------------------------------------------------------------------


async def test_the_feed_sends_current_values_then_every_change_in_order(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0), note=("string", "<script>alert(1)</script>"))
        async with web.feed("lab") as feed:
            assert feed.status == 200
            assert feed.headers["content-type"].startswith("text/event-stream")
            initial = await feed.updates_until_synced()
            assert feed.retry == 1000
            assert values_of(initial, "t") == [(1, "1.0")]
            assert values_of(initial, "note") == [(1, "<script>alert(1)</script>")]  # text, as JSON
            synced = feed.events[-1]
            assert synced.id is not None and synced.data["complete_listing"] is True
            for value in (2.0, 3.0, 4.0):
                await set_value(client, "t", value, source="probe")
            changes = [await next_update(feed) for _ in range(3)]
            assert [(c["variable"]["version"], c["variable"]["value"]["text"]) for c in changes] == [
                (2, "2.0"),
                (3, "3.0"),
                (4, "4.0"),
            ]
            assert all(c["type"] == "value_change" and c["source"] == "probe" for c in changes)
            assert [c["old_number"] for c in changes] == [1.0, 2.0, 3.0]
            ids = [e.id for e in feed.events[-3:] if e.id is not None]
            assert len(ids) == 3
            revisions = [int(i.split("@")[0]) for i in ids]
            assert revisions == sorted(revisions)
            assert {i.split("@", 1)[1] for i in ids} == {server.store.state_id}


async def test_numbers_start_with_their_recent_history(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, web_history_points=5)
    with connect(server) as client:
        await make_session(client, t=("float", 0.0), word=("string", "a"))
        for value in range(1, 10):
            await set_value(client, "t", float(value))
        async with web.feed("lab") as feed:
            initial = await feed.updates_until_synced()
        # The last five changes (versions 6 to 10), each with the value before it: a sparkline's points.
        assert values_of(initial, "t") == [(v, f"{v - 1}.0") for v in range(6, 11)]
        assert initial[0].data["old_number"] == 4.0
        assert values_of(initial, "word") == [(1, "a")]


async def test_a_deleted_variable_and_an_ended_session_are_told(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0), u=("float", 2.0))
        async with web.feed("lab") as feed:
            await feed.updates_until_synced()
            await delete_variable(client, "u")
            deleted = await next_update(feed)
            assert deleted["type"] == "variable_deleted" and deleted["variable"]["name"] == "u"
            await client(client.stub.cleanup_session(pb.CleanupSessionRequest(session_id="lab")))
            end = await feed.until(lambda e: e.event == "end")
            assert end.data == {
                "status": "NOT_FOUND",
                "message": "session 'lab' was cleaned up; the watch has ended",
                "resumable": False,
            }
            assert await feed.next() is None  # and the response is over
        assert server.store.cache.observers.observer_count == 0


async def test_a_reconnecting_page_resumes_without_a_gap(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0), u=("float", 5.0))
        async with web.feed("lab") as feed:
            await feed.updates_until_synced()
            await set_value(client, "t", 2.0)
            await next_update(feed)
            held = feed.events[-1].id
        assert held is not None
        # Away: two changes, a deletion and a new variable.
        await set_value(client, "t", 3.0)
        await set_value(client, "t", 4.0)
        await delete_variable(client, "u")
        await make_session_variable(client, "v", 7.0)
        async with web.feed("lab", last_event_id=held) as feed:
            replayed = await feed.updates_until_synced()
            kinds = [
                (
                    e.data["type"],
                    e.data.get("variable", {}).get("name"),
                    e.data.get("variable", {}).get("version"),
                )
                for e in replayed
            ]
            assert ("value_change", "t", 3) in kinds and ("value_change", "t", 4) in kinds
            assert kinds.index(("value_change", "t", 3)) < kinds.index(("value_change", "t", 4))
            assert ("variable_registered", "v", 1) in kinds
            assert any(e.data["type"] == "variable_deleted" for e in replayed)  # u, by id
            assert ("value_change", "t", 2) not in kinds  # the page had it
            assert feed.events[-1].data["complete_listing"] is False


async def make_session_variable(client: Client, name: str, value: float) -> None:
    await client(
        client.stub.register_variable(
            pb.RegisterVariableRequest(
                session_id="lab",
                name=name,
                type=pb.VariableType.FLOAT,
                initial_value=enc.pack_value(VariableType.FLOAT, value),
            )
        )
    )


async def test_a_resume_the_history_cannot_serve_resyncs_and_says_so(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, history_size=2)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
        async with web.feed("lab") as feed:
            await feed.updates_until_synced()
            held = feed.events[-1].id
        for value in range(2, 8):
            await set_value(client, "t", float(value))
        assert held is not None
        async with web.feed("lab", last_event_id=held) as feed:
            replayed = await feed.updates_until_synced()
        assert [(e.data["type"], e.data["variable"]["version"]) for e in replayed] == [("resync", 7)]


async def test_a_bad_last_event_id_is_refused(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery)
    with connect(server) as client:
        await make_session(client)
    for bad in ("12; DROP", "²@x".encode("latin-1"), "9" * 5000 + "@x", "12"):
        async with web.feed("lab", last_event_id=bad) as feed:
            assert feed.status == 400, bad
    response = await web.request("GET", "/api/sessions/lab/events", headers=[("Last-Event-ID", "12; DROP")])
    assert response.json()["message"] == (
        "Last-Event-ID must be REVISION@STATE, as the feed sent it, got '12; DROP'"
    )


async def test_a_page_resuming_from_another_state_starts_afresh(nursery: trio.Nursery) -> None:
    # A page open on an in-memory server that restarted held revision 7 of a state that is gone: the
    # new state's revision 7 says nothing of it. It gets every variable, and is told they are all.
    server, web = await web_server(nursery)
    with connect(server) as client:
        await make_session(client, a=("float", 1.0), b=("float", 2.0))
        async with web.feed("lab", last_event_id="7@memory:a-state-that-is-gone") as feed:
            initial = await feed.updates_until_synced()
        assert sorted(e.data["variable"]["name"] for e in initial) == ["a", "b"]
        assert feed.events[-1].data["complete_listing"] is True


async def test_an_open_page_neither_restarts_nor_holds_a_session_s_ttl(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, web = await web_server(nursery, session_ttl=30)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
        async with web.feed("lab") as feed:
            await feed.updates_until_synced()
            assert server.store.cache.session("lab").watchers == 0  # not among its open watches
            end = await feed.until(lambda e: e.event == "end")  # 30 s later, on the mock clock
            assert end.data["status"] == "NOT_FOUND"
            assert "expired" in end.data["message"]


async def test_a_feed_of_a_missing_session_ends_with_not_found(nursery: trio.Nursery) -> None:
    _, web = await web_server(nursery)
    async with web.feed("nope") as feed:
        end = await feed.until(lambda e: e.event == "end")
    assert end.data == {
        "status": "NOT_FOUND",
        "message": "session 'nope' not found (it may have expired)",
        "resumable": False,
    }


async def test_feeds_count_toward_the_stream_limits(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, max_watch_streams=2)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
        watcher = await start_watch(nursery, client, pb.WatchVariablesRequest(session_id="lab"))
        await watcher.wait_synced()
        async with web.feed("lab") as first:
            await first.updates_until_synced()
            assert server.service.open_watches == 2
            async with web.feed("lab") as second:
                end = await second.until(lambda e: e.event == "end")
                assert end.data["status"] == "RESOURCE_EXHAUSTED"
                assert "max_watch_streams=2" in end.data["message"]
                assert end.data["resumable"] is False  # the page shows it; it does not retry forever
            # and a gRPC watch is refused while the page holds its place
            refused = await start_watch(nursery, client, pb.WatchVariablesRequest(session_id="lab"))
            await refused.wait_ended()
            assert "max_watch_streams=2" in str(refused.error)
        await trio.testing.wait_all_tasks_blocked()
        assert server.service.open_watches == 1


async def test_pages_from_one_address_count_as_one_connection(nursery: trio.Nursery) -> None:
    # Each page is a connection of its own: per connection, one browser could take every stream.
    server, web = await web_server(nursery, max_watch_streams_per_connection=2)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
        async with web.feed("lab") as first, web.feed("lab") as second:
            await first.updates_until_synced()
            await second.updates_until_synced()
            async with web.feed("lab") as third:
                end = await third.until(lambda e: e.event == "end")
            assert end.data["status"] == "RESOURCE_EXHAUSTED"
            assert end.data["message"] == (
                f"this browser's host ({LOOPBACK}) has 2 live pages open, its limit "
                "max_watch_streams_per_connection=2; close some"
            )
            watcher = await start_watch(nursery, client, pb.WatchVariablesRequest(session_id="lab"))
            await watcher.wait_synced()  # gRPC's connections are counted apart


async def test_connections_from_one_host_are_bounded(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, max_watch_streams_per_connection=1)
    assert server.web_port is not None
    held = []
    for _ in range(17):  # one per page (max_watch_streams_per_connection=1) and 16 more
        stream = await trio.open_tcp_stream(LOOPBACK, server.web_port)
        held.append(stream)
        # Answered, so counted (and kept open: HTTP/1.1 keeps the connection alive).
        await stream.send_all(f"GET /api/me HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some()
    refused = await web.get("/api/sessions")
    assert refused.status == 503
    assert refused.json() == {
        "status": "RESOURCE_EXHAUSTED",
        "message": f"{LOOPBACK} has 17 connections to the web view open, its limit (one per page, "
        "max_watch_streams_per_connection, and 16 more) is 17; retry later",
    }
    for stream in held:
        await stream.aclose()
    with trio.fail_after(10):  # (a safety bound) once they are closed, there is room again
        while (await web.get("/api/sessions")).status != 200:  # noqa: ASYNC110 (the server's side)
            await trio.sleep(0.01)


async def test_connections_reset_at_once_do_not_stop_the_server(nursery: trio.Nursery) -> None:
    # A connection reset before its handler asked for its peer's address raised out of the accept
    # loop, and took the whole server (gRPC too) down.
    import socket
    import struct

    server, web = await web_server(nursery)
    assert server.web_port is not None
    for _ in range(300):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await sock.connect((LOOPBACK, server.web_port))
        sock.close()  # a reset, at once
    assert (await web.get("/api/me")).status == 200
    with connect(server) as client:
        assert (await client(client.stub.ping(pb.PingRequest(message="still here")))).message == "still here"


async def write_big(client: Client, version: int) -> None:
    """A 200 KB value: a few fill every buffer between a feed and a page that does not read."""
    await client(
        client.stub.set_variable(
            pb.SetVariableRequest(
                session_id="lab",
                variable_identifier="big",
                value=enc.pack_value(VariableType.STRING, "y" * 200_000 + str(version)),
            )
        )
    )


async def test_a_page_that_never_reads_again_is_cut_and_its_watch_freed(nursery: trio.Nursery) -> None:
    # The feed's send to it could not be cancelled (the HTTP server shields socket writes): it held
    # its watch, its place among the streams, and the server's shutdown, for as long as the page lived.
    server, web = await web_server(nursery, watch_queue_size=8)
    with connect(server) as client:
        await make_session(client, big=("string", "x"))
        async with web.feed("lab", receive_buffer=4096) as feed:
            await feed.updates_until_synced()
            observers = server.store.cache.observers
            version = 1
            while observers.observer_count:  # the feed is cut, and its watch gone, once it falls behind
                version += 1
                await write_big(client, version)
                await trio.testing.wait_all_tasks_blocked()
                assert version < 200, "the feed never fell behind"
            await eventually(lambda: server.service.open_watches == 0)  # and never read a byte more
            assert len(server.service._watches) == 0


async def test_a_page_that_stops_reading_meets_the_slow_consumer_policy(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, watch_queue_size=8)
    with connect(server) as client:
        await make_session(client, t=("float", 0.0), big=("string", "x"))
        async with web.feed("lab", receive_buffer=4096) as feed:
            await feed.updates_until_synced()
            observers = server.store.cache.observers
            assert observers.observer_count == 1
            version = 1
            while observers.observer_count:  # the feed is cut, and its watch gone, once it falls behind
                version += 1
                await write_big(client, version)
                await trio.testing.wait_all_tasks_blocked()
                assert version < 200, "the feed never fell behind"
            # The page reads again: what it has ends whole events, then the connection is closed (the
            # browser reconnects, and resumes from the last whole event's id).
            with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
                while (event := await feed.next()) is not None:
                    assert event.event == "update"
            held = next(e.id for e in reversed(feed.events) if e.id is not None)
        async with web.feed("lab", last_event_id=held) as resumed:
            replayed = await resumed.updates_until_synced()
        versions = [e.data["variable"]["version"] for e in replayed]
        assert versions == sorted(versions) and versions[-1] == version  # the rest, in order
        await eventually(lambda: server.service.open_watches == 0)


async def test_shutdown_ends_within_its_grace_while_a_page_does_not_read(nursery: trio.Nursery) -> None:
    # The feed's send to a page that stopped reading could not be cancelled: the server never
    # stopped (SIGTERM, SIGINT ignored) until the page went away.
    gave_up = False
    async with contextlib.AsyncExitStack() as page, trio.open_nursery() as guard:
        async with trio.open_nursery() as own:
            server, web = await web_server(own, shutdown_grace=0.5, watch_queue_bytes=2**30)
            with connect(server) as client:
                await make_session(client, big=("string", "x"))
                # Held open until the server has stopped (the exit stack is outside its nursery).
                feed = await page.enter_async_context(web.feed("lab", receive_buffer=4096))
                await feed.updates_until_synced()
                version = 1
                # Until the feed's send is stuck on the page (every buffer between them full), short
                # of an overflow.
                while not any(w._sending is not None for w in server.service._watches):
                    version += 1
                    await write_big(client, version)
                    await trio.testing.wait_all_tasks_blocked()
                    assert version < 500, "the feed's send never waited"

            async def give_up_on_a_hang() -> None:  # (a safety bound: the page lets go, the test fails)
                nonlocal gave_up
                await trio.sleep(60)
                gave_up = True
                await feed.stream.aclose()

            guard.start_soon(give_up_on_a_hang)
            own.cancel_scope.cancel()
        guard.cancel_scope.cancel()
    assert not gave_up, "the server did not stop while a page held its connection open"


async def test_shutdown_ends_feeds_saying_so(nursery: trio.Nursery) -> None:
    async with trio.open_nursery() as own:
        server, web = await web_server(own, shutdown_grace=5)
        with connect(server) as client:
            await make_session(client, t=("float", 1.0))
            async with web.feed("lab") as feed:
                await feed.updates_until_synced()
                own.cancel_scope.cancel()
                end = await feed.until(lambda e: e.event == "end")
                assert end.data["status"] == "UNAVAILABLE" and end.data["resumable"] is True
                assert await feed.next() is None


# ---- writes -------------------------------------------------------------------------------------


async def test_writes_are_refused_unless_writable(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
    refused = await web.post("/api/sessions/lab/variables/t", {"value": "2", "expected_version": 1})
    assert refused.status == 403
    assert refused.json() == {
        "status": "PERMISSION_DENIED",
        "message": "the web view is read-only: start the server with --web-writable to allow writes",
    }


async def test_a_compare_and_set_write_from_the_page(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, web_writable=True)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
        done = await web.post("/api/sessions/lab/variables/t", {"value": "2.5", "expected_version": 1})
        assert done.status == 200
        assert done.json()["variable"]["version"] == 2
        assert done.json()["variable"]["source"] == "web"
        stale = await web.post("/api/sessions/lab/variables/t", {"value": "3", "expected_version": 1})
        assert stale.status == 409
        assert stale.json() == {
            "status": "ABORTED",
            "message": "variable 't': expected version 1, but the current version is 2; nothing was changed",
        }
        bad = await web.post("/api/sessions/lab/variables/t", {"value": "2,5", "expected_version": 2})
        assert bad.status == 400
        assert bad.json()["message"] == (
            "value '2,5' for float variable 't' is not a number (for example: 21.5)"
        )
        missing = await web.post("/api/sessions/lab/variables/nope", {"value": "1", "expected_version": 1})
        assert missing.status == 404
        nested = await web.request(
            "POST",
            "/api/sessions/lab/variables/t",
            body=b"[" * 50_000 + b"]" * 50_000,
            headers=[("Content-Type", "application/json")],
        )
        assert nested.status == 400 and "nested too deeply" in nested.json()["message"]
        no_version = await web.post("/api/sessions/lab/variables/t", {"value": "1"})
        assert no_version.status == 400 and "expected_version" in no_version.json()["message"]
        form = await web.request(
            "POST",
            "/api/sessions/lab/variables/t",
            body=b"value=1&expected_version=2",
            headers=[("Content-Type", "application/x-www-form-urlencoded")],
        )
        assert form.status == 415  # a plain form (another site's) cannot write
        cross = await web.post(
            "/api/sessions/lab/variables/t",
            {"value": "1", "expected_version": 2},
            headers=[("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site")],
        )
        assert cross.status == 403
        reply = await client(
            client.stub.get_variable(pb.GetVariableRequest(session_id="lab", variable_identifier="t"))
        )
        assert reply.variable.version == 2  # none of the refused ones changed anything


async def test_a_write_is_checked_as_the_store_checks_it(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, web_writable=True)
    with connect(server) as client:
        await make_session(client, n=("integer", 1))
        huge = await web.post("/api/sessions/lab/variables/n", {"value": str(2**63), "expected_version": 1})
        assert huge.status == 400  # packed, it wrapped around to -9223372036854775808
        assert huge.json()["message"] == (
            "variable 'n' (integer): value 9223372036854775808 does not fit in a signed 64-bit integer"
        )
        await server.service.drain()
        late = await web.post("/api/sessions/lab/variables/n", {"value": "2", "expected_version": 1})
        assert late.status == 503
        assert late.json() == {"status": "UNAVAILABLE", "message": "the server is shutting down"}


async def test_a_write_takes_the_server_s_limits(nursery: trio.Nursery) -> None:
    server, web = await web_server(nursery, web_writable=True, max_value_bytes=64, max_message_bytes=1024)
    with connect(server) as client:
        await make_session(client, s=("string", "x"))
        refused = await web.post("/api/sessions/lab/variables/s", {"value": "y" * 100, "expected_version": 1})
        assert refused.status == 400
        assert "max_value_bytes" in refused.json()["message"]
        huge = await web.post("/api/sessions/lab/variables/s", {"value": "y" * 2000, "expected_version": 1})
        assert huge.status == 413
        assert huge.json() == {
            "status": "RESOURCE_EXHAUSTED",
            "message": "the request is larger than the limit max_message_bytes=1024",
        }


# ---- tokens -------------------------------------------------------------------------------------

TOKENS = "alice alice-token-0123456789 own\nbob bob-token-0123456789abc own\nroot root-token-0123456789 all\n"


async def test_with_tokens_no_token_no_data_and_only_sessions_in_scope(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    server, web = await web_server(nursery, token_file=tokens, web_writable=True)
    for name, token in (("alice", "alice-token-0123456789"), ("bob", "bob-token-0123456789abc")):
        with connect(server) as client:
            metadata = {"authorization": f"Bearer {token}"}
            await client(
                client.stub.create_session(
                    pb.CreateSessionRequest(session_id=f"{name}-lab"), metadata=metadata
                )
            )
    # No token: nothing.
    for path in ("/api/sessions", "/api/sessions/alice-lab"):
        response = await web.get(path)
        assert response.status == 401
        assert response.json()["status"] == "UNAUTHENTICATED"
    async with web.feed("alice-lab") as feed:
        assert feed.status == 401
    assert (
        await web.post("/api/sessions/alice-lab/variables/t", {"value": "1", "expected_version": 1})
    ).status == 401
    me = (await web.get("/api/me")).json()
    assert me == {
        "token_required": True,
        "signed_in_as": None,
        "problem": None,
        "writable": True,
        "history_points": 120,
    }
    # A wrong token is refused, without saying more.
    wrong = await web.post("/api/login", {"token": "not-a-token-at-all"})
    assert wrong.status == 401 and wrong.json()["message"] == "the token is not valid"
    # Signing in sets an HttpOnly, SameSite=Strict cookie; with it, alice sees her session only.
    login = await web.post("/api/login", {"token": "alice-token-0123456789"})
    assert login.status == 200
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "alice-token" not in cookie  # it stands for the token; it is not the token
    sign_in = cookie.split(";")[0]
    alice = WebClient(web.port, [("Cookie", sign_in)])
    assert [s["id"] for s in (await alice.get("/api/sessions")).json()["sessions"]] == ["alice-lab"]
    assert (await alice.get("/api/me")).json()["signed_in_as"] == "alice"
    others = await alice.get("/api/sessions/bob-lab")
    assert others.status == 404  # exactly as a session that does not exist
    assert others.json()["message"] == "session 'bob-lab' not found (it may have expired)"
    async with alice.feed("bob-lab") as feed:
        end = await feed.until(lambda e: e.event == "end")
        assert end.data["status"] == "NOT_FOUND"
    # A forged sign-in, or a second one planted beside it (by a page on another port), is refused.
    name, _, value = sign_in.partition("=")
    forged = WebClient(web.port, [("Cookie", f"{name}={value[:-4]}beef")])
    assert (await forged.get("/api/sessions")).json() == {
        "status": "UNAUTHENTICATED",
        "message": "the sign-in is not valid (or the server restarted): sign in again",
    }
    odd = WebClient(web.port, [("Cookie", f"{name}=x.1.\xe9".encode("latin-1"))])
    assert (await odd.get("/api/sessions")).status == 401  # (it was a 500, and /api/me too)
    assert (await odd.get("/api/me")).json()["problem"] == (
        "the sign-in is not valid (or the server restarted): sign in again"
    )
    bob_login = await web.post("/api/login", {"token": "bob-token-0123456789abc"})
    bob_sign_in = bob_login.headers["set-cookie"].split(";")[0]
    both = WebClient(web.port, [("Cookie", f"{bob_sign_in}; {sign_in}")])
    refused = await both.get("/api/sessions")
    assert refused.status == 401
    assert refused.json()["message"] == (
        "the request carries two different sign-ins (another site on this host may have set one): "
        "clear this site's cookies in the browser, then sign in again"
    )
    # Signing out ends the sign-in on the server, not only in the browser.
    assert (await bob_signed_in(web, bob_sign_in)).status == 200
    await WebClient(web.port, [("Cookie", bob_sign_in), ("Origin", f"http://{LOOPBACK}:{web.port}")]).post(
        "/api/logout", {}
    )
    signed_out = await bob_signed_in(web, bob_sign_in)
    assert signed_out.json()["message"] == "this sign-in was signed out: sign in again"
    # A bearer header works as well as the cookie; "all" sees every session.
    root = WebClient(web.port, [("Authorization", "Bearer root-token-0123456789")])
    assert sorted(s["id"] for s in (await root.get("/api/sessions")).json()["sessions"]) == [
        "alice-lab",
        "bob-lab",
    ]


async def bob_signed_in(web: WebClient, sign_in: str) -> Any:
    return await WebClient(web.port, [("Cookie", sign_in)]).get("/api/sessions")


# ---- pictures -----------------------------------------------------------------------------------


def test_value_views_are_bounded_whatever_the_value() -> None:
    from trio_bridge import Tensor

    embedding = tuple(float(i) for i in range(10_000))
    view = value_view(VariableType.EMBEDDING, embedding)
    assert view["plot"]["kind"] == "bars" and len(view["plot"]["bars"]) == MAX_BARS
    assert view["plot"]["length"] == 10_000
    assert len(view["text"]) <= TEXT_CHARS and view["text"].endswith(", … (10000 values)]")
    import struct

    grid = Tensor((200, 300), "float32", struct.pack("<60000f", *range(60_000)))
    heat = value_view(VariableType.TENSOR, grid)["plot"]
    assert heat["kind"] == "heatmap" and heat["shape"] == [200, 300]
    assert len(heat["cells"]) == MAX_CELLS and len(heat["cells"][0]) == MAX_CELLS
    assert heat["min"] < heat["max"]
    cube = value_view(VariableType.TENSOR, Tensor((2, 2, 2), "int32", struct.pack("<8i", *range(8))))
    assert cube["plot"] == {"kind": "shape", "shape": [2, 2, 2], "dtype": "int32", "min": 0.0, "max": 7.0}
    nan = value_view(VariableType.FLOAT, float("nan"))
    assert nan == {"text": "NaN", "plot": {"kind": "number", "value": None}}
    assert value_view(VariableType.CHOICE, "run")["plot"] == {"kind": "state", "value": "run"}


# ---- TLS, both stores, the command line ---------------------------------------------------------


async def test_over_tls_the_view_uses_the_server_s_certificate_and_a_secure_cookie(
    nursery: trio.Nursery, pki: dict[str, Path], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    server, _ = await web_server(nursery, tls_cert=pki["cert"], tls_key=pki["key"], token_file=tokens)
    assert server.web_port is not None
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.set_alpn_protocols(["http/1.1"])  # (a browser offers h2 too; this client speaks HTTP/1.1)
    web = WebClient(server.web_port, tls=context)
    login = await web.post("/api/login", {"token": "alice-token-0123456789"})
    assert login.status == 200
    assert "Secure" in login.headers["set-cookie"]
    plain = WebClient(server.web_port)
    with pytest.raises((trio.BrokenResourceError, h11.RemoteProtocolError)):
        await plain.get("/api/me")  # plain text at a TLS port: no answer


async def test_the_view_serves_every_store(
    nursery: trio.Nursery, make_store: Callable[..., Awaitable[Store]]
) -> None:
    store = await make_store()
    server, web = await web_server(nursery, store=store, web_writable=True)
    with connect(server) as client:
        await make_session(client, t=("float", 1.0))
        assert [s["id"] for s in (await web.get("/api/sessions")).json()["sessions"]] == ["lab"]
        async with web.feed("lab") as feed:
            await feed.updates_until_synced()
            await set_value(client, "t", 2.0)
            assert (await next_update(feed))["variable"]["version"] == 2
            done = await web.post("/api/sessions/lab/variables/t", {"value": "3", "expected_version": 2})
            assert done.status == 200
            assert (await next_update(feed))["variable"]["value"]["text"] == "3.0"
            stale = await web.post("/api/sessions/lab/variables/t", {"value": "4", "expected_version": 2})
            assert stale.json()["status"] == "ABORTED"


async def test_the_command_line_checks_the_web_flags() -> None:
    serve = [sys.executable, "-m", "trio_bridge", "serve", "--port", "0"]
    alone = await trio.run_process(
        [*serve, "--web-writable"], capture_stdout=True, capture_stderr=True, check=False
    )
    assert alone.returncode == 2
    assert (
        alone.stderr.decode().strip() == "trio-bridge: --web-writable needs --web-port (the web view is off)"
    )
    with trio.socket.socket() as taken:
        await taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = await trio.run_process(
            [*serve, "--web-port", str(port)], capture_stdout=True, capture_stderr=True, check=False
        )
    assert busy.returncode == 1
    assert (
        busy.stderr.decode()
        .strip()
        .endswith(f"trio-bridge: cannot serve the web view on {LOOPBACK}:{port}: Address already in use")
    )

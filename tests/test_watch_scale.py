"""A thousand concurrent watch streams on one server, spread over connections (HTTP/2 allows 100
concurrent streams per connection), all served, and all gone after teardown."""

from __future__ import annotations

import trio
from grpclib.client import Channel

from tests.support import Client, Watcher, eventually, start_watch
from trio_bridge import RunningServer, VariableType
from trio_bridge.proto import unified_bridge as pb

STREAMS = 1000
PER_CONNECTION = 50


async def test_a_thousand_streams_then_zero_observers(server: RunningServer) -> None:
    session = (await server.store.create_session()).session_id
    await server.store.register_variable(session, "t", VariableType.INTEGER, 0)
    channels = [Channel(server.host, server.port) for _ in range(STREAMS // PER_CONNECTION)]
    watchers: list[Watcher] = []
    try:
        async with trio.open_nursery() as nursery:
            for i in range(STREAMS):
                client = Client(channels[i // PER_CONNECTION])
                request = _request(session)
                watchers.append(await start_watch(nursery, client, request))
            for watcher in watchers:
                await watcher.wait_synced()
            assert server.service.open_watches == STREAMS
            assert server.store.cache.observers.observer_count == STREAMS

            await server.store.set_variable(session, "t", 1)  # one write reaches every stream
            for watcher in watchers:
                await watcher.wait_for(lambda w: w.kinds()[-1] == "value_change")
            assert all(w.versions(w.updates[0].variable_id) == [1, 2] for w in watchers)

            nursery.cancel_scope.cancel()
        await eventually(lambda: server.store.cache.observers.observer_count == 0)
        await eventually(lambda: server.service.open_watches == 0)
    finally:
        for channel in channels:
            channel.close()


def _request(session: str) -> pb.WatchVariablesRequest:
    return pb.WatchVariablesRequest(
        session_id=session, variable_identifiers=["t"], include_initial_values=True
    )

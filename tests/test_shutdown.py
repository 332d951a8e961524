"""Graceful shutdown in-process: draining refuses new calls, and stopping closes client connections."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.support import Client, start_server
from trio_bridge import RunningServer, VariableType
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


async def test_shutdown_first_sends_every_change_accepted_before_it(aio_loop: Any) -> None:
    """A watcher that has fallen behind (its HTTP/2 window is full, changes wait in its queue) still
    gets every change accepted before the shutdown, then UNAVAILABLE; meanwhile, health checks say
    NOT_SERVING. (A stock grpcio client: grpclib's
    drops what it has buffered but not yet read when the connection closes.)"""
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def serve_until_cancelled(task_status: trio.TaskStatus[RunningServer]) -> None:
            with server_scope:
                async with trio.open_nursery() as server_nursery:
                    task_status.started(
                        await start_server(server_nursery, shutdown_grace=60, watch_queue_size=4096)
                    )

        server: RunningServer = await nursery.start(serve_until_cancelled)
        session = (await server.store.create_session()).session_id
        await server.store.register_variable(session, "s", VariableType.STRING, "")
        changes = 1500  # of 1 KB each: more than the sender takes in one batch (BATCH_LIMIT)
        synced, go = threading.Event(), threading.Event()

        def watch() -> tuple[list[int], grpc.StatusCode | None]:
            options = [("grpc.http2.lookahead_bytes", 4096), ("grpc.http2.bdp_probe", 0)]
            with grpc.insecure_channel(f"{server.host}:{server.port}", options=options) as channel:
                request = pb.WatchVariablesRequest(session_id=session, variable_identifiers=["s"])
                replies = channel.unary_stream("/unified_bridge.UnifiedBridge/WatchVariables")(bytes(request))
                versions: list[int] = []
                try:
                    for raw in replies:
                        update = pb.VariableUpdate.parse(raw)
                        if update.update_type == "synced":
                            synced.set()
                            go.wait(60)  # stop reading until the shutdown has begun
                        elif update.variable is not None:
                            versions.append(update.variable.version)
                except grpc.RpcError as error:
                    return versions, error.code()
                return versions, None

        async def wait_for(event: threading.Event) -> None:
            while not event.is_set():  # noqa: ASYNC110 (set by a thread)
                await trio.sleep(0.001)

        async with trio.open_nursery() as clients:
            result: list[tuple[list[int], grpc.StatusCode | None]] = []

            async def run_watch() -> None:
                result.append(await trio.to_thread.run_sync(watch))

            clients.start_soon(run_watch)
            await wait_for(synced)
            for index in range(changes):  # accepted: each returns its new version
                await server.store.set_variable(session, "s", f"{index:04d}" + "x" * 1000)
            assert server.store.cache.observers.observer_count == 1
            health = grpc.insecure_channel(f"{server.host}:{server.port}")

            def check_health() -> str:
                reply = health.unary_unary("/grpc.health.v1.Health/Check")(
                    HealthCheckRequest().SerializeToString(), timeout=30
                )
                return HealthCheckResponse.ServingStatus.Name(HealthCheckResponse.FromString(reply).status)

            assert await trio.to_thread.run_sync(check_health) == "SERVING"
            server_scope.cancel()  # the shutdown begins while the changes wait
            while not server.service._draining:  # noqa: ASYNC110 (a flag of the server's)
                await trio.sleep(0.001)
            try:
                assert await trio.to_thread.run_sync(check_health) == "NOT_SERVING"  # still draining
            finally:
                health.close()
                go.set()
    ((versions, status),) = result
    assert versions == list(range(2, changes + 2))
    assert status == grpc.StatusCode.UNAVAILABLE

"""The Prometheus endpoint and grpclib's health service on a running server."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import trio
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.support import Client, connect, start_server
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import BoolValue


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def test_metrics_endpoint_reports_state_and_rpcs(nursery: trio.Nursery, aio_loop: Any) -> None:
    server = await start_server(nursery, metrics_port=0)
    assert server.metrics_port
    with connect(server) as client:
        session = (await client(client.stub.create_session(pb.CreateSessionRequest()))).session
        assert session is not None
        await client(
            client.stub.register_variable(
                pb.RegisterVariableRequest(
                    session_id=session.session_id,
                    name="on",
                    type=pb.VariableType.BOOLEAN,
                    initial_value=PbAny.pack(BoolValue(value=True)),
                )
            )
        )
        for _ in range(2):
            with pytest.raises(GRPCError):
                await client(client.stub.get_session(pb.GetSessionRequest(session_id="missing")))
    text = await trio.to_thread.run_sync(_scrape, server.metrics_port)
    for line in [
        "trio_bridge_sessions 1.0",
        "trio_bridge_variables 1.0",
        "trio_bridge_observers 0.0",
        "trio_bridge_watch_streams_open 0.0",
        "trio_bridge_updates_sent_total 0.0",
        'trio_bridge_rpcs_total{method="CreateSession",status="OK"} 1.0',
        'trio_bridge_rpcs_total{method="RegisterVariable",status="OK"} 1.0',
        'trio_bridge_rpcs_total{method="GetSession",status="NOT_FOUND"} 2.0',
    ]:
        assert line in text.splitlines(), line


async def test_health_service_reports_serving(client: Client) -> None:
    health = HealthStub(client.channel)
    for service in ["", "unified_bridge.UnifiedBridge"]:
        response = await client(health.Check(HealthCheckRequest(service=service)))
        assert response.status == HealthCheckResponse.SERVING, service

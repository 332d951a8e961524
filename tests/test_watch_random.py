"""Randomized: writers and watchers race, watchers cancel and resume at random points. For every
watcher and variable, the versions seen are strictly increasing, skip nothing unless marked ``resync``,
and end at the final written value."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import trio
import trio.testing
from grpclib.client import Channel

from tests.support import Client, compact_etcd, eventually, start_server, start_watch
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import DoubleValue

NAMES = ("a", "b", "c")
WRITERS, WATCHERS, WRITES_PER_WRITER = 3, 4, 60


class Holder:
    """What one watcher's client holds, across all its reconnects."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, str, float]]] = {}  # id → (version, update type, value)

    def take(self, updates: list[pb.VariableUpdate]) -> None:
        for update in updates:
            if update.variable is None or update.update_type in ("synced", "heartbeat"):
                continue
            value = update.variable.value.unpack().value  # type: ignore[union-attr]
            self.seen.setdefault(update.variable_id, []).append(
                (update.variable.version, update.update_type, value)
            )

    def resume_versions(self) -> dict[str, int]:
        return {variable_id: seen[-1][0] for variable_id, seen in self.seen.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_writers_watchers_cancels_and_resumes(
    seed: int, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, aio_loop: Any
) -> None:
    rng = random.Random(seed)
    server = await start_server(nursery, history_size=6)  # small: some resumes must resync
    channels = [Channel(server.host, server.port) for _ in range(2)]
    clients = [Client(channel) for channel in channels]
    session = (await server.store.create_session()).session_id
    for name in NAMES:
        await server.store.register_variable(session, name, pb.VariableType.FLOAT, 0.0)
    holders = [Holder() for _ in range(WATCHERS)]
    writing_done = trio.Event()
    all_written = trio.Event()
    writers_left = [WRITERS]

    async def writer(index: int) -> None:
        client = clients[index % len(clients)]
        for i in range(WRITES_PER_WRITER):
            request = pb.SetVariableRequest(
                session_id=session,
                variable_identifier=rng.choice(NAMES),
                value=PbAny.pack(DoubleValue(value=index * 1000 + i)),
            )
            await client(client.stub.set_variable(request))
            await trio.sleep(rng.choice([0, 0, 0.01, 0.05]))
        writers_left[0] -= 1
        if not writers_left[0]:
            all_written.set()

    async def compactor() -> None:
        # With etcd, its history runs short only where it is compacted (here as often as writes come).
        while not all_written.is_set():
            await compact_etcd(server)
            with trio.move_on_after(0.2):
                await all_written.wait()

    async def watcher(holder: Holder, index: int) -> None:
        client = clients[index % len(clients)]
        while True:
            final = writing_done.is_set()
            request = pb.WatchVariablesRequest(
                session_id=session,
                include_initial_values=True,
                resume_versions=holder.resume_versions(),
                variable_identifiers=[] if index % 2 else list(NAMES),
            )
            stream = await start_watch(nursery, client, request)
            if final:  # read until caught up with the final state, then stop
                targets = {v.id: v.version for v in await server.store.list_variables(session)}
                await stream.wait_for(
                    lambda w, targets=targets: (
                        {**holder.resume_versions(), **_versions(w)} == targets and "synced" in w.kinds()
                    )
                )
            else:
                wanted = rng.randint(1, 12)
                with trio.move_on_after(rng.choice([0.01, 0.1, 1.0])):
                    await stream.wait_for(lambda w, n=wanted: len(w.updates) >= n)
            stream.cancel_scope.cancel()
            await stream.wait_ended()
            holder.take(stream.updates)
            if final:
                return
            await trio.sleep(rng.choice([0, 0.1, 0.5, 2.0]))  # away for a while: maybe past the history

    async with trio.open_nursery() as tasks:
        for index, holder in enumerate(holders):
            tasks.start_soon(watcher, holder, index)
        async with trio.open_nursery() as writers:
            for index in range(WRITERS):
                writers.start_soon(writer, index)
            writers.start_soon(compactor)
        writing_done.set()  # each watcher now resumes one last time, catches up and stops
    for channel in channels:
        channel.close()

    final = {v.id: (v.version, v.value) for v in await server.store.list_variables(session)}
    assert sum(version - 1 for version, _ in final.values()) == WRITERS * WRITES_PER_WRITER
    resyncs = 0
    for holder in holders:
        assert set(holder.seen) == set(final)
        for variable_id, (version, value) in final.items():
            seen = holder.seen[variable_id]
            for (previous, _, _), (current, kind, _) in itertools.pairwise(seen):
                assert current > previous, f"not strictly increasing: {seen}"
                assert current == previous + 1 or kind == "resync", f"unmarked gap: {seen}"
                resyncs += kind == "resync"
            assert seen[-1][0] == version and seen[-1][2] == value
    print(f"seed {seed}: {resyncs} resyncs")
    assert resyncs, "the history never ran short: make it smaller or the run longer"
    await eventually(lambda: server.store.cache.observers.observer_count == 0)


def _versions(watcher: Any) -> dict[str, int]:
    return {u.variable_id: u.variable.version for u in watcher.updates if u.variable is not None}

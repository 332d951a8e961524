"""The watch engine without gRPC, on every store: batching of bursts (contract line 9) and of long
replays, overflow."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_bridge import Store, VariableType, _watch
from trio_bridge._errors import ResourceExhausted
from trio_bridge._limits import Limits
from trio_bridge._watch import BATCH_LIMIT, WatchPlan, WatchStream, plan_watch
from trio_bridge.proto.unified_bridge import VariableUpdate


async def _watch_n(store: Store, session: str, resume_versions: dict[str, int]) -> WatchPlan:
    """A checked plan for a watch of variable ``n`` with its initial value."""
    return await plan_watch(
        store,
        session_id=session,
        identifiers=["n"],
        include_initial_values=True,
        options={},
        resume_versions=resume_versions,
        limits=Limits(),
    )


class _SlowClient:
    """The stream's ``send``: records every batch, and does not take the ``stalls_at``-th (from 1)
    until ``taken`` is set; while it waits, the progress's ``cut`` stops it (as the server's does)."""

    def __init__(self, stalls_at: int) -> None:
        self.stalls_at = stalls_at
        self.batches: list[list[VariableUpdate]] = []
        self.taken = trio.Event()

    async def send(self, updates: list[VariableUpdate], progress: _watch.BatchProgress) -> None:
        self.batches.append(updates)
        if len(self.batches) == self.stalls_at:
            with trio.CancelScope() as progress.waiting:
                if progress.cut_requested:
                    progress.waiting.cancel()
                await self.taken.wait()
            progress.cut_short = not self.taken.is_set()


async def test_a_burst_queued_during_a_slow_send_goes_out_as_one_batch(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store = await make_store()
    session = (await store.create_session()).session_id
    await store.register_variable(session, "n", VariableType.INTEGER, 0)
    plan = await _watch_n(store, session, resume_versions={})
    client = _SlowClient(stalls_at=2)  # slow to take the first change
    batches = client.batches

    async with trio.open_nursery() as nursery:
        nursery.start_soon(WatchStream(store, plan, send=client.send).run)
        await trio.testing.wait_all_tasks_blocked()
        await store.set_variable(session, "n", 1)
        await trio.testing.wait_all_tasks_blocked()
        for value in range(2, 302):
            await store.set_variable(session, "n", value)
        client.taken.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert [len(batch) for batch in batches] == [2, 1, 300]
    assert [u.variable.version for u in batches[2] if u.variable] == list(range(3, 303))


async def test_a_long_replay_is_encoded_and_sent_a_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch, make_store: Callable[..., Awaitable[Store]]
) -> None:
    store = await make_store(history_size=5_000)
    session = (await store.create_session()).session_id
    await store.register_variable(session, "n", VariableType.INTEGER, 0)
    for value in range(1, 1_201):
        await store.set_variable(
            session, "n", value
        )  # versions 2..1201: a client at version 1 missed them all
    plan = await _watch_n(store, session, resume_versions={"n": 1})
    encoded = 0
    real_event_update = _watch.enc.event_update

    def counting_event_update(event: Any) -> VariableUpdate:
        nonlocal encoded
        encoded += 1
        return real_event_update(event)

    monkeypatch.setattr(_watch.enc, "event_update", counting_event_update)
    client = _SlowClient(stalls_at=1)  # has not taken the first batch yet
    batches = client.batches

    async with trio.open_nursery() as nursery:
        nursery.start_soon(WatchStream(store, plan, send=client.send).run)
        await trio.testing.wait_all_tasks_blocked()
        assert encoded == BATCH_LIMIT  # the rest waits, unencoded, until the first batch is out
        client.taken.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert [len(batch) for batch in batches] == [BATCH_LIMIT, BATCH_LIMIT, 1_200 - 2 * BATCH_LIMIT + 1]
    sent = [u for batch in batches for u in batch]
    assert [u.variable.version for u in sent if u.variable] == list(range(2, 1_202))
    assert sent[-1].update_type == "synced"


async def test_an_overflow_while_a_send_waits_ends_the_stream_at_once(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    # Issue #10, observation 9: the stream stayed open, holding its queue, until its client read again.
    store = await make_store()
    session = (await store.create_session()).session_id
    await store.register_variable(session, "n", VariableType.INTEGER, 0)
    plan = await _watch_n(store, session, resume_versions={})
    client = _SlowClient(stalls_at=2)  # takes the initial value and synced, then never reads again
    watch = WatchStream(store, plan, send=client.send, queue_size=8)
    ended: list[BaseException] = []

    async def run() -> None:
        try:
            await watch.run()
        except ResourceExhausted as exc:
            ended.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        await store.set_variable(session, "n", 1)  # v2: its send waits for the client
        await trio.testing.wait_all_tasks_blocked()
        assert len(client.batches) == 2 and store.cache.observers.observer_count == 1
        for value in range(2, 11):  # 9 more: one past the queue of 8
            await store.set_variable(session, "n", value)
        await trio.testing.wait_all_tasks_blocked()
        assert not client.taken.is_set()  # the client never read
        assert ended, "the stream is still open, waiting for its client"
        nursery.cancel_scope.cancel()
    (error,) = ended
    assert isinstance(error, ResourceExhausted) and not error.stream_cut
    n = (await store.get_variable(session, "n")).id
    assert json.loads(error.trailers[_watch.RESUME_TRAILER]) == {n: 1}  # v2 never went out
    assert store.cache.observers.observer_count == 0

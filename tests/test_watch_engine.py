"""The watch engine without gRPC, on every store: batching of bursts (contract line 9) and of long
replays, overflow."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import ETCD_AUTOJUMP_THRESHOLD
from tests.support import eventually
from trio_bridge import MemoryStore, Store, VariableType, _watch
from trio_bridge._errors import BridgeError, ResourceExhausted, Unavailable
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


async def _run_to_its_end(watch: WatchStream, ended: list[BridgeError]) -> None:
    """Run ``watch``; the BridgeError that ends it (the status its client would get) goes in ``ended``."""
    try:
        await watch.run()
    except BridgeError as exc:
        ended.append(exc)


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


async def _a_watch_of_a_new_n(make_store: Callable[..., Awaitable[Store]]) -> tuple[Store, str, WatchPlan]:
    """A new store and session with an integer ``n`` at 0, and a checked plan to watch it."""
    store = await make_store()
    session = (await store.create_session()).session_id
    await store.register_variable(session, "n", VariableType.INTEGER, 0)
    return store, session, await _watch_n(store, session, resume_versions={})


async def test_a_burst_queued_during_a_slow_send_goes_out_as_one_batch(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store, session, plan = await _a_watch_of_a_new_n(make_store)
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
    store, session, plan = await _a_watch_of_a_new_n(make_store)
    client = _SlowClient(stalls_at=2)  # takes the initial value and synced, then never reads again
    watch = WatchStream(store, plan, send=client.send, queue_size=8)
    ended: list[BridgeError] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_to_its_end, watch, ended)
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


class _Client:
    """A stream's client: ``send`` (a batch, the sender's way) and ``send_now`` (one update, offered
    directly; refused when ``refuse()`` says so) record what reached it, in order. With ``stall``,
    ``send`` waits for ``taken`` on every batch until it is set (and a cut stops it, as the server's
    does)."""

    def __init__(self, refuse: Callable[[], bool] = lambda: False) -> None:
        self.received: list[VariableUpdate] = []
        self.direct = 0
        self.refuse = refuse
        self.stall = False
        self.taken = trio.Event()

    async def send(self, updates: list[VariableUpdate], progress: _watch.BatchProgress) -> None:
        if self.stall:
            taken = self.taken
            with trio.CancelScope() as progress.waiting:
                if progress.cut_requested:
                    progress.waiting.cancel()
                await taken.wait()
            if not taken.is_set():
                progress.cut_short = True
                return
        self.received.extend(updates)

    def send_now(self, update: VariableUpdate) -> bool:
        if self.refuse():
            return False
        self.received.append(update)
        self.direct += 1
        return True

    def versions(self) -> list[int]:
        return [u.variable.version for u in self.received if u.update_type == "value_change"]


class _StepCounter(trio.abc.Instrument):
    """Counts the steps Trio runs of the tasks in ``tasks``."""

    def __init__(self, tasks: set[trio.lowlevel.Task]) -> None:
        self.tasks = tasks
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.tasks:
            self.steps += 1


async def test_a_change_to_idle_streams_reaches_them_without_waking_them(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    # Issue #13: a write fanned out to 1,000 watchers cost 40 µs of server CPU per delivery (etcd: 9),
    # a Trio task woken per stream. An idle stream's update is now handed over by the publisher.
    store, session, plan = await _a_watch_of_a_new_n(make_store)
    clients = [_Client() for _ in range(50)]
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(WatchStream(store, plan, send=client.send, send_now=client.send_now).run)
        await trio.testing.wait_all_tasks_blocked()
        counter = _StepCounter(set(nursery.child_tasks))
        trio.lowlevel.add_instrument(counter)
        try:
            for value in (1, 2, 3):
                await store.set_variable(session, "n", value)
                await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 0, "a stream's task was woken for a change it could be handed"
        assert all(client.versions() == [2, 3, 4] and client.direct == 3 for client in clients)
        nursery.cancel_scope.cancel()


class _LaterDispatch:
    """A ``dispatch_later`` schedule that runs its callbacks only when told (``run``)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def run(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


async def _cached_version(store: Store, session: str, version: int) -> None:
    """Until the store's cache (which watches are fed from) holds ``n`` at ``version``: an etcd store
    publishes a change once etcd's watch brings it back."""
    await eventually(lambda: store.cache.get_variables(session, ["n"])[0].version >= version)


@pytest.fixture
def engine_clock(request: pytest.FixtureRequest) -> trio.testing.MockClock:
    """A clock that jumps to the next timer once every task waits; with etcd, only after a while,
    and meanwhile at the speed of real time (etcd's deadlines and leases run on it)."""
    if request.node.callspec.params.get("make_store") == "etcd":
        return trio.testing.MockClock(rate=1.0, autojump_threshold=ETCD_AUTOJUMP_THRESHOLD)
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dispatch", ["at_once", "later"])
async def test_offers_keep_every_change_in_order_through_refusals_stalls_and_heartbeats(
    make_store: Callable[..., Awaitable[Store]],
    engine_clock: trio.testing.MockClock,
    seed: int,
    dispatch: str,
) -> None:
    # Changes go to a stream by two ways now (offered directly, or queued for its sender): whichever
    # way each goes, the client gets every version once, in order, and a resume starts after the last.
    import random

    rng = random.Random(seed)
    store = await make_store()
    writes = 300 if isinstance(store, MemoryStore) else 60  # an etcd write takes a real round trip
    session = (await store.create_session()).session_id
    await store.register_variable(session, "n", VariableType.INTEGER, 0)
    plan = await plan_watch(
        store,
        session_id=session,
        identifiers=["n"],
        include_initial_values=True,
        options={"heartbeat_interval_ms": "1000"},
        resume_versions={},
        limits=Limits(),
    )
    later = _LaterDispatch()
    if dispatch == "later":
        store.cache.observers.dispatch_later(later)
    client = _Client(refuse=lambda: rng.random() < 0.3)
    watch = WatchStream(store, plan, send=client.send, send_now=client.send_now)
    ended: list[BridgeError] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_to_its_end, watch, ended)
        await trio.testing.wait_all_tasks_blocked()
        for value in range(1, writes + 1):
            await store.set_variable(session, "n", value)
            roll = rng.random()
            if roll < 0.3:
                later.run()
            if roll < 0.1 and not client.stall:  # a slow client, for a while
                client.stall = True
                client.taken = trio.Event()
            elif 0.1 <= roll < 0.2 and client.stall:
                client.stall = False
                client.taken.set()
            if rng.random() < 0.2:
                await trio.testing.wait_all_tasks_blocked()
            if rng.random() < 0.05:
                await trio.sleep(1.5)  # a heartbeat comes due
        client.stall = False
        client.taken.set()
        await _cached_version(store, session, writes + 1)
        later.run()
        await trio.testing.wait_all_tasks_blocked()
        watch.shut_down()
    store.cache.observers.dispatch_later(None)
    assert client.versions() == list(range(2, writes + 2)), ended
    assert 0 < client.direct < writes
    (error,) = ended
    assert isinstance(error, Unavailable)
    n = (await store.get_variable(session, "n")).id
    assert json.loads(error.trailers[_watch.RESUME_TRAILER]) == {n: writes + 1}
    assert store.cache.observers.observer_count == 0


async def test_a_stream_ending_sends_the_changes_still_waiting_to_be_offered(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    # Changes waiting for the dispatch are the stream's: a shutdown (or any reading) takes them first.
    store, session, plan = await _a_watch_of_a_new_n(make_store)
    later = _LaterDispatch()
    store.cache.observers.dispatch_later(later)
    client = _Client()
    watch = WatchStream(store, plan, send=client.send, send_now=client.send_now)
    ended: list[BridgeError] = []

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_to_its_end, watch, ended)
            await trio.testing.wait_all_tasks_blocked()
            await store.set_variable(session, "n", 1)
            await store.set_variable(session, "n", 2)
            await _cached_version(store, session, 3)
            await trio.testing.wait_all_tasks_blocked()
            assert client.versions() == [] and len(later.callbacks) == 1  # not offered yet
            watch.shut_down()
    finally:
        store.cache.observers.dispatch_later(None)
    assert client.versions() == [2, 3] and client.direct == 0
    (error,) = ended
    assert isinstance(error, Unavailable)
    later.run()  # the dispatch, late: nothing is offered twice
    assert client.versions() == [2, 3]

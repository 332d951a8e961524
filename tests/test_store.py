"""The stores and ObserverManager on their own: versions, compare-and-set, atomic batches, TTL, events,
memory budgets. The tests that take ``store`` or ``make_store`` are the conformance suite: they run
against every store (in memory, and on a real etcd); the TTL tests drive MemoryStore's own clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from trio_bridge import (
    AlreadyExists,
    Constraints,
    EventKind,
    InvalidArgument,
    MemoryStore,
    NotFound,
    ObserverManager,
    ResourceExhausted,
    Store,
    VariableEvent,
    VariableType,
    VariableWrite,
    VersionConflict,
)
from trio_bridge.storage import session_key, variable_key


@pytest.fixture
async def store(make_store: Callable[..., Awaitable[Store]]) -> Store:
    return await make_store()


async def _session_with_counter(store: Store) -> str:
    session = (await store.create_session("s1")).session_id
    await store.register_variable(
        session, "counter", VariableType.INTEGER, 0, constraints=Constraints(minimum=0)
    )
    return session


async def test_version_starts_at_one_and_rises_by_one_per_change(store: Store) -> None:
    session = await _session_with_counter(store)
    assert (await store.get_variable(session, "counter")).version == 1
    for expected_version in range(2, 7):
        snapshot = await store.set_variable(session, "counter", expected_version * 10, source="test")
        assert snapshot.version == expected_version
        assert snapshot.last_update_source == "test"
    by_id = await store.get_variable(session, snapshot.id)
    assert by_id == await store.get_variable(session, "counter")
    assert by_id.value == 60


async def test_refused_value_leaves_value_and_version_unchanged(store: Store) -> None:
    session = await _session_with_counter(store)
    before = await store.get_variable(session, "counter")
    with pytest.raises(InvalidArgument, match=r"variable 'counter' .*below minimum 0"):
        await store.set_variable(session, "counter", -1)
    assert await store.get_variable(session, "counter") == before


async def test_compare_and_set(store: Store) -> None:
    session = await _session_with_counter(store)
    await store.set_variable(session, "counter", 1, expected_version=1)
    with pytest.raises(VersionConflict, match="expected version 1, but the current version is 2") as caught:
        await store.set_variable(session, "counter", 99, expected_version=1)
    assert caught.value.current == 2
    current = await store.get_variable(session, "counter")
    assert (current.value, current.version) == (1, 2)


async def test_read_modify_write_cycles_lose_no_update(store: Store) -> None:
    """Two clients interleave read-modify-write; with CAS every increment lands exactly once."""
    session = await _session_with_counter(store)
    applied = 0
    for _ in range(50):
        a = await store.get_variable(session, "counter")
        b = await store.get_variable(session, "counter")
        await store.set_variable(session, "counter", a.value + 1, expected_version=a.version)
        applied += 1
        with pytest.raises(VersionConflict):
            await store.set_variable(session, "counter", b.value + 1, expected_version=b.version)
        fresh = await store.get_variable(session, "counter")
        await store.set_variable(session, "counter", fresh.value + 1, expected_version=fresh.version)
        applied += 1
    assert (await store.get_variable(session, "counter")).value == applied


async def test_batch_is_all_or_nothing(store: Store) -> None:
    session = await _session_with_counter(store)
    await store.register_variable(
        session, "label", VariableType.STRING, "a", constraints=Constraints(max_length=3)
    )
    before = await store.list_variables(session)
    for bad_batch, error in [
        ([VariableWrite("counter", 5), VariableWrite("label", "toolong")], InvalidArgument),
        ([VariableWrite("counter", 5), VariableWrite("missing", 1)], NotFound),
        ([VariableWrite("counter", 5), VariableWrite("label", "b", expected_version=7)], VersionConflict),
        ([VariableWrite("counter", 5), VariableWrite("counter", 6)], InvalidArgument),
    ]:
        with pytest.raises(error):
            await store.set_variables(session, bad_batch)
        assert await store.list_variables(session) == before
    results = await store.set_variables(session, [VariableWrite("counter", 5), VariableWrite("label", "b")])
    assert [(r.name, r.value, r.version) for r in results] == [("counter", 5, 2), ("label", "b", 2)]


async def test_unknown_names_are_all_named(store: Store) -> None:
    session = await _session_with_counter(store)
    with pytest.raises(NotFound, match="has no variables 'a', 'b'"):
        await store.get_variables(session, ["counter", "a", "b"])
    with pytest.raises(NotFound, match="session 'nope' not found"):
        await store.get_session("nope")


async def test_names_and_ids_are_unique(store: Store) -> None:
    session = await _session_with_counter(store)
    with pytest.raises(AlreadyExists, match="already has a variable named 'counter'"):
        await store.register_variable(session, "counter", VariableType.INTEGER, 1)
    with pytest.raises(AlreadyExists, match="session 's1' already exists"):
        await store.create_session("s1")
    with pytest.raises(InvalidArgument, match="variable name 'bad name' must match"):
        await store.register_variable(session, "bad name", VariableType.INTEGER, 1)
    assert (await store.create_session()).session_id != (await store.create_session()).session_id


async def test_delete_and_cleanup_keep_counts(store: Store) -> None:
    session = await _session_with_counter(store)
    await store.register_variable(session, "x", VariableType.BOOLEAN, True)
    assert (store.cache.session_count, store.cache.variable_count) == (1, 2)
    await store.delete_variable(session, "x")
    with pytest.raises(NotFound):
        await store.get_variable(session, "x")
    assert store.cache.variable_count == 1
    assert await store.cleanup_session(session) == 1
    assert (store.cache.session_count, store.cache.variable_count) == (0, 0)
    with pytest.raises(NotFound):
        await store.cleanup_session(session)


async def test_ttl_expiry_is_driven_by_the_clock(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(default_ttl=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with store.cache.observers.subscribe([session_key("idle")]) as watcher:
            await store.create_session("idle")
            await store.create_session("busy")
            await store.create_session("short", ttl=5.0)
            await trio.sleep(4.0)
            assert {s.session_id for s in await store.list_sessions()} == {"idle", "busy", "short"}
            await trio.sleep(1.5)  # "short" has been idle 5.5 s
            assert {s.session_id for s in await store.list_sessions()} == {"idle", "busy"}
            for _ in range(5):  # every access restarts the TTL
                await trio.sleep(30.0)
                await store.get_session("busy")
            assert store.cache.session_count == 1
            with pytest.raises(NotFound):
                await store.get_session("idle")
            event = watcher.receive.receive_nowait()
            assert (event.kind, event.session_id, event.reason) == (
                EventKind.SESSION_ENDED,
                "idle",
                "expired",
            )
        nursery.cancel_scope.cancel()


async def test_expired_session_is_gone_before_the_sweep_runs(mock_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(default_ttl=10.0)  # no run_expiry task at all
    await store.create_session("s")
    mock_clock.jump(10.0)
    with pytest.raises(NotFound, match="may have expired"):
        await store.get_session("s")
    assert store.cache.session_count == 0
    await store.create_session("s")  # the id is free again


async def test_changes_are_published_in_version_order_to_every_observer(store: Store) -> None:
    session = await _session_with_counter(store)
    counter = await store.get_variable(session, "counter")
    with (
        store.cache.observers.subscribe([variable_key(counter.id)]) as by_variable,
        store.cache.observers.subscribe([session_key(session), variable_key(counter.id)]) as by_both,
    ):
        assert store.cache.observers.observer_count == 2
        for value in range(1, 6):
            await store.set_variable(session, "counter", value, metadata={"why": str(value)})
        await store.delete_variable(session, "counter")
        for watcher in (by_variable, by_both):
            events: list[VariableEvent] = []
            while True:
                try:
                    events.append(watcher.receive.receive_nowait())
                except trio.WouldBlock:
                    break
            changes = [e for e in events if e.kind is EventKind.CHANGED]
            assert [e.variable.version for e in changes if e.variable] == [2, 3, 4, 5, 6]
            assert [e.old_value for e in changes] == [0, 1, 2, 3, 4]
            assert changes[-1].metadata == {"why": "5"}
            assert events[-1].kind is EventKind.DELETED
    assert store.cache.observers.observer_count == 0


async def test_a_full_observer_never_blocks_the_writer() -> None:
    observers: ObserverManager[VariableEvent] = ObserverManager(default_buffer_size=4)
    store = MemoryStore(observers=observers)
    session = await _session_with_counter(store)
    counter_id = (await store.get_variable(session, "counter")).id
    with observers.subscribe([variable_key(counter_id)]) as stalled:
        for value in range(1, 101):
            await store.set_variable(session, "counter", value)
        assert stalled.overflowed
        assert observers.observer_count == 0
        received = [event async for event in stalled.receive]  # ends: the channel was closed
        assert [e.variable.version for e in received if e.variable] == [2, 3, 4, 5]
    assert (await store.get_variable(session, "counter")).version == 101


async def test_leaving_the_block_by_cancellation_unregisters() -> None:
    observers: ObserverManager[int] = ObserverManager()
    with trio.move_on_after(0) as scope:
        with observers.subscribe(["k"]) as subscription:
            assert observers.subscribers_of("k") == 1
            await subscription.receive.receive()
    assert scope.cancelled_caught
    assert observers.observer_count == 0
    assert observers.subscribers_of("k") == 0
    observers.publish(["k"], 1)  # nobody left to deliver to; nothing raises


async def test_a_coalescing_observer_holds_at_most_one_event_per_key_beyond_its_buffer() -> None:
    from trio_bridge._observers import Coalescer

    observers: ObserverManager[tuple[str, int]] = ObserverManager()
    merged = Coalescer[tuple[str, int]](key=lambda e: e[0], merge=lambda older, newer: newer)
    with observers.subscribe(["k"], buffer_size=4, coalescer=merged) as slow:
        for i in range(1000):
            observers.publish(["k"], ("abc"[i % 3], i))  # the writer never waits
        assert not slow.overflowed
        assert slow.pending == 4 + 3  # the buffer, plus the newest event of each of 3 keys
        taken = slow.take_nowait(100)
    assert taken == [("a", 0), ("b", 1), ("c", 2), ("a", 3), ("b", 997), ("c", 998), ("a", 999)]


async def test_interrupt_wakes_a_waiting_reader_with_an_empty_batch_and_queues_nothing() -> None:
    observers: ObserverManager[int] = ObserverManager(default_buffer_size=2)
    with observers.subscribe(["k"]) as subscription:
        batches: list[list[int]] = []
        async with trio.open_nursery() as nursery:

            async def read_twice() -> None:
                batches.append(await subscription.receive_batch(10))
                batches.append(await subscription.receive_batch(10))

            nursery.start_soon(read_twice)
            await trio.testing.wait_all_tasks_blocked()
            subscription.interrupt()
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[]]
            assert subscription.pending == 0
            observers.publish(["k"], 1)  # handed to the waiting reader
            observers.publish(["k"], 2)  # queued
        assert batches == [[], [1, 2]]
        assert not subscription.overflowed


async def test_events_offered_later_wait_in_order_and_count_against_the_subscriptions_bounds() -> None:
    observers: ObserverManager[int] = ObserverManager(default_buffer_size=2)
    scheduled: list[Callable[[], None]] = []
    observers.dispatch_later(scheduled.append)
    offered: list[int] = []

    def deliver_now(event: int) -> bool:
        offered.append(event)
        return event % 2 == 0  # takes even events, declines odd ones

    with observers.subscribe(["k"], deliver_now=deliver_now, buffer_size=8) as subscription:
        batches: list[list[int]] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                batches.append(await subscription.receive_batch(10))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            observers.publish(["k"], 0)
            observers.publish(["k"], 2)
            assert offered == [] and subscription.pending == 2 and len(scheduled) == 1
            scheduled.pop()()  # the dispatch: both taken at once, the reader waits on
            assert offered == [0, 2] and subscription.pending == 0
            observers.publish(["k"], 4)
            observers.publish(["k"], 5)
            observers.publish(["k"], 6)
            scheduled.pop()()  # 4 taken; 5 declined, so queued (handed to the reader); 6 queued behind
            assert offered == [0, 2, 4, 5]
        assert batches == [[5, 6]]
        # While the reader does not wait, events are queued as they come, never offered.
        observers.publish(["k"], 8)
        assert offered == [0, 2, 4, 5] and not scheduled and subscription.pending == 1
        assert await subscription.receive_batch(10) == [8]

    with observers.subscribe(["k"], deliver_now=lambda event: False) as subscription:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscription.receive_batch, 10)
            await trio.testing.wait_all_tasks_blocked()
            # No more than a channel's worth waits for the dispatch: the third is queued with them
            # (the first handed to the waiting reader, two fill the channel), the fourth overflows,
            # as without the dispatch.
            for event in range(3):
                observers.publish(["k"], event)
            assert not subscription.overflowed and subscription.pending == 2
            observers.publish(["k"], 3)
            assert subscription.overflowed
        scheduled.pop()()  # nothing left to offer
    observers.dispatch_later(None)


async def test_interrupt_without_a_waiting_reader_does_nothing() -> None:
    observers: ObserverManager[int] = ObserverManager(default_buffer_size=1)
    with observers.subscribe(["k"]) as subscription:
        subscription.interrupt()
        assert subscription.pending == 0
        observers.publish(["k"], 7)
        assert not subscription.overflowed  # the one slot was still free
        assert await subscription.receive_batch(10) == [7]
    subscription.interrupt()  # closed: still nothing, and no error


async def test_a_reader_that_never_runs_out_of_events_still_lets_other_tasks_run() -> None:
    observers: ObserverManager[int] = ObserverManager()
    rounds_of_others = 0

    async def other_task() -> None:
        nonlocal rounds_of_others
        while True:
            rounds_of_others += 1
            await trio.lowlevel.checkpoint()

    with observers.subscribe(["k"]) as subscription:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            for i in range(3):
                observers.publish(["k"], i)  # always something queued: the reader never waits
                assert await subscription.receive_batch(10) == [i]
            assert rounds_of_others >= 1
            nursery.cancel_scope.cancel()


async def test_a_reader_cancelled_with_events_queued_loses_none() -> None:
    observers: ObserverManager[int] = ObserverManager()
    with observers.subscribe(["k"]) as subscription:
        observers.publish(["k"], 1)
        with trio.CancelScope() as scope:
            scope.cancel()
            taken = await subscription.receive_batch(10)  # taken, so not cancelled
        assert taken == [1]
        assert not scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await subscription.receive_batch(10)  # nothing queued: the wait is cancelled
        assert scope.cancelled_caught


# ---- memory budgets (issue #10, observation 3: 1,200 variables x 1 MB in one session held 1.2 GB) ----

MB = 2**20


async def test_a_session_holds_at_most_max_session_bytes_and_a_refusal_changes_nothing(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store = await make_store(max_session_bytes=5 * MB, max_history_bytes=MB)
    session = (await store.create_session()).session_id
    registered = 0
    with pytest.raises(ResourceExhausted) as caught:  # noqa: PT012 (the loop is the scenario)
        for registered in range(1_200):
            await store.register_variable(session, f"v{registered}", VariableType.STRING, "x" * MB)
    assert registered == 4
    assert caught.value.limit == "max_session_bytes"
    assert "max_session_bytes=5242880" in str(caught.value)
    held = await store.list_variables(session)
    assert len(held) == 4 and store.cache.stored_bytes <= 5 * MB
    before = store.cache.stored_bytes
    with pytest.raises(ResourceExhausted):
        await store.set_variable(session, "v0", "y" * 2 * MB)  # bigger than the room left
    assert (await store.get_variable(session, "v0")).version == 1 and store.cache.stored_bytes == before
    await store.delete_variable(session, "v3")
    await store.register_variable(session, "again", VariableType.STRING, "x" * MB)  # room again


async def test_the_server_holds_at_most_max_stored_bytes_across_sessions(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store = await make_store(max_session_bytes=4 * MB, max_stored_bytes=6 * MB, max_history_bytes=MB)
    first, second = (await store.create_session()).session_id, (await store.create_session()).session_id
    for i in range(3):
        await store.register_variable(first, f"v{i}", VariableType.STRING, "x" * MB)
    await store.register_variable(second, "a", VariableType.STRING, "x" * MB)
    await store.register_variable(second, "b", VariableType.STRING, "x" * MB)
    with pytest.raises(ResourceExhausted) as caught:
        await store.register_variable(second, "c", VariableType.STRING, "x" * MB)
    assert caught.value.limit == "max_stored_bytes" and "the server would hold" in str(caught.value)
    await store.cleanup_session(first)
    await store.register_variable(second, "c", VariableType.STRING, "x" * MB)


async def test_the_history_is_bounded_in_bytes_and_gives_way_to_new_values(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store = await make_store(max_session_bytes=8 * MB, max_history_bytes=3 * MB, history_size=1000)
    session = (await store.create_session()).session_id
    variable = (await store.register_variable(session, "v", VariableType.STRING, "")).id
    for i in range(20):
        await store.set_variable(session, "v", str(i) + "x" * MB)  # 20 MB written, one value at a time
    assert store.cache.changes_since(session, variable, 19) is not None  # the last two (v20, v21) are kept
    assert store.cache.changes_since(session, variable, 10) is None  # older ones were forgotten: a resync
    assert store.cache.stored_bytes <= 8 * MB
    # Values fill the session; what the history held gives way to them.
    for i in range(5):
        await store.register_variable(session, f"w{i}", VariableType.STRING, "x" * MB)
    assert store.cache.stored_bytes <= 8 * MB


async def test_stored_bytes_return_to_zero_when_everything_is_gone(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store = await make_store()
    for round_ in range(3):
        session = (await store.create_session()).session_id
        await store.register_variable(
            session, "s", VariableType.STRING, "x" * 1000, metadata={"k": "v"}, source="me"
        )
        await store.register_variable(session, "e", VariableType.EMBEDDING, (1.0, 2.0))
        await store.register_variable(
            session, "c", VariableType.CHOICE, "a", constraints=Constraints(allowed_values=("a", "b"))
        )
        for i in range(50):
            await store.set_variables(
                session,
                [VariableWrite("s", f"{i}" * round_), VariableWrite("c", "b" if i % 2 else "a")],
                source="w" * i,
                metadata={"i": str(i)},
            )
        await store.delete_variable(session, "e")
        assert store.cache.stored_bytes > 0
        await store.cleanup_session(session)
    assert store.cache.stored_bytes == 0


async def test_a_subscription_is_full_by_bytes_as_by_count_and_batches_are_capped_in_bytes() -> None:
    manager: ObserverManager[tuple[str, int]] = ObserverManager(size_of=lambda event: event[1])
    overflowing = manager.subscribe(["k"], buffer_size=100, max_bytes=1000)
    with overflowing:
        for i in range(3):
            manager.publish(["k"], (f"e{i}", 400))  # the third would make 1200 bytes
        assert overflowing.overflowed and overflowing.pending == 2
    lone = manager.subscribe(["big"], buffer_size=100, max_bytes=1000)
    with lone:
        manager.publish(["big"], ("huge", 5000))  # alone in the queue, it always fits
        assert not lone.overflowed and lone.queued_bytes == 5000
        assert [e for e, _ in lone.take_nowait(10, max_bytes=100)] == ["huge"]
        assert lone.queued_bytes == 0
    batched = manager.subscribe(["b"], buffer_size=100, max_bytes=10_000)
    with batched:
        for i in range(10):
            manager.publish(["b"], (f"e{i}", 300))
        assert [e for e, _ in batched.take_nowait(100, max_bytes=1000)] == ["e0", "e1", "e2", "e3"]
        assert [e for e, _ in await batched.receive_batch(100, max_bytes=600)] == ["e4", "e5"]
        assert batched.queued_bytes == 4 * 300


async def test_changes_after_a_revision(make_store: Callable[..., Awaitable[Store]]) -> None:
    store = await make_store(history_size=2)
    session = (await store.create_session()).session_id
    x = await store.register_variable(session, "x", VariableType.INTEGER, 0)
    held = (await store.set_variable(session, "x", 1)).revision  # the client holds x at version 2
    for value in (2, 3):
        await store.set_variable(session, "x", value)
    missed = await store.changes_after_revision(session, x.id, held, up_to=4)
    assert missed is not None and [(e.kind, e.variable.version) for e in missed if e.variable] == [
        (EventKind.CHANGED, 3),
        (EventKind.CHANGED, 4),
    ]
    assert [e.revision for e in missed] == sorted({e.revision for e in missed}) and missed[0].revision > held
    assert await store.changes_after_revision(session, x.id, missed[-1].revision, up_to=4) == []
    y = await store.register_variable(session, "y", VariableType.INTEGER, 7)  # registered after `held`
    (registered,) = await store.changes_after_revision(session, y.id, held, up_to=1) or [None]
    assert registered is not None and registered.kind is EventKind.REGISTERED
    assert registered.variable is not None and (registered.variable.id, registered.variable.value) == (
        y.id,
        7,
    )
    for value in (4, 5, 6):  # the history (2 changes) no longer reaches back to `held` ...
        await store.set_variable(session, "x", value)
    feed = getattr(store, "feed", None)
    if feed is not None:  # ... nor does etcd's, once compacted
        await store.client.compact(feed.applied)  # type: ignore[attr-defined]
    assert await store.changes_after_revision(session, x.id, held, up_to=7) is None


async def test_a_replayed_event_is_the_one_observers_were_sent(
    make_store: Callable[..., Awaitable[Store]],
) -> None:
    store = await make_store()
    session = (await store.create_session()).session_id
    x = await store.register_variable(session, "x", VariableType.INTEGER, 0)
    with store.cache.observers.subscribe([session_key(session)]) as observed:
        y = await store.register_variable(
            session, "y", VariableType.INTEGER, 7, metadata={"unit": "m"}, source="registrar"
        )
        await store.set_variables(session, [VariableWrite("x", 1)], source="writer", metadata={"why": "t"})
        registered, changed = observed.take_nowait(10)
    assert (registered.kind, registered.source) == (EventKind.REGISTERED, "registrar")
    assert registered.timestamp > 0 and registered.variable is not None
    assert registered.variable.created_at == registered.timestamp
    assert (changed.kind, changed.old_value, changed.source, dict(changed.metadata)) == (
        EventKind.CHANGED,
        0,
        "writer",
        {"why": "t"},
    )
    assert await store.changes_after_revision(session, y.id, x.revision, up_to=1) == [registered]
    assert await store.changes_after_revision(session, x.id, x.revision, up_to=2) == [changed]
    assert await store.changes_since(session, x.id, 1, up_to=2) == [changed]


async def test_the_variables_deleted_after_a_revision(make_store: Callable[..., Awaitable[Store]]) -> None:
    store = await make_store(history_size=2)
    session = (await store.create_session()).session_id
    await store.register_variable(session, "x", VariableType.INTEGER, 0)
    y = await store.register_variable(session, "y", VariableType.INTEGER, 0)
    held = y.revision  # the client holds x and y
    await store.delete_variable(session, "y")
    await store.register_variable(session, "z", VariableType.INTEGER, 0)  # registered after `held` ...
    await store.delete_variable(session, "z")  # ... and gone: the client never held it
    deleted = await store.deleted_after_revision(session, held)
    assert deleted is not None and [(d.id, d.name) for d in deleted] == [(y.id, "y")]
    assert await store.deleted_after_revision(session, store.cache.revision) == []
    for value in (1, 2, 3):  # the history (2 changes) no longer holds the deletions ...
        await store.set_variable(session, "x", value)
    feed = getattr(store, "feed", None)
    if feed is not None:  # ... etcd's does, until compacted
        deleted = await store.deleted_after_revision(session, held)
        assert deleted is not None and [(d.id, d.name) for d in deleted] == [(y.id, "y")]
        await store.client.compact(feed.applied)  # type: ignore[attr-defined]
    assert await store.deleted_after_revision(session, held) is None
    assert await store.deleted_after_revision(session, store.cache.revision) == []


async def test_a_server_that_loaded_the_state_later_replays_from_an_earlier_revision(
    make_store: Callable[..., Awaitable[Store]], nursery: trio.Nursery
) -> None:
    # A server that loaded the state after `held` (it started, or joined, later) took every variable
    # as registered and changed at its load: x came back as a registration the client already held,
    # and y waited for etcd's request timeout (5 s) before it was resynced.
    store = await make_store()
    if getattr(store, "feed", None) is None:
        pytest.skip("the in-memory store never loads its state")
    from trio_bridge.storage.etcd.store import EtcdStore

    session = (await store.create_session()).session_id
    x = await store.register_variable(session, "x", VariableType.INTEGER, 0)
    y = await store.register_variable(session, "y", VariableType.INTEGER, 0)
    held = (await store.set_variable(session, "y", 1)).revision
    z = await store.register_variable(session, "z", VariableType.INTEGER, 0)  # after `held`
    later = EtcdStore(store.settings)  # type: ignore[attr-defined]
    await nursery.start(later.run)  # loads the state as of now
    assert await later.changes_after_revision(session, x.id, held, up_to=1) == []
    assert await later.changes_after_revision(session, y.id, held, up_to=2) == []
    (registered,) = await later.changes_after_revision(session, z.id, held, up_to=1) or [None]
    assert registered is not None and registered.kind is EventKind.REGISTERED
    await store.set_variable(session, "y", 2)
    await later.feed.reached(store.feed.applied)  # type: ignore[attr-defined]
    missed = await later.changes_after_revision(session, y.id, held, up_to=3)
    assert missed is not None and [e.variable.version for e in missed if e.variable] == [3]


async def test_after_a_reload_the_server_does_not_answer_for_deletions_it_did_not_see(
    make_store: Callable[..., Awaitable[Store]], nursery: trio.Nursery
) -> None:
    store = await make_store()
    feed = getattr(store, "feed", None)
    if feed is None:
        pytest.skip("the in-memory store sees every change")
    from trio_bridge.storage.etcd.store import EtcdStore

    other = EtcdStore(store.settings)  # type: ignore[attr-defined]  # another server, same state
    await nursery.start(other.run)
    session = (await store.create_session()).session_id
    await store.register_variable(session, "x", VariableType.INTEGER, 0)
    await other.feed.reached(feed.applied)
    with feed.paused():  # `store` sees nothing of what follows until etcd has compacted it
        q = await other.register_variable(session, "q", VariableType.INTEGER, 0)
        await other.delete_variable(session, "q")
        await other.client.compact(other.feed.applied)
    await feed.reached(other.feed.applied)  # it loaded the state again
    # A client served by `other` held q at q.revision: `store` never saw q, and etcd forgot it.
    assert await store.deleted_after_revision(session, q.revision) is None
    assert await store.deleted_after_revision(session, store.cache.revision) == []


def test_a_snapshots_next_version_is_what_replace_makes() -> None:
    """``changed_to`` and ``at_revision`` build positionally what ``dataclasses.replace`` made (twice
    as fast, on every write's path): field for field the same."""
    import dataclasses

    from trio_bridge._types import Constraints, VariableType
    from trio_bridge.storage.records import VariableSnapshot

    snapshot = VariableSnapshot(
        "var_1",
        "s",
        "t",
        VariableType.FLOAT,
        1.5,
        Constraints(maximum=9.0),
        {"k": "v"},
        3,
        10.0,
        20.0,
        "a",
        7,
    )
    assert snapshot.changed_to(2.5, at=30.0, source="b") == dataclasses.replace(
        snapshot, value=2.5, version=4, last_updated_at=30.0, last_update_source="b", revision=0
    )
    assert snapshot.at_revision(9) == dataclasses.replace(snapshot, revision=9)
    assert [f.name for f in dataclasses.fields(VariableSnapshot)][-1] == "revision"  # positional order

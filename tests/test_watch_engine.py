"""The watch engine without gRPC: batching of bursts (contract line 9)."""

from __future__ import annotations

import trio
import trio.testing

from trio_bridge import SessionStore, VariableType
from trio_bridge._limits import Limits
from trio_bridge._watch import WatchStream, plan_watch
from trio_bridge.proto.unified_bridge import VariableUpdate


async def test_a_burst_queued_during_a_slow_send_goes_out_as_one_batch() -> None:
    store = SessionStore()
    session = store.create_session().session_id
    store.register_variable(session, "n", VariableType.INTEGER, 0)
    plan = plan_watch(
        store,
        session_id=session,
        identifiers=["n"],
        include_initial_values=True,
        options={},
        resume_versions={},
        limits=Limits(),
    )
    batches: list[list[VariableUpdate]] = []
    slow_send = trio.Event()

    async def send(updates: list[VariableUpdate]) -> None:
        batches.append(updates)
        if len(batches) == 2:
            await slow_send.wait()  # the client is slow to take the first change

    async with trio.open_nursery() as nursery:
        nursery.start_soon(WatchStream(store, plan, send=send).run)
        await trio.testing.wait_all_tasks_blocked()
        store.set_variable(session, "n", 1)
        await trio.testing.wait_all_tasks_blocked()
        for value in range(2, 302):
            store.set_variable(session, "n", value)
        slow_send.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert [len(batch) for batch in batches] == [2, 1, 300]
    assert [u.variable.version for u in batches[2] if u.variable] == list(range(3, 303))

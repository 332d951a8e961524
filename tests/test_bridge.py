"""The trio↔asyncio bridge on its own: eager ``run_in_asyncio`` and the coalescing transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio

from trio_bridge._bridge import _CoalescingTransport, run_in_asyncio


async def test_a_coroutine_that_never_waits_finishes_in_the_calling_trio_task(aio_loop: Any) -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    async def immediate(value: int) -> int:
        ran_in.append(asyncio.current_task())
        return value * 2

    assert await run_in_asyncio(immediate, 21) == 42
    assert ran_in == [None]  # no asyncio task was needed


async def test_a_coroutine_that_waits_goes_on_in_an_asyncio_task(aio_loop: Any) -> None:
    steps: list[str] = []

    async def waits_twice() -> str:
        steps.append("started" if asyncio.current_task() is None else "started in a task")
        await asyncio.sleep(0)
        assert asyncio.current_task() is not None
        steps.append("after first wait")
        await asyncio.sleep(0.001)
        steps.append("after second wait")
        return "done"

    assert await run_in_asyncio(waits_twice) == "done"
    assert steps == ["started", "after first wait", "after second wait"]


@pytest.mark.parametrize("wait_first", [False, True])
async def test_errors_reach_the_trio_caller(aio_loop: Any, wait_first: bool) -> None:
    async def fails() -> None:
        if wait_first:
            await asyncio.sleep(0)
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        await run_in_asyncio(fails)


async def test_the_result_of_an_awaited_future_is_passed_in(aio_loop: Any) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    async def waits_for_future() -> str:
        return "got " + await future

    async with trio.open_nursery() as nursery:
        results: list[str] = []

        async def call() -> None:
            results.append(await run_in_asyncio(waits_for_future))

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        future.set_result("it")
    assert results == ["got it"]


async def test_cancelling_the_trio_caller_cancels_the_coroutine_where_it_waits(aio_loop: Any) -> None:
    events: list[str] = []
    waiting = trio.Event()

    async def waits_forever() -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            events.append("finally")

    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_in_asyncio, waits_forever)
            await waiting.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert events == ["cancelled", "finally"]


async def test_a_coroutine_cancelled_before_its_task_ran_is_closed(aio_loop: Any) -> None:
    events: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(0)
            events.append("resumed")
        finally:
            events.append("finally")

    with trio.CancelScope() as scope:
        scope.cancel()  # the hand-over to asyncio is cancelled at once
        await run_in_asyncio(waits)
    assert scope.cancelled_caught
    assert "finally" in events


class _RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


def _in_asyncio(fn: Any) -> Any:
    return trio_asyncio.aio_as_trio(fn)()


async def test_writes_of_one_turn_leave_in_one_write_in_order(aio_loop: Any) -> None:
    real = _RecordingTransport()
    transport = _CoalescingTransport(real)

    async def scenario() -> None:
        transport.write(b"a")
        transport.write(bytearray(b"b"))
        transport.write(b"")
        transport.write(memoryview(b"c"))
        assert real.writes == []  # nothing left before the end of the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert real.writes == [b"abc"]
        transport.write(b"d")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert real.writes == [b"abc", b"d"]

    await _in_asyncio(scenario)


async def test_close_sends_what_is_gathered_and_abort_drops_it(aio_loop: Any) -> None:
    async def scenario() -> None:
        closing = _RecordingTransport()
        transport = _CoalescingTransport(closing)
        transport.write(b"goaway")
        transport.close()
        assert closing.writes == [b"goaway"]
        assert closing.closed and transport.is_closing()

        aborting = _RecordingTransport()
        transport = _CoalescingTransport(aborting)
        transport.write(b"lost")
        transport.abort()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert aborting.writes == [] and aborting.aborted

    await _in_asyncio(scenario)

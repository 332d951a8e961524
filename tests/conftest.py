"""Shared fixtures: a real server on a free loopback port and a generated client talking to it.

The server runs in pytest-trio's ``nursery`` fixture, so it shuts down when the test ends. Tests that
stop a server themselves start it in their own nursery instead (``support.start_server``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio_asyncio

from tests.support import Client, connect, start_server
from trio_bridge import RunningServer


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with trio_asyncio.open_loop() as loop:
        yield loop


@pytest.fixture
async def nursery(aio_loop: Any) -> AsyncIterator[trio.Nursery]:
    """Replaces pytest-trio's: tasks in it (servers, watchers) end before the asyncio loop closes."""
    async with trio.open_nursery() as tasks:
        yield tasks
        tasks.cancel_scope.cancel()


@pytest.fixture
async def server(nursery: trio.Nursery, aio_loop: Any) -> RunningServer:
    return await start_server(nursery)


@pytest.fixture
async def client(server: RunningServer, aio_loop: Any) -> AsyncIterator[Client]:
    with connect(server) as connected:
        yield connected


_COUNTS = pytest.StashKey[list[str]]()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``report(line)``: a count the hardening tests want seen; printed at the end of every run."""
    return request.config.stash.setdefault(_COUNTS, []).append


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_COUNTS, [])
    if lines:
        terminalreporter.section("hardening counts")
        for line in lines:
            terminalreporter.write_line(line)

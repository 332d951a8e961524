"""Shared fixtures: a real server on a free loopback port and a generated client talking to it.

The server runs in pytest-trio's ``nursery`` fixture, so it shuts down when the test ends. Tests that
stop a server themselves start it in their own nursery instead (``support.start_server``).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio

from tests import support
from tests.support import Client, connect, start_server
from trio_bridge import MemoryStore, RunningServer, Store

pytest_plugins = ["tests.etcd_fixtures", "tests.tls_fixtures"]

#: The suites every store runs, each test once per store (``store_kind``): the RPCs, the watch, limits,
#: security, shutdown, metrics and health, interop, the command line and the examples.
BOTH_STORES = {
    "test_rpcs",
    "test_watch",
    "test_watch_random",
    "test_watch_teardown",
    "test_client",
    "test_write_stream",
    "test_sync_client",
    "test_watch_scale",
    "test_limits",
    "test_security",
    "test_shutdown",
    "test_metrics_health",
    "test_grpcio_interop",
    "test_cli",
    "test_examples",
}
STORES = ["memory", "etcd"]
#: Suites about several servers on one etcd: etcd only.
ETCD_ONLY = {"test_replicas", "test_etcd_store", "test_etcd_faults"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "store_kind" in metafunc.fixturenames:
        if module in BOTH_STORES:
            metafunc.parametrize("store_kind", STORES, indirect=True)
        elif module in ETCD_ONLY:
            metafunc.parametrize("store_kind", ["etcd"], indirect=True)


#: With etcd, a mock clock jumps only after this long (real seconds) with no task to run, so never
#: while an etcd reply is on its way (loopback, no fsync: about a millisecond).
ETCD_AUTOJUMP_THRESHOLD = 0.05


@pytest.fixture
def autojump_clock(store_kind: str) -> trio.testing.MockClock:
    """pytest-trio's, except that with etcd time jumps only once nothing has run for a while, and
    otherwise runs at the speed of real time (never slower than etcd's leases, which run on it)."""
    if store_kind == "memory":
        return trio.testing.MockClock(autojump_threshold=0)
    return trio.testing.MockClock(rate=1.0, autojump_threshold=ETCD_AUTOJUMP_THRESHOLD)


@pytest.fixture
def mock_clock(store_kind: str) -> trio.testing.MockClock:
    """pytest-trio's (it moves only when a test jumps it), except that with etcd it also runs at the
    speed of real time, as etcd's lease TTLs do."""
    return trio.testing.MockClock(rate=0.0 if store_kind == "memory" else 1.0)


@pytest.fixture(autouse=True)
def store_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store the test's servers use: "memory" unless the test is one of the ``BOTH_STORES``
    suites, which run once with each store. For etcd: the tests' shared etcd member, under a key
    prefix of the test's own."""
    kind: str = getattr(request, "param", "memory")
    if kind == "etcd":
        cluster = request.getfixturevalue("etcd_cluster")
        prefix = request.getfixturevalue("etcd_prefix").decode().rstrip("/")
        hosts = ",".join(f"{host}:{port}" for host, port in cluster.endpoints)
        support.STORE_URL = f"etcd://{hosts}{prefix}"
    try:
        yield kind
    finally:
        support.STORE_URL = "memory"


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


@pytest.fixture(params=["memory", "etcd"])
async def make_store(
    request: pytest.FixtureRequest, nursery: trio.Nursery, aio_loop: Any
) -> Callable[..., Awaitable[Store]]:
    """``await make_store(**settings)``: a running store of the parametrized kind, with the test's own
    prefix on the tests' etcd member for the etcd store. The conformance suite: every test that uses
    it runs against every store."""
    kind = request.param
    cluster = request.getfixturevalue("etcd_cluster") if kind == "etcd" else None
    prefixes = itertools.count()

    async def make(**settings: Any) -> Store:
        settings.setdefault("default_ttl", 60.0)
        if cluster is None:
            return MemoryStore(**settings)
        from trio_bridge.storage.etcd.store import EtcdSettings, EtcdStore

        prefix = f"/store-tests/{uuid.uuid4().hex[:12]}-{next(prefixes)}"
        store = EtcdStore(EtcdSettings(endpoints=tuple(cluster.endpoints), prefix=prefix), **settings)
        await nursery.start(store.run)
        return store

    return make

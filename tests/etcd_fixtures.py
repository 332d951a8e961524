"""pytest fixtures for tests against a real etcd (see tests/etcd_cluster.py).

A plugin: load it with ``pytest_plugins = ["tests.etcd_fixtures"]`` (in the top-level conftest, or in
a test module). Tests using these fixtures are marked ``etcd`` (and ``etcd_multi`` for a 3-member
cluster) automatically, so ``-m "not etcd"`` leaves them out.

- ``etcd_cluster``: one single-member cluster for the whole session. Tests share it: never kill it,
  and keep to the keys under ``etcd_prefix``. Compacting it is fine (everyone reads their own, newer
  revisions).
- ``etcd_prefix``: a key prefix (bytes, ending in ``/``) unique to the test.
- ``etcd_cluster3``: a fresh 3-member cluster for one test, free to kill and restart.
- ``make_etcd_cluster``: ``make_etcd_cluster(members=1, extra_flags=(), tls=None)`` starts clusters
  of the test's own (other flags, TLS, auth enabled, ...), all stopped when the test ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_cluster import EtcdCluster

_ETCD_FIXTURES = {"etcd_cluster": "etcd", "make_etcd_cluster": "etcd", "etcd_cluster3": "etcd_multi"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "etcd: runs against a real etcd started by the tests")
    config.addinivalue_line("markers", "etcd_multi: starts its own 3-member etcd cluster (about 1 s)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, marker in _ETCD_FIXTURES.items():
            if fixture in fixtures:
                item.add_marker("etcd")
                if marker != "etcd":
                    item.add_marker(marker)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    # No fsync: the shared member serves the suites that every store runs, where each write's fsync
    # only costs time (the durability tests start clusters of their own, with fsync).
    cluster = EtcdCluster(base_dir=tmp_path_factory.mktemp("etcd"), extra_flags=("--unsafe-no-fsync=true",))
    cluster.start(members=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_etcd_cluster(tmp_path: Path) -> Iterator[Callable[..., EtcdCluster]]:
    """``make_etcd_cluster(members=1, **options)``: a started cluster of the test's own, under
    ``tmp_path`` (``options``: EtcdCluster's ``extra_flags``, ``tls``); every one made is stopped when
    the test ends."""
    clusters: list[EtcdCluster] = []

    def make(members: int = 1, **options: Any) -> EtcdCluster:
        cluster = EtcdCluster(base_dir=tmp_path / f"etcd{len(clusters)}", **options)
        clusters.append(cluster)
        return cluster.start(members=members)

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture
def etcd_cluster3(make_etcd_cluster: Callable[..., EtcdCluster]) -> EtcdCluster:
    return make_etcd_cluster(members=3)


@pytest.fixture
def etcd_prefix() -> bytes:
    return f"/trio-bridge-test/{uuid.uuid4().hex[:16]}/".encode()

"""Counting RPCs and sent updates costs a dictionary update, not prometheus_client's locks and label
lookups: the counts reach prometheus_client only when the metrics are scraped. What a scrape shows is
exactly what prometheus_client's own counters showed (``test_metrics_health`` checks it on a server)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import prometheus_client
import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from trio_bridge._metrics import Metrics

PROMETHEUS_CODE = str(Path(prometheus_client.__file__).parent)

#: What the server counts, in an order with repeats, new label sets late and an updates count of 0.
EVENTS: list[tuple[str, ...]] = [
    ("rpc", "CreateSession", "OK"),
    ("sent", "3"),
    ("rpc", "SetVariable", "OK"),
    ("rpc", "GetSession", "NOT_FOUND"),
    ("rpc", "SetVariable", "OK"),
    ("sent", "0"),
    ("sent", "1"),
    ("rpc", "WatchVariables", "CANCELLED"),
    ("rpc", "SetVariable", "INVALID_ARGUMENT"),
    ("rpc", "SetVariable", "OK"),
]


def _gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    Gauge("trio_bridge_sessions", "Live sessions.", registry=registry).set_function(lambda: 2)
    Gauge("trio_bridge_variables", "Variables across all sessions.", registry=registry).set_function(
        lambda: 5
    )
    Gauge("trio_bridge_observers", "Live observer subscriptions.", registry=registry).set_function(lambda: 1)
    Gauge(
        "trio_bridge_stored_bytes",
        "Memory the sessions' variables and histories keep alive, about (see max_stored_bytes).",
        registry=registry,
    ).set_function(lambda: 1234)
    streams = Gauge("trio_bridge_watch_streams_open", "Open WatchVariables streams.", registry=registry)
    streams.set_function(lambda: 0)
    connections = Gauge("trio_bridge_connections_open", "Open client connections.", registry=registry)
    connections.set_function(lambda: 0)
    return streams, connections


class CountersOfPrometheusClient:
    """The metrics as they were: prometheus_client's Counters, counted as the server counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.open_watch_streams, self.open_connections = _gauges(self.registry)
        self.updates_sent = Counter(
            "trio_bridge_updates_sent", "VariableUpdate messages sent.", registry=self.registry
        )
        self.rpcs = Counter(
            "trio_bridge_rpcs",
            "Finished RPCs by method and status.",
            ["method", "status"],
            registry=self.registry,
        )

    def record_rpc(self, method: str, status: str) -> None:
        self.rpcs.labels(method=method, status=status).inc()


def _metrics() -> Metrics:
    return Metrics(sessions=lambda: 2, variables=lambda: 5, observers=lambda: 1, stored_bytes=lambda: 1234)


def _count(metrics: Any, events: list[tuple[str, ...]]) -> None:
    for event in events:
        if event[0] == "rpc":
            metrics.record_rpc(event[1], event[2])
        else:
            metrics.updates_sent.inc(int(event[1]))


_CREATED = re.compile(r"^(\w+_created(?:\{[^}]*\})?) (\S+)$", re.MULTILINE)


def _exposition(registry: CollectorRegistry, since: float, until: float) -> str:
    """The scrape's text, each ``_created`` time (checked to lie in ``[since, until]``) replaced by
    ``T``."""
    text = generate_latest(registry).decode()
    for _, created in _CREATED.findall(text):
        assert since <= float(created) <= until, created
    return _CREATED.sub(r"\1 T", text)


@pytest.fixture(params=["created series", "no created series"])
def created_series(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.param == "no created series":
        prometheus_client.metrics.disable_created_metrics()
    try:
        yield
    finally:
        prometheus_client.metrics.enable_created_metrics()


@pytest.mark.usefixtures("created_series")
@pytest.mark.parametrize(
    "events", [[], EVENTS[:1], EVENTS[1:2], EVENTS], ids=["none", "one rpc", "sent", "all"]
)
def test_a_scrape_shows_what_prometheus_client_counters_showed(events: list[tuple[str, ...]]) -> None:
    since = time.time()
    ours, theirs = _metrics(), CountersOfPrometheusClient()
    _count(ours, events)
    _count(theirs, events)
    until = time.time()
    assert _exposition(ours.registry, since, until) == _exposition(theirs.registry, since, until)
    for method, status in {(e[1], e[2]) for e in EVENTS if e[0] == "rpc"}:
        expected = theirs.registry.get_sample_value(
            "trio_bridge_rpcs_total", {"method": method, "status": status}
        )
        assert ours.rpc_count(method, status) == (expected or 0.0)
    assert ours.gauge("trio_bridge_updates_sent_total") == theirs.registry.get_sample_value(
        "trio_bridge_updates_sent_total"
    )
    assert ours.gauge("trio_bridge_variables") == 5.0


def test_a_label_set_s_created_time_is_when_it_was_first_counted() -> None:
    metrics = _metrics()
    metrics.record_rpc("Ping", "OK")
    time.sleep(0.01)
    between = time.time()
    metrics.record_rpc("Ping", "OK")
    metrics.record_rpc("Ping", "CANCELLED")
    registry = metrics.registry
    ok = registry.get_sample_value("trio_bridge_rpcs_created", {"method": "Ping", "status": "OK"})
    cancelled = registry.get_sample_value(
        "trio_bridge_rpcs_created", {"method": "Ping", "status": "CANCELLED"}
    )
    assert ok is not None and ok < between
    assert cancelled is not None and cancelled >= between
    assert registry.get_sample_value("trio_bridge_rpcs_total", {"method": "Ping", "status": "OK"}) == 2.0


def _calls_into_prometheus_client(function: Callable[[], object]) -> list[str]:
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PROMETHEUS_CODE):
            called.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return called


def test_counting_does_not_reach_prometheus_client() -> None:
    """The server counts every RPC and every batch of updates sent, whether or not anything scrapes
    its metrics: a dictionary update, no prometheus_client code (a new label set included)."""
    metrics = _metrics()
    on_sent = metrics.updates_sent.inc  # (as a watch stream holds it)

    def count() -> None:
        metrics.record_rpc("SetVariable", "OK")
        metrics.record_rpc("SetVariable", "OK")
        metrics.record_rpc("GetSession", "NOT_FOUND")
        on_sent(5)

    assert _calls_into_prometheus_client(count) == []
    assert metrics.rpc_count("SetVariable", "OK") == 2.0
    assert metrics.gauge("trio_bridge_updates_sent_total") == 5.0


def test_counts_refuse_what_prometheus_client_refuses() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        _metrics().updates_sent.inc(-1)

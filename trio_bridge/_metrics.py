"""Prometheus metrics of one server, in a registry of its own (so several servers share a process).

Gauges that mirror state (sessions, variables, observers) are read from the store at scrape time,
so they cannot drift from the truth.

The counters (RPCs by method and status, updates sent) are counted in plain integers, on every RPC
whether or not anything scrapes them: a prometheus_client ``Counter`` takes a lock and a label lookup
per count, about 1% of the server's CPU per write. :class:`_Counters` hands the counts to
prometheus_client only when the registry is collected (a scrape), as the same samples the ``Counter``
objects gave: ``*_total`` and ``*_created`` (unless created series are disabled), label sets in the
order they were first counted, each created when it was first counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_RPCS = ("trio_bridge_rpcs", "Finished RPCs by method and status.")
_UPDATES_SENT = ("trio_bridge_updates_sent", "VariableUpdate messages sent.")


class Count:
    """A counter that only counts (``inc``); read at scrape time."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (not negative, as for a Prometheus counter)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _Counters(Collector):
    """The server's counters, for prometheus_client to collect."""

    def __init__(self) -> None:
        self.updates_sent = Count()
        #: (method, status) → count, and when each was first counted; only the server's thread writes
        #: them, a scrape (on the HTTP server's thread) reads copies
        self.rpcs: dict[tuple[str, str], int] = {}
        self.rpcs_created: dict[tuple[str, str], float] = {}

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(*_UPDATES_SENT), CounterMetricFamily(*_RPCS, labels=("method", "status"))]

    def collect(self) -> Iterable[Metric]:
        with_created = prometheus_client.metrics._use_created  # (prometheus_client's own switch)
        sent = CounterMetricFamily(*_UPDATES_SENT)
        sent.add_metric(
            (), float(self.updates_sent.value), created=self.updates_sent.created if with_created else None
        )
        rpcs = CounterMetricFamily(*_RPCS, labels=("method", "status"))
        counts = self.rpcs.copy()
        created = self.rpcs_created.copy()  # (after the counts: it has every key they have)
        for key, count in counts.items():
            rpcs.add_metric(key, float(count), created=created[key] if with_created else None)
        return [sent, rpcs]


class Metrics:
    def __init__(
        self,
        *,
        sessions: Callable[[], float],
        variables: Callable[[], float],
        observers: Callable[[], float],
        stored_bytes: Callable[[], float] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge("trio_bridge_sessions", "Live sessions.", registry=self.registry).set_function(sessions)
        Gauge("trio_bridge_variables", "Variables across all sessions.", registry=self.registry).set_function(
            variables
        )
        Gauge("trio_bridge_observers", "Live observer subscriptions.", registry=self.registry).set_function(
            observers
        )
        Gauge(
            "trio_bridge_stored_bytes",
            "Memory the sessions' variables and histories keep alive, about (see max_stored_bytes).",
            registry=self.registry,
        ).set_function(stored_bytes)
        # Read from the service at scrape time: the service is built after the metrics it reports to.
        self.open_watch_streams = Gauge(
            "trio_bridge_watch_streams_open", "Open WatchVariables streams.", registry=self.registry
        )
        self.open_watch_streams.set_function(lambda: 0)
        self.open_connections = Gauge(
            "trio_bridge_connections_open", "Open client connections.", registry=self.registry
        )
        self.open_connections.set_function(lambda: 0)
        self._counters = _Counters()
        self.registry.register(self._counters)
        #: VariableUpdate messages sent (``updates_sent.inc(count)``)
        self.updates_sent = self._counters.updates_sent
        self._http: WSGIServer | None = None

    def record_rpc(self, method: str, status: str) -> None:
        """Count a finished RPC."""
        key = (method, status)
        rpcs = self._counters.rpcs
        count = rpcs.get(key)
        if count is None:
            self._counters.rpcs_created[key] = time.time()
            count = 0
        rpcs[key] = count + 1

    def rpc_count(self, method: str, status: str) -> float:
        return float(self._counters.rpcs.get((method, status), 0))

    def gauge(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on a background thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

"""Prometheus metrics of one server, in a registry of its own (so several servers share a process).

Gauges that mirror state (sessions, variables, observers) are read from the store at scrape time,
so they cannot drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


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
        self.updates_sent = Counter(
            "trio_bridge_updates_sent", "VariableUpdate messages sent.", registry=self.registry
        )
        self.rpcs = Counter(
            "trio_bridge_rpcs",
            "Finished RPCs by method and status.",
            ["method", "status"],
            registry=self.registry,
        )
        self._http: WSGIServer | None = None

    def record_rpc(self, method: str, status: str) -> None:
        self.rpcs.labels(method=method, status=status).inc()

    def rpc_count(self, method: str, status: str) -> float:
        value = self.registry.get_sample_value("trio_bridge_rpcs_total", {"method": method, "status": status})
        return value or 0.0

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

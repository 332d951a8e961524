"""The server: a store, its expiry task, the gRPC service and the metrics endpoint, in one nursery."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from grpclib.health.service import Health

from ._bridge import serve_grpc
from ._metrics import Metrics
from ._service import UnifiedBridgeService
from ._store import DEFAULT_HISTORY_SIZE, DEFAULT_SESSION_TTL, SessionStore
from ._watch import DEFAULT_MAX_IDENTIFIERS, DEFAULT_QUEUE_SIZE, WatchLimits

log = logging.getLogger("trio_bridge")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``trio-bridge serve`` can be told; the defaults are the documented ones."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: Idle seconds after which a session and its variables are removed.
    session_ttl: float = DEFAULT_SESSION_TTL
    #: Port of the Prometheus /metrics endpoint; None turns it off.
    metrics_port: int | None = None
    #: On shutdown, how long running calls get to finish before they are cancelled.
    shutdown_grace: float = 0.5
    #: Changes each session remembers for watchers that resume.
    history_size: int = DEFAULT_HISTORY_SIZE
    #: Updates a watch stream may fall behind before its slow-consumer policy applies.
    watch_queue_size: int = DEFAULT_QUEUE_SIZE
    #: Most variables one WatchVariables request may name.
    max_watch_identifiers: int = DEFAULT_MAX_IDENTIFIERS


@dataclass(frozen=True)
class RunningServer:
    """What a started server reports: where it listens, and its parts (for tests and embedding)."""

    host: str
    port: int
    metrics_port: int | None
    store: SessionStore
    service: UnifiedBridgeService
    metrics: Metrics


async def serve(
    config: ServerConfig = ServerConfig(),
    *,
    store: SessionStore | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a server until cancelled, then shut it down gracefully (see ``_bridge``).

    Start it with ``await nursery.start(serve, config)`` to get a :class:`RunningServer` once it is
    listening. Passing a ``store`` keeps state across server restarts in one process.
    """
    if store is None:
        store = SessionStore(default_ttl=config.session_ttl, history_size=config.history_size)
    metrics = Metrics(
        sessions=lambda: store.session_count,
        variables=lambda: store.variable_count,
        observers=lambda: store.observers.observer_count,
    )
    service = UnifiedBridgeService(
        store,
        metrics,
        WatchLimits(max_identifiers=config.max_watch_identifiers, queue_size=config.watch_queue_size),
    )
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = metrics.start_http(config.host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_expiry)
            bound = await nursery.start(
                lambda task_status: serve_grpc(
                    [service, Health({service: []})],
                    host=config.host,
                    port=config.port,
                    drain=service.drain,
                    grace=config.shutdown_grace,
                    task_status=task_status,
                )
            )
            task_status.started(
                RunningServer(
                    host=bound.host,
                    port=bound.port,
                    metrics_port=metrics_port,
                    store=store,
                    service=service,
                    metrics=metrics,
                )
            )
    finally:
        metrics.stop_http()

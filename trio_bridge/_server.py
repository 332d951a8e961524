"""The server: a store and its background work, the gRPC service and the metrics endpoint, on one
trio-asyncio loop. Shutdown stops the gRPC side first (in steps, see ``_bridge``), then the store."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio
from grpclib._typing import IServable
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health

from ._bridge import after_asyncio_queue, open_asyncio_loop, serve_grpc
from ._config import ServerConfig
from ._connections import ConnectionLimits, connections_for, raise_fd_limit
from ._errors import CannotServe
from ._limits import Limits
from ._metrics import Metrics
from ._reflection import with_reflection
from ._security import Tokens, server_tls
from ._service import CountedStreams, UnifiedBridgeService
from .storage import MemoryStore, SessionCache, Store
from .storage.location import parse_store

log = logging.getLogger("trio_bridge")

DEFAULT_CONFIG = ServerConfig()
#: The fewest connections the web view may hold at once, however few ``max_connections`` allows.
WEB_MIN_CONNECTIONS = 16
#: Connections one browser host may hold besides one per page's feed: for loading pages and writes.
WEB_SPARE_CONNECTIONS = 16


@dataclass(frozen=True)
class RunningServer:
    """What a started server reports: where it listens, and its parts (for tests and embedding)."""

    host: str
    port: int
    metrics_port: int | None
    store: Store
    service: UnifiedBridgeService
    metrics: Metrics
    #: The web view's port (None: off).
    web_port: int | None = None


async def serve(
    config: ServerConfig = DEFAULT_CONFIG,
    *,
    store: Store | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a server until cancelled, then shut it down gracefully (see ``_bridge``).

    Start it with ``await nursery.start(serve, config)`` to get a :class:`RunningServer` once it is
    listening. Passing a ``store`` keeps state across server restarts in one process.
    """
    limits = config.limits
    tokens = Tokens.load(config.token_file) if config.token_file is not None else None
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    if store is None:
        store = store_for(config)
    cache = store.cache
    metrics = Metrics(
        sessions=lambda: cache.session_count,
        variables=lambda: cache.variable_count,
        observers=lambda: cache.observers.observer_count,
        stored_bytes=lambda: cache.stored_bytes,
    )
    store.register_metrics(metrics.registry)
    service = UnifiedBridgeService(store, metrics, limits, tokens)
    metrics.open_watch_streams.set_function(lambda: service.open_watches)
    # The health service says SERVING until the server begins to drain, NOT_SERVING from then on, so
    # load balancers stop sending calls before the connections close.
    serving = ServiceStatus()
    serving.set(True)
    # And NOT_SERVING while the store cannot serve writes (etcd unreachable).
    store_serving = ServiceStatus()

    web_stop = trio.Event()

    async def drain() -> None:
        serving.set(False)
        web_stop.set()  # the web view's listener closes; its feeds end with the drain below
        await service.drain()

    web_socket = None
    if config.web_port is not None:  # bound first: nothing else is open yet if it cannot be
        from ._web import bind_web  # brings in hypercorn: only when the view is on

        web_socket = bind_web(config.host, config.web_port)
    metrics_port = None
    if config.metrics_port is not None:
        try:
            metrics_port = metrics.start_http(config.host, config.metrics_port)
        except OSError as exc:
            if web_socket is not None:
                web_socket.close()
            reason = exc.strerror or str(exc)
            raise CannotServe(
                f"cannot serve metrics on {config.host}:{config.metrics_port}: {reason}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
    # Health and reflection streams count toward the watch stream limits: see CountedStreams.
    health = Health({service: [serving, store_serving]})
    service_and_others = with_reflection([service, health], tokens)
    services: list[IServable] = [
        service,
        *(CountedStreams(other, service) for other in service_and_others[1:]),
    ]
    try:
        async with open_asyncio_loop(), trio.open_nursery() as store_nursery:
            # The store outlives the gRPC side: calls still running while the server shuts down may
            # need it. It stops once the gRPC side has (see the finally clause).
            store_scope = trio.CancelScope(shield=True)

            async def run_store(*, task_status: trio.TaskStatus[None]) -> None:
                with store_scope:
                    await store.run(task_status=task_status)

            await store_nursery.start(run_store)
            store_nursery.start_soon(_report_availability, store, store_serving)
            try:
                with _fan_out_after_replies(cache):
                    web = _WebViewRunner(config, service, web_socket, web_stop)
                    async with trio.open_nursery() as web_nursery:
                        try:
                            async with trio.open_nursery() as nursery:
                                bound = await nursery.start(
                                    functools.partial(
                                        serve_grpc,
                                        services,
                                        host=config.host,
                                        port=config.port,
                                        tls=tls,
                                        drain=drain,
                                        grace=config.shutdown_grace,
                                        connection_limits=_connection_limits(limits),
                                        max_connections=limits.max_connections,
                                    )
                                )
                                metrics.open_connections.set_function(bound.open_connections)
                                web_port = await web.start(web_nursery)
                                _warn_if_exposed(bound.host, tls is not None, tokens is not None)
                                task_status.started(
                                    RunningServer(
                                        host=bound.host,
                                        port=bound.port,
                                        metrics_port=metrics_port,
                                        store=store,
                                        service=service,
                                        metrics=metrics,
                                        web_port=web_port,
                                    )
                                )
                        finally:
                            web.stopping()  # however the gRPC side ended (drained, or failed)
            finally:
                store_scope.cancel()
                store_nursery.cancel_scope.cancel()
    finally:
        metrics.stop_http()
        if web_socket is not None:
            web_socket.close()


def _connection_limits(limits: Limits) -> ConnectionLimits:
    return ConnectionLimits(
        # room for unary calls beside a full quota of watch streams
        max_streams=limits.max_watch_streams_per_connection + 100,
        max_stream_resets_per_second=limits.max_stream_resets_per_second,
        max_control_frames_per_second=limits.max_control_frames_per_second,
        max_buffer_bytes=limits.max_connection_buffer_bytes,
        max_total_buffer_bytes=limits.max_request_buffer_bytes,
        handshake_timeout=limits.handshake_timeout_seconds,
        idle_timeout=limits.idle_connection_timeout_seconds,
    )


class _WebViewRunner:
    """The web view on ``sock`` (None: off), run in a nursery of its caller's once the gRPC side
    listens. It stops in steps when ``stop`` is set (the drain sets it: see ``_web.server``), and
    however the server ends, within the shutdown grace of :meth:`stopping` (its scope is shielded
    until then: it stops when told, not when cancelled). (A plain object, not an async context
    manager with a nursery: with one, every ended stream's task was left in a reference cycle.)"""

    def __init__(
        self,
        config: ServerConfig,
        service: UnifiedBridgeService,
        sock: socket.socket | None,
        stop: trio.Event,
    ) -> None:
        self._config = config
        self._service = service
        self._sock = sock
        self._stop = stop
        self._scope = trio.CancelScope(shield=True)

    async def start(self, nursery: trio.Nursery) -> int | None:
        """Start it in ``nursery``; its port (None: the view is off)."""
        if self._sock is None:
            return None
        await nursery.start(self._run)
        port: int = self._sock.getsockname()[1]
        return port

    def stopping(self) -> None:
        """Stop it now, in steps, within the shutdown grace."""
        self._stop.set()
        self._scope.deadline = trio.current_time() + self._config.shutdown_grace + 1

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        from ._web import WebConnections, WebSettings, WebView, serve_web  # hypercorn: only when on

        config, sock = self._config, self._sock
        assert sock is not None
        # A quarter of the connections the gRPC side may hold (they share the files a process may
        # open), and per browser host one per feed it may hold, and a few more.
        budget = config.limits.max_connections or connections_for(raise_fd_limit())
        connections = WebConnections(
            max(WEB_MIN_CONNECTIONS, budget // 4),
            config.limits.max_watch_streams_per_connection + WEB_SPARE_CONNECTIONS,
            config.limits.max_watch_streams_per_connection,
        )
        view = WebView(
            self._service,
            WebSettings(
                writable=config.web_writable,
                allowed_hosts=config.web_allowed_hosts,
                history_points=config.limits.web_history_points,
                tls=config.tls_cert is not None,
            ),
            connections,
        )
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            tls = (config.tls_cert, config.tls_key, config.tls_client_ca)
        with self._scope:
            await serve_web(
                view,
                sock,
                connections=connections,
                stop=self._stop.wait,
                grace=config.shutdown_grace,
                handshake_timeout=config.limits.handshake_timeout_seconds,
                tls=tls,
                task_status=task_status,
            )


@contextlib.contextmanager
def _fan_out_after_replies(cache: SessionCache) -> Iterator[None]:
    """In the block (while asyncio's loop runs), a change fanned out to idle watch streams reaches
    them once the calls that made it have answered (:func:`after_asyncio_queue`): a writer's reply
    does not wait behind a thousand deliveries. Afterwards, at once again."""
    cache.observers.dispatch_later(after_asyncio_queue)
    try:
        yield
    finally:
        cache.observers.dispatch_later(None)


async def _report_availability(store: Store, status: ServiceStatus) -> None:
    """Keep ``status`` equal to whether the store can serve, for as long as it runs."""
    while True:
        status.set(store.available)
        await store.availability_changed()


def store_for(config: ServerConfig) -> Store:
    """The store ``config.store`` names, with the limits of ``config``."""
    limits = config.limits
    settings: dict[str, Any] = dict(
        default_ttl=config.session_ttl,
        history_size=limits.history_size,
        max_sessions=limits.max_sessions,
        max_variables_per_session=limits.max_variables_per_session,
        max_sessions_per_owner=limits.max_sessions_per_token,
        max_ttl=limits.max_session_ttl_seconds,
        max_session_bytes=limits.max_session_bytes,
        max_stored_bytes=limits.max_stored_bytes,
        max_history_bytes=limits.max_history_bytes,
    )
    location = parse_store(config.store)
    if location.kind == "memory":
        return MemoryStore(**settings)
    from .storage.etcd.store import EtcdSettings, EtcdStore  # brings in the etcd client: only when used

    tls = None
    if location.tls:
        tls = ssl.create_default_context(cafile=config.etcd_ca)
        if config.etcd_cert is not None and config.etcd_key is not None:
            tls.load_cert_chain(config.etcd_cert, config.etcd_key)
    password = None
    if config.etcd_password_file is not None:
        password = config.etcd_password_file.read_text().strip()
    etcd = EtcdSettings(
        endpoints=location.endpoints,
        prefix=location.prefix,
        tls=tls,
        user=config.etcd_user,
        password=password,
        max_request_bytes=config.etcd_max_request_bytes,
        max_txn_ops=config.etcd_max_txn_ops,
    )
    return EtcdStore(etcd, **settings)


def _warn_if_exposed(host: str, tls: bool, tokens: bool) -> None:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    if not tls:
        log.warning(
            "SERVING PLAIN TEXT ON %s: anyone who can reach this address can read and change every "
            "session, and see all traffic. Use --tls-cert/--tls-key%s, or bind 127.0.0.1.",
            host,
            "" if tokens else " and --token-file",
        )
    elif not tokens:
        log.warning(
            "serving on %s with no --token-file: any client that can connect may use any session", host
        )

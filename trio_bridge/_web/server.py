"""Serving the web view: hypercorn's HTTP protocols (HTTP/1.1, and HTTP/2 over TLS) on a socket bound
here, on the server's Trio loop, with a connection loop of our own.

Why our own loop rather than ``hypercorn.trio.serve``: hypercorn shields every socket write from
cancellation, so a browser that stops reading would hold its page's send, its watch and the server's
shutdown forever. Here each connection is known by the browser's address (:class:`WebConnections`):
a page that falls behind has its connection closed (``hang_up``), which ends the send it is stuck in,
and once the shutdown grace has run out every connection still open is closed the same way. The loop
also bounds the connections open at once (``--max-connections``, counted apart from gRPC's).

Shutdown, in steps, as the gRPC side's: when ``stop`` returns, the listener closes, idle keep-alive
connections close, the feeds end (the drain shuts their watches down and they send their ``end``),
connections get ``grace`` seconds to finish, then the rest are closed.

The hypercorn names used here (``TCPServer`` and its ``_read_data`` and ``idle_task``, ``WorkerContext``,
``Config``, ``wrap_app``) are those of hypercorn 0.18, which pyproject.toml pins.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .._errors import CannotServe
from .app import WebView
from .connections import Address, WebConnections

log = logging.getLogger("trio_bridge.web")


class _Connection(TCPServer):
    """hypercorn's connection, which ends as soon as its browser has closed it: hypercorn's own went on
    until its keep-alive timer ran out (75 s), holding its place among the connections meanwhile."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


def bind_web(host: str, port: int) -> socket.socket:
    """The web view's listening socket on ``host:port`` (0: a free port); CannotServe naming it."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise CannotServe(f"cannot serve the web view on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def serve_web(
    view: WebView,
    sock: socket.socket,
    *,
    connections: WebConnections,
    stop: Callable[[], Awaitable[None]],
    grace: float,
    handshake_timeout: float = 10,
    tls: tuple[Path, Path, Path | None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``view`` on ``sock`` until ``stop`` returns, then stop in steps (module doc). ``tls``: the
    certificate, key and the CA of client certificates (mutual TLS), as the gRPC side has them; a TLS
    handshake gets ``handshake_timeout`` seconds."""
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("trio_bridge.web.hypercorn")
    config.include_server_header = False
    config.keep_alive_timeout = 75
    config.ssl_handshake_timeout = handshake_timeout
    tls_context = None
    if tls is not None:
        cert, key, client_ca = tls
        config.certfile, config.keyfile = str(cert), str(key)
        if client_ca is not None:
            config.ca_certs = str(client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
        tls_context = config.create_ssl_context()  # ALPN h2 and http/1.1
    # (hypercorn types ASGI's messages as TypedDicts; the view takes them as plain dicts)
    app = wrap_app(cast(Any, view), config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            address = _address(stream.socket)
        except OSError:  # reset before it was handled: nothing to serve
            await trio.aclose_forcefully(stream)
            return
        refusal = connections.refusal(address)
        if refusal is not None:
            await _refuse(stream, refusal, plain=tls_context is None)
            return
        connections.add(address, stream.socket)
        try:
            served: Any = stream
            if tls_context is not None:
                served = trio.SSLStream(stream, tls_context, server_side=True, https_compatible=True)
            await _Connection(app, config, context, {}, served).run()
        except Exception:  # one connection's fault is never the server's
            log.exception("the web view's connection from %s failed", address)
        finally:
            connections.remove(address, stream.socket)

    try:
        async with trio.open_nursery() as open_connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    functools.partial(
                        trio.serve_listeners, handle, [listener], handler_nursery=open_connections
                    )
                )
                task_status.started()
                await stop()
                accepting.cancel_scope.cancel()
            await listener.aclose()  # new connections are refused now, not left waiting
            await context.terminated.set()  # idle keep-alive connections close
            with trio.move_on_after(grace):
                await connections.none_open()
            connections.hang_up_all()
            open_connections.cancel_scope.cancel()
    finally:
        # However it ends: a send stuck on a page that does not read (hypercorn shields it from
        # cancellation) would hold the nursery, and the server's shutdown, forever.
        connections.hang_up_all()


def _address(sock: trio.socket.SocketType) -> Address:
    peer = sock.getpeername()
    return (str(peer[0]), int(peer[1]))


async def _refuse(stream: trio.SocketStream, refusal: str, *, plain: bool) -> None:
    """Answer a connection over a limit with 503 and ``refusal`` (over plain HTTP/1.1: a TLS client
    sees the connection close), then close it."""
    if plain:
        body = json.dumps({"status": "RESOURCE_EXHAUSTED", "message": f"{refusal}; retry later"}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(head + body)
    await trio.aclose_forcefully(stream)

"""Serving the web view: hypercorn's Trio worker, on a socket bound here, in the server's process.

The view runs beside the gRPC side on the same Trio loop and store. It stops in steps, as the gRPC
side does: when the server drains, its live feeds end (they are among the service's watches) with an
``end`` event saying so, the listener closes, and open connections get the shutdown grace to finish
before they are cancelled.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .._errors import CannotServe
from .app import WebView

log = logging.getLogger("trio_bridge.web")


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
    stop: Callable[[], Awaitable[None]],
    grace: float,
    tls: tuple[Path, Path, Path | None] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``view`` on ``sock`` until ``stop`` returns; then close the listener and give open
    connections ``grace`` seconds before cancelling them. ``tls``: certificate, key and the CA of
    client certificates (mutual TLS), as the gRPC side has them."""
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("trio_bridge.web.hypercorn")
    config.graceful_timeout = grace
    config.include_server_header = False
    config.keep_alive_timeout = 75
    if tls is not None:
        cert, key, client_ca = tls
        config.certfile, config.keyfile = str(cert), str(key)
        if client_ca is not None:
            config.ca_certs = str(client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
        sockets = Sockets(secure_sockets=[sock], insecure_sockets=[], quic_sockets=[])
    else:
        sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
    await worker_serve(
        # (hypercorn types ASGI's messages as TypedDicts; the view takes them as plain dicts)
        wrap_app(cast(Any, view), config.wsgi_max_body_size, "asgi"),
        config,
        sockets=sockets,
        shutdown_trigger=stop,
        task_status=task_status,
    )

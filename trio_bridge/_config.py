"""The server's settings, with their documented defaults (no server code: the CLI imports this cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

from ._limits import DEFAULT_LIMITS, Limits
from ._store import DEFAULT_SESSION_TTL

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
    #: What the server accepts (see ``_limits``).
    limits: Limits = DEFAULT_LIMITS

"""The server's settings, with their documented defaults (no server code: the CLI imports this cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

from ._store import DEFAULT_HISTORY_SIZE, DEFAULT_SESSION_TTL
from ._watch import DEFAULT_MAX_IDENTIFIERS, DEFAULT_QUEUE_SIZE

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

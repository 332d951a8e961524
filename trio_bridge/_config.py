"""The server's settings, with their documented defaults (no server code: the CLI imports this cheaply)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._limits import DEFAULT_LIMITS, Limits
from .storage.location import ETCD_MAX_REQUEST_BYTES, ETCD_MAX_TXN_OPS, ETCD_RECORD_ROOM, parse_store
from .storage.records import DEFAULT_SESSION_TTL, MAX_SESSION_TTL

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
    #: TLS: the server's certificate chain and key (PEM); both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    tls_client_ca: Path | None = None
    #: Bearer tokens the server accepts (see ``_security``); None: no token is asked for.
    token_file: Path | None = None
    #: Where state lives: "memory", or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (see ``storage.location``).
    store: str = "memory"
    #: etcd over TLS (etcds://): trust this CA (PEM) instead of the system's; a client certificate.
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    #: etcd's user and a file holding its password (etcd with authentication on).
    etcd_user: str | None = None
    etcd_password_file: Path | None = None
    #: What the etcd cluster accepts (its --max-request-bytes and --max-txn-ops): checked before sending.
    etcd_max_request_bytes: int = ETCD_MAX_REQUEST_BYTES
    etcd_max_txn_ops: int = ETCD_MAX_TXN_OPS
    #: The web view's port (on ``host``); None turns it off.
    web_port: int | None = None
    #: Whether the web view may set values (compare-and-set forms).
    web_writable: bool = False
    #: Host names the web view answers to, besides IP addresses and localhost.
    web_allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.session_ttl <= min(MAX_SESSION_TTL, self.limits.max_session_ttl_seconds):
            raise ValueError(
                f"--session-ttl must be more than 0 and at most {self.limits.max_session_ttl_seconds} "
                f"seconds (the limit max_session_ttl_seconds, --max-session-ttl-seconds), got "
                f"{self.session_ttl}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.web_writable and self.web_port is None:
            raise ValueError("--web-writable needs --web-port (the web view is off)")
        if self.web_port is not None and self.web_port == self.port and self.port != 0:
            raise ValueError(f"--web-port {self.web_port} is the gRPC port (--port): give it another")
        location = parse_store(self.store)
        etcd_options = (self.etcd_ca, self.etcd_cert, self.etcd_user, self.etcd_password_file)
        if location.kind != "etcd" and any(option is not None for option in etcd_options):
            raise ValueError("the --etcd-* options need --store etcd://... (or etcds://...)")
        if (self.etcd_cert is None) != (self.etcd_key is None):
            raise ValueError("give both --etcd-cert and --etcd-key, or neither")
        if (self.etcd_user is None) != (self.etcd_password_file is None):
            raise ValueError("give both --etcd-user and --etcd-password-file, or neither")
        if self.etcd_max_txn_ops < 2:
            raise ValueError("--etcd-max-txn-ops must be at least 2 (etcd's --max-txn-ops)")
        room = self.etcd_max_request_bytes - ETCD_RECORD_ROOM
        if location.kind == "etcd" and self.limits.max_value_bytes > room:
            raise ValueError(
                f"with --store etcd, --max-value-bytes ({self.limits.max_value_bytes}) must be at most "
                f"{room}: one value and its record must fit in one etcd request "
                f"(--etcd-max-request-bytes {self.etcd_max_request_bytes}, etcd's --max-request-bytes)"
            )

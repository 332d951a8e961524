"""The server's limits, in one place, with their documented defaults.

Every limit bounds what one client can make the server hold or do. Going over one refuses that request
alone, with RESOURCE_EXHAUSTED (something is full: sessions, variables, streams) or INVALID_ARGUMENT
(the request itself is too big), and a message that names the limit and its value; nothing else is
affected. Each field is a ``trio-bridge serve`` flag of the same name (``max_sessions`` →
``--max-sessions``) and a row of the README's Limits table (a test keeps the three in step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _limit(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


#: Limits whose 0 means "derived from the machine" (their help says how).
_ZERO_MEANS_DERIVED = frozenset({"max_connections"})


@dataclass(frozen=True)
class Limits:
    """What the server accepts. All values are whole numbers of at least 1 (0 where the help says
    what it means)."""

    max_message_bytes: int = _limit(4 * 2**20, "largest request message, in bytes")
    max_value_bytes: int = _limit(
        2**20, "largest value, in bytes of its encoding (strings, bytes, tensors and embeddings alike)"
    )
    max_sessions: int = _limit(10_000, "sessions the server holds at once")
    max_variables_per_session: int = _limit(10_000, "variables one session holds")
    max_watch_streams: int = _limit(
        10_000, "watch streams (WatchVariables and health Watch) open at once, in all"
    )
    max_watch_streams_per_connection: int = _limit(
        100, "watch streams (WatchVariables and health Watch) open at once on one connection"
    )
    max_watch_identifiers: int = _limit(1_000, "variables one WatchVariables request may name")
    min_heartbeat_interval_ms: int = _limit(100, "shortest heartbeat interval a watch may ask for")
    max_heartbeat_interval_ms: int = _limit(600_000, "longest heartbeat interval a watch may ask for")
    watch_queue_size: int = _limit(
        1024, "updates a watch may fall behind before its slow-consumer policy applies"
    )
    history_size: int = _limit(1000, "changes each session keeps for watchers that resume")
    max_connections: int = _limit(
        0,
        "client connections open at once; 0: the process's file descriptor limit (raised to its hard "
        "limit at start) less an eighth, at least 32, kept for everything else",
    )
    max_stream_resets_per_second: int = _limit(
        200, "streams one connection's client may reset a second (HTTP/2 Rapid Reset)"
    )
    max_control_frames_per_second: int = _limit(
        1000, "PING, SETTINGS, PRIORITY and tiny DATA frames one connection may send a second"
    )
    max_connection_buffer_bytes: int = _limit(
        8 * 2**20, "request bytes one connection may have received and not yet read as whole messages"
    )
    handshake_timeout_seconds: int = _limit(
        10, "seconds a new connection has to send the HTTP/2 preface and its SETTINGS"
    )
    idle_connection_timeout_seconds: int = _limit(
        300, "seconds a connection may stay open with no call on it"
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            least = 0 if item.name in _ZERO_MEANS_DERIVED else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(
                    f"limit {item.name} must be a whole number of at least {least}, got {value!r}"
                )
        if self.max_connection_buffer_bytes < self.max_message_bytes + 5:
            raise ValueError(
                "max_connection_buffer_bytes must hold one message of max_message_bytes (plus its "
                "5-byte prefix)"
            )
        if self.min_heartbeat_interval_ms > self.max_heartbeat_interval_ms:
            raise ValueError("min_heartbeat_interval_ms must not exceed max_heartbeat_interval_ms")


DEFAULT_LIMITS = Limits()


def describe() -> list[tuple[str, int, str]]:
    """``(name, default, what it bounds)`` for every limit, in declaration order."""
    defaults = Limits()
    return [
        (item.name, getattr(defaults, item.name), item.metadata["help"])
        for item in dataclasses.fields(Limits)
    ]

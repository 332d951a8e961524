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


@dataclass(frozen=True)
class Limits:
    """What the server accepts. All values are whole numbers of at least 1."""

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

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {item.name} must be a whole number of at least 1, got {value!r}")
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

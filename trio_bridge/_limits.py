"""The server's limits, in one place, with their documented defaults.

Every limit bounds what one client can make the server hold or do. Going over one refuses that request
alone, with RESOURCE_EXHAUSTED (something is full: sessions, variables, streams) or INVALID_ARGUMENT
(the request itself is too big), and a message that names the limit and its value; nothing else is
affected. Each field is a ``trio-bridge serve`` flag of the same name (``max_sessions`` →
``--max-sessions``) and a row of the README's Limits table (a test keeps the three in step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import InvalidArgument

if TYPE_CHECKING:
    from ._types import Constraints


def _limit(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


#: Limits whose 0 means "derived from the machine" (their help says how).
ZERO_MEANS_DERIVED = frozenset({"max_connections"})


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
    watch_queue_bytes: int = _limit(
        8 * 2**20,
        "memory the updates a watch has fallen behind by may keep alive, about, in bytes, before its "
        "slow-consumer policy applies",
    )
    history_size: int = _limit(1000, "changes each session keeps for watchers that resume")
    max_metadata_entries: int = _limit(
        64, "entries in one metadata map (of a session, a variable or a write)"
    )
    max_metadata_bytes: int = _limit(16_384, "bytes of one metadata map, keys and values together (UTF-8)")
    max_source_bytes: int = _limit(1_024, "bytes of a write's or a registration's source (UTF-8)")
    max_allowed_values: int = _limit(1_000, "allowed values of a choice or module variable")
    max_tensor_dimensions: int = _limit(32, "dimensions of a tensor constraint's shape")
    max_constraint_bytes: int = _limit(
        65_536, "bytes of a variable's allowed values and pattern together (UTF-8)"
    )
    max_sessions_per_token: int = _limit(
        1_000, "sessions created with one token (any scope) held at once; with --token-file only"
    )
    max_session_ttl_seconds: int = _limit(
        604_800, "the longest TTL a session may ask for (and --session-ttl may set), in seconds"
    )
    max_session_bytes: int = _limit(
        64 * 2**20, "memory one session's variables and history may keep alive, about, in bytes"
    )
    max_stored_bytes: int = _limit(
        2**30, "memory all sessions' variables and histories may keep alive, about, in bytes"
    )
    max_history_bytes: int = _limit(
        16 * 2**20, "memory one session's change history may keep alive, about, in bytes"
    )
    max_connections: int = _limit(
        0,
        "client connections open at once; 0: the process's file descriptor limit (raised to its hard "
        "limit at start) less what is open and an eighth (at least 32) kept for everything else, at "
        "most 10,000",
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
    max_request_buffer_bytes: int = _limit(
        256 * 2**20, "request bytes all connections together may have received and not yet read whole"
    )
    handshake_timeout_seconds: int = _limit(
        10, "seconds a new connection has to send the HTTP/2 preface and its SETTINGS"
    )
    idle_connection_timeout_seconds: int = _limit(
        300, "seconds a connection may stay open with no call on it"
    )
    web_history_points: int = _limit(
        120, "recent changes a number's sparkline starts with on a web view page (replayed per page)"
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            least = 0 if item.name in ZERO_MEANS_DERIVED else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(
                    f"limit {item.name} must be a whole number of at least {least}, got {value!r}"
                )
        if min(self.max_connection_buffer_bytes, self.max_request_buffer_bytes) < self.max_message_bytes + 5:
            raise ValueError(
                "max_connection_buffer_bytes and max_request_buffer_bytes must each hold one message "
                "of max_message_bytes (plus its 5-byte prefix)"
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


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_metadata(what: str, metadata: Mapping[str, str], limits: Limits) -> None:
    """InvalidArgument naming the limit when ``metadata`` (of ``what``) has too many entries or bytes."""
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidArgument(
            f"{what} metadata has {len(metadata)} entries, more than its limit max_metadata_entries="
            f"{limits.max_metadata_entries}"
        )
    size = sum(_utf8(key) + _utf8(value) for key, value in metadata.items())
    if size > limits.max_metadata_bytes:
        raise InvalidArgument(
            f"{what} metadata is {size} bytes, more than its limit max_metadata_bytes="
            f"{limits.max_metadata_bytes}"
        )


def check_source(source: str, limits: Limits) -> None:
    size = _utf8(source)
    if size > limits.max_source_bytes:
        raise InvalidArgument(
            f"source is {size} bytes, more than its limit max_source_bytes={limits.max_source_bytes}"
        )


def check_constraint_sizes(name: str, constraints: Constraints, limits: Limits) -> None:
    """InvalidArgument naming the limit when a variable's constraints are larger than the limits allow
    (checked before anything else about them: a huge list is refused without being looked at)."""
    allowed = constraints.allowed_values
    if len(allowed) > limits.max_allowed_values:
        raise InvalidArgument(
            f"variable {name!r}: {len(allowed)} allowed values, more than the limit max_allowed_values="
            f"{limits.max_allowed_values}"
        )
    if len(constraints.shape) > limits.max_tensor_dimensions:
        raise InvalidArgument(
            f"variable {name!r}: a shape of {len(constraints.shape)} dimensions, more than the limit "
            f"max_tensor_dimensions={limits.max_tensor_dimensions}"
        )
    size = sum(map(_utf8, allowed)) + _utf8(constraints.pattern)
    if size > limits.max_constraint_bytes:
        raise InvalidArgument(
            f"variable {name!r}: allowed values and pattern of {size} bytes, more than the limit "
            f"max_constraint_bytes={limits.max_constraint_bytes}"
        )

"""What every store keeps and hands out: immutable records of sessions, variables and their events.

Pure data, no I/O: the server, the stores, the watch engine and the client all share these.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._errors import InvalidArgument, NotFound
from .._types import Constraints, VariableType

DEFAULT_SESSION_TTL = 3600.0
#: The longest TTL a session may have (ten years): beyond it, expiry times stop being dates.
MAX_SESSION_TTL = 10 * 365 * 86_400.0
MAX_IDENTIFIER_LENGTH = 128
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
#: The rules above in words, for the messages that refuse a name.
_RULES = {
    SESSION_ID.pattern: "letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
    VARIABLE_NAME.pattern: "letters, digits, '_', '.' or '-', starting with a letter or '_'",
}
EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class VariableSnapshot:
    """One version of a variable, immutable: a later change makes a new snapshot."""

    id: str
    session_id: str
    name: str
    type: VariableType
    value: Any
    constraints: Constraints
    metadata: Mapping[str, str]
    version: int
    created_at: float
    last_updated_at: float
    last_update_source: str
    #: The store revision that made this version (0 until a store has applied it).
    revision: int = 0

    # Both below are what ``dataclasses.replace`` makes, built positionally: replace finds the fields
    # anew on every call and took twice as long, a quarter of a batch write's CPU (two per write).

    def changed_to(self, value: Any, *, at: float, source: str, revision: int = 0) -> VariableSnapshot:
        """The next version: ``value``, written at ``at`` (wall-clock seconds) by ``source``, at store
        revision ``revision`` (0: not known yet)."""
        return VariableSnapshot(
            self.id,
            self.session_id,
            self.name,
            self.type,
            value,
            self.constraints,
            self.metadata,
            self.version + 1,
            self.created_at,
            at,
            source,
            revision,
        )

    def at_revision(self, revision: int) -> VariableSnapshot:
        """This version, as made by the store revision ``revision``."""
        return VariableSnapshot(
            self.id,
            self.session_id,
            self.name,
            self.type,
            self.value,
            self.constraints,
            self.metadata,
            self.version,
            self.created_at,
            self.last_updated_at,
            self.last_update_source,
            revision,
        )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    created_at: float
    last_accessed_at: float
    ttl_seconds: float
    expires_at: float
    metadata: Mapping[str, str]
    variable_count: int
    #: Who created it (the token's name when the server checks tokens, else "").
    owner: str = ""


class EventKind(enum.Enum):
    REGISTERED = "registered"
    CHANGED = "changed"
    #: Changed, and the versions between the old and the new one cannot be had (etcd compacted them).
    RESYNCED = "resynced"
    DELETED = "deleted"
    SESSION_ENDED = "session_ended"


@dataclass(frozen=True, slots=True)
class VariableEvent:
    """What observers receive. ``variable`` is the new snapshot (the last one for DELETED, None for
    SESSION_ENDED); ``reason`` says why a session ended ("cleanup" or "expired")."""

    kind: EventKind
    session_id: str
    variable: VariableSnapshot | None
    old_value: Any = None
    source: str = ""
    metadata: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    timestamp: float = 0.0
    reason: str = ""
    #: How many earlier changes this one stands for (a slow watcher's coalesced queue); 0 normally.
    replaces: int = 0
    #: About how much memory it keeps alive (its new value, metadata, source), for watch queue budgets.
    size: int = 0
    #: The store revision of the change: one per write (a batch is one), rising, as etcd's are.
    revision: int = 0
    #: For a change, the revision of the version it replaced (so a history can tell whether it
    #: reaches back to a given revision).
    previous_revision: int = 0


@dataclass(frozen=True, slots=True)
class DeletedVariable:
    """A variable that no longer exists: its id, and the name it had (which a later variable may have
    taken). What a watch resumed from a revision reports as gone."""

    id: str
    name: str


class EncodedValue:
    """A written value as its client sent it, which only the variable's type can decode. A store
    decodes it (:meth:`decoded`) among the write's checks, once it has looked the variable up: a write
    then costs one look-up, not one to learn the type and another to apply it. The server subclasses
    it for its wire format (the stores import none)."""

    __slots__ = ()

    def decoded(self, name: str, vtype: VariableType) -> Any:
        """The native value for variable ``name`` of type ``vtype``; InvalidArgument if it is none."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class VariableWrite:
    """One write of a batch: ``identifier`` is a variable id or name; ``value`` a native value, or an
    :class:`EncodedValue` the store decodes."""

    identifier: str
    value: Any
    expected_version: int | None = None


def session_key(session_id: str) -> tuple[str, str]:
    """The observer key under which every event of a session is published."""
    return ("session", session_id)


def variable_key(variable_id: str) -> tuple[str, str]:
    """The observer key under which the events of one variable are published."""
    return ("variable", variable_id)


def frozen_metadata(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    """``mapping`` as a read-only copy; InvalidArgument unless it maps strings to strings."""
    if not mapping:
        return EMPTY
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"metadata must map strings to strings, got {key!r}: {value!r}")
    return MappingProxyType(dict(mapping))


def session_not_found(session_id: str) -> NotFound:
    """The error for a session that does not exist (or that the caller may not know of)."""
    return NotFound(f"session {session_id!r} not found (it may have expired)")


def check_identifier(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidArgument(
            f"{what} {value[:40]!r}... is {len(value)} characters; the limit is {MAX_IDENTIFIER_LENGTH}"
        )
    if pattern.fullmatch(value) is None:
        rule = _RULES.get(pattern.pattern, "")
        raise InvalidArgument(
            f"{what} {value!r} must match {pattern.pattern}" + (f" ({rule})" if rule else "")
        )

"""What every store checks before a write, against its cache: one place, so every store answers bad
input with the same status and message. Pure functions; nothing here changes the cache."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import AlreadyExists, InvalidArgument, ResourceExhausted, VersionConflict
from .._types import Constraints, VariableType, approximate_size, check_constraints, check_value
from .cache import CachedSession, SessionCache, change_size, fixed_size
from .records import (
    MAX_SESSION_TTL,
    SESSION_ID,
    VARIABLE_NAME,
    EncodedValue,
    VariableSnapshot,
    VariableWrite,
    check_identifier,
    frozen_metadata,
)

#: What the ids of variables look like (see ``new_variable``).
_VARIABLE_ID = re.compile(r"var_[0-9a-f]{32}")


@dataclass(frozen=True)
class SessionLimits:
    """What every store checks sessions against; ValueError for TTLs that make no sense."""

    default_ttl: float
    max_ttl: float
    max_sessions: int
    max_sessions_per_owner: int
    max_variables_per_session: int

    def __post_init__(self) -> None:
        if not 0 < self.max_ttl <= MAX_SESSION_TTL:
            raise ValueError(f"max_ttl must be a positive number of seconds up to {MAX_SESSION_TTL:.0f}")
        if not 0 < self.default_ttl <= self.max_ttl:
            raise ValueError(f"default_ttl must be a positive number of seconds up to {self.max_ttl:.0f}")


def checked_ttl(ttl: float | None, limits: SessionLimits) -> float:
    if ttl is None or ttl == 0:
        return limits.default_ttl
    if not 0 < ttl <= limits.max_ttl:
        raise InvalidArgument(
            f"ttl_seconds must be a positive number of seconds up to {limits.max_ttl:.0f} (the limit "
            f"max_session_ttl_seconds), got {ttl!r}"
        )
    return ttl


def check_new_session_id(session_id: str, cache: SessionCache) -> None:
    check_identifier("session_id", session_id, SESSION_ID)
    if session_id in cache.sessions:
        raise AlreadyExists(f"session {session_id!r} already exists")


def new_session_id() -> str:
    return uuid.uuid4().hex


def check_session_room(cache: SessionCache, owner: str, limits: SessionLimits) -> None:
    """ResourceExhausted naming the limit if no session more fits (in all, or for ``owner``)."""
    if len(cache.sessions) >= limits.max_sessions:
        raise ResourceExhausted.over_limit(
            f"the server holds {len(cache.sessions)} sessions, its limit max_sessions="
            f"{limits.max_sessions}; clean up sessions that are no longer needed",
            "max_sessions",
            limits.max_sessions,
        )
    held = cache.sessions_by_owner.get(owner, 0) if owner else 0
    if held >= limits.max_sessions_per_owner:
        raise ResourceExhausted.over_limit(
            f"token {owner!r} holds {held} sessions, its limit max_sessions_per_token="
            f"{limits.max_sessions_per_owner}; clean up sessions that are no longer needed",
            "max_sessions_per_token",
            limits.max_sessions_per_owner,
        )


def new_variable(
    cache: SessionCache,
    session: CachedSession,
    name: str,
    vtype: VariableType,
    value: Any,
    *,
    constraints: Constraints | None,
    metadata: Mapping[str, str] | None,
    source: str,
    limits: SessionLimits,
) -> VariableSnapshot:
    """The first version of a new variable, checked (name, room, type, constraints, value, memory)."""
    check_identifier("variable name", name, VARIABLE_NAME)
    if _VARIABLE_ID.fullmatch(name):
        # Identifiers are looked up as ids first: such a name could never be reached by name.
        raise InvalidArgument(
            f"variable name {name!r} has the form of a variable id ('var_' and 32 hex digits); choose another"
        )
    if name in session.ids_by_name:
        raise AlreadyExists(f"session {session.id!r} already has a variable named {name!r}")
    if len(session.ids_by_name) >= limits.max_variables_per_session:
        raise ResourceExhausted.over_limit(
            f"session {session.id!r} holds {len(session.ids_by_name)} variables, its limit "
            f"max_variables_per_session={limits.max_variables_per_session}",
            "max_variables_per_session",
            limits.max_variables_per_session,
        )
    try:
        vtype = VariableType(vtype)
    except ValueError:
        raise InvalidArgument(f"variable {name!r}: unknown type {vtype!r}") from None
    constraints = constraints or Constraints()
    check_constraints(name, vtype, constraints)
    value = check_value(name, vtype, constraints, value)
    now = cache.wall_clock()
    snapshot = VariableSnapshot(
        id=f"var_{uuid.uuid4().hex}",
        session_id=session.id,
        name=name,
        type=vtype,
        value=value,
        constraints=constraints,
        metadata=frozen_metadata(metadata),
        version=1,
        created_at=now,
        last_updated_at=now,
        last_update_source=source,
    )
    cache.make_room(session, fixed_size(snapshot) + approximate_size(value) + len(source))
    return snapshot


def looked_up(
    cache: SessionCache, session: CachedSession, writes: Sequence[VariableWrite]
) -> tuple[list[VariableSnapshot], list[Any]]:
    """A write's first checks, in the order a client fixes them: a batch is not empty, every name is
    known, then every encoded value decodes for its variable's type. Each write's variable as it is
    now, and its value, native."""
    if not writes:
        raise InvalidArgument("a batch needs at least one write")
    targets = cache.variables(session, [w.identifier for w in writes])
    values = [
        value.decoded(current.name, current.type) if isinstance(value := write.value, EncodedValue) else value
        for write, current in zip(writes, targets, strict=True)
    ]
    return targets, values


def staged_writes(
    cache: SessionCache,
    session: CachedSession,
    writes: Sequence[VariableWrite],
    *,
    source: str,
    metadata: Mapping[str, str],
    revision: int = 0,
    values: Sequence[Any] | None = None,
) -> list[tuple[VariableSnapshot, VariableSnapshot]]:
    """Each write as ``(current, updated)``, all checked (:func:`looked_up`'s checks, then duplicates,
    versions, values, memory) before any is applied; ``updated`` at store revision ``revision`` when
    the store knows it beforehand (0 if not). ``values``: what :func:`looked_up` gave, for a store that
    made those checks first (before checks of its own that may wait): the variables are looked up
    again now, and one replaced meanwhile by a variable of another type refuses the value."""
    if values is None:
        targets, values = looked_up(cache, session, writes)
    else:
        targets = cache.variables(session, [w.identifier for w in writes])
    seen: dict[str, str] = {}
    staged: list[tuple[VariableSnapshot, Any]] = []
    for write, current, value in zip(writes, targets, values, strict=True):
        if current.id in seen:
            raise InvalidArgument(
                f"variable {current.name!r} is written twice in one batch "
                f"(as {seen[current.id]!r} and {write.identifier!r})"
            )
        seen[current.id] = write.identifier
        if write.expected_version is not None and write.expected_version != current.version:
            raise VersionConflict(current.name, write.expected_version, current.version)
        staged.append((current, check_value(current.name, current.type, current.constraints, value)))
    # What the writes add: each new value (its version replaces the current one, which the history
    # keeps), and each change in the history.
    each_change = change_size(source, metadata)
    cache.make_room(
        session,
        sum(
            (approximate_size(value) - approximate_size(current.value))
            + (len(source) - len(current.last_update_source))
            + (approximate_size(value) + each_change)
            for current, value in staged
        ),
    )
    now = cache.wall_clock()
    return [
        (current, current.changed_to(value, at=now, source=source, revision=revision))
        for current, value in staged
    ]

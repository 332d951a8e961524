"""SessionStore: sessions of typed, versioned variables. Pure Trio, no gRPC.

Every method but :meth:`SessionStore.run_expiry` is synchronous: a call runs to completion without a
checkpoint, so each write is atomic with respect to every other task, and the events it publishes to
the :class:`~trio_bridge._observers.ObserverManager` leave in version order before the call returns.

History: each session keeps its last ``history_size`` accepted changes, so a watcher that reconnects
can be sent exactly what it missed (:meth:`SessionStore.changes_since`).

Time: idle expiry uses ``clock`` (Trio's clock by default, so tests drive it with ``MockClock``);
the timestamps a client sees use ``wall_clock``. A session's TTL counts from its last access: every
read or write of the session or its variables restarts it. An expired session is gone for every
caller at once, whether or not the background sweep has run yet.
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import trio

from ._errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, VersionConflict
from ._limits import DEFAULT_LIMITS
from ._observers import ObserverManager
from ._types import (
    Constraints,
    VariableType,
    approximate_mapping_size,
    approximate_size,
    check_constraints,
    check_value,
)

DEFAULT_SESSION_TTL = 3600.0
#: The longest TTL a session may have (ten years): beyond it, expiry times stop being dates.
MAX_SESSION_TTL = 10 * 365 * 86_400.0
DEFAULT_HISTORY_SIZE = DEFAULT_LIMITS.history_size
MAX_IDENTIFIER_LENGTH = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_EMPTY: Mapping[str, str] = MappingProxyType({})


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
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    timestamp: float = 0.0
    reason: str = ""
    #: How many earlier changes this one stands for (a slow watcher's coalesced queue); 0 normally.
    replaces: int = 0
    #: About how much memory it keeps alive (its new value, metadata, source), for watch queue budgets.
    size: int = 0


@dataclass(frozen=True, slots=True)
class VariableWrite:
    """One write of a batch: ``identifier`` is a variable id or name."""

    identifier: str
    value: Any
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class _Remembered:
    """A change in a session's history, with about how much memory it keeps alive."""

    event: VariableEvent
    size: int


#: About what a snapshot and a change cost beyond their values and strings (objects, dictionaries).
_SNAPSHOT_OVERHEAD = 512
_EVENT_OVERHEAD = 256


@dataclass(slots=True)
class _Session:
    id: str
    created_at: float
    metadata: Mapping[str, str]
    ttl: float
    last_access: float  # on `clock`
    last_accessed_at: float  # on `wall_clock`
    history: deque[_Remembered]
    owner: str = ""
    variables: dict[str, VariableSnapshot] = field(default_factory=dict)
    ids_by_name: dict[str, str] = field(default_factory=dict)
    #: Open watches of it: while there is one, it does not expire.
    watchers: int = 0
    #: About how much memory it keeps alive (its variables and its history), and its history alone.
    stored_bytes: int = 0
    history_bytes: int = 0
    #: Per variable, the size of what every version of it shares (name, constraints, metadata).
    fixed_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return math.inf if self.watchers else self.last_access + self.ttl


def _event_size(event: VariableEvent) -> int:
    return event.size


def session_key(session_id: str) -> tuple[str, str]:
    """The observer key under which every event of a session is published."""
    return ("session", session_id)


def variable_key(variable_id: str) -> tuple[str, str]:
    """The observer key under which the events of one variable are published."""
    return ("variable", variable_id)


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    if not mapping:
        return _EMPTY
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"metadata must map strings to strings, got {key!r}: {value!r}")
    return MappingProxyType(dict(mapping))


class SessionStore:
    """Sessions, their variables, and the events every change publishes to ``observers``."""

    def __init__(
        self,
        *,
        default_ttl: float = DEFAULT_SESSION_TTL,
        history_size: int = DEFAULT_HISTORY_SIZE,
        max_sessions: int = DEFAULT_LIMITS.max_sessions,
        max_variables_per_session: int = DEFAULT_LIMITS.max_variables_per_session,
        max_sessions_per_owner: int = DEFAULT_LIMITS.max_sessions_per_token,
        max_ttl: float = MAX_SESSION_TTL,
        max_session_bytes: int = DEFAULT_LIMITS.max_session_bytes,
        max_stored_bytes: int = DEFAULT_LIMITS.max_stored_bytes,
        max_history_bytes: int = DEFAULT_LIMITS.max_history_bytes,
        observers: ObserverManager[VariableEvent] | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < max_ttl <= MAX_SESSION_TTL:
            raise ValueError(f"max_ttl must be a positive number of seconds up to {MAX_SESSION_TTL:.0f}")
        if not 0 < default_ttl <= max_ttl:
            raise ValueError(f"default_ttl must be a positive number of seconds up to {max_ttl:.0f}")
        if history_size < 0:
            raise ValueError("history_size must not be negative")
        self.default_ttl = default_ttl
        self.history_size = history_size
        self.max_sessions = max_sessions
        self.max_variables_per_session = max_variables_per_session
        self.max_sessions_per_owner = max_sessions_per_owner
        self.max_ttl = max_ttl
        self.max_session_bytes = max_session_bytes
        self.max_stored_bytes = max_stored_bytes
        self.max_history_bytes = max_history_bytes
        self._stored_bytes = 0
        self._sessions_by_owner: dict[str, int] = {}  # named owners only
        #: Test hook in the manner of etcd's failpoints: when set, :meth:`checkpoint` calls it with the
        #: checkpoint's name ("watch.subscribed": a watch has subscribed and not yet read).
        self.checkpoint_hook: Callable[[str], None] | None = None
        self.observers: ObserverManager[VariableEvent] = (
            observers if observers is not None else ObserverManager(size_of=_event_size)
        )
        self._clock = clock
        self._wall_clock = wall_clock
        self._sessions: dict[str, _Session] = {}
        self._variable_count = 0
        self._sessions_changed = trio.Event()

    # ---- counts, for metrics -------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def variable_count(self) -> int:
        return self._variable_count

    @property
    def stored_bytes(self) -> int:
        """About how much memory the sessions keep alive (see ``max_stored_bytes``)."""
        return self._stored_bytes

    # ---- sessions ------------------------------------------------------------------------------

    def create_session(
        self,
        session_id: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        ttl: float | None = None,
        owner: str = "",
    ) -> SessionInfo:
        """Create a session; an empty ``session_id`` gets a fresh unique one. ``owner`` is kept with
        it for access checks (see :meth:`owner_of`)."""
        if ttl is None or ttl == 0:
            ttl = self.default_ttl
        if not 0 < ttl <= self.max_ttl:
            raise InvalidArgument(
                f"ttl_seconds must be a positive number of seconds up to {self.max_ttl:.0f} (the limit "
                f"max_session_ttl_seconds), got {ttl!r}"
            )
        if session_id:
            _check_identifier("session_id", session_id, _SESSION_ID)
            self._expire_if_due(session_id)
            if session_id in self._sessions:
                raise AlreadyExists(f"session {session_id!r} already exists")
        else:
            session_id = uuid.uuid4().hex
        if len(self._sessions) >= self.max_sessions:
            self.expire_due_sessions()
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted.over_limit(
                    f"the server holds {len(self._sessions)} sessions, its limit max_sessions="
                    f"{self.max_sessions}; clean up sessions that are no longer needed",
                    "max_sessions",
                    self.max_sessions,
                )
        if owner and self._sessions_by_owner.get(owner, 0) >= self.max_sessions_per_owner:
            self.expire_due_sessions()
            held = self._sessions_by_owner.get(owner, 0)
            if held >= self.max_sessions_per_owner:
                raise ResourceExhausted.over_limit(
                    f"token {owner!r} holds {held} sessions, its limit max_sessions_per_token="
                    f"{self.max_sessions_per_owner}; clean up sessions that are no longer needed",
                    "max_sessions_per_token",
                    self.max_sessions_per_owner,
                )
        now = self._wall_clock()
        session = _Session(
            id=session_id,
            created_at=now,
            metadata=_frozen(metadata),
            ttl=ttl,
            last_access=self._clock(),
            last_accessed_at=now,
            history=deque(),
            owner=owner,
        )
        self._sessions[session_id] = session
        if owner:
            self._sessions_by_owner[owner] = self._sessions_by_owner.get(owner, 0) + 1
        self._sessions_changed.set()
        return self._info(session)

    def owner_of(self, session_id: str) -> str | None:
        """The owner of a live session, or None if there is none by that id; not an access."""
        session = self._sessions.get(session_id)
        if session is None or session.deadline <= self._clock():
            return None
        return session.owner

    def get_session(self, session_id: str) -> SessionInfo:
        return self._info(self._session(session_id))

    def list_sessions(self) -> list[SessionInfo]:
        """Every live session, oldest first. Listing does not count as an access."""
        self.expire_due_sessions()
        return [self._info(s) for s in self._sessions.values()]

    def cleanup_session(self, session_id: str) -> int:
        """Remove the session and its variables; return how many variables went with it."""
        session = self._session(session_id)
        return self._end_session(session, reason="cleanup")

    def expire_due_sessions(self) -> list[str]:
        """Remove every session whose TTL has run out; return their ids."""
        now = self._clock()
        due = [s for s in self._sessions.values() if s.deadline <= now]
        for session in due:
            self._end_session(session, reason="expired")
        return [s.id for s in due]

    async def run_expiry(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove sessions as their TTL runs out, for as long as it runs. Cancel it to stop it; a
        cancellation leaves the store consistent (each removal is a synchronous step)."""
        task_status.started()
        while True:
            self.expire_due_sessions()
            next_deadline = min((s.deadline for s in self._sessions.values()), default=math.inf)
            self._sessions_changed = trio.Event()
            with trio.move_on_at(next_deadline):
                await self._sessions_changed.wait()

    # ---- variables -----------------------------------------------------------------------------

    def register_variable(
        self,
        session_id: str,
        name: str,
        vtype: VariableType,
        value: Any,
        *,
        constraints: Constraints | None = None,
        metadata: Mapping[str, str] | None = None,
        source: str = "",
    ) -> VariableSnapshot:
        session = self._session(session_id)
        _check_identifier("variable name", name, _VARIABLE_NAME)
        if name in session.ids_by_name:
            raise AlreadyExists(f"session {session_id!r} already has a variable named {name!r}")
        if len(session.ids_by_name) >= self.max_variables_per_session:
            raise ResourceExhausted.over_limit(
                f"session {session_id!r} holds {len(session.ids_by_name)} variables, its limit "
                f"max_variables_per_session={self.max_variables_per_session}",
                "max_variables_per_session",
                self.max_variables_per_session,
            )
        try:
            vtype = VariableType(vtype)
        except ValueError:
            raise InvalidArgument(f"variable {name!r}: unknown type {vtype!r}") from None
        constraints = constraints or Constraints()
        check_constraints(name, vtype, constraints)
        value = check_value(name, vtype, constraints, value)
        frozen_metadata = _frozen(metadata)
        fixed = (
            _SNAPSHOT_OVERHEAD
            + len(name)
            + approximate_mapping_size(frozen_metadata)
            + sum(64 + len(v) for v in constraints.allowed_values)
            + len(constraints.pattern)
            + 8 * len(constraints.shape)
        )
        size = fixed + approximate_size(value) + len(source)
        self._make_room(session, size)
        now = self._wall_clock()
        snapshot = VariableSnapshot(
            id=f"var_{uuid.uuid4().hex}",
            session_id=session_id,
            name=name,
            type=vtype,
            value=value,
            constraints=constraints,
            metadata=frozen_metadata,
            version=1,
            created_at=now,
            last_updated_at=now,
            last_update_source=source,
        )
        session.variables[snapshot.id] = snapshot
        session.ids_by_name[name] = snapshot.id
        session.fixed_sizes[snapshot.id] = fixed
        self._grow(session, size)
        self._variable_count += 1
        self.observers.publish(
            (session_key(session_id), variable_key(snapshot.id)),
            VariableEvent(
                EventKind.REGISTERED, session_id, snapshot, source=source, timestamp=now, size=size
            ),
        )
        return snapshot

    def get_variable(self, session_id: str, identifier: str) -> VariableSnapshot:
        session = self._session(session_id)
        return self._variable(session, identifier)

    def get_variables(self, session_id: str, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        """The named variables in the order given; NOT_FOUND names every unknown identifier."""
        session = self._session(session_id)
        return self._variables(session, identifiers)

    def list_variables(self, session_id: str) -> list[VariableSnapshot]:
        """Every variable of the session, in registration order."""
        return list(self._session(session_id).variables.values())

    def set_variable(
        self,
        session_id: str,
        identifier: str,
        value: Any,
        *,
        expected_version: int | None = None,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> VariableSnapshot:
        """Write one value; with ``expected_version``, only if the variable is at that version."""
        (result,) = self.set_variables(
            session_id,
            [VariableWrite(identifier, value, expected_version)],
            source=source,
            metadata=metadata,
        )
        return result

    def set_variables(
        self,
        session_id: str,
        writes: Sequence[VariableWrite],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[VariableSnapshot]:
        """Apply every write, or none: all are checked before the first is applied."""
        session = self._session(session_id)
        update_metadata = _frozen(metadata)
        if not writes:
            raise InvalidArgument("a batch needs at least one write")
        targets = self._variables(session, [w.identifier for w in writes])
        seen: dict[str, str] = {}
        staged: list[tuple[VariableSnapshot, Any]] = []
        for write, current in zip(writes, targets, strict=True):
            if current.id in seen:
                raise InvalidArgument(
                    f"variable {current.name!r} is written twice in one batch "
                    f"(as {seen[current.id]!r} and {write.identifier!r})"
                )
            seen[current.id] = write.identifier
            if write.expected_version is not None and write.expected_version != current.version:
                raise VersionConflict(current.name, write.expected_version, current.version)
            staged.append(
                (current, check_value(current.name, current.type, current.constraints, write.value))
            )
        # What the writes add: each new value (its version replaces the current one, which the history
        # keeps), and each change in the history.
        change_size = approximate_mapping_size(update_metadata) + len(source) + _EVENT_OVERHEAD
        added = sum(
            (approximate_size(value) - approximate_size(current.value))
            + (len(source) - len(current.last_update_source))
            + (approximate_size(value) + change_size)
            for current, value in staged
        )
        self._make_room(session, added)
        now = self._wall_clock()
        results = []
        for current, value in staged:
            updated = replace(
                current,
                value=value,
                version=current.version + 1,
                last_updated_at=now,
                last_update_source=source,
            )
            session.variables[updated.id] = updated
            results.append(updated)
        for (current, _), updated in zip(staged, results, strict=True):
            event = VariableEvent(
                EventKind.CHANGED,
                session_id,
                updated,
                old_value=current.value,
                source=source,
                metadata=update_metadata,
                timestamp=now,
                size=approximate_size(updated.value) + change_size,
            )
            self._remember(session, event, event.size)
            self._grow(session, approximate_size(updated.value) - approximate_size(current.value))
            self._grow(session, len(source) - len(current.last_update_source))
            self.observers.publish((session_key(session_id), variable_key(updated.id)), event)
        return results

    def delete_variable(self, session_id: str, identifier: str, *, source: str = "") -> None:
        session = self._session(session_id)
        snapshot = self._variable(session, identifier)
        del session.variables[snapshot.id]
        del session.ids_by_name[snapshot.name]
        fixed = session.fixed_sizes.pop(snapshot.id)
        self._grow(session, -(fixed + approximate_size(snapshot.value) + len(snapshot.last_update_source)))
        self._variable_count -= 1
        self.observers.publish(
            (session_key(session_id), variable_key(snapshot.id)),
            VariableEvent(
                EventKind.DELETED,
                session_id,
                snapshot,
                old_value=snapshot.value,
                source=source,
                timestamp=self._wall_clock(),
            ),
        )

    # ---- watch support ---------------------------------------------------------------------------

    def changes_since(self, session_id: str, variable_id: str, version: int) -> list[VariableEvent] | None:
        """Every change of the variable after ``version``, oldest first, or None when the history no
        longer reaches back that far (or ``version`` is not one this variable has had)."""
        session = self._session(session_id)
        current = session.variables[variable_id].version
        if version == current:
            return []
        if not 0 < version < current:
            return None
        # Newest first, so the cost is the changes made since ``version``, not the whole history.
        missed: list[VariableEvent] = []
        for remembered in reversed(session.history):
            event = remembered.event
            variable = event.variable
            if variable is None or variable.id != variable_id:
                continue
            if variable.version <= version:
                break
            missed.append(event)
            if variable.version == version + 1:
                missed.reverse()
                return missed
        return None

    def touch_session(self, session_id: str) -> None:
        """Count as an access to the session (its TTL restarts); NotFound if it is gone."""
        self._session(session_id)

    @contextlib.contextmanager
    def keep_alive(self, session_id: str) -> Iterator[None]:
        """Hold the session alive for the block (an open watch does, whatever its heartbeat interval):
        it does not expire meanwhile, and its TTL counts from the end of the block (or from the last
        access after it). Cleanup still ends it. NotFound if it is gone."""
        session = self._session(session_id)
        session.watchers += 1
        try:
            yield
        finally:
            session.watchers -= 1
            if not session.watchers:
                session.last_access = self._clock()
                self._sessions_changed.set()  # the expiry task learns its new deadline

    def checkpoint(self, name: str) -> None:
        """A named point where a test may step in (see ``checkpoint_hook``); nothing happens otherwise."""
        if self.checkpoint_hook is not None:
            self.checkpoint_hook(name)

    # ---- internals -----------------------------------------------------------------------------

    def _session(self, session_id: str) -> _Session:
        """The live session, touched (its TTL restarts); NotFound if unknown or expired."""
        session = self._sessions.get(session_id)
        if session is None:
            _check_identifier("session_id", session_id, _SESSION_ID)  # malformed: INVALID_ARGUMENT
        self._expire_if_due(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            raise session_not_found(session_id)
        session.last_access = self._clock()
        session.last_accessed_at = self._wall_clock()
        return session

    def _expire_if_due(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None and session.deadline <= self._clock():
            self._end_session(session, reason="expired")

    def _end_session(self, session: _Session, *, reason: str) -> int:
        del self._sessions[session.id]
        self._stored_bytes -= session.stored_bytes
        if session.owner:
            left = self._sessions_by_owner.pop(session.owner) - 1
            if left:
                self._sessions_by_owner[session.owner] = left
        removed = len(session.variables)
        self._variable_count -= removed
        keys = [session_key(session.id), *(variable_key(v) for v in session.variables)]
        self.observers.publish(
            keys,
            VariableEvent(
                EventKind.SESSION_ENDED,
                session.id,
                None,
                timestamp=self._wall_clock(),
                reason=reason,
            ),
        )
        return removed

    def _grow(self, session: _Session, size: int) -> None:
        session.stored_bytes += size
        self._stored_bytes += size

    def _remember(self, session: _Session, event: VariableEvent, size: int) -> None:
        """Add a change to the session's history, which keeps at most ``history_size`` changes and
        ``max_history_bytes``: the oldest go first."""
        session.history.append(_Remembered(event, size))
        session.history_bytes += size
        self._grow(session, size)
        while session.history and (
            len(session.history) > self.history_size or session.history_bytes > self.max_history_bytes
        ):
            self._forget_oldest(session)

    def _forget_oldest(self, session: _Session) -> None:
        oldest = session.history.popleft()
        session.history_bytes -= oldest.size
        self._grow(session, -oldest.size)

    def _make_room(self, session: _Session, size: int) -> None:
        """Make room for ``size`` more bytes in the session's budget and the server's, forgetting the
        session's oldest changes if that is enough; else ResourceExhausted naming the budget, with
        nothing changed."""
        for held, limit, name, whose in (
            (session.stored_bytes, self.max_session_bytes, "max_session_bytes", f"session {session.id!r}"),
            (self._stored_bytes, self.max_stored_bytes, "max_stored_bytes", "the server"),
        ):
            if held - session.history_bytes + size > limit:
                raise ResourceExhausted.over_limit(
                    f"{whose} would hold about {held + size} bytes of variables and history, more than "
                    f"its limit {name}={limit}; delete variables or sessions, or write smaller values",
                    name,
                    limit,
                )
        while session.history and (
            session.stored_bytes + size > self.max_session_bytes
            or self._stored_bytes + size > self.max_stored_bytes
        ):
            self._forget_oldest(session)

    def _variable(self, session: _Session, identifier: str) -> VariableSnapshot:
        return self._variables(session, [identifier])[0]

    def _variables(self, session: _Session, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        found: list[VariableSnapshot] = []
        missing: list[str] = []
        for identifier in identifiers:
            if not identifier:
                raise InvalidArgument("variable identifier is required (an id or a name)")
            snapshot = session.variables.get(identifier)
            if snapshot is None:
                variable_id = session.ids_by_name.get(identifier)
                snapshot = session.variables.get(variable_id) if variable_id else None
            if snapshot is None:
                missing.append(identifier)
            else:
                found.append(snapshot)
        if missing:
            names = ", ".join(repr(m) for m in missing)
            noun = "variable" if len(missing) == 1 else "variables"
            raise NotFound(f"session {session.id!r} has no {noun} {names}")
        return found

    def _info(self, session: _Session) -> SessionInfo:
        # A session held alive by a watch would expire one TTL after the hold ends, at the earliest.
        remaining = session.ttl if session.watchers else max(0.0, session.deadline - self._clock())
        return SessionInfo(
            session_id=session.id,
            created_at=session.created_at,
            last_accessed_at=session.last_accessed_at,
            ttl_seconds=session.ttl,
            expires_at=self._wall_clock() + remaining,
            metadata=session.metadata,
            variable_count=len(session.variables),
            owner=session.owner,
        )


def session_not_found(session_id: str) -> NotFound:
    """The error for a session that does not exist (or that the caller may not know of)."""
    return NotFound(f"session {session_id!r} not found (it may have expired)")


def _check_identifier(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidArgument(
            f"{what} {value[:40]!r}... is {len(value)} characters; the limit is {MAX_IDENTIFIER_LENGTH}"
        )
    if pattern.fullmatch(value) is None:
        raise InvalidArgument(f"{what} {value!r} must match {pattern.pattern!r}")

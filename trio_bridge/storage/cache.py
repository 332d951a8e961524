"""SessionCache: the sessions and variables a server holds in memory, and the events they publish.

Every store keeps one. The in-memory store's cache *is* its state; the etcd store's cache is a replica of
etcd's state, fed in revision order by one etcd watch. Watch streams subscribe to ``observers`` and then
read from the cache (:mod:`trio_bridge._watch`), whichever store it belongs to.

Everything here is synchronous: a call runs to completion without a checkpoint, so each change is
atomic with respect to every other task, and the events it publishes leave in order before it returns.
The cache checks nothing a write must satisfy (types, limits, versions): its store does that first,
and the ``apply_*`` methods record what was decided. They never block: an observer whose queue is full
is overflowed, never waited for.

History: each session keeps its last ``history_size`` accepted changes (at most ``max_history_bytes``
of them), so a watcher that reconnects can be sent exactly what it missed (:meth:`changes_since`,
:meth:`changes_after_revision`). What it keeps are the events its observers were sent, so a replayed
change is the live one, field for field (new and old value, source, update metadata, time, revision);
so is a replayed registration, kept apart for as long as the variable is at its first version.
Deletions count as changes too (kept without the value), so that a watcher resuming from a revision can
be told which of the variables it held are gone (:meth:`deleted_after_revision`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import trio

from .._errors import InvalidArgument, NotFound, ResourceExhausted
from .._limits import DEFAULT_LIMITS
from .._observers import ObserverManager
from .._types import approximate_mapping_size, approximate_size
from .records import (
    EMPTY,
    SESSION_ID,
    DeletedVariable,
    EventKind,
    SessionInfo,
    VariableEvent,
    VariableSnapshot,
    check_identifier,
    session_key,
    session_not_found,
    variable_key,
)

#: About what a snapshot and a change cost beyond their values and strings (objects, dictionaries).
SNAPSHOT_OVERHEAD = 512
EVENT_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class _Remembered:
    """A change in a session's history, with about how much memory it keeps alive; for a deletion,
    the revision the variable had been registered at."""

    event: VariableEvent
    size: int
    created_revision: int = 0


@dataclass(slots=True)
class CachedSession:
    id: str
    created_at: float
    metadata: Mapping[str, str]
    ttl: float
    last_access: float  # on the cache's `clock`
    last_accessed_at: float  # on `wall_clock`
    owner: str = ""
    history: deque[_Remembered] = field(default_factory=deque)
    #: The history holds every change of the session made after this revision: the session was
    #: created (or loaded) at it, or the history has forgotten the changes up to it since.
    history_complete_after: int = 0
    variables: dict[str, VariableSnapshot] = field(default_factory=dict)
    ids_by_name: dict[str, str] = field(default_factory=dict)
    #: Open watches of it: while there is one, it does not expire.
    watchers: int = 0
    #: About how much memory it keeps alive (its variables and its history), and its history alone.
    stored_bytes: int = 0
    history_bytes: int = 0
    #: Per variable, the size of what every version of it shares (name, constraints, metadata).
    fixed_sizes: dict[str, int] = field(default_factory=dict)
    #: Per variable, the revision it was registered at.
    created_revisions: dict[str, int] = field(default_factory=dict)
    #: Per variable still at the version it was registered with, the event that registered it (its
    #: snapshot is the one in ``variables``): what a resume from a revision before it replays.
    registrations: dict[str, VariableEvent] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        """When it expires unless accessed again (on the cache's clock); never while watched."""
        return math.inf if self.watchers else self.last_access + self.ttl


def fixed_size(snapshot: VariableSnapshot) -> int:
    """About what every version of a variable shares (name, constraints, metadata)."""
    constraints = snapshot.constraints
    return (
        SNAPSHOT_OVERHEAD
        + len(snapshot.name)
        + approximate_mapping_size(snapshot.metadata)
        + sum(64 + len(v) for v in constraints.allowed_values)
        + len(constraints.pattern)
        + 8 * len(constraints.shape)
    )


def change_size(source: str, metadata: Mapping[str, str]) -> int:
    """About what one change costs beyond its new value."""
    return approximate_mapping_size(metadata) + len(source) + EVENT_OVERHEAD


class SessionCache:
    """Sessions, their variables, their recent history, and the observers of their events."""

    def __init__(
        self,
        *,
        history_size: int = DEFAULT_LIMITS.history_size,
        max_session_bytes: int = DEFAULT_LIMITS.max_session_bytes,
        max_stored_bytes: int = DEFAULT_LIMITS.max_stored_bytes,
        max_history_bytes: int = DEFAULT_LIMITS.max_history_bytes,
        observers: ObserverManager[VariableEvent] | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if history_size < 0:
            raise ValueError("history_size must not be negative")
        self.history_size = history_size
        self.max_session_bytes = max_session_bytes
        self.max_stored_bytes = max_stored_bytes
        self.max_history_bytes = max_history_bytes
        self.observers: ObserverManager[VariableEvent] = (
            observers if observers is not None else ObserverManager(size_of=_event_size)
        )
        self.clock = clock
        self.wall_clock = wall_clock
        #: Test hook in the manner of etcd's failpoints: when set, :meth:`checkpoint` awaits it with the
        #: checkpoint's name ("watch.subscribed": a watch has subscribed and not yet read).
        self.checkpoint_hook: Callable[[str], Awaitable[None]] | None = None
        self.sessions: dict[str, CachedSession] = {}
        self.sessions_by_owner: dict[str, int] = {}  # named owners only
        #: Set when a session's deadline may have moved (a watch took or let go of it); replaced by
        #: its waiter (the store's expiry or lease keeper).
        self.deadlines_changed = trio.Event()
        self._variable_count = 0
        self._stored_bytes = 0
        #: The revision of the last change applied (see :meth:`begin`).
        self.revision = 0

    # ---- counts, for metrics -------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    @property
    def variable_count(self) -> int:
        return self._variable_count

    @property
    def stored_bytes(self) -> int:
        """About how much memory the sessions keep alive (see ``max_stored_bytes``)."""
        return self._stored_bytes

    # ---- reads (no access is counted: stores touch sessions themselves) --------------------------

    def session(self, session_id: str) -> CachedSession:
        """The session; NotFound if there is none by that id (InvalidArgument if the id is malformed)."""
        session = self.sessions.get(session_id)
        if session is None:
            check_identifier("session_id", session_id, SESSION_ID)
            raise session_not_found(session_id)
        return session

    def variables(self, session: CachedSession, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        """The named variables (ids or names) in the order given; NotFound names every unknown one."""
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

    def get_variables(self, session_id: str, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        return self.variables(self.session(session_id), identifiers)

    def list_variables(self, session_id: str) -> list[VariableSnapshot]:
        """Every variable of the session, in registration order."""
        return list(self.session(session_id).variables.values())

    def info(self, session: CachedSession) -> SessionInfo:
        # A session held alive by a watch would expire one TTL after the hold ends, at the earliest.
        remaining = session.ttl if session.watchers else max(0.0, session.deadline - self.clock())
        return SessionInfo(
            session_id=session.id,
            created_at=session.created_at,
            last_accessed_at=session.last_accessed_at,
            ttl_seconds=session.ttl,
            expires_at=self.wall_clock() + remaining,
            metadata=session.metadata,
            variable_count=len(session.variables),
            owner=session.owner,
        )

    def changes_since(self, session_id: str, variable_id: str, version: int) -> list[VariableEvent] | None:
        """Every change of the variable after ``version``, oldest first, or None when the history no
        longer reaches back that far (or ``version`` is not one this variable has had).

        The events are those the observers were sent (the same objects), so each replays as the live
        update did. On None the watch sends the current value instead, as one ``resync`` update (source
        "resync", the time of the resume, metadata naming the ``resume_version``): the changes it
        stands for, and their sources, times and update metadata, can no longer be had."""
        session = self.session(session_id)
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

    def deleted_after_revision(self, session_id: str, revision: int) -> list[DeletedVariable] | None:
        """The variables of the session that existed at ``revision`` and have been deleted since,
        oldest deletion first; None when the history cannot tell (it no longer holds every change made
        after ``revision``, or ``revision`` comes before the session was created or loaded here).

        A variable registered after ``revision`` is not one of them, deleted or not: a client that
        held the session as of ``revision`` never held it."""
        session = self.session(session_id)
        if revision < session.history_complete_after:
            return None
        deleted: list[DeletedVariable] = []
        for remembered in reversed(session.history):  # newest first: the cost is what came since
            event = remembered.event
            if event.revision <= revision:
                break
            if event.kind is EventKind.DELETED and remembered.created_revision <= revision:
                assert event.variable is not None
                deleted.append(DeletedVariable(event.variable.id, event.variable.name))
        deleted.reverse()
        return deleted

    def history_gap(self, revision: int) -> None:
        """Changes up to ``revision`` may have gone unseen (the etcd feed loaded the state again after
        a compaction): no session's history answers for a revision before it any more."""
        for session in self.sessions.values():
            session.history_complete_after = max(session.history_complete_after, revision)

    def changes_after_revision(
        self, session_id: str, variable_id: str, revision: int
    ) -> list[VariableEvent] | None:
        """Every change of the variable made at a revision after ``revision``, oldest first (its
        registration too, if that came after), or None when the history cannot tell them all.

        The events are those the observers were sent (the same objects), the registration included, so
        each replays as the live update did: its source, time and metadata, and a change's old value.
        A registration is kept only while the variable is at its first version: for one registered and
        changed since, the answer is None (the etcd store then reads its versions from etcd's history),
        and the watch sends its current value as one ``resync`` update (source "resync", the time of
        the resume, metadata naming the ``resume_revision``)."""
        session = self.session(session_id)
        current = session.variables[variable_id]
        if current.revision <= revision:
            return []
        if session.created_revisions.get(variable_id, 0) > revision:  # registered since
            registration = session.registrations.get(variable_id)
            return [registration] if registration is not None else None
        missed: list[VariableEvent] = []
        for remembered in reversed(session.history):  # newest first: the cost is what was missed
            event = remembered.event
            variable = event.variable
            if variable is None or variable.id != variable_id:
                continue
            if event.revision <= revision:  # older than what was missed: none is missing
                break
            missed.append(event)
            if event.previous_revision <= revision:  # it replaced the version held at ``revision``
                break
        else:
            return None  # the history ends before it reaches back to ``revision``
        missed.reverse()
        return missed

    @contextlib.contextmanager
    def keep_alive(self, session_id: str) -> Iterator[None]:
        """Hold the session alive for the block (an open watch does, whatever its heartbeat interval):
        it does not expire meanwhile, and its TTL counts from the end of the block (or from the last
        access after it). Cleanup still ends it. NotFound if it is gone."""
        session = self.session(session_id)
        session.watchers += 1
        if session.watchers == 1:
            self.deadlines_changed.set()  # a lease keeper learns it is watched
        try:
            yield
        finally:
            session.watchers -= 1
            if not session.watchers:
                session.last_access = self.clock()
                self.deadlines_changed.set()  # an expiry task learns the new deadline

    async def checkpoint(self, name: str) -> None:
        """A named point where a test may step in (see ``checkpoint_hook``); without a hook, nothing
        happens (not even a checkpoint: it never suspends)."""
        if self.checkpoint_hook is not None:
            await self.checkpoint_hook(name)

    def touch(self, session: CachedSession) -> None:
        """Count an access: the session's TTL restarts."""
        session.last_access = self.clock()
        session.last_accessed_at = self.wall_clock()

    # ---- changes ---------------------------------------------------------------------------------

    def begin(self, revision: int | None = None) -> int:
        """Start applying the changes of revision ``revision`` (etcd's), or of the next one (the
        in-memory store counts its own): every event published until the next call carries it."""
        self.revision = self.revision + 1 if revision is None else revision
        return self.revision

    def apply_new_session(self, session: CachedSession) -> None:
        """Add a session; its history answers for every revision from this one on."""
        session.history_complete_after = self.revision
        self.sessions[session.id] = session
        if session.owner:
            self.sessions_by_owner[session.owner] = self.sessions_by_owner.get(session.owner, 0) + 1
        self.deadlines_changed.set()

    def apply_registered(
        self,
        session: CachedSession,
        snapshot: VariableSnapshot,
        *,
        timestamp: float,
        created_revision: int | None = None,
        revision: int | None = None,
    ) -> VariableSnapshot:
        """Add a variable and publish its registration (at this revision); return it as kept. It was
        registered at ``created_revision`` and its version made at ``revision``: both this revision
        unless given (a variable the etcd feed loads was registered, and last changed, before)."""
        snapshot = replace(snapshot, revision=self.revision if revision is None else revision)
        fixed = fixed_size(snapshot)
        size = fixed + approximate_size(snapshot.value) + len(snapshot.last_update_source)
        session.variables[snapshot.id] = snapshot
        session.ids_by_name[snapshot.name] = snapshot.id
        session.fixed_sizes[snapshot.id] = fixed
        session.created_revisions[snapshot.id] = (
            self.revision if created_revision is None else created_revision
        )
        self._grow(session, size)
        self._variable_count += 1
        event = VariableEvent(
            EventKind.REGISTERED,
            session.id,
            snapshot,
            source=snapshot.last_update_source,
            timestamp=timestamp,
            size=size,
            revision=self.revision,
        )
        if snapshot.version == 1:  # not a variable first seen at a later version (an etcd reload)
            session.registrations[snapshot.id] = event
        self.observers.publish((session_key(session.id), variable_key(snapshot.id)), event)
        return snapshot

    def apply_changed(
        self,
        session: CachedSession,
        changes: Sequence[tuple[VariableSnapshot, VariableSnapshot]],
        *,
        source: str,
        metadata: Mapping[str, str],
        timestamp: float,
        kind: EventKind = EventKind.CHANGED,
    ) -> list[VariableSnapshot]:
        """Record the ``(current, updated)`` pairs of one write, in order, and publish each change (as
        ``kind``: RESYNCED when the versions between cannot be had); return the new versions as kept
        (at this revision)."""
        each_change = change_size(source, metadata)
        revision = self.revision
        changes = [
            (current, updated if updated.revision == revision else updated.at_revision(revision))
            for current, updated in changes
        ]
        for _, updated in changes:
            session.variables[updated.id] = updated
            session.registrations.pop(updated.id, None)  # its first version is gone
        for current, updated in changes:
            event = VariableEvent(
                kind,
                session.id,
                updated,
                old_value=current.value,
                source=source,
                metadata=metadata,
                timestamp=timestamp,
                size=approximate_size(updated.value) + each_change,
                revision=self.revision,
                previous_revision=current.revision,
            )
            self._remember(session, event, event.size)
            self._grow(session, approximate_size(updated.value) - approximate_size(current.value))
            self._grow(session, len(updated.last_update_source) - len(current.last_update_source))
            self.observers.publish((session_key(session.id), variable_key(updated.id)), event)
        return [updated for _, updated in changes]

    def apply_deleted(
        self, session: CachedSession, snapshot: VariableSnapshot, *, source: str, timestamp: float
    ) -> None:
        """Remove a variable and publish its deletion. The history keeps the deletion (its id, name
        and revision, not its value) for :meth:`deleted_after_revision`."""
        del session.variables[snapshot.id]
        del session.ids_by_name[snapshot.name]
        fixed = session.fixed_sizes.pop(snapshot.id)
        created_revision = session.created_revisions.pop(snapshot.id, 0)
        session.registrations.pop(snapshot.id, None)
        self._grow(session, -(fixed + approximate_size(snapshot.value) + len(snapshot.last_update_source)))
        self._variable_count -= 1
        event = VariableEvent(
            EventKind.DELETED,
            session.id,
            snapshot,
            old_value=snapshot.value,
            source=source,
            timestamp=timestamp,
            revision=self.revision,
        )
        # What the history keeps of it: less than the variable freed (its value, its fixed part).
        kept = replace(event, variable=replace(snapshot, value=None, metadata=EMPTY), old_value=None)
        size = EVENT_OVERHEAD + len(snapshot.id) + len(snapshot.name)
        self._remember(session, kept, size, created_revision=created_revision)
        self.observers.publish((session_key(session.id), variable_key(snapshot.id)), event)

    def apply_session_ended(self, session: CachedSession, *, reason: str) -> int:
        """Remove the session and its variables ("cleanup" or "expired"); return how many went."""
        del self.sessions[session.id]
        self._stored_bytes -= session.stored_bytes
        if session.owner:
            left = self.sessions_by_owner.pop(session.owner) - 1
            if left:
                self.sessions_by_owner[session.owner] = left
        removed = len(session.variables)
        self._variable_count -= removed
        keys = [session_key(session.id), *(variable_key(v) for v in session.variables)]
        self.observers.publish(
            keys,
            VariableEvent(
                EventKind.SESSION_ENDED,
                session.id,
                None,
                timestamp=self.wall_clock(),
                reason=reason,
                revision=self.revision,
            ),
        )
        return removed

    # ---- memory budgets --------------------------------------------------------------------------

    def make_room(self, session: CachedSession, size: int) -> None:
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

    def _grow(self, session: CachedSession, size: int) -> None:
        session.stored_bytes += size
        self._stored_bytes += size

    def _remember(
        self, session: CachedSession, event: VariableEvent, size: int, *, created_revision: int = 0
    ) -> None:
        """Add a change to the session's history, which keeps at most ``history_size`` changes and
        ``max_history_bytes``: the oldest go first."""
        session.history.append(_Remembered(event, size, created_revision))
        session.history_bytes += size
        self._grow(session, size)
        while session.history and (
            len(session.history) > self.history_size or session.history_bytes > self.max_history_bytes
        ):
            self._forget_oldest(session)

    def _forget_oldest(self, session: CachedSession) -> None:
        """Drop the oldest change: the history no longer answers for the revisions up to it."""
        oldest = session.history.popleft()
        session.history_bytes -= oldest.size
        session.history_complete_after = max(session.history_complete_after, oldest.event.revision)
        self._grow(session, -oldest.size)


def _event_size(event: VariableEvent) -> int:
    return event.size


def new_session(
    cache: SessionCache,
    session_id: str,
    *,
    metadata: Mapping[str, str],
    ttl: float,
    owner: str,
    created_at: float | None = None,
) -> CachedSession:
    """A session record as the cache keeps it, last accessed now."""
    now = cache.wall_clock()
    return CachedSession(
        id=session_id,
        created_at=now if created_at is None else created_at,
        metadata=metadata,
        ttl=ttl,
        last_access=cache.clock(),
        last_accessed_at=now,
        owner=owner,
    )

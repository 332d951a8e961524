"""MemoryStore: every session in this process's memory. The default store: no dependency, fastest.

Its :class:`~trio_bridge.storage.cache.SessionCache` is its whole state. No method awaits anything
before it has finished its change (the coroutines never suspend), so each call is atomic and a
cancelled call has either done nothing or everything. Nothing survives the process.

Time: idle expiry uses ``clock`` (Trio's clock by default, so tests drive it with ``MockClock``); the
timestamps a client sees use ``wall_clock``. A session's TTL counts from its last access. An expired
session is gone for every caller at once, whether or not :meth:`MemoryStore.run` has swept it yet.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .._errors import ResourceExhausted
from .._limits import DEFAULT_LIMITS
from .._observers import ObserverManager
from .._types import Constraints, VariableType
from . import checks
from .cache import CachedSession, SessionCache, new_session
from .interface import SingleVariableCalls, Store
from .records import (
    DEFAULT_SESSION_TTL,
    MAX_SESSION_TTL,
    DeletedVariable,
    SessionInfo,
    VariableEvent,
    VariableSnapshot,
    VariableWrite,
    frozen_metadata,
)


class MemoryStore(SingleVariableCalls):
    """Sessions, their variables, and the events every change publishes to ``cache.observers``."""

    never_suspends = True

    def __init__(
        self,
        *,
        default_ttl: float = DEFAULT_SESSION_TTL,
        history_size: int = DEFAULT_LIMITS.history_size,
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
        self.state_id = f"memory:{uuid.uuid4().hex}"
        self.limits = checks.SessionLimits(
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            max_sessions=max_sessions,
            max_sessions_per_owner=max_sessions_per_owner,
            max_variables_per_session=max_variables_per_session,
        )
        self._cache = SessionCache(
            history_size=history_size,
            max_session_bytes=max_session_bytes,
            max_stored_bytes=max_stored_bytes,
            max_history_bytes=max_history_bytes,
            observers=observers,
            clock=clock,
            wall_clock=wall_clock,
        )

    @property
    def cache(self) -> SessionCache:
        return self._cache

    @property
    def available(self) -> bool:
        return True

    async def availability_changed(self) -> None:
        await trio.sleep_forever()

    def register_metrics(self, registry: object) -> None:
        pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove sessions as their TTL runs out, for as long as it runs. Cancel it to stop it; a
        cancellation leaves the store consistent (each removal is a synchronous step)."""
        cache = self._cache
        task_status.started()
        while True:
            self.expire_due_sessions()
            next_deadline = min((s.deadline for s in cache.sessions.values()), default=math.inf)
            cache.deadlines_changed = trio.Event()
            with trio.move_on_at(next_deadline):
                await cache.deadlines_changed.wait()

    def expire_due_sessions(self) -> list[str]:
        """Remove every session whose TTL has run out; return their ids."""
        now = self._cache.clock()
        due = [s for s in self._cache.sessions.values() if s.deadline <= now]
        for session in due:
            self._cache.begin()
            self._cache.apply_session_ended(session, reason="expired")
        return [s.id for s in due]

    # ---- sessions ------------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        ttl: float | None = None,
        owner: str = "",
    ) -> SessionInfo:
        cache = self._cache
        ttl = checks.checked_ttl(ttl, self.limits)
        if session_id:
            self._expire_if_due(session_id)
            checks.check_new_session_id(session_id, cache)
        else:
            session_id = checks.new_session_id()
        try:
            checks.check_session_room(cache, owner, self.limits)
        except ResourceExhausted:
            self.expire_due_sessions()  # room made by sessions that expired unswept counts
            checks.check_session_room(cache, owner, self.limits)
        session = new_session(cache, session_id, metadata=frozen_metadata(metadata), ttl=ttl, owner=owner)
        cache.begin()
        cache.apply_new_session(session)
        return cache.info(session)

    async def owner_of(self, session_id: str) -> str | None:
        session = self._cache.sessions.get(session_id)
        if session is None or session.deadline <= self._cache.clock():
            return None
        return session.owner

    async def get_session(self, session_id: str) -> SessionInfo:
        return self._cache.info(self._session(session_id))

    async def touch_session(self, session_id: str) -> None:
        self._session(session_id)

    async def list_sessions(self) -> list[SessionInfo]:
        self.expire_due_sessions()
        return [self._cache.info(s) for s in self._cache.sessions.values()]

    async def cleanup_session(self, session_id: str) -> int:
        session = self._session(session_id)
        self._cache.begin()
        return self._cache.apply_session_ended(session, reason="cleanup")

    # ---- variables -----------------------------------------------------------------------------

    async def register_variable(
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
        snapshot = checks.new_variable(
            self._cache,
            session,
            name,
            vtype,
            value,
            constraints=constraints,
            metadata=metadata,
            source=source,
            limits=self.limits,
        )
        self._cache.begin()
        return self._cache.apply_registered(session, snapshot, timestamp=snapshot.created_at)

    async def get_variables(self, session_id: str, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        return self._cache.variables(self._session(session_id), identifiers)

    async def list_variables(self, session_id: str) -> list[VariableSnapshot]:
        return list(self._session(session_id).variables.values())

    async def set_variables(
        self,
        session_id: str,
        writes: Sequence[VariableWrite],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[VariableSnapshot]:
        session = self._session(session_id)
        update_metadata = frozen_metadata(metadata)
        revision = self._cache.revision + 1  # what begin() makes it
        changes = checks.staged_writes(
            self._cache, session, writes, source=source, metadata=update_metadata, revision=revision
        )
        timestamp = changes[0][1].last_updated_at
        self._cache.begin()
        return self._cache.apply_changed(
            session, changes, source=source, metadata=update_metadata, timestamp=timestamp
        )

    async def delete_variable(self, session_id: str, identifier: str, *, source: str = "") -> None:
        session = self._session(session_id)
        (snapshot,) = self._cache.variables(session, [identifier])
        self._cache.begin()
        self._cache.apply_deleted(session, snapshot, source=source, timestamp=self._cache.wall_clock())

    # ---- watch support ---------------------------------------------------------------------------

    async def changes_since(
        self, session_id: str, variable_id: str, version: int, *, up_to: int
    ) -> list[VariableEvent] | None:
        """From this process's history (``up_to`` is always the current version here)."""
        return self._cache.changes_since(session_id, variable_id, version)

    async def changes_after_revision(
        self, session_id: str, variable_id: str, revision: int, *, up_to: int
    ) -> list[VariableEvent] | None:
        """From this process's history (``up_to`` is always the current version here)."""
        return self._cache.changes_after_revision(session_id, variable_id, revision)

    async def deleted_after_revision(self, session_id: str, revision: int) -> list[DeletedVariable] | None:
        """From this process's history: None once it has forgotten deletions after ``revision``."""
        return self._cache.deleted_after_revision(session_id, revision)

    # ---- internals -----------------------------------------------------------------------------

    def _session(self, session_id: str) -> CachedSession:
        """The live session, touched (its TTL restarts); NotFound if unknown or expired."""
        self._expire_if_due(session_id)
        session = self._cache.session(session_id)
        self._cache.touch(session)
        return session

    def _expire_if_due(self, session_id: str) -> None:
        session = self._cache.sessions.get(session_id)
        if session is not None and session.deadline <= self._cache.clock():
            self._cache.begin()
            self._cache.apply_session_ended(session, reason="expired")


if TYPE_CHECKING:  # mypy checks that MemoryStore keeps the contract
    _IS_A_STORE: Store = MemoryStore()

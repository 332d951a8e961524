"""The store interface: what the gRPC service and the watch engine need, whichever store serves them.

Two stores implement it: :class:`~trio_bridge.storage.memory.MemoryStore` (one process, the default)
and the etcd store (several servers on one etcd). ``tests/storage`` holds one conformance suite that
every store runs.

The contract, method by method where it matters:

* **Errors** are :class:`~trio_bridge._errors.BridgeError` subclasses, the same ones with the same
  messages from every store: NotFound for a session or variable that is not there (a session that
  expired is not there), AlreadyExists, InvalidArgument, VersionConflict, ResourceExhausted naming its
  limit, Unavailable when the store cannot be reached.
* **Atomicity is a conditional update**, not "no await between read and write": a write names what it
  expects (the session exists, a name is free, a variable id at a version) and is applied only if that
  still holds when it is applied, all of a batch or none of it. Callers may read, decide, then write;
  a write whose condition no longer holds fails with the status a fresh read would have given.
  Variable ids are never reused, so a variable's type and constraints never change under an id.
* **Cancellation**: a cancelled read leaves nothing behind. A cancelled write either was applied in
  full or not at all (never in part), and the caller cannot tell which: it reads to find out.
* **Read-your-writes**: once a write returns, the store's :attr:`cache` shows it (and so does every
  watch served from it); writes made through other servers reach the cache in the order they were
  applied.
* **Watches** subscribe to ``cache.observers`` and then read the cache synchronously (see
  :mod:`trio_bridge._watch`); what a resume missed comes from :meth:`Store.changes_since`,
  :meth:`Store.changes_after_revision` and :meth:`Store.deleted_after_revision`.
* **Access**: every method that names a session counts as an access to it (its TTL restarts), except
  :meth:`Store.owner_of` and :meth:`Store.list_sessions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._types import Constraints, VariableType
from .cache import SessionCache
from .records import DeletedVariable, SessionInfo, VariableEvent, VariableSnapshot, VariableWrite

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class Store(Protocol):
    """Sessions of typed, versioned variables, and the cache that watches are served from."""

    #: True if no method ever suspends (each runs to completion when first stepped, as the in-memory
    #: store's do): asyncio code may then await them directly. Otherwise they need a Trio task.
    never_suspends: bool

    #: Names the state this store holds, the same for every server sharing it and across restarts of
    #: a durable store; a new one each time an in-memory store is made ("memory:..."). A client that
    #: sees it change knows the state it watched is gone, not expired.
    state_id: str

    @property
    def cache(self) -> SessionCache:
        """The sessions as this server holds them: watches subscribe and read here."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background work (expiry; for etcd, its feed and lease keep-alives), for as long as
        it runs; ``task_status.started()`` once the store can serve. Cancel it to stop it: a store that
        is not running serves no writes."""
        ...

    @property
    def available(self) -> bool:
        """Whether the store can serve writes now (the etcd store: its feed follows etcd). While not,
        writes fail with UNAVAILABLE, the server's health says NOT_SERVING, and watches keep what they
        have."""
        ...

    async def availability_changed(self) -> None:
        """Return when :attr:`available` may have changed (never, for a store that is always
        available)."""
        ...

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the store's own metrics to the server's registry (the in-memory store has none)."""
        ...

    # ---- sessions ------------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        ttl: float | None = None,
        owner: str = "",
    ) -> SessionInfo:
        """Create a session; an empty ``session_id`` gets a fresh unique one."""
        ...

    async def owner_of(self, session_id: str) -> str | None:
        """The owner of a live session, or None if there is none by that id; not an access."""
        ...

    async def get_session(self, session_id: str) -> SessionInfo: ...

    async def touch_session(self, session_id: str) -> None:
        """Count as an access to the session (its TTL restarts); NotFound if it is gone."""
        ...

    async def list_sessions(self) -> list[SessionInfo]:
        """Every live session, oldest first; not an access."""
        ...

    async def cleanup_session(self, session_id: str) -> int:
        """Remove the session and its variables; return how many variables went with it."""
        ...

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
    ) -> VariableSnapshot: ...

    async def get_variable(self, session_id: str, identifier: str) -> VariableSnapshot: ...

    async def get_variables(self, session_id: str, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        """The named variables in the order given; NotFound names every unknown identifier."""
        ...

    async def list_variables(self, session_id: str) -> list[VariableSnapshot]:
        """Every variable of the session, in registration order."""
        ...

    async def set_variable(
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
        ...

    async def set_variables(
        self,
        session_id: str,
        writes: Sequence[VariableWrite],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[VariableSnapshot]:
        """Apply every write, or none. A write's value may be a ``records.EncodedValue``, which the
        store decodes once it knows the variable's type (``checks.looked_up`` does, with the checks
        every store makes first, in the order a client fixes them)."""
        ...

    async def delete_variable(self, session_id: str, identifier: str, *, source: str = "") -> None: ...

    # ---- watch support ---------------------------------------------------------------------------

    async def changes_since(
        self, session_id: str, variable_id: str, version: int, *, up_to: int
    ) -> list[VariableEvent] | None:
        """Every change of the variable after ``version`` up to version ``up_to`` (one the cache has
        shown), oldest first; None when they cannot all be had any more (a resume then resyncs)."""
        ...

    async def changes_after_revision(
        self, session_id: str, variable_id: str, revision: int, *, up_to: int
    ) -> list[VariableEvent] | None:
        """Every change of the variable made at a revision after ``revision`` (its registration too,
        if that came after), up to version ``up_to``, oldest first; None when they cannot all be had."""
        ...

    async def deleted_after_revision(self, session_id: str, revision: int) -> list[DeletedVariable] | None:
        """The variables of the session that existed at ``revision`` and are gone from the cache now
        (one registered after ``revision`` is never among them); None when that cannot be told any
        more (a resume then resyncs every variable it covers)."""
        ...


class SingleVariableCalls:
    """``get_variable`` and ``set_variable`` as the one-variable forms of ``get_variables`` and
    ``set_variables``, for stores to inherit (so they mean the same in every store)."""

    async def get_variables(self, session_id: str, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        raise NotImplementedError

    async def set_variables(
        self,
        session_id: str,
        writes: Sequence[VariableWrite],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[VariableSnapshot]:
        raise NotImplementedError

    async def get_variable(self, session_id: str, identifier: str) -> VariableSnapshot:
        (snapshot,) = await self.get_variables(session_id, [identifier])
        return snapshot

    async def set_variable(
        self,
        session_id: str,
        identifier: str,
        value: Any,
        *,
        expected_version: int | None = None,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> VariableSnapshot:
        (result,) = await self.set_variables(
            session_id, [VariableWrite(identifier, value, expected_version)], source=source, metadata=metadata
        )
        return result

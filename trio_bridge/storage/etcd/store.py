"""EtcdStore: sessions and variables kept in etcd, so several servers serve the same sessions and
state survives restarts. The layout of keys is ``layout``'s; the feed (``feed``) keeps this server's
cache equal to etcd's state, and watches are served from that cache as with the in-memory store.

How each write keeps the store contract:

* it is checked against the cache (``checks``, the same checks and messages as the in-memory store),
  then sent as one etcd transaction whose compares say what the check assumed: the session's record
  still holds its lease; a name is still free; a variable's key still exists (ids are never reused, so
  a deleted variable is never revived) and, for compare-and-set, is at the expected version. A compare
  that fails is answered from etcd's current state, with the status a fresh check would give;
* it returns only once the feed has applied its revision: read-your-writes on this server;
* cancelled, it was applied in full or not at all (one transaction); the caller cannot tell which.

Sessions live on leases: a session's keys all carry its lease, so expiry (the lease running out) and
cleanup (the lease revoked) remove them in one revision, seen by every server. An access keeps the lease
alive, at most about once a second per session (TTLs are whole seconds in etcd); an open watch keeps
it alive every third of its TTL. A leader change restarts a lease's count: a session may live longer
than its TTL, never shorter.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..._errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VersionConflict,
)
from ..._limits import DEFAULT_LIMITS
from ..._types import Constraints, VariableType, approximate_size
from ...proto import etcdserverpb as epb
from .. import checks
from ..cache import CachedSession, SessionCache, change_size
from ..interface import SingleVariableCalls
from ..location import DEFAULT_ETCD_PREFIX, ETCD_MAX_REQUEST_BYTES, ETCD_MAX_TXN_OPS
from ..records import (
    DEFAULT_SESSION_TTL,
    EMPTY,
    MAX_SESSION_TTL,
    DeletedVariable,
    EventKind,
    SessionInfo,
    VariableEvent,
    VariableSnapshot,
    VariableWrite,
    frozen_metadata,
    session_not_found,
)
from .client import (
    EtcdClient,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdRequestTooLarge,
    EtcdTooManyOps,
    EtcdUnavailable,
    compare_lease,
    compare_value,
    compare_version,
    op_delete,
    op_put,
    op_range,
)
from .feed import Feed
from .layout import Keys, SessionRecord, VariableRecord, prefix_end

if TYPE_CHECKING:
    from ..interface import Store

log = logging.getLogger("trio_bridge")

#: An access keeps a session's lease alive at most this often (seconds).
KEEP_ALIVE_EVERY = 1.0


@dataclass(frozen=True)
class EtcdSettings:
    """Where etcd is and how to reach it."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_ETCD_PREFIX
    tls: ssl.SSLContext | None = None
    user: str | None = None
    password: str | None = None
    #: etcd's ``--max-request-bytes`` and ``--max-txn-ops``: writes are checked against them before
    #: they are sent (a batch of N writes is one transaction of 2N operations).
    max_request_bytes: int = ETCD_MAX_REQUEST_BYTES
    max_txn_ops: int = ETCD_MAX_TXN_OPS


class EtcdStore(SingleVariableCalls):
    """A :class:`~trio_bridge.storage.interface.Store` on etcd. Serve nothing before :meth:`run` has
    started (it connects and loads the state)."""

    never_suspends = False

    def __init__(
        self,
        settings: EtcdSettings,
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
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.state_id = f"etcd:{settings.prefix}"  # with etcd's cluster id once it is known (see run)
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
        )
        self._client: EtcdClient | None = None
        self._feed: Feed | None = None
        self._kept_alive: dict[str, float] = {}  # session id → when its lease was last kept alive
        self._running = trio.Event()  # set once run() has started
        self._on_call: Callable[[str, float, str], object] | None = None
        self._keeping_alive: set[str] = set()

    @property
    def cache(self) -> SessionCache:
        return self._cache

    @property
    def available(self) -> bool:
        return self._feed is not None and self._feed.state.connected

    async def availability_changed(self) -> None:
        if self._feed is None:
            await self._running.wait()
        else:
            await self._feed.state.connection_changed.wait()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The feed's lag (revisions it is behind etcd), whether it follows etcd, its reconnections and
        reloads; every etcd request's latency by method, and its errors by method and kind."""
        registry.register(_FeedCollector(self))
        latency = Histogram(
            "trio_bridge_etcd_request_seconds",
            "etcd requests (unary) by method: how long they took, failures included.",
            ["method"],
            registry=registry,
        )
        errors = Counter(
            "trio_bridge_etcd_request_errors",
            "etcd requests that failed, by method and error.",
            ["method", "error"],
            registry=registry,
        )

        def record(method: str, seconds: float, outcome: str) -> None:
            latency.labels(method=method).observe(seconds)
            if outcome != "ok":
                errors.labels(method=method, error=outcome).inc()

        self._on_call = record

    @property
    def feed(self) -> Feed:
        if self._feed is None:
            raise Unavailable("the etcd store is not running")
        return self._feed

    @property
    def client(self) -> EtcdClient:
        if self._client is None:
            raise Unavailable("the etcd store is not running")
        return self._client

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, load every session, then follow etcd (the feed) and keep watched sessions' leases
        alive, for as long as it runs. Started once the state is loaded. Cancelled, it closes its
        connections; the cache keeps what it had."""
        settings = self.settings
        client = await EtcdClient.connect(
            settings.endpoints, tls=settings.tls, user=settings.user, password=settings.password
        )
        client.on_call = self._on_call
        try:
            feed = Feed(client, self.keys, self._cache)
            async with trio.open_nursery() as nursery:
                await nursery.start(feed.run)
                self.state_id = f"etcd:{feed.cluster_id:x}:{self.settings.prefix}"
                self._client, self._feed = client, feed
                self._running.set()
                nursery.start_soon(self._keep_watched_sessions_alive)
                task_status.started()
        finally:
            self._client = self._feed = None
            client.close()

    # ---- sessions ------------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        ttl: float | None = None,
        owner: str = "",
    ) -> SessionInfo:
        self._check_writable()
        ttl = checks.checked_ttl(ttl, self.limits)
        if session_id:
            checks.check_new_session_id(session_id, self._cache)
        else:
            session_id = checks.new_session_id()
        checks.check_session_room(self._cache, owner, self.limits)
        record = SessionRecord(
            created_at=self._cache.wall_clock(), ttl=ttl, metadata=frozen_metadata(metadata), owner=owner
        )
        meta = self.keys.meta(session_id)
        with _etcd_errors():
            lease = (await self.client.lease_grant(math.ceil(ttl))).id
            response = await self.client.txn(
                [compare_version(meta, "=", 0)], [op_put(meta, record.encode(), lease=lease)]
            )
            if not response.succeeded:
                with contextlib.suppress(EtcdError):
                    await self.client.lease_revoke(lease)
                raise AlreadyExists(f"session {session_id!r} already exists")
        self._kept_alive[session_id] = self._cache.clock()
        await self._applied(response)
        return self._cache.info(self._cache.session(session_id))

    async def owner_of(self, session_id: str) -> str | None:
        session = self._cache.sessions.get(session_id)
        return None if session is None else session.owner

    async def get_session(self, session_id: str) -> SessionInfo:
        return self._cache.info(await self._session(session_id, reading=True))

    async def touch_session(self, session_id: str) -> None:
        await self._session(session_id, reading=True)

    async def list_sessions(self) -> list[SessionInfo]:
        return [self._cache.info(s) for s in self._cache.sessions.values()]

    async def cleanup_session(self, session_id: str) -> int:
        self._check_writable()
        session = await self._session(session_id)
        removed = len(session.variables)
        lease = self.feed.sessions[session_id].lease
        meta = self.keys.meta(session_id)
        with _etcd_errors():
            marked = await self.client.txn(
                [compare_lease(meta, "=", lease)],
                [op_put(self.keys.end(session_id), b"cleanup", lease=lease)],
            )
            if not marked.succeeded:
                raise session_not_found(session_id)
            try:
                revoked = await self.client.lease_revoke(lease)
            except EtcdLeaseNotFound:
                raise session_not_found(session_id) from None  # it expired meanwhile
        assert revoked.header is not None
        await self.feed.reached(revoked.header.revision)
        return removed

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
        self._check_writable()
        session = await self._session(session_id)
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
        lease = self.feed.sessions[session_id].lease
        meta, name_key = self.keys.meta(session_id), self.keys.name(session_id, name)
        record = VariableRecord(snapshot, source, EMPTY, snapshot.created_at)
        encoded = record.encode()
        self._check_request_size(len(encoded) + 4 * len(name_key))
        with _etcd_errors():
            response = await self.client.txn(
                [compare_lease(meta, "=", lease), compare_version(name_key, "=", 0)],
                [
                    op_put(self.keys.variable(session_id, snapshot.id), encoded, lease=lease),
                    op_put(name_key, snapshot.id.encode(), lease=lease),
                ],
                [op_range(meta), op_range(name_key)],
            )
        if not response.succeeded:
            if not _found(response.responses[0]):
                raise session_not_found(session_id)
            raise AlreadyExists(f"session {session_id!r} already has a variable named {name!r}")
        await self._applied(response)
        assert response.header is not None
        return replace(snapshot, revision=response.header.revision)

    async def get_variables(self, session_id: str, identifiers: Sequence[str]) -> list[VariableSnapshot]:
        return self._cache.variables(await self._session(session_id, reading=True), identifiers)

    async def list_variables(self, session_id: str) -> list[VariableSnapshot]:
        return list((await self._session(session_id, reading=True)).variables.values())

    async def set_variables(
        self,
        session_id: str,
        writes: Sequence[VariableWrite],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[VariableSnapshot]:
        # The client's errors first (names, values), as the in-memory store gives them; then this
        # store's own (etcd unreachable, a batch over one transaction).
        _, values = checks.looked_up(self._cache, self._cache.session(session_id), writes)
        self._check_writable()
        session = await self._session(session_id)
        update_metadata = frozen_metadata(metadata)
        if 2 * len(writes) > self.settings.max_txn_ops:
            raise InvalidArgument(
                f"a batch of {len(writes)} writes is {2 * len(writes)} operations of one etcd transaction "
                f"(a put and a read of each), more than its limit --etcd-max-txn-ops="
                f"{self.settings.max_txn_ops} (etcd's --max-txn-ops); split the batch"
            )
        changes = checks.staged_writes(
            self._cache, session, writes, source=source, metadata=update_metadata, values=values
        )
        keys = [self.keys.variable(session_id, current.id) for current, _ in changes]
        compares = [
            compare_version(key, ">", 0)
            if write.expected_version is None
            else compare_version(key, "=", write.expected_version)
            for key, write in zip(keys, writes, strict=True)
        ]
        timestamp = changes[0][1].last_updated_at
        records = [
            VariableRecord(updated, source, update_metadata, timestamp).encode() for _, updated in changes
        ]
        self._check_request_size(
            sum(len(record) + 2 * len(key) for key, record in zip(keys, records, strict=True))
        )
        puts = [
            epb.RequestOp(request_put=epb.PutRequest(key=key, value=record, ignore_lease=True))
            for key, record in zip(keys, records, strict=True)
        ]
        # Each key read back without its value after the puts: its new version (a blind write's is
        # not known before), at no cost of parsing a value.
        versions = [op_range(key, keys_only=True) for key in keys]
        with _etcd_errors():
            response = await self.client.txn(compares, [*puts, *versions], versions)
        if not response.succeeded:
            for write, (current, _), reply in zip(writes, changes, response.responses, strict=True):
                kvs = reply.response_range.kvs if reply.response_range is not None else []
                if not kvs:
                    raise NotFound(f"session {session_id!r} has no variable {write.identifier!r}")
                if write.expected_version is not None and kvs[0].version != write.expected_version:
                    raise VersionConflict(current.name, write.expected_version, kvs[0].version)
            raise Unavailable("etcd refused the write and said nothing of why; retry")  # never expected
        results = []
        assert response.header is not None
        for (_, updated), reply in zip(changes, response.responses[len(puts) :], strict=True):
            kvs = reply.response_range.kvs if reply.response_range is not None else []
            version = kvs[0].version if kvs else updated.version
            results.append(replace(updated, version=version, revision=response.header.revision))
        await self._applied(response)
        return results

    async def delete_variable(self, session_id: str, identifier: str, *, source: str = "") -> None:
        self._check_writable()
        session = await self._session(session_id)
        (snapshot,) = self._cache.variables(session, [identifier])
        key = self.keys.variable(session_id, snapshot.id)
        name_key = self.keys.name(session_id, snapshot.name)
        with _etcd_errors():
            response = await self.client.txn(
                [
                    compare_version(key, ">", 0),
                    compare_value(name_key, "=", snapshot.id.encode()),
                ],
                [op_delete(key), op_delete(name_key)],
            )
        if not response.succeeded:
            raise NotFound(f"session {session_id!r} has no variable {identifier!r}")
        await self._applied(response)

    # ---- watch support ---------------------------------------------------------------------------

    async def changes_since(
        self, session_id: str, variable_id: str, version: int, *, up_to: int
    ) -> list[VariableEvent] | None:
        """From this server's history when it reaches back that far, else from etcd's history (a
        watch of the variable's key from its creation), else None (compacted)."""
        if version >= up_to:
            return []
        missed = self._cache.changes_since(session_id, variable_id, version)
        if missed is not None:
            return [e for e in missed if e.variable is not None and e.variable.version <= up_to]
        if version <= 0:
            return None
        created = self.feed.created_at_revision.get(variable_id)
        if created is None:
            return None
        return await self._history(session_id, variable_id, start=created, after_version=version, up_to=up_to)

    async def changes_after_revision(
        self, session_id: str, variable_id: str, revision: int, *, up_to: int
    ) -> list[VariableEvent] | None:
        """From this server's history when it tells them all, else from etcd's history (a watch of
        the variable's key from the revision after ``revision``), else None (compacted)."""
        missed = self._cache.changes_after_revision(session_id, variable_id, revision)
        if missed is not None:
            return [e for e in missed if e.variable is not None and e.variable.version <= up_to]
        return await self._history(session_id, variable_id, start=revision + 1, after_version=0, up_to=up_to)

    async def deleted_after_revision(self, session_id: str, revision: int) -> list[DeletedVariable] | None:
        """From this server's history when it tells (oldest deletion first), else from etcd's state at
        ``revision`` (the session's name keys then, each naming its variable's id: those no longer in
        the cache, by name), else None (compacted, or etcd cannot be reached)."""
        deleted = self._cache.deleted_after_revision(session_id, revision)
        if deleted is not None:
            return deleted
        names = self.keys.name(session_id, "")
        try:
            with trio.fail_after(self.client.request_timeout):
                response = await self.client.range(names, prefix_end(names), revision=revision)
        except (EtcdError, trio.TooSlowError):
            return None
        current = self._cache.session(session_id).variables
        deleted = []
        for kv in response.kvs:
            key = self.keys.parse(kv.key)
            variable_id = kv.value.decode()
            if key is not None and variable_id not in current:
                deleted.append(DeletedVariable(variable_id, key.name))
        return deleted

    async def _history(
        self, session_id: str, variable_id: str, *, start: int, after_version: int, up_to: int
    ) -> list[VariableEvent] | None:
        """The variable's versions after ``after_version`` up to ``up_to`` from etcd's history, read
        from revision ``start`` on; None when etcd compacted it (or cannot be asked)."""
        key = self.keys.variable(session_id, variable_id)
        events: list[VariableEvent] = []
        try:
            with trio.fail_after(self.client.request_timeout):
                async with self.client.watch(key, start_revision=start, prev_kv=True) as watch:
                    async for response in watch:
                        for event in response.events:
                            kv = event.kv
                            if kv is None or not kv.value or kv.version <= after_version:
                                continue
                            record = VariableRecord.decode(kv.value, version=kv.version)
                            old = None
                            if event.prev_kv is not None and event.prev_kv.value:
                                old = VariableRecord.decode(event.prev_kv.value, version=kv.version - 1)
                            events.append(_change_event(session_id, record, old, kv.mod_revision))
                            if kv.version >= up_to:
                                return events
        except (EtcdError, trio.TooSlowError):
            return None
        return None

    # ---- internals -----------------------------------------------------------------------------

    def _check_request_size(self, size: int) -> None:
        """ResourceExhausted naming the limit if a write would be larger than etcd takes."""
        limit = self.settings.max_request_bytes
        if size + 4096 > limit:  # room for the compares, the header and the framing
            raise ResourceExhausted.over_limit(
                f"the write would be an etcd request of about {size} bytes, more than one request takes: "
                f"its limit --etcd-max-request-bytes={limit} (etcd's --max-request-bytes); write "
                f"smaller values or fewer at once",
                "etcd_max_request_bytes",
                limit,
            )

    def _check_writable(self) -> None:
        if not self.available:
            raise Unavailable(
                "the server cannot reach etcd (where state is kept) right now; writes resume once it can: "
                "retry, or use another server"
            )

    async def _session(self, session_id: str, *, reading: bool = False) -> CachedSession:
        """The session, touched: its lease is kept alive now unless it was within the last second. A
        read is answered from the cache even when etcd cannot be reached to keep the lease alive (no
        lease expires while etcd is down)."""
        session = self._cache.session(session_id)
        self._cache.touch(session)
        now = self._cache.clock()
        if now - self._kept_alive.get(session_id, -math.inf) >= KEEP_ALIVE_EVERY:
            try:
                await self._keep_alive(session_id)
            except Unavailable:
                if not reading:
                    raise
        return session

    async def _keep_alive(self, session_id: str) -> None:
        """Refresh the session's lease (one at a time per session). A lease found gone means the
        session expired: NotFound, as if it had not been there (the feed removes it)."""
        lease = self.feed.sessions.get(session_id)
        if lease is None:
            raise session_not_found(session_id)
        if session_id in self._keeping_alive:
            return
        self._keeping_alive.add(session_id)
        try:
            with _etcd_errors():
                ttl = await self.client.lease_keep_alive_once(lease.lease)
        finally:
            self._keeping_alive.discard(session_id)
        if ttl <= 0:
            raise session_not_found(session_id)
        self._kept_alive[session_id] = self._cache.clock()

    async def _keep_watched_sessions_alive(self) -> None:
        """Keep the lease of every session with an open watch alive, every third of its TTL (at most
        once a second); sleeps while no session is watched."""
        cache = self._cache
        while True:
            now = cache.clock()
            next_due = math.inf
            for session in [s for s in cache.sessions.values() if s.watchers]:
                every = max(KEEP_ALIVE_EVERY, session.ttl / 3)
                due = self._kept_alive.get(session.id, -math.inf) + every
                if due <= now:
                    with contextlib.suppress(NotFound, Unavailable):
                        await self._keep_alive(session.id)
                    due = cache.clock() + every
                next_due = min(next_due, due)
            for gone in [s for s in self._kept_alive if s not in cache.sessions]:
                del self._kept_alive[gone]
            cache.deadlines_changed = trio.Event()
            with trio.move_on_at(next_due):
                await cache.deadlines_changed.wait()

    async def _applied(self, response: epb.TxnResponse) -> None:
        assert response.header is not None
        await self.feed.reached(response.header.revision)


class _FeedCollector(Collector):
    """The feed's state, read at scrape time."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        feed = self._store._feed
        state = feed.state if feed is not None else None
        lag = max(0, state.seen_revision - feed.applied) if state is not None and feed is not None else 0
        yield GaugeMetricFamily(
            "trio_bridge_etcd_feed_lag_revisions",
            "Revisions the feed is behind the newest etcd has told it of.",
            value=lag,
        )
        yield GaugeMetricFamily(
            "trio_bridge_etcd_feed_connected",
            "1 while the feed follows etcd (writes are served), else 0.",
            value=1 if state is not None and state.connected else 0,
        )
        yield CounterMetricFamily(
            "trio_bridge_etcd_feed_reconnects",
            "Times the feed's etcd watch was lost and opened again.",
            value=state.reconnects if state is not None else 0,
        )
        yield CounterMetricFamily(
            "trio_bridge_etcd_feed_reloads",
            "Times the feed's position was compacted and it loaded etcd's state again (watches resynced).",
            value=state.reloads if state is not None else 0,
        )


def _found(reply: epb.ResponseOp) -> bool:
    return reply.response_range is not None and bool(reply.response_range.kvs)


def _change_event(
    session_id: str, record: VariableRecord, old: VariableRecord | None, revision: int
) -> VariableEvent:
    snapshot = replace(record.snapshot, revision=revision)
    kind = EventKind.REGISTERED if snapshot.version == 1 else EventKind.CHANGED
    return VariableEvent(
        kind,
        session_id,
        snapshot,
        old_value=old.snapshot.value if old is not None else None,
        source=record.source,
        metadata=record.metadata,
        timestamp=record.timestamp,
        size=approximate_size(snapshot.value) + change_size(record.source, record.metadata),
        revision=revision,
    )


@contextlib.contextmanager
def _etcd_errors() -> Iterator[None]:
    """etcd's failures as the store contract's errors."""
    try:
        yield
    except EtcdTooManyOps as exc:
        raise InvalidArgument(
            f"the write needs more operations than etcd takes in one transaction: {exc}"
        ) from None
    except EtcdRequestTooLarge as exc:
        raise ResourceExhausted(
            f"the write is larger than etcd takes in one request (etcd's --max-request-bytes): {exc}"
        ) from None
    except EtcdUnavailable as exc:
        raise Unavailable(f"etcd cannot be reached: {exc}; retry") from None


if TYPE_CHECKING:  # mypy checks that EtcdStore keeps the contract
    _IS_A_STORE: Store = EtcdStore(EtcdSettings(endpoints=(("127.0.0.1", 2379),)))

"""The feed: one etcd watch of the deployment's prefix, applied in revision order to a SessionCache.

Each server runs one. It loads every key under the prefix at a revision R, then watches from R + 1 and
applies each revision's events together, in the order etcd gives them, through the cache's
``apply_*`` methods (which publish to the watch streams' observers and never block). It remembers the
last revision applied: the last applied *event's* revision, or a progress notification's, never a
response header's (etcd sends its current revision in headers while catch-up events are still coming;
resuming from one would skip events).

When the watch breaks (a member lost, a leader change, etcd unreachable), the feed opens a new one from
the last applied revision + 1, with backoff and jitter: nothing is skipped and nothing applied twice.
When etcd has compacted past that revision, the feed loads everything again and tells every local watch
stream, by ending it with a status it resumes from (see :meth:`Feed._reload`).

Cancellation: cancelling :meth:`Feed.run` stops the feed between two revisions (each revision is
applied synchronously), leaving the cache consistent at the last applied revision.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio

from ...proto import etcdserverpb as pb
from ...proto import mvccpb
from ..cache import CachedSession, SessionCache, new_session
from ..records import EventKind, VariableSnapshot
from .client import Compacted, EtcdClient, EtcdError, EtcdUnavailable, is_progress_notify
from .layout import KeyKind, Keys, SessionRecord, VariableRecord

log = logging.getLogger("trio_bridge")

#: Backoff between attempts to watch again, in seconds.
RETRY_INITIAL = 0.05
RETRY_MAX = 2.0
#: How often the feed checks that its watch still answers, and how long an answer may take (seconds).
PROBE_EVERY = 5.0
PROBE_TIMEOUT = 5.0


@dataclass
class SessionLease:
    """What the feed knows of a session beyond the cache: its lease, the revision its record was
    created at, and whether CleanupSession is ending it."""

    lease: int
    create_revision: int
    cleaning_up: bool = False


@dataclass
class FeedState:
    """Counters for metrics and health."""

    #: Following etcd (its watch open and answering); False while it cannot be reached.
    connected: bool = False
    #: Set, then replaced, each time ``connected`` changes.
    connection_changed: trio.Event = field(default_factory=trio.Event)
    reconnects: int = 0
    reloads: int = 0
    #: etcd's newest revision as last seen in a response header (for the feed's lag).
    seen_revision: int = 0


@dataclass(order=True)
class _Waiter:
    revision: int
    event: trio.Event = field(compare=False)


class Feed:
    """Keeps ``cache`` equal to etcd's state under ``keys``, as of :attr:`applied` revision."""

    def __init__(self, client: EtcdClient, keys: Keys, cache: SessionCache) -> None:
        self._client = client
        self._keys = keys
        self._cache = cache
        self.applied = 0
        #: The etcd cluster's id (from the first load): names the state the cache mirrors.
        self.cluster_id = 0
        self.sessions: dict[str, SessionLease] = {}
        #: Per variable id, the revision its key was created at (where its etcd history starts).
        self.created_at_revision: dict[str, int] = {}
        self.state = FeedState()
        self._waiters: list[_Waiter] = []
        self._held: list[pb.WatchResponse] | None = None
        self._task_status: trio.TaskStatus[None] | None = None
        self._paused: trio.Event | None = None
        self._following: trio.CancelScope | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Test hook, in the manner of etcd's failpoints: for the block, the feed stops following etcd
        (its watch is closed, as when its member is lost) and does not watch again; leaving the block
        lets it watch again from where it stopped (or load again, if etcd compacted that meanwhile)."""
        self._paused = trio.Event()
        if self._following is not None:
            self._following.cancel()
        try:
            yield
        finally:
            paused, self._paused = self._paused, None
            paused.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Test hook, in the manner of etcd's failpoints: for the block, what etcd sends waits instead
        of being applied, and writes through this server do not wait for their revision (so their
        results are not in the cache yet); leaving the block applies it all at once, as a feed that
        fell behind catches up."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for response in held:
                self._take(response)

    async def reached(self, revision: int) -> None:
        """Return once every event up to ``revision`` has been applied to the cache. Cancellation just
        stops the wait. (At once while the feed is held: see :meth:`held`.)"""
        if self.applied >= revision or self._held is not None:
            return
        waiter = _Waiter(revision, trio.Event())
        heapq.heappush(self._waiters, waiter)
        await waiter.event.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, then follow etcd for as long as it runs; started once the state is loaded and the
        watch that follows it is open (writes can be served)."""
        self._task_status = task_status
        await self._load()
        delay = RETRY_INITIAL
        while True:
            if self._paused is not None:
                await self._paused.wait()
            try:
                with trio.CancelScope() as self._following:
                    await self._follow()
                if self._following.cancelled_caught:
                    self._connected(False)
                    continue  # paused: see paused()
            except Compacted as exc:
                log.warning("the feed's revision %d was compacted (%s): loading again", self.applied, exc)
                await self._reload()
            except EtcdError as exc:
                self._connected(False)
                self.state.reconnects += 1
                log.warning("etcd watch lost (%s); watching again from revision %d", exc, self.applied + 1)
                await trio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_INITIAL

    # ---- loading -------------------------------------------------------------------------------

    async def _load(self) -> None:
        """Make the cache what etcd holds now: the first time, everything; after a compaction, what
        changed (see :meth:`_apply_state`). What changed before the revision loaded at was not all
        seen: no session's history answers for an earlier revision (etcd's may)."""
        while True:
            try:
                response = await self._client.range(self._keys.root, self._keys.root_end)
                break
            except EtcdUnavailable as exc:
                self._connected(False)
                log.warning("etcd unreachable while loading (%s); retrying", exc)
                await trio.sleep(RETRY_MAX * random.uniform(0.5, 1.0))
        assert response.header is not None
        self.cluster_id = response.header.cluster_id
        self._cache.begin(max(self._cache.revision, response.header.revision))
        self._apply_state(response.kvs)
        self._cache.history_gap(self._cache.revision)
        self._advance(response.header.revision)

    async def _reload(self) -> None:
        self.state.reloads += 1
        await self._load()

    def _apply_state(self, kvs: Sequence[mvccpb.KeyValue]) -> None:
        """Bring the cache to the state ``kvs`` (every key under the prefix at one revision), publishing
        what differs: sessions and variables gone end or are deleted, new ones are added, and a variable
        at another version is published as a resync (the changes between cannot be replayed: etcd
        compacted them)."""
        parsed = [(key, kv) for kv in kvs if (key := self._keys.parse(kv.key)) is not None]
        metas = {key.session_id: kv for key, kv in parsed if key.kind is KeyKind.META}
        for session_id, lease in list(self.sessions.items()):
            meta = metas.get(session_id)
            if meta is None or meta.create_revision != lease.create_revision:
                self._end_session(session_id)
        for session_id, meta in metas.items():
            if session_id not in self.sessions:
                self._add_session(session_id, meta)
        for key, _ in parsed:
            if key.kind is KeyKind.END and key.session_id in self.sessions:
                self.sessions[key.session_id].cleaning_up = True
        held: dict[str, dict[str, mvccpb.KeyValue]] = {}
        for key, kv in sorted(parsed, key=lambda pair: pair[1].create_revision):
            if key.kind is KeyKind.VARIABLE:
                held.setdefault(key.session_id, {})[key.name] = kv
        for session in self._cache.sessions.values():
            variables = held.get(session.id, {})
            for variable_id in [v for v in session.variables if v not in variables]:
                self._delete_variable(session, variable_id)
            for variable_id, kv in variables.items():
                current = session.variables.get(variable_id)
                if current is None:
                    self._put_variable(session, kv)
                elif current.version != kv.version:
                    record = VariableRecord.decode(kv.value, version=kv.version)
                    self._cache.apply_changed(
                        session,
                        [(current, record.snapshot)],
                        source=record.source,
                        metadata=record.metadata,
                        timestamp=record.timestamp,
                        kind=EventKind.RESYNCED,
                    )

    # ---- following -----------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Apply what the watch sends until it fails. A watch that stops answering (a member cut off
        without a reset, which etcd's watch would never report) is found by asking for a progress
        notification every PROBE_EVERY seconds: no answer within PROBE_TIMEOUT counts as lost."""
        silent = False
        failure: EtcdError | None = None
        async with (
            self._client.watch(
                # No previous values: the cache has them (half the bytes to read and parse).
                self._keys.root,
                self._keys.root_end,
                start_revision=self.applied + 1,
                prev_kv=False,
            ) as watch,
            trio.open_nursery() as nursery,
        ):
            self._connected(True)
            answered = trio.Event()

            async def probe() -> None:
                nonlocal answered, silent
                while True:
                    await trio.sleep(PROBE_EVERY)
                    answered = trio.Event()
                    with contextlib.suppress(EtcdError):  # a broken stream: the reader hears of it
                        await watch.request_progress()
                    with trio.move_on_after(PROBE_TIMEOUT):
                        await answered.wait()
                    if not answered.is_set():
                        silent = True
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(probe)
            try:
                async for response in watch:
                    answered.set()
                    if self._held is not None:
                        self._held.append(response)
                    else:
                        self._take(response)
            except EtcdError as exc:  # raised below, not out of the nursery (which would group it)
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if silent:
            raise EtcdUnavailable(f"the etcd watch did not answer a progress request in {PROBE_TIMEOUT} s")
        raise EtcdUnavailable("the etcd watch ended")

    def _connected(self, connected: bool) -> None:
        if connected and self._task_status is not None:
            self._task_status.started()
            self._task_status = None
        if connected != self.state.connected:
            self.state.connected = connected
            self.state.connection_changed.set()
            self.state.connection_changed = trio.Event()

    def _take(self, response: pb.WatchResponse) -> None:
        if response.header is not None:
            self.state.seen_revision = max(self.state.seen_revision, response.header.revision)
        if response.events:
            self._apply_events(response.events)
        elif is_progress_notify(response) and response.header is not None:
            self._advance(response.header.revision)

    def _apply_events(self, events: Sequence[mvccpb.Event]) -> None:
        start = 0
        while start < len(events):
            revision = _revision_of(events[start])
            end = start
            while end < len(events) and _revision_of(events[end]) == revision:
                end += 1
            self._cache.begin(revision)
            self._apply_revision(events[start:end])
            self._advance(revision)
            start = end

    def _apply_revision(self, events: Sequence[mvccpb.Event]) -> None:
        """One revision's events (one etcd transaction, or a lease's expiry or revocation). A session
        whose record is deleted ends, once, with its variables: their own deletions in the same
        revision are not published one by one."""
        parsed = [(event, self._keys.parse(event.kv.key)) for event in events if event.kv is not None]
        ending = [
            key.session_id
            for event, key in parsed
            if key is not None and key.kind is KeyKind.META and event.type == mvccpb.EventEventType.DELETE
        ]
        ended = set(ending)
        changed: list[tuple[CachedSession, mvccpb.KeyValue]] = []
        for event, key in parsed:
            kv = event.kv
            assert kv is not None
            if key is None:
                continue
            deleted = event.type == mvccpb.EventEventType.DELETE
            if key.kind is KeyKind.META:
                if not deleted:
                    self._add_session(key.session_id, kv)
                continue
            if key.kind is KeyKind.END:
                lease = self.sessions.get(key.session_id)
                if lease is not None and not deleted:
                    lease.cleaning_up = True
                continue
            if key.kind is not KeyKind.VARIABLE:
                continue
            session = self._cache.sessions.get(key.session_id)
            if session is None:
                continue
            if deleted:
                if key.session_id not in ended:
                    self._delete_variable(session, key.name)
            elif kv.version == 1 or key.name not in session.variables:
                self._put_variable(session, kv)
            else:
                changed.append((session, kv))
        self._change_variables(changed)
        for session_id in ending:
            self._end_session(session_id)

    # ---- applying ------------------------------------------------------------------------------

    def _add_session(self, session_id: str, kv: mvccpb.KeyValue) -> None:
        if session_id in self._cache.sessions:
            self._end_session(session_id)  # a record we missed the end of (never expected)
        record = SessionRecord.decode(kv.value)
        self.sessions[session_id] = SessionLease(lease=kv.lease, create_revision=kv.create_revision)
        self._cache.apply_new_session(
            new_session(
                self._cache,
                session_id,
                metadata=record.metadata,
                ttl=record.ttl,
                owner=record.owner,
                created_at=record.created_at,
            )
        )

    def _put_variable(self, session: CachedSession, kv: mvccpb.KeyValue) -> None:
        """A variable new to the cache: registered now, or (loading) at whatever version etcd holds,
        kept with the revisions etcd made it and its version at (a resume from a revision between
        them and now has nothing to replay of it)."""
        record = VariableRecord.decode(kv.value, version=kv.version)
        snapshot = record.snapshot
        self.created_at_revision[snapshot.id] = kv.create_revision
        if snapshot.id in session.variables:  # a put we applied already (never expected)
            return
        self._cache.apply_registered(
            session,
            snapshot,
            timestamp=record.timestamp,
            created_revision=kv.create_revision,
            revision=kv.mod_revision,
        )

    def _change_variables(self, changed: Sequence[tuple[CachedSession, mvccpb.KeyValue]]) -> None:
        """The puts of one revision: one write (a batch), applied and published as one."""
        if not changed:
            return
        by_session: dict[str, tuple[CachedSession, list[VariableRecord]]] = {}
        for session, kv in changed:
            record = VariableRecord.decode(kv.value, version=kv.version)
            by_session.setdefault(session.id, (session, []))[1].append(record)
        for session, records in by_session.values():
            pairs: list[tuple[VariableSnapshot, VariableSnapshot]] = []
            for record in records:
                current = session.variables[record.snapshot.id]
                if record.snapshot.version > current.version:  # else applied already (never expected)
                    pairs.append((current, record.snapshot))
            if pairs:
                last = records[-1]
                self._cache.apply_changed(
                    session, pairs, source=last.source, metadata=last.metadata, timestamp=last.timestamp
                )

    def _delete_variable(self, session: CachedSession, variable_id: str) -> None:
        snapshot = session.variables.get(variable_id)
        self.created_at_revision.pop(variable_id, None)
        if snapshot is not None:
            self._cache.apply_deleted(session, snapshot, source="", timestamp=self._cache.wall_clock())

    def _end_session(self, session_id: str) -> None:
        lease = self.sessions.pop(session_id, None)
        session = self._cache.sessions.get(session_id)
        if session is None:
            return
        for variable_id in session.variables:
            self.created_at_revision.pop(variable_id, None)
        reason = "cleanup" if lease is not None and lease.cleaning_up else "expired"
        self._cache.apply_session_ended(session, reason=reason)

    def _advance(self, revision: int) -> None:
        if revision <= self.applied:
            return
        self.applied = revision
        while self._waiters and self._waiters[0].revision <= revision:
            heapq.heappop(self._waiters).event.set()


def _revision_of(event: mvccpb.Event) -> int:
    assert event.kv is not None
    return event.kv.mod_revision

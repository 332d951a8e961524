"""WatchVariables: the life of one watch stream, in Trio.

:func:`plan_watch` checks a request against the store and the limits before anything is sent, so a bad
request fails with its status and no message. :class:`WatchStream` then runs the stream:

1. it subscribes to the store's events, and only then reads the current values, so a change accepted
   after the subscription is either in what it read or in its queue, never in neither;
2. it opens one nursery with a sender (it runs as the nursery's body, which spares a Trio task per
   stream) and a heartbeat task. The sender drains what is queued and sends it as one batch. While it
   waits with nothing queued, a change is handed to the stream directly (``_deliver_now``, called by
   the publisher or its dispatch) and sent at once if it can go without waiting, with the sender's
   bookkeeping, and without waking the sender: a write to a thousand idle streams wakes no task per
   stream. Anything else (a send that would wait, the end of the session, a heartbeat due) is queued
   for the sender, in order;
3. per variable it sends strictly increasing versions: a queued change whose version it already sent
   (made between subscribing and reading) is dropped.

How a stream ends: the client going away cancels the task running it; every other end (session gone,
queue overflowed, server shutting down) is raised as a :class:`~trio_bridge._errors.BridgeError` after the
nursery has closed, so it reaches the client as its own status. Either way, leaving :meth:`run` removes
the subscription: nothing observes on behalf of a stream that has ended.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import NoReturn

import trio

from . import _encoding as enc
from ._errors import BridgeError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ._limits import DEFAULT_LIMITS, Limits
from ._observers import Coalescer, Subscription
from .proto.unified_bridge import VariableUpdate
from .storage import EventKind, Store, VariableEvent, VariableSnapshot, session_key, variable_key

DEFAULT_HEARTBEAT_INTERVAL_MS = 30_000
#: Most updates sent in one trio→asyncio hop, and (past the first) most bytes of them, about: what a
#: stream whose client stopped reading holds in its send.
BATCH_LIMIT = 512
BATCH_BYTES = 2**20
SLOW_CONSUMER_POLICIES = ("close", "coalesce")
RESUME_TRAILER = "trio-bridge-resume-versions"
#: The revision up to which the stream delivered every change (resume_revision for the next stream).
RESUME_REVISION_TRAILER = "trio-bridge-resume-revision"
SUBSCRIBED_CHECKPOINT = "watch.subscribed"


@dataclass(frozen=True)
class WatchPlan:
    """A checked request: what to watch and how."""

    session_id: str
    variable_ids: tuple[str, ...] | None  # None: every variable of the session, present and future
    include_initial_values: bool
    resume: Mapping[str, int]  # variable id → last version the client holds
    gone: tuple[str, ...]  # resume_versions identifiers of a session-wide watch that no longer exist
    heartbeat_interval: float  # seconds
    coalesce: bool
    resume_revision: int = 0  # the revision the client holds every change up to (0: none)
    #: Looking, not using (the web view): the watch neither restarts the session's TTL nor holds it
    #: alive, and it is not among the session's open watches.
    passive: bool = False


def _option_heartbeat(options: Mapping[str, str], limits: Limits) -> float:
    low, high = limits.min_heartbeat_interval_ms, limits.max_heartbeat_interval_ms
    text = options.get("heartbeat_interval_ms")
    if text is None:
        return min(max(DEFAULT_HEARTBEAT_INTERVAL_MS, low), high) / 1000
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not low <= value <= high:
        raise InvalidArgument(
            f"option heartbeat_interval_ms must be a whole number from {low} (limit "
            f"min_heartbeat_interval_ms) to {high} (limit max_heartbeat_interval_ms), got {text!r}"
        )
    return value / 1000


async def plan_watch(
    store: Store,
    *,
    session_id: str,
    identifiers: Sequence[str],
    include_initial_values: bool,
    options: Mapping[str, str],
    resume_versions: Mapping[str, int],
    resume_revision: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    passive: bool = False,
) -> WatchPlan:
    """Check a watch request; raise InvalidArgument or NotFound naming every problem found. A
    ``passive`` watch (see :class:`WatchPlan`) is no access to the session."""
    unknown_options = sorted(set(options) - {"heartbeat_interval_ms", "slow_consumer"})
    if unknown_options:
        raise InvalidArgument(
            f"unknown watch option(s) {unknown_options}; known: heartbeat_interval_ms, slow_consumer"
        )
    heartbeat_interval = _option_heartbeat(options, limits)
    policy = options.get("slow_consumer", "close")
    if policy not in SLOW_CONSUMER_POLICIES:
        raise InvalidArgument(f"option slow_consumer must be 'close' or 'coalesce', got {policy!r}")
    if len(identifiers) > limits.max_watch_identifiers:
        raise InvalidArgument(
            f"the watch names {len(identifiers)} variables, more than its limit max_watch_identifiers="
            f"{limits.max_watch_identifiers}"
        )
    negative = sorted(k for k, v in resume_versions.items() if v < 0)
    if negative:
        raise InvalidArgument(f"resume_versions must not be negative (for {negative})")
    if resume_revision < 0:
        raise InvalidArgument(f"resume_revision must not be negative, got {resume_revision}")
    if passive:
        store.cache.session(session_id)  # NOT_FOUND first, with no access
    else:
        await store.touch_session(session_id)  # NOT_FOUND first, as for every other RPC
    watched: tuple[str, ...] | None = None
    if identifiers:
        snapshots = store.cache.get_variables(session_id, identifiers)
        watched = tuple(dict.fromkeys(s.id for s in snapshots))
    resume: dict[str, int] = {}
    gone: list[str] = []
    for identifier, version in resume_versions.items():
        try:
            (snapshot,) = store.cache.get_variables(session_id, [identifier])
        except NotFound:
            if watched is not None:
                raise NotFound(
                    f"resume_versions names {identifier!r}, which session {session_id!r} does not have"
                ) from None
            gone.append(identifier)
            continue
        if watched is not None and snapshot.id not in watched:
            raise InvalidArgument(f"resume_versions names {identifier!r}, which the watch does not include")
        resume[snapshot.id] = version
    return WatchPlan(
        session_id=session_id,
        variable_ids=watched,
        include_initial_values=include_initial_values,
        resume=resume,
        gone=tuple(gone),
        heartbeat_interval=heartbeat_interval,
        coalesce=policy == "coalesce",
        resume_revision=resume_revision,
        passive=passive,
    )


def _coalescing_key(event: VariableEvent) -> object:
    return event.variable.id if event.variable is not None else ("session", event.session_id)


def _merge(older: VariableEvent, newer: VariableEvent) -> VariableEvent:
    """One event standing for two of the same variable: the newer state, the older old_value."""
    if older.kind is EventKind.SESSION_ENDED:
        return older
    if newer.kind in (EventKind.SESSION_ENDED, EventKind.DELETED):
        return newer
    if older.kind is EventKind.REGISTERED:
        kind = EventKind.REGISTERED
    elif EventKind.RESYNCED in (older.kind, newer.kind):
        kind = EventKind.RESYNCED  # versions between them could not be had: it stays a resync
    else:
        kind = newer.kind
    return replace(newer, kind=kind, old_value=older.old_value, replaces=older.replaces + 1)


COALESCER = Coalescer[VariableEvent](key=_coalescing_key, merge=_merge)


class _RecentUpdates:
    """The wire update of each of the last few events, so a change fanned out to a thousand streams
    is encoded once, not a thousand times. Holding the event keeps its id from being reused."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[int, tuple[VariableEvent, VariableUpdate]] = OrderedDict()

    def update_for(self, event: VariableEvent) -> VariableUpdate:
        entry = self._entries.get(id(event))
        if entry is not None and entry[0] is event:
            return entry[1]
        update = enc.event_update(event)
        self._entries[id(event)] = (event, update)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return update


_RECENT_UPDATES = _RecentUpdates()


@dataclass
class BatchProgress:
    """A batch's send: how far it got when it was cut short (filled in by the ``send`` callable),
    and the means to cut it short while it waits for the client (:meth:`cut`)."""

    messages: int = 0  # whole updates handed to the connection
    mid_message: bool = False  # stopped inside one: the stream can carry no status any more
    #: Set by the ``send`` callable when :meth:`cut` stopped it: the batch went out only in part.
    cut_short: bool = False
    #: :meth:`cut` was called (a send that has not waited yet stops at its first wait).
    cut_requested: bool = False
    #: While the send waits, the cancel scope around that wait (made only by a send that must wait:
    #: one whose client's window is open makes none, which was 13% of a fan-out's CPU).
    waiting: trio.CancelScope | None = None
    #: What else stops the send where it waits, when cancelling ``waiting`` cannot (the web view's: its
    #: server shields socket writes, so the browser's connection is closed instead).
    on_cut: Callable[[], object] | None = None

    def cut(self) -> None:
        """Stop the send where it waits (and at once if it waits later)."""
        self.cut_requested = True
        if self.waiting is not None:
            self.waiting.cancel()
            if self.on_cut is not None:
                self.on_cut()


#: Sends a batch of updates to the client, in order; when cancelled, or cut short by the progress's
#: ``cut``, fills in the progress (then returns, if cut short).
SendBatch = Callable[[list[VariableUpdate], BatchProgress], Awaitable[None]]
#: Sends one update at once, synchronously, and returns True; or returns False, having sent nothing,
#: when it cannot without waiting (or not at all).
SendNow = Callable[[VariableUpdate], bool]
#: An update not encoded yet.
_Encode = Callable[[], VariableUpdate]


class WatchStream:
    """One stream. ``send`` delivers a batch of updates to the client, in order; :meth:`shut_down`
    ends the stream with UNAVAILABLE once what is being sent has gone out."""

    def __init__(
        self,
        store: Store,
        plan: WatchPlan,
        *,
        send: SendBatch,
        queue_size: int = DEFAULT_LIMITS.watch_queue_size,
        queue_bytes: int = DEFAULT_LIMITS.watch_queue_bytes,
        on_sent: Callable[[int], object] = lambda count: None,
        send_now: SendNow | None = None,
    ) -> None:
        self._store = store
        self._send_now = send_now
        self._cache = store.cache
        self._plan = plan
        self._send_batch = send
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._on_sent = on_sent
        self._sent: dict[str, int] = {}  # variable id → highest version put into a batch
        # variable id → the version a resume of this stream starts from: the highest version whose batch
        # was sent, else the version the client held when the stream started (see _initial_updates).
        self._resume_point: dict[str, int] = {}
        self._known: set[str] = set()  # variables the stream has told the client about
        self._ending: BridgeError | None = None
        self._last_sent = 0.0
        self._heartbeat_due = False
        self._subscription: Subscription[VariableEvent] | None = None
        self._shutting_down = False
        self._progress: trio.Event | None = None  # set after the sender's next round, if anyone waits
        self._initial: list[_Encode] = []
        self._sending: BatchProgress | None = None  # the send in flight, cut short by an overflow
        # Every change up to this revision has been delivered (past "synced"; before, what the client
        # said it held): where a resume by revision starts.
        self._delivered_revision = plan.resume_revision
        self._synced = False

    async def run(self) -> NoReturn:
        """Run until the stream ends; raise the BridgeError saying how. Cancelled when the client goes."""
        plan = self._plan
        keys = (
            [session_key(plan.session_id)]
            if plan.variable_ids is None
            else [variable_key(v) for v in plan.variable_ids]
        )
        with (
            self._cache.observers.subscribe(
                keys,
                buffer_size=self._queue_size,
                max_bytes=self._queue_bytes,
                coalescer=COALESCER if plan.coalesce else None,
                on_overflow=self._cut_send_short,
                deliver_now=self._deliver_now,
            ) as subscription,
            contextlib.nullcontext() if plan.passive else self._cache.keep_alive(plan.session_id),
        ):
            self._subscription = subscription
            try:
                await self._cache.checkpoint(SUBSCRIBED_CHECKPOINT)
                self._initial = await self._initial_updates()
                self._last_sent = trio.current_time()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeats, subscription)
                    # The sender is the nursery's body: one Trio task fewer per open stream.
                    await self._sender(subscription, nursery.cancel_scope)
            finally:
                # Unlinked, an ended stream is freed at once rather than by a garbage collection.
                self._subscription = self._sending = None
        ending, self._ending = self._ending, None  # raised, it must not refer back to the stream
        assert ending is not None
        try:
            raise ending
        finally:
            del ending  # nor may this frame, which its traceback holds, refer to it

    # ---- the sender and the heartbeat task ---------------------------------------------------------

    async def _sender(
        self, subscription: Subscription[VariableEvent], nursery_scope: trio.CancelScope
    ) -> None:
        initial, self._initial = self._initial, []
        for start in range(0, len(initial), BATCH_LIMIT):
            if start:
                await trio.lowlevel.checkpoint()  # a long replay lets other streams go on meanwhile
            if self._ending is not None:
                break
            await self._send([encode() for encode in initial[start : start + BATCH_LIMIT]])
        del initial  # an idle stream keeps nothing of it alive
        while self._ending is None:
            if self._shutting_down:
                # Send what was accepted before the server began to drain (it accepts no more),
                # then end: no write that returned OK misses a watcher that was connected.
                events = subscription.take_nowait(BATCH_LIMIT, BATCH_BYTES)
                if not events:
                    self._end(
                        Unavailable(
                            "the server is shutting down; reconnect (to another server, if there are "
                            f"several) and resume from the trailers {RESUME_TRAILER!r} and "
                            f"{RESUME_REVISION_TRAILER!r}",
                            self._resume_trailers(),
                        )
                    )
                    break
            elif self._heartbeat_due:
                events = subscription.take_nowait(BATCH_LIMIT, BATCH_BYTES)
            else:
                try:  # what is queued, else wait until an event comes or _wake interrupts the wait
                    events = await subscription.receive_batch(BATCH_LIMIT, BATCH_BYTES)
                except trio.EndOfChannel:
                    events = []
                    if not subscription.overflowed:  # only an overflow closes it under us
                        raise
            if subscription.overflowed:
                self._end_overflowed()
            if self._ending is not None:
                break
            updates = self._updates_for(events)
            if not updates and self._heartbeat_due and self._idle_for_interval():
                # A bookmark: with nothing queued, every change published so far has been sent.
                position = self._cache.revision if not subscription.pending else self._delivered_revision
                updates = [
                    enc.marker_update(enc.HEARTBEAT, time.time(), max(position, self._delivered_revision))
                ]
            self._heartbeat_due = False
            if updates:
                await self._send(updates)
            if self._progress is not None:
                self._progress.set()
                self._progress = None
        nursery_scope.cancel()

    async def _heartbeats(self, subscription: Subscription[VariableEvent]) -> None:
        interval = self._plan.heartbeat_interval
        while True:
            await trio.sleep_until(self._last_sent + interval)
            if not self._idle_for_interval():
                continue  # something went out meanwhile: the next heartbeat is due later
            progress = self._progress = trio.Event()
            if not subscription.pending:
                self._heartbeat_due = True
                self._wake()
            await progress.wait()  # until the sender has been round once more

    def shut_down(self) -> None:
        """End the stream with UNAVAILABLE (server shutdown) once the changes already queued for it
        have been sent; safe before, during or after ``run``."""
        self._shutting_down = True
        self._wake()

    # ---- helpers -------------------------------------------------------------------------------

    async def _initial_updates(self) -> list[_Encode]:
        """What the stream sends before any change: gone markers, replays or initial values, then
        synced. Read from the store now (right after subscribing); each update is encoded only when the
        sender takes it, a batch at a time, so a long replay starts going out at once, and one cut off
        by a lost connection was not encoded in full for nothing.

        A resume from a revision (``resume_revision``) this server has reached covers the variables
        that ``resume_versions`` does not name: each one's changes since are replayed (or it is resynced
        where they cannot be told), and each variable held at that revision that is gone now is
        reported by id, as those named in ``resume_versions`` are. When the server cannot tell which
        are gone, every covered variable is sent (replayed, else resynced) and ``synced`` carries
        ``{"resync": "all"}``: any other variable the client holds is gone."""
        plan = self._plan
        now = time.time()
        if plan.variable_ids is None:
            snapshots = self._cache.list_variables(plan.session_id)
        else:
            snapshots = self._cache.get_variables(plan.session_id, plan.variable_ids)
        read_at = self._cache.revision
        held_at = plan.resume_revision
        # Per variable covered by ``held_at``: its changes since, or None where they cannot be told. A
        # revision this server has not reached (another deployment's, or state that was lost) says
        # nothing of what the client holds: each one comes as a resync.
        missed_since: dict[str, list[VariableEvent] | None] = {}
        # Which held variables are gone can be told only from a revision this server has reached.
        gone_since: list[str] | None = [] if held_at <= read_at else None
        if held_at > read_at:
            # Nor does the client hold every change up to ``held_at`` of this server's state: a resume
            # of this stream starts from what it is sent now, not from there (the changes between
            # would never come).
            self._delivered_revision = read_at
        if held_at and held_at <= read_at:
            for snapshot in snapshots:
                if snapshot.id not in plan.resume:
                    missed_since[snapshot.id] = await self._store.changes_after_revision(
                        plan.session_id, snapshot.id, held_at, up_to=snapshot.version
                    )
            gone_since = await self._gone_since(snapshots, missed_since)
        complete = gone_since is not None  # the server could tell which held variables went

        def resync(snapshot: VariableSnapshot, where: dict[str, str]) -> VariableUpdate:
            """The current value, standing for changes that cannot be replayed; ``where`` says from where."""
            return enc.snapshot_update(
                snapshot, enc.RESYNC, source="resync", when=now, metadata=where, revision=read_at
            )

        def synced() -> VariableUpdate:
            update = enc.marker_update(enc.SYNCED, now, read_at)
            if not complete:
                update.update_metadata = {"resync": "all"}
            return update

        updates: list[_Encode] = [
            partial(enc.gone_update, identifier, now, read_at)
            for identifier in (*plan.gone, *(gone_since or ()))
        ]
        for snapshot in snapshots:
            self._known.add(snapshot.id)
            resume_from = plan.resume.get(snapshot.id)
            # What the client holds as the stream starts: where a resume from its trailer begins, until
            # a later version is delivered.
            if resume_from is None and held_at:
                # Not named, but the client holds every change up to ``held_at``.
                self._resume_point[snapshot.id] = snapshot.version
                self._sent[snapshot.id] = snapshot.version
                missed = missed_since.get(snapshot.id)
                if missed:
                    updates.extend(partial(enc.event_update, event) for event in missed)
                elif missed is None or not complete:  # unknown, or sent to say it is there
                    updates.append(partial(resync, snapshot, {"resume_revision": str(held_at)}))
                continue
            if resume_from is not None:
                self._resume_point[snapshot.id] = resume_from
            elif not plan.include_initial_values:
                self._resume_point[snapshot.id] = snapshot.version
            else:
                self._resume_point[snapshot.id] = 0  # nothing yet: a resume gets the current value
            if resume_from is not None:
                missed = await self._store.changes_since(
                    plan.session_id, snapshot.id, resume_from, up_to=snapshot.version
                )
                if missed is None:
                    updates.append(partial(resync, snapshot, {"resume_version": str(resume_from)}))
                else:
                    updates.extend(partial(enc.event_update, event) for event in missed)
                self._sent[snapshot.id] = snapshot.version
            elif plan.include_initial_values:
                updates.append(
                    partial(
                        enc.snapshot_update,
                        snapshot,
                        enc.INITIAL_VALUE,
                        source="initial",
                        when=now,
                        revision=read_at,
                    )
                )
                self._sent[snapshot.id] = snapshot.version
        updates.append(synced)
        return updates

    async def _gone_since(
        self,
        snapshots: Sequence[VariableSnapshot],
        missed_since: Mapping[str, list[VariableEvent] | None],
    ) -> list[str] | None:
        """The ids of the variables a client holding the watch as of ``resume_revision`` may hold that
        are gone now and that ``resume_versions`` did not name; None when the store cannot tell.

        A whole-session watch: every variable of the session then that is gone now. A watch of named
        variables: the one that had a watched variable's name then, if that variable was registered
        since (the name was another's; asked of the store only then)."""
        plan = self._plan
        names: set[str] | None = None
        if plan.variable_ids is not None:
            names = set()
            for snapshot in snapshots:
                if snapshot.id not in missed_since:
                    continue  # named in resume_versions
                missed = missed_since[snapshot.id]
                if missed is None or (missed and missed[0].kind is EventKind.REGISTERED):
                    names.add(snapshot.name)
            if not names:
                return []
        deleted = await self._store.deleted_after_revision(plan.session_id, plan.resume_revision)
        if deleted is None:
            return None
        current = {snapshot.id for snapshot in snapshots}  # one deleted since it was read: told live
        told = set(plan.gone)  # by id or by name
        return [
            variable.id
            for variable in deleted
            if variable.id not in current
            and variable.id not in told
            and variable.name not in told
            and (names is None or variable.name in names)
        ]

    def _updates_for(self, events: list[VariableEvent]) -> list[VariableUpdate]:
        updates = []
        for event in events:
            if event.kind is EventKind.SESSION_ENDED or event.variable is None:
                how = "expired" if event.reason == "expired" else "was cleaned up"
                self._end(NotFound(f"session {event.session_id!r} {how}; the watch has ended"))
                break
            if self._told(event):
                continue
            self._take(event)
            updates.append(_RECENT_UPDATES.update_for(event))
        return updates

    def _told(self, event: VariableEvent) -> bool:
        """Whether the client needs nothing sent for ``event`` (of a variable): a deletion of a
        variable it was never told of, or a version already sent (made between subscribing and
        reading)."""
        snapshot = event.variable
        assert snapshot is not None
        if event.kind is EventKind.DELETED:
            return snapshot.id not in self._known
        return snapshot.version <= self._sent.get(snapshot.id, 0)

    def _take(self, event: VariableEvent) -> None:
        """Note that ``event``'s update is put into a batch (``_told`` was False)."""
        snapshot = event.variable
        assert snapshot is not None
        if event.kind is EventKind.DELETED:
            self._known.discard(snapshot.id)
            self._sent.pop(snapshot.id, None)
        else:
            self._sent[snapshot.id] = snapshot.version
            self._known.add(snapshot.id)

    def _deliver_now(self, event: VariableEvent) -> bool:
        """The subscription's ``deliver_now``: called by the publisher (or its dispatch),
        synchronously, while the sender waits for events with nothing queued. Sends ``event``'s
        update at once if ``send_now`` can (the client's window is open, nothing else is being sent),
        with the bookkeeping the sender would do, and returns True; the sender is not woken. Returns
        False, having changed nothing, for everything else (the end of the session, a heartbeat or an
        ending due, a send that would wait, a fault while encoding or sending): the event is then
        queued, and the sender does it all as before (and ends the stream with INTERNAL at a fault)."""
        if (
            self._send_now is None
            or self._ending is not None
            or self._shutting_down
            or self._heartbeat_due
            or self._progress is not None
            or event.kind is EventKind.SESSION_ENDED
            or event.variable is None
        ):
            return False
        try:
            if self._told(event):
                return True  # nothing to send, as the sender would have found
            update = _RECENT_UPDATES.update_for(event)
            if not self._send_now(update):
                return False
        except Exception:  # a fault: never the writer's; the sender meets it again and ends the stream
            return False
        self._take(event)
        self._delivered((update,))
        return True

    async def _send(self, updates: list[VariableUpdate]) -> None:
        """Send a batch; an overflow meanwhile cuts it short (:meth:`_cut_send_short`) and ends the
        stream at once, with what did go out counted as delivered."""
        progress = self._sending = BatchProgress()
        await self._send_batch(updates, progress)
        if not progress.cut_short:
            progress.messages = len(updates)
        self._sending = None
        self._delivered(updates[: progress.messages])
        if progress.messages < len(updates):
            self._end_overflowed(stream_cut=progress.mid_message)

    def _delivered(self, updates: Sequence[VariableUpdate]) -> None:
        """Note that ``updates`` (maybe none) went out whole, now: the next heartbeat is due an interval
        from now, they are counted, and where a resume of the stream starts moves past them."""
        self._last_sent = trio.current_time()
        self._on_sent(len(updates))
        for update in updates:
            if update.update_type == enc.SYNCED:
                self._synced = True
            if self._synced:
                self._delivered_revision = max(self._delivered_revision, update.revision)
            if update.variable is not None:
                if update.update_type == enc.VARIABLE_DELETED:
                    self._resume_point.pop(update.variable_id, None)
                else:
                    self._resume_point[update.variable_id] = update.variable.version

    def _cut_send_short(self) -> None:
        """The subscription overflowed: a send waiting for a client that does not read would hold the
        stream and its memory until it reads again, so stop it now."""
        if self._sending is not None:
            self._sending.cut()

    def _idle_for_interval(self) -> bool:
        return trio.current_time() >= self._last_sent + self._plan.heartbeat_interval

    def _resume_versions(self) -> dict[str, int]:
        """Every variable the stream watches, with the version a resume starts from: the last one
        delivered, else the one the client held when the stream started, else (a variable of a
        session-wide watch registered since) 0, which resumes with its current value as a resync."""
        versions = dict(self._resume_point)
        if self._plan.variable_ids is None:
            with contextlib.suppress(NotFound):  # a session that ended says so to the resume
                for snapshot in self._cache.list_variables(self._plan.session_id):
                    versions.setdefault(snapshot.id, 0)
        return versions

    def _resume_trailers(self) -> dict[str, str]:
        return {
            RESUME_TRAILER: json.dumps(self._resume_versions(), sort_keys=True),
            RESUME_REVISION_TRAILER: str(self._delivered_revision),
        }

    def _end_overflowed(self, *, stream_cut: bool = False) -> None:
        ending = ResourceExhausted(
            f"the watch fell behind by more than its limits watch_queue_size={self._queue_size} updates "
            f"or watch_queue_bytes={self._queue_bytes} (the client reads slower than the variables "
            f"change) and was closed; resume from the versions in trailing metadata "
            f"{RESUME_TRAILER!r}, or watch with option slow_consumer=coalesce",
            self._resume_trailers(),
        )
        ending.stream_cut = stream_cut  # the client holds what it received whole; it resumes from that
        self._end(ending)

    def _end(self, ending: BridgeError) -> None:
        if self._ending is None:
            self._ending = ending

    def _wake(self) -> None:
        if self._subscription is not None:
            self._subscription.interrupt()

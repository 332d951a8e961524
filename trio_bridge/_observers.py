"""Observers: who wants to hear about which variable, and the non-blocking fan-out to them.

Pure Trio. An observer is a :class:`Subscription`: a bounded Trio memory channel registered under one or
more keys (a variable id, or a session id for session-wide events). :meth:`ObserverManager.publish`
delivers an event to every subscription registered under any of the given keys, once each, with
``send_nowait``: a writer never waits on an observer.

When a subscription's buffer is full, one of two policies applies:

* default: the subscription is *overflowed*: it is unregistered, its channel is closed after the events
  already queued, and its ``overflowed`` flag tells the reader that what follows was not delivered;
* coalesce (a :class:`Coalescer` was given): later events wait outside the channel, at most one per
  coalescing key, each merged with the one it replaces, until the reader has emptied the channel.

Either way the memory a subscription holds stays bounded.

A subscription may also take events *directly* (``deliver_now``): while its reader waits on an empty
channel, each event is offered to it, and one it takes (by handling it at once, synchronously) is not
queued and wakes no one. A fan-out to a thousand idle watch streams then costs the thousand hand-offs,
not a thousand Trio tasks woken. An event it declines is queued as usual, and so is every event while
the reader is not waiting: events still reach a subscription in the order published.

The offers are made by the publisher, synchronously, or, once :meth:`ObserverManager.dispatch_later`
has been given a way to schedule them, a little later, all in one go: a writer whose change fans out
to a thousand streams then returns (and answers its own client) first. Until then the events wait in
order on their subscription, and its reader takes them first when it reads (they count in
``pending``), so a reader woken meanwhile misses none.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar, cast

import trio

EventT = TypeVar("EventT")

DEFAULT_BUFFER_SIZE = 1024


class _Interrupted:
    """What :meth:`Subscription.interrupt` hands straight to a waiting reader; never queued."""


_INTERRUPTED = _Interrupted()


@dataclass(frozen=True)
class Coalescer(Generic[EventT]):
    """How a full subscription folds events: ``key`` says which events replace each other, and
    ``merge(older, newer)`` makes the one event that stands for both."""

    key: Callable[[EventT], Hashable]
    merge: Callable[[EventT, EventT], EventT]


class Subscription(Generic[EventT]):
    """One observer. Use it as a context manager: leaving the block, normally, by an exception or by
    cancellation, unregisters it at once, so no observer outlives the task that holds it.
    """

    def __init__(
        self,
        manager: ObserverManager[EventT],
        keys: frozenset[Hashable],
        buffer_size: int,
        coalescer: Coalescer[EventT] | None,
        on_overflow: Callable[[], object] | None = None,
        max_bytes: int | None = None,
        deliver_now: Callable[[EventT], bool] | None = None,
    ) -> None:
        self._manager = manager
        self._buffer_size = buffer_size
        self._deliver_now = deliver_now
        # Events waiting for the manager's dispatch, oldest first (None: none). Invariant, outside a
        # call: there are some only while the channel is empty and nothing is held.
        self._deferred: list[EventT] | None = None
        self._on_overflow = on_overflow
        self._max_bytes = max_bytes
        self._size_of = manager.size_of
        self.queued_bytes = 0  # of the events in the channel, by ``size_of``
        self.keys = keys
        self._send, self._receive = trio.open_memory_channel[EventT | _Interrupted](buffer_size)
        # The channel's own state (trio is pinned): the tasks waiting in ``receive``. A reader is waiting
        # exactly while it is listed there, and then the channel is empty.
        self._readers_waiting = self._send._state.receive_tasks
        self._coalescer = coalescer
        # Coalesced events waiting for room, in arrival order. Invariant, outside a call: events are held
        # only while the channel is not empty, so a reader waiting on an empty channel misses nothing.
        self._held: dict[Hashable, EventT] = {}
        self.overflowed = False
        self.closed = False

    @property
    def receive(self) -> trio.MemoryReceiveChannel[EventT]:
        """The channel itself, for a reader that neither uses :meth:`receive_batch` nor calls
        :meth:`interrupt` (which are made for each other)."""
        return cast("trio.MemoryReceiveChannel[EventT]", self._receive)

    @property
    def pending(self) -> int:
        """Events queued (or waiting for the dispatch) and not yet taken by the reader."""
        deferred = self._deferred
        return (
            self._send.statistics().current_buffer_used
            + len(self._held)
            + (0 if deferred is None else len(deferred))
        )

    def _deliver(self, event: EventT) -> None:
        if self.closed:
            return
        deferred = self._deferred
        if deferred is not None:  # behind those that wait for the dispatch
            if len(deferred) < self._buffer_size:
                deferred.append(event)
                return
            self._take_deferred()  # no more than a channel's worth waits: queue them now
        elif self._deliver_now is not None and self._readers_waiting:
            if self._manager._schedule is not None:
                self._deferred = [event]
                self._manager._defer(self)
                return
            if self._deliver_now(event):
                return  # handled at once: the reader waits on, for the next event
        self._queue(event)

    def _dispatch_deferred(self) -> None:
        """Offer the events waiting for the dispatch to ``deliver_now``, in order, while the reader
        waits; queue the rest."""
        events, self._deferred = self._deferred, None
        for event in events or ():
            if self.closed:
                return
            deliver_now = self._deliver_now
            if not (deliver_now is not None and self._readers_waiting and deliver_now(event)):
                self._queue(event)

    def _take_deferred(self) -> None:
        """Queue the events waiting for the dispatch now, in order (a reader about to read, or too
        many waiting)."""
        events, self._deferred = self._deferred, None
        for event in events or ():
            self._queue(event)

    def _queue(self, event: EventT) -> None:
        """Put ``event`` in the channel (handing it to a waiting reader), or apply the policy of a
        full subscription."""
        if self.closed:
            return
        if self._held:  # already coalescing: keep per-key order behind what is held
            self._hold(event)
            return
        size = self._size_of(event)
        full_by_bytes = (
            self._max_bytes is not None
            and self.queued_bytes + size > self._max_bytes
            and self._send.statistics().current_buffer_used > 0
        )
        if not full_by_bytes:  # full by bytes or by count: the same policies
            try:
                self._send.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The reader went away without closing us; drop the observer instead of the writer.
                self.close()
                return
            else:
                self.queued_bytes += size
                return
        if self._coalescer is None:
            self.overflowed = True
            self.close()
            if self._on_overflow is not None:
                self._on_overflow()
        else:
            self._hold(event)

    def _hold(self, event: EventT) -> None:
        assert self._coalescer is not None
        key = self._coalescer.key(event)
        older = self._held.get(key)
        self._held[key] = event if older is None else self._coalescer.merge(older, event)

    def take_nowait(self, limit: int, max_bytes: int | None = None) -> list[EventT]:
        """Up to ``limit`` queued events (and, past the first, up to ``max_bytes`` of them by
        ``size_of``), oldest first, without waiting (maybe none)."""
        if self._deferred is not None:
            self._take_deferred()
        taken: list[EventT] = []
        size = 0
        while len(taken) < limit and (max_bytes is None or not taken or size < max_bytes):
            try:
                event = cast(EventT, self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            taken.append(event)
            event_size = self._size_of(event)
            size += event_size
            self.queued_bytes -= event_size
        if len(taken) < limit and self._held and self._send.statistics().current_buffer_used == 0:
            # The channel is empty: what was held back comes next, and the channel takes over again.
            taken.extend(self._held.values())
            self._held.clear()
        return taken

    async def receive_batch(self, limit: int, max_bytes: int | None = None) -> list[EventT]:
        """Wait for at least one event, then take up to ``limit``; return ``[]`` at once when
        :meth:`interrupt` is called meanwhile. Raises ``trio.EndOfChannel`` once the subscription is
        closed and emptied. Always a schedule point, so a reader that never runs out of events still
        lets other tasks run; cancellation loses no event (it is not raised once events are taken)."""
        taken = self.take_nowait(limit, max_bytes)
        if taken:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return taken
        first = await self._receive.receive()
        if isinstance(first, _Interrupted):
            return []
        size = self._size_of(first)
        self.queued_bytes -= size
        if max_bytes is not None and size >= max_bytes:
            return [first]
        rest = None if max_bytes is None else max_bytes - size
        return [first, *self.take_nowait(limit - 1, rest)]

    def interrupt(self) -> None:
        """Make a reader waiting in :meth:`receive_batch` return now, with no events (a cheaper way to
        wake it than a cancel scope around every wait). Without a waiting reader, nothing happens."""
        if not self.closed and self._send.statistics().tasks_waiting_receive:
            self._send.send_nowait(_INTERRUPTED)  # handed to the waiter, never put in the buffer

    def close(self) -> None:
        """Unregister; the reader still receives what was queued, then ``EndOfChannel``."""
        if self.closed:
            return
        self.closed = True
        self._manager._unregister(self)
        self._send.close()

    def __enter__(self) -> Subscription[EventT]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self._receive.close()
        self._held.clear()
        self._deferred = None
        # They may refer back to the subscription's owner.
        self._on_overflow = self._deliver_now = None


class ObserverManager(Generic[EventT]):
    """Subscriptions keyed by variable (or session) id, fed without ever blocking the publisher."""

    def __init__(
        self,
        *,
        default_buffer_size: int = DEFAULT_BUFFER_SIZE,
        size_of: Callable[[EventT], int] = lambda event: 0,
    ) -> None:
        if default_buffer_size < 1:
            raise ValueError("default_buffer_size must be at least 1")
        self.default_buffer_size = default_buffer_size
        #: About how much memory an event keeps alive, for subscriptions bounded in bytes.
        self.size_of = size_of
        self._by_key: dict[Hashable, set[Subscription[EventT]]] = {}
        self._count = 0
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self._deferring: list[Subscription[EventT]] = []  # with events waiting for the dispatch

    def dispatch_later(self, schedule: Callable[[Callable[[], None]], object] | None) -> None:
        """From now on, offer events to the subscriptions that take them directly (``deliver_now``)
        not as they are published but in one go, in a callback given to ``schedule`` (called,
        synchronously, by the first publish with offers to make since the last such callback ran; it
        must run the callback soon, once, in this Trio run's thread; if it raises, the offers are made
        at once). ``None``: at once again.
        Offers waiting are made now."""
        self._dispatch()
        self._schedule = schedule

    def _defer(self, subscription: Subscription[EventT]) -> None:
        self._deferring.append(subscription)
        if len(self._deferring) == 1:
            assert self._schedule is not None
            try:
                self._schedule(self._dispatch)
            except Exception:
                self._dispatch()

    def _dispatch(self) -> None:
        subscriptions, self._deferring = self._deferring, []
        for subscription in subscriptions:
            subscription._dispatch_deferred()

    @property
    def observer_count(self) -> int:
        """How many subscriptions are live right now."""
        return self._count

    def subscribers_of(self, key: Hashable) -> int:
        """How many live subscriptions are registered under ``key``."""
        return len(self._by_key.get(key, ()))

    def subscribe(
        self,
        keys: Iterable[Hashable],
        *,
        buffer_size: int | None = None,
        coalescer: Coalescer[EventT] | None = None,
        on_overflow: Callable[[], object] | None = None,
        max_bytes: int | None = None,
        deliver_now: Callable[[EventT], bool] | None = None,
    ) -> Subscription[EventT]:
        """Register a new observer under ``keys``; it hears of every event published from now on.
        It is full at ``buffer_size`` events or at ``max_bytes`` of them by ``size_of`` (whichever
        comes first; an event alone always fits). ``on_overflow`` is called (by the publisher,
        synchronously) when it overflows.

        ``deliver_now(event)``, called by the publisher, synchronously, only while the reader waits on
        an empty channel, handles the event at once and returns True, or returns False (having done
        nothing) to have it queued. It must not raise, await, or publish."""
        size = self.default_buffer_size if buffer_size is None else buffer_size
        if size < 1:
            raise ValueError("buffer_size must be at least 1")
        subscription = Subscription(
            self, frozenset(keys), size, coalescer, on_overflow, max_bytes, deliver_now
        )
        for key in subscription.keys:
            self._by_key.setdefault(key, set()).add(subscription)
        self._count += 1
        return subscription

    def publish(self, keys: Iterable[Hashable], event: EventT) -> None:
        """Queue ``event`` for every observer of any of ``keys``, once each. Never blocks."""
        targets: set[Subscription[EventT]] = set()
        for key in keys:
            subscribers = self._by_key.get(key)
            if subscribers:
                targets.update(subscribers)
        for subscription in targets:
            subscription._deliver(event)

    def _unregister(self, subscription: Subscription[EventT]) -> None:
        for key in subscription.keys:
            subscribers = self._by_key.get(key)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._by_key[key]
        self._count -= 1

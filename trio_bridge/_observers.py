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
    ) -> None:
        self._manager = manager
        self._on_overflow = on_overflow
        self._max_bytes = max_bytes
        self._size_of = manager.size_of
        self.queued_bytes = 0  # of the events in the channel, by ``size_of``
        self.keys = keys
        self._send, self._receive = trio.open_memory_channel[EventT | _Interrupted](buffer_size)
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
        """Events queued and not yet taken by the reader."""
        return self._send.statistics().current_buffer_used + len(self._held)

    def _deliver(self, event: EventT) -> None:
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
        self._on_overflow = None  # it may refer back to the subscription's owner


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
    ) -> Subscription[EventT]:
        """Register a new observer under ``keys``; it hears of every event published from now on.
        It is full at ``buffer_size`` events or at ``max_bytes`` of them by ``size_of`` (whichever
        comes first; an event alone always fits). ``on_overflow`` is called (by the publisher,
        synchronously) when it overflows."""
        size = self.default_buffer_size if buffer_size is None else buffer_size
        if size < 1:
            raise ValueError("buffer_size must be at least 1")
        subscription = Subscription(self, frozenset(keys), size, coalescer, on_overflow, max_bytes)
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

"""A page's live feed: one session, watched as WatchVariables watches it, sent as Server-Sent Events.

The feed is a passive watch (``WatchPlan.passive``: looking is not using, so an open page neither
restarts the session's TTL nor holds it alive) of the whole session, run by the same
:class:`~trio_bridge._watch.WatchStream` that serves WatchVariables: it subscribes, then reads, so no
change falls between the values the page starts from and the changes that follow; per variable it
sends every version once, in order; a page that reads too slowly meets the slow-consumer policy
(``slow_consumer``, ``close`` by default) and the same queue limits; a drain ends it. It is counted
among the server's open streams (``max_watch_streams``, and per connection).

Each update is one SSE event ``update`` (its data: :func:`~trio_bridge._web.views.update_view`).
Once the current values are in (``synced``), each event's ``id`` is the revision up to which the page
holds every change: a browser that reconnects sends it back as ``Last-Event-ID`` and the feed resumes
from it, replaying what was missed, or resyncing the variables it cannot replay and saying so, never a
silent gap. The feed ends with one event ``end``: ``{"status", "message", "resumable"}``.

Numeric variables start with their recent history (up to ``history_points`` changes each, as far as the
session's history reaches back), for their sparklines: the page is sent those changes, oldest first,
instead of the current value alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .._errors import BridgeError, ResourceExhausted, Unavailable
from .._service import UnifiedBridgeService
from .._status import status_of
from .._types import VariableType
from .._watch import BatchProgress, WatchStream, plan_watch
from ..proto import unified_bridge as pb
from .views import update_view

#: Sends bytes of the event stream to the browser; returns once they are handed to the connection.
SendBytes = Callable[[bytes], Awaitable[None]]

#: How long a browser waits before it reconnects a feed that ended (or was cut), in milliseconds.
RECONNECT_MS = 1_000
#: Heartbeats on an idle feed, so proxies and the page both know it is alive.
HEARTBEAT_MS = 15_000
_NUMBERS = (VariableType.FLOAT, VariableType.INTEGER)


def sse_event(event: str, data: object, *, event_id: int | None = None) -> bytes:
    """One Server-Sent Event; ``data`` as JSON (one line: JSON escapes every line break)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {to_json(data)}\n\n".encode()


def to_json(data: object) -> str:
    """``data`` as compact JSON; any non-finite float in it becomes null (JSON has none)."""
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


async def run_feed(
    service: UnifiedBridgeService,
    session_id: str,
    *,
    peer: object,
    send: SendBytes,
    resume_revision: int = 0,
    history_points: int = 0,
    slow_consumer: str = "close",
) -> BridgeError:
    """Run one page's feed until it ends; return the error that ended it (its ``end`` event is the
    caller's to send). Cancelled when the browser goes away: the watch is gone with it."""
    store, limits = service.store, service.limits
    if service.draining:
        return Unavailable("the server is shutting down")
    resume: dict[str, int] = {}
    if history_points and not resume_revision:
        try:
            for snapshot in store.cache.list_variables(session_id):
                if snapshot.type in _NUMBERS and snapshot.version > 1:
                    resume[snapshot.id] = max(1, snapshot.version - history_points)
        except BridgeError as error:
            return error
    heartbeat = min(max(HEARTBEAT_MS, limits.min_heartbeat_interval_ms), limits.max_heartbeat_interval_ms)
    try:
        plan = await plan_watch(
            store,
            session_id=session_id,
            identifiers=(),
            include_initial_values=True,
            options={"heartbeat_interval_ms": str(heartbeat), "slow_consumer": slow_consumer},
            resume_versions=resume,
            resume_revision=resume_revision,
            limits=limits,
            passive=True,
        )
        with service.admit_stream(peer):
            await send(f"retry: {RECONNECT_MS}\n\n".encode())
            watch = WatchStream(
                store,
                plan,
                send=_Sender(send, fresh=not resume_revision).send,
                queue_size=limits.watch_queue_size,
                queue_bytes=limits.watch_queue_bytes,
                on_sent=service.metrics.updates_sent.inc,
            )
            with service.tracked(watch):
                await watch.run()
    except BridgeError as error:
        return error
    raise AssertionError("a watch ends by raising")  # pragma: no cover


class _Sender:
    """A feed's ``send`` for the watch engine: each update as an SSE event, with the page's resume
    revision as its id once the current values are in (as the engine's own resume revision)."""

    def __init__(self, send: SendBytes, *, fresh: bool) -> None:
        self._send_bytes = send
        self._fresh = fresh  # not a resume: the current values the feed starts with are all there are
        self._synced = False
        self._revision = 0

    async def send(self, updates: list[pb.VariableUpdate], progress: BatchProgress) -> None:
        chunks = []
        for update in updates:
            view = update_view(update)
            if update.update_type == "synced":
                self._synced = True
                # Every variable the page holds that was not sent since it connected is gone.
                view["complete_listing"] = self._fresh or view["metadata"].get("resync") == "all"
            event_id = None
            if self._synced:
                self._revision = max(self._revision, update.revision)
                event_id = self._revision
            chunks.append(sse_event("update", view, event_id=event_id))
        with trio.CancelScope() as waiting:
            progress.waiting = waiting
            if progress.cut_requested:
                waiting.cancel()
            await self._send_bytes(b"".join(chunks))
        progress.waiting = None
        if waiting.cancelled_caught:
            # Cut while the browser did not read: how much went out is not known, and the event
            # stream may have stopped inside an event, which the browser then drops: it resumes from
            # the last whole one.
            progress.cut_short = True
            progress.mid_message = True


def end_view(error: BridgeError) -> dict[str, Any]:
    """The ``end`` event's data: the status, the server's message, and whether the page should
    reconnect (and resume) rather than stop."""
    return {
        "status": status_of(error).name,
        "message": error.message,
        "resumable": isinstance(error, Unavailable | ResourceExhausted),
    }

"""A page's live feed: one session, watched as WatchVariables watches it, sent as Server-Sent Events.

The feed is a passive watch (``WatchPlan.passive``: looking is not using, so an open page neither
restarts the session's TTL nor holds it alive) of the whole session, run by the same
:class:`~trio_bridge._watch.WatchStream` that serves WatchVariables: it subscribes, then reads, so no
change falls between the values the page starts from and the changes that follow; per variable it
sends every version once, in order; a drain ends it. It is counted among the server's open streams
(``max_watch_streams``, and ``max_watch_streams_per_connection`` per browser address). A page that
falls behind by the watch queue's limits meets the slow-consumer policy ``close``: its connection is
closed, and the browser reconnects and resumes.

Each update is one SSE event ``update`` (its data: :func:`~trio_bridge._web.views.update_view`).
Once the current values are in (``synced``), each event's ``id`` is ``REVISION@STATE``: the revision up
to which the page holds every change, of the state this server serves (``Store.state_id``). A browser
that reconnects sends it back as ``Last-Event-ID`` and the feed resumes from it, replaying what was
missed, or resyncing what it cannot replay and saying so, never a silent gap; an id of another state
(a restarted in-memory server) starts afresh. The feed ends with one event ``end``:
``{"status", "message", "resumable"}``.

Numeric variables start with their recent history (up to ``history_points`` changes each, as far as the
session's history reaches back), for their sparklines: the page is sent those changes, oldest first,
instead of the current value alone.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import _encoding as enc
from .._errors import BridgeError, InvalidArgument, ResourceExhausted, Unavailable
from .._service import UnifiedBridgeService
from .._status import status_of
from .._types import VariableType
from .._watch import RESUME_TRAILER, BatchProgress, WatchStream, plan_watch
from ..proto import unified_bridge as pb
from .views import update_view

#: Sends bytes of the event stream to the browser; returns once they are handed to the connection.
SendBytes = Callable[[bytes], Awaitable[None]]

#: How long a browser waits before it reconnects a feed that ended (or was cut), in milliseconds.
RECONNECT_MS = 1_000
#: Heartbeats on an idle feed, so proxies and the page both know it is alive.
HEARTBEAT_MS = 15_000
_NUMBERS = (VariableType.FLOAT, VariableType.INTEGER)
_REVISION = re.compile(r"[0-9]{1,20}")


def sse_event(event: str, data: str, *, event_id: str | None = None) -> bytes:
    """One Server-Sent Event; ``data`` is JSON (one line: JSON escapes every line break)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


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
    hang_up: Callable[[], object],
    resume_revision: int = 0,
    history_points: int = 0,
) -> BridgeError:
    """Run one page's feed from ``resume_revision`` (:func:`resume_point`) until it ends; return the
    error that ended it (its ``end`` event is the caller's to send, unless ``stream_cut``). ``peer`` is
    the browser's address, counted against the per-connection stream limit; ``hang_up`` closes its
    connection (the feed calls it when the page falls behind). Cancelled when the browser goes away:
    the watch is gone with it."""
    store, limits = service.store, service.limits
    if service.draining:
        return Unavailable("the server is shutting down; reconnect (to another server, if there are several)")
    try:
        resume: dict[str, int] = {}
        if history_points and not resume_revision:
            for snapshot in store.cache.list_variables(session_id):
                if snapshot.type in _NUMBERS and snapshot.version > 1:
                    resume[snapshot.id] = max(1, snapshot.version - history_points)
        heartbeat = min(max(HEARTBEAT_MS, limits.min_heartbeat_interval_ms), limits.max_heartbeat_interval_ms)
        plan = await plan_watch(
            store,
            session_id=session_id,
            identifiers=(),
            include_initial_values=True,
            options={"heartbeat_interval_ms": str(heartbeat)},
            resume_versions=resume,
            resume_revision=resume_revision,
            limits=limits,
            passive=True,
        )
        with service.admit_stream(
            peer, held_by=f"this browser's host ({host_of(peer)})", streams="live pages"
        ):
            await send(f"retry: {RECONNECT_MS}\n\n".encode())
            sender = _Sender(send, hang_up, state_id=store.state_id, fresh=not resume_revision)
            watch = WatchStream(
                store,
                plan,
                send=sender.send,
                queue_size=limits.watch_queue_size,
                queue_bytes=limits.watch_queue_bytes,
                on_sent=service.metrics.updates_sent.inc,
            )
            with service.tracked(watch):
                await watch.run()
    except BridgeError as error:
        return error
    raise AssertionError("a watch ends by raising")  # pragma: no cover


def host_of(peer: object) -> str:
    """The host a feed's ``peer`` names (``("web", HOST)``), for messages."""
    return str(peer[-1]) if isinstance(peer, tuple) and peer else str(peer)


def resume_point(last_event_id: str | None, state_id: str) -> int:
    """The revision a reconnecting page resumes from: its ``Last-Event-ID``, ``REVISION@STATE``, names
    a revision of the state this server serves. 0 (start afresh, every variable sent) for none, or
    for another state's (a restarted in-memory server's, another deployment's): its revisions say
    nothing of this one's. InvalidArgument for an id no feed sent."""
    if not last_event_id:
        return 0
    revision, _, state = last_event_id.partition("@")
    if not _REVISION.fullmatch(revision) or not state:
        raise InvalidArgument(
            f"Last-Event-ID must be REVISION@STATE, as the feed sent it, got {last_event_id[:80]!r}"
        )
    return int(revision) if state == state_id else 0


class _Sender:
    """A feed's ``send`` for the watch engine: each update as an SSE event, with the page's resume
    point as its id once the current values are in (the engine's own resume revision, and the state
    it belongs to). A send cut short (the page fell behind) hangs up: the server's socket writes cannot
    be cancelled, but a closed connection ends them."""

    def __init__(self, send: SendBytes, hang_up: Callable[[], object], *, state_id: str, fresh: bool) -> None:
        self._send_bytes = send
        self._hang_up = hang_up
        self._state_id = state_id
        self._fresh = fresh  # not a resume: the current values the feed starts with are all there are
        self._synced = False
        self._revision = 0

    async def send(self, updates: list[pb.VariableUpdate], progress: BatchProgress) -> None:
        if progress.cut_requested:  # cut before it began: nothing went out
            progress.cut_short = True
            self._hang_up()
            return
        chunks = []
        for update in updates:
            if update.update_type == enc.SYNCED:
                self._synced = True
                view = update_view(update)
                # Every variable the page holds that was not sent since it connected is gone.
                view["complete_listing"] = self._fresh or view["metadata"].get("resync") == "all"
                data = to_json(view)
            else:
                data = _data_of(update)
            event_id = None
            if self._synced:
                self._revision = max(self._revision, update.revision)
                event_id = f"{self._revision}@{self._state_id}"
            chunks.append(sse_event("update", data, event_id=event_id))
        with trio.CancelScope() as waiting:
            progress.waiting, progress.on_cut = waiting, self._hang_up
            await self._send_bytes(b"".join(chunks))
        progress.waiting = progress.on_cut = None
        if waiting.cancelled_caught or progress.cut_requested:
            # Cut while the page did not read: how much went out is not known, and the event stream
            # may have stopped inside an event, which the browser then drops: it resumes from the last
            # whole one.
            progress.cut_short = True
            progress.mid_message = True


class _RecentData:
    """The event data of each of the last few updates, so a change shown on many pages is turned into
    JSON once (the engine hands every stream the same update for the same event). Holding the update
    keeps its id from being reused."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[int, tuple[pb.VariableUpdate, str]] = OrderedDict()

    def data_of(self, update: pb.VariableUpdate) -> str:
        entry = self._entries.get(id(update))
        if entry is not None and entry[0] is update:
            return entry[1]
        data = to_json(update_view(update))
        self._entries[id(update)] = (update, data)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return data


_data_of = _RecentData().data_of


def end_view(error: BridgeError) -> dict[str, Any]:
    """The ``end`` event's data: the status, the server's message, and whether the page should
    reconnect (and resume) rather than stop."""
    overflowed = isinstance(error, ResourceExhausted) and RESUME_TRAILER in error.details
    return {
        "status": status_of(error).name,
        "message": error.message,
        # The server shutting down, or a page that fell behind: reconnecting resumes it. Not a limit's
        # refusal (the page shows it), nor the session's end.
        "resumable": isinstance(error, Unavailable) or overflowed,
    }

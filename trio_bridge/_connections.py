"""grpclib's server connections, as trio_bridge runs them: writes coalesced per loop turn, and the
defences against clients that abuse HTTP/2 (made for grpclib 0.4.9 and h2 4.x; the version is pinned).

grpclib handles a connection's frames inside ``data_received`` and, as it stood, started a task for every
new stream at once, before any handler (or token check) ran; a stream reset before its task first ran
was never released (the task's ``finally`` never ran). A client opening and resetting streams as fast
as it could (HTTP/2 "Rapid Reset", CVE-2023-44487) grew the server by gigabytes and starved every other
client. :class:`GuardedProtocol` bounds what one connection can make the server do, as nginx, Go and
h2o did for that CVE:

* **Handlers start after the frames that opened them are read**, at most ``max_streams`` at a time per
  connection (a reset stream's handler counts until it has finished, as in Go). A stream reset before
  its handler started never gets one. Streams waiting for a handler stop the connection from being
  read; more than ``4 * max_streams`` waiting is abuse.
* **Budgets per connection, per second**: streams the client resets (``max_stream_resets_per_second``)
  and frames that cost work but carry no request (PING, SETTINGS, PRIORITY, and tiny DATA frames past
  the first few of a stream that are not whole messages: ``max_control_frames_per_second``), each a
  token bucket holding one second's worth; for ten seconds after an address was told to calm down,
  its new connections' buckets start empty (reconnecting buys no new burst).
* **Unsent bytes**: while the connection's socket does not take what the server writes (the client
  does not read: its PING and SETTINGS acknowledgements included), the connection is not read either.
* **Request bytes buffered** for messages not yet read whole, per connection
  (``max_connection_buffer_bytes``) and in all (``max_request_buffer_bytes``), in one ``bytearray`` per
  stream (grpclib kept an object per DATA
  frame: a message sent in 1-byte frames cost some 430 bytes per byte). Over it, the call that went
  over gets RESOURCE_EXHAUSTED naming the limit.
* **Time**: a connection that has not sent the HTTP/2 preface and its SETTINGS within
  ``handshake_timeout`` is closed; one with no stream for ``idle_timeout`` gets a GOAWAY and is closed.

Abuse (a budget overrun, too many waiting streams) is answered with GOAWAY ``ENHANCE_YOUR_CALM`` and the
connection is closed; the other connections never notice. The limits are ``Limits`` fields, each a
``trio-bridge serve`` flag.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpclib.server
from grpclib.protocol import H2Protocol, Stream
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError
from h2.settings import SettingCodes
from h2.stream import StreamState
from hyperframe.frame import Frame, RstStreamFrame

from ._errors import ResourceExhausted
from ._status import RequestCodec

if TYPE_CHECKING:
    from grpclib._typing import IServable

log = logging.getLogger("trio_bridge")

#: Bytes a connection gathers before it writes them without waiting for the loop's next turn.
_FLUSH_AT = 4096
#: A DATA frame smaller than this that does not end its stream, past the first few of a stream, is
#: counted as a control frame: it costs a frame's work for almost no data.
_TINY_FRAME = 1024
_FRAMES_BEFORE_TINY_COUNTS = 4
#: Handlers one connection starts at a time; more wait for the loop's next turn, behind what other
#: connections have queued meanwhile (a burst of streams on one connection delays no one much).
_STARTS_PER_TURN = 4
#: Streams that may wait for a handler on one connection, as a multiple of ``max_streams`` (as Go).
_WAITING_FACTOR = 4


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may make the server do (see the module doc)."""

    max_streams: int = 200
    max_stream_resets_per_second: int = 200
    max_control_frames_per_second: int = 1000
    max_buffer_bytes: int = 8 * 2**20
    max_total_buffer_bytes: int = 256 * 2**20
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0


DEFAULT_CONNECTION_LIMITS = ConnectionLimits()


def raise_fd_limit() -> int:
    """Raise this process's limit on open files from its soft to its hard value (where the system lets
    it); return the limit now in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.debug("could not raise the open-file limit", exc_info=True)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


#: The most connections the default ``max_connections`` allows, whatever the open-file limit.
MAX_DEFAULT_CONNECTIONS = 10_000


def connections_for(fd_limit: int) -> int:
    """The default ``max_connections`` for this process, which may open ``fd_limit`` files: what it
    has open now (the interpreter, Trio's and asyncio's own), and an eighth of the limit, at least 32,
    are kept for everything else (the listener's accepts, files, the metrics endpoint); at most
    ``MAX_DEFAULT_CONNECTIONS``."""
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc here
        open_now = 64
    return max(1, min(MAX_DEFAULT_CONNECTIONS, fd_limit - open_now - max(32, fd_limit // 8)))


class _TokenBucket:
    """``rate`` tokens a second, holding at most one second's worth; ``full`` or empty at first."""

    def __init__(self, rate: int, *, full: bool = True) -> None:
        self._rate = float(rate)
        self._tokens = float(rate) if full else 0.0
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


#: How long an address that was told to calm down gets no burst allowance on new connections.
_PENALTY_SECONDS = 10.0


class _Penalties:
    """Client addresses recently told ENHANCE_YOUR_CALM: their new connections start with empty
    budgets (the steady rate, no burst), so an attacker gains nothing by reconnecting."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def note(self, host: str) -> None:
        now = time.monotonic()
        if len(self._until) > 10_000:  # forget the expired ones (bounded memory)
            self._until = {h: t for h, t in self._until.items() if t > now}
        self._until[host] = now + _PENALTY_SECONDS

    def penalized(self, host: str) -> bool:
        return self._until.get(host, 0.0) > time.monotonic()


def _whole_messages(data: bytes) -> bool:
    """Whether ``data`` (a DATA frame's payload) is one or more whole gRPC messages (a flag byte, a
    4-byte length, that many bytes): a request each, as a producer streams them, which the handler
    pays for as requests, not a message cut into frames to cost work."""
    at, size = 0, len(data)
    while at + 5 <= size and data[at] in (0, 1):
        at += 5 + int.from_bytes(data[at + 1 : at + 5], "big")
    return size > 0 and at == size


_HEADERS_FRAME = 0x1
_END_STREAM_FLAG = 0x1


def _ends_a_stream(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` (whole HTTP/2 frames, as h2 hands them over) holds a HEADERS frame that ends
    its stream: a call's trailers. Anything else (a partial frame, the preface) reads as False."""
    view = memoryview(data)
    at, size = 0, len(view)
    while at + 9 <= size:
        if view[at + 3] == _HEADERS_FRAME and view[at + 4] & _END_STREAM_FLAG:
            return True
        at += 9 + int.from_bytes(view[at : at + 3], "big")
    return False


class _CoalescingTransport(asyncio.Transport):
    """Wraps a connection's transport: bytes written before the event loop's next turn leave in one
    ``write`` then, in the order they were written, or as soon as ``_FLUSH_AT`` bytes are gathered
    (so the first streams of a large fan-out need not wait for the last), or at once with what ends a
    call (its trailers): a writer's reply leaves before the deliveries its write woke, which run
    before the loop's next turn.

    Closing sends what is gathered first; aborting drops it, as aborting the socket would.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._pending: list[bytes] = []
        self._pending_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= _FLUSH_AT or _ends_a_stream(data):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()


class ServerH2Connection(H2Connection):
    """h2's connection, with two shortcuts on the hottest paths:

    * ``_receive_frame`` is h2 4.4's, word for word but its trace line: h2 formats every frame it
      receives (``repr``) for a logger that never logs here, about 4% of the server's CPU per
      streamed write (``tests/test_bridge.py`` checks that h2's own is still the one copied);
    * :meth:`data_frame` makes a DATA frame without h2's frame objects and state machines, which were
      a fifth of a fan-out's CPU (a test checks it against h2's ``send_data``, byte for byte and
      window for window).
    """

    def data_frame(self, stream_id: int, data: bytes) -> bytes | None:
        """The bytes ``send_data(stream_id, data)`` and then ``data_to_send()`` would give (what h2
        had waiting to send, then one DATA frame without flags), with the flow-control windows
        accounted for as ``send_data`` does. None, with nothing done, unless the connection is open,
        the stream open for sending, and the window and the peer's frame size allow all of ``data``:
        ``send_data`` then does what it must (raise, or the caller waits for a window)."""
        stream = self.streams.get(stream_id)
        size = len(data)
        if (
            stream is None
            or self.state_machine.state is not ConnectionState.SERVER_OPEN
            or stream.state_machine.state not in _SENDING_STATES
            or size > self.max_outbound_frame_size
            or size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
        ):
            return None
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        header = size.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")
        waiting = self._data_to_send
        if waiting:
            self._data_to_send = bytearray()
            return bytes(waiting) + header + data
        return header + data

    def _receive_frame(self, frame: Frame) -> list[Event]:
        events: list[Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)

        return events


#: The states of a stream in which a server may send DATA on it.
_SENDING_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class _RequestBuffer:
    """A stream's request bytes received and not yet read, in one ``bytearray``, counted against its
    connection's budget; in place of grpclib's ``Buffer`` (same methods). Flow control is acknowledged
    as bytes arrive (as grpclib did, in effect, while it waited for a message's end), so the budget,
    not the window, bounds what is buffered. Over the budget, the stream's reader gets
    ResourceExhausted and what else comes for it is dropped."""

    def __init__(self, ack: Callable[[int], None], owner: GuardedProtocol) -> None:
        self._ack = ack
        self._owner = owner
        self._data = bytearray()
        self._eof = False
        self._refused: ResourceExhausted | None = None
        self._arrived = asyncio.Event()

    def add(self, data: bytes, ack_size: int) -> None:
        self._ack(ack_size)
        if self._refused is not None:
            return
        refusal = self._owner._buffer_take(len(data))
        if refusal is not None:
            self._refused = refusal
            self._owner._buffer_release(len(self._data))
            self._data = bytearray()
        else:
            self._data += data
        self._arrived.set()

    def eof(self) -> None:
        self._eof = True
        self._arrived.set()

    async def read(self, size: int) -> bytes:
        while len(self._data) < size and not self._eof and self._refused is None:
            self._arrived.clear()
            await self._arrived.wait()
        if self._refused is not None:
            raise self._refused
        if size == 0 or (self._eof and not self._data):
            return b""
        if len(self._data) < size:
            raise AssertionError("Received less data than expected")  # what grpclib raises here
        chunk = bytes(self._data[:size])
        del self._data[:size]
        self._owner._buffer_release(size)
        return chunk

    def unacked_size(self) -> int:
        return 0  # acknowledged on arrival

    def next_message_size(self) -> int | None:
        """The size of the next gRPC message if it is here whole, 0 if reading it would not wait for
        another reason (the request ended, or was refused); None if reading it would wait."""
        end = self._next_message_end()
        if end is not None:
            return end
        return 0 if self._eof or self._refused is not None else None

    def take_message(self, max_bytes: int) -> bytes | None:
        """The body of the next gRPC message, taken out of the buffer, if it has arrived whole, is not
        compressed and is at most ``max_bytes`` long; else None, and nothing taken (reading it the
        usual way then waits for it, or refuses it as it deserves)."""
        data = self._data
        end = self._next_message_end()
        if end is None or data[0] != 0 or end - 5 > max_bytes:
            return None
        body = bytes(data[5:end])
        del data[:end]
        self._owner._buffer_release(end)
        return body

    def _next_message_end(self) -> int | None:
        """Where the next gRPC message (its 5-byte prefix and its body) ends, if it is here whole."""
        data = self._data
        if len(data) >= 5:
            end = 5 + int.from_bytes(data[1:5], "big")
            if len(data) >= end:
                return end
        return None

    def read_to_end(self) -> bool:
        """Whether the request has ended and every byte of it was read."""
        return self._eof and not self._data

    def drop(self) -> None:
        """The stream is released: give its bytes back to the budget."""
        self._owner._buffer_release(len(self._data))
        self._data = bytearray()


class GuardedProtocol(H2Protocol):
    """grpclib's HTTP/2 server protocol on a :class:`_CoalescingTransport`, with the defences of the
    module doc. ``on_made`` says whether the connection may go on (else it is closed before any
    HTTP/2); ``on_lost`` hears when it is gone."""

    def __init__(
        self,
        made: H2Protocol,
        limits: ConnectionLimits,
        on_made: Callable[[GuardedProtocol], bool],
        on_lost: Callable[[GuardedProtocol], None],
        all_buffered: list[int],
        penalties: _Penalties,
    ) -> None:
        super().__init__(made.handler, made.config, made.h2_config)
        self.limits = limits
        self._all_buffered = all_buffered  # one counter, shared by every connection of the server
        self._penalties = penalties
        self.on_made = on_made
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw_transport = cast(asyncio.Transport, transport)
        self._paused: set[str] = set()
        self._greeted = False
        self._calmed = False
        self._live = 0  # handlers started and not finished
        self._start_scheduled = False
        self._waiting: deque[tuple[Stream, Any, Callable[[], None]]] = deque()
        peer = self._raw_transport.get_extra_info("peername")
        self._host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        full = not self._penalties.penalized(self._host)
        self._resets = _TokenBucket(self.limits.max_stream_resets_per_second, full=full)
        self._control = _TokenBucket(self.limits.max_control_frames_per_second, full=full)
        self._frames: dict[int, int] = {}  # stream id → DATA frames received
        self._buffered = 0
        self._timer: asyncio.TimerHandle | None = None
        if not self.on_made(self):
            self._raw_transport.abort()  # over the connection limit: no HTTP/2 at all
            return
        super().connection_made(_CoalescingTransport(self._raw_transport))
        h2_connection = self.connection._connection
        h2_connection.__class__ = ServerH2Connection
        h2_connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_streams})
        self.connection.flush()
        self.connection.create_stream = self._create_stream  # type: ignore[method-assign]
        handler = self.handler
        self._start_handler = handler.accept
        self._cancel_handler = handler.cancel
        handler.accept = self._accept  # type: ignore[method-assign]
        handler.cancel = self._cancel  # type: ignore[method-assign]
        self._arm(self.limits.handshake_timeout, self._handshake_expired)

    # ---- reading, with its budgets -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._calmed:
            return
        try:
            events = self.connection.feed(data)
        except ProtocolError:
            log.debug("protocol error from a client", exc_info=True)
            self.processor.close("Protocol error")
            return
        self.connection.flush()
        for event in events:
            abuse = self._abuse_in(event)
            if abuse is not None:
                self.calm_down(abuse)
                return
            self.processor.process(event)
        self.connection.flush()
        self._start_waiting()
        if len(self._waiting) > _WAITING_FACTOR * self.limits.max_streams:
            self.calm_down(
                f"more than {_WAITING_FACTOR * self.limits.max_streams} streams waiting for a handler "
                f"(four times max_watch_streams_per_connection + 100)"
            )

    def _abuse_in(self, event: object) -> str | None:
        """What ``event`` overran, if anything."""
        if isinstance(event, RequestReceived):
            self._frames[event.stream_id] = 0
        elif isinstance(event, StreamReset):
            self._frames.pop(event.stream_id, None)
            if event.remote_reset and not self._resets.take():
                return (
                    f"more stream resets a second than the limit max_stream_resets_per_second="
                    f"{self.limits.max_stream_resets_per_second}"
                )
        elif isinstance(event, DataReceived):
            count = self._frames.get(event.stream_id, 0) + 1
            self._frames[event.stream_id] = count
            tiny = (
                len(event.data) < _TINY_FRAME
                and event.stream_ended is None
                and not _whole_messages(event.data)
            )
            if tiny and count > _FRAMES_BEFORE_TINY_COUNTS and not self._control.take():
                return self._too_many_control_frames()
        elif isinstance(event, StreamEnded):
            self._frames.pop(event.stream_id, None)
        elif isinstance(event, PingReceived | PriorityUpdated | RemoteSettingsChanged):
            if isinstance(event, RemoteSettingsChanged) and not self._greeted:
                self._greeted = True  # the preface and the client's first SETTINGS
                self._when_idle()
            elif not self._control.take():
                return self._too_many_control_frames()
        return None

    def _too_many_control_frames(self) -> str:
        return (
            f"more PING, SETTINGS, PRIORITY and tiny DATA frames a second than the limit "
            f"max_control_frames_per_second={self.limits.max_control_frames_per_second}"
        )

    def calm_down(self, why: str) -> None:
        """Abuse: GOAWAY with ENHANCE_YOUR_CALM, and close the connection."""
        if self._calmed:
            return
        self._calmed = True
        self._penalties.note(self._host)
        peer = self._raw_transport.get_extra_info("peername")
        log.warning("closing the connection from %s: %s (HTTP/2 ENHANCE_YOUR_CALM)", peer, why)
        self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, why)

    def _go_away(self, code: ErrorCodes, why: str) -> None:
        """GOAWAY with ``code`` and ``why`` as its debug data, and close the connection."""
        self._disarm()
        try:
            self.connection._connection.close_connection(error_code=code, additional_data=why.encode())
            self.connection.flush()
        except Exception:  # the peer may already be gone; closing is all that matters now
            log.debug("GOAWAY failed", exc_info=True)
        self._waiting.clear()
        self.connection.close()
        self.processor.close("Connection closed: " + code.name)

    # ---- handlers: started after the frames that opened them, at most max_streams at a time ------

    def _create_stream(self, *, stream_id: int | None = None, wrapper: Any = None) -> Stream:
        stream = Stream(
            self.connection,
            self.connection._connection,
            self.connection._transport,
            stream_id=stream_id,
            wrapper=wrapper,
        )
        stream.buffer = _RequestBuffer(stream.buffer._ack_callback, self)  # type: ignore[assignment]
        return stream

    def _accept(self, stream: Stream, headers: Any, release_stream: Callable[[], None]) -> None:
        self._disarm()  # no longer idle
        self._waiting.append((stream, headers, self._releaser(stream, release_stream)))

    def _releaser(self, stream: Stream, release_stream: Callable[[], None]) -> Callable[[], None]:
        def release() -> None:
            self._frames.pop(cast(int, stream.id), None)
            buffer = stream.buffer
            if isinstance(buffer, _RequestBuffer):
                buffer.drop()
            release_stream()

        return release

    def _start_waiting(self) -> None:
        started = 0
        while self._waiting and self._live < self.limits.max_streams and not self._calmed:
            if started == _STARTS_PER_TURN:  # the rest after what other connections have queued
                if not self._start_scheduled:
                    self._start_scheduled = True
                    asyncio.get_running_loop().call_soon(self._start_later)
                break
            started += 1
            stream, headers, release = self._waiting.popleft()
            if not stream.closable:  # reset (or its connection closing) before a handler started
                release()
                continue
            self._live += 1
            self._start_handler(stream, headers, release)
            task = self.handler._tasks.get(stream)  # type: ignore[attr-defined]
            if task is None:  # never made (grpclib's handler is closing)
                self._handler_done(stream)
            else:
                task.add_done_callback(lambda _, stream=stream: self._handler_done(stream))
        if self._waiting:
            self._pause("streams wait for a handler")
        else:
            self._resume("streams wait for a handler")
            self._when_idle()

    def _start_later(self) -> None:
        self._start_scheduled = False
        if not self._raw_transport.is_closing():
            self._start_waiting()

    def _cancel(self, stream: Stream) -> None:
        for index, (waiting, _, release) in enumerate(self._waiting):
            if waiting is stream:
                del self._waiting[index]
                release()
                return
        if stream in self.handler._tasks:  # type: ignore[attr-defined]
            self._cancel_handler(stream)

    def _handler_done(self, stream: Stream) -> None:
        # grpclib's handler drops its finished tasks only every tenth stream it accepts: on a closed
        # connection, never; each would keep the stream, and through it the whole connection's h2
        # state, alive until the server swept the connection's handler some connections later.
        self.handler._tasks.pop(stream, None)  # type: ignore[attr-defined]
        wrapper = stream.wrapper
        if wrapper is not None:
            # grpclib's Wrapper keeps the error it raised to end the handler (the client reset the
            # stream, the deadline passed), and that error's traceback holds the handler's frame,
            # which holds the Wrapper: a reference cycle per cancelled call, garbage for a collection.
            wrapper._error = None
        self._live -= 1
        self._start_waiting()

    # ---- the request-bytes budget ------------------------------------------------------------------

    def _buffer_take(self, size: int) -> ResourceExhausted | None:
        """Count ``size`` more request bytes buffered, or say which budget refuses them."""
        for held, limit, name, whose in (
            (self._buffered, self.limits.max_buffer_bytes, "max_connection_buffer_bytes", "this connection"),
            (
                self._all_buffered[0],
                self.limits.max_total_buffer_bytes,
                "max_request_buffer_bytes",
                "the server",
            ),
        ):
            if held + size > limit:
                return ResourceExhausted.over_limit(
                    f"{whose} has more request bytes waiting to be read whole than its limit {name}="
                    f"{limit}; send whole messages, fewer at a time, or retry later",
                    name,
                    limit,
                )
        self._buffered += size
        self._all_buffered[0] += size
        return None

    def _buffer_release(self, size: int) -> None:
        if self._buffered:  # 0 once the connection is gone (its bytes were given back at once)
            self._buffered -= size
            self._all_buffered[0] -= size

    # ---- pausing: unsent bytes, waiting streams ----------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._paused:
            self._raw_transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self._raw_transport.is_closing():
                self._raw_transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._pause("the client does not read")

    def resume_writing(self) -> None:
        super().resume_writing()
        self._resume("the client does not read")

    # ---- time ----------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake_expired(self) -> None:
        if not self._greeted:
            log.info(
                "closing a connection that sent no HTTP/2 preface and SETTINGS within %.0fs (%s)",
                self.limits.handshake_timeout,
                self._raw_transport.get_extra_info("peername"),
            )
            self._raw_transport.abort()

    def _when_idle(self) -> None:
        if self._raw_transport.is_closing():
            return  # a timer would only keep a closed connection's objects alive
        if self._greeted and not self._live and not self._waiting and not self._calmed:
            self._arm(self.limits.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if not self._live and not self._waiting:
            self._go_away(
                ErrorCodes.NO_ERROR,
                f"no call for {self.limits.idle_timeout:.0f}s (idle_connection_timeout_seconds)",
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        # asyncio's socket transport keeps a bound method of its own (the reader it registered), a
        # reference cycle that would make every closed connection garbage for a collection; the
        # reader is never called again once the connection is lost.
        if getattr(self._raw_transport, "_read_ready_cb", None) is not None:
            self._raw_transport._read_ready_cb = None  # type: ignore[attr-defined]
        self._disarm()
        self._waiting.clear()
        # Give back what its streams still hold, whether or not their handlers ever run to release it.
        self._all_buffered[0] -= self._buffered
        self._buffered = 0
        self.on_lost(self)
        if hasattr(self, "processor"):
            super().connection_lost(exc)
            # grpclib's server keeps a connection's handler until a later sweep: it must not keep the
            # connection's objects (its streams, h2's state) alive with it.
            for name in ("accept", "cancel"):
                self.handler.__dict__.pop(name, None)
            self.connection.__dict__.pop("create_stream", None)


class GuardedServer(grpclib.server.Server):
    """A grpclib Server whose connections are :class:`GuardedProtocol`\\ s: it counts them, refuses
    one past ``max_connections`` at once (closing it before any HTTP/2), and closes them all on
    shutdown."""

    def __init__(
        self, handlers: Collection[IServable], limits: ConnectionLimits, max_connections: int
    ) -> None:
        super().__init__(handlers, codec=RequestCodec())
        self.connections: set[GuardedProtocol] = set()
        self.limits = limits
        self.max_connections = max_connections
        self.refused = 0
        self.buffered = [0]  # request bytes buffered on all connections
        self.penalties = _Penalties()
        self._refusal_logged_at = -1e9

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()  # registers the connection's handler with the server
        return GuardedProtocol(
            made, self.limits, self._admit, self.connections.discard, self.buffered, self.penalties
        )

    def _admit(self, protocol: GuardedProtocol) -> bool:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._refusal_logged_at > 10:
                self._refusal_logged_at = now
                log.warning(
                    "refusing connections: %d are open, the limit max_connections=%d (%d refused so far)",
                    len(self.connections),
                    self.max_connections,
                    self.refused,
                )
            return False
        self.connections.add(protocol)
        return True

    def close_connections(self) -> int:
        """Send GOAWAY on every open connection and close it; return how many were closed."""
        closed = 0
        for protocol in list(self.connections):
            connection = getattr(protocol, "connection", None)
            if connection is None or connection.is_closing():
                continue
            try:
                connection._connection.close_connection()
                connection.flush()
            except Exception:  # the peer may already be gone; closing is all that matters now
                log.debug("GOAWAY failed", exc_info=True)
            connection.close()
            closed += 1
        return closed

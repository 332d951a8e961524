"""The client's writes, pipelined over one WriteVariables stream at a time (:class:`Writes`), or sent
with SetVariables (``UseUnary``) to a server that has no such stream."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import decode_metadata
from grpclib.stream import recv_message
from h2.exceptions import StreamClosedError as H2StreamClosedError

from ._client_calls import (
    SERVICE,
    ClientChannel,
    StreamOver,
    accepted,
    connection_lost,
    ended_by_server,
    not_connected,
    retrieve,
    status_error,
)
from ._errors import LIMIT_TRAILER, Unavailable
from ._reach import unreachable
from ._wire import serialize
from .proto import unified_bridge as pb

if TYPE_CHECKING:
    from .client import BridgeClient

log = logging.getLogger("trio_bridge.client")

#: Writes the WriteVariables stream has sent and not yet had answered, at most, and their encoded bytes
#: (one write may go past it alone). Later writes wait to be sent. The server reads the writes it has
#: received in runs, one run at a time, and buffers what comes meanwhile: this keeps that well below
#: its max_connection_buffer_bytes (8 MiB by default).
MAX_WRITES_IN_FLIGHT = 64
MAX_WRITE_BYTES_IN_FLIGHT = 2**20
#: Limits on held-open streams: a write stream they refuse had read nothing, and the writes go by
#: SetVariables instead.
_STREAM_LIMITS = frozenset({"max_watch_streams", "max_watch_streams_per_connection"})

_WRITE_PATH = SERVICE + "WriteVariables"

#: Makes the error one write raises: a new object for each write (never one raised by several).
_ErrorFactory = Callable[[], Exception]


class UseUnary(Exception):
    """The stream did not apply this write and cannot carry it (the server has no WriteVariables, or no
    room for another held-open stream): send it with SetVariables."""


class _PendingWrite:
    """One call's write on its way: its request id, the request encoded, and the future its caller
    awaits (the written variables)."""

    __slots__ = ("data", "future", "request_id")

    def __init__(self, request_id: int, data: bytes, future: asyncio.Future[list[pb.Variable]]) -> None:
        self.request_id = request_id
        self.data = data
        self.future = future

    def settle(self, result: pb.WriteResult, address: tuple[str, int]) -> None:
        """Its result: the variables, or the error the status stands for (as SetVariables raises it)."""
        if self.future.done():  # its caller gave up (a timeout, a cancellation)
            return
        if result.status == Status.OK.value:
            self.future.set_result(result.variables)
            return
        try:
            status = Status(result.status)
        except ValueError:
            status = Status.UNKNOWN
        trailers = {str(k): str(v) for k, v in result.details.items()}
        self.future.set_exception(status_error(status, result.message or None, trailers, address))

    def fail(self, error: _ErrorFactory) -> None:
        if not self.future.done():
            self.future.set_exception(error())


@dataclass(frozen=True)
class _End:
    """How a write stream ended. ``status``: the one the server ended it with (None: the connection
    was lost, or the stream could not be opened); ``accepted``: whether the server had accepted it
    (sent its headers) first, else it read none of the writes."""

    error: _ErrorFactory
    status: Status | None = None
    accepted: bool = True
    limit: str | None = None


def _lost(error: Unavailable) -> _ErrorFactory:
    """A factory of copies of ``error`` (a connection that was lost or could not be made)."""
    return lambda: Unavailable(str(error), error.details, address=error.address, retryable=error.retryable)


class Writes:
    """A client's writes, pipelined over one WriteVariables stream at a time.

    A call queues its write and awaits its own result. The stream is opened by the first write, on
    one of the client's connections (it counts as a held-open stream there, as a watch does), and is
    kept open; a task of its own sends the queued writes in call order (those waiting together in one
    DATA frame), at most ``MAX_WRITES_IN_FLIGHT`` (and ``MAX_WRITE_BYTES_IN_FLIGHT`` bytes) unanswered
    at a time, and another settles each call with its result as the results come back, in the same
    order. Three tasks for the stream (those two and the one that runs it), none per write.

    How a stream ends decides what becomes of the writes it had sent and not had answered:

    * the connection is lost: each raises :class:`Unavailable` (it may or may not have been applied);
    * the server refused the stream before reading anything (trailers only): UNIMPLEMENTED (an older
      server, remembered for its address) or a limit on held-open streams sends them, and every write
      waiting, with SetVariables; any other status is raised by each, as SetVariables would raise it;
    * the server ended it with a status after answering every write it read: none of the others was
      applied. UNAVAILABLE (it shuts down) is raised by each; any other status by the first, which
      caused it (too large, say), and the rest are sent again on a new stream.

    Writes not yet sent go on a new stream, at the next address when the connection cannot be made
    (``also``), and raise the error once every address has failed.
    """

    def __init__(self, client: BridgeClient) -> None:
        self._client = client
        self._waiting: deque[_PendingWrite] = deque()  # to be sent, in call order
        self._in_flight: deque[_PendingWrite] = deque()  # sent on the current stream, not answered
        self._in_flight_bytes = 0
        self._changed: asyncio.Event | None = None  # a write to send, or room to send one
        self._task: asyncio.Task[None] | None = None
        self._request_ids = itertools.count(1)
        #: Addresses whose server answered UNIMPLEMENTED: writes go there by SetVariables.
        self.unsupported: set[tuple[str, int]] = set()

    async def write(self, request: pb.WriteRequest) -> list[pb.Variable]:
        """Queue ``request`` and wait for its result, at most the client's ``timeout`` (then
        :class:`Unavailable`: it may or may not be applied). Raises :class:`UseUnary` if it must go
        by SetVariables. Cancellation: a write not sent yet never is; one sent may still be applied
        (its result is dropped)."""
        loop = asyncio.get_running_loop()
        request.request_id = next(self._request_ids)
        # Encoded here: a value that cannot be encoded raises in its caller, as with SetVariables.
        pending = _PendingWrite(request.request_id, serialize(request), loop.create_future())
        self._waiting.append(pending)
        if self._task is None or self._task.done():
            self._changed = asyncio.Event()
            self._task = loop.create_task(self._run(self._changed))
        else:
            self._wake()
        timeout = self._client.timeout
        try:
            async with asyncio.timeout(timeout):
                return await pending.future
        except TimeoutError:
            if pending.future.done() and not pending.future.cancelled():  # answered as time ran out
                return pending.future.result()
            address = (self._client.host, self._client.port)
            raise Unavailable(
                f"{address[0]}:{address[1]} did not answer a write within {timeout:g}s; it may or may "
                f"not have been applied",
                address=address,
            ) from None

    def close(self) -> None:
        """End the stream (it is reset) and fail every write not answered with :class:`Unavailable`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._fail_everything()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _fail_everything(self) -> None:
        host, port = self._client.host, self._client.port
        for pending in self._in_flight:
            pending.fail(
                lambda: Unavailable(
                    f"{host}:{port}: the client was closed before the write was answered; it may or may "
                    f"not have been applied",
                    address=(host, port),
                )
            )
        for pending in self._waiting:
            pending.fail(
                lambda: Unavailable(
                    f"{host}:{port}: the client was closed before the write was sent", address=(host, port)
                )
            )
        self._in_flight.clear()
        self._in_flight_bytes = 0
        self._waiting.clear()

    # ---- one stream after another ---------------------------------------------------------------

    async def _run(self, changed: asyncio.Event) -> None:
        """Streams, one after the other, for as long as writes wait to be sent. Cancellation (the
        client is closed): every write not answered raises :class:`Unavailable`."""
        client = self._client
        tries = len(client.addresses)
        try:
            while self._waiting:
                address = (client.host, client.port)
                if address in self.unsupported:
                    self._fail_waiting(UseUnary)
                    return
                failure = await self._one_stream(address, changed)
                if failure is None:  # it was opened: writes still waiting go on a new one
                    tries = len(client.addresses)
                    continue
                error, not_connected = failure
                tries -= 1
                if not_connected and tries > 0:  # nothing was sent: try the next address
                    log.info("%s", error)
                    client._move_on(address)
                    continue
                self._fail_waiting(_lost(error))
        except asyncio.CancelledError:
            self._fail_everything()
            raise
        except Exception as exc:  # a fault of this code: no call may wait for ever
            log.exception("the write stream failed", exc_info=exc)
            self._fail_everything()

    def _fail_waiting(self, error: _ErrorFactory) -> None:
        while self._waiting:
            self._waiting.popleft().fail(error)

    async def _one_stream(
        self, address: tuple[str, int], changed: asyncio.Event
    ) -> tuple[Unavailable, bool] | None:
        """One stream, from opening it to its end, which settles the writes it had sent (see the class
        doc). Returns None if it was opened, else why not and whether it was because the connection
        could not be made (nothing was sent either way)."""
        client = self._client
        channel = client._watch_channel()
        client._streams[id(channel)] += 1
        stream = channel.request(
            _WRITE_PATH,
            Cardinality.STREAM_STREAM,
            pb.WriteRequest,
            pb.WriteResult,
            metadata=client._metadata,
        )
        try:
            return await self._open_and_run(stream, channel, address, changed)
        except StreamOver:
            return None
        finally:
            if id(channel) in client._streams:
                client._streams[id(channel)] -= 1
            if connection_lost(channel):
                client._drop(channel)

    async def _open_and_run(
        self, stream: Any, channel: ClientChannel, address: tuple[str, int], changed: asyncio.Event
    ) -> tuple[Unavailable, bool]:
        """Open ``stream`` and run it to its end, raising :class:`StreamOver`; or why it could not be
        opened, and whether because the connection could not be made."""
        async with stream:
            try:
                await stream.send_request()
            except (OSError, StreamTerminatedError) as exc:
                error = await unreachable(exc, *address, self._client._tls, answered=channel.answered)
                return error, isinstance(exc, OSError) and not_connected(exc)
            self._ended(await self._exchange(stream, channel, address, changed), address)
            raise StreamOver  # leave without waiting for trailers: the stream is over

    async def _exchange(
        self, stream: Any, channel: ClientChannel, address: tuple[str, int], changed: asyncio.Event
    ) -> _End:
        """Send and receive on an open stream until it ends (two tasks); how it ended. Cancellation:
        both tasks are cancelled."""
        receiving = asyncio.ensure_future(self._receive(stream, channel, address, changed))
        sending = asyncio.ensure_future(self._send(stream, changed))
        for task in (receiving, sending):
            task.add_done_callback(retrieve)
        try:
            await asyncio.wait((receiving, sending), return_when=asyncio.FIRST_COMPLETED)
            if receiving.done():
                return receiving.result()
            failed = sending.exception()
            if isinstance(failed, (OSError, StreamTerminatedError, H2StreamClosedError)):
                return await receiving  # the stream is gone: its receiving side learns how, and ends
            return self._send_failed(failed, address)
        finally:
            sending.cancel()
            receiving.cancel()

    @staticmethod
    def _send_failed(exc: BaseException | None, address: tuple[str, int]) -> _End:
        """Sending failed for a reason of its own (a fault): the stream is given up (it is reset)."""
        log.error("sending writes to %s:%d failed", *address, exc_info=exc)
        return _End(_lost(Unavailable(f"{address[0]}:{address[1]}: the write stream broke", address=address)))

    def _next_to_send(self) -> _PendingWrite | None:
        """The next write to send, if there is one and room for it in flight."""
        if self._in_flight and (
            len(self._in_flight) >= MAX_WRITES_IN_FLIGHT or self._in_flight_bytes >= MAX_WRITE_BYTES_IN_FLIGHT
        ):
            return None
        while self._waiting:
            pending = self._waiting.popleft()
            if not pending.future.done():  # else its caller gave up before it was sent
                return pending
        return None

    async def _send(self, stream: Any, changed: asyncio.Event) -> None:
        """Send waiting writes in order while there is room, those waiting together in one DATA frame
        (fewer frames and writes than one each). Runs until cancelled (or the stream fails under it:
        a write cut off while being sent counts as sent)."""
        while True:
            batch: list[bytes] = []
            while (pending := self._next_to_send()) is not None:
                self._in_flight.append(pending)
                self._in_flight_bytes += len(pending.data)
                batch += (b"\x00", len(pending.data).to_bytes(4, "big"), pending.data)  # gRPC framing
            if not batch:
                changed.clear()
                await changed.wait()
                continue
            with stream._wrapper:  # as in grpclib's send_message: a stream that ends ends the send
                await stream._stream.send_data(b"".join(batch))

    async def _receive(
        self, stream: Any, channel: ClientChannel, address: tuple[str, int], changed: asyncio.Event
    ) -> _End:
        """Settle the writes in flight with their results, in order, until the stream ends; how it
        ended."""
        try:
            await stream.recv_initial_metadata()
            channel.answered = True
            while (result := await stream.recv_message()) is not None:
                if not self._settle(result, address, changed):
                    return self._out_of_order(address)
            stream._maybe_raise()  # the status in the trailers, which grpclib reads only at the end
            message = f"the write stream from {address[0]}:{address[1]} ended without an error status"
            return _End(_lost(Unavailable(message, address=address)))
        except GRPCError as exc:
            return self._status_end(exc, stream, channel, address)
        except (OSError, StreamTerminatedError) as exc:
            if ended_by_server(stream):  # then reset it, which interrupted grpclib's reading
                return await self._after_reset(stream, channel, address, changed)
            return _End(_lost(await unreachable(exc, *address, self._client._tls, answered=channel.answered)))

    def _settle(self, result: pb.WriteResult, address: tuple[str, int], changed: asyncio.Event) -> bool:
        """Settle the oldest write in flight with ``result``; False if it is not that write's."""
        if not self._in_flight or result.request_id != self._in_flight[0].request_id:
            return False
        pending = self._in_flight.popleft()
        self._in_flight_bytes -= len(pending.data)
        pending.settle(result, address)
        changed.set()  # room for another
        return True

    async def _after_reset(
        self, stream: Any, channel: ClientChannel, address: tuple[str, int], changed: asyncio.Event
    ) -> _End:
        """A stream the server ended with a status and reset: grpclib stops reading it at the reset,
        but the results the server sent before its status are whole in the stream's buffer (which
        ends there): settle their writes, then read the status."""
        while (result := await recv_message(stream._stream, stream._codec, pb.WriteResult)) is not None:
            if not self._settle(result, address, changed):
                return self._out_of_order(address)
        try:
            stream._maybe_raise()
        except GRPCError as exc:
            return self._status_end(exc, stream, channel, address)
        message = f"the write stream from {address[0]}:{address[1]} was reset"
        return _End(_lost(Unavailable(message, address=address)))

    @staticmethod
    def _out_of_order(address: tuple[str, int]) -> _End:
        message = f"{address[0]}:{address[1]} answered a write out of order"
        return _End(_lost(Unavailable(message, address=address)))

    @staticmethod
    def _status_end(exc: GRPCError, stream: Any, channel: ClientChannel, address: tuple[str, int]) -> _End:
        channel.answered = True
        inner = stream._stream
        trailers = {str(k): str(v) for k, v in decode_metadata(inner.trailers or inner.headers or []).items()}
        status, message = exc.status, exc.message
        return _End(
            lambda: status_error(status, message, trailers, address),
            status=status,
            accepted=accepted(stream),
            limit=trailers.get(LIMIT_TRAILER),
        )

    def _ended(self, end: _End, address: tuple[str, int]) -> None:
        """Settle the writes the stream had sent and not had answered, by how it ended (class doc)."""
        unanswered = list(self._in_flight)
        self._in_flight.clear()
        self._in_flight_bytes = 0
        if end.status is None:  # lost
            for pending in unanswered:
                pending.fail(end.error)
            return
        if not end.accepted:  # refused before it read anything: none was applied
            if end.status is Status.UNIMPLEMENTED:
                self.unsupported.add(address)
            unary = end.status is Status.UNIMPLEMENTED or (
                end.status is Status.RESOURCE_EXHAUSTED and end.limit in _STREAM_LIMITS
            )
            for pending in unanswered:
                pending.fail(UseUnary if unary else end.error)
            self._fail_waiting(UseUnary if unary else end.error)
            return
        if end.status is Status.UNAVAILABLE:  # the server shuts down: each was sent when it broke
            for pending in unanswered:
                pending.fail(end.error)
            return
        if unanswered:  # caused by the first; the others were not read
            unanswered[0].fail(end.error)
            self._waiting.extendleft(reversed(unanswered[1:]))

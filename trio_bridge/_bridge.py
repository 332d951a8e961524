"""The trio↔asyncio bridge: grpclib's asyncio server, run and shut down from Trio.

Everything that crosses between the two worlds lives here. grpclib runs on trio-asyncio's loop, which
:func:`open_asyncio_loop` opens inside the calling Trio task, so grpclib handlers and Trio tasks share one
thread.

Shutdown (what happens when the task running :func:`serve_grpc` is cancelled), in steps, because
grpclib's ``Server.close()`` alone sends nothing and leaves accepted connections open:

1. ``drain()`` runs, bounded by ``grace``: the service refuses new calls with UNAVAILABLE, tells its
   streams to end with UNAVAILABLE, and waits for running calls to finish;
2. the listening socket closes and grpclib cancels the handlers still running;
3. every accepted connection gets an HTTP/2 GOAWAY and is closed, so no client waits on a dead peer.

Connections (coalesced writes, the defences against abusive clients) are ``_connections``'.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import grpclib.protocol
import grpclib.server
import outcome
import trio
import trio_asyncio
from h2.errors import ErrorCodes
from sniffio import thread_local as sniffio_library
from trio_asyncio._handles import AsyncHandle

from ._connections import (
    DEFAULT_CONNECTION_LIMITS,
    ConnectionLimits,
    GuardedServer,
    ServerH2Connection,
    _RequestBuffer,
    connections_for,
    raise_fd_limit,
)
from ._errors import InvalidArgument, ResourceExhausted, Unimplemented

if TYPE_CHECKING:
    from grpclib._typing import IServable

log = logging.getLogger("trio_bridge")

T = TypeVar("T")

#: The first byte of a gRPC message's 5-byte prefix: not compressed.
_UNCOMPRESSED_PREFIX = b"\x00"

#: A message at least this long is sent as it is, not joined with others (which would copy it); smaller
#: ones are joined into runs of about this much (an HTTP/2 frame's worth), so a stream whose client
#: does not read holds at most one run of its own.
_SENT_ALONE = 16 * 1024

#: Longest wait for grpclib's handlers to finish after they were cancelled.
_CLOSE_TIMEOUT = 1.0


class _ReadToEnd:
    """What a stream whose request was read to its end keeps instead of grpclib's receive buffer: one
    object shared by all such streams, since nothing more can arrive on them (h2 refuses DATA after
    the peer ended its side). A buffer (an asyncio Queue, its Event and three deques) is about 4 KB."""

    def add(self, data: bytes, ack_size: int) -> None:
        raise AssertionError("data after the end of the request")  # h2 never lets any through

    def eof(self) -> None:
        pass

    async def read(self, size: int) -> bytes:
        return b""

    def unacked_size(self) -> int:
        return 0


_READ_TO_END = _ReadToEnd()
#: Stands in, on every stream whose request was read to its end, for the two events that only a client
#: waits on (a response's headers and trailers arrived).
_CLIENT_SIDE_ONLY = asyncio.Event()


def release_request_buffers(stream: grpclib.server.Stream[Any, Any]) -> bool:
    """Once the client has ended its side of ``stream`` and its request has been read, let go of what
    only reading it needed (about 5.5 KB per stream: the receive buffer, and the two events a client
    waits on for a response's headers and trailers), so a long-lived stream such as a watch holds only
    what sending needs. Returns whether it could (not while request bytes remain to be read)."""
    inner = stream._stream
    buffer = inner.buffer
    if isinstance(buffer, _ReadToEnd):
        return True
    if not cast(_RequestBuffer, buffer).read_to_end():
        return False
    inner.buffer = _READ_TO_END  # type: ignore[assignment]
    inner.headers_received = inner.trailers_received = _CLIENT_SIDE_ONLY
    return True


def next_request_size(stream: grpclib.server.Stream[Any, Any]) -> int | None:
    """The size in bytes of ``stream``'s next request message if it has arrived whole, 0 if reading
    it would not wait for another reason (the request has ended or was refused), None if reading it
    would wait for bytes still to come."""
    buffer = stream._stream.buffer
    if isinstance(buffer, _RequestBuffer):
        return buffer.next_message_size()
    return 0 if isinstance(buffer, _ReadToEnd) else None


def request_at_hand(stream: grpclib.server.Stream[Any, Any], max_bytes: int) -> Any:
    """``stream``'s next request message, read now with no await, if it has arrived whole and can be
    read as it is (not compressed, at most ``max_bytes`` long); None if reading it would wait, or
    must go the usual way (``stream.recv_message()``, which refuses it as it deserves). What
    ``recv_message`` does for such a message, without its two awaited reads: decoded by the stream's
    codec (GRPCError INVALID_ARGUMENT if malformed), and counted; but grpclib's ``RecvMessage`` event
    is not dispatched (the server listens to none: a listener added would miss these messages)."""
    buffer = stream._stream.buffer
    if not isinstance(buffer, _RequestBuffer):
        return None
    body = buffer.take_message(max_bytes)
    if body is None:
        return None
    message = stream._codec.decode(body, stream._recv_type)
    stream._messages_received += 1
    connection = stream._stream.connection
    connection.messages_received += 1
    connection.last_message_received = time.monotonic()
    return message


@contextlib.contextmanager
def request_framing_checked(
    stream: grpclib.server.Stream[Any, Any], max_bytes: int, limit_name: str
) -> Iterator[None]:
    """In the block, make reading ``stream``'s request refuse, before reading a message's body:

    * one longer than ``max_bytes``, with :class:`ResourceExhausted` naming ``limit_name`` (grpclib
      would otherwise buffer whatever length the message's 5-byte gRPC prefix claims, up to 4 GiB);
    * a compressed one, with :class:`Unimplemented` (as gRPC says a server answers an encoding it does
      not support; grpclib raised NotImplementedError, an INTERNAL);

    and a request that ends before the length its prefix claims with :class:`InvalidArgument`
    (grpclib fails an assertion there). grpclib reads a message as its 5-byte prefix, then its body.
    The check is gone after the block (it refers to the stream it is stored on: left there, the two
    would be garbage for a collection instead of freed with the call).
    """
    inner = stream._stream
    read = inner.recv_data
    at_prefix = True

    async def recv_data(size: int) -> bytes:
        nonlocal at_prefix
        if not at_prefix and size > max_bytes:
            raise ResourceExhausted.over_limit(
                f"the request message is {size} bytes, more than its limit {limit_name}={max_bytes}",
                limit_name,
                max_bytes,
            )
        try:
            data = await read(size)
        except AssertionError:
            raise InvalidArgument(
                f"the request ended before the {size} bytes its message prefix announced"
            ) from None
        if not at_prefix:
            at_prefix = True  # a body read: a prefix comes next
        elif data:  # a prefix read (b"": the request ended)
            at_prefix = False
            if data[:1] != _UNCOMPRESSED_PREFIX:
                encoding = stream.metadata.get("grpc-encoding") if stream.metadata else None
                raise Unimplemented(
                    f"the request message is compressed (grpc-encoding: "
                    f"{encoding if isinstance(encoding, str) else 'not given'}); this server accepts "
                    f"only uncompressed messages (grpc-encoding: identity)"
                )
        return data

    inner.recv_data = recv_data  # type: ignore[method-assign]
    try:
        yield
    finally:
        del inner.recv_data


class BatchProgress(Protocol):
    """Where :func:`send_messages` says how far a batch got when it was cut short."""

    messages: int  # whole messages handed to the connection
    mid_message: bool  # cut off inside a message: the stream can carry no more (reset it)


async def send_messages(
    stream: grpclib.server.Stream[Any, Any], messages: Sequence[Any], progress: BatchProgress | None = None
) -> None:
    """Send ``messages`` on a server-streaming ``stream``, in order: the same bytes as one
    ``stream.send_message`` call each, but small messages joined into runs of about a frame's worth
    (one DATA frame and one write for many messages), and a large one handed over as it is, not
    copied, so that the streams it fans out to share its bytes.

    Cancellation: as ``send_message``; a batch cut short by it may have gone out in part, in order:
    ``progress`` then says how many messages went out whole, and whether it stopped inside one.
    Like :func:`release_request_buffers`, it works on grpclib 0.4's stream internals (the version is
    pinned; the tests cover both).
    """
    if not messages:
        return
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    codec, message_type = stream._codec, stream._send_type
    inner = stream._stream
    started_at = inner.data_sent
    ends: list[int] = []  # where each message ends, in bytes from the start of the batch
    try:
        run: list[bytes] = []  # small messages joined, up to a frame's worth: the only copy made
        run_size = 0
        for message in messages:
            data = codec.encode(message, message_type)
            ends.append((ends[-1] if ends else 0) + 5 + len(data))
            run.append(_UNCOMPRESSED_PREFIX + len(data).to_bytes(4, "big"))
            if len(data) >= _SENT_ALONE:  # as it is: every stream shares its bytes
                await _send_data(inner, b"".join(run))
                await _send_data(inner, data)
                run, run_size = [], 0
                continue
            run.append(data)
            run_size += 5 + len(data)
            if run_size >= _SENT_ALONE:
                await _send_data(inner, b"".join(run))
                run, run_size = [], 0
        if run:
            await _send_data(inner, b"".join(run))
    except BaseException:
        if progress is not None:
            sent = inner.data_sent - started_at
            progress.messages = bisect.bisect_right(ends, sent)
            progress.mid_message = sent != (ends[progress.messages - 1] if progress.messages else 0)
        raise
    _count_sent(stream, len(messages))


def _count_sent(stream: grpclib.server.Stream[Any, Any], messages: int) -> None:
    """What grpclib's ``send_message`` counts, for ``messages`` messages sent on ``stream``."""
    stream._send_message_done = True
    stream._messages_sent += messages
    connection = stream._stream.connection
    connection.messages_sent += messages
    connection.last_message_sent = time.monotonic()


def send_message_now(stream: grpclib.server.Stream[Any, Any], message: Any) -> bool:
    """Send ``message`` on a server-streaming ``stream`` at once, synchronously, as one DATA frame (the
    same bytes as ``stream.send_message``), and return True; or return False, with nothing sent, when
    that would wait: the stream's headers not sent yet, the connection not taking writes, or the
    window or the frame size too small (and when the stream is closed). The caller then sends it the
    usual way (:func:`send_messages`), which waits or fails as it must.

    Never a schedule point, never cancelled: it is meant for a publisher handing a change to many idle
    streams, none of which has anything in flight (it must not be called while another send is under
    way on ``stream``: its bytes could go out in the middle of that send's)."""
    if not stream._send_initial_metadata_done:
        return False
    data = stream._codec.encode(message, stream._send_type)
    if not _send_data_now(stream._stream, _UNCOMPRESSED_PREFIX + len(data).to_bytes(4, "big") + data):
        return False
    _count_sent(stream, 1)
    return True


async def _send_data(inner: grpclib.protocol.Stream, data: bytes) -> None:
    """grpclib's ``Stream.send_data``: without its awaits when ``data`` can go at once
    (:func:`_send_data_now`), then it never waits; otherwise grpclib's, which waits for what it needs."""
    if not _send_data_now(inner, data):
        await inner.send_data(data)


def _send_data_now(inner: grpclib.protocol.Stream, data: bytes) -> bool:
    """Write ``data`` as one DATA frame now, without grpclib's awaits and copies or h2's frame objects,
    counted as grpclib's ``send_data`` counts it, and return True; or return False, with nothing done,
    unless the connection takes writes and ``ServerH2Connection.data_frame`` can make the frame (the
    stream open, the window and the frame size allowing it)."""
    connection = inner.connection
    h2_connection = inner._h2_connection
    if not (connection.write_ready.is_set() and isinstance(h2_connection, ServerH2Connection)):
        return False
    frame = h2_connection.data_frame(cast(int, inner.id), data)
    if frame is None:
        return False
    inner._transport.write(frame)
    size = len(data)
    inner.data_sent += size
    connection.data_sent += size
    connection.data_send_process()
    return True


def reset_stream(stream: grpclib.server.Stream[Any, Any], error_code: ErrorCodes) -> None:
    """End ``stream`` with an HTTP/2 RST_STREAM now (not waiting for the connection to take more
    bytes); grpclib then sends nothing more on it."""
    inner = stream._stream
    if inner.closable:
        inner.reset_nowait(error_code)
    stream._cancel_done = True


async def run_in_trio(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """From asyncio (a grpclib handler): run the Trio function ``fn`` in a Trio task and return its
    result (or raise its exception).

    Cancelling the awaiting asyncio task (grpclib does so when the client resets the stream, its
    deadline passes or its connection drops) cancels the Trio task: that is how Trio code learns that
    the peer is gone.

    Nothing of the call is left in a reference cycle (it is freed when it ends, not by a garbage
    collection): what ``fn`` raises crosses over as an outcome, not through trio-asyncio's frames
    (one of which would hold it), and trio-asyncio's future lets go of the closure it is given that
    refers back to the future's own handle.
    """
    future = cast(Any, asyncio.get_running_loop()).trio_as_future(_captured, fn, *args)
    try:
        captured: outcome.Outcome[T] = await future
    finally:
        del future.cancel  # AsyncHandle's wrapped_cancel, which refers to the handle holding the future
        del future  # it holds the outcome
    try:
        return captured.unwrap()
    finally:
        del captured  # it holds the exception raised, whose traceback holds this frame


async def _captured(fn: Callable[..., Awaitable[T]], *args: object) -> outcome.Outcome[T]:
    """In the Trio task: ``fn``'s result or exception as an outcome. BaseExceptions propagate as
    they would have: trio.Cancelled belongs to the cancel scope trio-asyncio put around this task."""
    try:
        return outcome.Value(await fn(*args))
    except Exception as exc:
        return outcome.Error(exc)


def call_soon_in_asyncio(callback: Callable[[], object]) -> None:
    """From Trio: run ``callback`` on asyncio's loop after the callbacks queued there now (those that
    the calling Trio task queues before its next checkpoint included)."""
    trio_asyncio.current_loop.get().call_soon(callback)


def after_asyncio_queue(callback: Callable[[], object]) -> None:
    """From Trio: run ``callback`` on asyncio's loop after the callbacks queued there now, and after
    those queued before these have run (the steps of handlers that a Trio task wakes by returning to
    them, before its next checkpoint: a writer's reply to its call). For what may wait until the
    calls that caused it have answered (the offers of a fan-out: ``ObserverManager.dispatch_later``)."""
    loop = trio_asyncio.current_loop.get()
    loop.call_soon(loop.call_soon, callback)


class CutShort(Exception):
    """Raised by :func:`run_in_asyncio` when its ``cut`` stopped the coroutine where it waited."""


class Cuttable(Protocol):
    """What lets another task stop a :func:`run_in_asyncio` where it waits, with no cost to one that
    never waits: it sets ``cut_requested`` and cancels ``waiting`` (the scope around the wait, if any).
    ``cut_short`` is set once it did stop one."""

    cut_requested: bool
    cut_short: bool
    waiting: trio.CancelScope | None


async def run_in_asyncio(
    fn: Callable[..., Coroutine[Any, Any, T]], *args: object, cut: Cuttable | None = None
) -> T:
    """From Trio: run the asyncio coroutine function ``fn`` (grpclib's sending) and return its result.

    The coroutine runs in the calling Trio task, driven step by step as an asyncio task would drive
    it: when it waits for an asyncio future (a flow-control window, a paused transport), the Trio task
    sleeps until the future is done (the future's done-callback wakes it). It is never handed to an
    asyncio task: that cost a task, a round through trio-asyncio's loop each way, and, with thousands
    of blocked streams, queues of such rounds that every other call waited behind. So ``fn`` must not
    need ``asyncio.current_task()`` (grpclib's sends do not).

    Cancellation and scheduling: a coroutine that never waits runs like a synchronous call: no
    checkpoint, no schedule point (one would cost a Trio scheduling round per send, about 10 µs; the
    caller's own loop has a schedule point where it waits for work). Cancelling the Trio caller while
    the coroutine waits cancels the future it waits for and throws ``asyncio.CancelledError`` into it
    at once, where it waits, as asyncio's ``Task.cancel`` would; then ``trio.Cancelled`` is raised
    (or whatever else the coroutine raised while it was cancelled).

    With ``cut``: each wait is made in a cancel scope ``cut.waiting`` (a coroutine that never waits
    makes none), and a cut (``cut_requested``) stops the coroutine where it waits, as a cancellation
    does, then raises :class:`CutShort`, with ``cut.cut_short`` set.
    """
    coroutine = fn(*args)
    try:
        waiting_on = coroutine.send(None)
        while True:
            try:
                if cut is None:
                    await _until_done(waiting_on)
                else:
                    with trio.CancelScope() as cut.waiting:
                        if cut.cut_requested:
                            cut.waiting.cancel()
                        await _until_done(waiting_on)
                    cut.waiting = None
                    if cut.cut_requested and not _waiting_on_done(waiting_on):
                        _cancel_where_it_waits(coroutine, waiting_on)
                        cut.cut_short = True
                        raise CutShort
            except trio.Cancelled:
                _cancel_where_it_waits(coroutine, waiting_on)
                raise
            waiting_on = coroutine.send(None)
    except StopIteration as finished:
        return cast(T, finished.value)
    finally:
        coroutine.close()  # a no-op once it has finished


def _waiting_on_done(waiting_on: object) -> bool:
    """Whether what an asyncio coroutine yielded to its driver is done (a bare yield always is)."""
    return waiting_on is None or cast(asyncio.Future[Any], waiting_on).done()


async def _until_done(waiting_on: object) -> None:
    """Sleep until ``waiting_on`` (what an asyncio coroutine yielded to its driver: a future, or None
    for a bare yield) is done. Cancellation: stops waiting, leaves the future alone."""
    if waiting_on is None:  # asyncio.sleep(0): let the others run
        await trio.lowlevel.checkpoint()
        return
    if not asyncio.isfuture(waiting_on):
        raise RuntimeError(f"an asyncio coroutine yielded {waiting_on!r}, not a future")
    future = waiting_on
    future._asyncio_future_blocking = False  # as asyncio's Task does with what it is handed
    if future.done():
        return
    task = trio.lowlevel.current_task()
    aborted = False

    def wake(_: object) -> None:
        if not aborted:
            trio.lowlevel.reschedule(task)

    def abort(_: object) -> trio.lowlevel.Abort:
        # A future done already has queued its callbacks on asyncio's loop, where removing one no
        # longer stops it: the wake-up may still run, after the task has gone on (or ended).
        nonlocal aborted
        aborted = True
        future.remove_done_callback(wake)
        return trio.lowlevel.Abort.SUCCEEDED

    future.add_done_callback(wake)
    await trio.lowlevel.wait_task_rescheduled(abort)


def _cancel_where_it_waits(coroutine: Coroutine[Any, Any, Any], waiting_on: object) -> None:
    """Cancel ``coroutine`` as asyncio's ``Task.cancel`` does: the future it waits for, and a
    CancelledError thrown in where it waits, which it is expected to let out. One that waits again
    instead is closed."""
    if asyncio.isfuture(waiting_on):
        waiting_on.cancel()
    try:
        coroutine.throw(asyncio.CancelledError())
    except (asyncio.CancelledError, StopIteration):
        return
    coroutine.close()


@dataclass(frozen=True)
class BoundAddress:
    host: str
    port: int
    #: How many client connections are open right now.
    open_connections: Callable[[], int] = lambda: 0


async def serve_grpc(
    services: Collection[IServable],
    *,
    host: str,
    port: int,
    drain: Callable[[], Awaitable[None]],
    grace: float,
    connection_limits: ConnectionLimits = DEFAULT_CONNECTION_LIMITS,
    max_connections: int = 0,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[BoundAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port`` until cancelled, then shut down in steps (module doc). Runs
    inside :func:`open_asyncio_loop`.

    ``max_connections`` 0 derives the limit from the open-file limit, which is raised from its soft to
    its hard value (``_connections.connections_for``). ``task_status.started`` receives the bound
    address (``port=0`` picks a free port). Shutdown is
    shielded from the cancellation that triggers it and takes at most ``grace`` plus about a second.
    """
    server = GuardedServer(services, connection_limits, max_connections)
    await trio_asyncio.aio_as_trio(server.start)(host, port, ssl=tls)
    if not max_connections:  # derived, now that the loop and the listener have their files
        server.max_connections = connections_for(raise_fd_limit())
    listener = cast(asyncio.Server, server._server)
    bound = listener.sockets[0].getsockname()
    log.info("gRPC server listening on %s:%d", bound[0], bound[1])
    task_status.started(
        BoundAddress(host=bound[0], port=bound[1], open_connections=lambda: len(server.connections))
    )
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await _shut_down(server, drain, grace)


@contextlib.asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    """The asyncio loop (trio-asyncio's) that a server's asyncio side runs on, open for the block:
    grpclib's server, and the etcd store's client. Its errors are logged; its ready callbacks run in
    batches (``_run_callbacks_in_batches``)."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        _run_callbacks_in_batches(loop)
        yield loop


#: How long trio-asyncio's loop runs ready asyncio callbacks before it lets Trio's tasks run.
_CALLBACK_BATCH_SECONDS = 0.002


def _run_callbacks_in_batches(loop: trio_asyncio.TrioEventLoop) -> None:
    """Make ``loop`` run the asyncio callbacks that are ready in batches of up to
    ``_CALLBACK_BATCH_SECONDS``, as asyncio's own loop runs what is ready, rather than one per round of
    Trio's scheduler (trio-asyncio 0.16 runs one callback, then a schedule point with a cancel scope).

    One a round cost a full round of the scheduler per callback (every Trio task, an epoll check, a
    cancel scope made and closed): under load, hundreds of callbacks queued, and a call's every step
    waited behind all of them, one round each (the good client's p99 during an abuse test, issue #10).
    Order is kept: callbacks run in the order they were queued, timers when they are due; the Trio
    tasks that callbacks start (``trio_as_aio``) have all started before the next batch (trio-asyncio
    waited for each). Cancellation: as trio-asyncio's loop (shielded; it ends when the loop is
    stopped).
    """
    run_one = loop._main_loop_one
    queue = loop._q_recv
    timers: list[asyncio.TimerHandle] = loop._timers

    async def run_ready(no_wait: bool = False) -> None:
        await run_one(no_wait)  # waits for the first callback (or the first timer due)
        if no_wait:
            return
        last_started: AsyncHandle | None = None
        until = time.perf_counter() + _CALLBACK_BATCH_SECONDS
        while time.perf_counter() < until:
            if timers and timers[0].when() <= loop.time():
                handle: asyncio.Handle = heapq.heappop(timers)
            else:
                try:
                    handle = queue.receive_nowait()
                except trio.WouldBlock:
                    break
                if isinstance(handle, asyncio.TimerHandle):
                    heapq.heappush(timers, handle)
                    continue
            if isinstance(handle, AsyncHandle):  # a Trio task to start
                handle._context.run(loop._nursery.start_soon, handle._run, name=handle._callback)
                last_started = handle
            elif not handle.cancelled():
                previous, sniffio_library.name = sniffio_library.name, "asyncio"
                try:
                    handle._run()
                finally:
                    sniffio_library.name = previous
        if last_started is not None:  # the batch's Trio tasks run before the next batch
            await last_started._started.wait()

    loop._main_loop_one = run_ready


_ACCEPT_FAILED = "socket.accept() out of system resource"
_accept_failures = {"count": 0, "logged_at": -1e9}


def _log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's report of an error no task was there to catch: logged, never raised. (trio-asyncio's
    own handler raises it into the loop's nursery, which ended the server: an ``accept`` that ran out
    of file descriptors did.) asyncio backs off from a failed ``accept`` for a second and tries again;
    that is logged once every ten seconds, with a count, not once per connection."""
    if context.get("message") == _ACCEPT_FAILED:
        _accept_failures["count"] += 1
        now = time.monotonic()
        if now - _accept_failures["logged_at"] >= 10:
            _accept_failures["logged_at"] = now
            log.error(
                "cannot accept connections: %s (%d time(s) so far); retrying every second; see "
                "--max-connections",
                context.get("exception"),
                _accept_failures["count"],
            )
        return
    exception = context.get("exception")
    log.error("asyncio: %s", context.get("message", "error"), exc_info=exception)


async def _shut_down(server: GuardedServer, drain: Callable[[], Awaitable[None]], grace: float) -> None:
    with trio.move_on_after(grace) as drain_scope:
        await drain()
    if drain_scope.cancelled_caught:
        log.warning("calls still running after %.1fs of grace; cancelling them", grace)
    server.close()
    closed = server.close_connections()
    with trio.move_on_after(_CLOSE_TIMEOUT) as close_scope:
        await trio_asyncio.aio_as_trio(server.wait_closed)()
    if close_scope.cancelled_caught:
        log.warning("grpclib handlers did not finish within %.1fs", _CLOSE_TIMEOUT)
    log.info("gRPC server stopped (%d connection(s) closed)", closed)

"""The blocking Python client, for scripts, notebooks and training loops: :class:`BridgeClient`'s
methods, called without ``await``.

>>> with SyncBridgeClient("127.0.0.1", 50051) as client:
...     session = client.create_session().session_id
...     client.register_variable(session, "temperature", "float", 21.5)
...     with client.watch(session, ["temperature"]) as events:
...         for event in events:
...             print(event.kind, event.variable.value if event.variable else "")

Each client runs one daemon thread with an asyncio event loop of its own, and a :class:`BridgeClient`
on it; every call is handed to that loop and waited for. So it works the same whether or not the
calling thread runs an event loop of its own (Jupyter does): that loop is never used, only blocked
for the length of each call, as any blocking call blocks it. One client may be used from several
threads at once.

Ctrl-C (``KeyboardInterrupt``) while a call or a watch blocks cancels that call, or ends that watch's
server stream, on the client's loop, and propagates at once; the client stays usable. Errors are the
async client's, raised in the calling thread: ``NotFound``, ``InvalidArgument``, ``VersionConflict``,
``Unavailable``, ... with the server's message. A closed client raises :class:`ClientClosed`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import ssl
import sys
import threading
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

from grpclib.config import Configuration

from ._types import Constraints, VariableType
from .client import BridgeClient, Reconnect, Variable, WatchEvent
from .storage.records import SessionInfo

__all__ = ["ClientClosed", "SyncBridgeClient", "SyncWatch"]

T = TypeVar("T")

#: In the main thread, how often (seconds) a blocked wait wakes to let a pending Ctrl-C through: a
#: blocked lock does not see one on every platform (Windows), nor one raised by
#: ``_thread.interrupt_main``. Other threads never receive KeyboardInterrupt: they block outright.
_INTERRUPT_CHECK: Final = 0.1
#: When closing, how long (seconds) a cancelled task may take to end before its connection is closed
#: under it (only a task that ignored its cancellation takes any time at all).
_SHUTDOWN_GRACE: Final = 1.0


class ClientClosed(RuntimeError):
    """The :class:`SyncBridgeClient` was closed (before the call, or while it was in flight)."""


# ---- waiting, interruptibly ---------------------------------------------------------------------


def _block(done: Callable[[float | None], bool]) -> None:
    """Call ``done(timeout)``, a blocking wait that says whether what it waits for happened, until it
    did. In the main thread each wait lasts at most ``_INTERRUPT_CHECK``, so a KeyboardInterrupt is
    raised from here promptly (nothing is polled: each wait blocks until its event or timeout)."""
    if threading.current_thread() is threading.main_thread():
        while not done(_INTERRUPT_CHECK):
            pass
    else:
        while not done(None):
            pass


def _await_future(future: concurrent.futures.Future[T], runtime: _Runtime) -> T:
    """The result of ``future`` (a coroutine running on the client's loop), raised as it raised.

    Interrupted (KeyboardInterrupt, or any exception raised in the waiting thread), the coroutine is
    cancelled on the loop and the exception propagates without waiting for the cancellation to end.
    A coroutine cancelled because the client was closed raises :class:`ClientClosed`."""
    try:
        _block(lambda timeout: bool(concurrent.futures.wait([future], timeout).done))
    except BaseException:
        future.cancel()
        raise
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        if runtime.closed:
            raise ClientClosed(f"{runtime.name} was closed while the call was in flight") from None
        raise


def _new_loop() -> asyncio.AbstractEventLoop:
    """A standard asyncio loop of the platform's default kind, whatever event loop policy the process
    installed (trio-asyncio's, for one, hands out Trio-backed loops outside Trio)."""
    if sys.platform == "win32":
        return asyncio.ProactorEventLoop()
    return asyncio.SelectorEventLoop()


# ---- the background thread ----------------------------------------------------------------------


class _Runtime:
    """One daemon thread running one asyncio loop until :meth:`close`. Refers to no
    SyncBridgeClient, so that an abandoned client can be finalized (which closes this)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = _new_loop()
        self.closed = False
        self.client: BridgeClient | None = None  # set on the loop, before any call is submitted
        #: The running watches (the loop holds only weak references to their tasks). On the loop only.
        self.feeds: set[_Feed] = set()
        # Orders submissions before closing. Reentrant: a SyncWatch collected (by the cyclic garbage
        # collector) while this thread holds it may cancel its stream from __del__.
        self._lock = threading.RLock()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        loop = self.loop
        try:
            loop.run_forever()
        finally:
            try:
                # What close() left (a call submitted as it closed): cancel it, and let it end.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_SHUTDOWN_GRACE))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def _check_caller(self) -> None:
        if threading.current_thread() is self.thread:
            raise RuntimeError(f"{self.name} cannot be called from its own event loop")

    def submit(self, make: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``make()`` on the loop; raise ClientClosed if the client is closed."""
        self._check_caller()

        async def run() -> T:
            return await make()

        with self._lock:
            if self.closed:
                raise ClientClosed(f"{self.name} is closed")
            return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def call(self, make: Callable[[BridgeClient], Awaitable[T]]) -> T:
        """Run ``make(client)`` on the loop and wait for its result (see :func:`_await_future`)."""

        def with_client() -> Awaitable[T]:
            assert self.client is not None
            return make(self.client)

        return _await_future(self.submit(with_client), self)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop, soon, in order with submissions; raise ClientClosed if the
        client is closed."""
        with self._lock:
            if self.closed:
                raise ClientClosed(f"{self.name} is closed")
            self.loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        """Cancel every call and watch on the loop, close the connections, stop the loop and the thread.
        Idempotent. Interrupted, it still stops the loop, and waits for the thread to end."""
        with self._lock:
            already, self.closed = self.closed, True
        if threading.current_thread() is self.thread:  # finalized on the loop: nobody to wait
            if not already:
                self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._shutdown(stop=True)))
            return
        if not already:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(stop=False), self.loop)
            try:
                _block(lambda timeout: bool(concurrent.futures.wait([future], timeout).done))
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
        _block(self._joined)

    def _joined(self, timeout: float | None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    async def _shutdown(self, *, stop: bool) -> None:
        """Cancel every task (watches and calls), so that each resets its stream; then close the
        connections. Should a task outlive its cancellation for ``_SHUTDOWN_GRACE`` seconds, the
        connections close under it, which ends it."""
        for feed in list(self.feeds):
            feed.cancel()
        current = asyncio.current_task()
        others = {task for task in asyncio.all_tasks(self.loop) if task is not current}
        for task in others:
            task.cancel()
        if others:
            _, others = await asyncio.wait(others, timeout=_SHUTDOWN_GRACE)
        if self.client is not None:
            self.client.close()
        await asyncio.sleep(0)  # the transports' connection_lost callbacks run: no unclosed sockets
        if others:
            await asyncio.wait(others, timeout=_SHUTDOWN_GRACE)
        if stop:
            self.loop.stop()


# ---- watches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ended:
    """The last item of a watch's queue: how its stream ended."""

    error: Exception | None = None  # the error the watch raised (None: it ended, or was cancelled)
    cancelled: bool = False


class _Feed:
    """The loop's side of one SyncWatch: a task that moves the async watch's events into a bounded
    thread-safe queue, taking one of ``size`` slots per event; the consumer gives a slot back per event
    it takes. With every slot taken, the task stops reading the stream: its HTTP/2 flow control (and
    the server's slow-consumer handling) takes over. Refers to no SyncWatch, so that an abandoned
    SyncWatch can be finalized (which cancels the task)."""

    def __init__(
        self,
        runtime: _Runtime,
        open_stream: Callable[[BridgeClient], AsyncIterator[WatchEvent]],
        *,
        size: int,
    ) -> None:
        self.runtime = runtime
        self.size = max(1, size)
        self.queue: queue.Queue[WatchEvent | _Ended] = queue.Queue(self.size + 1)  # + its _Ended
        self._open_stream = open_stream
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False

    # On the loop:

    def start(self) -> None:
        if self._cancelled:
            self.queue.put_nowait(_Ended(cancelled=True))
            return
        self._slots = asyncio.Semaphore(self.size)
        self._task = self.runtime.loop.create_task(self._pump())
        self.runtime.feeds.add(self)
        self._task.add_done_callback(lambda _: self.runtime.feeds.discard(self))

    def cancel(self) -> None:
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        self.cancel()
        if self._task is not None:
            await asyncio.wait([self._task])

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _pump(self) -> None:
        assert self.runtime.client is not None
        events = self._open_stream(self.runtime.client)
        ending = _Ended(cancelled=True)  # unless it ends otherwise
        try:
            ending = await self._move(events)
        except Exception as exc:
            ending = _Ended(error=exc)
        finally:
            self.queue.put_nowait(ending)
            if isinstance(events, AsyncGenerator):
                await events.aclose()  # ends the server stream now, not when garbage collected

    async def _move(self, events: AsyncIterator[WatchEvent]) -> _Ended:
        assert self._slots is not None
        async for event in events:
            await self._slots.acquire()
            self.queue.put_nowait(event)
        return _Ended()

    # In the consumer's thread:

    def take(self) -> WatchEvent | _Ended:
        """The next item, blocking (interruptibly, see :func:`_block`)."""
        taken: list[WatchEvent | _Ended] = []

        def got(timeout: float | None) -> bool:
            try:
                taken.append(self.queue.get(timeout=timeout))
            except queue.Empty:
                return False
            return True

        _block(got)
        return taken[0]


class SyncWatch(Iterator[WatchEvent]):
    """A blocking iterator of :class:`WatchEvent`, from :meth:`SyncBridgeClient.watch`; also a context
    manager. Its server stream opens at once and is read in the background, at most
    ``SyncBridgeClient.watch_buffer`` events ahead of you: a slow consumer slows the stream (which
    resumes, losing nothing, if the server gives up on it), nothing is buffered without limit.

    Leaving the ``with`` block, :meth:`close`, or dropping the last reference (breaking out of
    ``for event in client.watch(...)``) ends the server stream at once. So does a KeyboardInterrupt
    raised while ``next()`` waits (Ctrl-C), which then propagates. An error that ends the watch is
    raised by ``next()``, in your thread; closing the client ends the iteration with ClientClosed.
    """

    def __init__(self, client: SyncBridgeClient, feed: _Feed) -> None:
        self._client = client  # the client lives as long as its watches
        self._feed = feed
        self._finished = False  # the stream ended, or was closed: next() raises StopIteration
        self._closed = False

    def __iter__(self) -> SyncWatch:
        return self

    def __next__(self) -> WatchEvent:
        """The next event, blocking until there is one. Raises StopIteration once the watch ended or
        was closed, the watch's error if it ended with one, ClientClosed if the client was closed."""
        if self._finished:
            raise StopIteration
        try:
            item = self._feed.take()
        except BaseException:  # Ctrl-C: end the stream on the loop, without waiting for it
            self._finished = self._closed = True
            self._cancel_soon()
            raise
        if isinstance(item, WatchEvent):
            with contextlib.suppress(ClientClosed):
                self._feed.runtime.call_soon(self._feed.release)
            return item
        self._finished = True
        self._feed.queue.put_nowait(item)  # for another thread iterating the same watch
        if item.error is not None:
            raise item.error
        if item.cancelled and self._feed.runtime.closed and not self._closed:
            raise ClientClosed(f"{self._feed.runtime.name} was closed, which ended the watch")
        raise StopIteration

    def close(self) -> None:
        """End the server stream now, and wait until it has ended; later ``next()`` calls raise
        StopIteration. Idempotent; does nothing once the client is closed (which ended it). Interrupted,
        the stream still ends, in the background."""
        if self._closed:
            return
        self._finished = self._closed = True
        try:
            future = self._feed.runtime.submit(self._feed.stop)
        except ClientClosed:
            return
        with contextlib.suppress(ClientClosed):
            _await_future(future, self._feed.runtime)

    def _cancel_soon(self) -> None:
        """Cancel the stream on the loop, without waiting (for Ctrl-C, and from ``__del__``)."""
        # The loop is closed (closing the client ended the stream), or the interpreter is finalizing:
        # nothing to do. Unordered with close(), which cancels every stream anyway.
        with contextlib.suppress(RuntimeError):
            self._feed.runtime.loop.call_soon_threadsafe(self._feed.cancel)

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._cancel_soon()


# ---- the client ---------------------------------------------------------------------------------


class SyncBridgeClient:
    """:class:`BridgeClient`, blocking: the same arguments, methods and errors. Use it as
    ``with SyncBridgeClient(host, port) as client``, or call :meth:`close`.

    Each call blocks the calling thread until the server answered (or ``timeout`` seconds passed).
    A KeyboardInterrupt (Ctrl-C) while it blocks cancels the call on the client's loop, and
    propagates at once (the call may or may not have been applied, as with any interrupted call).
    A client abandoned without ``close()`` is closed when garbage collected, or at interpreter exit.

    ``tls``: an ``ssl.SSLContext`` (see :func:`trio_bridge.client.tls_context`) to connect over TLS.
    ``token``: a bearer token, sent with every call, for a server that checks tokens.
    ``also``: more ``(host, port)`` addresses of the same deployment (see :class:`BridgeClient`).
    """

    #: How many events a watch reads ahead of its consumer (see :class:`SyncWatch`); set it on the
    #: class or on one client, before calling ``watch``.
    watch_buffer: int = 64

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 50051,
        *,
        timeout: float | None = 30.0,
        reconnect: Reconnect | None = None,
        config: Configuration | None = None,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
        also: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._runtime = runtime = _Runtime(f"SyncBridgeClient({host}:{port})")
        weakref.finalize(self, runtime.close)  # abandoned: closed when collected, or at exit

        async def make() -> None:
            runtime.client = BridgeClient(
                host,
                port,
                timeout=timeout,
                reconnect=reconnect,
                config=config,
                tls=tls,
                token=token,
                also=also,
            )

        try:
            _await_future(runtime.submit(make), runtime)
        except BaseException:
            self.close()
            raise

    @property
    def _client(self) -> BridgeClient:
        assert self._runtime.client is not None
        return self._runtime.client

    def __enter__(self) -> SyncBridgeClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SyncBridgeClient {self.host}:{self.port} ({state})>"

    def close(self) -> None:
        """Cancel every call in flight and end every watch (their threads get ClientClosed), close the
        connections, and stop the client's thread and loop, waiting for them. Idempotent: a closed
        client raises ClientClosed from every method but this one."""
        self._runtime.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._runtime.closed

    # ---- settings (the async client's attributes) --------------------------------------------

    @property
    def host(self) -> str:
        """The host in use (it moves along ``also`` when one cannot be reached)."""
        return self._client.host

    @property
    def port(self) -> int:
        """The port in use."""
        return self._client.port

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every address of the deployment: ``(host, port)`` first, then ``also``."""
        return list(self._client.addresses)

    @property
    def timeout(self) -> float | None:
        """Seconds a unary call may take (None: no limit); settable."""
        return self._client.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._client.timeout = value

    @property
    def reconnect(self) -> Reconnect:
        """How watches reconnect; settable (for watches started afterwards)."""
        return self._client.reconnect

    @reconnect.setter
    def reconnect(self, value: Reconnect) -> None:
        self._client.reconnect = value

    # ---- connections -------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """How many HTTP/2 connections the client has opened."""

        async def count(client: BridgeClient) -> int:
            return client.connections

        return self._runtime.call(count)

    # ---- sessions ----------------------------------------------------------------------------

    def ping(self, message: str = "") -> str:
        """The server's version; raises if it does not answer."""
        return self._runtime.call(lambda client: client.ping(message))

    def create_session(
        self, session_id: str = "", *, metadata: Mapping[str, str] | None = None, ttl: float | None = None
    ) -> SessionInfo:
        """Create a session (the server picks its id when ``session_id`` is empty) that expires after
        ``ttl`` seconds without activity (None: the server's default)."""
        return self._runtime.call(
            lambda client: client.create_session(session_id, metadata=metadata, ttl=ttl)
        )

    def get_session(self, session_id: str) -> SessionInfo:
        """One session; NotFound if there is no such session."""
        return self._runtime.call(lambda client: client.get_session(session_id))

    def list_sessions(self) -> list[SessionInfo]:
        """Every session."""
        return self._runtime.call(lambda client: client.list_sessions())

    def cleanup_session(self, session_id: str) -> int:
        """Remove the session; return how many variables went with it."""
        return self._runtime.call(lambda client: client.cleanup_session(session_id))

    # ---- variables ---------------------------------------------------------------------------

    def register_variable(
        self,
        session_id: str,
        name: str,
        vtype: VariableType | str,
        value: Any,
        *,
        constraints: Constraints | None = None,
        metadata: Mapping[str, str] | None = None,
        source: str = "",
    ) -> Variable:
        """Register a variable; ``vtype`` is a VariableType or its name ("float", "tensor", ...)."""
        return self._runtime.call(
            lambda client: client.register_variable(
                session_id, name, vtype, value, constraints=constraints, metadata=metadata, source=source
            )
        )

    def get(self, session_id: str, identifier: str) -> Variable:
        """One variable, by id or name."""
        return self._runtime.call(lambda client: client.get(session_id, identifier))

    def get_many(self, session_id: str, identifiers: Sequence[str]) -> list[Variable]:
        """Several variables, in the order asked; NotFound names every unknown one."""
        identifiers = list(identifiers)
        return self._runtime.call(lambda client: client.get_many(session_id, identifiers))

    def list_variables(self, session_id: str) -> list[Variable]:
        """Every variable of the session."""
        return self._runtime.call(lambda client: client.list_variables(session_id))

    def set(
        self,
        session_id: str,
        identifier: str,
        value: Any,
        *,
        expected_version: int | None = None,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> Variable:
        """Write one value; with ``expected_version`` only if the variable is still at that version
        (else ``VersionConflict``, whose ``current`` is the version to read again)."""
        return self._runtime.call(
            lambda client: client.set(
                session_id,
                identifier,
                value,
                expected_version=expected_version,
                source=source,
                metadata=metadata,
            )
        )

    def set_many(
        self,
        session_id: str,
        writes: Mapping[str, Any] | Iterable[tuple[str, Any, int | None]],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[Variable]:
        """Write several values atomically: all are applied or none. ``writes`` maps identifiers to
        values, or lists ``(identifier, value, expected_version or None)``."""
        items: Mapping[str, Any] | list[tuple[str, Any, int | None]] = (
            writes if isinstance(writes, Mapping) else list(writes)  # read in your thread
        )
        return self._runtime.call(
            lambda client: client.set_many(session_id, items, source=source, metadata=metadata)
        )

    def delete_variable(self, session_id: str, identifier: str) -> None:
        """Delete one variable, by id or name."""
        return self._runtime.call(lambda client: client.delete_variable(session_id, identifier))

    # ---- watch -------------------------------------------------------------------------------

    def watch(
        self,
        session_id: str,
        identifiers: Sequence[str] = (),
        *,
        include_initial_values: bool = True,
        include_heartbeats: bool = False,
        include_reconnects: bool = False,
        heartbeat_interval: float | None = None,
        coalesce: bool = False,
        resume_versions: Mapping[str, int] | None = None,
    ) -> SyncWatch:
        """Decoded watch events, as a blocking iterator that is also a context manager (see
        :class:`SyncWatch`); an empty ``identifiers`` watches the whole session.

        As :meth:`BridgeClient.watch`: it reconnects and resumes across lost streams, seeing every
        version exactly once or an explicit ``resync`` (``include_reconnects``: each lost stream is
        yielded as a ``reconnecting`` event), and raises any other status as its error, from ``next()``.

        Leaving the ``with`` block, ``close()``, breaking out of ``for event in client.watch(...)``, or
        Ctrl-C while it waits ends the server stream at once.
        """
        identifiers = list(identifiers)
        resume = dict(resume_versions) if resume_versions is not None else None

        def open_stream(client: BridgeClient) -> AsyncIterator[WatchEvent]:
            return client.watch(
                session_id,
                identifiers,
                include_initial_values=include_initial_values,
                include_heartbeats=include_heartbeats,
                include_reconnects=include_reconnects,
                heartbeat_interval=heartbeat_interval,
                coalesce=coalesce,
                resume_versions=resume,
            )

        feed = _Feed(self._runtime, open_stream, size=self.watch_buffer)
        self._runtime.call_soon(feed.start)
        return SyncWatch(self, feed)

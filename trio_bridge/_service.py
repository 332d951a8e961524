"""The UnifiedBridge gRPC service: requests in, store calls, responses out.

Handlers run on the asyncio side (grpclib, inside trio-asyncio's loop) and call the store's methods
from there (see ``storage.interface`` for what each guarantees). Every handler is wrapped by
:meth:`UnifiedBridgeService._guard`, which turns errors into statuses (through ``_status``), counts
RPCs by method and status, and refuses new calls with UNAVAILABLE once the server drains for shutdown.

The two streaming RPCs run on the Trio side, one Trio task per stream: WatchVariables (``_watch``) and
WriteVariables (:class:`WriteStream`, whose writes take the same path as SetVariables').
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpclib.const
import trio
from grpclib._typing import IServable
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream
from h2.errors import ErrorCodes

from . import _encoding as enc
from ._bridge import (
    CutShort,
    call_soon_in_asyncio,
    next_request_size,
    release_request_buffers,
    request_at_hand,
    request_framing_checked,
    reset_stream,
    run_in_asyncio,
    run_in_trio,
    send_message_now,
    send_messages,
)
from ._errors import BridgeError, InvalidArgument, ResourceExhausted, Unavailable
from ._limits import DEFAULT_LIMITS, Limits, check_constraint_sizes, check_metadata, check_source
from ._metrics import Metrics
from ._security import Principal, Tokens
from ._status import STATE_ID_HEADER, grpc_error_for, stream_was_cut
from ._types import VariableType
from ._version import __version__
from ._watch import BatchProgress, WatchPlan, WatchStream, plan_watch
from .proto import unified_bridge as pb
from .storage import EncodedValue, Store, VariableSnapshot, VariableWrite, session_not_found

WATCH_PATH = "/unified_bridge.UnifiedBridge/WatchVariables"
WRITE_PATH = "/unified_bridge.UnifiedBridge/WriteVariables"
WRITE_METHOD = "WriteVariables"
#: What a WriteVariables stream itself is counted as in the RPC metrics (``trio_bridge_rpcs``, label
#: ``method``) when it ends; each of its requests is counted as a "WriteVariables" call with its status,
#: as a SetVariables call is.
WRITE_STREAM_LABEL = "WriteVariables/stream"
SHUTTING_DOWN = "the server is shutting down"
#: How long a write stream goes on answering requests that were already waiting (it never had to wait
#: for one) before it lets the server's other tasks run.
WRITE_SLICE_SECONDS = 0.002
#: A write stream applies the requests that have already arrived whole in runs of at most this many
#: requests and this many request bytes (and ``WRITE_SLICE_SECONDS``), and sends their results together:
#: one DATA frame, and one hop to grpclib's side, per run instead of per request.
WRITE_RUN_REQUESTS = 64
WRITE_RUN_BYTES = 64 * 1024
#: Watch streams that may be ending with a status at once; more wait their turn (``_run_watch``).
ENDINGS_AT_ONCE = 8

T = TypeVar("T")

_RawHandler = Callable[[Stream[Any, Any]], Awaitable[None]]

#: The principal of the call being handled (None when the server checks no tokens).
_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("trio_bridge_caller", default=None)


class _StoreCall(Protocol):
    """How a handler calls a store method (Trio code): from asyncio (``_in_store``), or from Trio
    (:func:`call_directly`)."""

    def __call__(self, method: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> Awaitable[T]: ...


async def call_directly(method: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
    """From Trio: call a store method in the calling task (cancelled with it)."""
    return await method(*args, **kwargs)


def _peer_is_gone(stream: Stream[Any, Any]) -> bool:
    """Whether grpclib has terminated ``stream`` on its client's account (a reset, the deadline, the
    connection lost) and is cancelling its handler."""
    wrapper = stream._stream.wrapper
    return wrapper is not None and bool(wrapper.cancelled)


def _unpacked(name: str, vtype: VariableType, packed: Any, limit: int) -> Any:
    """The native value of the Any ``packed`` sent for variable ``name`` of type ``vtype``;
    InvalidArgument if it is over ``max_value_bytes`` (``limit``) encoded, or not such a value."""
    if packed is not None and len(packed.value) > limit:
        raise InvalidArgument(
            f"the value for {name!r} is {len(packed.value)} bytes encoded, more than its limit "
            f"max_value_bytes={limit}"
        )
    return enc.unpack_value(name, vtype, packed)


class _Packed(EncodedValue):
    """A written value as sent (a ``google.protobuf.Any``), decoded by the store's checks."""

    __slots__ = ("_limit", "_packed")

    def __init__(self, packed: Any, limit: int) -> None:
        self._packed = packed
        self._limit = limit

    def decoded(self, name: str, vtype: VariableType) -> Any:
        return _unpacked(name, vtype, self._packed, self._limit)


class UnifiedBridgeService(pb.UnifiedBridgeBase):
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        limits: Limits = DEFAULT_LIMITS,
        tokens: Tokens | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.limits = limits
        self.tokens = tokens
        self._watches: set[WatchStream] = set()
        self._write_streams: set[WriteStream] = set()
        # Watch streams ending with a status whose asyncio side may not have run yet (_run_watch).
        self._endings = trio.Semaphore(ENDINGS_AT_ONCE)
        # Watch calls admitted (counted from the request, before their stream starts), in all and by
        # connection (its peer address).
        self._admitted_watches = 0
        self._watches_by_peer: dict[object, int] = {}
        # Of those, the WriteVariables streams (held open too, so counted the same: admit_watch).
        self._admitted_writes = 0
        self._draining = False
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def open_watches(self) -> int:
        """Watch streams open right now, WatchVariables and health Watch (counted from the moment they
        are admitted)."""
        return self._admitted_watches - self._admitted_writes

    @property
    def open_write_streams(self) -> int:
        """WriteVariables streams open right now (counted from the moment they are admitted). They
        count toward the watch stream limits too, not among ``open_watches``."""
        return self._admitted_writes

    async def drain(self) -> None:
        """Refuse new RPCs with UNAVAILABLE, end every watch stream with UNAVAILABLE, let every write
        stream answer the request it is applying and then end it with UNAVAILABLE, then wait until the
        running calls have finished.

        Cancellation (the shutdown's grace period running out) just stops the wait; the server then
        cancels whatever is still running.
        """
        self._draining = True
        for watch in list(self._watches):
            watch.shut_down()
        for writes in list(self._write_streams):
            writes.shut_down()
        while self._in_flight:
            await self._idle.wait()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        # A raw handler: betterproto2's server-streaming handler is an async generator, which cannot
        # hold the Trio nursery a watch stream needs.
        mapping[WATCH_PATH] = grpclib.const.Handler(
            self._watch_variables,
            grpclib.const.Cardinality.UNARY_STREAM,
            pb.WatchVariablesRequest,
            pb.VariableUpdate,
        )
        # Raw too: one Trio task answers the stream's requests in order (WriteStream).
        mapping[WRITE_PATH] = grpclib.const.Handler(
            self._write_variables,
            grpclib.const.Cardinality.STREAM_STREAM,
            pb.WriteRequest,
            pb.WriteResult,
        )
        return {
            path: handler._replace(func=self._guard(path.rsplit("/", 1)[-1], handler.func))
            for path, handler in mapping.items()
        }

    def _guard(self, method: str, func: _RawHandler) -> _RawHandler:
        # A WriteVariables stream is counted under a label of its own (its requests count as
        # "WriteVariables" calls), and checks each request's session itself: a refusal is that
        # request's result, not the stream's end.
        label = WRITE_STREAM_LABEL if method == WRITE_METHOD else method
        scope_on_read = method not in ("CreateSession", WRITE_METHOD)

        async def guarded(stream: Stream[Any, Any]) -> None:
            if self._draining:
                self.metrics.record_rpc(label, Status.UNAVAILABLE.name)
                raise GRPCError(Status.UNAVAILABLE, SHUTTING_DOWN)
            self._call_began()
            status = Status.OK.name
            caller = _caller.set(None)
            try:
                scope_checked: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
                if self.tokens is not None:
                    # Before anything of the request is read.
                    principal = self.tokens.principal_of(stream.metadata)
                    _caller.set(principal)
                    if scope_on_read:
                        scope_checked = self._scope_checked_on_read(stream, principal)
                with (
                    scope_checked,
                    request_framing_checked(stream, self.limits.max_message_bytes, "max_message_bytes"),
                ):
                    await func(stream)
            except asyncio.CancelledError:
                status = Status.CANCELLED.name
                raise
            except Exception as exc:
                if _peer_is_gone(stream):
                    # The client reset the stream, its deadline passed or its connection dropped, and
                    # what failed was the call noticing that (a send to a closed stream, before the
                    # cancellation reached it): a cancellation, not a fault; grpclib expects to see one.
                    status = Status.CANCELLED.name
                    raise asyncio.CancelledError from None
                error, trailers = grpc_error_for(exc, method=method)
                status = error.status.name
                if stream_was_cut(exc):
                    reset_stream(stream, ErrorCodes.ENHANCE_YOUR_CALM)  # read as RESOURCE_EXHAUSTED
                elif not stream._stream._transport.is_closing():  # else nothing can be sent
                    # Sent here rather than raised for grpclib to send: raised, its traceback would
                    # hold this frame, which holds it (garbage for a collection after every error).
                    await stream.send_trailing_metadata(
                        status=error.status,
                        status_message=error.message,
                        status_details=error.details,
                        metadata=trailers or None,
                    )
            finally:
                _caller.reset(caller)
                self._call_ended()
                self.metrics.record_rpc(label, status)

        return guarded

    @contextlib.contextmanager
    def _scope_checked_on_read(self, stream: Stream[Any, Any], principal: Principal) -> Iterator[None]:
        """In the block, make reading the request refuse a session outside ``principal``'s scope
        exactly as if it did not exist (NOT_FOUND, the same message): a caller learns nothing of
        others' sessions. (Gone after the block: it refers to the stream it is stored on.)"""
        read = stream.recv_message

        async def recv_message() -> Any:
            message = await read()
            await self.check_scope(principal, getattr(message, "session_id", ""), self._in_store)
            return message

        stream.recv_message = recv_message  # type: ignore[method-assign]
        try:
            yield
        finally:
            del stream.recv_message

    async def check_scope(self, principal: Principal | None, session_id: str, call: _StoreCall) -> None:
        """Refuse ``session_id`` if it is outside ``principal``'s scope, exactly as if it did not exist
        (NOT_FOUND, the same message). No principal (no tokens), no session id: nothing to check."""
        if principal is None or not session_id:
            return
        owner = await call(self.store.owner_of, session_id)
        if owner is not None and not principal.may_use(owner):
            raise session_not_found(session_id)  # exactly as for a session that is not there

    async def _in_store(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """From asyncio (a handler): call a store method, which is Trio code. A store whose methods
        never suspend (the in-memory store) is called directly, as a synchronous call would be; any
        other runs in a Trio task (``run_in_trio``), which a cancelled handler cancels."""
        if self.store.never_suspends:
            return await method(*args, **kwargs)
        return await run_in_trio(functools.partial(method, *args, **kwargs))

    # ---- unary RPCs ------------------------------------------------------------------------------

    async def ping(self, message: pb.PingRequest) -> pb.PingResponse:
        return pb.PingResponse(
            message=message.message,
            server_time=enc.timestamp(time.time()),
            server_version=__version__,
        )

    async def create_session(self, message: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        caller = _caller.get()
        check_metadata("session", message.metadata, self.limits)
        info = await self._in_store(
            self.store.create_session,
            message.session_id,
            metadata=message.metadata,
            ttl=message.ttl_seconds or None,
            owner=caller.name if caller is not None else "",
        )
        return pb.CreateSessionResponse(session=enc.session_to_proto(info))

    async def get_session(self, message: pb.GetSessionRequest) -> pb.GetSessionResponse:
        info = await self._in_store(self.store.get_session, message.session_id)
        return pb.GetSessionResponse(session=enc.session_to_proto(info))

    async def list_sessions(self, message: pb.ListSessionsRequest) -> pb.ListSessionsResponse:
        caller = _caller.get()
        sessions = [
            enc.session_to_proto(info)
            for info in await self._in_store(self.store.list_sessions)
            if caller is None or caller.may_use(info.owner)
        ]
        return pb.ListSessionsResponse(sessions=sessions)

    async def cleanup_session(self, message: pb.CleanupSessionRequest) -> pb.CleanupSessionResponse:
        removed = await self._in_store(self.store.cleanup_session, message.session_id)
        return pb.CleanupSessionResponse(variables_removed=removed)

    async def register_variable(self, message: pb.RegisterVariableRequest) -> pb.RegisterVariableResponse:
        # Checked in the order a client would fix them: session, name, type, value.
        await self._in_store(self.store.get_session, message.session_id)
        vtype = enc.variable_type_from_proto(message.name, message.type)
        constraints = enc.constraints_from_proto(message.constraints)
        check_constraint_sizes(message.name, constraints, self.limits)
        check_metadata(f"variable {message.name!r}", message.metadata, self.limits)
        check_source(message.source, self.limits)
        value = _unpacked(message.name, vtype, message.initial_value, self.limits.max_value_bytes)
        snapshot = await self._in_store(
            self.store.register_variable,
            message.session_id,
            message.name,
            vtype,
            value,
            constraints=constraints,
            metadata=message.metadata,
            source=message.source,
        )
        return pb.RegisterVariableResponse(variable=enc.variable_to_proto(snapshot))

    async def get_variable(self, message: pb.GetVariableRequest) -> pb.GetVariableResponse:
        snapshot = await self._in_store(
            self.store.get_variable, message.session_id, message.variable_identifier
        )
        return pb.GetVariableResponse(variable=enc.variable_to_proto(snapshot))

    async def get_variables(self, message: pb.GetVariablesRequest) -> pb.GetVariablesResponse:
        snapshots = await self._in_store(
            self.store.get_variables, message.session_id, message.variable_identifiers
        )
        return pb.GetVariablesResponse(variables=[enc.variable_to_proto(s) for s in snapshots])

    async def list_variables(self, message: pb.ListVariablesRequest) -> pb.ListVariablesResponse:
        snapshots = await self._in_store(self.store.list_variables, message.session_id)
        return pb.ListVariablesResponse(variables=[enc.variable_to_proto(s) for s in snapshots])

    async def set_variable(self, message: pb.SetVariableRequest) -> pb.SetVariableResponse:
        write = pb.VariableWrite(
            variable_identifier=message.variable_identifier,
            value=message.value,
            expected_version=message.expected_version,
        )
        (snapshot,) = await self.apply_writes(
            message.session_id, [write], source=message.source, metadata=message.metadata
        )
        return pb.SetVariableResponse(variable=enc.variable_to_proto(snapshot))

    async def set_variables(self, message: pb.SetVariablesRequest) -> pb.SetVariablesResponse:
        snapshots = await self.apply_writes(
            message.session_id, message.writes, source=message.source, metadata=message.metadata
        )
        return pb.SetVariablesResponse(variables=[enc.variable_to_proto(s) for s in snapshots])

    async def delete_variable(self, message: pb.DeleteVariableRequest) -> pb.DeleteVariableResponse:
        await self._in_store(self.store.delete_variable, message.session_id, message.variable_identifier)
        return pb.DeleteVariableResponse()

    async def apply_writes(
        self,
        session_id: str,
        writes: list[pb.VariableWrite],
        *,
        source: str,
        metadata: dict[str, str],
        call: _StoreCall | None = None,
    ) -> list[VariableSnapshot]:
        """The one path of every write (SetVariable, SetVariables, each WriteVariables request): checks
        in the order a client would fix them, then one atomic store call. ``call``: how to reach the
        store (from asyncio by default; ``call_directly`` from Trio)."""
        call = call or self._in_store
        check_metadata("update", metadata, self.limits)
        check_source(source, self.limits)
        limit = self.limits.max_value_bytes
        # Each value is decoded by the store's checks, once it has looked the variable up (its type).
        encoded = [
            VariableWrite(write.variable_identifier, _Packed(write.value, limit), write.expected_version)
            for write in writes
        ]
        return await call(self.store.set_variables, session_id, encoded, source=source, metadata=metadata)

    # ---- streaming -------------------------------------------------------------------------------

    async def _watch_variables(self, stream: Stream[pb.WatchVariablesRequest, pb.VariableUpdate]) -> None:
        request = await stream.recv_message()
        assert request is not None
        release_request_buffers(stream)  # the stream may stay open for days: keep only what sending needs
        # Headers first, naming the state served: a client resuming here after a NOT_FOUND can tell a
        # session that expired from one a restarted in-memory server never had (see client.watch).
        await stream.send_initial_metadata(metadata={STATE_ID_HEADER: self.store.state_id})
        # Checked before the stream opens: a bad request gets its status and no message.
        plan = await self._in_store(
            plan_watch,
            self.store,
            session_id=request.session_id,
            identifiers=request.variable_identifiers,
            include_initial_values=request.include_initial_values,
            options=request.options,
            resume_versions=request.resume_versions,
            resume_revision=request.resume_revision,
            limits=self.limits,
        )
        del request  # a stream held open for days keeps nothing of its request but the plan (0.4 KB)
        with self.admit_watch(stream):
            await run_in_trio(self._run_watch, stream, plan)

    @property
    def draining(self) -> bool:
        """Whether the server has begun to shut down (it refuses new calls and streams)."""
        return self._draining

    @contextlib.contextmanager
    def call_in_flight(self) -> Iterator[None]:
        """Count a call of another front end (the web view's writes) for the block, as the gRPC calls
        are counted: a drain waits for it, and none starts once the drain has begun (Unavailable)."""
        if self._draining:
            raise Unavailable(SHUTTING_DOWN)
        self._call_began()
        try:
            yield
        finally:
            self._call_ended()

    def _call_began(self) -> None:
        """A call a drain waits for has begun (``_call_ended`` when it ends)."""
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle = trio.Event()

    def _call_ended(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    def admit_watch(self, stream: Stream[Any, Any]) -> contextlib.AbstractContextManager[None]:
        """Count a watch stream (any stream a client holds open: WatchVariables, health Watch) for the
        block, in all and on its connection; ResourceExhausted naming the limit if there is no room."""
        return self.admit_stream(stream.peer.addr())

    @contextlib.contextmanager
    def admit_stream(
        self, peer: object, *, held_by: str = "this connection", streams: str = "watch streams"
    ) -> Iterator[None]:
        """As :meth:`admit_watch`, for a stream held open on the connection ``peer`` (its address), of
        any front end (the web view's live pages too, whose ``peer`` is a browser's host: ``held_by``
        and ``streams`` name it and them in the refusal)."""
        self.check_watch_room(peer, held_by=held_by, streams=streams)
        self._admitted_watches += 1
        self._watches_by_peer[peer] = self._watches_by_peer.get(peer, 0) + 1
        try:
            yield
        finally:
            self._admitted_watches -= 1
            left = self._watches_by_peer.pop(peer) - 1
            if left:
                self._watches_by_peer[peer] = left

    def check_watch_room(
        self, peer: object, *, held_by: str = "this connection", streams: str = "watch streams"
    ) -> None:
        limits = self.limits
        if self._admitted_watches >= limits.max_watch_streams:
            raise ResourceExhausted.over_limit(
                f"the server has {self._admitted_watches} watch streams open, its limit "
                f"max_watch_streams={limits.max_watch_streams}; retry later",
                "max_watch_streams",
                limits.max_watch_streams,
            )
        on_connection = self._watches_by_peer.get(peer, 0)
        if on_connection >= limits.max_watch_streams_per_connection:
            advice = "open another connection for more" if held_by == "this connection" else "close some"
            raise ResourceExhausted.over_limit(
                f"{held_by} has {on_connection} {streams} open, its limit "
                f"max_watch_streams_per_connection={limits.max_watch_streams_per_connection}; {advice}",
                "max_watch_streams_per_connection",
                limits.max_watch_streams_per_connection,
            )

    @contextlib.contextmanager
    def tracked(self, watch: WatchStream) -> Iterator[None]:
        """Hold ``watch`` among the streams a drain shuts down, for the block (shut down at once if the
        server drains already)."""
        self._watches.add(watch)
        if self._draining:  # began while the server started to drain
            watch.shut_down()
        try:
            yield
        finally:
            self._watches.discard(watch)

    async def _run_watch(
        self, stream: Stream[pb.WatchVariablesRequest, pb.VariableUpdate], plan: WatchPlan
    ) -> None:
        """The Trio side of one watch stream. Raises the BridgeError that ended it (a status for the
        client); cancelled when the client goes away."""

        async def send(updates: list[pb.VariableUpdate], progress: BatchProgress) -> None:
            with contextlib.suppress(CutShort):  # the progress says how far it got
                await run_in_asyncio(send_messages, stream, updates, progress, cut=progress)

        watch = WatchStream(
            self.store,
            plan,
            send=send,
            queue_size=self.limits.watch_queue_size,
            queue_bytes=self.limits.watch_queue_bytes,
            on_sent=self.metrics.updates_sent.inc,
            send_now=functools.partial(send_message_now, stream),
        )
        try:
            with self.tracked(watch):
                await watch.run()
        except BridgeError:
            # One write can overflow hundreds of streams at once. Each ending wakes its asyncio side
            # (which sends the status) through asyncio's loop, first come first served: all at once,
            # every other call's next step would wait behind hundreds of them. They take turns, a
            # bounded number at a time: a turn is given back once asyncio's loop has run what was
            # queued there before the turn was taken (the wake-ups of earlier turns; this call's own
            # comes just after), so at most about twice ENDINGS_AT_ONCE wake-ups wait there at once.
            await self._endings.acquire()
            call_soon_in_asyncio(self._endings.release)
            raise

    async def _write_variables(self, stream: Stream[pb.WriteRequest, pb.WriteResult]) -> None:
        """A WriteVariables stream: admitted, then run by a :class:`WriteStream` in one Trio task.
        Cancelled (the client went away, or the server stopped waiting for it), it cancels that task.

        Held open like a watch, so counted like one (``max_watch_streams``, ``..._per_connection``):
        over a limit, the stream ends at once with RESOURCE_EXHAUSTED naming it, nothing read."""
        with self.admit_watch(stream), self._counted_write_stream():
            # Headers first: a status from here on ends a stream that was accepted, after the results
            # of every request it read (a client can tell which requests were never read).
            await stream.send_initial_metadata()
            await run_in_trio(self._run_writes, stream, _caller.get())

    @contextlib.contextmanager
    def _counted_write_stream(self) -> Iterator[None]:
        self._admitted_writes += 1
        try:
            yield
        finally:
            self._admitted_writes -= 1

    async def _run_writes(
        self, stream: Stream[pb.WriteRequest, pb.WriteResult], principal: Principal | None
    ) -> None:
        """The Trio side of one WriteVariables stream (:class:`WriteStream`). Raises the BridgeError
        that ends it (UNAVAILABLE once the server drains); cancelled when the client goes away."""
        writes = WriteStream(self, stream, principal)
        self._write_streams.add(writes)
        if self._draining:  # began while the stream started
            writes.shut_down()
        try:
            await writes.run()
        finally:
            self._write_streams.discard(writes)

    async def write_result(self, request: pb.WriteRequest, principal: Principal | None) -> pb.WriteResult:
        """From Trio: apply one request of a WriteVariables stream as SetVariables would apply it (the
        scope check, then ``apply_writes``: the same checks in the same order, one atomic store call)
        and say what became of it. A refusal is a result carrying the status, message and trailers
        SetVariables would have ended with. Counted as a "WriteVariables" call with its status.

        Cancellation: as a cancelled SetVariables, the write may or may not have been applied."""
        try:
            await self.check_scope(principal, request.session_id, call_directly)
            snapshots = await self.apply_writes(
                request.session_id,
                request.writes,
                source=request.source,
                metadata=request.metadata,
                call=call_directly,
            )
        except Exception as exc:
            error, trailers = grpc_error_for(exc, method=WRITE_METHOD)
            self.metrics.record_rpc(WRITE_METHOD, error.status.name)
            return pb.WriteResult(
                request_id=request.request_id,
                status=error.status.value,
                message=error.message or "",
                details=trailers,
            )
        self.metrics.record_rpc(WRITE_METHOD, Status.OK.name)
        if request.versions_only:
            written = [
                pb.WrittenVersion(variable_id=s.id, version=s.version, revision=s.revision) for s in snapshots
            ]
            return pb.WriteResult(request_id=request.request_id, written=written)
        variables = [enc.variable_to_proto(s) for s in snapshots]
        return pb.WriteResult(request_id=request.request_id, variables=variables)


class WriteStream:
    """The Trio side of one WriteVariables stream: requests are read and applied
    (:meth:`UnifiedBridgeService.write_result`) one after the other, in the order they were sent, and
    answered in that order. One Trio task for the whole stream: no task per request, and with the
    in-memory store no hop between asyncio and Trio either (it reads and sends through
    ``run_in_asyncio``).

    Runs: the requests that have already arrived whole are applied in a run (at most
    ``WRITE_RUN_REQUESTS`` requests, ``WRITE_RUN_BYTES`` of them and ``WRITE_SLICE_SECONDS``), and the
    run's results are handed to the connection together, as one DATA frame; a request that has not
    arrived yet is not waited for while results are held. A client that sends one request at a time
    gets each result as soon as it is applied.

    Flow control, end to end: the next run is read only once the results of the run before have been
    handed to the connection, which waits for the client's HTTP/2 window. A client that stops reading
    results stops the stream after one more run: it holds that run's results, and reads nothing more.
    What the client sends meanwhile waits in its connection's request buffer, bounded by
    ``max_connection_buffer_bytes`` and ``max_request_buffer_bytes``; past either, the stream ends with
    RESOURCE_EXHAUSTED naming the limit when it next reads. A request that cannot be read (too large,
    malformed, compressed) ends the stream with its status once the results before it are sent.

    Drain (:meth:`shut_down`): the request being applied is finished, the run's results are sent,
    then the stream ends with UNAVAILABLE; the requests it had not read were not applied, and they are
    exactly those without a result.
    """

    def __init__(
        self,
        service: UnifiedBridgeService,
        stream: Stream[pb.WriteRequest, pb.WriteResult],
        principal: Principal | None,
    ) -> None:
        self._service = service
        self._stream = stream
        self._principal = principal
        self._stopping = False
        self._receiving: trio.CancelScope | None = None

    def shut_down(self) -> None:
        """End the stream with UNAVAILABLE once the request being applied (if any) is answered."""
        self._stopping = True
        if self._receiving is not None:
            self._receiving.cancel()

    async def run(self) -> None:
        """Answer requests until the client ends its side (the stream then ends with OK). Raises
        :class:`Unavailable` once the server drains, and the error of a request it cannot read (over
        ``max_message_bytes``, malformed, compressed), which ends the stream with that status, after
        the results of the requests before it.

        Cancellation (the client went away, or the server stopped waiting for it): the request being
        applied may or may not have been, as with a cancelled SetVariables; the run's results not yet
        handed to the connection are not sent; nothing more is read."""
        pause_at = time.perf_counter() + WRITE_SLICE_SECONDS
        while (request := await self._next_request()) is not None:
            results = [await self._service.write_result(request, self._principal)]
            unreadable: Exception | None = None
            try:
                run_bytes = 0
                while len(results) < WRITE_RUN_REQUESTS and not self._stopping:
                    size = next_request_size(self._stream)
                    if size is None or run_bytes >= WRITE_RUN_BYTES or time.perf_counter() >= pause_at:
                        break
                    run_bytes += size
                    try:  # it has arrived (or the request has ended): reading does not wait
                        request = await self._next_request()
                    except Exception as exc:  # sent after the results before it
                        unreadable = exc
                        break
                    if request is None:
                        break
                    results.append(await self._service.write_result(request, self._principal))
                await run_in_asyncio(send_messages, self._stream, results)
                if unreadable is not None:
                    raise unreadable
            finally:
                unreadable = None  # its traceback holds this frame
            if time.perf_counter() >= pause_at:  # requests that were waiting, read with no pause
                await trio.lowlevel.checkpoint()
                pause_at = time.perf_counter() + WRITE_SLICE_SECONDS

    async def _next_request(self) -> pb.WriteRequest | None:
        """The next request, waiting for it; None once the client has ended its side. Raises
        :class:`Unavailable` once the server drains (a request half read then is dropped, never
        applied)."""
        if not self._stopping:
            max_bytes = self._service.limits.max_message_bytes
            request: pb.WriteRequest | None = request_at_hand(self._stream, max_bytes)
            if request is not None:
                return request
            with trio.CancelScope() as receiving:
                self._receiving = receiving
                try:
                    request = await run_in_asyncio(self._stream.recv_message)
                finally:
                    self._receiving = None
            if not receiving.cancelled_caught:
                return request
        raise Unavailable(SHUTTING_DOWN)


#: Methods whose streams a client may hold open for as long as it likes.
_HELD_OPEN = (grpclib.const.Cardinality.UNARY_STREAM, grpclib.const.Cardinality.STREAM_STREAM)


class CountedStreams(IServable):
    """Another service (health, reflection) whose streaming methods count toward the watch stream
    limits (``max_watch_streams``, ``max_watch_streams_per_connection``) like any stream a client can
    hold open: they answer without a token (or before one is checked), so uncounted they were a way
    to hold streams by the thousand. A stream over a limit ends at once with RESOURCE_EXHAUSTED
    naming it."""

    def __init__(self, inner: IServable, service: UnifiedBridgeService) -> None:
        self._inner = inner
        self._service = service

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = self._inner.__mapping__()
        return {
            path: handler._replace(func=self._counted(handler.func))
            if handler.cardinality in _HELD_OPEN
            else handler
            for path, handler in mapping.items()
        }

    def _counted(self, func: Callable[[Stream[Any, Any]], Awaitable[None]]) -> _RawHandler:
        async def counted(stream: Stream[Any, Any]) -> None:
            try:
                self._service.check_watch_room(stream.peer.addr())
            except ResourceExhausted as exc:
                await stream.send_trailing_metadata(
                    status=Status.RESOURCE_EXHAUSTED, status_message=exc.message, metadata=exc.trailers
                )
                return
            with self._service.admit_watch(stream):  # no await since the check: there is room
                await func(stream)

        return counted

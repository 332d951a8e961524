"""The UnifiedBridge gRPC service: requests in, store calls, responses out.

Handlers run on the asyncio side (grpclib, inside trio-asyncio's loop) and call the store's methods
from there (see ``storage.interface`` for what each guarantees). Every handler is wrapped by
:meth:`UnifiedBridgeService._guard`, which turns errors into statuses (through ``_status``), counts
RPCs by method and status, and refuses new calls with UNAVAILABLE once the server drains for shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpclib.const
import trio
from grpclib._typing import IServable
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream
from h2.errors import ErrorCodes

from . import _encoding as enc
from ._bridge import (
    call_soon_in_asyncio,
    release_request_buffers,
    request_framing_checked,
    reset_stream,
    run_in_asyncio,
    run_in_trio,
    send_messages,
)
from ._errors import BridgeError, InvalidArgument, ResourceExhausted
from ._limits import DEFAULT_LIMITS, Limits, check_constraint_sizes, check_metadata, check_source
from ._metrics import Metrics
from ._security import AUTHORIZATION, Principal, Tokens
from ._status import STATE_ID_HEADER, grpc_error_for, stream_was_cut
from ._types import VariableType
from ._version import __version__
from ._watch import BatchProgress, WatchPlan, WatchStream, plan_watch
from .proto import unified_bridge as pb
from .storage import Store, VariableSnapshot, VariableWrite, session_not_found

WATCH_PATH = "/unified_bridge.UnifiedBridge/WatchVariables"
#: Watch streams that may be ending with a status at once; more wait their turn (``_run_watch``).
ENDINGS_AT_ONCE = 8

T = TypeVar("T")

_RawHandler = Callable[[Stream[Any, Any]], Awaitable[None]]

#: The principal of the call being handled (None when the server checks no tokens).
_caller: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("trio_bridge_caller", default=None)


def _peer_is_gone(stream: Stream[Any, Any]) -> bool:
    """Whether grpclib has terminated ``stream`` on its client's account (a reset, the deadline, the
    connection lost) and is cancelling its handler."""
    wrapper = stream._stream.wrapper
    return wrapper is not None and bool(wrapper.cancelled)


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
        # Watch streams ending with a status whose asyncio side may not have run yet (_run_watch).
        self._endings = trio.Semaphore(ENDINGS_AT_ONCE)
        # Watch calls admitted (counted from the request, before their stream starts), in all and by
        # connection (its peer address).
        self._admitted_watches = 0
        self._watches_by_peer: dict[object, int] = {}
        self._draining = False
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def open_watches(self) -> int:
        """Watch streams open right now, WatchVariables and health Watch (counted from the moment they
        are admitted)."""
        return self._admitted_watches

    async def drain(self) -> None:
        """Refuse new RPCs with UNAVAILABLE, end every watch stream with UNAVAILABLE, then wait until
        the running calls have finished.

        Cancellation (the shutdown's grace period running out) just stops the wait; the server then
        cancels whatever is still running.
        """
        self._draining = True
        for watch in list(self._watches):
            watch.shut_down()
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
        return {
            path: handler._replace(func=self._guard(path.rsplit("/", 1)[-1], handler.func))
            for path, handler in mapping.items()
        }

    def _guard(self, method: str, func: _RawHandler) -> _RawHandler:
        async def guarded(stream: Stream[Any, Any]) -> None:
            if self._draining:
                self.metrics.record_rpc(method, Status.UNAVAILABLE.name)
                raise GRPCError(Status.UNAVAILABLE, "the server is shutting down")
            self._in_flight += 1
            if self._in_flight == 1:
                self._idle = trio.Event()
            status = Status.OK.name
            caller = _caller.set(None)
            try:
                scope_checked: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
                if self.tokens is not None:
                    # Before anything of the request is read.
                    header = stream.metadata.get(AUTHORIZATION) if stream.metadata else None
                    principal = self.tokens.principal_for(header if isinstance(header, str) else None)
                    _caller.set(principal)
                    if method != "CreateSession":
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
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
                self.metrics.record_rpc(method, status)

        return guarded

    @contextlib.contextmanager
    def _scope_checked_on_read(self, stream: Stream[Any, Any], principal: Principal) -> Iterator[None]:
        """In the block, make reading the request refuse a session outside ``principal``'s scope
        exactly as if it did not exist (NOT_FOUND, the same message): a caller learns nothing of
        others' sessions. (Gone after the block: it refers to the stream it is stored on.)"""
        read = stream.recv_message

        async def recv_message() -> Any:
            message = await read()
            session_id = getattr(message, "session_id", "")
            owner = await self._in_store(self.store.owner_of, session_id) if session_id else None
            if owner is not None and not principal.may_use(owner):
                raise session_not_found(session_id)  # exactly as for a session that is not there
            return message

        stream.recv_message = recv_message  # type: ignore[method-assign]
        try:
            yield
        finally:
            del stream.recv_message

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
        value = self._unpack_value(message.name, vtype, message.initial_value)
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
        (snapshot,) = await self._apply_writes(
            message.session_id, [write], source=message.source, metadata=message.metadata
        )
        return pb.SetVariableResponse(variable=enc.variable_to_proto(snapshot))

    async def set_variables(self, message: pb.SetVariablesRequest) -> pb.SetVariablesResponse:
        snapshots = await self._apply_writes(
            message.session_id, message.writes, source=message.source, metadata=message.metadata
        )
        return pb.SetVariablesResponse(variables=[enc.variable_to_proto(s) for s in snapshots])

    async def delete_variable(self, message: pb.DeleteVariableRequest) -> pb.DeleteVariableResponse:
        await self._in_store(self.store.delete_variable, message.session_id, message.variable_identifier)
        return pb.DeleteVariableResponse()

    async def _apply_writes(
        self,
        session_id: str,
        writes: list[pb.VariableWrite],
        *,
        source: str,
        metadata: dict[str, str],
    ) -> list[VariableSnapshot]:
        check_metadata("update", metadata, self.limits)
        check_source(source, self.limits)
        # Decoding needs each variable's type. A variable's id never changes type; a name whose variable
        # was replaced meanwhile is checked again by the store, which refuses a value of the wrong type.
        targets = await self._in_store(
            self.store.get_variables, session_id, [w.variable_identifier for w in writes]
        )
        decoded = [
            VariableWrite(
                identifier=write.variable_identifier,
                value=self._unpack_value(target.name, target.type, write.value),
                expected_version=write.expected_version,
            )
            for write, target in zip(writes, targets, strict=True)
        ]
        return await self._in_store(
            self.store.set_variables, session_id, decoded, source=source, metadata=metadata
        )

    def _unpack_value(self, name: str, vtype: VariableType, packed: Any) -> Any:
        limit = self.limits.max_value_bytes
        if packed is not None and len(packed.value) > limit:
            raise InvalidArgument(
                f"the value for {name!r} is {len(packed.value)} bytes encoded, more than its limit "
                f"max_value_bytes={limit}"
            )
        return enc.unpack_value(name, vtype, packed)

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
        with self.admit_watch(stream):
            await run_in_trio(self._run_watch, stream, plan)

    @contextlib.contextmanager
    def admit_watch(self, stream: Stream[Any, Any]) -> Iterator[None]:
        """Count a watch stream (any stream a client holds open: WatchVariables, health Watch) for the
        block, in all and on its connection; ResourceExhausted naming the limit if there is no room."""
        peer = stream.peer.addr()
        self.check_watch_room(peer)
        self._admitted_watches += 1
        self._watches_by_peer[peer] = self._watches_by_peer.get(peer, 0) + 1
        try:
            yield
        finally:
            self._admitted_watches -= 1
            left = self._watches_by_peer.pop(peer) - 1
            if left:
                self._watches_by_peer[peer] = left

    def check_watch_room(self, peer: object) -> None:
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
            raise ResourceExhausted.over_limit(
                f"this connection has {on_connection} watch streams open, its limit "
                f"max_watch_streams_per_connection={limits.max_watch_streams_per_connection}; open "
                f"another connection for more",
                "max_watch_streams_per_connection",
                limits.max_watch_streams_per_connection,
            )

    async def _run_watch(
        self, stream: Stream[pb.WatchVariablesRequest, pb.VariableUpdate], plan: WatchPlan
    ) -> None:
        """The Trio side of one watch stream. Raises the BridgeError that ended it (a status for the
        client); cancelled when the client goes away."""

        async def send(updates: list[pb.VariableUpdate], progress: BatchProgress) -> None:
            await run_in_asyncio(send_messages, stream, updates, progress)  # one hop for the whole batch

        watch = WatchStream(
            self.store,
            plan,
            send=send,
            queue_size=self.limits.watch_queue_size,
            queue_bytes=self.limits.watch_queue_bytes,
            on_sent=self.metrics.updates_sent.inc,
        )
        self._watches.add(watch)
        if self._draining:  # began while the server started to drain
            watch.shut_down()
        try:
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
        finally:
            self._watches.discard(watch)


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

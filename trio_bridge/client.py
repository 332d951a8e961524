"""The Python client: plain asyncio (no Trio needed), native values in and out, and a watch that
survives reconnects.

>>> async with BridgeClient("127.0.0.1", 50051) as client:
...     session = await client.create_session()
...     await client.register_variable(session.session_id, "temperature", "float", 21.5)
...     async for event in client.watch(session.session_id, ["temperature"]):
...         print(event.kind, event.variable.value if event.variable else "")

Errors are the same classes the server's store raises (``NotFound``, ``InvalidArgument``,
``AlreadyExists``, ``VersionConflict``, ...), carrying the server's message.

Writes (``set``, ``set_many``) are pipelined over one WriteVariables stream per client (see
:class:`_Writes`), or sent with SetVariables to a server that has no such stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import betterproto2
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import decode_metadata
from grpclib.protocol import H2Protocol
from grpclib.stream import recv_message
from h2.exceptions import StreamClosedError as H2StreamClosedError

from . import _encoding as enc
from ._errors import LIMIT_TRAILER, LIMIT_VALUE_TRAILER, BridgeError, NotFound, ResourceExhausted, Unavailable
from ._reach import unreachable
from ._security import AUTHORIZATION
from ._security import client_tls as tls_context
from ._status import STATE_ID_HEADER, error_from_status
from ._types import Constraints, VariableType, native_value
from ._wire import serialize
from .proto import unified_bridge as pb
from .storage.records import SessionInfo, VariableSnapshot

__all__ = [
    "RECONNECTING",
    "BridgeClient",
    "ClientClosed",
    "Reconnect",
    "SyncBridgeClient",
    "SyncWatch",
    "Variable",
    "WatchEvent",
    "tls_context",
]

if TYPE_CHECKING:
    from .sync_client import ClientClosed, SyncBridgeClient, SyncWatch

_SYNC_NAMES = ("ClientClosed", "SyncBridgeClient", "SyncWatch")

log = logging.getLogger("trio_bridge.client")

#: A variable as the client returns it: its value already decoded to the native Python type.
Variable = VariableSnapshot

ReplyT = TypeVar("ReplyT", bound=betterproto2.Message)

_SERVICE = "/unified_bridge.UnifiedBridge/"
#: How long a watch keeps trying to reach a server before it gives up (Reconnect.give_up_after).
DEFAULT_GIVE_UP_SECONDS = 30.0
#: Below h2's default of 100 concurrent streams per connection, which would block the 101st silently.
MAX_STREAMS_PER_CONNECTION = 90
#: Writes the WriteVariables stream has sent and not yet had answered, at most, and their encoded bytes
#: (one write may go past it alone). Later writes wait to be sent. The server answers one write at a
#: time and buffers what comes meanwhile: this keeps that well below its max_connection_buffer_bytes
#: (8 MiB by default).
MAX_WRITES_IN_FLIGHT = 64
MAX_WRITE_BYTES_IN_FLIGHT = 2**20
#: Limits on held-open streams: a write stream they refuse had read nothing, and the writes go by
#: SetVariables instead.
_STREAM_LIMITS = frozenset({"max_watch_streams", "max_watch_streams_per_connection"})


@dataclass(frozen=True)
class WatchEvent:
    """One decoded watch update. ``kind`` is one of ``initial_value``, ``value_change``,
    ``variable_registered``, ``variable_deleted``, ``resync``, ``synced`` or ``heartbeat``; and
    ``reconnecting`` (only with ``include_reconnects``): the stream was lost, ``error`` says why, and
    attempt ``attempt`` to resume follows (a ``synced`` says it succeeded)."""

    kind: str
    variable: Variable | None
    variable_id: str = ""
    old_value: Any = None
    source: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    timestamp: float = 0.0
    #: The store revision it stands at (for a heartbeat, a bookmark: every change up to it was sent).
    revision: int = 0
    #: ``reconnecting``: why the stream was lost, and the how-many-th attempt in a row comes next.
    error: BridgeError | None = None
    attempt: int = 0


@dataclass(frozen=True)
class Reconnect:
    """How a watch reconnects: exponential backoff with full jitter, when a silent connection counts
    as dead (``liveness_factor`` heartbeat intervals without any message), and when to give up."""

    initial_delay: float = 0.1
    max_delay: float = 5.0
    liveness_factor: float = 3.0
    #: Give up after this many failed attempts in a row (None: no such limit).
    max_attempts: int | None = None
    #: Give up once attempts have failed for this many seconds in a row, raising the last error
    #: (None: never; the CLI's ``watch --wait``).
    give_up_after: float | None = DEFAULT_GIVE_UP_SECONDS

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before attempt ``attempt + 1``: up to ``initial_delay * 2**attempt``, at most
        ``max_delay`` (however many attempts: the exponent is capped before it overflows)."""
        return rng.uniform(0, min(self.max_delay, self.initial_delay * 2 ** min(attempt, 64)))


#: The ``kind`` of the event a watch yields for a lost stream (with ``include_reconnects``).
RECONNECTING = "reconnecting"


@dataclass
class _Served:
    """What a watch stream's headers said: the store state it is served from."""

    state_id: str = ""


class _StateLost(Exception):
    """A resumed watch stream is served from another store state (``_status.STATE_ID_HEADER``) than
    the one the watch followed: the server lost that state (an in-memory server that restarted)."""

    def __init__(self, state_id: str) -> None:
        super().__init__(state_id)
        self.state_id = state_id


class BridgeClient:
    """A connection pool to one server. Use it as ``async with BridgeClient(host, port) as client``.

    Unary calls share the first connection; watch streams are spread over as many connections as
    needed to keep each below h2's limit of concurrent streams.

    ``tls``: an ``ssl.SSLContext`` (see :func:`trio_bridge.client.tls_context`) to connect over TLS.
    ``token``: a bearer token, sent with every call, for a server that checks tokens.
    ``also``: more ``(host, port)`` addresses of the same deployment (servers sharing one etcd store):
    when the server in use cannot be reached, a call that could not be sent and every interrupted watch
    move on to the next address (a watch resumes there, losing nothing). A call that was sent when
    the server went away raises (it may or may not have been applied), and so does a call that found
    no address to connect to.
    """

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
        self.addresses = [(host, port), *((h, int(p)) for h, p in also)]
        self.host = host
        self.port = port
        self._tls = tls
        self._metadata = {AUTHORIZATION: f"Bearer {token}"} if token else None
        self.timeout = timeout
        self.reconnect = reconnect or Reconnect()
        self._config = config
        self._channels: list[_Channel] = []
        self._streams: dict[int, int] = {}  # id(channel) → open watch streams on it
        # Watch streams to put on one connection: fewer if the server says its limit is lower.
        self._streams_per_connection = MAX_STREAMS_PER_CONNECTION
        self._types: dict[tuple[str, str], VariableType] = {}  # (session, id or name) → type
        self._rng = random.Random()
        self._writes = _Writes(self)

    async def __aenter__(self) -> BridgeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the write stream (a write it has not answered raises :class:`Unavailable`) and close the
        connections. The client may be used again: it reconnects."""
        self._writes.close()
        self._close_connections()

    def _close_connections(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._streams.clear()

    # ---- connections ---------------------------------------------------------------------------

    def _move_on(self, failed: tuple[str, int]) -> None:
        """Use the next address after ``failed`` (if there is another, and it is still the one in use:
        calls that failed together move on once), dropping every connection to it."""
        if len(self.addresses) < 2 or failed != (self.host, self.port):
            return
        index = (self.addresses.index((self.host, self.port)) + 1) % len(self.addresses)
        self.host, self.port = self.addresses[index]
        log.info("moving to %s:%d", self.host, self.port)
        self._close_connections()  # writes waiting to be sent go on at the new address

    def _new_channel(self) -> _Channel:
        channel = _Channel(self.host, self.port, config=self._config, ssl=self._tls)
        self._channels.append(channel)
        self._streams[id(channel)] = 0
        return channel

    def _unary_channel(self) -> _Channel:
        return self._channels[0] if self._channels else self._new_channel()

    def _watch_channel(self) -> _Channel:
        for channel in self._channels:
            if self._streams[id(channel)] < self._streams_per_connection:
                return channel
        return self._new_channel()

    @property
    def connections(self) -> int:
        """How many HTTP/2 connections the client has opened."""
        return len(self._channels)

    async def _unary(self, method: str, request: betterproto2.Message, reply_type: type[ReplyT]) -> ReplyT:
        """One call; a connection that cannot be made or is lost raises :class:`Unavailable` naming the
        address and the cause (see ``_reach``)."""
        tries = len(self.addresses)
        while True:
            tries -= 1
            address = (self.host, self.port)
            channel = self._unary_channel()
            try:
                return await self._unary_once(channel, method, request, reply_type)
            except TimeoutError:  # the call's deadline (an OSError too, but nothing was lost)
                raise Unavailable(
                    f"{address[0]}:{address[1]} did not answer within {self.timeout:g}s; the call may "
                    "or may not have been applied",
                    address=address,
                ) from None
            except (OSError, StreamTerminatedError) as exc:
                if tries > 0 and isinstance(exc, OSError) and _not_connected(exc):
                    log.info("%s:%d cannot be reached (%s)", *address, exc)
                    self._move_on(address)
                    continue
                raise await unreachable(exc, *address, self._tls, answered=channel.answered) from None

    async def _unary_once(
        self, channel: _Channel, method: str, request: betterproto2.Message, reply_type: type[ReplyT]
    ) -> ReplyT:
        stream = channel.request(
            _SERVICE + method,
            Cardinality.UNARY_UNARY,
            type(request),
            reply_type,
            timeout=self.timeout,
            metadata=self._metadata,
        )
        try:
            async with stream:
                await stream.send_message(request, end=True)
                reply = await stream.recv_message()
        except GRPCError as exc:
            channel.answered = True
            raise _error(exc, stream.trailing_metadata, (self.host, self.port)) from None
        channel.answered = True
        assert reply is not None
        return reply

    # ---- sessions ------------------------------------------------------------------------------

    async def ping(self, message: str = "") -> str:
        """The server's version; raises if it does not answer."""
        reply = await self._unary("Ping", pb.PingRequest(message=message), pb.PingResponse)
        return reply.server_version

    async def create_session(
        self, session_id: str = "", *, metadata: Mapping[str, str] | None = None, ttl: float | None = None
    ) -> SessionInfo:
        request = pb.CreateSessionRequest(
            session_id=session_id, metadata=dict(metadata or {}), ttl_seconds=ttl or 0
        )
        reply = await self._unary("CreateSession", request, pb.CreateSessionResponse)
        assert reply.session is not None
        return enc.session_from_proto(reply.session)

    async def get_session(self, session_id: str) -> SessionInfo:
        reply = await self._unary(
            "GetSession", pb.GetSessionRequest(session_id=session_id), pb.GetSessionResponse
        )
        assert reply.session is not None
        return enc.session_from_proto(reply.session)

    async def list_sessions(self) -> list[SessionInfo]:
        reply = await self._unary("ListSessions", pb.ListSessionsRequest(), pb.ListSessionsResponse)
        return [enc.session_from_proto(s) for s in reply.sessions]

    async def cleanup_session(self, session_id: str) -> int:
        """Remove the session; return how many variables went with it."""
        reply = await self._unary(
            "CleanupSession", pb.CleanupSessionRequest(session_id=session_id), pb.CleanupSessionResponse
        )
        return reply.variables_removed

    # ---- variables -----------------------------------------------------------------------------

    async def register_variable(
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
        vtype = _variable_type(vtype)
        request = pb.RegisterVariableRequest(
            session_id=session_id,
            name=name,
            type=pb.VariableType(int(vtype)),
            initial_value=enc.pack_value(vtype, native_value(vtype, value)),
            constraints=enc.constraints_to_proto(constraints or Constraints()),
            metadata=dict(metadata or {}),
            source=source,
        )
        reply = await self._unary("RegisterVariable", request, pb.RegisterVariableResponse)
        assert reply.variable is not None
        return self._remember(reply.variable)

    async def get(self, session_id: str, identifier: str) -> Variable:
        """One variable, by id or name."""
        request = pb.GetVariableRequest(session_id=session_id, variable_identifier=identifier)
        reply = await self._unary("GetVariable", request, pb.GetVariableResponse)
        assert reply.variable is not None
        return self._remember(reply.variable)

    async def get_many(self, session_id: str, identifiers: Sequence[str]) -> list[Variable]:
        """Several variables, in the order asked; NotFound names every unknown one."""
        request = pb.GetVariablesRequest(session_id=session_id, variable_identifiers=list(identifiers))
        reply = await self._unary("GetVariables", request, pb.GetVariablesResponse)
        return [self._remember(v) for v in reply.variables]

    async def list_variables(self, session_id: str) -> list[Variable]:
        reply = await self._unary(
            "ListVariables", pb.ListVariablesRequest(session_id=session_id), pb.ListVariablesResponse
        )
        return [self._remember(v) for v in reply.variables]

    async def set(
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
        (else ``VersionConflict``, whose ``current`` is the version to read again). Pipelined as
        ``set_many`` is."""
        (result,) = await self.set_many(
            session_id, [(identifier, value, expected_version)], source=source, metadata=metadata
        )
        return result

    async def set_many(
        self,
        session_id: str,
        writes: Mapping[str, Any] | Iterable[tuple[str, Any, int | None]],
        *,
        source: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> list[Variable]:
        """Write several values atomically: all are applied or none. ``writes`` maps identifiers to
        values, or lists ``(identifier, value, expected_version or None)``.

        Concurrent calls share the client's WriteVariables stream, each awaiting its own result, and
        are applied in the order they were called (by SetVariables, where the server has no such
        stream or no room for one, in no set order). A call whose write was sent when the stream or its
        connection broke raises :class:`Unavailable` (it may or may not have been applied, as with a
        lost SetVariables); a call not yet sent goes on a new stream. ``timeout`` applies per call.
        Cancelled, a call that was sent may still be applied."""
        items = [(k, v, None) for k, v in writes.items()] if isinstance(writes, Mapping) else list(writes)
        unknown = [identifier for identifier, _, _ in items if (session_id, identifier) not in self._types]
        if unknown:
            await self.get_many(session_id, unknown)  # learn their types, to encode the values
        proto_writes = []
        for identifier, value, expected_version in items:
            vtype = self._types[(session_id, identifier)]
            proto_writes.append(
                pb.VariableWrite(
                    variable_identifier=identifier,
                    value=enc.pack_value(vtype, native_value(vtype, value)),
                    expected_version=expected_version,
                )
            )
        request = pb.WriteRequest(
            session_id=session_id, writes=proto_writes, source=source, metadata=dict(metadata or {})
        )
        return [self._remember(v) for v in await self._write(request)]

    async def _write(self, request: pb.WriteRequest) -> list[pb.Variable]:
        """One write (an atomic batch): on the WriteVariables stream, or with SetVariables where the
        server has no such stream (an older one: remembered per address), or no room for one."""
        if (self.host, self.port) not in self._writes.unsupported:
            try:
                return await self._writes.write(request)
            except _UseUnary:
                pass
        unary = pb.SetVariablesRequest(
            session_id=request.session_id,
            writes=request.writes,
            source=request.source,
            metadata=request.metadata,
        )
        return (await self._unary("SetVariables", unary, pb.SetVariablesResponse)).variables

    async def delete_variable(self, session_id: str, identifier: str) -> None:
        request = pb.DeleteVariableRequest(session_id=session_id, variable_identifier=identifier)
        await self._unary("DeleteVariable", request, pb.DeleteVariableResponse)

    def _remember(self, message: pb.Variable) -> Variable:
        variable = enc.variable_from_proto(message)
        self._types[(variable.session_id, variable.id)] = variable.type
        self._types[(variable.session_id, variable.name)] = variable.type
        return variable

    # ---- watch ---------------------------------------------------------------------------------

    async def watch(
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
    ) -> AsyncIterator[WatchEvent]:
        """Decoded watch events, for as long as you iterate; an empty ``identifiers`` watches the
        whole session.

        On UNAVAILABLE, RESOURCE_EXHAUSTED, a dropped connection, or silence for longer than
        ``liveness_factor`` heartbeat intervals, it reconnects with backoff and resumes from the last
        version it yielded of each variable: across reconnects you still see every version exactly once,
        or an explicit ``resync`` event (then ``synced`` again). Each lost stream is logged (logger
        ``trio_bridge.client``, WARNING), or with ``include_reconnects`` yielded as a ``reconnecting``
        event instead. It gives up, raising the last error (an :class:`Unavailable` naming the address),
        after ``reconnect.give_up_after`` seconds of failures in a row (30 by default), at once when
        retrying cannot help (TLS on one side only, not a gRPC server). Any other status raises its
        error; a session that vanished because the server lost its state (an in-memory server that
        restarted) raises :class:`NotFound` saying so.

        Leaving the loop ends the server stream (at once with ``contextlib.aclosing``, else when the
        generator is finalized); so does cancelling the task that iterates.
        """
        interval = heartbeat_interval if heartbeat_interval is not None else 30.0
        options = {"heartbeat_interval_ms": str(round(interval * 1000))}
        if coalesce:
            options["slow_consumer"] = "coalesce"
        delivered: dict[str, int] = dict(resume_versions or {})
        revision = 0  # every change up to it delivered (past the first "synced")
        held_state = ""  # the store state (its id) of the last stream that reached "synced"
        failures = 0
        loop = asyncio.get_running_loop()
        last_contact = loop.time()  # when a server last sent this watch anything
        last_error: BridgeError = Unavailable(f"no answer from {self.host}:{self.port}")
        give_up = self.reconnect.give_up_after
        while True:
            request = pb.WatchVariablesRequest(
                session_id=session_id,
                variable_identifiers=list(identifiers),
                include_initial_values=include_initial_values,
                options=options,
                resume_versions=delivered,
                resume_revision=revision,
            )
            synced = False  # this stream's replay comes before its "synced": only then is it whole
            address = (self.host, self.port)
            served = _Served()
            # Until a server answers, an attempt (connecting included) may last only until the give-up
            # time; once one does, the liveness window watches the stream.
            deadline = last_contact + give_up if give_up is not None else None
            try:
                async with asyncio.timeout_at(deadline) as attempt:
                    async for update in self._one_stream(
                        request,
                        liveness=interval * self.reconnect.liveness_factor,
                        held_state=held_state,
                        served=served,
                    ):
                        attempt.reschedule(None)  # a server answers: the consumer's time is its own
                        last_contact = loop.time()
                        event = _event(update)
                        if event.kind != enc.HEARTBEAT:
                            failures = 0  # progress (a long replay cut short before "synced" is too)
                        if event.kind == enc.SYNCED:
                            synced = True
                            held_state = served.state_id or held_state
                        if synced:
                            revision = max(revision, event.revision)
                        if event.variable is not None:
                            if event.kind == enc.VARIABLE_DELETED:
                                delivered.pop(event.variable.id, None)
                            else:
                                delivered[event.variable.id] = event.variable.version
                        elif event.kind == enc.VARIABLE_DELETED:
                            delivered.pop(event.variable_id, None)
                        if event.kind != enc.HEARTBEAT or include_heartbeats:
                            yield event
            except (Unavailable, ResourceExhausted, TimeoutError) as exc:
                error = exc if not isinstance(exc, TimeoutError) else last_error
                if isinstance(error, Unavailable) and not error.retryable:
                    raise error from None
                failures += 1
                waited = loop.time() - last_contact
                if give_up is not None and waited >= give_up:
                    if isinstance(error, Unavailable):
                        raise Unavailable(
                            f"{error} (gave up after {waited:.0f}s without an answer)",
                            error.details,
                            address=error.address,
                        ) from None
                    raise error from None
                if self.reconnect.max_attempts is not None and failures > self.reconnect.max_attempts:
                    raise error from None
                last_error = error
                if not isinstance(error, ResourceExhausted):  # the server is gone or going: try another
                    self._move_on(address)
                delay = self.reconnect.delay(failures - 1, self._rng)
                if give_up is not None:
                    delay = max(0.0, min(delay, last_contact + give_up - loop.time()))
                if include_reconnects:
                    log.info("watch of %s: %s; retrying (%d) in %.1fs", session_id, error, failures, delay)
                    yield WatchEvent(kind=RECONNECTING, variable=None, error=error, attempt=failures)
                else:
                    log.warning("watch of %s: %s; retrying (%d) in %.1fs", session_id, error, failures, delay)
                await asyncio.sleep(delay)
                continue
            except _StateLost as lost:
                where = f"{address[0]}:{address[1]}"
                in_memory = lost.state_id.startswith("memory:")
                how = " (it keeps state in memory and restarted)" if in_memory else ""
                raise NotFound(
                    f"session {session_id!r} is gone: the server at {where} lost the state this watch "
                    f"was following{how}; the watch has ended"
                ) from None
            return  # the server ended the stream with OK (it never does today)

    async def _one_stream(
        self, request: pb.WatchVariablesRequest, *, liveness: float, held_state: str, served: _Served
    ) -> AsyncIterator[pb.VariableUpdate]:
        """One WatchVariables stream's updates. A lost, refused or silent connection raises
        :class:`Unavailable`; a status raises its error; a stream served from another store state than
        ``held_state`` (when there is one) raises :class:`_StateLost`. ``served`` learns the state."""
        channel = self._watch_channel()
        address = (self.host, self.port)
        self._streams[id(channel)] += 1
        stream = channel.request(
            _SERVICE + "WatchVariables",
            Cardinality.UNARY_STREAM,
            pb.WatchVariablesRequest,
            pb.VariableUpdate,
            metadata=self._metadata,
        )
        silent = False
        try:
            async with stream:
                await stream.send_message(request, end=True)
                try:
                    # Not asyncio.wait_for: on 3.11 it drops a cancellation that lands as a message
                    # arrives, and the watch would go on reading after its consumer left.
                    async with asyncio.timeout(liveness):
                        await stream.recv_initial_metadata()
                except TimeoutError:
                    silent = True
                    raise Unavailable(
                        f"{address[0]}:{address[1]} sent nothing for {liveness:.1f}s", address=address
                    ) from None
                channel.answered = True
                state_id = stream.initial_metadata.get(STATE_ID_HEADER) if stream.initial_metadata else None
                served.state_id = state_id if isinstance(state_id, str) else ""
                if held_state and served.state_id and served.state_id != held_state:
                    raise _StateLost(served.state_id)
                while True:
                    try:
                        async with asyncio.timeout(liveness):
                            update = await stream.recv_message()
                    except TimeoutError:
                        silent = True
                        raise Unavailable(
                            f"{address[0]}:{address[1]} sent nothing for {liveness:.1f}s",
                            address=address,
                        ) from None
                    if update is None:
                        break
                    yield update
            # grpclib skips the trailers' status when the connection closed right after them (as a
            # server that shuts down does): read it here, so an UNAVAILABLE is not taken for an OK.
            stream._maybe_raise()
            if not _ended_ok(stream):
                raise Unavailable(
                    f"the stream from {address[0]}:{address[1]} ended without a status", address=address
                )
        except GRPCError as exc:
            channel.answered = True
            error = _error(exc, stream.trailing_metadata, address)
            if isinstance(error, ResourceExhausted) and error.limit == "max_watch_streams_per_connection":
                # The server allows fewer streams per connection than we put on one: from now on,
                # spread them thinner (the retry goes to a connection with room).
                with contextlib.suppress(KeyError, ValueError):
                    limit = int(error.details[LIMIT_VALUE_TRAILER])
                    self._streams_per_connection = max(1, min(self._streams_per_connection, limit))
            raise error from None
        except (OSError, StreamTerminatedError) as exc:
            raise await unreachable(exc, *address, self._tls, answered=channel.answered) from None
        finally:
            if id(channel) in self._streams:
                self._streams[id(channel)] -= 1
            if silent or _connection_lost(channel):
                self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        """Forget a connection that died (or went silent: every stream on it is as dead), so the next
        stream opens a fresh one."""
        if channel in self._channels:
            self._channels.remove(channel)
            del self._streams[id(channel)]
            channel.close()


# ---- the write stream ------------------------------------------------------------------------------

_WRITE_PATH = _SERVICE + "WriteVariables"

#: Makes the error one write raises: a new object for each write (never one raised by several).
_ErrorFactory = Callable[[], Exception]


class _UseUnary(Exception):
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
        self.future.set_exception(_status_error(status, result.message or None, trailers, address))

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


class _Writes:
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
        :class:`Unavailable`: it may or may not be applied). Raises :class:`_UseUnary` if it must go
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
                    self._fail_waiting(_UseUnary)
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
        except _StreamOver:
            return None
        finally:
            if id(channel) in client._streams:
                client._streams[id(channel)] -= 1
            if _connection_lost(channel):
                client._drop(channel)

    async def _open_and_run(
        self, stream: Any, channel: _Channel, address: tuple[str, int], changed: asyncio.Event
    ) -> tuple[Unavailable, bool]:
        """Open ``stream`` and run it to its end, raising :class:`_StreamOver`; or why it could not be
        opened, and whether because the connection could not be made."""
        async with stream:
            try:
                await stream.send_request()
            except (OSError, StreamTerminatedError) as exc:
                error = await unreachable(exc, *address, self._client._tls, answered=channel.answered)
                return error, isinstance(exc, OSError) and _not_connected(exc)
            self._ended(await self._exchange(stream, channel, address, changed), address)
            raise _StreamOver  # leave without waiting for trailers: the stream is over

    async def _exchange(
        self, stream: Any, channel: _Channel, address: tuple[str, int], changed: asyncio.Event
    ) -> _End:
        """Send and receive on an open stream until it ends (two tasks); how it ended. Cancellation:
        both tasks are cancelled."""
        receiving = asyncio.ensure_future(self._receive(stream, channel, address, changed))
        sending = asyncio.ensure_future(self._send(stream, changed))
        for task in (receiving, sending):
            task.add_done_callback(_retrieve)
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
        self, stream: Any, channel: _Channel, address: tuple[str, int], changed: asyncio.Event
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
            if _ended_by_server(stream):  # then reset it, which interrupted grpclib's reading
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
        self, stream: Any, channel: _Channel, address: tuple[str, int], changed: asyncio.Event
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
    def _status_end(exc: GRPCError, stream: Any, channel: _Channel, address: tuple[str, int]) -> _End:
        channel.answered = True
        inner = stream._stream
        trailers = {str(k): str(v) for k, v in decode_metadata(inner.trailers or inner.headers or []).items()}
        status, message = exc.status, exc.message
        return _End(
            lambda: _status_error(status, message, trailers, address),
            status=status,
            accepted=_accepted(stream),
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
                pending.fail(_UseUnary if unary else end.error)
            self._fail_waiting(_UseUnary if unary else end.error)
            return
        if end.status is Status.UNAVAILABLE:  # the server shuts down: each was sent when it broke
            for pending in unanswered:
                pending.fail(end.error)
            return
        if unanswered:  # caused by the first; the others were not read
            unanswered[0].fail(end.error)
            self._waiting.extendleft(reversed(unanswered[1:]))


class _StreamOver(Exception):
    """Leaves a grpclib stream's block without waiting for its trailers (they came, or never will)."""


def _accepted(stream: Any) -> bool:
    """Whether the server accepted a stream (sent its headers), rather than answered a status alone."""
    headers = stream._stream.headers
    return headers is not None and "grpc-status" not in dict(headers)


def _ended_by_server(stream: Any) -> bool:
    """Whether the server sent a stream's status (in its trailers, or alone)."""
    inner = stream._stream
    return inner.trailers is not None or (inner.headers is not None and not _accepted(stream))


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A done callback that retrieves a task's exception (it is read elsewhere, or does not matter)."""
    if not task.cancelled():
        task.exception()


class _Channel(Channel):
    """grpclib's Channel, except that a connection lost while it was being made (a peer that resets it
    at once) raises ConnectionResetError. grpclib returns such a connection, and the call made on it
    then fails inside grpclib with an AttributeError; the next call opens a new connection.

    ``answered``: whether the server at the other end ever answered a call (then a lost connection is
    just lost; before, it may not be a trio-bridge server at all: see ``_reach``)."""

    answered = False

    async def __connect__(self) -> H2Protocol:
        protocol = await super().__connect__()
        if _connection_lost(self):
            raise ConnectionResetError("reset as soon as it was made")
        return protocol


def _not_connected(exc: BaseException) -> bool:
    """Whether a call failed making its connection, so nothing of it was sent."""
    return isinstance(exc, (ConnectionRefusedError, ConnectionResetError)) or (
        isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.errno is not None
    )


def _ended_ok(stream: Any) -> bool:
    trailers = dict(stream._stream.trailers or stream._stream.headers or [])
    return bool(trailers.get("grpc-status") == "0")


def _connection_lost(channel: Channel) -> bool:
    protocol = channel._protocol
    return protocol is not None and bool(getattr(protocol.handler, "connection_lost", False))


def _error(exc: GRPCError, trailing: Any, address: tuple[str, int]) -> BridgeError:
    """The error a status stands for; an UNAVAILABLE names the server that sent it."""
    trailers = {str(k): str(v) for k, v in (trailing or {}).items()}
    return _status_error(exc.status, exc.message, trailers, address)


def _status_error(
    status: Status, message: str | None, trailers: dict[str, str], address: tuple[str, int]
) -> BridgeError:
    error = error_from_status(status, message, trailers)
    if isinstance(error, Unavailable):
        return Unavailable(f"{address[0]}:{address[1]}: {error}", error.details, address=address)
    return error


def _event(update: pb.VariableUpdate) -> WatchEvent:
    variable = enc.variable_from_proto(update.variable) if update.variable is not None else None
    old_value = None
    if variable is not None and update.old_value is not None and update.old_value.type_url:
        old_value = enc.unpack_value(variable.name, variable.type, update.old_value)
    return WatchEvent(
        kind=update.update_type,
        variable=variable,
        variable_id=update.variable_id,
        old_value=old_value,
        source=update.update_source,
        metadata=dict(update.update_metadata),
        timestamp=enc.seconds(update.timestamp),
        revision=update.revision,
    )


def _variable_type(vtype: VariableType | str) -> VariableType:
    if isinstance(vtype, VariableType):
        return vtype
    try:
        return VariableType[vtype.upper()]
    except KeyError:
        known = ", ".join(t.label for t in VariableType)
        raise ValueError(f"unknown variable type {vtype!r}; known: {known}") from None


def __getattr__(name: str) -> Any:
    """The blocking client (:mod:`trio_bridge.sync_client`), imported on first use: it imports this
    module."""
    if name in _SYNC_NAMES:
        from . import sync_client

        return getattr(sync_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

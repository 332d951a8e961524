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
``_client_writes``), or sent with SetVariables to a server that has no such stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import betterproto2
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError

from . import _encoding as enc
from ._client_calls import SERVICE, ClientChannel, connection_lost, ended_ok, grpc_error, not_connected
from ._client_writes import UseUnary, Writes
from ._errors import LIMIT_VALUE_TRAILER, BridgeError, NotFound, ResourceExhausted, Unavailable
from ._reach import unreachable
from ._security import AUTHORIZATION
from ._security import client_tls as tls_context
from ._status import STATE_ID_HEADER
from ._types import Constraints, VariableType, native_value
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

#: How long a watch keeps trying to reach a server before it gives up (Reconnect.give_up_after).
DEFAULT_GIVE_UP_SECONDS = 30.0
#: Below h2's default of 100 concurrent streams per connection, which would block the 101st silently.
MAX_STREAMS_PER_CONNECTION = 90


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
        self._channels: list[ClientChannel] = []
        self._streams: dict[int, int] = {}  # id(channel) → open watch streams on it
        # Watch streams to put on one connection: fewer if the server says its limit is lower.
        self._streams_per_connection = MAX_STREAMS_PER_CONNECTION
        self._types: dict[tuple[str, str], VariableType] = {}  # (session, id or name) → type
        self._rng = random.Random()
        self._writes = Writes(self)

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

    def _new_channel(self) -> ClientChannel:
        channel = ClientChannel(self.host, self.port, config=self._config, ssl=self._tls)
        self._channels.append(channel)
        self._streams[id(channel)] = 0
        return channel

    def _unary_channel(self) -> ClientChannel:
        return self._channels[0] if self._channels else self._new_channel()

    def _watch_channel(self) -> ClientChannel:
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
                if tries > 0 and isinstance(exc, OSError) and not_connected(exc):
                    log.info("%s:%d cannot be reached (%s)", *address, exc)
                    self._move_on(address)
                    continue
                raise await unreachable(exc, *address, self._tls, answered=channel.answered) from None

    async def _unary_once(
        self, channel: ClientChannel, method: str, request: betterproto2.Message, reply_type: type[ReplyT]
    ) -> ReplyT:
        stream = channel.request(
            SERVICE + method,
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
            raise grpc_error(exc, stream.trailing_metadata, (self.host, self.port)) from None
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
            except UseUnary:
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
            SERVICE + "WatchVariables",
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
            if not ended_ok(stream):
                raise Unavailable(
                    f"the stream from {address[0]}:{address[1]} ended without a status", address=address
                )
        except GRPCError as exc:
            channel.answered = True
            error = grpc_error(exc, stream.trailing_metadata, address)
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
            if silent or connection_lost(channel):
                self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        """Forget a connection that died (or went silent: every stream on it is as dead), so the next
        stream opens a fresh one."""
        if channel in self._channels:
            self._channels.remove(channel)
            del self._streams[id(channel)]
            channel.close()


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

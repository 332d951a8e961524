"""A thin, typed Trio client for etcd v3 over grpclib (crossing into asyncio through trio-asyncio).

Every public method is Trio code, to be called inside ``trio_asyncio.open_loop()`` (the server always
runs there): grpclib is asyncio, and each gRPC exchange runs as an asyncio task through
``trio_asyncio.aio_as_trio`` (grpclib insists on running inside an asyncio task). The client is bound to
the trio-asyncio loop it was first used in. Requests and replies are the betterproto2 messages generated
from ``proto/etcd/*.proto`` (``trio_bridge.proto.etcdserverpb``, ``trio_bridge.proto.mvccpb``).

>>> async with trio_asyncio.open_loop():
...     async with open_etcd_client([("127.0.0.1", 2379)]) as etcd:
...         put = await etcd.put(b"/k", b"v", prev_kv=True)
...         async with etcd.watch(b"/", prefix_end(b"/"), start_revision=put.header.revision) as watch:
...             async for response in watch:
...                 ...

**Endpoints.** The client talks to one endpoint at a time. A call that could not reach it (connection
refused or lost before the request went out), or that etcd refused as ``UNAVAILABLE`` before doing
anything (``etcdserver: no leader``), moves to the next endpoint and tries again there: each endpoint at
most once per call, so a call ends. Read-only calls (``range``, a ``txn`` of ranges only, ``status``,
``lease_time_to_live``, ``lease_keep_alive_once``, opening a watch) also move on after a failure that
came once the request was sent. Writes then do not: they raise :class:`EtcdUnavailable` with
``maybe_applied=True`` (the request may or may not have been applied; etcd's Go client draws the same
line). When the leader dies, a write that a follower forwarded to it waits for its deadline
(``request_timeout``) and raises that; during the election members answer "no leader". The caller
retries with backoff (and, for a write that may have been applied, reads before writing again).

**Cancellation.** Cancelling a call cancels the asyncio task that runs it, which resets the HTTP/2
stream. Whether etcd already applied a cancelled write is unknown: a cancelled ``put``/``txn``/
``delete_range``/``lease_revoke``/``compact`` may or may not have been applied (read the key or lease
again to know).

Calls and watch streams carry ``hasleader: true`` (etcd's "require leader"; not ``status`` nor a
serializable ``range``), so a member cut off from its quorum refuses them (and ends its watch streams)
instead of letting them wait.

A watch whose connection silently dies (no RST: a network partition, not a killed process) hangs
until HTTP/2 keepalive pings notice (``config=Configuration(_keepalive_time=...)``) or the caller's own
liveness check does (``request_progress`` under a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, NoReturn, TypeVar

import betterproto2
import trio
import trio_asyncio
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from ...proto import etcdserverpb as pb
from ...proto import mvccpb

__all__ = [
    "Compacted",
    "CompareOp",
    "EtcdClient",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdRequestTooLarge",
    "EtcdTooManyOps",
    "EtcdUnavailable",
    "EtcdWatch",
    "compare_create",
    "compare_lease",
    "compare_mod",
    "compare_value",
    "compare_version",
    "is_progress_notify",
    "op_delete",
    "op_put",
    "op_range",
    "open_etcd_client",
    "prefix_end",
]

ReplyT = TypeVar("ReplyT", bound=betterproto2.Message)

#: Per-attempt deadline of a unary call, in seconds.
DEFAULT_TIMEOUT = 5.0

_KV = "/etcdserverpb.KV/"
_WATCH = "/etcdserverpb.Watch/Watch"
_LEASE = "/etcdserverpb.Lease/"
_MAINTENANCE = "/etcdserverpb.Maintenance/"
_AUTH = "/etcdserverpb.Auth/"

_REQUIRE_LEADER = {"hasleader": "true"}

# etcd's error messages (api/v3rpc/rpctypes), matched to pick an exception.
_TOO_LARGE = ("etcdserver: request is too large", "grpc: received message larger than max")
_TOO_MANY_OPS = "etcdserver: too many operations in txn request"
_COMPACTED = "etcdserver: mvcc: required revision has been compacted"
_LEASE_NOT_FOUND = "etcdserver: requested lease not found"
# etcd is too far behind applying what it committed (RESOURCE_EXHAUSTED): transient, like UNAVAILABLE.
_OVERLOADED = "etcdserver: too many requests"
# Refusals etcd makes before doing anything: safe to send a write elsewhere.
_NOT_APPLIED = ("etcdserver: no leader", "etcdserver: not capable", _OVERLOADED)
# The token is unknown, stale or missing: authenticate again and retry once.
_STALE_TOKEN = (
    "etcdserver: invalid auth token",
    "etcdserver: revision of auth store is old",
    "etcdserver: user name is empty",
)

# What a lost or unreachable connection raises inside grpclib.
_TRANSPORT_ERRORS = (OSError, StreamTerminatedError, ProtocolError, asyncio.TimeoutError)


# ---- errors ---------------------------------------------------------------------------------------


class EtcdError(Exception):
    """An error from etcd (its message kept in the text) or from talking to it. ``status`` is the
    gRPC status when etcd answered with one."""

    def __init__(self, message: str, *, status: Status | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class EtcdUnavailable(EtcdError):
    """No endpoint could serve the call: connection refused or lost, ``UNAVAILABLE``, or a deadline.
    ``maybe_applied`` is True when a write had been sent and may or may not have been applied."""

    def __init__(self, message: str, *, status: Status | None = None, maybe_applied: bool = False) -> None:
        super().__init__(message, status=status)
        self.maybe_applied = maybe_applied


class Compacted(EtcdError):
    """The revision asked for is compacted. ``revision`` is etcd's compact revision (the oldest still
    readable) when etcd said it (a cancelled watch does), else 0 (a ``range`` at an old revision)."""

    def __init__(self, revision: int, message: str = "") -> None:
        super().__init__(message or f"etcd history is compacted up to revision {revision}")
        self.revision = revision


class EtcdRequestTooLarge(EtcdError):
    """etcd refused a request over ``--max-request-bytes`` (1.5 MiB by default)."""


class EtcdTooManyOps(EtcdRequestTooLarge):
    """etcd refused a txn with more operations than ``--max-txn-ops`` (128 by default) in one list."""


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (never granted, revoked or expired)."""


def _error(exc: GRPCError, *, sent: bool = True, write: bool = False) -> EtcdError:
    message = exc.message or exc.status.name
    if exc.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED) or message.startswith(_OVERLOADED):
        applied = write and sent and not message.startswith(_NOT_APPLIED)
        return EtcdUnavailable(message, status=exc.status, maybe_applied=applied)
    if message.startswith(_TOO_MANY_OPS):
        return EtcdTooManyOps(message, status=exc.status)
    if message.startswith(_TOO_LARGE):
        return EtcdRequestTooLarge(message, status=exc.status)
    if message.startswith(_COMPACTED):
        return Compacted(0, message)
    if message.startswith(_LEASE_NOT_FOUND):
        return EtcdLeaseNotFound(message, status=exc.status)
    return EtcdError(message, status=exc.status)


def _uncertain(path: str, where: str, why: str, status: Status | None) -> EtcdUnavailable:
    return EtcdUnavailable(
        f"{path} failed at {where} and may or may not have been applied: {why}",
        status=status,
        maybe_applied=True,
    )


def _token_refused(exc: BaseException) -> bool:
    """Whether etcd refused the call's token (so authenticating again may help)."""
    if isinstance(exc, GRPCError):
        return (exc.message or "").startswith(_STALE_TOKEN)
    # etcd 3.5 creates a watch sent with a stale token and cancels it at once, "permission denied".
    return (
        isinstance(exc, EtcdError)
        and not isinstance(exc, Compacted)
        and any(reason in exc.message for reason in (*_STALE_TOKEN, "etcdserver: permission denied"))
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "deadline exceeded"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---- message helpers ------------------------------------------------------------------------------

CompareOp = Literal["=", "!=", "<", ">"]
_RESULTS = {
    "=": pb.CompareCompareResult.EQUAL,
    "!=": pb.CompareCompareResult.NOT_EQUAL,
    "<": pb.CompareCompareResult.LESS,
    ">": pb.CompareCompareResult.GREATER,
}


def compare_version(key: bytes, op: CompareOp, version: int) -> pb.Compare:
    """``version(key) op version``; an absent key has version 0."""
    return pb.Compare(result=_RESULTS[op], target=pb.CompareCompareTarget.VERSION, key=key, version=version)


def compare_create(key: bytes, op: CompareOp, revision: int) -> pb.Compare:
    """``create_revision(key) op revision``; an absent key has create revision 0."""
    return pb.Compare(
        result=_RESULTS[op], target=pb.CompareCompareTarget.CREATE, key=key, create_revision=revision
    )


def compare_mod(key: bytes, op: CompareOp, revision: int) -> pb.Compare:
    """``mod_revision(key) op revision``; an absent key has mod revision 0."""
    return pb.Compare(result=_RESULTS[op], target=pb.CompareCompareTarget.MOD, key=key, mod_revision=revision)


def compare_value(key: bytes, op: CompareOp, value: bytes) -> pb.Compare:
    """``value(key) op value`` (an absent key fails every value comparison)."""
    return pb.Compare(result=_RESULTS[op], target=pb.CompareCompareTarget.VALUE, key=key, value=value)


def compare_lease(key: bytes, op: CompareOp, lease: int) -> pb.Compare:
    """``lease(key) op lease``; a key without lease (or absent) has lease 0."""
    return pb.Compare(result=_RESULTS[op], target=pb.CompareCompareTarget.LEASE, key=key, lease=lease)


def op_put(key: bytes, value: bytes, *, lease: int = 0, prev_kv: bool = False) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease, prev_kv=prev_kv))


def op_range(
    key: bytes, range_end: bytes = b"", *, limit: int = 0, keys_only: bool = False, count_only: bool = False
) -> pb.RequestOp:
    return pb.RequestOp(
        request_range=pb.RangeRequest(
            key=key, range_end=range_end, limit=limit, keys_only=keys_only, count_only=count_only
        )
    )


def op_delete(key: bytes, range_end: bytes = b"", *, prev_kv: bool = False) -> pb.RequestOp:
    return pb.RequestOp(
        request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end, prev_kv=prev_kv)
    )


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes [prefix, range_end) every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def is_progress_notify(response: pb.WatchResponse) -> bool:
    """Whether a watch response is a progress notification: no events, its ``header.revision`` the
    revision everything at or below which was sent."""
    return not response.events and not response.created and not response.canceled


def _read_only(ops: Sequence[pb.RequestOp]) -> bool:
    for op in ops:
        if op.request_txn is not None:
            if not (_read_only(op.request_txn.success) and _read_only(op.request_txn.failure)):
                return False
        elif op.request_range is None:
            return False
    return True


# ---- grpclib, on the asyncio side -----------------------------------------------------------------


class _Channel(Channel):
    """grpclib's Channel, except that a connection lost while it was being made raises
    ConnectionResetError (grpclib would return it, and the call made on it then fails with an
    AttributeError inside grpclib)."""

    async def __connect__(self) -> H2Protocol:
        protocol = await super().__connect__()
        if getattr(protocol.handler, "connection_lost", False):
            raise ConnectionResetError(f"the connection to {self._host}:{self._port} was lost at once")
        return protocol


def _connection_lost(channel: Channel) -> bool:
    protocol = channel._protocol
    return protocol is not None and bool(getattr(protocol.handler, "connection_lost", False))


class _Progress:
    """Whether the request left: set once its headers were sent (before that, nothing reached etcd)."""

    sent = False


async def _aio_exchange(
    channel: Channel,
    path: str,
    cardinality: Cardinality,
    request: betterproto2.Message,
    reply_type: type[ReplyT],
    deadline: float | None,
    metadata: Mapping[str, str],
    progress: _Progress,
) -> ReplyT:
    """One request, one reply (a unary call, or one message each way on a bidi stream), run as an
    asyncio task."""
    stream: Stream[Any, ReplyT] = channel.request(
        path, cardinality, type(request), reply_type, timeout=deadline, metadata=dict(metadata)
    )
    async with stream:
        await stream.send_request()  # connects first: OSError here means nothing was sent
        progress.sent = True
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
    if reply is None:
        raise StreamTerminatedError(f"{path}: the stream ended without a reply")
    return reply


async def _aio_open_watch(
    channel: Channel, create: pb.WatchCreateRequest, metadata: Mapping[str, str]
) -> tuple[Stream[pb.WatchRequest, pb.WatchResponse], pb.WatchResponse]:
    """Open a Watch stream, create one watch on it, and return the stream and etcd's ``created``
    response. The stream is closed again if anything fails (cancellation included)."""
    stream: Stream[pb.WatchRequest, pb.WatchResponse] = channel.request(
        _WATCH, Cardinality.STREAM_STREAM, pb.WatchRequest, pb.WatchResponse, metadata=dict(metadata)
    )
    await stream.__aenter__()
    try:
        await stream.send_request()
        await stream.send_message(pb.WatchRequest(create_request=create))
        while True:
            response = await stream.recv_message()
            if response is None:
                await _aio_ended(stream, "etcd ended the watch stream before creating the watch")
            _raise_if_canceled(response)
            if response.created:
                return stream, response
    except BaseException as exc:
        await stream.__aexit__(type(exc), exc, exc.__traceback__)
        raise


async def _aio_ended(stream: Stream[Any, Any], what: str) -> NoReturn:
    """The stream ended: raise the status etcd ended it with (GRPCError), else ``what``."""
    await stream.recv_trailing_metadata()
    raise StreamTerminatedError(what)


async def _aio_receive(stream: Stream[pb.WatchRequest, pb.WatchResponse]) -> pb.WatchResponse:
    """The next watch response, a cancelled watch raised (Compacted, EtcdError)."""
    response = await stream.recv_message()
    if response is None:
        await _aio_ended(stream, "etcd ended the watch stream")
    _raise_if_canceled(response)
    return response


async def _aio_close_stream(stream: Stream[Any, Any]) -> None:
    """Reset a stream (RST_STREAM, unless it already ended) and release it; never waits on the peer."""
    closing = _StreamClosed()
    with contextlib.suppress(Exception):
        await stream.__aexit__(_StreamClosed, closing, None)


class _StreamClosed(Exception):
    """Handed to grpclib's Stream.__aexit__ so that it resets the stream instead of awaiting trailers."""


def _raise_if_canceled(response: pb.WatchResponse) -> None:
    if response.compact_revision > 0:
        reason = response.cancel_reason or "etcdserver: mvcc: required revision has been compacted"
        raise Compacted(
            response.compact_revision,
            f"{reason} (the watch was cancelled; history starts at revision {response.compact_revision})",
        )
    if response.canceled:
        raise EtcdError(f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}")


# ---- the client -----------------------------------------------------------------------------------


class EtcdClient:
    """A client of one etcd cluster. Create it with ``await EtcdClient.connect(...)`` (then
    :meth:`aclose` it) or ``async with open_etcd_client(...)``, inside ``trio_asyncio.open_loop()``.

    ``endpoints``: client URLs as ``(host, port)``, tried in order; ``tls``: an ``ssl.SSLContext`` for
    ``https`` endpoints (ALPN ``h2`` is set on it); ``user``/``password``: authenticate and send etcd's
    ``token`` metadata (re-authenticating when etcd says the token is invalid or stale); ``request_timeout``:
    deadline of each attempt of a unary call; ``config``: grpclib's channel configuration (HTTP/2
    keepalive pings, windows).
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        tls: ssl.SSLContext | None = None,
        user: str | None = None,
        password: str | None = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        config: Configuration | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        self.endpoints: list[tuple[str, int]] = [(host, int(port)) for host, port in endpoints]
        self.request_timeout = request_timeout
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
        self._tls = tls
        self._config = config
        self._user = user
        self._password = password
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        self._channels: list[Channel | None] = [None] * len(self.endpoints)
        self._watch_channels: set[Channel] = set()
        self._current = 0
        self._closed = False
        #: Called after each unary call with its method, its seconds and "ok" or the error's name.
        self.on_call: Callable[[str, float, str], object] | None = None

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[tuple[str, int]],
        *,
        tls: ssl.SSLContext | None = None,
        user: str | None = None,
        password: str | None = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        config: Configuration | None = None,
    ) -> EtcdClient:
        """A client of ``endpoints``; with ``user``/``password`` it authenticates first (raising if
        etcd refuses). Connections are made when first needed."""
        client = cls(
            endpoints, tls=tls, user=user, password=password, request_timeout=request_timeout, config=config
        )
        if user is not None:
            try:
                await client._authenticate(None)
            except BaseException:
                client.close()
                raise
        return client

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection (open watches then fail with EtcdUnavailable)."""
        self.close()

    def close(self) -> None:
        """Close every connection at once (synchronous; :meth:`aclose` for symmetry)."""
        self._closed = True
        for index, channel in enumerate(self._channels):
            if channel is not None:
                channel.close()
                self._channels[index] = None
        for channel in self._watch_channels:
            channel.close()
        self._watch_channels.clear()

    @property
    def current_endpoint(self) -> tuple[str, int]:
        """The endpoint the next call goes to first."""
        return self.endpoints[self._current]

    # ---- connections ---------------------------------------------------------------------------

    def _new_channel(self, index: int) -> Channel:
        if self._closed:
            raise EtcdError("the etcd client is closed")
        host, port = self.endpoints[index]
        return _Channel(host, port, ssl=self._tls, config=self._config)

    def _channel(self, index: int) -> Channel:
        channel = self._channels[index]
        if channel is None:
            channel = self._channels[index] = self._new_channel(index)
        return channel

    def _failed(self, index: int, *, silent: bool = False) -> None:
        """The endpoint failed a call: the next calls start at the next endpoint. Its connection is
        dropped if it is lost already (grpclib would reconnect a lost one by itself, this just forgets
        it sooner) or went ``silent`` (the call's deadline passed with no answer: a connection that
        stopped answering without closing would otherwise hold every later call until its deadline);
        other calls still running on a live one keep it."""
        channel = self._channels[index]
        if channel is not None and (silent or _connection_lost(channel)):
            channel.close()
            self._channels[index] = None
        if self._current == index:
            self._current = (index + 1) % len(self.endpoints)

    def _where(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"{host}:{port}"

    # ---- authentication ------------------------------------------------------------------------

    async def _metadata(self, *, require_leader: bool) -> tuple[dict[str, str], str | None]:
        metadata = dict(_REQUIRE_LEADER) if require_leader else {}
        token = None
        if self._user is not None:
            if self._token is None:
                await self._authenticate(None)
            token = self._token
            if token:
                metadata["token"] = token
        return metadata, token

    async def _authenticate(self, stale: str | None) -> None:
        """Get a token (unless another task already replaced ``stale`` meanwhile)."""
        async with self._auth_lock:
            if self._token is not None and self._token != stale:
                return
            self._token = None
            request = pb.AuthenticateRequest(name=self._user or "", password=self._password or "")
            reply = await self._call(
                _AUTH + "Authenticate", request, pb.AuthenticateResponse, read_only=True, authenticate=False
            )
            self._token = reply.token

    # ---- calls ---------------------------------------------------------------------------------

    async def _call(
        self, path: str, request: betterproto2.Message, reply_type: type[ReplyT], **options: Any
    ) -> ReplyT:
        """:meth:`_exchange`, reported to ``on_call`` (the method, its seconds, and "ok" or the name of
        the exception it raised; a cancelled call is not reported)."""
        if self.on_call is None:
            return await self._exchange(path, request, reply_type, **options)
        method = path.rsplit("/", 1)[-1]
        started = time.monotonic()
        try:
            reply = await self._exchange(path, request, reply_type, **options)
        except Exception as exc:
            self.on_call(method, time.monotonic() - started, type(exc).__name__)
            raise
        self.on_call(method, time.monotonic() - started, "ok")
        return reply

    async def _exchange(
        self,
        path: str,
        request: betterproto2.Message,
        reply_type: type[ReplyT],
        *,
        read_only: bool,
        require_leader: bool = True,
        authenticate: bool = True,
        cardinality: Cardinality = Cardinality.UNARY_UNARY,
    ) -> ReplyT:
        """One exchange, moving to the next endpoint after a failure that allows it (see the module
        docstring): each endpoint is tried at most once, plus one retry after re-authenticating."""
        failures: list[str] = []
        reauthenticated = False
        attempts = 0
        while attempts < len(self.endpoints):
            index = self._current
            if authenticate:
                metadata, token = await self._metadata(require_leader=require_leader)
            else:
                metadata, token = (dict(_REQUIRE_LEADER) if require_leader else {}), None
            progress = _Progress()
            try:
                reply: ReplyT = await trio_asyncio.aio_as_trio(_aio_exchange)(
                    self._channel(index),
                    path,
                    cardinality,
                    request,
                    reply_type,
                    self.request_timeout,
                    metadata,
                    progress,
                )
            except GRPCError as exc:
                if authenticate and self._user is not None and not reauthenticated and _token_refused(exc):
                    reauthenticated = True
                    await self._authenticate(token)
                    continue
                error = _error(exc, sent=progress.sent, write=not read_only)
                if not isinstance(error, EtcdUnavailable):
                    raise error from None
                attempts += 1
                failures.append(f"{self._where(index)}: {error}")
                self._failed(index, silent=exc.status == Status.DEADLINE_EXCEEDED)
                if error.maybe_applied:
                    raise _uncertain(path, self._where(index), str(error), error.status) from None
            except _TRANSPORT_ERRORS as exc:
                attempts += 1
                failures.append(f"{self._where(index)}: {_describe(exc)}")
                self._failed(index, silent=isinstance(exc, asyncio.TimeoutError))
                if progress.sent and not read_only:
                    raise _uncertain(path, self._where(index), _describe(exc), None) from None
            else:
                return reply
        raise EtcdUnavailable(f"{path}: no etcd endpoint could serve the call ({'; '.join(failures)})")

    # ---- KV --------------------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
    ) -> pb.RangeResponse:
        """The keys in [key, range_end) (only ``key`` when ``range_end`` is empty), at ``revision``
        (0: the newest; a compacted one raises :class:`Compacted`). ``serializable`` reads the member's
        local state (may be stale) and works without a leader. Read-only: safe to cancel."""
        request = pb.RangeRequest(
            key=key,
            range_end=range_end,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            serializable=serializable,
        )
        return await self._call(
            _KV + "Range", request, pb.RangeResponse, read_only=True, require_leader=not serializable
        )

    async def put(self, key: bytes, value: bytes, *, lease: int = 0, prev_kv: bool = False) -> pb.PutResponse:
        """Put one key (attached to ``lease`` unless 0); ``prev_kv`` returns the previous pair.
        Cancelled, it may or may not have been applied."""
        request = pb.PutRequest(key=key, value=value, lease=lease, prev_kv=prev_kv)
        return await self._call(_KV + "Put", request, pb.PutResponse, read_only=False)

    async def delete_range(
        self, key: bytes, range_end: bytes = b"", *, prev_kv: bool = False
    ) -> pb.DeleteRangeResponse:
        """Delete [key, range_end) (only ``key`` when ``range_end`` is empty), in one revision.
        Cancelled, it may or may not have been applied."""
        request = pb.DeleteRangeRequest(key=key, range_end=range_end, prev_kv=prev_kv)
        return await self._call(_KV + "DeleteRange", request, pb.DeleteRangeResponse, read_only=False)

    async def txn(
        self,
        compare: Sequence[pb.Compare],
        success: Sequence[pb.RequestOp],
        failure: Sequence[pb.RequestOp] = (),
    ) -> pb.TxnResponse:
        """If every comparison holds, apply ``success``, else ``failure``: atomically, at one revision.
        ``succeeded`` says which; ``responses`` are the ops' replies in order. More than 128 ops in a list
        raises :class:`EtcdTooManyOps`, over 1.5 MiB :class:`EtcdRequestTooLarge` (etcd's defaults).
        Cancelled, a txn with writes may or may not have been applied."""
        request = pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        read_only = _read_only(request.success) and _read_only(request.failure)
        return await self._call(_KV + "Txn", request, pb.TxnResponse, read_only=read_only)

    async def compact(self, revision: int, *, physical: bool = False) -> pb.CompactionResponse:
        """Drop history before ``revision`` (watches and ranges before it then raise
        :class:`Compacted`); ``physical`` waits until the space is freed. Cancelled, it may or may not
        have been applied."""
        request = pb.CompactionRequest(revision=revision, physical=physical)
        return await self._call(_KV + "Compact", request, pb.CompactionResponse, read_only=False)

    # ---- leases ----------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, lease_id: int = 0) -> pb.LeaseGrantResponse:
        """A new lease of ``ttl`` seconds (etcd may raise it to its minimum); ``lease_id`` 0 lets etcd
        choose the id. Cancelled, the lease may or may not exist (it then expires on its own)."""
        request = pb.LeaseGrantRequest(ttl=ttl, id=lease_id)
        return await self._call(_LEASE + "LeaseGrant", request, pb.LeaseGrantResponse, read_only=False)

    async def lease_revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        """Revoke a lease: every key attached to it is deleted, in one revision. Raises
        :class:`EtcdLeaseNotFound` if it is already gone. Cancelled, it may or may not have been
        applied."""
        request = pb.LeaseRevokeRequest(id=lease_id)
        return await self._call(_LEASE + "LeaseRevoke", request, pb.LeaseRevokeResponse, read_only=False)

    async def lease_keep_alive_once(self, lease_id: int) -> int:
        """Refresh a lease (one request and one reply on a LeaseKeepAlive stream); return its new TTL
        in seconds, 0 when the lease is gone. Idempotent, so safe to retry or cancel."""
        reply = await self._call(
            _LEASE + "LeaseKeepAlive",
            pb.LeaseKeepAliveRequest(id=lease_id),
            pb.LeaseKeepAliveResponse,
            read_only=True,
            cardinality=Cardinality.STREAM_STREAM,
        )
        return max(0, reply.ttl)

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> pb.LeaseTimeToLiveResponse:
        """A lease's remaining TTL (-1: gone), granted TTL and, with ``keys``, its keys. Read-only."""
        request = pb.LeaseTimeToLiveRequest(id=lease_id, keys=keys)
        return await self._call(
            _LEASE + "LeaseTimeToLive", request, pb.LeaseTimeToLiveResponse, read_only=True
        )

    # ---- maintenance -----------------------------------------------------------------------------

    async def status(self) -> pb.StatusResponse:
        """The Status of the member the client talks to (its id in ``header.member_id``, the leader it
        knows in ``leader``); works without a leader. Read-only."""
        return await self._call(
            _MAINTENANCE + "Status",
            pb.StatusRequest(),
            pb.StatusResponse,
            read_only=True,
            require_leader=False,
        )

    # ---- watch -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        start_revision: int,
        prev_kv: bool = True,
        progress_notify: bool = True,
        fragment: bool = False,
    ) -> AsyncIterator[EtcdWatch]:
        """Watch [key, range_end) from ``start_revision`` (inclusive; 0: from now). The block starts
        once etcd created the watch; iterate the :class:`EtcdWatch` for its responses. Leaving the
        block cancels the watch and closes its stream.

        Each watch has its own connection (HTTP/2 flow control then slows only this watch when its
        reader lags, never the client's other calls or watches). Opening moves to the next endpoint
        like a read-only call. ``fragment`` lets etcd split a huge revision over several responses; the
        iterator joins them again.
        """
        create = pb.WatchCreateRequest(
            key=key,
            range_end=range_end,
            start_revision=start_revision,
            progress_notify=progress_notify,
            prev_kv=prev_kv,
            fragment=fragment,
        )
        channel, stream, created = await self._open_watch(create)
        watch = EtcdWatch(stream, created)
        try:
            yield watch
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.request_timeout):
                await watch._close()
            channel.close()
            self._watch_channels.discard(channel)

    async def _open_watch(
        self, create: pb.WatchCreateRequest
    ) -> tuple[Channel, Stream[pb.WatchRequest, pb.WatchResponse], pb.WatchResponse]:
        failures: list[str] = []
        reauthenticated = False
        attempts = 0
        while attempts < len(self.endpoints):
            index = self._current
            metadata, token = await self._metadata(require_leader=True)
            channel = self._new_channel(index)
            self._watch_channels.add(channel)
            try:
                with trio.fail_after(self.request_timeout):
                    stream, created = await trio_asyncio.aio_as_trio(_aio_open_watch)(
                        channel, create, metadata
                    )
            except BaseException as exc:
                channel.close()
                self._watch_channels.discard(channel)
                if self._user is not None and not reauthenticated and _token_refused(exc):
                    reauthenticated = True
                    await self._authenticate(token)
                    continue
                if isinstance(exc, GRPCError):
                    error = _error(exc)
                    if not isinstance(error, EtcdUnavailable):
                        raise error from None
                    failure = str(error)
                elif isinstance(exc, (*_TRANSPORT_ERRORS, trio.TooSlowError)):
                    failure = "deadline exceeded" if isinstance(exc, trio.TooSlowError) else _describe(exc)
                else:
                    raise
                attempts += 1
                failures.append(f"{self._where(index)}: {failure}")
                self._failed(index)
            else:
                return channel, stream, created
        raise EtcdUnavailable(f"Watch: no etcd endpoint could create the watch ({'; '.join(failures)})")


class EtcdWatch:
    """One watch, as :meth:`EtcdClient.watch` yields it: an async iterator of ``WatchResponse``.

    Responses come as etcd batches them (all events of one revision in one response; several
    revisions may share one), fragments joined. A progress notification is a response without events
    (:func:`is_progress_notify`). Iteration raises :class:`Compacted` when etcd cancels the watch because
    its start revision is compacted, :class:`EtcdUnavailable` when the connection is lost or etcd ends
    the stream, :class:`EtcdError` for another cancellation; once raised, it raises that again.

    Cancelling an iteration loses nothing: the read goes on (as an asyncio task) and the next
    iteration returns its response. Iterate from one task at a time; :meth:`request_progress` may be
    called from any task.
    """

    def __init__(self, stream: Stream[pb.WatchRequest, pb.WatchResponse], created: pb.WatchResponse) -> None:
        self._stream = stream
        #: etcd's id of this watch.
        self.watch_id = created.watch_id
        #: The store revision when etcd created the watch (its ``created`` response's header).
        self.created_revision = created.header.revision if created.header is not None else 0
        self._loop: asyncio.AbstractEventLoop = trio_asyncio.current_loop.get()
        self._reading: asyncio.Future[pb.WatchResponse] | None = None
        self._fragments: list[mvccpb.Event] = []
        self._error: EtcdError | None = None
        self._send_lock = trio.Lock()

    def __aiter__(self) -> EtcdWatch:
        return self

    async def __anext__(self) -> pb.WatchResponse:
        while True:
            if self._error is not None:
                raise self._error
            if self._reading is None:
                self._reading = self._loop.create_task(_aio_receive(self._stream))
            try:
                # Shielded: cancelling this wait leaves the read running for the next iteration.
                response: pb.WatchResponse = await trio_asyncio.run_aio_future(asyncio.shield(self._reading))
            except GRPCError as exc:
                self._error = _error(exc)
            except EtcdError as exc:
                self._error = exc
            except _TRANSPORT_ERRORS as exc:
                self._error = EtcdUnavailable(f"watch stream lost: {_describe(exc)}")
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except BaseException as exc:  # anything else grpclib may raise ends the iteration too
                self._error = EtcdError(f"watch stream failed: {_describe(exc)}")
            else:
                self._reading = None
                if response.fragment:
                    self._fragments.extend(response.events)
                    continue
                if self._fragments:
                    response.events = [*self._fragments, *response.events]
                    self._fragments = []
                return response
            self._reading = None

    async def request_progress(self) -> None:
        """Ask etcd for a progress notification: a response without events whose header revision is
        the store revision, sent once the watch has sent everything up to it (etcd 3.5 answers only
        while the watch is caught up). Raises :class:`EtcdUnavailable` if the stream is gone."""
        if self._error is not None:
            raise self._error
        request = pb.WatchRequest(progress_request=pb.WatchProgressRequest())
        async with self._send_lock:
            try:
                await trio_asyncio.aio_as_trio(self._stream.send_message)(request)
            except GRPCError as exc:
                raise _error(exc) from None
            except _TRANSPORT_ERRORS as exc:
                raise EtcdUnavailable(f"watch stream lost: {_describe(exc)}") from None

    async def _close(self) -> None:
        """End the pending read and reset the stream."""
        if self._error is None:
            self._error = EtcdError("the watch is closed")
        reading, self._reading = self._reading, None
        if reading is not None and not reading.done():
            reading.cancel()
            with contextlib.suppress(BaseException):
                await trio_asyncio.run_aio_future(reading)
        await trio_asyncio.aio_as_trio(_aio_close_stream)(self._stream)


@contextlib.asynccontextmanager
async def open_etcd_client(
    endpoints: Sequence[tuple[str, int]],
    *,
    tls: ssl.SSLContext | None = None,
    user: str | None = None,
    password: str | None = None,
    request_timeout: float = DEFAULT_TIMEOUT,
    config: Configuration | None = None,
) -> AsyncIterator[EtcdClient]:
    """``async with open_etcd_client(endpoints) as etcd``: :meth:`EtcdClient.connect`, closed on exit."""
    client = await EtcdClient.connect(
        endpoints, tls=tls, user=user, password=password, request_timeout=request_timeout, config=config
    )
    try:
        yield client
    finally:
        client.close()

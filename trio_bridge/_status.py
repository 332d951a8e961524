"""Status mapping: the one place where an exception becomes the gRPC status a client sees.

==================  =====================
store error         gRPC status
==================  =====================
NotFound            NOT_FOUND
InvalidArgument     INVALID_ARGUMENT
AlreadyExists       ALREADY_EXISTS
VersionConflict     ABORTED
ResourceExhausted   RESOURCE_EXHAUSTED
Unavailable         UNAVAILABLE
Unimplemented       UNIMPLEMENTED
anything else       INTERNAL (logged here with its traceback; the client gets no traceback)
==================  =====================

A request that cannot be decoded at all is INVALID_ARGUMENT too: :class:`RequestCodec` says so before
any handler runs, instead of letting the decoding error pass for an internal fault.

The client side reads statuses back into the same errors (:func:`error_from_status`), so a caller of
:mod:`trio_bridge.client` catches ``NotFound`` whether the store is local or remote.

The web view answers the same refusals over HTTP with the status :func:`http_status_of` gives (NOT_FOUND
as 404, ABORTED as 409, ...), and the gRPC status's name and the message in its JSON.

Exception groups (what a Trio nursery raises) are unwrapped to the first error that has a status, so a
status raised inside a nursery still reaches the client as itself rather than as UNKNOWN.
"""

from __future__ import annotations

import logging
import weakref
from http import HTTPStatus
from typing import Any

import betterproto2
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from ._errors import (
    AlreadyExists,
    BridgeError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    VersionConflict,
)
from ._wire import parse, serialize

log = logging.getLogger("trio_bridge")

INTERNAL_MESSAGE = "internal error; the server logged the details"
#: A watch stream's first header: the store's ``state_id``, so a client can tell a session that expired
#: from one a restarted in-memory server lost.
STATE_ID_HEADER = "trio-bridge-state-id"

_STATUS_OF: dict[type[BridgeError], Status] = {
    NotFound: Status.NOT_FOUND,
    InvalidArgument: Status.INVALID_ARGUMENT,
    AlreadyExists: Status.ALREADY_EXISTS,
    VersionConflict: Status.ABORTED,
    ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    Unavailable: Status.UNAVAILABLE,
    Unauthenticated: Status.UNAUTHENTICATED,
    Unimplemented: Status.UNIMPLEMENTED,
}


_HTTP_STATUS_OF = {
    Status.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    Status.NOT_FOUND: HTTPStatus.NOT_FOUND,
    Status.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    Status.ABORTED: HTTPStatus.CONFLICT,
    Status.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    Status.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    Status.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    Status.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}


def http_status_of(status: Status) -> HTTPStatus:
    """The HTTP status the web view answers a refusal of gRPC status ``status`` with."""
    return _HTTP_STATUS_OF.get(status, HTTPStatus.INTERNAL_SERVER_ERROR)


def status_of(error: BridgeError) -> Status:
    for cls in type(error).__mro__:
        status = _STATUS_OF.get(cls)
        if status is not None:
            return status
    return Status.INTERNAL


def _first_with_status(exc: BaseException) -> GRPCError | BridgeError | None:
    if isinstance(exc, GRPCError | BridgeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_with_status(inner)
            if found is not None:
                return found
    return None


def grpc_error_for(exc: Exception, *, method: str) -> tuple[GRPCError, dict[str, str]]:
    """The GRPCError to answer ``exc`` with, and the trailing metadata to send with it (the store
    error's ``trailers``). Unexpected faults are logged here with their traceback."""
    found = _first_with_status(exc)
    if isinstance(found, GRPCError):
        return found, {}
    if isinstance(found, BridgeError):
        return GRPCError(status_of(found), found.message), found.trailers
    log.error("unexpected fault in %s", method, exc_info=exc)
    return GRPCError(Status.INTERNAL, INTERNAL_MESSAGE), {}


def stream_was_cut(exc: Exception) -> bool:
    """Whether the error that ends a call says its stream was cut inside a message, so that it must be
    reset rather than ended with a status (``BridgeError.stream_cut``)."""
    found = _first_with_status(exc)
    return isinstance(found, BridgeError) and found.stream_cut


class RequestCodec(ProtoCodec):
    """grpclib's protobuf codec, answering an undecodable message with INVALID_ARGUMENT. betterproto2
    messages are read by :func:`._wire.parse`, which makes :func:`._wire.check_wire`'s checks as it
    reads (so none is half-read) and makes the message betterproto2's parser makes, with less CPU.

    It also serializes each outgoing message object once: an update fanned out to many watch streams
    is the same object on each, so its bytes are reused (kept as long as the message lives); and it
    serializes betterproto2 messages with :func:`._wire.serialize` (same bytes, less CPU).
    """

    def __init__(self) -> None:
        # id(message) → (weak reference to it, its bytes); an entry goes when its message is collected.
        # (betterproto2 messages are unhashable, so a WeakKeyDictionary cannot hold them.)
        self._encoded: dict[int, tuple[weakref.ref[Any], bytes]] = {}

    def encode(self, message: Any, message_type: Any) -> bytes:
        key = id(message)
        entry = self._encoded.get(key)
        if entry is not None and entry[0]() is message:
            return entry[1]
        if isinstance(message, betterproto2.Message) and isinstance(message, message_type):
            data = serialize(message)
        else:
            data = super().encode(message, message_type)  # checks the type; protobuf's own messages
        try:
            ref = weakref.ref(message, lambda _, key=key: self._encoded.pop(key, None))  # type: ignore[misc]
        except TypeError:  # not weak-referenceable: just not cached
            return data
        self._encoded[key] = (ref, data)
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
                return parse(message_type, data)  # the checks of check_wire, then betterproto2's reading
            return super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"malformed {message_type.__name__} message: {exc}"
            ) from None


class RemoteError(BridgeError):
    """A status with no more specific error class (INTERNAL, PERMISSION_DENIED, ...)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status


def error_from_status(status: Status, message: str | None, trailers: dict[str, str]) -> BridgeError:
    """The client side of the mapping above: the error a status and its trailing metadata stand for."""
    text = message or status.name
    if status is Status.ABORTED and "trio-bridge-current-version" in trailers:
        try:
            return VersionConflict(
                trailers.get("trio-bridge-variable", ""),
                int(trailers["trio-bridge-expected-version"]),
                int(trailers["trio-bridge-current-version"]),
            )
        except (KeyError, ValueError):
            pass
    if status is Status.RESOURCE_EXHAUSTED:
        return ResourceExhausted(text, trailers)
    for cls, mapped in _STATUS_OF.items():
        if mapped is status and cls not in (VersionConflict, ResourceExhausted):
            return cls(text)
    return RemoteError(status, text)

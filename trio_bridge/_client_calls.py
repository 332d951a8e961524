"""What the client's calls share: grpclib's channel as the client uses it, what a stream's state
says, and the errors its statuses stand for."""

from __future__ import annotations

import asyncio
from typing import Any

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol

from ._errors import BridgeError, Unavailable
from ._status import error_from_status

SERVICE = "/unified_bridge.UnifiedBridge/"


class StreamOver(Exception):
    """Leaves a grpclib stream's block without waiting for its trailers (they came, or never will)."""


def accepted(stream: Any) -> bool:
    """Whether the server accepted a stream (sent its headers), rather than answered a status alone."""
    headers = stream._stream.headers
    return headers is not None and "grpc-status" not in dict(headers)


def ended_by_server(stream: Any) -> bool:
    """Whether the server sent a stream's status (in its trailers, or alone)."""
    inner = stream._stream
    return inner.trailers is not None or (inner.headers is not None and not accepted(stream))


def retrieve(task: asyncio.Task[Any]) -> None:
    """A done callback that retrieves a task's exception (it is read elsewhere, or does not matter)."""
    if not task.cancelled():
        task.exception()


class ClientChannel(Channel):
    """grpclib's Channel, except that a connection lost while it was being made (a peer that resets it
    at once) raises ConnectionResetError. grpclib returns such a connection, and the call made on it
    then fails inside grpclib with an AttributeError; the next call opens a new connection.

    ``answered``: whether the server at the other end ever answered a call (then a lost connection is
    just lost; before, it may not be a trio-bridge server at all: see ``_reach``)."""

    answered = False

    async def __connect__(self) -> H2Protocol:
        protocol = await super().__connect__()
        if connection_lost(self):
            raise ConnectionResetError("reset as soon as it was made")
        return protocol


def not_connected(exc: BaseException) -> bool:
    """Whether a call failed making its connection, so nothing of it was sent."""
    return isinstance(exc, (ConnectionRefusedError, ConnectionResetError)) or (
        isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.errno is not None
    )


def ended_ok(stream: Any) -> bool:
    trailers = dict(stream._stream.trailers or stream._stream.headers or [])
    return bool(trailers.get("grpc-status") == "0")


def connection_lost(channel: Channel) -> bool:
    protocol = channel._protocol
    return protocol is not None and bool(getattr(protocol.handler, "connection_lost", False))


def grpc_error(exc: GRPCError, trailing: Any, address: tuple[str, int]) -> BridgeError:
    """The error a status stands for; an UNAVAILABLE names the server that sent it."""
    trailers = {str(k): str(v) for k, v in (trailing or {}).items()}
    return status_error(exc.status, exc.message, trailers, address)


def status_error(
    status: Status, message: str | None, trailers: dict[str, str], address: tuple[str, int]
) -> BridgeError:
    error = error_from_status(status, message, trailers)
    if isinstance(error, Unavailable):
        return Unavailable(f"{address[0]}:{address[1]}: {error}", error.details, address=address)
    return error

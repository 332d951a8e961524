"""trio_bridge: a gRPC server of session-scoped, typed variables that clients watch in real time.

The server side (``serve``, ``RunningServer``) is imported on first use: it brings in
trio-asyncio, which changes asyncio's event loop policy for the whole process, and a program that only
uses :mod:`trio_bridge.client` should not pay for that.
"""

from typing import TYPE_CHECKING, Any

from ._config import ServerConfig
from ._errors import (
    AlreadyExists,
    BridgeError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)
from ._limits import Limits
from ._observers import ObserverManager, Subscription
from ._types import Constraints, Tensor, VariableType
from ._version import __version__
from .storage import (
    EventKind,
    MemoryStore,
    SessionCache,
    SessionInfo,
    Store,
    VariableEvent,
    VariableSnapshot,
    VariableWrite,
)

if TYPE_CHECKING:
    from ._server import RunningServer, serve

_SERVER_NAMES = ("RunningServer", "serve")


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from . import _server

        return getattr(_server, name)
    raise AttributeError(f"module 'trio_bridge' has no attribute {name!r}")


__all__ = [
    "AlreadyExists",
    "BridgeError",
    "Constraints",
    "EventKind",
    "InvalidArgument",
    "Limits",
    "MemoryStore",
    "NotFound",
    "ObserverManager",
    "ResourceExhausted",
    "RunningServer",
    "ServerConfig",
    "SessionCache",
    "SessionInfo",
    "Store",
    "Subscription",
    "Tensor",
    "Unauthenticated",
    "Unavailable",
    "VariableEvent",
    "VariableSnapshot",
    "VariableType",
    "VariableWrite",
    "VersionConflict",
    "__version__",
    "serve",
]

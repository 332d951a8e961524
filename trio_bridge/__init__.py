"""trio_bridge: a gRPC server of session-scoped, typed variables that clients watch in real time."""

from ._errors import AlreadyExists, BridgeError, InvalidArgument, NotFound, VersionConflict
from ._observers import ObserverManager, Subscription
from ._server import RunningServer, ServerConfig, serve
from ._store import (
    EventKind,
    SessionInfo,
    SessionStore,
    VariableEvent,
    VariableSnapshot,
    VariableWrite,
)
from ._types import Constraints, Tensor, VariableType
from ._version import __version__

__all__ = [
    "AlreadyExists",
    "BridgeError",
    "Constraints",
    "EventKind",
    "InvalidArgument",
    "NotFound",
    "ObserverManager",
    "RunningServer",
    "ServerConfig",
    "SessionInfo",
    "SessionStore",
    "Subscription",
    "Tensor",
    "VariableEvent",
    "VariableSnapshot",
    "VariableType",
    "VariableWrite",
    "VersionConflict",
    "__version__",
    "serve",
]

"""Where sessions and variables are kept: the store interface (``interface``), the cache every store
keeps and watches are served from (``cache``), the checks every store makes (``checks``), and the
stores: ``memory`` (the default) and ``etcd`` (several servers, durable state; imported on use)."""

from .cache import SessionCache
from .interface import Store
from .memory import MemoryStore
from .records import (
    DEFAULT_SESSION_TTL,
    MAX_SESSION_TTL,
    EncodedValue,
    EventKind,
    SessionInfo,
    VariableEvent,
    VariableSnapshot,
    VariableWrite,
    session_key,
    session_not_found,
    variable_key,
)

__all__ = [
    "DEFAULT_SESSION_TTL",
    "MAX_SESSION_TTL",
    "EncodedValue",
    "EventKind",
    "MemoryStore",
    "SessionCache",
    "SessionInfo",
    "Store",
    "VariableEvent",
    "VariableSnapshot",
    "VariableWrite",
    "session_key",
    "session_not_found",
    "variable_key",
]

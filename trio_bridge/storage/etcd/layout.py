"""How sessions and variables are laid out in etcd: keys, and the records stored under them.

Under a prefix ``P`` (``/trio-bridge`` unless the store URL names another), every key of a session
starts with ``P/s/{session_id}/`` and is attached to the session's lease, so expiry or cleanup removes
them all in one revision:

============================  ==========================================================================
``P/s/{sid}/meta``            the session: JSON ``{"created_at", "ttl", "metadata", "owner"}``
``P/s/{sid}/v/{variable_id}`` a variable: a serialized ``VariableUpdate`` (the variable with its value,
                              and the change that made this version: source, update metadata, time).
                              Its etcd ``version`` is the variable's version.
``P/s/{sid}/n/{name}``        the id of the variable called ``name`` (keeps names unique)
``P/s/{sid}/end``             written by CleanupSession just before the lease is revoked: the session
                              ended by cleanup, not by expiry
============================  ==========================================================================

Session ids and variable names cannot contain ``/`` (see ``records``), so keys never collide.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass

from ... import _encoding as enc
from ..._wire import serialize
from ...proto import unified_bridge as pb
from ..location import DEFAULT_ETCD_PREFIX
from ..records import VariableSnapshot


class KeyKind(enum.Enum):
    META = "meta"
    VARIABLE = "v"
    NAME = "n"
    END = "end"


@dataclass(frozen=True)
class ParsedKey:
    session_id: str
    kind: KeyKind
    name: str = ""  # a variable id (VARIABLE) or name (NAME)


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range or watch cover every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Keys:
    """The keys of one deployment (one prefix)."""

    def __init__(self, prefix: str = DEFAULT_ETCD_PREFIX) -> None:
        self.prefix = prefix.rstrip("/")
        self.root = f"{self.prefix}/s/".encode()
        self.root_end = prefix_end(self.root)

    def meta(self, session_id: str) -> bytes:
        return self.root + f"{session_id}/meta".encode()

    def end(self, session_id: str) -> bytes:
        return self.root + f"{session_id}/end".encode()

    def variable(self, session_id: str, variable_id: str) -> bytes:
        return self.root + f"{session_id}/v/{variable_id}".encode()

    def name(self, session_id: str, name: str) -> bytes:
        return self.root + f"{session_id}/n/{name}".encode()

    def parse(self, key: bytes) -> ParsedKey | None:
        """What a key under the root is; None for a key this version does not know (ignored)."""
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root) :].decode(errors="replace").split("/")
        if len(parts) == 2 and parts[1] in ("meta", "end"):
            return ParsedKey(parts[0], KeyKind(parts[1]))
        if len(parts) == 3 and parts[1] in ("v", "n"):
            return ParsedKey(parts[0], KeyKind(parts[1]), parts[2])
        return None


@dataclass(frozen=True)
class SessionRecord:
    created_at: float
    ttl: float
    metadata: Mapping[str, str]
    owner: str

    def encode(self) -> bytes:
        return json.dumps(
            {
                "created_at": self.created_at,
                "ttl": self.ttl,
                "metadata": dict(self.metadata),
                "owner": self.owner,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> SessionRecord:
        fields = json.loads(data)
        return cls(
            created_at=float(fields["created_at"]),
            ttl=float(fields["ttl"]),
            metadata={str(k): str(v) for k, v in fields.get("metadata", {}).items()},
            owner=str(fields.get("owner", "")),
        )


@dataclass(frozen=True)
class VariableRecord:
    """A variable's version as stored, with the change that made it."""

    snapshot: VariableSnapshot
    source: str
    metadata: Mapping[str, str]
    timestamp: float

    def encode(self) -> bytes:
        return serialize(
            pb.VariableUpdate(
                variable_id=self.snapshot.id,
                variable=enc.variable_to_proto(self.snapshot),
                update_source=self.source,
                update_metadata=dict(self.metadata),
                timestamp=enc.timestamp(self.timestamp),
            )
        )

    @classmethod
    def decode(cls, data: bytes, *, version: int) -> VariableRecord:
        """The record stored as ``data``, at etcd ``version`` (the variable's version)."""
        update = pb.VariableUpdate.parse(data)
        assert update.variable is not None
        message = update.variable
        message.version = version
        return cls(
            snapshot=enc.variable_from_proto(message),
            source=update.update_source,
            metadata=dict(update.update_metadata),
            timestamp=enc.seconds(update.timestamp),
        )

"""Value encoding: native Python values and store records to and from the wire messages.

Values travel as a real ``google.protobuf.Any`` that any protobuf library unpacks with no custom code:

=========  =============================================
type       packed message
=========  =============================================
float      ``google.protobuf.DoubleValue``
integer    ``google.protobuf.Int64Value``
string     ``google.protobuf.StringValue``
boolean    ``google.protobuf.BoolValue``
choice     ``google.protobuf.StringValue``
module     ``google.protobuf.StringValue``
embedding  ``unified_bridge.Embedding`` (float32 values)
tensor     ``unified_bridge.Tensor`` (shape, dtype, packed little-endian bytes)
=========  =============================================

Decoding checks the Any's type against the variable's type and raises ``InvalidArgument`` naming both.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

import betterproto2

from ._errors import InvalidArgument
from ._types import Constraints, Tensor, VariableType
from ._wire import parse, parse_value, serialize, serialize_value
from .proto import unified_bridge as pb
from .proto.google import protobuf as wkt
from .storage.records import EventKind, SessionInfo, VariableEvent, VariableSnapshot

TYPE_URL_PREFIX = "type.googleapis.com/"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

_WIRE_MESSAGE: dict[VariableType, type[betterproto2.Message]] = {
    VariableType.FLOAT: wkt.DoubleValue,
    VariableType.INTEGER: wkt.Int64Value,
    VariableType.STRING: wkt.StringValue,
    VariableType.BOOLEAN: wkt.BoolValue,
    VariableType.CHOICE: wkt.StringValue,
    VariableType.MODULE: wkt.StringValue,
    VariableType.EMBEDDING: pb.Embedding,
    VariableType.TENSOR: pb.Tensor,
}

_FULL_NAME: dict[type[betterproto2.Message], str] = {
    wkt.DoubleValue: "google.protobuf.DoubleValue",
    wkt.Int64Value: "google.protobuf.Int64Value",
    wkt.StringValue: "google.protobuf.StringValue",
    wkt.BoolValue: "google.protobuf.BoolValue",
    pb.Embedding: "unified_bridge.Embedding",
    pb.Tensor: "unified_bridge.Tensor",
}


_TYPE_URL: dict[VariableType, str] = {
    vtype: TYPE_URL_PREFIX + _FULL_NAME[message] for vtype, message in _WIRE_MESSAGE.items()
}
#: The variable types packed in a one-field wrapper message (``google.protobuf.DoubleValue``, ...).
_WRAPPED = {vtype for vtype, message in _WIRE_MESSAGE.items() if message.__module__ == wkt.__name__}


def type_url_for(vtype: VariableType) -> str:
    """The type URL a value of ``vtype`` is packed with."""
    return _TYPE_URL[vtype]


def pack_value(vtype: VariableType, value: Any) -> wkt.Any:
    """Pack a native value (already checked against its type) into an Any."""
    if vtype in _WRAPPED:
        payload = serialize_value(_WIRE_MESSAGE[vtype], value)  # (no wrapper message made)
    elif vtype is VariableType.EMBEDDING:
        payload = serialize(pb.Embedding(values=list(value)))
    else:
        payload = serialize(pb.Tensor(shape=list(value.shape), dtype=value.dtype, data=value.data))
    return wkt.Any(type_url=_TYPE_URL[vtype], value=payload)


def unpack_value(name: str, vtype: VariableType, packed: wkt.Any | None) -> Any:
    """Unpack an Any sent for variable ``name`` of type ``vtype`` into its native value.

    The value still has to pass :func:`~trio_bridge._types.check_value`; this only decodes.
    """
    if packed is None or not packed.type_url:
        raise InvalidArgument(f"{_where(name, vtype)}: a value is required (a google.protobuf.Any)")
    expected = _TYPE_URL[vtype]
    type_url = packed.type_url
    if type_url != expected and type_url.rsplit("/", 1)[-1] != expected.rsplit("/", 1)[-1]:  # any prefix
        raise InvalidArgument(f"{_where(name, vtype)}: expects an Any of {expected!r}, got {type_url!r}")
    message_type = _WIRE_MESSAGE[vtype]
    try:  # (checked as it is read: see _wire.check_wire)
        if vtype in _WRAPPED:
            return parse_value(message_type, packed.value)
        message = parse(message_type, packed.value)
    except Exception as exc:
        got_name = type_url.rsplit("/", 1)[-1]
        raise InvalidArgument(
            f"{_where(name, vtype)}: the Any's payload is not a valid {got_name}: {exc}"
        ) from None
    if isinstance(message, pb.Embedding):
        return tuple(message.values)
    assert isinstance(message, pb.Tensor)
    return Tensor(shape=tuple(message.shape), dtype=message.dtype, data=bytes(message.data))


def _where(name: str, vtype: VariableType) -> str:
    return f"variable {name!r} ({vtype.label})"


def constraints_from_proto(message: pb.Constraints | None) -> Constraints:
    if message is None:
        return Constraints()
    return Constraints(
        minimum=message.minimum,
        maximum=message.maximum,
        min_length=message.min_length,
        max_length=message.max_length,
        pattern=message.pattern,
        allowed_values=tuple(message.allowed_values),
        dimension=message.dimension,
        shape=tuple(message.shape),
        dtype=message.dtype,
    )


def constraints_to_proto(constraints: Constraints) -> pb.Constraints:
    return pb.Constraints(
        minimum=constraints.minimum,
        maximum=constraints.maximum,
        min_length=constraints.min_length,
        max_length=constraints.max_length,
        pattern=constraints.pattern,
        allowed_values=list(constraints.allowed_values),
        dimension=constraints.dimension,
        shape=list(constraints.shape),
        dtype=constraints.dtype,
    )


def variable_type_from_proto(name: str, value: pb.VariableType | int) -> VariableType:
    try:
        return VariableType(int(value))
    except ValueError:
        known = ", ".join(f"{t.name} ({t.value})" for t in VariableType)
        raise InvalidArgument(f"variable {name!r}: type {int(value)} is not one of {known}") from None


#: The datetimes of recent times, by their seconds: the same few come back over and over (a variable's
#: creation time in every message about it, one write time for every variable of a batch and every
#: update about them), and the same object then finds its encoding in ``_wire``'s cache at once.
#: Bounded: emptied when full.
_moments: dict[float, datetime.datetime] = {}
MOMENTS_KEPT = 2048


def timestamp(seconds: float) -> datetime.datetime:
    """A wall-clock time (seconds since the epoch) as betterproto2 carries a Timestamp field."""
    moment = _moments.get(seconds)
    if moment is None:
        if not math.isfinite(seconds):
            return _EPOCH  # (a NaN would never be found again: not kept)
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        if len(_moments) >= MOMENTS_KEPT:
            _moments.clear()
        _moments[seconds] = moment
    return moment


_PROTO_TYPE = {vtype: pb.VariableType(int(vtype)) for vtype in VariableType}


def variable_to_proto(snapshot: VariableSnapshot) -> pb.Variable:
    return pb.Variable(
        id=snapshot.id,
        name=snapshot.name,
        type=_PROTO_TYPE[snapshot.type],
        value=pack_value(snapshot.type, snapshot.value),
        # No rules: no message (smaller, and cheaper to serialize on every update).
        constraints=constraints_to_proto(snapshot.constraints)
        if snapshot.constraints.fields_in_use()
        else None,
        metadata=dict(snapshot.metadata),
        version=snapshot.version,
        created_at=timestamp(snapshot.created_at),
        last_updated_at=timestamp(snapshot.last_updated_at),
        session_id=snapshot.session_id,
        last_update_source=snapshot.last_update_source,
    )


def seconds(moment: datetime.datetime | None) -> float:
    """Seconds since the epoch of a Timestamp field (0.0 when unset)."""
    return moment.timestamp() if moment is not None else 0.0


def variable_from_proto(message: pb.Variable) -> VariableSnapshot:
    """A Variable from the wire, with its value decoded to the native type."""
    vtype = variable_type_from_proto(message.name, message.type)
    return VariableSnapshot(
        id=message.id,
        session_id=message.session_id,
        name=message.name,
        type=vtype,
        value=unpack_value(message.name, vtype, message.value),
        constraints=constraints_from_proto(message.constraints),
        metadata=dict(message.metadata),
        version=message.version,
        created_at=seconds(message.created_at),
        last_updated_at=seconds(message.last_updated_at),
        last_update_source=message.last_update_source,
    )


def session_from_proto(message: pb.Session) -> SessionInfo:
    return SessionInfo(
        session_id=message.session_id,
        created_at=seconds(message.created_at),
        last_accessed_at=seconds(message.last_accessed_at),
        ttl_seconds=message.ttl_seconds,
        expires_at=seconds(message.expires_at),
        metadata=dict(message.metadata),
        variable_count=message.variable_count,
    )


def session_to_proto(info: SessionInfo) -> pb.Session:
    return pb.Session(
        session_id=info.session_id,
        created_at=timestamp(info.created_at),
        last_accessed_at=timestamp(info.last_accessed_at),
        ttl_seconds=info.ttl_seconds,
        expires_at=timestamp(info.expires_at),
        metadata=dict(info.metadata),
        variable_count=info.variable_count,
    )


# The update_type values of a watch stream's VariableUpdate messages.
INITIAL_VALUE = "initial_value"
SYNCED = "synced"
VALUE_CHANGE = "value_change"
VARIABLE_REGISTERED = "variable_registered"
VARIABLE_DELETED = "variable_deleted"
RESYNC = "resync"
HEARTBEAT = "heartbeat"

_UPDATE_TYPE_OF_EVENT = {
    EventKind.CHANGED: VALUE_CHANGE,
    EventKind.RESYNCED: RESYNC,
    EventKind.REGISTERED: VARIABLE_REGISTERED,
    EventKind.DELETED: VARIABLE_DELETED,
}


def snapshot_update(
    snapshot: VariableSnapshot,
    update_type: str,
    *,
    source: str,
    when: float,
    metadata: Mapping[str, str] | None = None,
    revision: int = 0,
) -> pb.VariableUpdate:
    """An update carrying a variable's current state (initial value, resync) as of ``revision``."""
    return pb.VariableUpdate(
        revision=revision,
        variable_id=snapshot.id,
        variable=variable_to_proto(snapshot),
        update_source=source,
        update_metadata=dict(metadata or {}),
        timestamp=timestamp(when),
        update_type=update_type,
    )


def event_update(event: VariableEvent) -> pb.VariableUpdate:
    """The update for a store event about one variable (a change, a registration, a deletion)."""
    snapshot = event.variable
    assert snapshot is not None, "session events have no variable update"
    metadata = dict(event.metadata)
    if event.replaces:
        metadata["coalesced_versions"] = str(event.replaces + 1)
    return pb.VariableUpdate(
        variable_id=snapshot.id,
        variable=variable_to_proto(snapshot),
        old_value=None if event.kind is EventKind.REGISTERED else pack_value(snapshot.type, event.old_value),
        update_source=event.source,
        update_metadata=metadata,
        timestamp=timestamp(event.timestamp),
        update_type=_UPDATE_TYPE_OF_EVENT[event.kind],
        revision=event.revision,
    )


def marker_update(update_type: str, when: float, revision: int = 0) -> pb.VariableUpdate:
    """A message about the stream itself ("synced", "heartbeat"), at ``revision``: no variable."""
    return pb.VariableUpdate(timestamp=timestamp(when), update_type=update_type, revision=revision)


def gone_update(identifier: str, when: float, revision: int = 0) -> pb.VariableUpdate:
    """On resume: a variable the client held is gone (its last state is no longer known)."""
    return pb.VariableUpdate(
        variable_id=identifier, timestamp=timestamp(when), update_type=VARIABLE_DELETED, revision=revision
    )

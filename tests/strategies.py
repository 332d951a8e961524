"""Hypothesis strategies for the generated messages: any subset of fields, random values of the
right wire types (huge and odd ones included), nested messages a few levels deep."""

from __future__ import annotations

import datetime
import enum
import inspect
import math
import types
import typing
from typing import Any

import betterproto2
from hypothesis import strategies as st

from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google import protobuf as wkt

MESSAGE_TYPES = sorted(
    {
        cls
        for module in (pb, wkt)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, betterproto2.Message) and cls is not betterproto2.Message
    },
    key=lambda cls: cls.__qualname__,
)

_FLOAT32_MAX = 3.4028234663852886e38
_INTS = {
    "int32": (-(2**31), 2**31 - 1),
    "sint32": (-(2**31), 2**31 - 1),
    "sfixed32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "sint64": (-(2**63), 2**63 - 1),
    "sfixed64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "fixed32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "fixed64": (0, 2**64 - 1),
}


def _scalar(proto_type: str, hint: Any) -> st.SearchStrategy[Any]:
    if proto_type in _INTS:
        low, high = _INTS[proto_type]
        return st.integers(low, high) | st.sampled_from([0, low, high])
    if proto_type == "string":
        return st.text(max_size=20)
    if proto_type == "bytes":
        return st.binary(max_size=20)
    if proto_type == "bool":
        return st.booleans()
    if proto_type == "double":
        return st.floats()
    if proto_type == "float":
        # (hypothesis can round a 32-bit float just past the largest one struct.pack("f") takes)
        return st.floats(width=32).filter(lambda f: not math.isfinite(f) or abs(f) <= _FLOAT32_MAX)
    if proto_type == "enum":
        assert isinstance(hint, type) and issubclass(hint, enum.Enum)
        return st.sampled_from(list(hint))
    raise AssertionError(proto_type)


def _wrapped(hint: Any, wrapper: type[betterproto2.Message]) -> st.SearchStrategy[Any]:
    """Values of a message type that betterproto2 shows as a Python value (Timestamp, wrappers)."""
    if hint is datetime.datetime:
        return st.datetimes(timezones=st.just(datetime.UTC))
    if hint is datetime.timedelta:
        return st.timedeltas()
    info: Any = wrapper._betterproto  # type: ignore[arg-type]
    return _scalar(info.meta_by_field_name["value"].proto_type, hint)


def _without_none(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner
    return hint


def messages(cls: type[betterproto2.Message], depth: int = 2) -> st.SearchStrategy[Any]:
    """Instances of ``cls`` with random values in any subset of its fields (nested up to ``depth``)."""
    info: Any = cls._betterproto  # type: ignore[arg-type]
    hints = cls._type_hints()
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, meta in info.meta_by_field_name.items():
        hint = _without_none(hints[name])

        def single(proto_type: str, hint: Any, unwrap: Any) -> st.SearchStrategy[Any] | None:
            if proto_type != "message":
                return _scalar(proto_type, hint)
            if depth == 0:
                return None
            if unwrap is not None:
                return _wrapped(hint, unwrap())
            return messages(hint, depth - 1)

        if meta.map_meta:
            key_hint, value_hint = typing.get_args(hint)
            keys = _scalar(meta.map_meta[0].proto_type, key_hint)
            value_meta = meta.map_meta[1]
            values = single(value_meta.proto_type, _without_none(value_hint), value_meta.unwrap)
            if values is not None:
                fields[name] = st.dictionaries(keys, values, max_size=3)
        elif meta.repeated:
            items = single(meta.proto_type, typing.get_args(hint)[0], meta.unwrap)
            if items is not None:
                fields[name] = st.lists(items, max_size=3)
        else:
            strategy = single(meta.proto_type, hint, meta.unwrap)
            if strategy is not None:
                fields[name] = strategy
    return st.fixed_dictionaries({}, optional=fields).map(lambda kwargs: cls(**kwargs))

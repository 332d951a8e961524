"""Protobuf wire format for betterproto2 messages: writing what goes out, reading and checking what
comes in.

:func:`serialize` writes the same bytes as ``bytes(message)``, several times faster. On every call,
for every field, betterproto2 builds the field's default value under ``warnings.catch_warnings()`` to
decide whether to skip it, and goes through two generic helpers per value (per item of a repeated
field, per entry of a map); a Timestamp field becomes a ``Timestamp`` message
(``Timestamp.from_datetime``) before it is written. Here each message class gets a writer of its own,
compiled the first time the class is written (as ``dataclasses`` compiles ``__init__``): one block of
straight-line code per field, in field order, that writes strings, bytes, varints, zig-zag and
fixed-width numbers, nested and repeated messages, packed numbers, maps and Timestamps itself (a
Timestamp straight from its ``datetime``, and the encodings of recent times are kept). The tests compare
the output with betterproto2's for every generated message type, and check that no field falls back to
betterproto2's code.

:func:`parse` reads bytes into the message betterproto2's ``cls.parse`` makes, after the checks
:func:`check_wire` makes: its errors are exactly those of ``check_wire`` and then ``cls.parse``, since
whenever a reader meets something it does not take, those two read the bytes again and say what is
wrong. Each message class gets a compiled reader too: one pass, each tag dispatched to its field's
code, the message made with all its attributes at once (betterproto2 builds every default, then sets
what it read), Timestamp fields read straight into their ``datetime``. The tests compare it with
betterproto2's parser on valid, merged, unknown-field and damaged encodings of every generated type.

:func:`check_wire` walks received bytes against a message type's schema: betterproto2 is lenient, and
would put the integer of a varint sent for a string field into a ``str`` attribute, or read a
truncated field as empty.
"""

from __future__ import annotations

import datetime
import keyword
import re
import struct
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import betterproto2
from betterproto2 import (
    FIXED_TYPES,
    PACKED_TYPES,
    TYPE_BOOL,
    TYPE_BYTES,
    TYPE_DOUBLE,
    TYPE_ENUM,
    TYPE_FIXED32,
    TYPE_FIXED64,
    TYPE_FLOAT,
    TYPE_INT32,
    TYPE_INT64,
    TYPE_MESSAGE,
    TYPE_SFIXED32,
    TYPE_SFIXED64,
    TYPE_SINT32,
    TYPE_SINT64,
    TYPE_STRING,
    TYPE_UINT32,
    TYPE_UINT64,
    WIRE_FIXED_32_TYPES,
    WIRE_FIXED_64_TYPES,
    WIRE_LEN_DELIM_TYPES,
    WIRE_VARINT_TYPES,
)

from .proto.google.protobuf import Timestamp

M = TypeVar("M", bound=betterproto2.Message)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_UTC = datetime.UTC

_STRUCT_OF: dict[str, struct.Struct] = {
    TYPE_DOUBLE: struct.Struct("<d"),
    TYPE_FLOAT: struct.Struct("<f"),
    TYPE_FIXED32: struct.Struct("<I"),
    TYPE_FIXED64: struct.Struct("<Q"),
    TYPE_SFIXED32: struct.Struct("<i"),
    TYPE_SFIXED64: struct.Struct("<q"),
}


def _wire_type(proto_type: str) -> int:
    if proto_type in WIRE_VARINT_TYPES:
        return 0
    if proto_type in WIRE_FIXED_64_TYPES:
        return 1
    if proto_type in WIRE_FIXED_32_TYPES:
        return 5
    assert proto_type in WIRE_LEN_DELIM_TYPES, proto_type
    return 2


def _key(number: int, wire_type: int) -> bytes:
    out = bytearray()
    _varint((number << 3) | wire_type, out)
    return bytes(out)


def _field_class(info: Any, name: str, meta: Any) -> type[betterproto2.Message]:
    """The message class a message-typed field holds (the wrapper class for a wrapped field)."""
    cls = meta.unwrap() if meta.unwrap is not None else info.cls_by_field[name]
    if not (isinstance(cls, type) and issubclass(cls, betterproto2.Message)):
        raise TypeError(f"field {name} holds {cls!r}, not a betterproto2 message")
    return cls


# ---- writing -----------------------------------------------------------------------------------------

# How a field is written (module constants: ``_write_single`` compares them for every value it writes).
_STRING = 0
_BYTES = 1
_VARINT = 2  # int32, int64, uint32, uint64, bool, enum
_MESSAGE = 3
_TIMESTAMP = 4  # a Timestamp field, which betterproto2 shows as a datetime
_WRAPPED = 5  # another message type betterproto2 shows as a Python value (wrappers, Duration)
_REPEATED_MESSAGE = 6
_MAP = 7
_PACKED = 8  # repeated numbers
_REPEATED_STRING = 9
_REPEATED_BYTES = 10
_FIXED = 11  # float, double, fixed32/64, sfixed32/64
_ZIGZAG = 12  # sint32, sint64


class _Out(NamedTuple):
    """One field of a message class, as :func:`_write` needs it."""

    name: str
    kind: int
    key: bytes  # the encoded tag (for a packed field: with the length-delimited wire type)
    default: Any  # skipped when equal to it (None: only when None, as an optional field)
    extra: Any  # a map's key and value writers, a repeated field's item writer, a single field's own


class _Single(NamedTuple):
    """How one value is written whatever it is (map keys and values, repeated items)."""

    kind: int
    key: bytes
    extra: Any


_layouts: dict[type[betterproto2.Message], tuple[_Out, ...]] = {}
_writers: dict[type[betterproto2.Message], Callable[[betterproto2.Message, bytearray], None]] = {}
_sources: dict[type[betterproto2.Message], str] = {}  # each writer's code, to read (and for tracebacks)


def serialize(message: betterproto2.Message) -> bytes:
    """``bytes(message)``, several times faster. Not for pydantic-validated messages."""
    out = bytearray()
    _write(message, out)
    return bytes(out)


def serialize_value(cls: type[betterproto2.Message], value: Any) -> bytes:
    """``serialize(cls(value=value))`` for a wrapper message class (``DoubleValue``, ``StringValue``,
    ...: one field, ``value``), without making the message."""
    (field,) = _layout_of(cls)
    if value is None or value == field.default:
        return b""
    out = bytearray()
    _write_single(field.extra, value, out)
    return bytes(out)


def _write(message: betterproto2.Message, out: bytearray) -> None:
    """Append ``message``'s fields (its writer is compiled the first time its class is written)."""
    cls = type(message)
    writer = _writers.get(cls)
    if writer is None:
        writer = _writers[cls] = _compile_writer(cls)
    writer(message, out)


def _write_nested(message: betterproto2.Message, out: bytearray) -> None:
    """A nested message's length, then its fields."""
    start = len(out)
    out.append(0)  # its length, if that takes one byte
    _write(message, out)
    _set_length(out, start)


def _set_length(out: bytearray, start: int) -> None:
    """Put the length of what was written after ``out[start]`` (a one-byte placeholder) there, as a
    varint (widening the placeholder if the length needs more than one byte)."""
    size = len(out) - start - 1
    if size < 0x80:
        out[start] = size
    else:
        length = bytearray()
        _varint(size, length)
        out[start : start + 1] = length


def _layout_of(cls: type[betterproto2.Message]) -> tuple[_Out, ...]:
    layout = _layouts.get(cls)
    if layout is None:
        layout = _layouts[cls] = _layout(cls)
    return layout


# The code that writes a field of each kind, given its ``value`` (set and not the default), its
# ``KEY`` (the tag) and its ``EXTRA`` (see ``_Out``). What betterproto2 does, value by value.
_LENGTH_THEN_DATA = """
        size = len(data)
        if size < 0x80:
            out.append(size)
        else:
            _varint(size, out)
        out += data"""
_FIELD_CODE = {
    _STRING: """
        data = value.encode("utf-8")
        out += KEY"""
    + _LENGTH_THEN_DATA,
    _BYTES: """
        data = value
        out += KEY"""
    + _LENGTH_THEN_DATA,
    _VARINT: """
        out += KEY
        number = int(value)
        if 0 <= number < 0x80:
            out.append(number)
        else:
            _varint(number, out)""",
    _MESSAGE: """
        out += KEY
        _write_nested(value, out)""",
    _TIMESTAMP: """
        out += KEY
        _write_timestamp(value, out)""",
    _REPEATED_MESSAGE: """
        for item in value:
            out += KEY
            _write_nested(item, out)""",
    _REPEATED_STRING: """
        for item in value:
            data = item.encode("utf-8")
            out += KEY"""
    + _LENGTH_THEN_DATA.replace("\n", "\n    "),
    _REPEATED_BYTES: """
        for data in value:
            out += KEY"""
    + _LENGTH_THEN_DATA.replace("\n", "\n    "),
    _MAP: """
        _write_map(EXTRA, KEY, value, out)""",
    _PACKED: """
        _write_packed(EXTRA, KEY, value, out)""",
}
_OTHER_CODE = """
        _write_single(EXTRA, value, out)"""  # fixed-width and zig-zag numbers, wrapped messages
_REPEATED_WRAPPED_CODE = """
        for item in value:
            out += KEY
            _write_single(EXTRA, item, out, with_key=False)"""


def _compile_writer(cls: type[betterproto2.Message]) -> Callable[[betterproto2.Message, bytearray], None]:
    """A function that writes a ``cls``'s fields: each field's code from ``_FIELD_CODE`` in field order,
    behind the test betterproto2 makes (skipped if None or equal to its default). Made once per class,
    as ``dataclasses`` makes ``__init__``: a loop over the fields that decided each one's kind at run
    time took twice as long."""
    namespace: dict[str, Any] = {
        "_varint": _varint,
        "_write_nested": _write_nested,
        "_write_timestamp": _write_timestamp,
        "_write_single": _write_single,
        "_write_map": _write_map,
        "_write_packed": _write_packed,
    }
    lines = ["def write(message, out):"]
    for index, field in enumerate(_layout_of(cls)):
        if not field.name.isidentifier() or keyword.iskeyword(field.name):
            raise ValueError(f"{cls.__qualname__} has a field named {field.name!r}")
        namespace[f"key_{index}"] = field.key
        namespace[f"default_{index}"] = field.default
        namespace[f"extra_{index}"] = field.extra
        lines.append(f"    value = message.{field.name}")
        if field.default is None:  # (an optional field, a message: skipped only when None)
            lines.append("    if value is not None:")
        else:
            lines.append(f"    if value is not None and not value == default_{index}:")
        code = _FIELD_CODE.get(field.kind, _OTHER_CODE)
        if field.kind == _REPEATED_MESSAGE and field.extra is not None:
            code = _REPEATED_WRAPPED_CODE
        lines.append(code.replace("KEY", f"key_{index}").replace("EXTRA", f"extra_{index}").strip("\n"))
    lines.append("    out += message._unknown_fields")
    source = "\n".join(lines) + "\n"
    _sources[cls] = source
    exec(compile(source, f"<_wire writer of {cls.__qualname__}>", "exec"), namespace)
    writer: Callable[[betterproto2.Message, bytearray], None] = namespace["write"]
    return writer


def _write_map(writers: tuple[_Single, _Single], key: bytes, mapping: Any, out: bytearray) -> None:
    """A map field: one entry per item, its key and value written even if they are defaults."""
    key_writer, value_writer = writers
    for k, v in mapping.items():
        out += key
        start = len(out)
        out.append(0)
        _write_single(key_writer, k, out)
        _write_single(value_writer, v, out)
        _set_length(out, start)


def _write_packed(writer: _Single, key: bytes, items: Any, out: bytearray) -> None:
    """A repeated number field, packed: one length-delimited run of the items' values."""
    packed = bytearray()
    for item in items:
        _write_single(writer, item, packed, with_key=False)
    out += key
    _varint(len(packed), out)
    out += packed


def _write_single(writer: _Single, value: Any, out: bytearray, *, with_key: bool = True) -> None:
    """One value, written even if it is its type's default (as betterproto2 writes map entries and
    repeated items); ``with_key=False``: without its tag (a packed item, or the tag already written)."""
    kind = writer.kind
    if with_key:
        out += writer.key
    if kind == _STRING:
        data = value.encode("utf-8")
        _varint(len(data), out)
        out += data
    elif kind == _BYTES:
        _varint(len(value), out)
        out += value
    elif kind == _VARINT:
        _varint(int(value), out)
    elif kind == _ZIGZAG:
        _varint(value << 1 if value >= 0 else (value << 1) ^ (~0), out)
    elif kind == _FIXED:
        out += writer.extra.pack(value)
    elif kind == _MESSAGE:
        _write_nested(value, out)
    elif kind == _TIMESTAMP:
        _write_timestamp(value, out)
    elif kind == _WRAPPED:
        _write_nested(writer.extra.from_wrapped(value), out)
    else:
        raise AssertionError(kind)


#: A Timestamp field's encoding (its length and fields) by its datetime: a server sends the same few
#: times over and over (a variable's creation, a batch's write time, a change fanned out or read back).
#: Bounded: emptied when full.
_timestamps: dict[datetime.datetime, bytes] = {}
TIMESTAMPS_KEPT = 2048


def _write_timestamp(moment: datetime.datetime, out: bytearray) -> None:
    """A Timestamp field's length and fields, straight from its datetime: what betterproto2 writes
    through ``Timestamp.from_datetime``."""
    encoded = _timestamps.get(moment) if type(moment) is datetime.datetime else None
    if encoded is None:
        if moment.tzinfo is not _UTC:  # other time zones, naive times (which betterproto2 refuses)
            _write_nested(Timestamp.from_datetime(moment), out)
            return
        offset = moment - _EPOCH
        seconds = offset.days * 86_400 + offset.seconds
        nanos = offset.microseconds * 1000
        body = bytearray()
        if seconds:
            body.append(0x08)
            _varint(seconds, body)
        if nanos:
            body.append(0x10)
            _varint(nanos, body)
        encoded = bytes((len(body),)) + body  # (at most 1 + 10 + 1 + 5 bytes)
        if type(moment) is datetime.datetime:
            if len(_timestamps) >= TIMESTAMPS_KEPT:
                _timestamps.clear()
            _timestamps[moment] = encoded
    out += encoded


def _single(proto_type: str, number: int, unwrap: Callable[[], type] | None) -> _Single:
    """How a value of ``proto_type`` is written on its own, as field ``number``."""
    key = _key(number, _wire_type(proto_type))
    if proto_type == TYPE_STRING:
        return _Single(_STRING, key, None)
    if proto_type == TYPE_BYTES:
        return _Single(_BYTES, key, None)
    if proto_type in (TYPE_SINT32, TYPE_SINT64):
        return _Single(_ZIGZAG, key, None)
    if proto_type in WIRE_VARINT_TYPES:
        return _Single(_VARINT, key, None)
    if proto_type in FIXED_TYPES:
        return _Single(_FIXED, key, _STRUCT_OF[proto_type])
    assert proto_type == TYPE_MESSAGE, proto_type
    if unwrap is None:
        return _Single(_MESSAGE, key, None)
    if unwrap() is Timestamp:
        return _Single(_TIMESTAMP, key, None)
    return _Single(_WRAPPED, key, unwrap())


def _layout(cls: type[betterproto2.Message]) -> tuple[_Out, ...]:
    fields = []
    info: Any = cls._betterproto  # type: ignore[arg-type]  # (a classproperty mypy cannot follow)
    defaults: dict[str, Callable[[], Any]] = info.default_gen
    for name, meta in info.meta_by_field_name.items():
        with warnings.catch_warnings():  # as betterproto2 does, for deprecated fields
            warnings.simplefilter("ignore", DeprecationWarning)
            default = defaults[name]()
        number, proto_type = meta.number, meta.proto_type
        if meta.map_meta:
            key_meta, value_meta = meta.map_meta
            entry_writers = (
                _single(key_meta.proto_type, 1, None),
                _single(value_meta.proto_type, 2, value_meta.unwrap),
            )
            fields.append(_Out(name, _MAP, _key(number, 2), default, entry_writers))
        elif meta.repeated and proto_type in PACKED_TYPES:
            fields.append(_Out(name, _PACKED, _key(number, 2), default, _single(proto_type, number, None)))
        elif meta.repeated:
            single = _single(proto_type, number, meta.unwrap)
            if single.kind == _STRING:
                fields.append(_Out(name, _REPEATED_STRING, single.key, default, None))
            elif single.kind == _BYTES:
                fields.append(_Out(name, _REPEATED_BYTES, single.key, default, None))
            else:  # messages (plain ones need no writer: the commonest case is the fastest)
                writer = None if single.kind == _MESSAGE else single
                fields.append(_Out(name, _REPEATED_MESSAGE, single.key, default, writer))
        else:
            single = _single(proto_type, number, meta.unwrap)
            fields.append(_Out(name, single.kind, single.key, default, single))
    return tuple(fields)


def _varint(value: int, out: bytearray) -> None:
    if value < 0:
        if value < -(1 << 63):
            raise ValueError("Negative value is not representable as a 64-bit integer")
        value += 1 << 64
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


# ---- reading -----------------------------------------------------------------------------------------

_M32 = (1 << 32) - 1
_M64 = (1 << 64) - 1

#: How a varint becomes a field's value, as betterproto2's ``_postprocess_single`` makes it (an
#: expression of ``number``; ``CONVERT`` is the field's enum class).
_VARINT_VALUE = {
    TYPE_INT32: "((number & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000",
    TYPE_INT64: "((number & 0xFFFFFFFFFFFFFFFF) ^ 0x8000000000000000) - 0x8000000000000000",
    TYPE_UINT32: "number & 0xFFFFFFFF",
    TYPE_UINT64: "number & 0xFFFFFFFFFFFFFFFF",
    TYPE_SINT32: "((number & 0xFFFFFFFF) >> 1) ^ (-(number & 1))",
    TYPE_SINT64: "((number & 0xFFFFFFFFFFFFFFFF) >> 1) ^ (-(number & 1))",
    TYPE_BOOL: "number > 0",
    TYPE_ENUM: "CONVERT(((number & 0xFFFFFFFFFFFFFFFF) ^ 0x8000000000000000) - 0x8000000000000000)",
}

_readers: dict[type[betterproto2.Message], Callable[[bytes, int, int], Any]] = {}
_reader_sources: dict[type[betterproto2.Message], str] = {}  # each reader's code, to read


class _Malformed(ValueError):
    """Bytes a reader does not take (:func:`parse` then lets ``check_wire`` and betterproto2 say what
    is wrong with them)."""


def parse(cls: type[M], data: bytes | bytearray | memoryview) -> M:
    """``cls.parse(data)`` after ``check_wire(data, cls)``: the same message, or the same error, in
    one pass and several times faster. Not for pydantic-validated messages."""
    if type(data) is not bytes:
        data = bytes(data)
    try:
        message: M = _read(cls, data, 0, len(data))
    except Exception:  # (whatever it is, the two below name it as they always did)
        check_wire(data, cls)
        return cls.parse(data)
    return message


def parse_value(cls: type[betterproto2.Message], data: bytes) -> Any:
    """``parse(cls, data).value`` for a wrapper message class (the same value, or the same error)."""
    return parse(cls, data).value  # type: ignore[attr-defined]


def _read(cls: type[betterproto2.Message], data: bytes, pos: int, end: int) -> Any:
    """The ``cls`` in ``data[pos:end]`` (its reader is compiled the first time its class is read)."""
    reader = _readers.get(cls)
    if reader is None:
        reader = _readers[cls] = _compile_reader(cls)
    return reader(data, pos, end)


def _read_timestamp(data: bytes, pos: int, end: int) -> datetime.datetime:
    """What betterproto2 makes of a Timestamp field (``Timestamp.to_datetime``)."""
    timestamp = _read(Timestamp, data, pos, end)
    return _EPOCH + datetime.timedelta(seconds=timestamp.seconds, microseconds=timestamp.nanos // 1000)


def _read_wrapped(cls: type[betterproto2.Message], data: bytes, pos: int, end: int) -> Any:
    return _read(cls, data, pos, end).to_wrapped()


# The code that reads a field of each kind once its tag is read: a length-delimited field's content
# is ``data[pos:stop]``; ``SET(x)`` stores the value (or appends it, for a repeated field).
_READ_LENGTH = """
            if pos >= end:
                raise _Malformed("truncated length")
            size = data[pos]
            pos += 1
            if size & 0x80:
                size, pos = _varint_rest(size, data, pos, end)
            stop = pos + size
            if stop > end:
                raise _Malformed("truncated field")"""
_READ_CODE = {
    "string": _READ_LENGTH
    + """
            SET(str(data[pos:stop], "utf-8"))
            pos = stop""",
    "bytes": _READ_LENGTH
    + """
            SET(data[pos:stop])
            pos = stop""",
    "message": _READ_LENGTH
    + """
            SET(_read(CLASS, data, pos, stop))
            pos = stop""",
    "timestamp": _READ_LENGTH
    + """
            SET(_read_timestamp(data, pos, stop))
            pos = stop""",
    "wrapped": _READ_LENGTH
    + """
            SET(_read_wrapped(CLASS, data, pos, stop))
            pos = stop""",
    "map": _READ_LENGTH
    + """
            entry = _read(CLASS, data, pos, stop)
            if VALUE is None:
                VALUE = {}
            VALUE[entry.key] = entry.value
            pos = stop""",
    "packed": _READ_LENGTH
    + """
            items = _packed(PACKED, data, pos, stop)
            if VALUE is None:
                VALUE = items
            else:
                VALUE.extend(items)
            pos = stop""",
    "varint": """
            if pos < end and data[pos] < 0x80:
                number = data[pos]
                pos += 1
            else:
                number, pos = _varint_at(data, pos, end)
            SET(NUMBER)""",
    "fixed": """
            stop = pos + EXTRA.size
            if stop > end:
                raise _Malformed("truncated field")
            SET(EXTRA.unpack_from(data, pos)[0])
            pos = stop""",
}


def _compile_reader(cls: type[betterproto2.Message]) -> Callable[[bytes, int, int], Any]:
    """A function that reads a ``cls`` from ``data[pos:end]``: a loop over the fields there, each one
    dispatched on its tag to its code from ``_READ_CODE``, raising ``_Malformed`` wherever
    ``check_wire`` would raise; then the message, made with every field at once (betterproto2 makes
    every default first, then sets what it read). Made once per class, as the writers are."""
    info: Any = cls._betterproto  # type: ignore[arg-type]  # (a classproperty mypy cannot follow)
    namespace: dict[str, Any] = {
        "_Malformed": _Malformed,
        "_varint_at": _varint_at,
        "_varint_rest": _varint_rest,
        "_skip": _skip,
        "_read": _read,
        "_read_timestamp": _read_timestamp,
        "_read_wrapped": _read_wrapped,
        "_packed": _packed,
        "_new": object.__new__,
        "cls": cls,
        "known": frozenset(meta.number for meta in info.meta_by_field_name.values()),
    }
    start: list[str] = []  # each field's variable, before the loop
    branches: list[str] = []  # each tag's code, in the loop
    state: list[str] = []  # each field's entry in the message's __dict__
    for index, (name, meta) in enumerate(info.meta_by_field_name.items()):
        value = f"value_{index}"
        with warnings.catch_warnings():  # as betterproto2 does, for deprecated fields
            warnings.simplefilter("ignore", DeprecationWarning)
            default = info.default_gen[name]()
        namespace[f"default_{index}"] = default
        if isinstance(default, list | dict):  # repeated, map: made on the first item
            start.append(f"    {value} = None")
            fresh = "[]" if isinstance(default, list) else "{}"
            state.append(f"{name!r}: {value} if {value} is not None else {fresh}")
        else:
            start.append(f"    {value} = default_{index}")
            state.append(f"{name!r}: {value}")
        number, proto_type, repeated = meta.number, meta.proto_type, bool(meta.repeated)
        tags: list[tuple[int, str]] = []  # (tag, kind)
        if meta.map_meta:
            namespace[f"class_{index}"] = info.cls_by_field[name]
            tags.append(((number << 3) | 2, "map"))
        elif proto_type == TYPE_MESSAGE:
            namespace[f"class_{index}"] = _field_class(info, name, meta)
            kind = (
                "message" if meta.unwrap is None else "timestamp" if meta.unwrap() is Timestamp else "wrapped"
            )
            tags.append(((number << 3) | 2, kind))
        elif proto_type in (TYPE_STRING, TYPE_BYTES):
            tags.append(((number << 3) | 2, proto_type))
        elif proto_type in FIXED_TYPES:
            namespace[f"extra_{index}"] = _STRUCT_OF[proto_type]
            tags.append(((number << 3) | _wire_type(proto_type), "fixed"))
        else:
            if proto_type == TYPE_ENUM:
                namespace[f"convert_{index}"] = info.cls_by_field[name]
            tags.append(((number << 3), "varint"))
        if repeated and proto_type in PACKED_TYPES:  # packed, or not
            namespace[f"packed_{index}"] = (
                proto_type,
                namespace.get(f"extra_{index}"),
                namespace.get(f"convert_{index}"),
            )
            tags.append(((number << 3) | 2, "packed"))
        for tag, kind in tags:
            code = _READ_CODE[kind]
            if repeated and kind != "packed":
                set_code = (
                    f"if {value} is None:\n                {value} = [\\1]\n"
                    f"            else:\n                {value}.append(\\1)"
                )
            else:
                set_code = f"{value} = \\1"
            code = re.sub(r"SET\((.*)\)$", set_code, code, flags=re.MULTILINE)
            code = code.replace("NUMBER", _VARINT_VALUE.get(proto_type, "number")).replace(
                "CONVERT", f"convert_{index}"
            )
            code = (
                code.replace("VALUE", value)
                .replace("CLASS", f"class_{index}")
                .replace("EXTRA", f"extra_{index}")
                .replace("PACKED", f"packed_{index}")
            )
            branches.append(f"        {'elif' if branches else 'if'} key == {tag}:{code}")
    lines = [
        "def read(data, pos, end):",
        *start,
        '    unknown = b""',
        "    while pos < end:",
        "        begin = pos",
        "        key = data[pos]",
        "        pos += 1",
        "        if key & 0x80:",
        "            key, pos = _varint_rest(key, data, pos, end)",
        *branches,
        "        else:" if branches else "        if True:",
        "            pos = _skip(known, key, data, pos, end)",
        "            unknown += data[begin:pos]",
        "    message = _new(cls)",
        "    message.__dict__ = {" + ", ".join([*state, '"_unknown_fields": unknown']) + "}",
        "    return message",
    ]
    source = "\n".join(lines) + "\n"
    _reader_sources[cls] = source
    exec(compile(source, f"<_wire reader of {cls.__qualname__}>", "exec"), namespace)
    reader: Callable[[bytes, int, int], Any] = namespace["read"]
    return reader


def _packed(field: tuple[str, struct.Struct | None, Any], data: bytes, pos: int, stop: int) -> list[Any]:
    """The items of a packed repeated field in ``data[pos:stop]``: ``field`` is its type, its struct
    (fixed-width numbers) and its enum class (enums)."""
    proto_type, layout, enum_cls = field
    if layout is not None:
        size = layout.size
        if (stop - pos) % size:
            raise _Malformed("packed field of a partial item")
        return list(struct.unpack_from(f"<{(stop - pos) // size}{layout.format[-1]}", data, pos))
    items = []
    while pos < stop:
        number, pos = _varint_at(data, pos, stop)
        items.append(_varint_value(proto_type, number, enum_cls))
    return items


def _varint_value(proto_type: str, number: int, enum_cls: Any) -> Any:
    """A varint item of a packed field as betterproto2 reads it (see ``_VARINT_VALUE``)."""
    if proto_type in (TYPE_INT32, TYPE_INT64, TYPE_ENUM):
        bits = 32 if proto_type == TYPE_INT32 else 64
        number &= (1 << bits) - 1
        number = (number ^ (1 << (bits - 1))) - (1 << (bits - 1))
        return enum_cls(number) if proto_type == TYPE_ENUM else number
    if proto_type in (TYPE_UINT32, TYPE_SINT32):
        number &= _M32
    else:
        number &= _M64
    if proto_type in (TYPE_SINT32, TYPE_SINT64):
        return (number >> 1) ^ (-(number & 1))
    if proto_type == TYPE_BOOL:
        return number > 0
    return number


def _varint_at(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` (ending before ``end``) and the position after it."""
    return _varint_rest(0, data, pos, end, 0)


def _varint_rest(result: int, data: bytes, pos: int, end: int, shift: int = 7) -> tuple[int, int]:
    """The rest of a varint whose low bits (``shift`` of them) are ``result``: at most 10 bytes in
    all, as ``check_wire`` and betterproto2 take."""
    result &= (1 << shift) - 1
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _skip(known: frozenset[int], key: int, data: bytes, pos: int, end: int) -> int:
    """Past an unknown field (whose tag ``key`` ends at ``pos``); ``_Malformed`` where ``check_wire``
    would raise."""
    number, wire_type = key >> 3, key & 7
    if number == 0 or number in known:  # (a known field with a wire type it cannot have)
        raise _Malformed(f"field {number} with wire type {wire_type}")
    if wire_type == 0:
        _, pos = _varint_at(data, pos, end)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    elif wire_type == 2:
        size, pos = _varint_at(data, pos, end)
        pos += size
    else:
        raise _Malformed(f"field {number} has unsupported wire type {wire_type}")
    if pos > end:
        raise _Malformed(f"field {number} is truncated")
    return pos


# ---- checking what comes in --------------------------------------------------------------------------


class _Expected(NamedTuple):
    name: str
    wire_types: frozenset[int]
    nested: type[betterproto2.Message] | None  # length-delimited content to check too


_schemas: dict[type[betterproto2.Message], dict[int, _Expected]] = {}


def check_wire(data: bytes | memoryview, cls: type[betterproto2.Message]) -> None:
    """Raise ``ValueError`` for bytes that betterproto2 would misread as a ``cls``: a truncated field,
    a field number 0, a group or unknown wire type, or a known field (at any depth) sent with a wire
    type its declared type cannot have. Unknown fields are skipped, as protobuf does.

    (:func:`parse` makes the same checks as it reads.)"""
    view = memoryview(data)
    schema = _schemas.get(cls)
    if schema is None:
        schema = _schemas[cls] = _schema(cls)
    pos, end = 0, len(view)
    while pos < end:
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        expected = schema.get(number)
        if expected is not None and wire_type not in expected.wire_types:
            raise ValueError(f"field {number} ({expected.name}) has wire type {wire_type}")
        if wire_type == 0:
            _, pos = read_varint(view, pos)
        elif wire_type == 1 or wire_type == 5:
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = read_varint(view, pos)
            if pos + length <= end and expected is not None and expected.nested is not None:
                check_wire(view[pos : pos + length], expected.nested)
            pos += length
        else:
            raise ValueError(f"field {number} has unsupported wire type {wire_type}")
        if pos > end:
            raise ValueError(f"field {number} is truncated")


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ``ValueError`` if truncated or too long."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _schema(cls: type[betterproto2.Message]) -> dict[int, _Expected]:
    info: Any = cls._betterproto  # type: ignore[arg-type]  # (a classproperty mypy cannot follow)
    schema = {}
    for name, meta in info.meta_by_field_name.items():
        allowed = {_wire_type(meta.proto_type)}
        if meta.repeated and meta.proto_type in PACKED_TYPES:
            allowed.add(2)  # packed, or not
        nested: type[betterproto2.Message] | None = None
        if meta.proto_type == TYPE_MESSAGE or meta.map_meta:
            nested = meta.unwrap() if meta.unwrap is not None else info.cls_by_field.get(name)
            if not (isinstance(nested, type) and issubclass(nested, betterproto2.Message)):
                nested = None
        schema[meta.number] = _Expected(name, frozenset(allowed), nested)
    return schema

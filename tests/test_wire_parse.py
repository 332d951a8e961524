"""``_wire.parse`` reads what the server's codec used to read with ``check_wire`` and then betterproto2's
parser: the same message for every generated message type (including encodings betterproto2 never
writes: fields repeated, merged, unpacked, unknown), the same error for damaged bytes, and without
betterproto2's code on the way."""

from __future__ import annotations

import datetime
import math
import struct
from typing import Any

import betterproto2
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tests.strategies import MESSAGE_TYPES, _scalar, messages
from tests.test_wire import calls_into_library
from trio_bridge._status import RequestCodec
from trio_bridge._wire import check_wire, parse, serialize
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google import protobuf as wkt

#: The requests of a write, and what they carry.
HOT_CLASSES: list[type[betterproto2.Message]] = [
    pb.SetVariableRequest,
    pb.SetVariablesRequest,
    pb.VariableWrite,
    pb.WriteRequest,
    wkt.Any,
    wkt.DoubleValue,
]


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``True`` is not ``1``, ``-0.0`` is not ``0.0``,
    a NaN is the NaN with the same bits), unknown fields included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, betterproto2.Message):
        names = type(a)._betterproto.meta_by_field_name  # type: ignore[arg-type]
        return a._unknown_fields == b._unknown_fields and all(
            same(getattr(a, name), getattr(b, name)) for name in names
        )
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, datetime.datetime):
        return a == b and a.tzinfo is b.tzinfo
    return bool(a == b)


def reference(cls: type[betterproto2.Message], data: bytes) -> Any:
    """What the codec did before ``parse``: the checks, then betterproto2's parser."""
    check_wire(data, cls)
    return cls.parse(data)


def outcome(function: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "message", function(*args)
    except Exception as exc:
        return "error", (type(exc), str(exc))


def assert_same_outcome(cls: type[betterproto2.Message], data: bytes) -> None:
    expected, got = outcome(reference, cls, data), outcome(parse, cls, data)
    assert expected[0] == got[0], (expected, got)
    if expected[0] == "error":
        assert expected == got
    else:
        assert same(got[1], expected[1]), (got[1], expected[1])


def _unknown_field(schema_numbers: set[int]) -> st.SearchStrategy[bytes]:
    """A field the class does not know, of any wire type protobuf has (groups excluded)."""

    def encode(number: int, wire: int, varint: int, payload: bytes) -> bytes:
        out = bytearray()
        for value in ((number << 3) | wire, *([varint] if wire == 0 else [])):
            while value > 0x7F:
                out.append(0x80 | (value & 0x7F))
                value >>= 7
            out.append(value)
        if wire == 1:
            out += payload.ljust(8, b"\0")[:8]
        elif wire == 5:
            out += payload.ljust(4, b"\0")[:4]
        elif wire == 2:
            out += bytes([len(payload)]) + payload
        return bytes(out)

    numbers = st.integers(1, 2**29 - 1).filter(lambda n: n not in schema_numbers)
    return st.builds(
        encode, numbers, st.sampled_from([0, 1, 2, 5]), st.integers(0, 2**64 - 1), st.binary(max_size=20)
    )


def _unpacked(cls: type[betterproto2.Message]) -> st.SearchStrategy[bytes]:
    """A packed repeated field's items sent one field each, as protobuf allows (betterproto2 never
    writes them so)."""
    info: Any = cls._betterproto  # type: ignore[arg-type]
    hints = cls._type_hints()
    packable = [
        (meta, hints[name])
        for name, meta in info.meta_by_field_name.items()
        if meta.repeated and meta.proto_type in betterproto2.PACKED_TYPES
    ]
    if not packable:
        return st.just(b"")

    def encode(meta: Any, items: list[Any]) -> bytes:
        return b"".join(betterproto2._serialize_single(meta.number, meta.proto_type, item) for item in items)

    return st.sampled_from(packable).flatmap(
        lambda pair: st.lists(_scalar(pair[0].proto_type, pair[1].__args__[0]), max_size=3).map(
            lambda items: encode(pair[0], items)
        )
    )


def encodings(cls: type[betterproto2.Message]) -> st.SearchStrategy[bytes]:
    """Valid encodings of a ``cls``: betterproto2's own, two messages one after the other (the later
    one's singular fields win, repeated ones add up), with unknown and unpacked fields among them."""
    numbers = {meta.number for meta in cls._betterproto.meta_by_field_name.values()}  # type: ignore[arg-type]
    part = st.one_of(messages(cls).map(bytes), _unknown_field(numbers), _unpacked(cls))
    return st.lists(part, min_size=1, max_size=4).map(b"".join)


def damaged(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` cut short, with a byte changed, inserted or removed."""
    if not data:
        return st.binary(min_size=1, max_size=8)
    index = st.integers(0, len(data) - 1)
    return st.one_of(
        index.map(lambda i: data[:i]),
        st.tuples(index, st.integers(0, 255)).map(lambda p: data[: p[0]] + bytes([p[1]]) + data[p[0] + 1 :]),
        st.tuples(index, st.integers(0, 255)).map(lambda p: data[: p[0]] + bytes([p[1]]) + data[p[0] :]),
        index.map(lambda i: data[:i] + data[i + 1 :]),
    )


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_parse_matches_betterproto2(cls: type[betterproto2.Message], data: st.DataObject) -> None:
    encoded = data.draw(encodings(cls))
    assert_same_outcome(cls, encoded)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_parse_refuses_what_the_checks_and_betterproto2_refuse(
    cls: type[betterproto2.Message], data: st.DataObject
) -> None:
    """Damaged bytes: the same error (the checks' own, or betterproto2's), or the same message."""
    encoded = data.draw(damaged(data.draw(encodings(cls))))
    assert_same_outcome(cls, encoded)


@pytest.mark.parametrize("cls", HOT_CLASSES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_hot_requests_parse_as_betterproto2_parses_them(
    cls: type[betterproto2.Message], data: st.DataObject
) -> None:
    encoded = data.draw(encodings(cls))
    assert_same_outcome(cls, encoded)
    assert_same_outcome(cls, data.draw(damaged(encoded)))


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_parse_reads_without_betterproto2(cls: type[betterproto2.Message], data: st.DataObject) -> None:
    encoded = data.draw(encodings(cls))
    assume(outcome(reference, cls, encoded)[0] == "message")
    parse(cls, encoded)  # (the first message of a class learns its fields, with betterproto2's help)
    message, called = calls_into_library(lambda: parse(cls, encoded))
    # (betterproto2's enums make a member for a number they do not know: as betterproto2 would)
    assert [c for c in called if not c.startswith("Enum._missing_")] == []
    assert same(message, cls.parse(encoded))


@pytest.mark.parametrize(
    ("cls", "data", "error"),
    [
        (wkt.DoubleValue, b"\x08\x01", "field 1 (value) has wire type 0"),
        (wkt.DoubleValue, b"\x09\x00\x00", "field 1 is truncated"),
        (wkt.Int64Value, b"\xff", "truncated varint"),
        (wkt.BoolValue, b"\x0b", "field 1 (value) has wire type 3"),
        (wkt.BoolValue, b"\x13", "field 2 has unsupported wire type 3"),
        (pb.SetVariableRequest, b"\x00", "field number 0"),
        (pb.SetVariableRequest, b"\x1a\x02\x08\x01", "field 1 (type_url) has wire type 0"),  # in the Any
        (pb.SetVariablesRequest, b"\x12\x05\x12\x03\x0a\x05x", "field 1 is truncated"),  # in a write's Any
        (pb.SetVariablesRequest, b"\x1a\x02\x08\x01", "field 1 (key) has wire type 0"),  # a map entry
        (pb.SetVariablesRequest, b"\x12\x0b" + b"\xff" * 11, "varint longer than 10 bytes"),
    ],
)
def test_parse_makes_the_wire_checks(cls: type[betterproto2.Message], data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(").replace(")", r"\)") + "$"):
        parse(cls, data)


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (wkt.StringValue, b"\x0a\x02\xff\xfe"),  # not UTF-8
        (pb.Embedding, b"\x0a\x03\x00\x00\x80"),  # packed floats of 3 bytes
        (pb.Tensor, b"\x0a\x02\x80\x80"),  # a packed varint cut short
    ],
)
def test_parse_raises_betterproto2_s_own_errors(cls: type[betterproto2.Message], data: bytes) -> None:
    assert outcome(parse, cls, data) == outcome(reference, cls, data)
    assert outcome(parse, cls, data)[0] == "error"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
@example(data=None)
def test_the_codec_decodes_as_before(data: st.DataObject | None) -> None:
    """``RequestCodec.decode``: the message the checks and betterproto2 made, or the INVALID_ARGUMENT
    status with the same message."""
    codec = RequestCodec()
    if data is None:  # (the example: a request whose Any is damaged)
        cls: type[betterproto2.Message] = pb.SetVariableRequest
        encoded = b"\x0a\x01s\x1a\x03\x0a\x05x"
    else:
        cls = data.draw(st.sampled_from(HOT_CLASSES))
        encoded = data.draw(encodings(cls))
        if data.draw(st.booleans()):
            encoded = data.draw(damaged(encoded))
    expected = outcome(reference, cls, encoded)
    got = _decoded(codec, cls, encoded)
    if expected[0] == "error":
        assert got == (
            "error",
            (Status.INVALID_ARGUMENT, f"malformed {cls.__name__} message: {expected[1][1]}"),
        )
    else:
        assert got[0] == "message"
        assert same(got[1], expected[1])


def _decoded(codec: RequestCodec, cls: type[betterproto2.Message], data: bytes) -> tuple[str, Any]:
    """What the codec makes of a request: its message, or the status it answers with."""
    try:
        return "message", codec.decode(data, cls)
    except GRPCError as exc:
        return "error", (exc.status, exc.message)


def test_messages_parse_as_betterproto2_makes_them() -> None:
    """Defaults fresh for each message (a list or dict is not shared), and the parsed message works as
    one betterproto2 made: equality, repr, serializing, changing it."""
    first, second = parse(pb.SetVariablesRequest, b""), parse(pb.SetVariablesRequest, b"")
    assert first == pb.SetVariablesRequest() and first.writes is not second.writes
    first.writes.append(pb.VariableWrite(variable_identifier="v"))
    first.metadata["k"] = "v"
    assert second.writes == [] and second.metadata == {}
    assert serialize(first) == bytes(first) == bytes(pb.SetVariablesRequest.parse(bytes(first)))
    assert repr(first) == repr(pb.SetVariablesRequest.parse(bytes(first)))
    assert parse(pb.VariableWrite, b"\x18\x00").expected_version == 0  # optional: set, to 0
    assert parse(pb.VariableWrite, b"").expected_version is None


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (0, 0),
        (1_700_000_000, 123_456_789),  # nanoseconds beyond microseconds: cut, as betterproto2 does
        (-1, 999_999_999),  # just before 1970
        (-86_401, 1),
        (-62_135_596_800, 0),  # 0001-01-01, the first Timestamp
        (253_402_300_799, 999_999_999),  # 9999-12-31T23:59:59.999999999, the last
        (253_402_300_800, 0),  # past datetime's range: betterproto2's OverflowError
        (-62_135_596_801, 0),
        (0, -1000),  # (negative nanos: invalid, read as betterproto2 reads them)
    ],
)
def test_timestamps_parse_as_betterproto2_parses_them(seconds: int, nanos: int) -> None:
    data = (
        bytes(pb.VariableUpdate(update_type="x"))
        + b"\x32"
        + bytes([len(body := bytes(wkt.Timestamp(seconds, nanos)))])
        + body
    )
    assert_same_outcome(pb.VariableUpdate, data)
    got = outcome(parse, pb.VariableUpdate, data)
    if got[0] == "message":
        assert got[1].timestamp.tzinfo is datetime.UTC
        assert math.isclose(got[1].timestamp.timestamp(), seconds + nanos // 1000 / 1e6, abs_tol=1e-6)


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (pb.SetVariablesRequest, b"\x1a\x03\x0a\x01k"),  # a map entry with no value: ""
        (pb.SetVariablesRequest, b"\x1a\x03\x12\x01v"),  # ... with no key: ""
        (pb.SetVariablesRequest, b"\x1a\x00\x1a\x03\x0a\x01k\x1a\x05\x0a\x01k\x12\x00"),  # twice the same key
        (pb.WatchVariablesRequest, b"\x2a\x03\x0a\x01k"),  # string → int64, no value: 0
        (pb.SetVariableRequest, b"\x1a\x02\x0a\x00\x1a\x02\x12\x00"),  # a message field twice: the last
        (pb.Tensor, b"\x0a\x02\x01\x02\x08\x03\x0a\x00"),  # packed, unpacked, packed and empty
    ],
)
def test_encodings_betterproto2_never_writes(cls: type[betterproto2.Message], data: bytes) -> None:
    assert_same_outcome(cls, data)

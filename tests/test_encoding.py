"""The value encoding: every type packs into an Any that stock protobuf unpacks, and bad payloads are
refused with INVALID_ARGUMENT instead of being misread."""

from __future__ import annotations

import datetime
import math
import re
import struct

import pytest
from google.protobuf import any_pb2, wrappers_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_bridge import InvalidArgument, Tensor, VariableType, _encoding, _wire
from trio_bridge._encoding import _FULL_NAME, _WIRE_MESSAGE, pack_value, timestamp, type_url_for, unpack_value
from trio_bridge._encoding import seconds as seconds_of
from trio_bridge._wire import check_wire, parse, serialize
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny

NATIVE = [
    (VariableType.FLOAT, -2.5),
    (VariableType.INTEGER, -(2**63)),
    (VariableType.STRING, "naïve ☃"),
    (VariableType.BOOLEAN, True),
    (VariableType.CHOICE, "high"),
    (VariableType.MODULE, "Predict"),
    (VariableType.EMBEDDING, (0.5, -1.0, 3.0)),
    (VariableType.TENSOR, Tensor((2, 1), "int16", struct.pack("<2h", -1, 7))),
]


@pytest.mark.parametrize(("vtype", "value"), NATIVE)
def test_round_trip(vtype: VariableType, value: object) -> None:
    packed = pack_value(vtype, value)
    assert packed.type_url == type_url_for(vtype)
    assert unpack_value("v", vtype, packed) == value


@pytest.mark.parametrize(
    ("vtype", "value", "wrapper"),
    [
        (VariableType.FLOAT, -2.5, wrappers_pb2.DoubleValue),
        (VariableType.INTEGER, 2**40, wrappers_pb2.Int64Value),
        (VariableType.STRING, "x", wrappers_pb2.StringValue),
        (VariableType.BOOLEAN, True, wrappers_pb2.BoolValue),
        (VariableType.CHOICE, "c", wrappers_pb2.StringValue),
    ],
)
def test_stock_protobuf_unpacks_the_well_known_wrappers(
    vtype: VariableType, value: object, wrapper: type
) -> None:
    stock = any_pb2.Any()
    stock.ParseFromString(bytes(pack_value(vtype, value)))
    message = wrapper()
    assert stock.Unpack(message)
    assert message.value == value


def test_any_type_url_prefix_is_free() -> None:
    packed = pack_value(VariableType.FLOAT, 1.0)
    other_prefix = PbAny(type_url="example.com/types/google.protobuf.DoubleValue", value=packed.value)
    assert unpack_value("v", VariableType.FLOAT, other_prefix) == 1.0


@pytest.mark.parametrize(
    ("vtype", "payload", "fragment"),
    [
        (VariableType.FLOAT, b"\x08\x01", "field 1 (value) has wire type 0"),
        (VariableType.FLOAT, b"\x09\x00\x00", "field 1 is truncated"),
        (VariableType.INTEGER, b"\xff", "truncated varint"),
        (VariableType.STRING, b"\x0a\x02\xff\xfe", "not a valid google.protobuf.StringValue"),
        (VariableType.STRING, b"\x0a\x05ab", "field 1 is truncated"),
        (VariableType.BOOLEAN, b"\x0b", "field 1 (value) has wire type 3"),
        (VariableType.BOOLEAN, b"\x13", "unsupported wire type 3"),
        (VariableType.EMBEDDING, b"\x0a\x03\x00\x00\x80", "not a valid unified_bridge.Embedding"),
        (VariableType.TENSOR, b"\x12\x01", "field 2 is truncated"),
    ],
)
def test_malformed_payloads_are_refused(vtype: VariableType, payload: bytes, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match="variable 'v'") as caught:
        unpack_value("v", vtype, PbAny(type_url=type_url_for(vtype), value=payload))
    assert fragment in str(caught.value)


def test_unknown_fields_are_ignored_as_protobuf_requires() -> None:
    payload = bytes(pack_value(VariableType.INTEGER, 5).value) + b"\x10\x07"  # field 2, varint 7
    assert (
        unpack_value(
            "v", VariableType.INTEGER, PbAny(type_url=type_url_for(VariableType.INTEGER), value=payload)
        )
        == 5
    )


def test_missing_and_mistyped_values() -> None:
    with pytest.raises(InvalidArgument, match="a value is required"):
        unpack_value("v", VariableType.FLOAT, None)
    with pytest.raises(InvalidArgument, match=r"expects an Any of .*DoubleValue', got .*StringValue'"):
        unpack_value("v", VariableType.FLOAT, pack_value(VariableType.STRING, "1.0"))


def test_the_server_codec_serializes_a_fanned_out_message_once() -> None:
    from trio_bridge._status import RequestCodec
    from trio_bridge.proto import unified_bridge as pb

    codec = RequestCodec()
    update = pb.VariableUpdate(variable_id="v", update_type="value_change")
    first = codec.encode(update, pb.VariableUpdate)
    assert codec.encode(update, pb.VariableUpdate) is first  # reused, not re-serialized
    assert pb.VariableUpdate.parse(first) == update
    other = pb.VariableUpdate(variable_id="w")
    assert pb.VariableUpdate.parse(codec.encode(other, pb.VariableUpdate)) == other
    del update, other
    assert codec._encoded == {}  # entries go with their messages


# ---- the wrapper payloads and Timestamps, written and read without their messages --------------------

_WRAPPER_VALUES = {
    VariableType.FLOAT: st.floats() | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324]),
    VariableType.INTEGER: st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, -1, 127, 128, -(2**63)]),
    VariableType.STRING: st.text(max_size=200),
    VariableType.BOOLEAN: st.booleans(),
    VariableType.CHOICE: st.text(max_size=5),
    VariableType.MODULE: st.text(max_size=5),
}


@pytest.mark.parametrize("vtype", list(_WRAPPER_VALUES), ids=lambda vtype: vtype.name)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_wrapped_values_pack_as_their_messages_serialize(vtype: VariableType, data: st.DataObject) -> None:
    value = data.draw(_WRAPPER_VALUES[vtype])
    message = _WIRE_MESSAGE[vtype](value=value)  # type: ignore[call-arg]
    packed = pack_value(vtype, value)
    assert packed.value == bytes(message)
    assert packed.type_url == "type.googleapis.com/" + _FULL_NAME[type(message)]


@pytest.mark.parametrize("vtype", list(_WRAPPER_VALUES), ids=lambda vtype: vtype.name)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_wrapped_values_unpack_as_before(vtype: VariableType, data: st.DataObject) -> None:
    """The value the checks and betterproto2's parser read, or the same InvalidArgument."""
    message_type = _WIRE_MESSAGE[vtype]
    payload = data.draw(
        st.one_of(
            _WRAPPER_VALUES[vtype].map(lambda value: bytes(message_type(value=value))),  # type: ignore[call-arg]
            st.binary(max_size=12),
        )
    )
    where = f"variable 'v' ({vtype.name.lower()})"
    try:
        check_wire(payload, message_type)
        expected: tuple[str, object] = ("value", message_type.parse(payload).value)  # type: ignore[attr-defined]
    except Exception as exc:
        name = _FULL_NAME[message_type]
        expected = ("error", f"{where}: the Any's payload is not a valid {name}: {exc}")
    try:
        got: tuple[str, object] = ("value", unpack_value("v", vtype, PbAny(type_url_for(vtype), payload)))
    except InvalidArgument as exc:
        got = ("error", exc.message)
    if expected[0] == "value" and isinstance(expected[1], float):
        assert got[0] == "value" and struct.pack("<d", got[1]) == struct.pack("<d", expected[1])
    else:
        assert got == expected


def _old_timestamp(seconds: float) -> datetime.datetime:
    """``timestamp()`` as it was: a datetime made anew each time."""
    if not math.isfinite(seconds):
        seconds = 0.0
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


TIMES = [
    0.0,
    -0.0,
    1.5,
    -1.5,  # before 1970: seconds -2, nanos 500,000,000
    -1e-7,  # rounded to the microsecond: 0
    5e-7,  # half a microsecond: to even, 0
    1.5e-6,  # to even, 2 µs
    -5e-7,
    1_700_000_000.123456789,  # nanoseconds beyond microseconds: rounded as datetime rounds them
    1_700_000_000.9999996,  # rounds up to the next second
    -62_135_596_800.0,  # 0001-01-01T00:00:00Z, the first time a datetime holds
    253_402_300_799.0,  # 9999-12-31T23:59:59Z
    math.nan,  # (not a time: the epoch, as before)
    math.inf,
    -math.inf,
]


@pytest.mark.parametrize("seconds", TIMES)
def test_timestamps_are_written_as_from_datetime_wrote_them(seconds: float) -> None:
    ours = pb.VariableUpdate(update_type="x", timestamp=timestamp(seconds))
    theirs = pb.VariableUpdate(update_type="x", timestamp=_old_timestamp(seconds))
    assert ours.timestamp == theirs.timestamp
    assert serialize(ours) == bytes(theirs)
    assert timestamp(seconds) is timestamp(seconds) or not math.isfinite(seconds)  # (kept: see _moments)
    assert seconds_of(parse(pb.VariableUpdate, serialize(ours)).timestamp) == seconds_of(
        pb.VariableUpdate.parse(bytes(theirs)).timestamp
    )


@settings(max_examples=500, deadline=None)
@given(seconds=st.floats(-62_135_596_800.0, 253_402_300_799.0))
def test_timestamps_both_ways(seconds: float) -> None:
    """Written as betterproto2 wrote the datetime of the old ``timestamp()``; read back to the seconds
    betterproto2's reading gave."""
    theirs = pb.VariableUpdate(timestamp=_old_timestamp(seconds))
    written = serialize(pb.VariableUpdate(timestamp=timestamp(seconds)))
    assert written == bytes(theirs)
    assert seconds_of(parse(pb.VariableUpdate, written).timestamp) == seconds_of(
        pb.VariableUpdate.parse(written).timestamp
    )


@pytest.mark.parametrize("seconds", [253_402_300_800.0, 1e18, -62_135_596_801.0, -1e18])
def test_times_a_timestamp_cannot_hold_fail_as_before(seconds: float) -> None:
    with pytest.raises((ValueError, OverflowError, OSError)) as before:
        _old_timestamp(seconds)
    with pytest.raises(type(before.value), match=re.escape(str(before.value))):
        timestamp(seconds)


@pytest.mark.parametrize(
    "moment",
    [
        datetime.datetime(
            2024, 5, 17, 8, 30, 1, 250_001, tzinfo=datetime.timezone(datetime.timedelta(hours=5.5))
        ),
        datetime.datetime(1, 1, 1, 5, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=5))),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=datetime.UTC),
        datetime.datetime(1, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=datetime.UTC),
    ],
)
def test_any_aware_datetime_is_written_as_betterproto2_writes_it(moment: datetime.datetime) -> None:
    message = pb.PingResponse(server_time=moment)
    assert serialize(message) == bytes(message)


def test_a_naive_datetime_is_refused_as_betterproto2_refuses_it() -> None:
    message = pb.PingResponse(server_time=datetime.datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone aware"):
        bytes(message)
    with pytest.raises(ValueError, match="timezone aware"):
        serialize(message)


def test_the_kept_times_are_bounded() -> None:
    start = 1_000_000_000.0
    for index in range(max(_encoding.MOMENTS_KEPT, _wire.TIMESTAMPS_KEPT) + 10):
        serialize(pb.VariableUpdate(timestamp=timestamp(start + index / 1000)))
    assert 0 < len(_encoding._moments) <= _encoding.MOMENTS_KEPT
    assert 0 < len(_wire._timestamps) <= _wire.TIMESTAMPS_KEPT
    assert serialize(pb.VariableUpdate(timestamp=timestamp(start))) == bytes(
        pb.VariableUpdate(timestamp=_old_timestamp(start))
    )

"""The value encoding: every type packs into an Any that stock protobuf unpacks, and bad payloads are
refused with INVALID_ARGUMENT instead of being misread."""

from __future__ import annotations

import struct

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from trio_bridge import InvalidArgument, Tensor, VariableType
from trio_bridge._encoding import pack_value, type_url_for, unpack_value
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

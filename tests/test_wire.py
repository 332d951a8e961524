"""``_wire.serialize`` writes exactly the bytes betterproto2 writes, for every generated message type,
and writes them itself: no field of any message the server sends falls back to betterproto2's
serializer (or to the generated ``Timestamp.from_datetime``)."""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import betterproto2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import MESSAGE_TYPES, messages
from trio_bridge._wire import serialize
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google import protobuf as wkt

T = TypeVar("T")

#: betterproto2's own code, and the generated messages' (``Timestamp.from_datetime``, ...).
LIBRARY_CODE = (
    str(Path(betterproto2.__file__).parent),
    str(Path(wkt.__file__).parent.parent.parent),  # trio_bridge/proto
)

#: Every message the server sends: each RPC's response, the watch stream's update, the write stream's.
SENT_BY_THE_SERVER = sorted(
    {handler.reply_type for handler in pb.UnifiedBridgeBase().__mapping__().values()}
    | {pb.VariableUpdate, pb.WriteResult, pb.WrittenVersion},
    key=lambda cls: cls.__qualname__,
)


def calls_into_library(function: Callable[[], T]) -> tuple[T, list[str]]:
    """``function()``, and the Python functions of betterproto2 or of the generated code it called."""
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(LIBRARY_CODE):
            called.append(f"{frame.f_code.co_qualname} ({Path(frame.f_code.co_filename).name})")

    sys.setprofile(profile)
    try:
        result = function()
    finally:
        sys.setprofile(None)
    return result, called


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_serialize_matches_betterproto2(cls: type[betterproto2.Message], data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    assert serialize(message) == bytes(message)


def test_every_message_the_server_sends_is_covered() -> None:
    names = {cls.__qualname__ for cls in SENT_BY_THE_SERVER}
    assert {"SetVariableResponse", "SetVariablesResponse", "VariableUpdate", "WriteResult"} <= names
    assert {"WrittenVersion", "Variable", "Session", "Any", "Constraints"} <= {
        c.__qualname__ for c in MESSAGE_TYPES
    }


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_serialize_never_falls_back_to_betterproto2(
    cls: type[betterproto2.Message], data: st.DataObject
) -> None:
    """Repeated messages, maps, optional fields, Timestamps, Any, packed numbers, nested to depth 3: all
    written by ``_wire`` itself, byte for byte what betterproto2 writes."""
    message = data.draw(messages(cls, depth=3))
    expected = bytes(message)
    serialize(message)  # (the first message of a class learns its layout, with betterproto2's help)
    written, called = calls_into_library(lambda: serialize(message))
    assert called == []
    assert written == expected


def test_the_server_s_hot_messages_are_written_by_wire() -> None:
    moment = datetime.datetime(2024, 5, 17, 8, 30, 1, 250_001, tzinfo=datetime.UTC)
    variable = pb.Variable(
        id="v1",
        name="temperature",
        type=pb.VariableType.FLOAT,
        value=wkt.Any(
            type_url="type.googleapis.com/google.protobuf.DoubleValue",
            value=b"\t\x00\x00\x00\x00\x00\x00\xf0?",
        ),
        constraints=pb.Constraints(minimum=0.0, allowed_values=["a", "b"], shape=[2, 3]),
        metadata={"unit": "K", "": ""},
        version=3,
        created_at=datetime.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=datetime.UTC),
        last_updated_at=moment,
        session_id="s",
        last_update_source="probe",
    )
    messages_sent: list[betterproto2.Message] = [
        pb.SetVariableResponse(variable=variable),
        pb.SetVariablesResponse(variables=[variable, pb.Variable(), variable]),
        pb.VariableUpdate(variable_id="v1", variable=variable, old_value=wkt.Any(), timestamp=moment),
        pb.WriteResult(
            request_id=7, variables=[variable], written=[pb.WrittenVersion("v1", 3, 9)], details={"a": "b"}
        ),
        pb.WriteResult(status=10, message="conflict", written=[pb.WrittenVersion()]),
    ]
    for message in messages_sent:
        expected = bytes(message)
        serialize(message)
        written, called = calls_into_library(lambda: serialize(message))  # noqa: B023
        assert called == [], type(message).__qualname__
        assert written == expected, type(message).__qualname__


def test_the_hot_messages_round_trip() -> None:
    variable = pb.Variable(id="v1", name="temperature", type=pb.VariableType.FLOAT, version=3)
    update = pb.VariableUpdate(variable_id="v1", variable=variable, update_type="value_change")
    assert pb.VariableUpdate.parse(serialize(update)) == update
    assert serialize(pb.VariableUpdate()) == b""

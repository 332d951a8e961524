"""``_wire.serialize`` writes exactly the bytes betterproto2 writes, for every generated message type."""

from __future__ import annotations

import betterproto2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import MESSAGE_TYPES, messages
from trio_bridge._wire import serialize
from trio_bridge.proto import unified_bridge as pb


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__qualname__)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_serialize_matches_betterproto2(cls: type[betterproto2.Message], data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    assert serialize(message) == bytes(message)


def test_the_hot_messages_round_trip() -> None:
    variable = pb.Variable(id="v1", name="temperature", type=pb.VariableType.FLOAT, version=3)
    update = pb.VariableUpdate(variable_id="v1", variable=variable, update_type="value_change")
    assert pb.VariableUpdate.parse(serialize(update)) == update
    assert serialize(pb.VariableUpdate()) == b""

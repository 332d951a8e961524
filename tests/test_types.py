"""Every type's checks and every constraint's failure, without a server."""

from __future__ import annotations

import math
import struct

import pytest

from trio_bridge import Constraints, InvalidArgument, Tensor, VariableType
from trio_bridge._types import check_constraints, check_value

F, I, S, B = VariableType.FLOAT, VariableType.INTEGER, VariableType.STRING, VariableType.BOOLEAN
C, M, E, T = VariableType.CHOICE, VariableType.MODULE, VariableType.EMBEDDING, VariableType.TENSOR

COLORS = Constraints(allowed_values=("red", "green"))


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


@pytest.mark.parametrize(
    ("vtype", "constraints", "value", "expected"),
    [
        (F, Constraints(), 3, 3.0),
        (F, Constraints(minimum=0, maximum=1), 0.5, 0.5),
        (F, Constraints(), math.inf, math.inf),
        (I, Constraints(minimum=-5, maximum=5), -5, -5),
        (I, Constraints(), 2**63 - 1, 2**63 - 1),
        (S, Constraints(min_length=1, max_length=3, pattern="[a-z]+"), "abc", "abc"),
        (B, Constraints(), False, False),
        (C, COLORS, "green", "green"),
        (M, Constraints(allowed_values=("Predict", "ChainOfThought")), "Predict", "Predict"),
        (E, Constraints(dimension=3), [1, 2.5, -1], (1.0, 2.5, -1.0)),
        (T, Constraints(shape=(2,), dtype="float32"), Tensor((2,), "float32", f32(1, 2)), None),
        (T, Constraints(), Tensor((0, 3), "int64", b""), None),
    ],
)
def test_accepted_values_come_back_native(
    vtype: VariableType, constraints: Constraints, value: object, expected: object
) -> None:
    check_constraints("v", vtype, constraints)
    result = check_value("v", vtype, constraints, value)
    assert result == (value if expected is None else expected)
    assert type(result) is type(value if expected is None else expected)


@pytest.mark.parametrize(
    ("vtype", "constraints", "value", "rule"),
    [
        (F, Constraints(), "1.0", "expects a number"),
        (F, Constraints(), True, "expects a number"),
        (F, Constraints(), math.nan, "NaN"),
        (F, Constraints(minimum=0.0), -0.5, "below minimum 0.0"),
        (F, Constraints(maximum=1.0), 1.5, "above maximum 1.0"),
        (I, Constraints(), 1.0, "expects an integer"),
        (I, Constraints(), False, "expects an integer"),
        (I, Constraints(), 2**63, "64-bit"),
        (I, Constraints(minimum=10), 9, "below minimum 10"),
        (I, Constraints(maximum=10), 11, "above maximum 10"),
        (S, Constraints(), 5, "expects a string"),
        (S, Constraints(min_length=2), "a", "shorter than min_length 2"),
        (S, Constraints(max_length=2), "abc", "longer than max_length 2"),
        (S, Constraints(pattern="[0-9]+"), "12a", "does not match pattern '[0-9]+'"),
        (B, Constraints(), 1, "expects a boolean"),
        (C, COLORS, "blue", "not one of the allowed values ['red', 'green']"),
        (C, COLORS, 3, "expects a string"),
        (M, Constraints(allowed_values=("Predict",)), "Other", "not one of the allowed values"),
        (E, Constraints(), "abc", "expects a sequence of numbers"),
        (E, Constraints(), [1, "x"], "element 1 is not a number"),
        (E, Constraints(), [1, math.inf], "element 1 is inf"),
        (E, Constraints(dimension=3), [1.0, 2.0], "has 2 values but the dimension constraint is 3"),
        (T, Constraints(), [1, 2], "expects a Tensor"),
        (T, Constraints(), Tensor((2,), "complex64", b""), "dtype 'complex64' is not one of"),
        (T, Constraints(), Tensor((2,), "float32", b"\x00" * 7), "needs 8 bytes of data, got 7"),
        (T, Constraints(), Tensor((-1,), "int8", b""), "negative dimension"),
        (T, Constraints(shape=(3,)), Tensor((2,), "int8", b"ab"), "differs from the shape constraint [3]"),
        (T, Constraints(dtype="uint8"), Tensor((2,), "int8", b"ab"), "differs from the dtype constraint"),
    ],
)
def test_refused_values_name_variable_rule_and_value(
    vtype: VariableType, constraints: Constraints, value: object, rule: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_value("speed", vtype, constraints, value)
    message = str(caught.value)
    assert message.startswith(f"variable 'speed' ({vtype.label})")
    assert rule in message


@pytest.mark.parametrize(
    ("vtype", "constraints", "rule"),
    [
        (S, Constraints(minimum=1), "'minimum' applies only to float, integer"),
        (F, Constraints(pattern="x"), "'pattern' applies only to string"),
        (I, Constraints(allowed_values=("a",)), "'allowed_values' applies only to choice, module"),
        (F, Constraints(dimension=3), "'dimension' applies only to embedding"),
        (E, Constraints(shape=(1,)), "'shape' applies only to tensor"),
        (F, Constraints(minimum=2, maximum=1), "minimum 2 is above maximum 1"),
        (F, Constraints(minimum=math.nan), "'minimum' is NaN"),
        (S, Constraints(min_length=3, max_length=2), "min_length 3 is above max_length 2"),
        (S, Constraints(pattern="("), "not a valid RE2 regular expression"),
        (S, Constraints(pattern=r"(a)\1"), "no backreferences or lookaround"),
        (C, Constraints(), "needs a non-empty 'allowed_values'"),
        (M, Constraints(allowed_values=("a", "a")), "lists a value twice"),
        (T, Constraints(dtype="str"), "dtype 'str' is not one of"),
    ],
)
def test_refused_constraints(vtype: VariableType, constraints: Constraints, rule: str) -> None:
    with pytest.raises(InvalidArgument, match="variable 'v'") as caught:
        check_constraints("v", vtype, constraints)
    assert rule in str(caught.value)


def test_a_catastrophic_pattern_matches_in_linear_time() -> None:
    # With Python's re, (a+)+$ against 'a' * 40 + '!' backtracks 2^40 times: a stalled server.
    constraints = Constraints(pattern="(a+)+$")
    check_constraints("s", VariableType.STRING, constraints)
    with pytest.raises(InvalidArgument, match="does not match pattern"):
        check_value("s", VariableType.STRING, constraints, "a" * 100_000 + "!")
    assert check_value("s", VariableType.STRING, constraints, "a" * 100_000) == "a" * 100_000


def test_an_integer_out_of_range_is_refused_before_it_is_packed() -> None:
    # Packed, 2**63 wrapped around to -2**63: the client (and the web view) stored a wrong number.
    from trio_bridge._types import native_value

    for value in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(InvalidArgument, match=f"integer: value {value} does not fit in a signed 64-bit"):
            native_value(VariableType.INTEGER, value)
    assert native_value(VariableType.INTEGER, 2**63 - 1) == 2**63 - 1

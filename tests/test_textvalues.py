"""Values as typed and shown on the command line: one-line parse errors that name the variable, its type
and a valid example; embeddings and float32/float16 tensor data shown in their shortest exact form."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from trio_bridge import Tensor, VariableType
from trio_bridge._textvalues import parse_value, plain_value, show_value

F, I, S, B = VariableType.FLOAT, VariableType.INTEGER, VariableType.STRING, VariableType.BOOLEAN
E, T = VariableType.EMBEDDING, VariableType.TENSOR

EMBEDDING_EXAMPLE = "(for example: [0.1, 0.2] or 0.1,0.2)"
TENSOR_EXAMPLE = '(for example: {"shape": [2], "dtype": "float32", "data": [1, 2]})'
DTYPES = "bool, int8, uint8, int16, int32, int64, float16, float32, float64"


def f32(value: float) -> float:
    """``value`` rounded to float32, as an embedding's elements travel."""
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


@pytest.mark.parametrize(
    ("vtype", "text", "message"),
    [
        (F, "22,5", "value '22,5' for float variable 'v' is not a number (for example: 21.5)"),
        (F, "", "value '' for float variable 'v' is not a number (for example: 21.5)"),
        (I, "1.5", "value '1.5' for integer variable 'v' is not an integer (for example: 42)"),
        (I, "forty", "value 'forty' for integer variable 'v' is not an integer (for example: 42)"),
        (
            B,
            "maybe",
            "value 'maybe' for boolean variable 'v' is not one of true/false, 1/0, yes/no, on/off (for example: true)",
        ),
        (
            E,
            "0.1,x",
            f"value '0.1,x' for embedding variable 'v' is not a list of numbers: element 1 is 'x' {EMBEDDING_EXAMPLE}",
        ),
        (
            E,
            "[0.1, true]",
            f"value '[0.1, true]' for embedding variable 'v' is not a list of numbers: element 1 is true {EMBEDDING_EXAMPLE}",
        ),
        (
            E,
            '[0.1, "x"]',
            f"value '[0.1, \"x\"]' for embedding variable 'v' is not a list of numbers: element 1 is \"x\" {EMBEDDING_EXAMPLE}",
        ),
        (
            E,
            "[[1]]",
            f"value '[[1]]' for embedding variable 'v' is not a list of numbers: element 0 is [1] {EMBEDDING_EXAMPLE}",
        ),
        (
            E,
            "[0.1,",
            f"value '[0.1,' for embedding variable 'v' is not a list of numbers: bad JSON: Expecting value: line 1 column 6 (char 5) {EMBEDDING_EXAMPLE}",
        ),
        (
            T,
            "[1, 2]",
            f'value \'[1, 2]\' for tensor variable \'v\' is not a tensor: it needs "shape", "dtype" and "data" {TENSOR_EXAMPLE}',
        ),
        (
            T,
            "{",
            f"value '{{' for tensor variable 'v' is not a tensor: bad JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1) {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [2], "dtype": "float32"}',
            f'for tensor variable \'v\' is not a tensor: it needs "shape", "dtype" and "data" {TENSOR_EXAMPLE}',
        ),
        (
            T,
            '{"shape": ["a"], "dtype": "int8", "data": [1]}',
            f'is not a tensor: its shape is not a list of whole numbers: ["a"] {TENSOR_EXAMPLE}',
        ),
        (
            T,
            '{"shape": [-1], "dtype": "int8", "data": []}',
            f"is not a tensor: its shape is not a list of whole numbers: [-1] {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [2], "dtype": "complex64", "data": [1, 2]}',
            f'is not a tensor: dtype "complex64" is not one of {DTYPES} {TENSOR_EXAMPLE}',
        ),
        (
            T,
            '{"shape": [2, 2], "dtype": "int8", "data": [1, 2, 3]}',
            f"is not a tensor: shape [2, 2] needs 4 values, got 3 {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [2], "dtype": "int8", "data": [1, 300]}',
            f"is not a tensor: element 1 of data, 300, does not fit in int8 {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [2], "dtype": "uint8", "data": [-1, 3]}',
            f"is not a tensor: element 0 of data, -1, does not fit in uint8 {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [1], "dtype": "int32", "data": [1.5]}',
            f"is not a tensor: element 0 of data, 1.5, is not an integer {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [1], "dtype": "float16", "data": [1e6]}',
            f"is not a tensor: element 0 of data, 1000000.0, does not fit in float16 {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [1], "dtype": "float32", "data": ["x"]}',
            f'is not a tensor: element 0 of data, "x", is not a number {TENSOR_EXAMPLE}',
        ),
        (
            T,
            '{"shape": [1], "dtype": "float32", "data": [true]}',
            f"is not a tensor: element 0 of data, true, is not a number {TENSOR_EXAMPLE}",
        ),
        (
            T,
            '{"shape": [1], "dtype": "bool", "data": [2]}',
            f"is not a tensor: element 0 of data, 2, is not true/false {TENSOR_EXAMPLE}",
        ),
    ],
)
def test_parse_errors_name_the_variable_its_type_and_an_example_on_one_line(
    vtype: VariableType, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=r"^value ") as caught:
        parse_value(vtype, text, name="v")
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"value {text!r} for {vtype.label} variable 'v' ")
    assert "\n" not in str(caught.value)


def test_without_a_name_the_message_names_the_type_and_the_call_is_as_before() -> None:
    with pytest.raises(
        ValueError, match=r"^value '22,5' for a float variable is not a number \(for example: 21\.5\)$"
    ):
        parse_value(F, "22,5")
    with pytest.raises(
        ValueError, match=r"^value '1\.5' for an integer variable is not an integer \(for example: 42\)$"
    ):
        parse_value(I, "1.5")
    with pytest.raises(ValueError, match=r"^value 'x' for an embedding variable is not a list of numbers"):
        parse_value(E, "x")
    with pytest.raises(ValueError, match=r"^value '22,5' for float variable 'temperature' is not a number"):
        parse_value(F, "22,5", "temperature")


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^value '9999") as caught:
        parse_value(F, "9" * 500 + "x", name="v")
    assert len(str(caught.value)) < 150
    assert "..." in str(caught.value)


@pytest.mark.parametrize(
    ("vtype", "text", "value"),
    [
        (F, " 21.5 ", 21.5),
        (I, "-42", -42),
        (B, "On", True),
        (B, "0", False),
        (S, "22,5", "22,5"),
        (E, "0.1, 0.2", (0.1, 0.2)),
        (E, "[1, 2.5]", (1.0, 2.5)),
        (E, "[]", ()),
        (
            T,
            '{"shape": [2], "dtype": "float32", "data": [1, 2]}',
            Tensor((2,), "float32", struct.pack("<2f", 1, 2)),
        ),
        (
            T,
            '{"shape": [3], "dtype": "bool", "data": [true, false, 1]}',
            Tensor((3,), "bool", b"\x01\x00\x01"),
        ),
        (T, '{"shape": [1, 2], "dtype": "uint8", "data": [0, 255]}', Tensor((1, 2), "uint8", b"\x00\xff")),
        (
            T,
            '{"shape": [1], "dtype": "float64", "data": [Infinity]}',
            Tensor((1,), "float64", struct.pack("<d", math.inf)),
        ),
    ],
)
def test_good_values_parse_as_before(vtype: VariableType, text: str, value: object) -> None:
    assert parse_value(vtype, text) == value


def test_embeddings_show_the_shortest_form_that_round_trips_through_float32() -> None:
    stored = tuple(f32(x) for x in (0.1, 0.2, -1.5, 1e-8, 3.4028234663852886e38))
    assert stored[0] == 0.10000000149011612
    assert show_value(E, stored) == "[0.1, 0.2, -1.5, 1e-08, 3.4028235e+38]"
    assert plain_value(E, stored) == [0.1, 0.2, -1.5, 1e-08, 3.4028235e38]
    assert json.dumps(plain_value(E, stored)) == "[0.1, 0.2, -1.5, 1e-08, 3.4028235e+38]"
    # A value that is no float32 (the store's Python API keeps what it is given): shown exactly.
    assert show_value(E, (0.1, 1 / 3)) == "[0.1, 0.3333333333333333]"


def test_float32_and_float16_tensor_data_show_their_shortest_exact_form() -> None:
    data = [0.1, 2.5, -0.0, math.inf, 1e-45]
    float32 = Tensor((5,), "float32", struct.pack("<5f", *data))
    assert (
        show_value(T, float32)
        == '{"shape": [5], "dtype": "float32", "data": [0.1, 2.5, -0.0, Infinity, 1e-45]}'
    )
    float16 = Tensor((2,), "float16", struct.pack("<2e", 0.1, 65504))
    assert plain_value(T, float16)["data"] == [0.1, 65500.0]  # as numpy shows 65504 (float16 max)
    float64 = Tensor((1,), "float64", struct.pack("<d", f32(0.1)))
    assert plain_value(T, float64)["data"] == [0.10000000149011612]
    for tensor in (float32, float16, float64):
        assert parse_value(T, show_value(T, tensor)) == tensor


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
@example(0.11810522526502609)  # a float32 that needs all 9 significant digits: 0.118105225
@example(-1.401298464324817e-45)  # the smallest subnormal, negative
# Powers of two, where what reads back reaches further on one side: 9 digits where numpy shows 8.
@example(2.0**-96)
@example(2.0**87)
@example(2.0**90)
@example(2.0**-12)  # two shortest decimals as near: numpy takes the even one (0.00024414062)
def test_an_embedding_element_shows_as_numpy_shows_a_float32_and_reads_back_the_same(x: float) -> None:
    (shown,) = plain_value(E, (x,))
    assert f32(shown) == x and math.copysign(1, shown) == math.copysign(1, x)
    assert shown == float(str(np.float32(x)))  # numpy's shortest round-tripping form
    assert parse_value(E, show_value(E, (x,))) == (shown,)


@given(st.lists(st.floats(width=16, allow_nan=False), max_size=5))
def test_float16_tensors_read_back_bit_for_bit(values: list[float]) -> None:
    tensor = Tensor((len(values),), "float16", struct.pack(f"<{len(values)}e", *values))
    assert parse_value(T, show_value(T, tensor)) == tensor
    assert plain_value(T, tensor)["data"] == [float(str(np.float16(v))) for v in values]


def test_a_value_beyond_float32s_range_is_shown_as_it_is() -> None:
    # It raised OverflowError (a float64 the store's Python API keeps in an embedding).
    assert plain_value(VariableType.EMBEDDING, (1e39,)) == [1e39]


def test_json_nested_too_deeply_is_a_refusal_not_a_crash() -> None:
    # RecursionError escaped: a traceback on the command line, a 500 from the web view.
    for vtype in (VariableType.EMBEDDING, VariableType.TENSOR):
        with pytest.raises(ValueError, match="nested too deeply"):
            parse_value(vtype, "[" * 100_000 + "]" * 100_000, "x")

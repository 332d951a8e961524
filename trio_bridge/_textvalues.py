"""Values as people type and read them on the command line, per variable type.

=========  ===========================================  ======================================
type       typed as                                      shown as (``--json``: the same, as JSON)
=========  ===========================================  ======================================
float      ``21.5``                                      ``21.5``
integer    ``42``                                        ``42``
string     any text                                      the text (JSON: a string)
boolean    ``true``/``false`` (also 1/0, yes/no, on/off)  ``true``/``false``
choice     one of the allowed values                     the value
module     one of the allowed values                     the value
embedding  ``[0.1, 0.2]`` or ``0.1,0.2``                  ``[0.1, 0.2]`` (see below)
tensor     ``{"shape": [2], "dtype": "float32",          the same JSON object
           "data": [1, 2]}``
=========  ===========================================  ======================================

Embeddings travel as float32, so ``0.1`` comes back as the float32 nearest to it, 0.10000000149011612 as
a Python float. It is shown as the shortest number that reads back as that same float32, ``0.1``, as numpy
shows a float32; likewise the elements of float32 and float16 tensors. No numpy needed.

A text that is no value of the type raises ValueError, one line naming the variable, its type and a valid
value: ``value '22,5' for float variable 'temperature' is not a number (for example: 21.5)``.
"""

from __future__ import annotations

import json
import math
import struct
from decimal import Decimal
from typing import Any

from ._types import DTYPE_SIZES, Tensor, VariableType

_STRUCT_CODES = {
    "bool": "?",
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "int32": "i",
    "int64": "q",
    "float16": "e",
    "float32": "f",
    "float64": "d",
}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
#: A valid value of each type that can be typed wrong, for the error messages.
_EXAMPLES = {
    VariableType.FLOAT: "21.5",
    VariableType.INTEGER: "42",
    VariableType.BOOLEAN: "true",
    VariableType.EMBEDDING: "[0.1, 0.2] or 0.1,0.2",
    VariableType.TENSOR: '{"shape": [2], "dtype": "float32", "data": [1, 2]}',
}
#: The most characters of a value an error message repeats.
_SHOWN_TEXT = 60


class _Refused(Exception):
    """What is wrong with a value's text (the message's end); parse_value adds what it was for."""


def parse_value(vtype: VariableType, text: str, name: str = "") -> Any:
    """The native value ``text`` stands for, as a variable of ``vtype`` (named ``name``, if given).

    Raises ValueError with a one-line message naming the variable, its type and a valid example, e.g.
    ``value '22,5' for float variable 'temperature' is not a number (for example: 21.5)``.
    """
    try:
        return _parse(vtype, text)
    except _Refused as refused:
        shown = text if len(text) <= _SHOWN_TEXT else text[: _SHOWN_TEXT - 3] + "..."
        label = vtype.label
        subject = (
            f"{label} variable {name!r}"
            if name
            else f"{'an' if label[0] in 'aeiou' else 'a'} {label} variable"
        )
        raise ValueError(
            f"value {shown!r} for {subject} {refused} (for example: {_EXAMPLES[vtype]})"
        ) from None


def _parse(vtype: VariableType, text: str) -> Any:
    if vtype is VariableType.FLOAT:
        try:
            return float(text)
        except ValueError:
            raise _Refused("is not a number") from None
    if vtype is VariableType.INTEGER:
        try:
            return int(text)
        except ValueError:
            raise _Refused("is not an integer") from None
    if vtype is VariableType.BOOLEAN:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _Refused("is not one of true/false, 1/0, yes/no, on/off")
    if vtype is VariableType.EMBEDDING:
        return _parse_embedding(text)
    if vtype is VariableType.TENSOR:
        return _parse_tensor(text)
    return text


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError, and int()'s limit on digits
        raise _Refused(f"is not {what}: bad JSON: {exc}") from None
    except RecursionError:
        raise _Refused(f"is not {what}: its JSON is nested too deeply") from None


def _parse_embedding(text: str) -> tuple[float, ...]:
    stripped = text.strip()
    if stripped.startswith("["):
        numbers = []
        for index, item in enumerate(_json(stripped, "a list of numbers")):  # "[..." is a list or bad JSON
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise _Refused(f"is not a list of numbers: element {index} is {json.dumps(item)}")
            numbers.append(float(item))
        return tuple(numbers)
    numbers = []
    for index, piece in enumerate(stripped.split(",")):
        try:
            numbers.append(float(piece))
        except ValueError:
            raise _Refused(f"is not a list of numbers: element {index} is {piece.strip()!r}") from None
    return tuple(numbers)


def _parse_tensor(text: str) -> Tensor:
    spec = _json(text, "a tensor")
    if not isinstance(spec, dict) or not {"shape", "dtype", "data"} <= spec.keys():
        raise _Refused('is not a tensor: it needs "shape", "dtype" and "data"')
    shape, dtype, data = spec["shape"], spec["dtype"], spec["data"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _Refused(f"is not a tensor: its shape is not a list of whole numbers: {json.dumps(shape)}")
    if dtype not in _STRUCT_CODES:
        raise _Refused(f"is not a tensor: dtype {json.dumps(dtype)} is not one of {', '.join(DTYPE_SIZES)}")
    if not isinstance(data, list):
        raise _Refused(f'is not a tensor: its "data" is not a list: {json.dumps(data)}')
    if len(data) != math.prod(shape):
        raise _Refused(f"is not a tensor: shape {shape} needs {math.prod(shape)} values, got {len(data)}")
    code = _STRUCT_CODES[dtype]
    for index, item in enumerate(data):
        problem = _element_problem(dtype, code, item)
        if problem:
            raise _Refused(f"is not a tensor: element {index} of data, {json.dumps(item)}, {problem}")
    return Tensor(tuple(shape), dtype, struct.pack(f"<{len(data)}{code}", *data))


def _element_problem(dtype: str, code: str, item: object) -> str:
    """Why ``item`` cannot be an element of a ``dtype`` tensor ("" if it can)."""
    if dtype == "bool":
        return "" if item in (True, False) and not isinstance(item, float) else "is not true/false"
    if isinstance(item, bool) or not isinstance(item, int | float):
        return "is not a number"
    if dtype.startswith(("int", "uint")) and not isinstance(item, int):
        return "is not an integer"
    try:
        struct.pack(f"<{code}", item)
    except (struct.error, OverflowError):
        return f"does not fit in {dtype}"
    return ""


def _shortest(value: float, code: str, digits: int) -> float:
    """``value`` (a float32 or float16, by struct ``code``, of up to ``digits`` significant digits) as
    the float of fewest significant digits that packs back to the same bits: what numpy shows for it.
    A value that is not of that width, or not finite, comes back as it is."""
    if not math.isfinite(value):
        return value
    try:
        bits = struct.pack(f"<{code}", value)
    except OverflowError:
        return value  # beyond the width's range: not of that width
    if struct.unpack(f"<{code}", bits)[0] != value:
        return value  # not of that width (the store's Python API keeps any float): shown exactly
    for precision in range(1, digits + 1):
        # The nearest decimal of this many digits, and its neighbours in the last digit: at a power of
        # two the values that read back as these bits reach further on one side than the other.
        mantissa, exponent = f"{abs(value):.{precision - 1}e}".split("e")
        nearest = int(mantissa.replace(".", ""))
        exact = Decimal(abs(value))
        scale = int(exponent) - (precision - 1)
        fits = [
            (abs(Decimal(f"{n}e{scale}") - exact), n % 2, candidate)  # the nearest; a tie to even
            for n in (nearest, nearest - 1, nearest + 1)
            if _packs_to(candidate := math.copysign(float(f"{n}e{scale}"), value), code, bits)
        ]
        if fits:
            return min(fits)[2]
    return value


def _packs_to(candidate: float, code: str, bits: bytes) -> bool:
    try:
        return struct.pack(f"<{code}", candidate) == bits
    except OverflowError:  # rounded up past the largest finite value
        return False


#: The narrow float dtypes: their struct code and the significant digits that always round-trip.
_NARROW_FLOATS = {"float32": ("f", 9), "float16": ("e", 5)}


def tensor_elements(tensor: Tensor) -> tuple[Any, ...]:
    """A tensor's elements, flat, as Python numbers (bools for ``bool``), as stored: no rounding to
    the shortest form (``plain_value`` does that, at a cost per element)."""
    return struct.unpack(f"<{math.prod(tensor.shape)}{_STRUCT_CODES[tensor.dtype]}", tensor.data)


def plain_value(vtype: VariableType, value: Any) -> Any:
    """A JSON-ready form of a native value (tensors unpacked to their elements). Embedding elements and
    float32/float16 tensor elements are the shortest floats that read back as the same float32/float16
    (``0.1``, not ``0.10000000149011612``), as numpy shows them."""
    if vtype is VariableType.EMBEDDING:  # float32 on the wire
        return [_shortest(x, "f", 9) for x in value]
    if vtype is VariableType.TENSOR:
        count = math.prod(value.shape)
        data = list(struct.unpack(f"<{count}{_STRUCT_CODES[value.dtype]}", value.data))
        if value.dtype in _NARROW_FLOATS:
            code, digits = _NARROW_FLOATS[value.dtype]
            data = [_shortest(x, code, digits) for x in data]
        return {"shape": list(value.shape), "dtype": value.dtype, "data": data}
    return value


def show_value(vtype: VariableType, value: Any) -> str:
    """A native value as a person reads it."""
    plain = plain_value(vtype, value)
    if isinstance(plain, str):
        return plain
    return json.dumps(plain)

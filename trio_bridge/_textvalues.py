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
embedding  ``[0.1, 0.2]`` or ``0.1,0.2``                  ``[0.1, 0.2]``
tensor     ``{"shape": [2], "dtype": "float32",          the same JSON object
           "data": [1, 2]}``
=========  ===========================================  ======================================
"""

from __future__ import annotations

import json
import math
import struct
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


def parse_value(vtype: VariableType, text: str) -> Any:
    """The native value ``text`` stands for, as a variable of ``vtype``; ValueError says what is wrong."""
    if vtype is VariableType.FLOAT:
        return float(text)
    if vtype is VariableType.INTEGER:
        return int(text)
    if vtype is VariableType.BOOLEAN:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    if vtype is VariableType.EMBEDDING:
        stripped = text.strip()
        items = json.loads(stripped) if stripped.startswith("[") else stripped.split(",")
        return tuple(float(item) for item in items)
    if vtype is VariableType.TENSOR:
        return _parse_tensor(text)
    return text


def _parse_tensor(text: str) -> Tensor:
    try:
        spec = json.loads(text)
        shape = tuple(int(d) for d in spec["shape"])
        dtype = str(spec["dtype"])
        data = list(spec["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f'a tensor is JSON like {{"shape": [2], "dtype": "float32", "data": [1, 2]}} ({exc})'
        ) from None
    if dtype not in _STRUCT_CODES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
    if len(data) != math.prod(shape):
        raise ValueError(f"shape {list(shape)} needs {math.prod(shape)} values, got {len(data)}")
    return Tensor(shape, dtype, struct.pack(f"<{len(data)}{_STRUCT_CODES[dtype]}", *data))


def plain_value(vtype: VariableType, value: Any) -> Any:
    """A JSON-ready form of a native value (tensors unpacked to their elements)."""
    if vtype is VariableType.EMBEDDING:
        return list(value)
    if vtype is VariableType.TENSOR:
        count = math.prod(value.shape)
        data = list(struct.unpack(f"<{count}{_STRUCT_CODES[value.dtype]}", value.data))
        return {"shape": list(value.shape), "dtype": value.dtype, "data": data}
    return value


def show_value(vtype: VariableType, value: Any) -> str:
    """A native value as a person reads it."""
    plain = plain_value(vtype, value)
    if isinstance(plain, str):
        return plain
    return json.dumps(plain)

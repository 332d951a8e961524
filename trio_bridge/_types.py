"""Variable types, their constraints and the checks a value must pass. Pure Python, no I/O.

Native values by type: float → ``float``, integer → ``int`` (64-bit signed), string → ``str``,
boolean → ``bool``, choice and module → ``str`` (one of the allowed values), embedding →
``tuple[float, ...]``, tensor → :class:`Tensor`. :func:`check_value` turns an accepted input into that
form or raises :class:`~trio_bridge._errors.InvalidArgument` naming the variable, the rule and the value.

numpy (the optional extra ``trio-bridge[numpy]``): a tensor or an embedding may also be given as a
``numpy.ndarray``, and a float, integer or boolean as a numpy scalar; :func:`native_value` and
:func:`check_value` convert them. Arrays are recognised by their class, without importing numpy: this
module imports numpy only when a caller passed numpy objects, or asks for one (:meth:`Tensor.to_numpy`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ._errors import InvalidArgument

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: Tensor element types and their size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
}


class VariableType(enum.IntEnum):
    """The value types a variable can have; the numbers are those of the proto enum."""

    FLOAT = 1
    INTEGER = 2
    STRING = 3
    BOOLEAN = 4
    CHOICE = 5
    MODULE = 6
    EMBEDDING = 7
    TENSOR = 8

    @property
    def label(self) -> str:
        return self._name_.lower()  # (not ``name``: enum's property for it is slow, and this is per write)


def _import_numpy(purpose: str) -> Any:
    """numpy, or an ImportError that says how to install it (the extra ``trio-bridge[numpy]``)."""
    try:
        import numpy
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs numpy, which is not installed: pip install 'trio-bridge[numpy]'"
        ) from exc
    return numpy


@dataclass(frozen=True, slots=True)
class Tensor:
    """A dense array: ``data`` holds the elements row-major, little-endian, with no padding."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

    @classmethod
    def from_numpy(cls, array: Any) -> Tensor:
        """The tensor of a ``numpy.ndarray`` (or numpy scalar, or anything ``numpy.asarray`` takes) of one of
        the :data:`DTYPE_SIZES` dtypes, whatever its memory layout or byte order. Raises
        :class:`~trio_bridge._errors.InvalidArgument` naming any other dtype (complex64, object, ...)."""
        if _numpy_kind(array) is None:
            array = _import_numpy("Tensor.from_numpy").asarray(array)
        return _tensor_from_array("Tensor.from_numpy", array)

    def to_numpy(self) -> Any:
        """A new, writable ``numpy.ndarray`` of this tensor's shape and dtype (in the machine's byte order).

        Needs numpy (``pip install 'trio-bridge[numpy]'``); raises ImportError saying so otherwise.
        """
        numpy = _import_numpy("Tensor.to_numpy")
        dtype = numpy.dtype(self.dtype)
        return numpy.frombuffer(self.data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(self.shape)


#: Classes that are certainly not numpy's: no need to look through their bases.
_NOT_NUMPY = frozenset({bool, int, float, str, bytes, tuple, list, dict, Tensor, type(None)})


def _numpy_kind(value: object) -> str | None:
    """What ``value`` is to numpy: "array" for a ``numpy.ndarray`` (or a subclass), "scalar" for a numpy
    scalar (``numpy.float32(1)``), else None. Found from the class's bases, without importing numpy."""
    cls = type(value)
    if cls in _NOT_NUMPY:
        return None
    for base in cls.__mro__:
        if base.__module__ == "numpy":
            if base.__name__ == "ndarray":
                return "array"
            if base.__name__ == "generic":
                return "scalar"
    return None


def _tensor_from_array(where: str, array: Any) -> Tensor:
    """The tensor of a numpy array or scalar; ``where`` starts the message of a refusal."""
    name = array.dtype.name  # "float32" whatever the byte order
    if name not in DTYPE_SIZES or array.dtype.kind not in "biuf":
        raise InvalidArgument(
            f"{where}: numpy dtype {name!r} is not supported (a tensor holds one of {', '.join(DTYPE_SIZES)})"
        )
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return Tensor(tuple(int(d) for d in array.shape), name, little.tobytes(order="C"))


def _embedding_from_array(where: str, array: Any) -> tuple[float, ...]:
    """The elements of a 1-D numpy array of real numbers, as Python floats."""
    if _numpy_kind(array) != "array" or array.ndim != 1:
        got = (
            f"a {array.ndim}-D array of shape {tuple(array.shape)}"
            if _numpy_kind(array) == "array"
            else f"a numpy {array.dtype.name} scalar"
        )
        raise InvalidArgument(f"{where}: expects a 1-D array of numbers, got {got}")
    if array.dtype.kind not in "iuf":
        raise InvalidArgument(
            f"{where}: numpy dtype {array.dtype.name!r} is not a real number type "
            "(an embedding takes an array of floats or integers)"
        )
    return tuple(array.astype("float64").tolist())


def _from_numpy(where: str, vtype: VariableType, value: Any) -> Any:
    """``value`` with numpy objects turned into the native form for ``vtype``: an array into a Tensor or
    an embedding's tuple, a numpy scalar or 0-d array into the Python value it holds; a larger array
    for a variable of one value is refused (InvalidArgument). Other values are returned as they are
    (for the checks to accept or refuse)."""
    kind = _numpy_kind(value)
    if kind is None:
        return value
    if vtype is VariableType.TENSOR:
        return _tensor_from_array(where, value)
    if vtype is VariableType.EMBEDDING:
        return _embedding_from_array(where, value)
    if kind == "scalar" or value.ndim == 0:
        return value.item()
    raise InvalidArgument(
        f"{where}: expects one value, got a {value.ndim}-D numpy array of shape {tuple(value.shape)}"
    )


def _plain_number(item: Any) -> Any:
    """An embedding's element: a numpy scalar as the Python number it holds, anything else as it is."""
    return item if type(item) is float or _numpy_kind(item) != "scalar" else item.item()


def native_value(vtype: VariableType, value: Any) -> Any:
    """Accept the obvious Python spellings of a value of ``vtype`` (an int for a float, a list for an
    embedding, a numpy array for a tensor or an embedding, a numpy scalar for a number) as the native form
    the store checks; anything else is left for ``check_value`` to refuse.

    Raises :class:`~trio_bridge._errors.InvalidArgument` for a numpy array that has no such form (a
    complex64 tensor, a 2-D embedding); its message starts with the type's name.
    """
    value = _from_numpy(vtype.label, vtype, value)
    if vtype is VariableType.FLOAT and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if vtype is VariableType.EMBEDDING and not isinstance(value, tuple):
        return tuple(_plain_number(item) for item in value)
    if (
        vtype is VariableType.INTEGER
        and isinstance(value, int)
        and not isinstance(value, bool)
        and not INT64_MIN <= value <= INT64_MAX
    ):  # packed, it would wrap around
        raise InvalidArgument(f"integer: value {value} does not fit in a signed 64-bit integer")
    return value


def approximate_size(value: Any) -> int:
    """About how many bytes of memory a value of any variable type keeps alive (its payload, with
    Python's per-object overhead), in constant time: for budgets, not for billing."""
    if type(value) is float:  # (the commonest, first: this is called several times per write)
        return 32
    if isinstance(value, str):
        return 64 + len(value) * (1 if value.isascii() else 4)
    if isinstance(value, Tensor):
        return 128 + len(value.data) + 8 * len(value.shape)
    if isinstance(value, bytes):
        return 40 + len(value)
    if isinstance(value, tuple):
        return 64 + 32 * len(value)  # a float object and its pointer each
    return 32


def approximate_mapping_size(mapping: Any) -> int:
    """The same for a metadata mapping of strings (O(entries))."""
    return sum(128 + len(key) + len(value) for key, value in mapping.items()) if mapping else 0


@dataclass(frozen=True, slots=True)
class Constraints:
    """The rules a value must keep; each field applies to the types its comment names."""

    minimum: float | None = None  # float, integer
    maximum: float | None = None  # float, integer
    min_length: int | None = None  # string
    max_length: int | None = None  # string
    pattern: str = ""  # string: the whole value must match
    allowed_values: tuple[str, ...] = ()  # choice, module (required)
    dimension: int = 0  # embedding: exact length, 0 for any
    shape: tuple[int, ...] = ()  # tensor: exact shape, () for any
    dtype: str = ""  # tensor: exact dtype, "" for any

    def fields_in_use(self) -> list[str]:
        """Names of the constraint fields that are set (not at their 'no rule' default)."""
        used = []
        if self.minimum is not None:
            used.append("minimum")
        if self.maximum is not None:
            used.append("maximum")
        if self.min_length is not None:
            used.append("min_length")
        if self.max_length is not None:
            used.append("max_length")
        if self.pattern:
            used.append("pattern")
        if self.allowed_values:
            used.append("allowed_values")
        if self.dimension:
            used.append("dimension")
        if self.shape:
            used.append("shape")
        if self.dtype:
            used.append("dtype")
        return used


_APPLIES_TO: dict[str, frozenset[VariableType]] = {
    "minimum": frozenset({VariableType.FLOAT, VariableType.INTEGER}),
    "maximum": frozenset({VariableType.FLOAT, VariableType.INTEGER}),
    "min_length": frozenset({VariableType.STRING}),
    "max_length": frozenset({VariableType.STRING}),
    "pattern": frozenset({VariableType.STRING}),
    "allowed_values": frozenset({VariableType.CHOICE, VariableType.MODULE}),
    "dimension": frozenset({VariableType.EMBEDDING}),
    "shape": frozenset({VariableType.TENSOR}),
    "dtype": frozenset({VariableType.TENSOR}),
}


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    """A ``pattern`` constraint compiled with RE2, whose matching time grows linearly with the value:
    no pattern a client registers can stall the server (Python's ``re`` backtracks, and a pattern
    like ``(a+)+$`` takes exponential time). RE2 has no backreferences or lookaround."""
    import re2  # only the server checks values

    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def check_constraints(name: str, vtype: VariableType, constraints: Constraints) -> None:
    """Refuse constraints that do not apply to ``vtype`` or contradict themselves."""
    where = f"variable {name!r} ({vtype.label})"
    for used in constraints.fields_in_use():
        if vtype not in _APPLIES_TO[used]:
            allowed = ", ".join(sorted(t.label for t in _APPLIES_TO[used]))
            raise InvalidArgument(f"{where}: constraint {used!r} applies only to {allowed}")
    for bound in ("minimum", "maximum"):
        value = getattr(constraints, bound)
        if value is not None and math.isnan(value):
            raise InvalidArgument(f"{where}: constraint {bound!r} is NaN")
    if (
        constraints.minimum is not None
        and constraints.maximum is not None
        and constraints.minimum > constraints.maximum
    ):
        raise InvalidArgument(
            f"{where}: minimum {constraints.minimum!r} is above maximum {constraints.maximum!r}"
        )
    if (
        constraints.min_length is not None
        and constraints.max_length is not None
        and constraints.min_length > constraints.max_length
    ):
        raise InvalidArgument(
            f"{where}: min_length {constraints.min_length} is above max_length {constraints.max_length}"
        )
    if constraints.pattern:
        try:
            _compiled(constraints.pattern)
        except Exception as exc:  # re2.error, with the reason as bytes
            reason = (
                exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            )
            raise InvalidArgument(
                f"{where}: pattern {constraints.pattern!r} is not a valid RE2 regular expression "
                f"(no backreferences or lookaround): {reason}"
            ) from None
    if vtype in (VariableType.CHOICE, VariableType.MODULE):
        if not constraints.allowed_values:
            raise InvalidArgument(f"{where}: needs a non-empty 'allowed_values' constraint")
        if len(set(constraints.allowed_values)) != len(constraints.allowed_values):
            raise InvalidArgument(f"{where}: 'allowed_values' lists a value twice")
    if constraints.dtype and constraints.dtype not in DTYPE_SIZES:
        raise InvalidArgument(f"{where}: dtype {constraints.dtype!r} is not one of {', '.join(DTYPE_SIZES)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_value(name: str, vtype: VariableType, constraints: Constraints, value: object) -> object:
    """Return ``value`` in its native form for ``vtype``, or raise InvalidArgument.

    The message names the variable, the rule that failed and (shortened) the value.
    """
    where = f"variable {name!r} ({vtype.label})"
    checker = _CHECKERS[vtype]
    return checker(where, constraints, _from_numpy(where, vtype, value))


def _check_number_bounds(where: str, c: Constraints, value: float) -> None:
    if c.minimum is not None and value < c.minimum:
        raise InvalidArgument(f"{where}: value {value!r} is below minimum {c.minimum!r}")
    if c.maximum is not None and value > c.maximum:
        raise InvalidArgument(f"{where}: value {value!r} is above maximum {c.maximum!r}")


def _check_float(where: str, c: Constraints, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{where}: expects a number, got {_short(value)}")
    number = float(value)
    if math.isnan(number):
        raise InvalidArgument(f"{where}: NaN is not accepted (it equals nothing, not even itself)")
    _check_number_bounds(where, c, number)
    return number


def _check_integer(where: str, c: Constraints, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{where}: expects an integer, got {_short(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(f"{where}: value {value} does not fit in a signed 64-bit integer")
    _check_number_bounds(where, c, value)
    return value


def _check_string(where: str, c: Constraints, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expects a string, got {_short(value)}")
    if c.min_length is not None and len(value) < c.min_length:
        raise InvalidArgument(f"{where}: value {_short(value)} is shorter than min_length {c.min_length}")
    if c.max_length is not None and len(value) > c.max_length:
        raise InvalidArgument(f"{where}: value {_short(value)} is longer than max_length {c.max_length}")
    if c.pattern and _compiled(c.pattern).fullmatch(value) is None:
        raise InvalidArgument(f"{where}: value {_short(value)} does not match pattern {c.pattern!r}")
    return value


def _check_boolean(where: str, c: Constraints, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: expects a boolean, got {_short(value)}")
    return value


def _check_allowed(where: str, c: Constraints, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expects a string, got {_short(value)}")
    if value not in c.allowed_values:
        raise InvalidArgument(
            f"{where}: value {_short(value)} is not one of the allowed values {list(c.allowed_values)!r}"
        )
    return value


def _check_embedding(where: str, c: Constraints, value: object) -> tuple[float, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidArgument(f"{where}: expects a sequence of numbers, got {_short(value)}")
    numbers: list[float] = []
    for index, item in enumerate(value):
        item = _plain_number(item)
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise InvalidArgument(f"{where}: element {index} is not a number: {_short(item)}")
        if not math.isfinite(item):
            raise InvalidArgument(f"{where}: element {index} is {item!r}; values must be finite")
        numbers.append(float(item))
    if c.dimension and len(numbers) != c.dimension:
        raise InvalidArgument(
            f"{where}: has {len(numbers)} values but the dimension constraint is {c.dimension}"
        )
    return tuple(numbers)


def _check_tensor(where: str, c: Constraints, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise InvalidArgument(f"{where}: expects a Tensor, got {_short(value)}")
    if value.dtype not in DTYPE_SIZES:
        raise InvalidArgument(f"{where}: dtype {value.dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
    if any(d < 0 for d in value.shape):
        raise InvalidArgument(f"{where}: shape {list(value.shape)} has a negative dimension")
    count = math.prod(value.shape)
    expected = count * DTYPE_SIZES[value.dtype]
    if len(value.data) != expected:
        raise InvalidArgument(
            f"{where}: shape {list(value.shape)} of {value.dtype} needs {expected} bytes of data, "
            f"got {len(value.data)}"
        )
    if c.shape and value.shape != c.shape:
        raise InvalidArgument(
            f"{where}: shape {list(value.shape)} differs from the shape constraint {list(c.shape)}"
        )
    if c.dtype and value.dtype != c.dtype:
        raise InvalidArgument(f"{where}: dtype {value.dtype!r} differs from the dtype constraint {c.dtype!r}")
    return value


_CHECKERS = {
    VariableType.FLOAT: _check_float,
    VariableType.INTEGER: _check_integer,
    VariableType.STRING: _check_string,
    VariableType.BOOLEAN: _check_boolean,
    VariableType.CHOICE: _check_allowed,
    VariableType.MODULE: _check_allowed,
    VariableType.EMBEDDING: _check_embedding,
    VariableType.TENSOR: _check_tensor,
}

"""What the web view's pages are sent: sessions, variables and watch updates as JSON-ready dicts.

Values come in two forms: ``text``, exactly as the command line shows them (cut at ``TEXT_CHARS``),
and ``plot``, what a picture needs, bounded whatever the value's size: a number, a state, the bars of
an embedding (at most ``MAX_BARS``, each the mean of the elements it stands for) or the cells of a 2-D
tensor (at most ``MAX_CELLS`` a side, block means). Non-finite floats are sent as None (JSON has none),
their text says which they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import _encoding as enc
from .._textvalues import show_value, tensor_elements
from .._types import Constraints, Tensor, VariableType
from ..proto import unified_bridge as pb
from ..storage import SessionInfo, VariableSnapshot

#: The longest text of a value the page is sent (a longer one is cut, and says so).
TEXT_CHARS = 2_000
#: The most bars an embedding's chart has.
MAX_BARS = 256
#: The most cells a side of a tensor's heatmap has.
MAX_CELLS = 64

_NUMBERS = (VariableType.FLOAT, VariableType.INTEGER)
_STATES = (VariableType.BOOLEAN, VariableType.CHOICE, VariableType.MODULE)


def session_view(info: SessionInfo, *, watchers: int, expires_in: float | None) -> dict[str, Any]:
    """A session as the pages show it: ``watchers`` open watches hold it alive; else it expires in
    ``expires_in`` seconds unless used."""
    return {
        "id": info.session_id,
        "variables": info.variable_count,
        "created_at": info.created_at,
        "last_accessed_at": info.last_accessed_at,
        "ttl_seconds": info.ttl_seconds,
        "expires_in": expires_in,
        "watches": watchers,
        "metadata": dict(info.metadata),
        "owner": info.owner,
    }


def variable_view(snapshot: VariableSnapshot) -> dict[str, Any]:
    """A variable with everything its row shows."""
    return {
        "id": snapshot.id,
        "name": snapshot.name,
        "type": snapshot.type.label,
        "value": value_view(snapshot.type, snapshot.value),
        "version": snapshot.version,
        "created_at": snapshot.created_at,
        "last_updated_at": snapshot.last_updated_at,
        "source": snapshot.last_update_source,
        "constraints": constraints_view(snapshot.constraints),
        "metadata": dict(snapshot.metadata),
    }


def update_view(update: pb.VariableUpdate) -> dict[str, Any]:
    """One update of a watch stream, as the page's live feed receives it."""
    view: dict[str, Any] = {
        "type": update.update_type,
        "variable_id": update.variable_id,
        "source": update.update_source,
        "metadata": dict(update.update_metadata),
        "timestamp": enc.seconds(update.timestamp),
        "revision": update.revision,
    }
    if update.variable is not None:
        snapshot = enc.variable_from_proto(update.variable)
        view["variable"] = variable_view(snapshot)
        if update.old_value is not None:
            old = enc.unpack_value(snapshot.name, snapshot.type, update.old_value)
            view["old_text"] = _text(snapshot.type, old)
            if snapshot.type in _NUMBERS:  # the point before this one, for a sparkline's first
                view["old_number"] = _finite(float(old))
    return view


def value_view(vtype: VariableType, value: Any) -> dict[str, Any]:
    """``text`` and ``plot`` (module doc) of a value: in time linear in its size, with no per-element
    work beyond one C-level pass (a 1 MiB tensor is shown on every open page)."""
    view: dict[str, Any] = {"text": _text(vtype, value)}
    if vtype in _NUMBERS:
        view["plot"] = {"kind": "number", "value": _finite(float(value))}
    elif vtype in _STATES:
        view["plot"] = {"kind": "state", "value": value}
    elif vtype is VariableType.EMBEDDING:
        view["plot"] = {"kind": "bars", "length": len(value), **_bars(value)}
    elif vtype is VariableType.TENSOR:
        view["plot"] = _tensor_plot(value)
    return view


def constraints_view(constraints: Constraints) -> dict[str, Any]:
    """The rules in use, by their proto field names."""
    shown: dict[str, Any] = {}
    for name in constraints.fields_in_use():
        rule = getattr(constraints, name)
        shown[name] = list(rule) if isinstance(rule, tuple) else rule
    return shown


#: Elements of an array written out in its text, at most (the rest is its picture's).
_TEXT_ELEMENTS = 256


def _text(vtype: VariableType, value: Any) -> str:
    if vtype is VariableType.EMBEDDING and len(value) > _TEXT_ELEMENTS:
        shown = show_value(vtype, value[:_TEXT_ELEMENTS])
        text = f"{shown[:-1]}, … ({len(value)} values)]"
    elif vtype is VariableType.TENSOR and math.prod(value.shape) > _TEXT_ELEMENTS:
        text = f"tensor {value.dtype} {list(value.shape)}"  # its elements are the picture's
    else:
        text = show_value(vtype, value)
    if len(text) > TEXT_CHARS:
        text = text[: TEXT_CHARS - 1] + "…"
    return text


def _finite(number: float) -> float | None:
    return number if math.isfinite(number) else None


def _block_mean(values: Sequence[float]) -> float | None:
    """The mean of ``values`` (a non-empty run), None if any is not finite."""
    return _finite(sum(values) / len(values))


def _bars(values: Sequence[float]) -> dict[str, Any]:
    """At most ``MAX_BARS`` bars: each the mean of an equal run of ``values``."""
    count = len(values)
    if count <= MAX_BARS:
        bars = [_finite(float(v)) for v in values]
    else:
        bars = [
            _block_mean(values[i * count // MAX_BARS : (i + 1) * count // MAX_BARS]) for i in range(MAX_BARS)
        ]
    return {"bars": bars, **_range(bars)}


def _range(values: Sequence[float | None]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None]
    return {"min": min(finite) if finite else None, "max": max(finite) if finite else None}


def _tensor_plot(tensor: Tensor) -> dict[str, Any]:
    plot: dict[str, Any] = {"shape": list(tensor.shape), "dtype": tensor.dtype}
    if tensor.dtype == "bool" or not tensor.data:
        return {"kind": "shape", **plot}
    data = tensor_elements(tensor)
    dims = [d for d in tensor.shape if d != 1] or [1]
    if len(dims) == 1:
        return {"kind": "bars", "length": len(data), **plot, **_bars(data)}
    if len(dims) != 2:
        return {"kind": "shape", **plot, **_range([_finite(float(x)) for x in (min(data), max(data))])}
    rows, cols = dims
    out_rows, out_cols = min(rows, MAX_CELLS), min(cols, MAX_CELLS)
    col_bands = [(c * cols // out_cols, (c + 1) * cols // out_cols) for c in range(out_cols)]
    cells: list[list[float | None]] = []
    for r in range(out_rows):
        first, last = r * rows // out_rows, (r + 1) * rows // out_rows
        sums = [0.0] * out_cols
        for i in range(first, last):  # one slice sum per input row and output column: C-level work
            row = data[i * cols : (i + 1) * cols]
            for c, (start, stop) in enumerate(col_bands):
                sums[c] += sum(row[start:stop])
        cells.append(
            [
                _finite(total / ((last - first) * (stop - start)))
                for total, (start, stop) in zip(sums, col_bands, strict=True)
            ]
        )
    return {"kind": "heatmap", **plot, "cells": cells, **_range([x for line in cells for x in line])}


def problem_view(status: str, message: str, **extra: Any) -> dict[str, Any]:
    """A refusal: its gRPC status name and the server's message."""
    return {"status": status, "message": message, **extra}

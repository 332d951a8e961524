"""The numpy extra: tensors and embeddings from and to numpy arrays, through a real server with
BridgeClient and through the store's own Python API; refusals that name the dtype; and no numpy import
unless the caller brought an array."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import trio_asyncio

from trio_bridge import Constraints, InvalidArgument, RunningServer, Tensor, VariableType
from trio_bridge._types import DTYPE_SIZES, check_value, native_value
from trio_bridge.client import BridgeClient

T = TypeVar("T")

SUPPORTED = "bool, int8, uint8, int16, int32, int64, float16, float32, float64"


async def in_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a plain-asyncio coroutine function (what a user's program is) from the Trio test."""
    result: T = await trio_asyncio.aio_as_trio(fn)()
    return result


def sample(dtype: str, seed: int) -> np.ndarray[Any, Any]:
    """A 2x3 array of ``dtype`` holding its extremes (and, for floats, infinities and NaN)."""
    if dtype == "bool":
        return np.array([[True, False, True], [False, bool(seed % 2), True]])
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, seed, info.max - seed]], dtype=dtype)
    return np.array([[0.1 * seed, -2.5, np.inf], [-np.inf, np.nan, np.finfo(dtype).max]], dtype=dtype)


def assert_same_array(got: Any, expected: np.ndarray[Any, Any]) -> None:
    """Same shape, same dtype (in native byte order) and the same elements (NaN equal to NaN)."""
    assert isinstance(got, np.ndarray)
    assert got.shape == expected.shape
    assert got.dtype == np.dtype(expected.dtype.name)
    assert np.array_equal(got, expected, equal_nan=got.dtype.kind == "f")


def awkward(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The same elements as a big-endian, non-contiguous view (every other column of a wider array)."""
    wide = np.repeat(array, 2, axis=1).astype(array.dtype.newbyteorder(">"))
    view = wide[:, ::2]
    assert not view.flags.c_contiguous
    return view


async def test_the_reported_float32_array_registers_as_a_tensor(server: RunningServer, aio_loop: Any) -> None:
    # The issue: AttributeError: 'numpy.dtypes.Float32DType' object has no attribute 'encode'.
    array = np.arange(6, dtype=np.float32).reshape(2, 3)

    async def scenario() -> Any:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session()).session_id
            return (await client.register_variable(session, "t", "tensor", array)).value

    value = await in_asyncio(scenario)
    assert value == Tensor((2, 3), "float32", array.tobytes())
    assert_same_array(value.to_numpy(), array)


@pytest.mark.parametrize("dtype", list(DTYPE_SIZES))
async def test_every_dtype_round_trips_through_register_set_get_and_watch(
    server: RunningServer, aio_loop: Any, dtype: str
) -> None:
    initial, later = sample(dtype, 1), sample(dtype, 2)

    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session()).session_id
            registered = await client.register_variable(session, "t", "tensor", initial)
            assert registered.value.dtype == dtype
            assert_same_array(registered.value.to_numpy(), initial)
            seen: list[str] = []
            async with contextlib.aclosing(client.watch(session, ["t"])) as stream:
                async for event in stream:
                    seen.append(event.kind)
                    if event.kind == "initial_value":
                        assert_same_array(event.variable.value.to_numpy(), initial)
                    if event.kind == "synced":
                        updated = await client.set(session, "t", awkward(later), source="np")
                        assert_same_array(updated.value.to_numpy(), later)
                    if event.kind == "value_change":
                        assert_same_array(event.variable.value.to_numpy(), later)
                        assert_same_array(event.old_value.to_numpy(), initial)
                        break
            assert seen == ["initial_value", "synced", "value_change"]
            assert_same_array((await client.get(session, "t")).value.to_numpy(), later)
            (batch,) = await client.set_many(session, {"t": initial[::-1]})
            assert_same_array(batch.value.to_numpy(), initial[::-1])

    await in_asyncio(scenario)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint8", "int64"])
async def test_embeddings_come_from_1d_arrays_of_numbers(
    server: RunningServer, aio_loop: Any, dtype: str
) -> None:
    first = np.array([0.1, 0.2, 3.0, 4.0], dtype=dtype)
    second = np.array([1.0, 0.0, 0.5, 7.0, 8.0, 9.0, 10.0, 11.0], dtype=dtype)[::2]  # not contiguous

    async def scenario() -> list[tuple[float, ...]]:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session()).session_id
            constraints = Constraints(dimension=4)
            values = [
                (
                    await client.register_variable(session, "e", "embedding", first, constraints=constraints)
                ).value
            ]
            async with contextlib.aclosing(client.watch(session, ["e"])) as stream:
                async for event in stream:
                    if event.kind == "synced":
                        values.append((await client.set(session, "e", second)).value)
                    if event.kind == "value_change":
                        values.append(event.variable.value)
                        break
            values.append((await client.get(session, "e")).value)
            return values

    registered, updated, watched, got = await in_asyncio(scenario)
    assert all(type(v) is tuple and all(type(x) is float for x in v) for v in (registered, updated))
    # Embeddings travel as float32: what comes back is each element rounded to float32.
    assert np.array_equal(np.array(registered, dtype=np.float32), first.astype(np.float32))
    assert updated == watched == got
    assert np.array_equal(np.array(got, dtype=np.float32), second.astype(np.float32))


async def test_numpy_scalars_are_accepted_where_python_numbers_are(
    server: RunningServer, aio_loop: Any
) -> None:
    async def scenario() -> list[Any]:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session()).session_id
            return [
                (await client.register_variable(session, "f", "float", np.float32(1.5))).value,
                (await client.register_variable(session, "i", "integer", np.int64(-7))).value,
                (await client.register_variable(session, "u", "integer", np.uint8(200))).value,
                (await client.register_variable(session, "b", "boolean", np.bool_(True))).value,
                (await client.register_variable(session, "e", "embedding", list(np.arange(3.0)))).value,
                (await client.set(session, "f", np.int16(3))).value,
            ]

    values = await in_asyncio(scenario)
    assert values == [1.5, -7, 200, True, (0.0, 1.0, 2.0), 3.0]
    assert [type(v) for v in values] == [float, int, int, bool, tuple, float]


@pytest.mark.parametrize(
    ("vtype", "value", "message"),
    [
        (
            "tensor",
            np.zeros(3, dtype=np.complex64),
            f"numpy dtype 'complex64' is not supported (a tensor holds one of {SUPPORTED})",
        ),
        (
            "tensor",
            np.array([object(), 1]),
            f"numpy dtype 'object' is not supported (a tensor holds one of {SUPPORTED})",
        ),
        ("tensor", np.zeros(2, dtype=np.longdouble), "numpy dtype 'float128' is not supported"),
        ("tensor", np.array(["a", "b"]), "numpy dtype 'str32' is not supported"),
        (
            "embedding",
            np.zeros((2, 3), dtype=np.float32),
            "expects a 1-D array of numbers, got a 2-D array of shape (2, 3)",
        ),
        ("embedding", np.float32(1.0), "expects a 1-D array of numbers, got a numpy float32 scalar"),
        ("embedding", np.zeros(3, dtype=np.complex128), "numpy dtype 'complex128' is not a real number type"),
        ("embedding", np.array([True, False]), "numpy dtype 'bool' is not a real number type"),
        # A variable of one value: an array of several was a struct.error or numpy's ValueError.
        ("float", np.array([1.5]), "expects one value, got a 1-D numpy array of shape (1,)"),
        ("float", np.array([1.5, 2.5]), "expects one value, got a 1-D numpy array of shape (2,)"),
        ("string", np.array(["a", "b"]), "expects one value, got a 1-D numpy array of shape (2,)"),
    ],
)
async def test_unsupported_arrays_are_refused_before_they_are_sent(
    server: RunningServer, aio_loop: Any, vtype: str, value: Any, message: str
) -> None:
    async def scenario() -> None:
        async with BridgeClient(server.host, server.port) as client:
            session = (await client.create_session()).session_id
            with pytest.raises(InvalidArgument) as caught:
                await client.register_variable(session, "x", vtype, value)
            assert message in str(caught.value)
            assert str(caught.value).startswith(f"{vtype}: ")
            assert await client.list_variables(session) == []

    await in_asyncio(scenario)


async def test_the_stores_python_api_takes_arrays_too(server: RunningServer) -> None:
    store = server.store
    session = (await store.create_session()).session_id
    array = np.arange(6, dtype=np.int16).reshape(3, 2)
    tensor = await store.register_variable(session, "t", VariableType.TENSOR, array)
    assert tensor.value == Tensor((3, 2), "int16", array.astype("<i2").tobytes())
    updated = await store.set_variable(session, "t", awkward(array + 1))
    assert_same_array(updated.value.to_numpy(), array + 1)
    embedding = await store.register_variable(session, "e", VariableType.EMBEDDING, np.array([1, 2.5]))
    assert embedding.value == (1.0, 2.5)
    with pytest.raises(InvalidArgument, match=r"^variable 'c' \(tensor\): numpy dtype 'complex64'"):
        await store.register_variable(session, "c", VariableType.TENSOR, np.zeros(1, dtype=np.complex64))
    with pytest.raises(InvalidArgument, match=r"^variable 'e' \(embedding\): expects a 1-D array"):
        await store.set_variable(session, "e", np.ones((1, 2)))


def test_from_numpy_packs_any_layout_and_byte_order_row_major_little_endian() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    for array in (base, base.T, base[::2, 1::3], np.asfortranarray(base), base.astype(">i4"), awkward(base)):
        tensor = Tensor.from_numpy(array)
        assert tensor.shape == array.shape and tensor.dtype == "int32"
        assert tensor.data == np.ascontiguousarray(array, dtype="<i4").tobytes()
        assert_same_array(tensor.to_numpy(), array)
    assert Tensor.from_numpy(np.float16(1.5)) == Tensor((), "float16", np.float16(1.5).tobytes())
    assert Tensor.from_numpy([[1.0, 2.0]]) == Tensor((1, 2), "float64", np.array([[1.0, 2.0]]).tobytes())
    empty = Tensor.from_numpy(np.zeros((0, 3), dtype=np.uint8))
    assert empty == Tensor((0, 3), "uint8", b"")
    assert_same_array(empty.to_numpy(), np.zeros((0, 3), dtype=np.uint8))
    with pytest.raises(
        InvalidArgument,
        match=rf"^Tensor.from_numpy: numpy dtype 'complex64' is not supported \(a tensor holds one of {SUPPORTED}\)$",
    ):
        Tensor.from_numpy(np.zeros(1, dtype=np.complex64))


def test_to_numpy_gives_a_writable_native_array_of_the_tensors_dtype() -> None:
    tensor = Tensor((2, 2), "float32", np.array([1, 2, 3, 4], dtype="<f4").tobytes())
    array = tensor.to_numpy()
    assert_same_array(array, np.array([[1, 2], [3, 4]], dtype=np.float32))
    assert array.dtype.isnative
    array[0, 0] = 9  # a copy of its own, not a read-only view of the tensor's bytes
    assert tensor.to_numpy()[0, 0] == 1
    assert Tensor.from_numpy(array) != tensor


def test_to_numpy_without_numpy_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)  # as if numpy were not installed
    with pytest.raises(ImportError, match=r"pip install 'trio-bridge\[numpy\]'"):
        Tensor((1,), "int8", b"\x01").to_numpy()
    with pytest.raises(ImportError, match=r"pip install 'trio-bridge\[numpy\]'"):
        Tensor.from_numpy([1, 2])


def test_native_value_and_check_value_convert_arrays_for_tensors_and_embeddings_only() -> None:
    array = np.array([1.0, 2.0], dtype=np.float32)
    tensor = Tensor((2,), "float32", array.tobytes())
    assert native_value(VariableType.TENSOR, array) == tensor
    assert check_value("t", VariableType.TENSOR, Constraints(), array) == tensor
    assert native_value(VariableType.EMBEDDING, array) == (1.0, 2.0)
    assert check_value("e", VariableType.EMBEDDING, Constraints(), array) == (1.0, 2.0)
    with pytest.raises(InvalidArgument, match=r"^string: expects one value, got a 1-D numpy array"):
        native_value(VariableType.STRING, array)
    with pytest.raises(InvalidArgument, match=r"variable 's' \(string\): expects one value, got a 1-D"):
        check_value("s", VariableType.STRING, Constraints(), array)
    # A 0-d array holds one value, as a numpy scalar does.
    assert native_value(VariableType.FLOAT, np.array(1.5)) == 1.5
    assert check_value("f", VariableType.FLOAT, Constraints(), np.array(1.5)) == 1.5


def test_trio_bridge_never_imports_numpy_on_its_own() -> None:
    code = """
import struct, sys
import trio_bridge, trio_bridge.client, trio_bridge._commands
from trio_bridge import Constraints, Tensor, VariableType as V
from trio_bridge._textvalues import parse_value, plain_value, show_value
from trio_bridge._types import check_value, native_value
t = Tensor((2,), "float32", struct.pack("<2f", 1, 2))
for vtype, value in [(V.TENSOR, t), (V.EMBEDDING, [0.1, 2]), (V.FLOAT, 1), (V.INTEGER, 2), (V.BOOLEAN, True)]:
    check_value("v", vtype, Constraints(), native_value(vtype, value))
    show_value(vtype, check_value("v", vtype, Constraints(), value))
for vtype, text in [(V.TENSOR, '{"shape": [1], "dtype": "float16", "data": [0.1]}'), (V.EMBEDDING, "0.1,0.2")]:
    plain_value(vtype, parse_value(vtype, text))
print("numpy" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"

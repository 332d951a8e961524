"""docs/protocol.md runs as written: its grpcio client (stubs generated with grpcio-tools), its resume
request and its Node.js command, against a real server (only the port differs); its value encoding
table is the server's; it names every RPC, message and update type."""

from __future__ import annotations

import datetime
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.doc_blocks import Block, blocks
from trio_bridge import RunningServer, Tensor, VariableType
from trio_bridge import _encoding as enc
from trio_bridge.proto.google.protobuf import Any as PackedAny

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
NODE_EXAMPLE = ROOT / "examples" / "node"
#: A time as the doc's clients print it; the doc shows one of its own.
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _blocks() -> list[Block]:
    return blocks(DOC)


def _example(name: str) -> Block:
    (block,) = [b for b in _blocks() if b.name == name]
    return block


def _output(name: str) -> str:
    (block,) = [b for b in _blocks() if b.output_of == name]
    return block.text


def _program(name: str, port: int) -> str:
    """A Python example with the port of the test's server instead of 50051."""
    code = _example(name).text
    assert 'TARGET = "127.0.0.1:50051"' in code
    return code.replace("50051", str(port))


def _moments(output: str) -> list[float]:
    return [datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() for t in TIME.findall(output)]


def _same_lines(got: str, shown: str) -> None:
    """The output matches the doc's, each time in it aside (its own run's)."""
    assert TIME.sub("<time>", got) == TIME.sub("<time>", shown)


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    """A folder laid out as the repository's root, with grpcio-tools' stubs in ``client/``."""
    _generate_stubs(tmp_path)
    return tmp_path


def _generate_stubs(tmp_path: Path) -> None:
    """The doc's "protoc" commands, as written, in a folder laid out as the repository's root."""
    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "unified_bridge.proto", tmp_path / "proto")
    bin_dir = Path(sys.executable).parent  # python, with grpcio-tools, first on PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    commands = [line[2:] for line in _example("protoc").text.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), command
    for stub in ("unified_bridge_pb2.py", "unified_bridge_pb2_grpc.py"):
        assert (tmp_path / "client" / stub).is_file()


async def _run_python(client_dir: Path, name: str, port: int) -> str:
    """Save the example as client/NAME.py and run it as the doc says (python client/NAME.py)."""
    (client_dir / "client" / f"{name}.py").write_text(_program(name, port))
    result = await trio.run_process(
        [sys.executable, f"client/{name}.py"],
        cwd=client_dir,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_python_client_runs_as_written(server: RunningServer, client_dir: Path) -> None:
    """setup, then the watcher; once it printed the initial values and 'synced', the writer sets
    temperature 21.5 -> 22.5 (source thermostat); the watcher prints the change and ends by itself.
    Then the resume request replays that change."""
    port = server.port
    assert await _run_python(client_dir, "setup", port) == _output("setup")

    (client_dir / "client" / "watch.py").write_text(_program("watch", port))
    with (client_dir / "watch.err").open("wb") as errors:
        watcher = await trio.lowlevel.open_process(
            [sys.executable, "client/watch.py"], cwd=client_dir, stdout=subprocess.PIPE, stderr=errors
        )
    assert watcher.stdout is not None
    output = b""
    with trio.fail_after(60):  # a bound for a failure only: every step waits for the one before
        while b"synced\n" not in output:
            chunk = await watcher.stdout.receive_some()
            assert chunk, f"the watcher ended early: {output!r} {(client_dir / 'watch.err').read_text()}"
            output += chunk
        before = time.time()
        assert await _run_python(client_dir, "write", port) == _output("write")
        after = time.time()
        async for chunk in watcher.stdout:
            output += chunk
        assert await watcher.wait() == 0, (client_dir / "watch.err").read_text()
    assert (client_dir / "watch.err").read_text() == ""  # no traceback, no warning
    printed = output.decode()
    _same_lines(printed, _output("watch"))
    *initial, change = _moments(printed)
    assert all(moment <= before for moment in initial)
    assert before - 0.001 <= change <= after  # the write's own time, in milliseconds

    assert await _run_python(client_dir, "resume", port) == _output("resume")


@pytest.mark.skipif(
    shutil.which("node") is None,
    reason="node is not on PATH (.ci/run installs it: apt-get install nodejs npm)",
)
@pytest.mark.skipif(
    not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="examples/node/node_modules is missing: run `npm ci --prefix examples/node` (tests never download)",
)
async def test_node_client_runs_as_written(server: RunningServer, client_dir: Path) -> None:
    """After setup and the writer, the doc's node command (only the port differs) prints what the doc
    shows; the doc's excerpt of the example is the code that ran."""
    assert _example("node-unpack").text in (NODE_EXAMPLE / "watch.js").read_text()
    await _run_python(client_dir, "setup", server.port)
    await _run_python(client_dir, "write", server.port)
    block = _example("node").text
    command, shown = block.split("\n", 1)
    assert command.startswith("$ node examples/node/watch.js --port 50051 ")
    arguments = shlex.split(command[2:].replace("50051", str(server.port)))
    result = await trio.run_process(
        arguments, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode() == ""
    _same_lines(result.stdout.decode(), shown)
    variable = await server.store.get_variable("greenhouse", "temperature")
    assert (variable.value, variable.version, variable.last_update_source) == (23.5, 3, "node")


#: Which test runs each example of the doc (the test's source names it).
RUN_BY: dict[str, Callable[..., object]] = {
    "protoc": _generate_stubs,
    "setup": test_python_client_runs_as_written,
    "watch": test_python_client_runs_as_written,
    "write": test_python_client_runs_as_written,
    "resume": test_python_client_runs_as_written,
    "node": test_node_client_runs_as_written,
    "node-unpack": test_node_client_runs_as_written,
}


def test_every_block_of_the_doc_is_an_example_a_test_runs() -> None:
    """Each fenced block has an example marker naming a test that runs it, or is the ```text output
    right after one, which that test compares."""
    blocks = _blocks()
    assert len(blocks) >= len(RUN_BY)
    for block in blocks:
        assert block.name or block.output_of, (
            f"a ```{block.language} block with no example marker:\n{block.text}"
        )
    names = [block.name for block in blocks if block.name]
    assert sorted(names) == sorted(RUN_BY), "each example once, each run by a test"
    for name, test in RUN_BY.items():
        assert f'"{name}"' in inspect.getsource(test), (
            f"{getattr(test, '__name__', test)} does not run {name!r}"
        )
    outputs = [block.output_of for block in blocks if block.output_of]
    assert sorted(outputs) == ["resume", "setup", "watch", "write"]


#: The encoding table's examples: (type, value, payload as the doc shows it).
ENCODED = [
    (VariableType.FLOAT, 21.5, "09 00 00 00 00 00 80 35 40"),
    (VariableType.INTEGER, 42, "08 2a"),
    (VariableType.INTEGER, -1, "08 ff ff ff ff ff ff ff ff ff 01"),
    (VariableType.STRING, "héllo", "0a 06 68 c3 a9 6c 6c 6f"),
    (VariableType.BOOLEAN, True, "08 01"),
    (VariableType.CHOICE, "run", "0a 03 72 75 6e"),
    (VariableType.EMBEDDING, (0.5, 0.25), "0a 08 00 00 00 3f 00 00 80 3e"),
    (
        VariableType.TENSOR,
        Tensor(shape=(2,), dtype="int16", data=b"\x01\x00\x02\x00"),
        "0a 01 02 12 05 69 6e 74 31 36 1a 04 01 00 02 00",
    ),
]


def test_value_encoding_table_is_what_the_server_sends() -> None:
    """Each row's type URL and example payload are the server's own encoding, byte for byte."""
    rows = {
        row.split("|")[1].strip(): row
        for row in DOC.read_text().splitlines()
        if row.startswith("| `VARIABLE_TYPE_")
    }
    assert len(rows) == len(VariableType)
    for vtype in VariableType:
        row = rows[f"`VARIABLE_TYPE_{vtype.name}` ({vtype.value})"]
        assert f"| `{enc.type_url_for(vtype)}` |" in row
    for vtype, value, payload in ENCODED:
        packed = enc.pack_value(vtype, value)
        assert packed.value.hex(" ") == payload
        assert f"`{payload}`" in rows[f"`VARIABLE_TYPE_{vtype.name}` ({vtype.value})"]
        assert enc.unpack_value("v", vtype, packed) == value
    # Defaults travel as an empty payload.
    for vtype, default in [(VariableType.FLOAT, 0.0), (VariableType.INTEGER, 0), (VariableType.STRING, "")]:
        assert enc.pack_value(vtype, default).value == b""
        assert enc.unpack_value("v", vtype, enc.pack_value(vtype, default)) == default
    # The server reads any valid encoding: fields in any order, an unpacked embedding, any URL prefix.
    tensor = PackedAny(
        type_url="type.googleapis.com/unified_bridge.Tensor",
        value=bytes.fromhex("1a04010002001205696e7431360a0102"),
    )
    assert enc.unpack_value("v", VariableType.TENSOR, tensor) == ENCODED[-1][1]
    embedding = PackedAny(type_url="unified_bridge.Embedding", value=bytes.fromhex("0d0000003f0d0000803e"))
    assert enc.unpack_value("v", VariableType.EMBEDDING, embedding) == (0.5, 0.25)


def test_doc_names_every_rpc_message_and_update_type() -> None:
    """Every RPC has a row, every message is named (a request or response by its RPC), and the update
    types table lists exactly the update types the server sends (and the .proto's comment lists)."""
    proto = (ROOT / "proto" / "unified_bridge.proto").read_text()
    doc = DOC.read_text()
    rpcs = re.findall(r"^\s*rpc (\w+)\(", proto, re.MULTILINE)
    assert len(rpcs) >= 13
    for rpc in rpcs:
        assert f"| `{rpc}` |" in doc, rpc
    for message in re.findall(r"^message (\w+) \{", proto, re.MULTILINE):
        named = f"`{message}`" in doc or (
            message.endswith(("Request", "Response"))
            and f"`{re.sub(r'(Request|Response)$', '', message)}`" in doc
        )
        assert named, message
    update_types = {
        enc.INITIAL_VALUE,
        enc.VALUE_CHANGE,
        enc.VARIABLE_REGISTERED,
        enc.VARIABLE_DELETED,
        enc.RESYNC,
        enc.SYNCED,
        enc.HEARTBEAT,
    }
    section = doc.split("### Update types", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \| (?!`)", section, re.MULTILINE))  # not the header row
    assert documented == update_types
    listed = re.search(r"update_type is one of: (.*?)\.\n", proto, re.DOTALL)
    assert listed is not None
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == update_types

"""Hostile input: hypothesis-made requests for every RPC, garbage on the TCP socket, truncated frames.

The server runs as a process of its own and is driven by a stock grpcio client sending raw bytes, so
nothing on the client side tidies what is sent. Each request must get a status that is not INTERNAL or
UNKNOWN (or its connection closed), the server must never log an unexpected fault, and afterwards it
must still serve other clients. ``TRIO_BRIDGE_STRESS=1`` (``nox -s stress``) runs many more examples.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import _scalar, messages
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import BoolValue, DoubleValue, Int64Value, StringValue

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "/unified_bridge.UnifiedBridge/"
STRESS = os.environ.get("TRIO_BRIDGE_STRESS") == "1"
EXAMPLES = 1500 if STRESS else 40
#: The statuses bad input may get. INTERNAL and UNKNOWN would mean the server did not understand its
#: own failure; OK is fine too (random input is sometimes valid).
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

RPCS = [
    name
    for name in re.findall(r"^\s*rpc (\w+)\(", (ROOT / "proto" / "unified_bridge.proto").read_text(), re.M)
]
SESSION = "target"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
VARIABLES = {  # name → (type, a valid value)
    "f": (pb.VariableType.FLOAT, DoubleValue(value=1.5)),
    "i": (pb.VariableType.INTEGER, Int64Value(value=3)),
    "s": (pb.VariableType.STRING, StringValue(value="x")),
    "b": (pb.VariableType.BOOLEAN, BoolValue(value=True)),
    "e": (pb.VariableType.EMBEDDING, pb.Embedding(values=[0.0, 1.0, 2.0])),
    "t": (pb.VariableType.TENSOR, pb.Tensor(shape=[2], dtype="float32", data=bytes(8))),
}


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def call(self, method: str, payload: bytes) -> grpc.StatusCode:
        """Send ``payload`` as the request of ``method``; return the status it ended with (a watch is
        read up to its first message, then cancelled: that counts as OK)."""
        path = SERVICE + method
        try:
            if method == "WatchVariables":
                replies = self.channel.unary_stream(path)(payload, timeout=10)
                try:
                    next(replies)
                finally:
                    replies.cancel()
            elif method == "WriteVariables":  # one request; its result carries its own status
                results = list(self.channel.stream_stream(path)(iter([payload]), timeout=10))
                statuses = [pb.WriteResult.parse(result).status for result in results]
                return grpc.StatusCode.OK if not statuses[0] else _CODES[statuses[0]]
            else:
                self.channel.unary_unary(path)(payload, timeout=10)
        except grpc.RpcError as error:
            code = error.code()
            return grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code
        return grpc.StatusCode.OK

    def faults_logged(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if "unexpected fault" in line or "Traceback" in line]

    def ensure_target(self) -> None:
        """The session and variables aimed requests name (an earlier request may have removed them)."""
        fine = {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}
        create = pb.CreateSessionRequest(session_id=SESSION, ttl_seconds=86_400)
        assert self.call("CreateSession", bytes(create)) in fine
        for name, (vtype, value) in VARIABLES.items():
            request = pb.RegisterVariableRequest(
                session_id=SESSION, name=name, type=vtype, initial_value=PbAny.pack(value)
            )
            assert self.call("RegisterVariable", bytes(request)) in fine

    def assert_healthy(self) -> None:
        """The process lives, logged no fault, and serves a new client fully."""
        assert self.process.poll() is None, "the server process died"
        fresh = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:

            def call(method: str, request: Any) -> bytes:
                reply: bytes = fresh.unary_unary(SERVICE + method)(bytes(request), timeout=10)
                return reply

            assert pb.PingResponse.parse(call("Ping", pb.PingRequest(message="ok"))).message == "ok"
            session = pb.CreateSessionResponse.parse(call("CreateSession", pb.CreateSessionRequest()))
            assert session.session is not None
            sid = session.session.session_id
            call(
                "RegisterVariable",
                pb.RegisterVariableRequest(
                    session_id=sid,
                    name="h",
                    type=pb.VariableType.INTEGER,
                    initial_value=PbAny.pack(Int64Value(value=1)),
                ),
            )
            call(
                "SetVariable",
                pb.SetVariableRequest(
                    session_id=sid, variable_identifier="h", value=PbAny.pack(Int64Value(value=2))
                ),
            )
            got = pb.GetVariableResponse.parse(
                call("GetVariable", pb.GetVariableRequest(session_id=sid, variable_identifier="h"))
            )
            assert got.variable is not None and got.variable.version == 2
            call("CleanupSession", pb.CleanupSessionRequest(session_id=sid))
        finally:
            fresh.close()
        assert self.faults_logged() == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--max-sessions", "100000"],
            stdout=subprocess.PIPE,
            stderr=sink,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert "serving on" in line, line
        running = Server(process, int(line.rsplit(":", 1)[1]), log)
        yield running
        running.assert_healthy()
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- requests made by hypothesis ---------------------------------------------------------------------

_floats = st.floats(allow_nan=True, allow_infinity=True)
_values = st.one_of(
    messages(PbAny),  # random type_url and payload bytes
    _floats.map(lambda f: PbAny.pack(DoubleValue(value=f))),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: PbAny.pack(Int64Value(value=i))),
    st.text().map(lambda s: PbAny.pack(StringValue(value=s))),
    st.lists(_scalar("float", float), max_size=5).map(lambda v: PbAny.pack(pb.Embedding(values=v))),
    st.builds(
        pb.Tensor,
        shape=st.lists(st.integers(-2, 2**40), max_size=4),
        dtype=st.sampled_from(["float32", "int64", "float16", "complex", ""]),
        data=st.binary(max_size=64),
    ).map(PbAny.pack),
)


def _aimed(method: str) -> st.SearchStrategy[bytes]:
    """Requests of ``method``'s type, often aimed at the real session and variables so they get past
    NOT_FOUND, with odd values where values go; and plain garbage bytes."""
    cls = pb.WriteRequest if method == "WriteVariables" else getattr(pb, f"{method}Request")

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
        message = draw(messages(cls))
        if draw(st.booleans()):
            for field in ("session_id",):
                if hasattr(message, field):
                    setattr(message, field, SESSION)
            for field in ("variable_identifier", "name"):
                if hasattr(message, field):
                    setattr(message, field, draw(st.sampled_from([*VARIABLES, "new", "x" * 200, ""])))
            if hasattr(message, "variable_identifiers"):
                message.variable_identifiers = draw(
                    st.lists(st.sampled_from([*VARIABLES, "nope"]), max_size=5)
                )
            for field in ("value", "initial_value"):
                if hasattr(message, field):
                    setattr(message, field, draw(_values))
            if hasattr(message, "writes"):
                message.writes = draw(
                    st.lists(
                        st.builds(
                            pb.VariableWrite,
                            variable_identifier=st.sampled_from([*VARIABLES, "nope"]),
                            value=_values,
                            expected_version=st.integers(-(2**63), 2**63 - 1),
                        ),
                        max_size=4,
                    )
                )
        return bytes(message)

    return st.one_of(build(), st.binary(max_size=300))


@pytest.mark.parametrize("method", RPCS)
def test_every_rpc_answers_hostile_requests_with_a_status(
    server: Server, method: str, report: Callable[[str], None]
) -> None:
    statuses: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(payload=_aimed(method))
    def one(payload: bytes) -> None:
        status = server.call(method, payload)
        statuses[status.name] += 1
        assert status not in FORBIDDEN, (method, payload[:80], status)

    server.ensure_target()
    one()
    server.assert_healthy()
    report(
        f"hostile {method}: {sum(statuses.values())} requests, "
        + ", ".join(f"{k} {v}" for k, v in statuses.most_common())
    )


def test_the_rpc_list_is_the_protos() -> None:
    assert len(RPCS) == 14 and "WatchVariables" in RPCS and "WriteVariables" in RPCS


# ---- the TCP socket -----------------------------------------------------------------------------------


def _exchange(
    port: int, data: bytes, *, read_for: float = 5.0, until: Callable[[bytes], bool] | None = None
) -> bytes:
    """Send ``data`` on a fresh connection, then read what comes back until ``until(chunk)`` says
    enough, the server closes the connection, or ``read_for`` seconds pass (a bound on a failure)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as sock:
        try:
            sock.sendall(data)
            deadline = time.monotonic() + read_for
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if until is not None and until(chunk):
                    break
        except (TimeoutError, ConnectionError):
            pass
    return received


@settings(max_examples=EXAMPLES // 2, deadline=None, database=None)
@given(garbage=st.binary(min_size=1, max_size=2000))
def test_garbage_bytes_close_only_their_connection(server: Server, garbage: bytes) -> None:
    _exchange(server.port, garbage, read_for=2.0)
    assert server.process.poll() is None


def _grpc_request(
    method: str, body: bytes, *, claimed: int | None = None, end: bool = True
) -> tuple[h2.connection.H2Connection, bytes]:
    """The client side of an HTTP/2 connection carrying one gRPC request whose 5-byte prefix claims
    ``claimed`` bytes (default: the body's real length): the connection, and the bytes to send."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", SERVICE + method),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    length = len(body) if claimed is None else claimed
    connection.send_data(1, b"\x00" + length.to_bytes(4, "big") + body, end_stream=end)
    return connection, connection.data_to_send()


class _StatusReader:
    """Feeds what the server sends to the client's HTTP/2 connection; keeps the grpc-status."""

    def __init__(self, connection: h2.connection.H2Connection) -> None:
        self.connection = connection
        self.status: str | None = None

    def feed(self, chunk: bytes) -> bool:
        for event in self.connection.receive_data(chunk):
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                for name, value in event.headers:
                    if name == b"grpc-status":
                        self.status = value.decode()
        return self.status is not None


@pytest.mark.parametrize(
    ("body", "claimed", "end", "expected"),
    [
        (b"\x0a\x05hello", 100, True, str(grpc.StatusCode.INVALID_ARGUMENT.value[0])),  # ends early
        (b"\x0a\x05hel", None, True, str(grpc.StatusCode.INVALID_ARGUMENT.value[0])),  # bad protobuf
        (b"\x0a\x05hello", 2**32 - 1, False, str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])),  # 4 GiB
    ],
)
def test_truncated_and_oversized_frames_get_a_status(
    server: Server, body: bytes, claimed: int | None, end: bool, expected: str
) -> None:
    connection, request = _grpc_request("Ping", body, claimed=claimed, end=end)
    reader = _StatusReader(connection)
    _exchange(server.port, request, read_for=10.0, until=reader.feed)
    assert reader.status == expected
    server.assert_healthy()


def test_a_connection_cut_mid_frame_harms_no_one(server: Server) -> None:
    _, data = _grpc_request("CreateSession", bytes(pb.CreateSessionRequest(session_id="half")))
    for cut in (5, 24, 40, len(data) - 3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(data[:cut])
    server.assert_healthy()

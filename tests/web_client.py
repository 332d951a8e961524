"""A small HTTP/1.1 client for the web view's tests, in Trio (h11 over a loopback socket): requests,
and a page's live feed read event by event."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from tests.support import LOOPBACK


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Event:
    event: str
    data: Any
    id: str | None = None


@dataclass
class Feed:
    """An open event stream: ``next()`` returns its next event, or None once the server ended it."""

    stream: trio.abc.Stream
    connection: h11.Connection
    status: int
    headers: dict[str, str]
    buffer: bytes = b""
    ended: bool = False
    events: list[Event] = field(default_factory=list)
    retry: int | None = None

    async def next(self) -> Event | None:
        while True:
            if b"\n\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n\n", 1)
                event = _parse_event(raw.decode(), self)
                if event is not None:
                    self.events.append(event)
                    return event
                continue
            if self.ended:
                return None
            data = await _next_body(self.stream, self.connection)
            if data is None:
                self.ended = True
            else:
                self.buffer += data

    async def until(self, predicate: Any) -> Event:
        """The first event (from here on) for which ``predicate(event)`` holds; fails if the feed ends."""
        while True:
            event = await self.next()
            assert event is not None, f"the feed ended first; it sent {[e.event for e in self.events]}"
            if predicate(event):
                return event

    async def updates_until_synced(self) -> list[Event]:
        updates = []
        while True:
            event = await self.until(lambda e: e.event == "update")
            if event.data["type"] == "synced":
                return updates
            updates.append(event)


def _parse_event(raw: str, feed: Feed) -> Event | None:
    name, data, event_id = "message", [], None
    for line in raw.split("\n"):
        key, _, value = line.partition(": ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value
        elif key == "retry":
            feed.retry = int(value)
    if not data:
        return None
    return Event(name, json.loads("\n".join(data)), event_id)


async def _next_body(stream: trio.abc.Stream, connection: h11.Connection) -> bytes | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return None


class WebClient:
    """Requests to the web view on ``port``; ``headers`` go with each (a token, a Host)."""

    def __init__(
        self, port: int, headers: Sequence[tuple[str, str | bytes]] = (), *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.port = port
        self.headers = list(headers)
        self.tls = tls

    async def _connect(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await trio.open_tcp_stream(LOOPBACK, self.port)
        if self.tls is not None:
            secure = trio.SSLStream(stream, self.tls, server_hostname=LOOPBACK)
            await secure.do_handshake()
            stream = secure
        return stream

    def _request(
        self, method: str, path: str, headers: Sequence[tuple[str, str | bytes]], body: bytes
    ) -> h11.Request:
        names = {name.lower() for name, _ in (*self.headers, *headers)}  # (bytes values go as they are)
        base = [] if "host" in names else [("Host", f"{LOOPBACK}:{self.port}")]
        return h11.Request(
            method=method,
            target=path,
            headers=[*base, *self.headers, *headers, ("Content-Length", str(len(body)))],
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        body: bytes = b"",
        headers: Sequence[tuple[str, str | bytes]] = (),
    ) -> Response:
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = [("Content-Type", "application/json"), *headers]
        stream = await self._connect()
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            await stream.send_all(connection.send(self._request(method, path, headers, body)))
            await stream.send_all(connection.send(h11.Data(data=body)) if body else b"")
            await stream.send_all(connection.send(h11.EndOfMessage()))
            response = await _response(stream, connection)
            chunks = []
            while (chunk := await _next_body(stream, connection)) is not None:
                chunks.append(chunk)
            return Response(response.status_code, _headers(response), b"".join(chunks))

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, json_body: object, **kwargs: Any) -> Response:
        return await self.request("POST", path, json_body=json_body, **kwargs)

    @contextlib.asynccontextmanager
    async def feed(
        self,
        session_id: str,
        *,
        last_event_id: str | bytes | None = None,
        query: str = "",
        receive_buffer: int = 0,
    ) -> AsyncIterator[Feed]:
        """The live feed of ``session_id``, open for the block (closed, as a browser leaving, after).
        ``receive_buffer``: a small socket receive buffer, for a page that stops reading."""
        headers: list[tuple[str, str | bytes]] = [("Accept", "text/event-stream")]
        if last_event_id is not None:
            headers.append(("Last-Event-ID", last_event_id))
        stream = await trio.open_tcp_stream(LOOPBACK, self.port)
        if receive_buffer:
            import socket

            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            path = f"/api/sessions/{session_id}/events" + (f"?{query}" if query else "")
            await stream.send_all(connection.send(self._request("GET", path, headers, b"")))
            await stream.send_all(connection.send(h11.EndOfMessage()))
            response = await _response(stream, connection)
            yield Feed(stream, connection, response.status_code, _headers(response))


async def _response(stream: trio.abc.Stream, connection: h11.Connection) -> h11.Response:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
            continue
        assert isinstance(event, h11.Response), event
        return event


def _headers(response: h11.Response) -> dict[str, str]:
    return {name.decode().lower(): value.decode() for name, value in response.headers}

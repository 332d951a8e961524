"""The web view's open connections, by the browser's address (see ``server`` for why)."""

from __future__ import annotations

import trio

#: A browser's address as the app sees it (ASGI's ``scope["client"]``): host and port.
Address = tuple[str, int]


class WebConnections:
    """The web view's open connections, by the browser's address: at most ``limit`` at once (a quarter
    of ``max_connections``), and at most ``per_host`` from one host (one per page it may hold,
    ``pages_per_host``, and a few more: one browser cannot take every place)."""

    def __init__(self, limit: int, per_host: int | None = None, pages_per_host: int = 0) -> None:
        self.limit = limit
        self.per_host = per_host if per_host is not None else limit
        self.pages_per_host = pages_per_host
        # Several connections may share an address for a moment (one ending as the next begins).
        self._sockets: dict[Address, list[trio.socket.SocketType]] = {}
        self._count = 0
        self._by_host: dict[str, int] = {}
        self._none_open = trio.Event()
        self._none_open.set()

    def refusal(self, address: Address) -> str | None:
        """Why a new connection from ``address`` is refused (naming the limit), or None: it has room."""
        if self._count >= self.limit:
            return (
                f"the web view has {self._count} connections open, its limit (a quarter of "
                f"max_connections) is {self.limit}"
            )
        on_host = self._by_host.get(address[0], 0)
        if on_host >= self.per_host:
            return (
                f"{address[0]} has {on_host} connections to the web view open, its limit (one per page, "
                f"max_watch_streams_per_connection, and {self.per_host - self.pages_per_host} more) is "
                f"{self.per_host}"
            )
        return None

    def hang_up(self, address: Address) -> None:
        """Close the connection of the browser at ``address`` (if open): a send stuck on it ends at
        once, and the browser sees the connection drop (an event stream then reconnects)."""
        for sock in self._sockets.get(address, ()):
            sock.close()

    def hang_up_all(self) -> None:
        for socks in list(self._sockets.values()):
            for sock in socks:
                sock.close()

    async def none_open(self) -> None:
        await self._none_open.wait()

    def add(self, address: Address, sock: trio.socket.SocketType) -> None:
        self._sockets.setdefault(address, []).append(sock)
        self._count += 1
        self._by_host[address[0]] = self._by_host.get(address[0], 0) + 1
        if self._none_open.is_set():
            self._none_open = trio.Event()

    def remove(self, address: Address, sock: trio.socket.SocketType) -> None:
        socks = self._sockets.get(address, [])
        if sock not in socks:
            return
        socks.remove(sock)
        if not socks:
            del self._sockets[address]
        self._count -= 1
        left = self._by_host.pop(address[0]) - 1
        if left:
            self._by_host[address[0]] = left
        if not self._count:
            self._none_open.set()

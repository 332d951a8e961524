"""Throwaway TLS material for the tests: a CA, a server certificate for 127.0.0.1 and a client
certificate, as PEM files (``pki``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client@example.org")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(files["ca"])
    server_cert.private_key_pem.write_to_path(files["key"])
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    client_cert.private_key_pem.write_to_path(files["client_key"])
    files["client_cert"].write_bytes(b"".join(blob.bytes() for blob in client_cert.cert_chain_pems))
    return files

"""Why a client could not talk to a server, in one sentence: the client side's only place for it.

grpclib reports most ways of not reaching a server as the same ``StreamTerminatedError: Connection
lost``: a plain-text client at a TLS port, a client with no certificate at a mutual-TLS port, a gRPC
client at an HTTP/1 port (the metrics port, say). :func:`unreachable` turns whatever a failed
connection raised into an :class:`Unavailable` that names the address and the cause; when the cause is
hidden it first asks the address directly (one short probe connection, only on this error path).

Causes that retrying cannot fix, where there is positive evidence of one (TLS on one side only, an
untrusted certificate, a client certificate refused, an HTTP/1 or non-h2 server), are marked
``retryable=False``: a watch gives up on them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass

from ._errors import Unavailable

#: What a client sends first on a plain-text HTTP/2 connection (RFC 9113, 3.4), and an empty SETTINGS.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_PROBE_SECONDS = 3.0
_TLS_FLAGS = "--tls-ca PEM (tls_context(ca=...))"
_NEEDS_CLIENT_CERTIFICATE = (
    "it closed the TLS connection at once: it probably requires a client certificate signed by a CA it "
    "trusts (--tls-cert and --tls-key), or refuses new connections"
)
_REFUSED = "connection refused (is the server running, on this port?)"


@dataclass(frozen=True)
class Finding:
    """What a probe found wrong, and whether trying again may help: ``retryable`` is False only on
    positive evidence (an HTTP/1 reply, TLS on one side only, an untrusted or missing certificate, no
    ALPN h2); a timeout or a connection closed without a word may be a busy server."""

    message: str
    retryable: bool = True


async def unreachable(
    exc: BaseException, host: str, port: int, tls: ssl.SSLContext | None, *, answered: bool
) -> Unavailable:
    """The error to raise for ``exc``, which a call to ``host:port`` failed with before any reply
    (``answered`` False) or after the connection had served calls (``answered`` True: it was lost).

    Cancellation: the probe it may make is cancelled with the caller, leaving no connection open."""
    where = f"{host}:{port}"
    address = (host, port)
    found: Finding | None
    if isinstance(exc, ssl.SSLCertVerificationError):
        found = _untrusted(exc)
    elif isinstance(exc, ssl.SSLError):
        found = _tls_cause(exc)
    elif isinstance(exc, ConnectionRefusedError):
        found = Finding(_REFUSED)
    elif isinstance(exc, socket.gaierror):
        found = Finding(f"unknown host ({exc.strerror})")
    elif answered:
        return Unavailable(f"lost the connection to {where}", address=address)
    else:
        found = await probe(host, port, tls)
    if found is None:  # it speaks HTTP/2 as expected: the connection was simply lost
        detail = f" ({exc.strerror or exc})" if isinstance(exc, OSError) else ""
        found = Finding(f"the connection was lost{detail}")
    return Unavailable(f"cannot reach {where}: {found.message}", address=address, retryable=found.retryable)


async def probe(host: str, port: int, tls: ssl.SSLContext | None) -> Finding | None:
    """What is wrong with talking gRPC to ``host:port`` over ``tls`` (None: plain text), or None if it
    answers HTTP/2 the way a gRPC server does. Takes at most a few seconds."""
    try:
        async with asyncio.timeout(_PROBE_SECONDS):
            if tls is None:
                return await _probe_plain(host, port)
            return await _probe_tls(host, port, tls)
    except TimeoutError:
        return Finding("it accepted the connection but did not answer")
    except ConnectionRefusedError:
        return Finding(_REFUSED)
    except OSError as exc:
        return Finding(f"the connection failed ({exc.strerror or exc})")


async def _probe_plain(host: str, port: int) -> Finding | None:
    reply, _ = await _exchange(host, port, None)
    if _is_http2(reply):
        return None
    if reply.startswith(b"HTTP/"):
        return Finding(
            "it answers HTTP/1, so it is not a trio-bridge gRPC server (the metrics port?)", retryable=False
        )
    # Silence or a TLS record in reply to plain bytes: ask it for a TLS handshake.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        await _exchange(host, port, context)
    except (ssl.SSLError, OSError):
        return Finding(
            "it closed the connection without speaking HTTP/2: not a trio-bridge gRPC server, or one "
            "refusing new connections"
        )
    return Finding(
        f"the server speaks TLS and this client plain text: connect over TLS (--tls, or {_TLS_FLAGS})",
        retryable=False,
    )


async def _probe_tls(host: str, port: int, tls: ssl.SSLContext) -> Finding | None:
    try:
        reply, alpn = await _exchange(host, port, tls)
    except ssl.SSLCertVerificationError as exc:
        return _untrusted(exc)
    except ssl.SSLError as exc:
        return _tls_cause(exc)
    except ConnectionResetError:
        return Finding(_NEEDS_CLIENT_CERTIFICATE)
    if _is_http2(reply):
        return None
    if alpn != "h2":
        return Finding(
            "it speaks TLS but not HTTP/2 (no ALPN h2): it is not a trio-bridge gRPC server", retryable=False
        )
    return Finding(_NEEDS_CLIENT_CERTIFICATE)


def _untrusted(exc: ssl.SSLCertVerificationError) -> Finding:
    reason = exc.verify_message or exc.reason or str(exc)
    return Finding(
        f"its TLS certificate is not trusted ({reason}); give the CA that signed it with {_TLS_FLAGS}",
        retryable=False,
    )


async def _exchange(host: str, port: int, tls: ssl.SSLContext | None) -> tuple[bytes, str | None]:
    """Connect, send an HTTP/2 preface; the first bytes of the reply (b"" if it closed) and the
    protocol TLS's ALPN agreed on."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=host if tls is not None else None
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        writer.write(_PREFACE)
        await writer.drain()
        return await reader.read(64), alpn
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _is_http2(reply: bytes) -> bool:
    """Whether ``reply`` starts with an HTTP/2 SETTINGS frame (what a server sends first)."""
    return len(reply) >= 9 and reply[3] == 0x04


def _tls_cause(exc: ssl.SSLError) -> Finding:
    reason = (exc.reason or str(exc)).upper()
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason or "PACKET_LENGTH" in reason:
        return Finding(
            "this client speaks TLS and the server plain text: connect without --tls/--tls-ca",
            retryable=False,
        )
    if "CERTIFICATE_REQUIRED" in reason:
        return Finding(
            "the server requires a client certificate: give --tls-cert and --tls-key", retryable=False
        )
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return Finding(
            "the server does not accept this client certificate (not signed by a CA it trusts)",
            retryable=False,
        )
    return Finding(f"the TLS handshake failed ({exc.reason or exc})")

"""Why a client could not talk to a server, in one sentence: the client side's only place for it.

grpclib reports most ways of not reaching a server as the same ``StreamTerminatedError: Connection
lost``: a plain-text client at a TLS port, a client with no certificate at a mutual-TLS port, a gRPC
client at an HTTP/1 port (the metrics port, say). :func:`unreachable` turns whatever a failed
connection raised into an :class:`Unavailable` that names the address and the cause; when the cause is
hidden it first asks the address directly (one short probe connection, only on this error path).

Causes that retrying cannot fix (TLS on one side only, an untrusted certificate, a missing client
certificate, not a gRPC server) are marked ``retryable=False``: a watch gives up on them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from ._errors import Unavailable

#: What a client sends first on a plain-text HTTP/2 connection (RFC 9113, 3.4), and an empty SETTINGS.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_PROBE_SECONDS = 3.0
_TLS_FLAGS = "--tls-ca PEM (tls_context(ca=...))"
_NEEDS_CLIENT_CERTIFICATE = (
    "it closed the TLS connection at once: it requires a client certificate signed by a CA it trusts "
    "(--tls-cert and --tls-key)"
)


async def unreachable(
    exc: BaseException, host: str, port: int, tls: ssl.SSLContext | None, *, answered: bool
) -> Unavailable:
    """The error to raise for ``exc``, which a call to ``host:port`` failed with before any reply
    (``answered`` False) or after the connection had served calls (``answered`` True: it was lost).

    Cancellation: the probe it may make is cancelled with the caller, leaving no connection open."""
    where = f"{host}:{port}"
    address = (host, port)
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return Unavailable(
            f"cannot reach {where}: its TLS certificate is not trusted ({reason}); give the CA that "
            f"signed it with {_TLS_FLAGS}",
            address=address,
            retryable=False,
        )
    if isinstance(exc, ssl.SSLError):
        cause = _tls_cause(exc)
        return Unavailable(f"cannot reach {where}: {cause}", address=address, retryable=False)
    if isinstance(exc, ConnectionRefusedError):
        return Unavailable(
            f"cannot reach {where}: connection refused (is the server running, on this port?)",
            address=address,
        )
    if isinstance(exc, socket.gaierror):
        return Unavailable(f"cannot reach {where}: unknown host ({exc.strerror})", address=address)
    if answered:
        return Unavailable(f"lost the connection to {where}", address=address)
    found = await probe(host, port, tls)
    if found is None:  # it speaks HTTP/2 as expected: the connection was simply lost
        detail = f" ({exc.strerror or exc})" if isinstance(exc, OSError) else ""
        return Unavailable(f"cannot reach {where}: the connection was lost{detail}", address=address)
    reachable_but_wrong = not found.startswith(("connection refused", "the connection failed"))
    return Unavailable(f"cannot reach {where}: {found}", address=address, retryable=not reachable_but_wrong)


async def probe(host: str, port: int, tls: ssl.SSLContext | None) -> str | None:
    """What is wrong with talking gRPC to ``host:port`` over ``tls`` (None: plain text), or None if it
    answers HTTP/2 the way a gRPC server does. Takes at most a few seconds."""
    try:
        async with asyncio.timeout(_PROBE_SECONDS):
            if tls is None:
                return await _probe_plain(host, port)
            return await _probe_tls(host, port, tls)
    except TimeoutError:
        return "it accepted the connection but did not answer"
    except ConnectionRefusedError:
        return "connection refused (is the server running, on this port?)"
    except OSError as exc:
        return f"the connection failed ({exc.strerror or exc})"


async def _probe_plain(host: str, port: int) -> str | None:
    reply, _ = await _exchange(host, port, None)
    if _is_http2(reply):
        return None
    if reply.startswith(b"HTTP/"):
        return "it answers HTTP/1, so it is not a trio-bridge gRPC server (the metrics port?)"
    # Silence or a TLS record in reply to plain bytes: ask it for a TLS handshake.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        await _exchange(host, port, context)
    except (ssl.SSLError, OSError):
        return "it closed the connection without speaking HTTP/2: it is not a trio-bridge gRPC server"
    return f"the server speaks TLS and this client plain text: connect over TLS (--tls, or {_TLS_FLAGS})"


async def _probe_tls(host: str, port: int, tls: ssl.SSLContext) -> str | None:
    try:
        reply, alpn = await _exchange(host, port, tls)
    except ssl.SSLCertVerificationError as exc:
        return f"its TLS certificate is not trusted ({exc.verify_message}); give its CA with {_TLS_FLAGS}"
    except ssl.SSLError as exc:
        return _tls_cause(exc)
    except (ConnectionResetError, asyncio.IncompleteReadError):
        return _NEEDS_CLIENT_CERTIFICATE
    if _is_http2(reply):
        return None
    if alpn != "h2":
        return "it speaks TLS but not HTTP/2 (no ALPN h2): it is not a trio-bridge gRPC server"
    return _NEEDS_CLIENT_CERTIFICATE


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


def _tls_cause(exc: ssl.SSLError) -> str:
    reason = (exc.reason or str(exc)).upper()
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason or "PACKET_LENGTH" in reason:
        return "this client speaks TLS and the server plain text: connect without --tls/--tls-ca"
    if "CERTIFICATE_REQUIRED" in reason:
        return "the server requires a client certificate: give --tls-cert and --tls-key"
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return "the server does not accept this client certificate (not signed by a CA it trusts)"
    return f"the TLS handshake failed ({exc.reason or exc})"

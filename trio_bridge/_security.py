"""Transport security and authentication, for the server and the client alike (no server code here).

TLS: :func:`server_tls` and :func:`client_tls` build the ``ssl.SSLContext`` each side hands to grpclib
(HTTP/2 over TLS, ALPN ``h2``); a server given a client CA requires client certificates (mutual TLS).

Tokens: a token file has one token a line, ``NAME TOKEN [SCOPE]``: ``NAME`` is who holds it (it becomes
the owner of the sessions it creates), ``SCOPE`` is ``all`` (the default: every session) or ``own``
(only the sessions this name created). Blank lines and lines starting with ``#`` are ignored. A client
sends ``authorization: Bearer TOKEN`` with every call. Tokens are compared by their SHA-256 digest, so
looking one up takes the same time whatever it shares with a real one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._errors import Unauthenticated

SCOPES = ("all", "own")
AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class Principal:
    """Who a token stands for, and which sessions it may use."""

    name: str
    scope: str  # "all" or "own"

    def may_use(self, owner: str) -> bool:
        """Whether this principal may use a session created by ``owner`` ("" when tokens were off)."""
        return self.scope == "all" or owner == self.name


class Tokens:
    """The tokens a server accepts (see the module doc for the file format)."""

    def __init__(self, entries: dict[str, Principal]) -> None:
        if not entries:
            raise ValueError("a token file must hold at least one token")
        self._by_digest = {_digest(token): principal for token, principal in entries.items()}

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """Read a token file; a malformed line raises ``ValueError`` naming the file and line."""
        entries: dict[str, Principal] = {}
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in SCOPES):
                raise ValueError(f"{path}:{number}: expected 'NAME TOKEN [all|own]'")
            name, token = fields[0], fields[1]
            if len(token) < 16:
                raise ValueError(f"{path}:{number}: the token for {name!r} is shorter than 16 characters")
            if token in entries:
                raise ValueError(f"{path}:{number}: this token is already given to {entries[token].name!r}")
            entries[token] = Principal(name, fields[2] if len(fields) == 3 else "all")
        return cls(entries)

    def principal_of(self, metadata: Mapping[str, object] | None) -> Principal:
        """The principal of a call's request metadata (its ``authorization`` header); as
        :meth:`principal_for`."""
        header = metadata.get(AUTHORIZATION) if metadata else None
        return self.principal_for(header if isinstance(header, str) else None)

    def principal_for(self, authorization: str | None) -> Principal:
        """The principal of an ``authorization`` header's bearer token; :class:`Unauthenticated` for a
        missing, malformed or unknown one (the message never echoes what was sent)."""
        if not authorization:
            raise Unauthenticated("this server requires a token: send 'authorization: Bearer TOKEN'")
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header must be 'Bearer TOKEN'")
        principal = self._by_digest.get(_digest(token.strip()))
        if principal is None:
            raise Unauthenticated("the token is not valid")
        return principal


class SignIns:
    """Sign-ins for the web view: a cookie that stands for a token without holding it.

    A sign-in is ``ID.ISSUED.MAC``: ``ID`` names the token (an HMAC of it under a secret of this
    server process, so a cookie seen elsewhere, cookies not being kept apart by port, tells nothing of
    the token, nor lets one guess it offline), ``ISSUED`` when it was signed in (seconds since the
    epoch), and ``MAC`` an HMAC of both under that secret. It lasts ``lifetime`` seconds, until it is
    signed out (:meth:`sign_out`), or until the server restarts (a new secret).
    """

    #: Signed-out sign-ins remembered (until they expire) at most; the oldest are dropped beyond.
    MAX_SIGNED_OUT = 100_000

    def __init__(self, tokens: Tokens, *, lifetime: float = 86_400) -> None:
        self._tokens = tokens
        self.lifetime = lifetime
        self._secret = secrets.token_bytes(32)
        self._by_id = {self._mac(digest)[:32]: principal for digest, principal in tokens._by_digest.items()}
        self._signed_out: dict[str, float] = {}  # MAC → when the sign-in expires (oldest first)

    def sign_in(self, token: str, *, now: float) -> tuple[Principal, str]:
        """The principal of ``token`` and a sign-in for it; Unauthenticated for a token not in the file."""
        try:
            principal = self._tokens.principal_for(f"Bearer {token}" if token else None)
        except UnicodeError:  # (not text a token file can hold)
            raise Unauthenticated("the token is not valid") from None
        signed = f"{self._mac(_digest(token.strip()))[:32]}.{int(now)}"
        return principal, f"{signed}.{self._mac(signed)}"

    def principal_of(self, sign_in: str, *, now: float) -> Principal:
        """The principal a sign-in stands for; Unauthenticated if it is forged, signed out, of a token
        no longer accepted, or older than its lifetime."""
        identifier, _, rest = sign_in.partition(".")
        issued, _, mac = rest.partition(".")
        if (
            not sign_in.isascii()
            or not issued.isdigit()
            or not hmac.compare_digest(mac, self._mac(f"{identifier}.{issued}"))
        ):
            raise Unauthenticated("the sign-in is not valid (or the server restarted): sign in again")
        if now - int(issued) > self.lifetime:
            raise Unauthenticated("the sign-in has expired: sign in again")
        if mac in self._signed_out:
            raise Unauthenticated("this sign-in was signed out: sign in again")
        principal = self._by_id.get(identifier)
        if principal is None:  # (the MAC holds: only if the token file changed under a running server)
            raise Unauthenticated("the sign-in's token is no longer accepted: sign in again")
        return principal

    def sign_out(self, sign_in: str, *, now: float) -> None:
        """Refuse ``sign_in`` from now on (if it is one of this server's)."""
        try:
            self.principal_of(sign_in, now=now)
        except Unauthenticated:
            return
        issued = int(sign_in.split(".")[1])
        for mac, expires in list(self._signed_out.items()):  # oldest first: drop what has expired
            if expires > now and len(self._signed_out) < self.MAX_SIGNED_OUT:
                break
            del self._signed_out[mac]
        self._signed_out[sign_in.rsplit(".", 1)[1]] = issued + self.lifetime

    def _mac(self, data: str | bytes) -> str:
        return hmac.new(
            self._secret, data.encode() if isinstance(data, str) else data, hashlib.sha256
        ).hexdigest()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def server_tls(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS context for the server; with ``client_ca``, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def client_tls(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS context for a client: trust ``ca`` (else the system's roots); present ``cert``/``key``
    to a server that wants client certificates."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context

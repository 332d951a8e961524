"""The web view's ASGI application: pages, their JSON, the live feed, and (if allowed) writes.

Routes (everything under ``/api/`` is JSON, or the event stream; refusals are JSON
``{"status", "message"}`` with the gRPC status name and the server's message):

=======================================  ==========================================================
``GET /``, ``/sessions/ID``, ``/login``  the page (one HTML shell; ``static/app.js`` draws it)
``GET /static/NAME``                     the page's script, style sheet and icon (no data in them)
``GET /api/me``                          whether a token is needed, and whose is in use
``POST /api/login``, ``/api/logout``     ``{"token": ...}``: sign in (a cookie), or sign out
``GET /api/sessions``                    the sessions the caller may use (``?filter=``, ``?limit=``)
``GET /api/sessions/ID``                 one session
``GET /api/sessions/ID/events``          its live feed (``feed``), resumed from ``Last-Event-ID``
``POST /api/sessions/ID/variables/NAME`` ``{"value": TEXT, "expected_version": N}``: set a value
=======================================  ==========================================================

Security: with tokens (``--token-file``) every ``/api/`` route but ``me``, ``login`` and ``logout``
needs one: the sign-in cookie ``login`` sets (``_security.SignIns``: it stands for the token without
holding it; HttpOnly, SameSite=Strict; Secure and ``__Host-`` over TLS) or an ``Authorization: Bearer``
header. A caller sees only the sessions its token may use, exactly as through gRPC: another's session
is "not found". Every response carries a strict Content-Security-Policy
(scripts, styles and connections from this origin only; no inline script, no frames). Writes need
``--web-writable``, JSON (so a form on another site cannot send one) and, if the browser says where it
comes from, this origin. Requests naming a host other than an IP address, ``localhost`` or one allowed
(``--web-allowed-host``) are refused, so a DNS-rebinding page cannot read the view.

Cancellation: a request's handler is cancelled when its browser goes away (the feed's watch with it).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import unquote, unquote_plus

import trio
from grpclib.const import Status

from .. import _encoding as enc
from .._errors import BridgeError, InvalidArgument, NotFound, Unauthenticated
from .._limits import DEFAULT_LIMITS
from .._security import Principal, SignIns
from .._service import UnifiedBridgeService, call_directly
from .._status import http_status_of, status_of
from .._textvalues import parse_value
from .._types import check_value
from ..proto import unified_bridge as pb
from ..storage import SessionInfo
from .connections import WebConnections
from .feed import end_view, resume_point, run_feed, sse_event, to_json
from .views import problem_view, session_view, variable_view

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: The sign-in cookie (with TLS, ``__Host-`` before it: only this origin may set it).
SIGN_IN_COOKIE = "trio_bridge_sign_in"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
_STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: Sessions the sessions page lists, at most (the rest are counted): by default, and when asked.
SESSIONS_SHOWN = 500
MAX_SESSIONS_SHOWN = 10_000
#: How long a feed's last event may wait for a page that does not read, in seconds.
FEED_END_SECONDS = 5.0
_SESSION = r"(?P<session>[^/]+)"
_PAGES = re.compile(rf"/|/login|/sessions/{_SESSION}")
_SESSION_API = re.compile(rf"/api/sessions/{_SESSION}")
_EVENTS_API = re.compile(rf"/api/sessions/{_SESSION}/events")
_WRITE_API = re.compile(rf"/api/sessions/{_SESSION}/variables/(?P<name>[^/]+)")


@dataclass(frozen=True)
class WebSettings:
    """How the web view behaves (``trio-bridge serve --web-*``)."""

    #: Writes from the page (``--web-writable``); off: the view only shows.
    writable: bool = False
    #: Host names (besides IP addresses and ``localhost``) the view answers to (``--web-allowed-host``).
    allowed_hosts: tuple[str, ...] = ()
    #: Recent changes each numeric variable's sparkline starts with (``--web-history-points``).
    history_points: int = DEFAULT_LIMITS.web_history_points
    #: Whether the view is served over TLS (its cookie is then Secure).
    tls: bool = False


class Refused(Exception):
    """An HTTP refusal that is not a store error (bad route, bad host, too large a body)."""

    def __init__(self, http: HTTPStatus, status: Status, message: str) -> None:
        super().__init__(message)
        self.http, self.status, self.message = http, status, message


class WebView:
    """The ASGI application (one per server), over the gRPC service's store, limits and tokens."""

    def __init__(
        self,
        service: UnifiedBridgeService,
        settings: WebSettings,
        connections: WebConnections,
    ) -> None:
        self._service = service
        self._settings = settings
        self._connections = connections
        self._sign_ins = SignIns(service.tokens) if service.tokens is not None else None
        self._cookie_name = ("__Host-" if settings.tls else "") + SIGN_IN_COOKIE
        self._files = {
            name: (resources.files(__package__) / "static" / name).read_bytes()
            for name in ("index.html", *_STATIC_TYPES)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets here: hypercorn closes them
        try:
            self._check_host(scope)
            await self._route(scope, receive, send)
        except Refused as refused:
            await _send_json(send, refused.http, problem_view(refused.status.name, refused.message))
        except BridgeError as error:
            status = status_of(error)
            await _send_json(send, http_status_of(status), problem_view(status.name, error.message))

    # ---- routing --------------------------------------------------------------------------------

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if method == "GET" and name in _STATIC_TYPES:
                await _respond(send, HTTPStatus.OK, self._files[name], _STATIC_TYPES[name], cache=True)
                return
        elif _PAGES.fullmatch(path) and method == "GET":
            await _respond(send, HTTPStatus.OK, self._files["index.html"], "text/html; charset=utf-8")
            return
        elif path == "/api/me" and method == "GET":
            await _send_json(send, HTTPStatus.OK, self._me(scope))
            return
        elif path == "/api/login" and method == "POST":
            await self._login(scope, receive, send)
            return
        elif path == "/api/logout" and method == "POST":
            self._check_same_origin(scope)
            if self._sign_ins is not None:
                for sign_in in _cookies(scope).get(self._cookie_name, []):
                    self._sign_ins.sign_out(sign_in, now=time.time())
            await _send_json(send, HTTPStatus.OK, {}, cookie=self._cookie("", max_age=0))
            return
        elif path == "/api/sessions" and method == "GET":
            listing = await self._sessions(self._principal(scope), _query(scope))
            await _send_json(send, HTTPStatus.OK, listing)
            return
        elif (match := _EVENTS_API.fullmatch(path)) and method == "GET":
            await self._feed(scope, receive, send, unquote(match["session"]))
            return
        elif (match := _SESSION_API.fullmatch(path)) and method == "GET":
            await _send_json(send, HTTPStatus.OK, await self._session(scope, unquote(match["session"])))
            return
        elif (match := _WRITE_API.fullmatch(path)) and method == "POST":
            body = await self._write(scope, receive, unquote(match["session"]), unquote(match["name"]))
            await _send_json(send, HTTPStatus.OK, body)
            return
        raise Refused(HTTPStatus.NOT_FOUND, Status.NOT_FOUND, f"no page {method} {path}")

    # ---- who is asking ----------------------------------------------------------------------------

    def _check_host(self, scope: Scope) -> None:
        host = _header(scope, b"host")
        if host is None:
            return  # HTTP/1.0: no DNS name involved
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if _is_ip_address(name) or name == "localhost" or name in self._settings.allowed_hosts:
            return
        raise Refused(
            HTTPStatus.FORBIDDEN,
            Status.PERMISSION_DENIED,
            f"the web view does not answer to host {name!r}: allow it with --web-allowed-host {name} "
            "(this guards against DNS rebinding)",
        )

    def _check_same_origin(self, scope: Scope) -> None:
        """Refuse a state-changing request another site's page made (a browser says so)."""
        site = _header(scope, b"sec-fetch-site")
        origin = _header(scope, b"origin")
        host = _header(scope, b"host")
        cross = site not in (None, "same-origin", "none") or (
            origin is not None and host is not None and origin.split("://", 1)[-1] != host
        )
        if cross:
            raise Refused(HTTPStatus.FORBIDDEN, Status.PERMISSION_DENIED, "cross-site requests are refused")

    def _principal(self, scope: Scope) -> Principal | None:
        """The caller's principal (None when the server checks no tokens); Unauthenticated if a token
        is needed and none valid was sent."""
        tokens = self._service.tokens
        if tokens is None:
            return None
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            return tokens.principal_for(authorization)
        sign_ins = _cookies(scope).get(self._cookie_name, [])
        if not sign_ins:
            raise Unauthenticated("this server requires a token: sign in with one")
        if len(set(sign_ins)) > 1:  # one planted beside the page's own (another port, another path)
            raise Unauthenticated(
                "the request carries two different sign-ins (another site on this host may have set "
                "one): clear this site's cookies in the browser, then sign in again"
            )
        assert self._sign_ins is not None
        return self._sign_ins.principal_of(sign_ins[0], now=time.time())

    def _me(self, scope: Scope) -> dict[str, Any]:
        required = self._service.tokens is not None
        name = problem = None
        if required and (_header(scope, b"authorization") or _cookies(scope).get(self._cookie_name)):
            try:
                principal = self._principal(scope)
            except Unauthenticated as refused:
                problem = refused.message  # the sign-in page says why
            else:
                name = principal.name if principal is not None else None
        return {
            "token_required": required,
            "signed_in_as": name,
            "problem": problem,
            "writable": self._settings.writable,
            "history_points": self._settings.history_points,
        }

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._check_same_origin(scope)
        if self._sign_ins is None:
            await _send_json(send, HTTPStatus.OK, {"signed_in_as": None})
            return
        body = await _json_body(scope, receive, self._service.limits.max_message_bytes)
        token = body.get("token")
        principal, sign_in = self._sign_ins.sign_in(token if isinstance(token, str) else "", now=time.time())
        cookie = self._cookie(sign_in, max_age=int(self._sign_ins.lifetime))
        await _send_json(send, HTTPStatus.OK, {"signed_in_as": principal.name}, cookie=cookie)

    def _cookie(self, value: str, *, max_age: int) -> bytes:
        parts = [
            f"{self._cookie_name}={value}",
            "Path=/",
            "HttpOnly",
            "SameSite=Strict",
            f"Max-Age={max_age}",
        ]
        if self._settings.tls:
            parts.append("Secure")
        return "; ".join(parts).encode()

    async def _visible(self, principal: Principal | None, session_id: str) -> None:
        """NOT_FOUND, as gRPC answers, for a session the principal may not use."""
        await self._service.check_scope(principal, session_id, call_directly)

    # ---- reading ------------------------------------------------------------------------------

    async def _sessions(self, principal: Principal | None, query: Mapping[str, str]) -> dict[str, Any]:
        """The sessions the caller may use whose id holds ``filter`` (oldest first), at most ``limit``
        of them (``SESSIONS_SHOWN`` by default), and how many there are in all."""
        text = query.get("filter", "")
        try:
            limit = min(max(int(query.get("limit", SESSIONS_SHOWN)), 1), MAX_SESSIONS_SHOWN)
        except ValueError:
            raise InvalidArgument(f"limit must be a whole number, got {query['limit'][:40]!r}") from None
        shown: list[dict[str, Any]] = []
        total = 0
        for info in await self._service.store.list_sessions():
            if (principal is None or principal.may_use(info.owner)) and text in info.session_id:
                total += 1
                if len(shown) < limit:
                    shown.append(self._session_view(info))
        return {"sessions": shown, "total": total, "now": time.time()}

    def _session_view(self, info: SessionInfo) -> dict[str, Any]:
        cache = self._service.store.cache
        try:
            session = cache.session(info.session_id)
        except NotFound:  # ended since it was listed
            return session_view(info, watchers=0, expires_in=0.0)
        # An open watch holds a session alive: it has a whole TTL left once the last one ends.
        expires_in = None if session.watchers else max(0.0, session.deadline - cache.clock())
        return session_view(info, watchers=session.watchers, expires_in=expires_in)

    async def _session(self, scope: Scope, session_id: str) -> dict[str, Any]:
        principal = self._principal(scope)
        await self._visible(principal, session_id)
        cache = self._service.store.cache
        info = cache.info(cache.session(session_id))  # not an access: looking is not using
        return {"session": self._session_view(info), "writable": self._settings.writable}

    async def _feed(self, scope: Scope, receive: Receive, send: Send, session_id: str) -> None:
        principal = self._principal(scope)
        resume_revision = resume_point(_header(scope, b"last-event-id"), self._service.store.state_id)
        await send(
            {
                "type": "http.response.start",
                "status": HTTPStatus.OK,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    *_SECURITY_HEADERS,
                ],
            }
        )

        async def send_bytes(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        client = scope.get("client") or ("", 0)
        address = (str(client[0]), int(client[1]))
        # Over HTTP/1.1 a page that fell behind has its connection closed (the one send stuck on it
        # cannot be cancelled otherwise); over HTTP/2 its stream's send is cancelled, and the
        # connection, which other pages share, stays.
        hang_up: Callable[[], object] = (
            functools.partial(self._connections.hang_up, address)
            if scope.get("http_version") in ("1.0", "1.1")
            else _nothing
        )
        async with trio.open_nursery() as nursery:
            # The browser going away ends the feed (and its watch) at once.
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                # Out of scope: the same end as a session that is not there.
                await self._visible(principal, session_id)
            except BridgeError as refused:
                ending = refused
            else:
                ending = await run_feed(
                    self._service,
                    session_id,
                    # Each page is a connection of its own (HTTP/1.1): the limit per connection is
                    # one per browser's address here.
                    peer=("web", address[0]),
                    send=send_bytes,
                    hang_up=hang_up,
                    resume_revision=resume_revision,
                    history_points=self._settings.history_points,
                )
            # (bounded: a page that does not read may hold the end, over HTTP/2, where it is not cut)
            with trio.move_on_after(FEED_END_SECONDS):
                if not ending.stream_cut:
                    await send_bytes(sse_event("end", to_json(end_view(ending))))
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()

    # ---- writing ------------------------------------------------------------------------------

    async def _write(self, scope: Scope, receive: Receive, session_id: str, name: str) -> dict[str, Any]:
        self._check_same_origin(scope)
        principal = self._principal(scope)
        if not self._settings.writable:
            raise Refused(
                HTTPStatus.FORBIDDEN,
                Status.PERMISSION_DENIED,
                "the web view is read-only: start the server with --web-writable to allow writes",
            )
        body = await _json_body(scope, receive, self._service.limits.max_message_bytes)
        await self._visible(principal, session_id)
        text, expected = body.get("value"), body.get("expected_version")
        if not isinstance(text, str):
            raise InvalidArgument("a write needs 'value': the new value as text")
        if not isinstance(expected, int) or isinstance(expected, bool) or expected < 1:
            raise InvalidArgument("a write needs 'expected_version': the version it replaces (1 or more)")
        (snapshot,) = self._service.store.cache.get_variables(session_id, [name])
        try:
            value = parse_value(snapshot.type, text, snapshot.name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        # Checked as the store checks it (packed, an integer out of range would wrap around).
        value = check_value(snapshot.name, snapshot.type, snapshot.constraints, value)
        write = pb.VariableWrite(
            variable_identifier=snapshot.id,
            value=enc.pack_value(snapshot.type, value),
            expected_version=expected,
        )
        source = "web" if principal is None else f"web:{principal.name}"
        with self._service.call_in_flight():
            (written,) = await self._service.apply_writes(
                session_id, [write], source=source, metadata={}, call=call_directly
            )
        return {"variable": variable_view(written)}


# ---- ASGI plumbing ------------------------------------------------------------------------------


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _nothing() -> None:
    pass


def _query(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in scope.get("query_string", b"").decode("latin-1").split("&"):
        name, _, text = part.partition("=")
        if name:
            found[unquote_plus(name)] = unquote_plus(text)
    return found


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _cookies(scope: Scope) -> dict[str, list[str]]:
    """Every value of each cookie the request carries (a name may come more than once)."""
    found: dict[str, list[str]] = {}
    for key, value in scope["headers"]:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, text = part.strip().partition("=")
                found.setdefault(name, []).append(text)
    return found


async def _json_body(scope: Scope, receive: Receive, limit: int) -> dict[str, Any]:
    """The request's JSON object, of at most ``limit`` bytes (the limit ``max_message_bytes``)."""
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Refused(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            Status.INVALID_ARGUMENT,
            "send JSON (Content-Type: application/json)",
        )
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(HTTPStatus.BAD_REQUEST, Status.CANCELLED, "the request ended before its body")
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                Status.RESOURCE_EXHAUSTED,
                f"the request is larger than the limit max_message_bytes={limit}",
            )
        chunks.append(body)
        if not message.get("more_body", False):
            break
    try:
        parsed = json.loads(b"".join(chunks) or b"{}")
    except (ValueError, RecursionError):
        raise InvalidArgument("the request is not valid JSON (or is nested too deeply)") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("the request must be a JSON object")
    return parsed


async def _respond(
    send: Send, status: HTTPStatus, body: bytes, content_type: str, *, cache: bool = False
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"max-age=300" if cache else b"no-store"),
        *_SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: HTTPStatus, data: object, *, cookie: bytes | None = None) -> None:
    body = to_json(data).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *_SECURITY_HEADERS,
    ]
    if cookie is not None:
        headers.append((b"set-cookie", cookie))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

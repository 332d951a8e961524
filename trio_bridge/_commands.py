"""The command line's client commands (``ping``, ``session``, ``var``, ``watch``), on
:mod:`trio_bridge.client`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from ._textvalues import parse_value, plain_value, show_value
from ._types import Constraints, VariableType
from .client import DEFAULT_GIVE_UP_SECONDS, RECONNECTING, BridgeClient, Reconnect, WatchEvent, tls_context
from .storage.records import SessionInfo, VariableSnapshot


def _pairs(items: list[str] | None) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _when(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _variable_json(variable: VariableSnapshot) -> dict[str, Any]:
    return {
        "id": variable.id,
        "name": variable.name,
        "type": variable.type.label,
        "value": plain_value(variable.type, variable.value),
        "version": variable.version,
        "metadata": dict(variable.metadata),
        "last_updated_at": _when(variable.last_updated_at),
        "last_update_source": variable.last_update_source,
    }


def _variable_line(variable: VariableSnapshot) -> str:
    return (
        f"{variable.name} = {show_value(variable.type, variable.value)} "
        f"({variable.type.label}, version {variable.version})"
    )


def _session_json(session: SessionInfo) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "variables": session.variable_count,
        "ttl_seconds": session.ttl_seconds,
        "expires_at": _when(session.expires_at),
        "metadata": dict(session.metadata),
    }


def _session_line(session: SessionInfo) -> str:
    parts = [
        session.session_id,
        f"{session.variable_count} variable(s)",
        f"expires {_when(session.expires_at)}",
    ]
    parts.extend(f"{k}={v}" for k, v in sorted(session.metadata.items()))
    return "  ".join(parts)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def _none_left(args: argparse.Namespace, what: str) -> None:
    """Say that a listing is empty (text only: with --json, no lines is an empty list)."""
    if not args.json:
        print(f"(no {what})", flush=True)


def _constraints(args: argparse.Namespace) -> Constraints:
    return Constraints(
        minimum=args.min,
        maximum=args.max,
        min_length=args.min_length,
        max_length=args.max_length,
        pattern=args.pattern or "",
        allowed_values=tuple(v for v in (args.allowed or "").split(",") if v),
        dimension=args.dimension or 0,
        shape=tuple(int(d) for d in args.shape.split(",")) if args.shape else (),
        dtype=args.dtype or "",
    )


def _read(flag: str, path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def _client_token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        lines = [line.strip() for line in _read("--token-file", args.token_file).splitlines()]
        token = next((line for line in lines if line and not line.startswith("#")), "")
        if not token:
            raise ValueError(f"--token-file: {args.token_file} holds no token")
        return token
    return os.environ.get("TRIO_BRIDGE_TOKEN") or None


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS settings the flags ask for; ValueError naming the flag and file for a bad one."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    if args.tls_ca is not None:
        _read("--tls-ca", args.tls_ca)
        try:
            ssl.create_default_context(cafile=args.tls_ca)
        except ssl.SSLError:
            raise ValueError(f"--tls-ca: {args.tls_ca} holds no CA certificate (PEM)") from None
    if args.tls_cert is not None:
        _read("--tls-cert", args.tls_cert)
        _read("--tls-key", args.tls_key)
    try:
        return tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"--tls-cert/--tls-key: cannot use {args.tls_cert} with the key {args.tls_key} ({exc})"
        ) from None


async def run(args: argparse.Namespace) -> int:
    """Run one client command; errors propagate to the caller, which prints them."""
    tls = _client_tls(args)
    token = _client_token(args)
    async with BridgeClient(args.host, args.port, tls=tls, token=token) as client:
        if args.command == "ping":
            version = await client.ping()
            _emit(
                args,
                {"address": f"{args.host}:{args.port}", "server_version": version},
                f"trio-bridge {version} at {args.host}:{args.port}",
            )
        elif args.command == "session":
            await _session(client, args)
        elif args.command == "var":
            await _var(client, args)
        else:
            await _watch(client, args)
    return 0


async def _session(client: BridgeClient, args: argparse.Namespace) -> None:
    if args.action == "create":
        session = await client.create_session(args.id or "", metadata=_pairs(args.meta), ttl=args.ttl)
        _emit(args, _session_json(session), session.session_id)
    elif args.action == "get":
        session = await client.get_session(args.session)
        _emit(args, _session_json(session), _session_line(session))
    elif args.action == "list":
        sessions = await client.list_sessions()
        for session in sessions:  # with --json, one object per line
            _emit(args, _session_json(session), _session_line(session))
        if not sessions:
            _none_left(args, "sessions")
    else:
        removed = await client.cleanup_session(args.session)
        _emit(args, {"variables_removed": removed}, f"deleted {args.session} ({removed} variable(s))")


async def _var(client: BridgeClient, args: argparse.Namespace) -> None:
    if args.action == "register":
        vtype = VariableType[args.type.upper()]
        variable = await client.register_variable(
            args.session,
            args.name,
            vtype,
            parse_value(vtype, args.value, name=args.name),
            constraints=_constraints(args),
            metadata=_pairs(args.meta),
            source=args.source,
        )
        _emit(args, _variable_json(variable), _variable_line(variable))
    elif args.action == "get":
        variable = await client.get(args.session, args.name)
        _emit(args, _variable_json(variable), _variable_line(variable))
    elif args.action == "set":
        current = await client.get(args.session, args.name)
        variable = await client.set(
            args.session,
            args.name,
            parse_value(current.type, args.value, name=current.name),
            expected_version=args.expect_version,
            source=args.source,
            metadata=_pairs(args.meta),
        )
        _emit(args, _variable_json(variable), _variable_line(variable))
    elif args.action == "list":
        variables = await client.list_variables(args.session)
        for variable in variables:  # with --json, one object per line
            _emit(args, _variable_json(variable), _variable_line(variable))
        if not variables:
            _none_left(args, "variables")
    else:
        await client.delete_variable(args.session, args.name)
        _emit(args, {"deleted": args.name}, f"deleted {args.name}")


def _event_json(event: WatchEvent) -> dict[str, Any]:
    data: dict[str, Any] = {"event": event.kind, "timestamp": _when(event.timestamp)}
    if event.variable is not None:
        data.update(_variable_json(event.variable))  # "type" is the variable's type, as everywhere
        if event.old_value is not None:
            data["old_value"] = plain_value(event.variable.type, event.old_value)
        data["source"] = event.source
        data["update_metadata"] = dict(event.metadata)
    elif event.variable_id:
        data["id"] = event.variable_id
    return data


def _event_line(event: WatchEvent) -> str:
    parts = [_when(event.timestamp), event.kind]
    variable = event.variable
    if variable is not None:
        if event.kind == "variable_deleted":
            parts.append(variable.name)
        else:
            parts.append(
                f"{variable.name} = {show_value(variable.type, variable.value)} (v{variable.version})"
            )
            if event.old_value is not None:
                parts.append(f"was {show_value(variable.type, event.old_value)}")
        if event.source and event.source not in ("initial", "resync"):
            parts.append(f"by {event.source}")
        parts.extend(f"{k}={v}" for k, v in sorted(event.metadata.items()))
    elif event.variable_id:
        parts.append(event.variable_id)
    return "  ".join(parts)


async def _watch(client: BridgeClient, args: argparse.Namespace) -> None:
    """Print events until Ctrl-C; a lost server is reported on stderr while the watch retries, until
    it gives up (after ``--wait`` seconds, 30 by default; ``--wait`` alone: never)."""
    client.reconnect = Reconnect(give_up_after=args.wait)
    retrying = False
    async for event in client.watch(
        args.session,
        args.variables,
        include_initial_values=not args.no_initial,
        include_heartbeats=args.heartbeats,
        include_reconnects=True,
        heartbeat_interval=args.heartbeat_interval,
    ):
        if event.kind == RECONNECTING:
            until = "" if args.wait is None else f", giving up after {args.wait:g}s"
            print(
                f"trio-bridge: {event.error}; retrying ({event.attempt}{until})", file=sys.stderr, flush=True
            )
            retrying = True
            continue
        if retrying and event.kind == "synced":
            print(f"trio-bridge: watching again on {client.host}:{client.port}", file=sys.stderr, flush=True)
            retrying = False
        _emit(args, _event_json(event), _event_line(event))


VALUES_HELP = """values, by type (quote what your shell would split):
  float      21.5
  integer    42
  string     any text
  boolean    true or false (also 1/0, yes/no, on/off)
  choice     one of the --allowed values
  module     one of the --allowed values: like choice, for naming which component, model or
             algorithm is in use (clients switch implementation on it)
  embedding  [0.1, 0.2] or 0.1,0.2 (stored as float32)
  tensor     '{"shape": [2, 2], "dtype": "float32", "data": [1, 2, 3, 4]}'
             dtypes: bool, int8, uint8, int16, int32, int64, float16, float32, float64
"""


def _seconds(text: str) -> float | None:
    """A number of seconds, at least 0; "forever" is None."""
    if text == "forever":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, nor 'forever'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def add_client_commands(commands: Any, connection: argparse.ArgumentParser) -> None:
    """The session, var and watch subcommands; ``connection`` carries --host/--port/--json."""
    session = commands.add_parser("session", help="create, list or delete sessions").add_subparsers(
        dest="action", required=True
    )
    create = session.add_parser("create", parents=[connection], help="create a session; prints its id")
    create.add_argument("--id", help="the session id (default: one is generated)")
    create.add_argument("--ttl", type=float, help="idle seconds before it expires (default: the server's)")
    create.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata (repeatable)")
    session.add_parser("list", parents=[connection], help="list live sessions")
    get_session = session.add_parser("get", parents=[connection], help="show one session")
    get_session.add_argument("session")
    delete = session.add_parser("delete", parents=[connection], help="delete a session and its variables")
    delete.add_argument("session")

    var = commands.add_parser("var", help="register, get, set, list or delete variables").add_subparsers(
        dest="action", required=True
    )
    register = var.add_parser(
        "register",
        parents=[connection],
        help="register a typed variable",
        epilog=VALUES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register.add_argument("session")
    register.add_argument("name")
    register.add_argument("type", choices=[t.label for t in VariableType])
    register.add_argument("value", help="the initial value, typed as shown below")
    register.add_argument("--min", type=float, help="float, integer: smallest value")
    register.add_argument("--max", type=float, help="float, integer: largest value")
    register.add_argument("--min-length", type=int, help="string: fewest characters")
    register.add_argument("--max-length", type=int, help="string: most characters")
    register.add_argument("--pattern", help="string: a regular expression the whole value matches")
    register.add_argument("--allowed", help="choice, module: the allowed values, comma-separated")
    register.add_argument("--dimension", type=int, help="embedding: exact length")
    register.add_argument("--shape", help="tensor: exact shape, comma-separated")
    register.add_argument("--dtype", help="tensor: exact dtype")
    register.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata (repeatable)")
    register.add_argument("--source", default="cli", help="recorded as the change's source")
    get = var.add_parser("get", parents=[connection], help="show one variable")
    get.add_argument("session")
    get.add_argument("name", help="variable name or id")
    set_ = var.add_parser(
        "set",
        parents=[connection],
        help="write a value",
        epilog=VALUES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    set_.add_argument("session")
    set_.add_argument("name", help="variable name or id")
    set_.add_argument("value")
    set_.add_argument("--expect-version", type=int, help="only if the variable is at this version")
    set_.add_argument("--source", default="cli", help="recorded as the change's source")
    set_.add_argument(
        "--meta", action="append", metavar="KEY=VALUE", help="recorded with the change (repeatable)"
    )
    listing = var.add_parser("list", parents=[connection], help="list a session's variables")
    listing.add_argument("session")
    remove = var.add_parser("delete", parents=[connection], help="delete a variable")
    remove.add_argument("session")
    remove.add_argument("name")

    watch = commands.add_parser(
        "watch", parents=[connection], help="print every change of a session's variables until Ctrl-C"
    )
    watch.add_argument("session")
    watch.add_argument("variables", nargs="*", help="names or ids (default: the whole session)")
    watch.add_argument("--no-initial", action="store_true", help="do not print the current values first")
    watch.add_argument("--heartbeats", action="store_true", help="print heartbeats too")
    watch.add_argument("--heartbeat-interval", type=float, default=None, help="seconds (default 30)")
    watch.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_GIVE_UP_SECONDS,
        metavar="SECONDS",
        help="while the server cannot be reached, keep retrying this long (default %(default)g); "
        "'forever' never gives up, 0 gives up at the first failure",
    )
    commands.add_parser(
        "ping", parents=[connection], help="check that the server answers; prints its version"
    )

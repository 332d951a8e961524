"""``trio-bridge``: the command line. ``serve`` runs the server until SIGINT or SIGTERM; ``session``,
``var`` and ``watch`` talk to a running one. Errors print one line to stderr and exit non-zero."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from ._commands import add_client_commands
from ._config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from ._errors import BridgeError, CannotServe, Unavailable
from ._limits import ZERO_MEANS_DERIVED, Limits
from ._limits import describe as describe_limits
from ._security import Tokens, server_tls
from ._status import RemoteError, status_of
from ._version import __version__
from .storage.location import ETCD_MAX_REQUEST_BYTES, ETCD_MAX_TXN_OPS, STORE_HELP
from .storage.records import DEFAULT_SESSION_TTL

log = logging.getLogger("trio_bridge")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 65535")
    return value


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


#: Exit codes, as ``--help`` and the README list them.
EXIT_OK = 0
EXIT_REFUSED = 1  # the server answered with an error status (a client command); cannot serve (serve)
EXIT_USAGE = 2  # bad arguments, an unreadable file or value, bad settings: nothing was sent
EXIT_UNREACHABLE = 3  # the server could not be reached or talked to (or a watch gave up retrying)
EXIT_INTERRUPTED = 130  # Ctrl-C (except for `watch`, which Ctrl-C ends normally: 0)

EXIT_CODES_HELP = """exit codes:
  0    done (a watch ended by Ctrl-C, a server stopped by SIGINT/SIGTERM)
  1    the server refused the request (the message names the status); serve: cannot bind
  2    bad arguments, an unreadable file or value, bad settings (nothing was sent)
  3    the server could not be reached or talked to (a watch: after --wait seconds of retrying)
  130  interrupted by Ctrl-C

Options such as --host, --port and --json go before or after the command."""


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every client command takes. The top-level parser holds their defaults; each
    command's copy has none (``SUPPRESS``), so an option given before the command is not overwritten."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--host", default=default(DEFAULT_HOST), help=f"server address (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port", type=_port, default=default(DEFAULT_PORT), help=f"server port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON (one object per line)"
    )
    secure = parser.add_argument_group("security")
    secure.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect over TLS, trusting the system's CAs",
    )
    secure.add_argument(
        "--tls-ca", type=Path, metavar="PEM", default=default(None), help="connect over TLS, trusting this CA"
    )
    secure.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="client certificate, for mutual TLS",
    )
    secure.add_argument(
        "--tls-key", type=Path, metavar="PEM", default=default(None), help="the client certificate's key"
    )
    secure.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        default=default(None),
        help="file holding the bearer token to send (default: $TRIO_BRIDGE_TOKEN, if set)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-bridge",
        description="Session-scoped typed variables over gRPC.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trio-bridge {__version__}")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)
    connection = argparse.ArgumentParser(add_help=False)
    _connection_options(connection, top=False)
    add_client_commands(commands, connection)
    serve_cmd = commands.add_parser(
        "serve",
        help="run the server until SIGINT or SIGTERM",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cmd.add_argument(
        "--host", default=argparse.SUPPRESS, help=f"address to bind (default {DEFAULT_HOST})"
    )
    serve_cmd.add_argument(
        "--port",
        type=_port,
        default=argparse.SUPPRESS,
        help=f"port to bind, 0 for any free one (default {DEFAULT_PORT})",
    )
    serve_cmd.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="default %(default)s",
    )
    serve_cmd.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics on this port (default: off)",
    )
    serve_cmd.add_argument(
        "--session-ttl",
        type=_positive_float,
        default=DEFAULT_SESSION_TTL,
        help="idle seconds before a session expires (default %(default)s)",
    )
    serve_cmd.add_argument(
        "--shutdown-grace",
        type=_positive_float,
        default=ServerConfig.shutdown_grace,
        help="seconds running calls get to finish on shutdown (default %(default)s)",
    )
    secure = serve_cmd.add_argument_group("security (see the README's Security section)")
    secure.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="serve TLS with this certificate chain",
    )
    secure.add_argument(
        "--tls-key", type=Path, metavar="PEM", default=argparse.SUPPRESS, help="the certificate's private key"
    )
    secure.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="require client certificates signed by this CA"
    )
    secure.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="accept only the bearer tokens in this file",
    )
    web = serve_cmd.add_argument_group("web view (see the README's Web view)")
    web.add_argument(
        "--web-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve the web view on this port, on --host (default: off)",
    )
    web.add_argument(
        "--web-writable", action="store_true", help="let the web view set values (default: it only shows)"
    )
    web.add_argument(
        "--web-allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the web view answers to, besides IP addresses and localhost (repeatable)",
    )
    storage = serve_cmd.add_argument_group("state (see the README's Running several servers)")
    storage.add_argument("--store", default="memory", metavar="URL", help=f"where state lives: {STORE_HELP}")
    storage.add_argument("--etcd-ca", type=Path, metavar="PEM", help="etcds://: trust this CA for etcd")
    storage.add_argument(
        "--etcd-cert", type=Path, metavar="PEM", help="etcds://: client certificate for etcd"
    )
    storage.add_argument("--etcd-key", type=Path, metavar="PEM", help="the etcd client certificate's key")
    storage.add_argument("--etcd-user", metavar="NAME", help="etcd user (etcd with authentication on)")
    storage.add_argument(
        "--etcd-password-file", type=Path, metavar="PATH", help="file holding the etcd user's password"
    )
    storage.add_argument(
        "--etcd-max-request-bytes",
        type=int,
        default=ETCD_MAX_REQUEST_BYTES,
        metavar="N",
        help="etcd's --max-request-bytes, if not its default (default %(default)s)",
    )
    storage.add_argument(
        "--etcd-max-txn-ops",
        type=int,
        default=ETCD_MAX_TXN_OPS,
        metavar="N",
        help="etcd's --max-txn-ops, if not its default (default %(default)s)",
    )
    limits = serve_cmd.add_argument_group("limits (see the README's Limits table)")
    for name, default, what in describe_limits():
        limits.add_argument(
            "--" + name.replace("_", "-"),
            # 0 asks the server to work a limit out (max_connections: from the open-file limit)
            type=_whole_number(0 if name in ZERO_MEANS_DERIVED else 1),
            default=default,
            metavar="N",
            help=f"{what} (default %(default)s)",
        )
    return parser


#: Tracked objects allocated (net of those freed) before Python collects its youngest generation; its
#: default, 700, means a collection every few deliveries of a large fan-out, and each one moves what is
#: in flight into older generations, which brings on full collections.
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Tune the garbage collector for a long-running server (``trio-bridge serve`` calls this once it
    listens). What start-up made (modules, classes, the server itself: some 40,000 objects) lives as
    long as the process, so it is frozen out of the collector's sight; and the youngest generation is
    collected every ``GC_YOUNG_THRESHOLD`` allocations instead of 700. Without both, a full collection
    (60-80 ms with 1,000 open streams) landed every few fan-outs and held them up (README,
    performance). Objects that die by reference count are freed at once either way."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def run_until_signalled(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM arrives, then shut down gracefully."""
    from ._server import serve  # brings in trio-asyncio: only the server needs it

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, config)
            settle_heap()
            # The exact line tests and scripts wait for: it means the port accepts connections.
            print(f"trio-bridge serving on {running.host}:{running.port}", flush=True)
            if running.web_port is not None:
                scheme = "https" if config.tls_cert is not None else "http"
                host = f"[{running.host}]" if ":" in running.host else running.host  # an IPv6 address
                print(f"trio-bridge web view on {scheme}://{host}:{running.web_port}/", flush=True)
            async for signum in signals:
                log.info("%s received; shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    # The client's own reports (a watch's reconnects) reach the user as the command's lines.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    from . import _commands

    try:
        return asyncio.run(_commands.run(args))
    except KeyboardInterrupt:
        # Ctrl-C is how `watch` is meant to end.
        return EXIT_OK if args.command == "watch" else EXIT_INTERRUPTED
    except Unavailable as exc:
        print(f"trio-bridge: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        print(f"trio-bridge: {exc}", file=sys.stderr)
    except BridgeError as exc:
        print(f"trio-bridge: {status_of(exc).name}: {exc}", file=sys.stderr)
    except ValueError as exc:
        print(f"trio-bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the client raises Unavailable for these: this is a last resort
        print(f"trio-bridge: cannot reach {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client_only = [
        flag
        for flag, given in (("--json", args.json), ("--tls", args.tls), ("--tls-ca", args.tls_ca))
        if given
    ]
    if client_only:
        print(f"trio-bridge: serve does not take {', '.join(client_only)} (client options)", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            session_ttl=args.session_ttl,
            metrics_port=args.metrics_port,
            shutdown_grace=args.shutdown_grace,
            limits=Limits(**{name: getattr(args, name) for name, _, _ in describe_limits()}),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token_file=args.token_file,
            store=args.store,
            etcd_ca=args.etcd_ca,
            etcd_cert=args.etcd_cert,
            etcd_key=args.etcd_key,
            etcd_user=args.etcd_user,
            etcd_password_file=args.etcd_password_file,
            etcd_max_request_bytes=args.etcd_max_request_bytes,
            etcd_max_txn_ops=args.etcd_max_txn_ops,
            web_port=args.web_port,
            web_writable=args.web_writable,
            web_allowed_hosts=tuple(name.lower() for name in args.web_allowed_host),
        )
        # Read now, so a bad file is one line and exit code 2, before anything is bound.
        if config.token_file is not None:
            Tokens.load(config.token_file)
        if config.tls_cert is not None and config.tls_key is not None:
            server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    except (ValueError, OSError) as exc:
        print(f"trio-bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    failure = ""
    try:
        trio.run(run_until_signalled, config)
    except* OSError as group:
        # Binding failed (port taken, address not on this machine): one line, no traceback. An error
        # that names its own address (the metrics port) says it itself.
        failures = _leaves(group)
        named = [str(exc) for exc in failures if isinstance(exc, CannotServe)]
        failure = "; ".join(named) or (
            f"cannot serve on {args.host}:{args.port}: " + "; ".join(str(exc) for exc in failures)
        )
    if failure:
        print(f"trio-bridge: {failure}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

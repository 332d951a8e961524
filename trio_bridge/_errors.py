"""The errors the store raises, one per way a request can be refused.

They carry no gRPC: ``_status`` maps each to its status code, so the store stays usable without a server.
Every message names what was wrong (the variable, the rule, the value) so that a client can act on it.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every refusal; ``str(error)`` is the message a client sees."""

    #: The stream it ends was cut inside a message, so it can carry no status: it is reset instead
    #: (HTTP/2 ENHANCE_YOUR_CALM, which gRPC clients read as RESOURCE_EXHAUSTED).
    stream_cut = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def trailers(self) -> dict[str, str]:
        """Machine-readable details, sent to the client as trailing metadata with the status."""
        return {}


class NotFound(BridgeError):
    """An unknown (or expired) session, or an unknown variable."""


class InvalidArgument(BridgeError):
    """Malformed input, or a value that breaks its variable's type or constraints."""


class AlreadyExists(BridgeError):
    """A session id or a variable name that is already taken."""


class VersionConflict(BridgeError):
    """A compare-and-set write whose expected version is not the variable's current one."""

    def __init__(self, variable: str, expected: int, current: int) -> None:
        super().__init__(
            f"variable {variable!r}: expected version {expected}, but the current version is "
            f"{current}; nothing was changed"
        )
        self.variable = variable
        self.expected = expected
        self.current = current

    @property
    def trailers(self) -> dict[str, str]:
        return {
            "trio-bridge-variable": self.variable,
            "trio-bridge-expected-version": str(self.expected),
            "trio-bridge-current-version": str(self.current),
        }


class Unauthenticated(BridgeError):
    """No token, or one the server does not accept."""


class Unimplemented(BridgeError):
    """Something the server does not do, such as decompress a compressed request message."""


class Unavailable(BridgeError):
    """The server is shutting down, or cannot reach its store; ``details`` go to the client as
    trailing metadata. On the client side also: the server could not be reached or talked to, or the
    connection was lost; then ``address`` is the ``(host, port)`` tried, and ``retryable`` is False
    when trying again cannot help (TLS on one side only, an untrusted certificate, not a gRPC server)."""

    def __init__(
        self,
        message: str,
        details: dict[str, str] | None = None,
        *,
        address: tuple[str, int] | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.details = dict(details or {})
        self.address = address
        self.retryable = retryable

    @property
    def trailers(self) -> dict[str, str]:
        return self.details


#: Trailers of a RESOURCE_EXHAUSTED that a configured limit caused: the limit's name and value.
LIMIT_TRAILER = "trio-bridge-limit"
LIMIT_VALUE_TRAILER = "trio-bridge-limit-value"


class ResourceExhausted(BridgeError):
    """A limit was reached; ``details`` go to the client as trailing metadata."""

    def __init__(self, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.details = dict(details or {})

    @classmethod
    def over_limit(cls, message: str, limit: str, value: int) -> ResourceExhausted:
        """A refusal because of the configured limit ``limit``; the message should name it too."""
        return cls(message, {LIMIT_TRAILER: limit, LIMIT_VALUE_TRAILER: str(value)})

    @property
    def limit(self) -> str | None:
        """The name of the limit that caused this, if a configured limit did."""
        return self.details.get(LIMIT_TRAILER)

    @property
    def trailers(self) -> dict[str, str]:
        return self.details


class CannotServe(OSError):
    """An address the server could not bind, its message naming which (the metrics port, say)."""

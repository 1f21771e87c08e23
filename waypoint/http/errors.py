"""The HTTP codec's closed error taxonomy: peer violations (HttpError) vs local misuse."""
from __future__ import annotations

__all__ = ["HttpError", "LocalProtocolError"]


class HttpError(Exception):
    """The peer sent bytes we refuse. `status` is the response to send downstream (400, 413,
    417, 431, 501) or, for an upstream response, 502; `reason` is a stable snake_case word
    usable as a metric label and access-log field. The connection is unusable afterwards."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {message}" if message else ""))
        self.status = status
        self.reason = reason


class LocalProtocolError(Exception):
    """Our own caller misused the codec (event out of order, body longer than its
    Content-Length, CR/LF in a header it built). A bug, never the peer's fault."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason + (f": {message}" if message else ""))
        self.reason = reason

"""Events the sans-IO HTTP/1.1 codec returns and accepts (frozen, slotted dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass

from mesh.fastinit import fast_init

__all__ = ["Headers", "RequestHead", "ResponseHead", "InformationalResponse", "Body", "EndOfMessage",
           "ConnectionClosed", "Event"]

Headers = tuple[tuple[bytes, bytes], ...]
"""End-to-end header fields in arrival order, names lowercased, values as received."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHead:
    """A request line plus end-to-end headers. Framing lives in fields, not in `headers`:
    hop-by-hop fields, Content-Length, Transfer-Encoding and Expect are never in `headers`."""

    method: bytes
    """Upper-case token as sent, e.g. b"GET"."""
    target: bytes
    """The request-target as sent (origin-form b"/a?b", absolute-form, or b"*")."""
    path: bytes = b""
    """Path part of the target (b"/" for b"*" and for an absolute-form target without a path)."""
    query: bytes = b""
    """Query without the '?' (b"" if none)."""
    headers: Headers = ()
    http_version: str = "1.1"
    """"1.0" or "1.1"; serialization toward upstream always uses HTTP/1.1."""
    keep_alive: bool = True
    """Parsed: the client allows another request on this connection (RFC 9112 9.3)."""
    content_length: int | None = None
    """Body length when framed by Content-Length; None when chunked or bodyless."""
    chunked: bool = False
    """Body framed by Transfer-Encoding: chunked (length unknown up front)."""
    expect_continue: bool = False
    """The client sent `Expect: 100-continue` and may wait for a 100 before its body."""
    upgrade: bytes | None = None
    """b"websocket" when the client asked to switch to WebSocket (`Upgrade: websocket`,
    `Connection: upgrade`): sent on upstream as such; if a 101 answers it, both connections
    carry raw bytes from then on (Body events, then the end of the connection)."""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHead:
    """A final (status >= 200) response head, or the 101 that switches an upgrade request's
    connection to raw bytes; framing fields as in RequestHead."""

    status: int
    reason: bytes = b""
    """Reason phrase; b"" means the standard phrase for `status` is sent."""
    headers: Headers = ()
    http_version: str = "1.1"
    keep_alive: bool = True
    """Parsed: the upstream connection may be reused. Ignored by ServerConnection.send, which
    decides downstream persistence itself (see codec module docstring)."""
    content_length: int | None = None
    chunked: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class InformationalResponse:
    """An interim 1xx response (100 Continue, 103 Early Hints); never 101."""

    status: int
    reason: bytes = b""
    headers: Headers = ()


@fast_init
@dataclass(frozen=True, slots=True)
class Body:
    """A piece of message body, already de-chunked."""

    data: bytes | memoryview


@fast_init
@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The message is complete; `trailers` only from (and only sent to) chunked peers."""

    trailers: Headers = ()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its sending side cleanly between messages (receive_data(b""))."""


Event = RequestHead | ResponseHead | InformationalResponse | Body | EndOfMessage | ConnectionClosed

"""Events the sans-IO HTTP/2 connection returns to its I/O layer (frozen dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HandshakeCompleted", "RequestReceived", "RequestRejected", "ResponseReceived", "StreamEnded",
           "StreamReset", "SendUnblocked", "GoAway"]

# -- events (frame-level DataReceived is passed through unchanged) --------------------------

@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """The peer's first SETTINGS arrived: the connection is usable."""


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server: a valid CONNECT opened `stream_id`."""

    stream_id: int
    authority: str
    headers: tuple[tuple[str, str], ...]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server: a CONNECT was refused by the connection itself (status 400, or 0 when the
    stream was refused with RST_STREAM because of MAX_CONCURRENT_STREAMS / GOAWAY)."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client: the final response to our CONNECT."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer ended its side of the stream with trailers (END_STREAM on HEADERS)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone: reset by the peer (`remote`) or by us after a stream error."""

    stream_id: int
    error_code: int
    remote: bool
    reason: str


@dataclass(frozen=True, slots=True)
class SendUnblocked:
    """Window reopened and all data held back for `stream_id` was framed."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug_data: bytes

"""What the HTTP/1.1 path needs of HTTP/2 without loading h2: the connection preface and the current stream's context variable."""
from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .downstream import ServerStream

__all__ = ["PREFACE", "current_stream"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""RFC 9113 §3.4: what a prior-knowledge HTTP/2 client sends first."""

current_stream: contextvars.ContextVar[ServerStream | None] = contextvars.ContextVar("h2_stream", default=None)
"""The HTTP/2 stream whose request the running task serves (each stream has its own task):
what the pipeline's telemetry reads the response's grpc-status from (None on HTTP/1.1)."""

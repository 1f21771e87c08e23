"""Request timeouts and gRPC: a gRPC client's `grpc-timeout` capped by the route's, and the gRPC form of local replies.

Envoy (router `FilterUtility::finalTimeout`): for a gRPC request on a route with
`max_grpc_timeout` set -- Istio sets it on every route, equal to the route timeout, 0 meaning
none (istio-l7-defaults A6) -- the timeout is the `grpc-timeout` header capped by that maximum,
a missing or zero header meaning "no limit of its own". So with no VirtualService timeout a
gRPC client's deadline is honoured as sent.

A local reply to a gRPC request is given in gRPC form (Envoy `sendLocalReply` with is_grpc):
HTTP 200, `content-type: application/grpc`, `grpc-status` from the HTTP status by gRPC's
HTTP-to-gRPC table (Envoy `Grpc::Utility::httpToGrpcStatus`), `grpc-message` the body; a
timeout answers DEADLINE_EXCEEDED (4), as Envoy does since envoyproxy/envoy#44479 (2026; it was
UNAVAILABLE before).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote

__all__ = ["parse_grpc_timeout", "is_grpc", "request_timeout", "grpc_status_for", "grpc_local_reply_headers",
           "DEADLINE_EXCEEDED"]

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
DEADLINE_EXCEEDED = 4
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
"""gRPC's http-grpc-status-mapping.md, as Envoy applies it; anything else is UNKNOWN (2)."""


def parse_grpc_timeout(value: str) -> float | None:
    """Seconds from a `grpc-timeout` value (1-8 ASCII digits and a unit H M S m u n, gRPC's
    PROTOCOL-HTTP2); None when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not 1 <= len(digits) <= 8 or not (digits.isascii() and digits.isdigit()) or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    ct = next((v for n, v in headers if n == b"content-type"), b"")
    return ct.lower().startswith(b"application/grpc")


def request_timeout(route_timeout: float | None, headers: Sequence[tuple[bytes, bytes]], *,
                    grpc: bool | None = None) -> float | None:
    """The request's timeout in seconds (None: none): the route's, or for gRPC the client's
    `grpc-timeout` capped by it. `grpc`: `is_grpc(headers)` if the caller has it already."""
    if not (is_grpc(headers) if grpc is None else grpc):
        return route_timeout
    raw = next((v for n, v in headers if n == b"grpc-timeout"), None)
    g = parse_grpc_timeout(raw.decode("latin-1")) if raw is not None else None
    if not g:
        return route_timeout
    return g if route_timeout is None else min(g, route_timeout)


def grpc_status_for(http_status: int) -> int:
    return _HTTP_TO_GRPC.get(http_status, 2)


def grpc_local_reply_headers(grpc_status: int, message: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """Headers of a trailers-only gRPC local reply (`grpc-message` percent-encoded)."""
    hs = [(b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % grpc_status)]
    if message:
        hs.append((b"grpc-message", quote(message.decode("latin-1"), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
                   .encode()))
    return tuple(hs)

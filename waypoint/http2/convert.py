"""Pure HTTP/2 <-> waypoint message conversion: pseudo-headers, Host/:authority, framing fields, cookies.

The pipeline works on the HTTP/1.1 codec's events (waypoint/http/events.py), so an HTTP/2
stream is expressed in them: `:method`/`:path` become the request line, `:authority` becomes
the `host` field (routing and policy read it there, as for HTTP/1.1), content-length goes to
`RequestHead.content_length`, a body of unknown length is `chunked=True` (re-framed chunked
if it goes to an HTTP/1.1 backend), split `cookie` fields are joined (RFC 9113 8.2.3) and
`http_version` is "2". Going out as HTTP/2 the reverse holds, and connection-specific fields
(RFC 9113 8.2.2) never appear; `te: trailers` is always sent upstream because the waypoint
forwards trailers (gRPC servers require it).
"""
from __future__ import annotations

from waypoint.http import HOP_BY_HOP, HttpError, RequestHead, ResponseHead

__all__ = ["request_from_h2", "request_to_h2", "response_from_h2", "response_to_h2", "trailers_from_h2",
           "trailers_to_h2", "is_grpc", "grpc_status_of"]

_CONNECTION_SPECIFIC = HOP_BY_HOP | frozenset([b"host", b"content-length", b"expect", b"http2-settings"])
_NOT_IN_TRAILERS = frozenset([b"content-length", b"host", b"transfer-encoding", b"connection", b"te",
                              b"trailer", b"upgrade", b"keep-alive", b"proxy-connection"])


def _bad(reason: str, message: str) -> HttpError:
    return HttpError(400, reason, message)


def request_from_h2(headers, end_stream: bool) -> RequestHead:
    """A RequestHead for a request HEADERS block (names lowercase bytes, pseudo-headers first,
    as h2 validates them). Raises HttpError 400/501 for what the waypoint cannot serve."""
    method = path = authority = scheme = protocol = None
    regular: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host = None
    content_length: int | None = None
    expect = False
    for n, v in headers:
        if n[:1] == b":":
            if n == b":method":
                method = v
            elif n == b":path":
                path = v
            elif n == b":authority":
                authority = v
            elif n == b":scheme":
                scheme = v
            elif n == b":protocol":
                protocol = v
            else:
                raise _bad("bad_pseudo_header", n.decode("latin-1"))
        elif n == b"cookie":
            cookies.append(v)
        elif n == b"host":
            host = v
        elif n == b"content-length":
            if not v.isdigit() or (content_length is not None and int(v) != content_length):
                raise _bad("bad_content_length", v.decode("latin-1"))
            content_length = int(v)
        elif n == b"expect":
            if v.lower() != b"100-continue":
                raise HttpError(417, "unsupported_expectation", v.decode("latin-1"))
            expect = True
        elif n in _CONNECTION_SPECIFIC:
            continue      # te: trailers (the only form h2 admits) is re-created upstream
        else:
            regular.append((n, v))
    if method is None:
        raise _bad("missing_method", ":method is required")
    if method == b"CONNECT" or protocol is not None:
        raise HttpError(501, "connect_not_supported", "CONNECT (and extended CONNECT) over HTTP/2")
    if path is None or scheme is None:
        raise _bad("missing_path", ":path and :scheme are required")
    if not path.startswith(b"/") and path != b"*":
        raise _bad("bad_path", path.decode("latin-1"))
    authority = authority if authority is not None else host
    if not authority:
        raise _bad("missing_authority", ":authority or host is required")
    if cookies:
        regular.append((b"cookie", b"; ".join(cookies)))
    p, _, q = path.partition(b"?")
    if end_stream:
        if content_length:
            raise _bad("bad_content_length", "END_STREAM with a non-zero content-length")
        chunked = False
    else:
        chunked = content_length is None
    return RequestHead(method=method, target=path, path=b"/" if path == b"*" else p, query=q,
                       headers=((b"host", authority), *regular), http_version="2", keep_alive=True,
                       content_length=content_length, chunked=chunked, expect_continue=expect)


def _authority_and_path(head: RequestHead) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    authority = b""
    rest = []
    for n, v in head.headers:
        if n == b"host":
            if not authority:
                authority = v
        elif n not in _CONNECTION_SPECIFIC:
            rest.append((n, v))
    target = head.target
    if target[:1] != b"/" and target != b"*":      # absolute-form: keep only path and query
        after = target.partition(b"://")[2]
        slash = after.find(b"/")
        if not authority:
            authority = after[:slash] if slash >= 0 else after
        target = after[slash:] if slash >= 0 else b"/"
    return authority, target, rest


def request_to_h2(head: RequestHead, *, scheme: bytes = b"http") -> list[tuple[bytes, bytes]]:
    """The HEADERS block for `head` going upstream as HTTP/2."""
    authority, target, rest = _authority_and_path(head)
    out = [(b":method", head.method), (b":scheme", scheme), (b":authority", authority), (b":path", target)]
    if head.content_length is not None and (head.content_length or head.method in (b"POST", b"PUT", b"PATCH")):
        out.append((b"content-length", b"%d" % head.content_length))
    out.append((b"te", b"trailers"))
    out.extend(rest)
    return out


def response_from_h2(headers, end_stream: bool) -> ResponseHead:
    """A ResponseHead for a response HEADERS block. A response that ends with its HEADERS
    (gRPC trailers-only, 204, HEAD) says content_length=0 when it gives none, so the HTTP/2
    server side can send it as one HEADERS+END_STREAM again."""
    status = 0
    regular: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    for n, v in headers:
        if n == b":status":
            if not (len(v) == 3 and v.isdigit()):
                raise HttpError(502, "bad_status", v.decode("latin-1"))
            status = int(v)
        elif n[:1] == b":":
            raise HttpError(502, "bad_pseudo_header", n.decode("latin-1"))
        elif n == b"content-length":
            if not v.isdigit():
                raise HttpError(502, "bad_content_length", v.decode("latin-1"))
            content_length = int(v)
        elif n not in _CONNECTION_SPECIFIC:
            regular.append((n, v))
    if not status:
        raise HttpError(502, "missing_status", ":status is required")
    if end_stream and content_length is None:
        content_length = 0
    return ResponseHead(status=status, headers=tuple(regular), http_version="2", content_length=content_length)


def response_to_h2(head: ResponseHead, *, bodyless: bool) -> list[tuple[bytes, bytes]]:
    """The HEADERS block for `head` going downstream as HTTP/2 (`bodyless`: a response to
    HEAD, or 204/304, whose content-length is information only)."""
    out = [(b":status", b"%d" % head.status)]
    if head.content_length is not None and head.status != 204 and (head.content_length or not bodyless
                                                                    or head.status != 304):
        out.append((b"content-length", b"%d" % head.content_length))
    out.extend((n, v) for n, v in head.headers if n not in _CONNECTION_SPECIFIC)
    return out


def trailers_from_h2(headers) -> tuple[tuple[bytes, bytes], ...]:
    """Trailer fields as the EndOfMessage carries them (pseudo-headers are not allowed there)."""
    out = []
    for n, v in headers:
        if n[:1] == b":":
            raise HttpError(400, "pseudo_header_in_trailers", n.decode("latin-1"))
        if n not in _NOT_IN_TRAILERS:
            out.append((n, v))
    return tuple(out)


def trailers_to_h2(trailers) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in trailers if n not in _NOT_IN_TRAILERS and n[:1] != b":"]


def is_grpc(headers) -> bool:
    """A gRPC request: content-type application/grpc (with +proto/;... suffixes)."""
    for n, v in headers:
        if n == b"content-type":
            return v[:16].lower() == b"application/grpc"
    return False


def grpc_status_of(headers) -> str | None:
    for n, v in headers:
        if n == b"grpc-status":
            return v.decode("latin-1")
    return None

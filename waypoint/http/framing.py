"""HTTP/1.1 message framing for a proxy: limits, hop-by-hop filtering, head and chunk serialization."""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from .errors import LocalProtocolError
from .events import Headers

__all__ = ["Limits", "HOP_BY_HOP", "split_fields", "serialize_head", "head",
           "LAST_CHUNK", "STATUS_LINES", "status_line"]

# RFC 9110 7.6.1 connection-specific fields, plus Proxy-* (RFC 9110 11.7, legacy
# Proxy-Connection) and the framing fields this codec re-creates itself.
HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"])
_FRAMING = frozenset([b"content-length", b"expect", b"host"])
_SPECIAL = HOP_BY_HOP | _FRAMING
# Fields a trailer section must not carry (RFC 9110 6.5.1): framing, routing, auth.
_NOT_IN_TRAILERS = HOP_BY_HOP | frozenset([b"content-length", b"expect", b"host", b"authorization",
                                           b"set-cookie", b"cookie", b"content-type", b"content-encoding"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-connection parsing limits; exceeding one is an HttpError, never a crash."""

    max_head_size: int = 64 * 1024
    """Bytes of request/status line plus header fields (and of a trailer section) -> 431."""
    max_headers: int = 100
    """Header (or trailer) fields per message -> 431."""
    max_body_size: int | None = None
    """Request body bytes (declared or streamed); None = unlimited -> 413."""


def split_fields(raw: list[tuple[bytes, bytes]]
                 ) -> tuple[Headers, bytes | None, bytes | None, bytes | None, int, bytes | None]:
    """Drop hop-by-hop fields (and those Connection names) from `raw`, recording framing ones:
    (headers, content_length, transfer_encoding, expect, host_count, upgrade), the last five
    as received (Transfer-Encoding fields joined with ", "; Upgrade is never passed on).

    `raw` names are already lowercased. One pass builds the result (one set test per
    ordinary field); a second, only when a Connection header lists extra names, removes those."""
    out = []
    append = out.append
    listed: set[bytes] | None = None
    cl = te = expect = upgrade = None
    hosts = 0
    for hv in raw:
        n = hv[0]
        if n not in _SPECIAL:
            append(hv)
        elif n == b"host":
            hosts += 1
            append(hv)
        elif n == b"content-length":
            cl = hv[1]
        elif n == b"connection":
            toks = {t.strip().lower() for t in hv[1].split(b",")}
            toks.discard(b"close")
            toks.discard(b"keep-alive")
            if toks:
                listed = toks if listed is None else listed | toks
        elif n == b"transfer-encoding":
            te = hv[1] if te is None else te + b", " + hv[1]
        elif n == b"upgrade":
            upgrade = hv[1]
        elif n == b"expect":
            expect = hv[1]
    if listed:
        out = [hv for hv in out if hv[0] not in listed]
    return tuple(out), cl, te, expect, hosts, upgrade


def filter_trailers(raw: list[tuple[bytes, bytes]]) -> Headers:
    """Trailer fields minus those a trailer section may not carry."""
    return tuple(hv for hv in raw if hv[0] not in _NOT_IN_TRAILERS)


def _field_block(headers: Headers, extra: list[bytes]) -> bytes:
    """`name: value\\r\\n` for each field and each pre-built `extra` line; checked for CR/LF
    injection with two C-level counts over the whole block instead of a per-field scan."""
    lines = [b": ".join(hv) for hv in headers]
    lines += extra
    if not lines:
        return b""
    block = b"\r\n".join(lines)
    n = len(lines) - 1
    if block.count(b"\n") != n or block.count(b"\r") != n or b"\x00" in block:
        raise LocalProtocolError("header_injection", "CR, LF or NUL inside a header name or value")
    return block + b"\r\n"


def serialize_head(start_line: bytes, headers: Headers, extra: list[bytes]) -> bytes:
    """One bytes object: start line, fields, framing lines, blank line."""
    return start_line + _field_block(headers, extra) + b"\r\n"


def head(start_line: bytes, headers: Headers, framing: bytes) -> bytes:
    """serialize_head for the codec: `framing` is its own lines (CRLF-terminated, built from
    numbers, constants and values it has checked, so not scanned again). One C-level join
    over the fields (no Python call per field), then the same two counts for CR/LF injection
    as _field_block."""
    if not headers:
        return start_line + framing + b"\r\n"
    block = b"\r\n".join(map(b": ".join, headers))
    n = len(headers) - 1
    if block.count(b"\n") != n or block.count(b"\r") != n or b"\x00" in block:
        raise LocalProtocolError("header_injection", "CR, LF or NUL inside a header name or value")
    return b"%b%b\r\n%b\r\n" % (start_line, block, framing)


STATUS_LINES: dict[int, bytes] = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode())
                                   for s in HTTPStatus}


def status_line(status: int, reason: bytes) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`; the standard phrase when `reason` is empty."""
    if not 100 <= status <= 999:
        raise LocalProtocolError("bad_status", f"status {status} is not three digits")
    if not reason:
        line = STATUS_LINES.get(status)
        return line if line is not None else b"HTTP/1.1 %d \r\n" % status
    if b"\r" in reason or b"\n" in reason:
        raise LocalProtocolError("header_injection", "CR or LF in a reason phrase")
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


LAST_CHUNK = b"0\r\n\r\n"


def last_chunk(trailers: Headers) -> bytes:
    """The zero chunk plus an optional trailer section."""
    if not trailers:
        return LAST_CHUNK
    return b"0\r\n" + _field_block(filter_trailers(list(trailers)), []) + b"\r\n"

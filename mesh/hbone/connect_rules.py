"""HBONE CONNECT request rules (RFC 9113 §8.5, §8.2.2): pure checks on decoded header lists."""
from __future__ import annotations

import re

__all__ = ["validate_connect", "regular_headers"]

# RFC 9113 §8.2.2 connection-specific fields are malformed in HTTP/2.
_CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive",
                                  b"transfer-encoding", b"upgrade"))
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
_AUTHORITY = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+):([0-9]{1,5})$")


def regular_headers(headers, start: int) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """Decoded regular headers from index `start`, or a rejection reason if one is malformed."""
    out = []
    for name, value in headers[start:]:
        if name[:1] == b":":
            return (), "pseudo_header_after_regular"
        if not _TOKEN.fullmatch(name):
            return (), "invalid_header_name"
        if _BAD_VALUE.search(value):
            return (), "invalid_header_value"
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return (), "connection_specific_header"
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    return tuple(out), None


def validate_connect(headers) -> tuple[str, tuple[tuple[str, str], ...]] | str:
    """(authority, regular headers) of a valid HBONE CONNECT, else a rejection reason."""
    method = authority = None
    i = 0
    for i, (name, value) in enumerate(headers):
        if name[:1] != b":":
            break
        if name == b":method":
            if method is not None:
                return "duplicate_pseudo_header"
            method = value
        elif name == b":authority":
            if authority is not None:
                return "duplicate_pseudo_header"
            authority = value
        elif name in (b":scheme", b":path"):
            return "scheme_or_path_present"      # §8.5: a plain CONNECT carries neither
        else:
            return "unknown_pseudo_header"
    else:
        i = len(headers)
    regular, bad = regular_headers(headers, i)
    if bad:
        return bad
    if method is None:
        return "missing_method"
    if method != b"CONNECT":
        return "not_connect"
    if not authority:
        return "missing_authority"
    auth = authority.decode("latin-1")
    m = _AUTHORITY.fullmatch(auth)
    if m is None or not 0 < int(m.group(2)) <= 65535:
        return "bad_authority"
    return auth, regular

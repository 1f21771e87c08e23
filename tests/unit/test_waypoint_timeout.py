"""grpc-timeout parsing, the request timeout a route and a gRPC client give, gRPC local replies."""
from __future__ import annotations

import pytest

from waypoint.resilience.timeout import (grpc_local_reply_headers, grpc_status_for, is_grpc, parse_grpc_timeout,
                                         request_timeout)

G = ((b"content-type", b"application/grpc+proto"),)


@pytest.mark.parametrize("value, want", [
    ("1S", 1.0), ("300m", 0.3), ("2M", 120.0), ("1H", 3600.0), ("5000u", 0.005), ("7n", 7e-9),
    ("99999999S", 99999999.0), ("123456789S", None), ("S", None), ("1", None), ("1s", None), ("-1S", None),
    ("", None), ("1.5S", None), ("١S", None),
])
def test_parse_grpc_timeout(value, want):
    assert parse_grpc_timeout(value) == (pytest.approx(want) if want else want)


@pytest.mark.parametrize("route, headers, want", [
    (None, (), None),
    (2.0, (), 2.0),
    (None, G + ((b"grpc-timeout", b"300m"),), 0.3),                   # no route timeout: the client's
    (0.1, G + ((b"grpc-timeout", b"300m"),), 0.1),                    # capped by the route's
    (2.0, G + ((b"grpc-timeout", b"300m"),), 0.3),
    (2.0, G + ((b"grpc-timeout", b"0S"),), 2.0),                      # 0: no limit of its own
    (2.0, G + ((b"grpc-timeout", b"soon"),), 2.0),                    # malformed: ignored
    (None, ((b"grpc-timeout", b"300m"),), None),                      # not gRPC: header ignored
])
def test_request_timeout(route, headers, want):
    assert request_timeout(route, headers) == want
    # The caller's own is_grpc() answer (attempts.py computes it once per request) gives the same.
    assert request_timeout(route, headers, grpc=is_grpc(headers)) == want


@pytest.mark.parametrize("http, grpc", [(400, 13), (401, 16), (403, 7), (404, 12), (429, 14), (502, 14),
                                        (503, 14), (504, 14), (500, 2), (418, 2)])
def test_http_to_grpc_status(http, grpc):
    assert grpc_status_for(http) == grpc


def test_grpc_local_reply_headers_percent_encode_the_message():
    assert grpc_local_reply_headers(14, b"no healthy upstream\n%") == (
        (b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
        (b"grpc-message", b"no healthy upstream%0A%25"))

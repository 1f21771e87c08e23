"""waypoint.http: requests pipelined after a stripped (non-WebSocket) Upgrade are parsed, and refused, as any others."""
from __future__ import annotations

import pytest

from waypoint.http import EndOfMessage, HttpError, RequestHead, ServerConnection

H2C = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"


def test_a_closing_request_after_a_stripped_upgrade_ends_the_connection():
    s = ServerConnection()
    ev = s.receive_data(H2C + b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /3 HTTP/1.1\r\n")
    assert [type(e) for e in ev] == [RequestHead, EndOfMessage, RequestHead, EndOfMessage]
    assert ev[0].upgrade is None and ev[2].target == b"/2" and not ev[2].keep_alive
    assert s.receive_data(b"Host: a\r\n\r\n") == []      # nothing after a request that closes


def test_a_bad_request_after_a_stripped_upgrade_is_an_http_error():
    s = ServerConnection()
    with pytest.raises(HttpError) as e:
        s.receive_data(H2C + b"GET /2 HTTP/1.1\r\n\r\n")
    assert (e.value.status, e.value.reason) == (400, "missing_host")
    with pytest.raises(HttpError):          # the connection stays failed
        s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")

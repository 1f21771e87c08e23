"""waypoint.http: the rest of a request whose early response was already sent is still parsed (no crash)."""
from __future__ import annotations

from waypoint.http import Body, EndOfMessage, ResponseHead, ServerConnection


def test_request_body_arriving_after_its_early_response_is_parsed():
    s = ServerConnection()
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    out = s.send(ResponseHead(status=413, content_length=0)) + s.send(EndOfMessage())
    assert b"connection: close" in out and s.should_close
    assert s.receive_data(b"cd") == [Body(b"cd"), EndOfMessage()]

"""waypoint.http codec: WebSocket upgrades (RFC 6455 4.1/4.2) switched to raw bytes on both connections."""
from __future__ import annotations

import pytest

from waypoint.http import (Body, ClientConnection, EndOfMessage, HttpError, LocalProtocolError, RequestHead,
                           ResponseHead, ServerConnection)
from waypoint.http.codec import SendState

WS_REQ = (b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
WS_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def test_server_side_upgrade_request_then_raw_bytes():
    s = ServerConnection()
    ev = s.receive_data(WS_REQ + b"\x81\x05early")
    head = ev[0]
    assert isinstance(head, RequestHead) and head.upgrade == b"websocket" and head.content_length is None
    assert dict(head.headers)[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert b"upgrade" not in dict(head.headers) and b"connection" not in dict(head.headers)
    assert ev[1:] == [EndOfMessage(), Body(b"\x81\x05early")]
    assert s.receive_data(b"GET / HTTP/1.1\r\n\r\n") == [Body(b"GET / HTTP/1.1\r\n\r\n")]   # never parsed again
    out = s.send(ResponseHead(status=101, headers=((b"sec-websocket-accept", b"x"),)))
    assert out == (b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: x\r\nconnection: upgrade\r\n"
                   b"upgrade: websocket\r\n\r\n")
    assert s.state is SendState.TUNNEL and not s.should_close
    assert s.send(Body(b"\x81\x02hi")) == b"\x81\x02hi"
    assert s.send(EndOfMessage()) == b"" and s.should_close
    assert s.receive_data(b"") == []


def test_refused_upgrade_closes_after_the_answer():
    s = ServerConnection()
    s.receive_data(WS_REQ)
    out = s.send(ResponseHead(status=403, content_length=0))
    assert b"connection: close" in out
    s.send(EndOfMessage())
    assert s.should_close


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",          # not WebSocket
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",                            # Connection lacks it
    b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",                # HTTP/1.0
])
def test_not_a_websocket_upgrade_is_a_plain_request(raw):
    s = ServerConnection()
    (head, eom) = s.receive_data(raw)
    assert head.upgrade is None and eom == EndOfMessage()
    with pytest.raises(LocalProtocolError):
        s.send(ResponseHead(status=101))


def test_client_side_sends_upgrade_and_reads_101_then_raw_bytes():
    c = ClientConnection()
    out = c.send(RequestHead(method=b"GET", target=b"/chat", headers=((b"host", b"a"),), upgrade=b"websocket"))
    assert out.endswith(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n") and b"content-length" not in out
    c.send(EndOfMessage())
    with pytest.raises(LocalProtocolError):        # raw bytes only once protocols switched
        c.send(Body(b"x"))
    ev = c.receive_data(WS_101 + b"\x81\x03hey")
    assert isinstance(ev[0], ResponseHead) and ev[0].status == 101
    assert dict(ev[0].headers)[b"sec-websocket-accept"] == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ev[1:] == [Body(b"\x81\x03hey")]
    assert c.receive_data(b"HTTP/1.1 200 OK\r\n\r\n") == [Body(b"HTTP/1.1 200 OK\r\n\r\n")]
    assert not c.reusable
    assert c.send(Body(b"\x81\x01y")) == b"\x81\x01y"
    assert c.receive_data(b"") == []


def test_client_side_refused_upgrade_is_an_ordinary_response():
    c = ClientConnection()
    c.send(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"a"),), upgrade=b"websocket"))
    c.send(EndOfMessage())
    ev = c.receive_data(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 2\r\n\r\nno")
    assert [type(e) for e in ev] == [ResponseHead, Body, EndOfMessage] and ev[0].status == 426


def test_101_without_an_upgrade_request_is_refused():
    c = ClientConnection()
    c.send(RequestHead(method=b"GET", target=b"/", headers=((b"host", b"a"),)))
    c.send(EndOfMessage())
    with pytest.raises(HttpError) as e:
        c.receive_data(WS_101)
    assert (e.value.status, e.value.reason) == (502, "unexpected_upgrade")

"""waypoint.channel.HttpChannel.pop_end: the rest of a response is handed out whole only when all of it is queued and small."""
from __future__ import annotations

from waypoint.channel import COALESCE_MAX, HttpChannel
from waypoint.http import Body, ClientConnection, EndOfMessage, RequestHead, ResponseHead


def _channel(method: bytes = b"GET") -> HttpChannel:
    codec = ClientConnection()
    codec.send(RequestHead(method=method, target=b"/", headers=((b"host", b"a"),)))
    codec.send(EndOfMessage())
    return HttpChannel(codec.receive_data)


def test_a_small_response_read_in_one_piece_comes_out_whole():
    ch = _channel()
    ch.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert type(ch.pop_if(ResponseHead)) is ResponseHead
    body, end = ch.pop_end()
    assert bytes(body.data) == b"abc" and type(end) is EndOfMessage
    assert ch.pop_end() is None and ch._queued == 0


def test_a_bodyless_response_gives_only_its_end():
    ch = _channel(b"HEAD")
    ch.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    ch.pop_if(ResponseHead)
    assert ch.pop_end() == (None, EndOfMessage())


def test_an_unfinished_or_large_or_split_body_stays_queued():
    ch = _channel()
    ch.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    ch.pop_if(ResponseHead)
    assert ch.pop_end() is None                       # the end has not come yet
    ch.data_received(b"def")
    assert ch.pop_end() is None                       # two bodies: event by event
    assert bytes(ch.pop_if(Body).data) == b"abc"
    n = COALESCE_MAX + 1
    ch = _channel()
    ch.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"x" * n)
    ch.pop_if(ResponseHead)
    assert ch.pop_end() is None and ch._queued == n   # too large to be copied next to its head
    assert len(ch.pop_if(Body).data) == n and type(ch.pop_if(EndOfMessage)) is EndOfMessage

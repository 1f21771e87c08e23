"""Sans-IO HTTP/1.1 for a proxy: ServerConnection (downstream) and ClientConnection (upstream).

Theory of operation
-------------------
Each connection object is one half of the proxy's view of one TCP connection and does no I/O:

    bytes in  -> conn.receive_data(data) -> [events]      (b"" means the peer closed)
    event out -> conn.send(event)        -> bytes          (one bytes object per event)

The caller collects the bytes of every `send` made while handling one read and writes them
with a single `transport.write` per flush (b"".join of the pieces), which the measurements in
notes/l7-performance showed is where most of the per-request CPU goes.

*Parsing* is llhttp through httptools (parser.py): ~5x cheaper per request than h11. Events
are frozen dataclasses (events.py). A head carries only end-to-end fields: hop-by-hop fields
(Connection, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade, and every field
Connection names) are removed when parsing, and the framing of the message is carried in
`content_length` / `chunked` / `keep_alive` / `expect_continue` instead of in `headers`.
Pipelined requests in one read come out in order, each RequestHead ... EndOfMessage.

*Serializing* re-frames (framing.py): Content-Length is passed through; a body of unknown
length goes chunked to HTTP/1.1 peers and close-delimited to HTTP/1.0 clients. Responses to
HEAD, 204 and 304 never carry a body (Content-Length of a HEAD/304 is passed through as
information). Trailers are forwarded only when the outgoing message is chunked.

*Persistence* (RFC 9112 9.3): a request's `keep_alive` comes from its version and Connection
field. ServerConnection decides downstream persistence itself: it closes after a response when
the client asked to, when the body is close-delimited (HTTP/1.0 client, unknown length), when
the request body was not fully received by the time the response head is sent (early reject,
unanswered 100-continue: the rest of the body would be misread as a request), or when the
caller asked with `close_after_response()`. The upstream head's `keep_alive` only says
whether the *upstream* connection is reusable (`ClientConnection.reusable`). Requests go
upstream as HTTP/1.1 keep-alive, one at a time (no upstream pipelining).

*Expect: 100-continue* (RFC 9110 10.1.1): the field is consumed here, never forwarded. The
RequestHead says `expect_continue=True`; once the waypoint has decided to forward the request
(route found, policy allowed), it sends `InformationalResponse(status=100)` downstream and
streams the body upstream as it arrives. If it answers with a final response instead, the
connection closes after that response (see above). Any other expectation is a 417. Upstream
1xx responses arrive as InformationalResponse; ServerConnection drops 1xx for HTTP/1.0 clients.

*WebSocket* (RFC 6455 4, RFC 9110 7.8): an HTTP/1.1 request with `Upgrade: websocket` and
`Connection: upgrade` (and no body) comes out with `upgrade=b"websocket"`; the bytes after it
are raw Body events. ClientConnection sends it on with both fields; a 101 answer comes out as
a ResponseHead(101) followed by raw Body events, and the connection is never reused. Sent
downstream, the 101 carries `connection: upgrade` / `upgrade: websocket` and switches the
send side to TUNNEL (Body raw, EndOfMessage ends it); any other answer to an upgrade request
closes the connection after it.

*Not supported*: other Upgrades and CONNECT (another Upgrade is stripped as hop-by-hop and the
request is served as a plain one; CONNECT is a 501), transfer codings other than chunked (501),
HTTP/0.9 and HTTP/2 (400), obs-fold (400).

*Errors*: anything the peer does wrong raises HttpError(status, reason) (errors.py) and the
connection is finished; misuse by the caller raises LocalProtocolError. The send side of each
connection is a state machine: the allowed (state, event) pairs are the tables below.
"""
from __future__ import annotations

import enum
from collections import deque

from .errors import HttpError, LocalProtocolError
from .events import Body, EndOfMessage, Event, InformationalResponse, RequestHead, ResponseHead
from .framing import LAST_CHUNK, STATUS_LINES, Limits, head, last_chunk, status_line
from .parser import RequestParser, ResponseParser

__all__ = ["ServerConnection", "ClientConnection", "SendState"]


class SendState(enum.Enum):
    """Where the outgoing message of a connection stands."""

    IDLE = "idle"            # between messages (server: may send 1xx or a final head)
    BODY = "body"            # head sent, Body* then EndOfMessage
    AWAITING = "awaiting"    # client: request sent, response not complete yet
    TUNNEL = "tunnel"        # protocols switched (101): Body is raw bytes, EndOfMessage ends it
    CLOSED = "closed"        # last message had close semantics; nothing more may be sent

    # Members are singletons compared by identity: hash them so too, in C (Enum's own
    # __hash__ is Python, and every send looks its (state, event type) pair up below).
    __hash__ = object.__hash__


_IDLE, _BODY, _AWAITING, _TUNNEL, _CLOSED = (SendState.IDLE, SendState.BODY, SendState.AWAITING, SendState.TUNNEL,
                                             SendState.CLOSED)

_SERVER_SEND: dict[tuple[SendState, type], SendState] = {
    (SendState.IDLE, InformationalResponse): SendState.IDLE,
    (SendState.IDLE, ResponseHead): SendState.BODY,
    (SendState.BODY, Body): SendState.BODY,
    (SendState.BODY, EndOfMessage): SendState.IDLE,       # or CLOSED (the response had close semantics)
    (SendState.TUNNEL, Body): SendState.TUNNEL,           # after a 101 (ResponseHead -> TUNNEL)
    (SendState.TUNNEL, EndOfMessage): SendState.CLOSED,
}

_CLIENT_SEND: dict[tuple[SendState, type], SendState] = {
    (SendState.IDLE, RequestHead): SendState.BODY,
    (SendState.BODY, Body): SendState.BODY,
    (SendState.BODY, EndOfMessage): SendState.AWAITING,   # IDLE again once the response ends
    (SendState.AWAITING, Body): SendState.TUNNEL,         # only once a 101 switched protocols
    (SendState.TUNNEL, Body): SendState.TUNNEL,
    (SendState.TUNNEL, EndOfMessage): SendState.CLOSED,
}


def _bad_order(state: SendState, event: Event) -> LocalProtocolError:
    return LocalProtocolError("bad_event_order", f"cannot send {type(event).__name__} in state {state.name}")


class _Outgoing:
    """Byte accounting of the message being sent (Content-Length enforced, chunking known),
    as plain attributes of the connection: `send` does it inline, once per event."""

    __slots__ = ("_chunked", "_remaining", "_bodyless")

    def _out_body(self, data: bytes | memoryview) -> bytes | memoryview:
        n = len(data)
        if not n:
            return b""
        if self._bodyless:
            raise LocalProtocolError("body_not_allowed", "this message cannot carry a body")
        rem = self._remaining
        if rem is not None:
            if n > rem:
                raise LocalProtocolError("body_exceeds_content_length")
            self._remaining = rem - n
        return b"%x\r\n%b\r\n" % (n, data) if self._chunked else data

    def _out_end(self, trailers) -> bytes:
        if self._remaining:
            raise LocalProtocolError("body_shorter_than_content_length", f"{self._remaining} bytes missing")
        if not self._chunked:
            return b""
        return last_chunk(trailers) if trailers else LAST_CHUNK


class ServerConnection(_Outgoing):
    """The downstream side: parses requests, serializes responses (in request order)."""

    __slots__ = ("_parser", "_pending", "_ends", "_answered", "state", "should_close", "_close_after", "_closing")

    def __init__(self, limits: Limits | None = None) -> None:
        self._parser = RequestParser(limits or Limits())
        self._pending: deque[RequestHead] = deque()   # received, response not finished
        # Request i (counted from 0 on this connection) is fully received once _ends > i;
        # the one being answered is number _answered.
        self._ends = 0
        self._answered = 0
        self.state = SendState.IDLE
        self.should_close = False
        """True once the last response ended with close semantics: close after writing."""
        self._chunked = False
        self._remaining: int | None = None
        self._bodyless = False
        self._close_after = False
        self._closing = False

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for `data`; b"" means the client closed. Raises HttpError on hostile input."""
        events = self._parser.feed(data) if data else self._parser.feed_eof()
        for ev in events:
            t = type(ev)
            if t is RequestHead:
                self._pending.append(ev)
            elif t is EndOfMessage:
                self._ends += 1
        return events

    # -- sending --------------------------------------------------------------------------

    def close_after_response(self) -> None:
        """Send `connection: close` with the next response head (drain, fatal error)."""
        self._close_after = True

    def send(self, event: Event) -> bytes:
        """Bytes for `event`, answering the oldest request still unanswered."""
        t = type(event)
        state = self.state
        nxt = _SERVER_SEND.get((state, t))
        if nxt is None:
            raise _bad_order(state, event)
        if state is _BODY:            # (a response under way answers a pending request)
            if t is Body:
                return self._out_body(event.data)
            out = self._out_end(event.trailers)
            self._pending.popleft()
            self._answered += 1
            if self._closing:
                self.state = _CLOSED
                self.should_close = True
            else:
                self.state = _IDLE
            return out
        if state is _TUNNEL:
            self.state = nxt
            if t is Body:
                return bytes(event.data)
            self.should_close = True
            return b""
        if not self._pending:
            raise LocalProtocolError("no_request", "no request is waiting for a response")
        req = self._pending[0]
        if t is InformationalResponse:
            if not 100 <= event.status < 200 or event.status == 101:
                raise LocalProtocolError("bad_status", "informational responses are 100, 102-199")
            if req.http_version == "1.0":
                return b""                      # RFC 9110 15.2: never 1xx to an HTTP/1.0 client
            return head(status_line(event.status, event.reason), event.headers, b"")
        status = event.status
        if status == 101:
            if req.upgrade is None:
                raise LocalProtocolError("bad_status", "101 answers only an upgrade request")
            self.state = _TUNNEL
            self._closing = True
            return head(status_line(101, event.reason), event.headers,
                        b"connection: upgrade\r\nupgrade: %b\r\n" % req.upgrade)
        self.state = _BODY
        if status < 200:
            raise LocalProtocolError("bad_status", "use InformationalResponse for 1xx")
        # After an upgrade request the client's bytes are not HTTP: any answer but a 101 ends it.
        keep = (req.keep_alive and not self._close_after and self._ends > self._answered
                and req.upgrade is None)
        cl = event.content_length
        if req.method == b"HEAD" or status == 204 or status == 304:
            self._chunked, self._remaining, self._bodyless = False, None, True
            framing = b"content-length: %d\r\n" % cl if cl is not None and status != 204 else b""
        elif cl is not None:
            self._chunked, self._remaining, self._bodyless = False, cl, False
            framing = b"content-length: %d\r\n" % cl
        elif req.http_version == "1.1":
            self._chunked, self._remaining, self._bodyless = True, None, False
            framing = b"transfer-encoding: chunked\r\n"
        else:
            self._chunked, self._remaining, self._bodyless = False, None, False   # close-delimited for HTTP/1.0
            framing = b""
            keep = False
        if not keep:
            framing += b"connection: close\r\n"
            self._closing = True
        elif req.http_version == "1.0":
            framing += b"connection: keep-alive\r\n"
        # status_line(), inlined: status >= 200 here.
        reason = event.reason
        if status > 999:
            raise LocalProtocolError("bad_status", f"status {status} is not three digits")
        if reason:
            if b"\r" in reason or b"\n" in reason:
                raise LocalProtocolError("header_injection", "CR or LF in a reason phrase")
            line = b"HTTP/1.1 %d %b\r\n" % (status, reason)
        else:
            line = STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        return head(line, event.headers, framing)


class ClientConnection(_Outgoing):
    """The upstream side: serializes requests (HTTP/1.1), parses their responses."""

    __slots__ = ("_parser", "state", "reusable", "_reusable", "_response_done")

    def __init__(self, limits: Limits | None = None) -> None:
        self._parser = ResponseParser(limits or Limits())
        self.state = SendState.IDLE
        self._chunked = False
        self._remaining: int | None = None
        self._bodyless = False
        self._reusable = True
        self.reusable = True
        """The request/response exchange is over and the connection may carry another
        (kept up to date by send and receive_data: state IDLE, no close, no stray bytes)."""
        self._response_done = True

    def send(self, event: Event) -> bytes:
        """Bytes for `event`. One exchange at a time: RequestHead, Body*, EndOfMessage."""
        t = type(event)
        state = self.state
        nxt = _CLIENT_SEND.get((state, t))
        if nxt is None:
            raise _bad_order(state, event)
        if nxt is _TUNNEL or state is _TUNNEL:
            if not self._parser.tunnel:
                raise LocalProtocolError("bad_event_order", "raw bytes only after a 101")
            self.state = nxt
            return bytes(event.data) if t is Body else b""
        if t is Body:
            return self._out_body(event.data)
        if t is EndOfMessage:
            out = self._out_end(event.trailers)
            if self._response_done:
                self.state = _IDLE
                self.reusable = self._reusable and not self._parser.tainted
            else:
                self.state = nxt
            return out
        if not self._reusable or self._parser.tainted:
            raise LocalProtocolError("connection_not_reusable")
        self.state = _BODY
        self.reusable = False
        self._response_done = False
        self._parser.request_method = event.method
        upgrade = self._parser.request_upgrade = event.upgrade
        framing = b""
        if upgrade is not None:
            framing = b"connection: upgrade\r\nupgrade: %b\r\n" % upgrade
        if event.chunked:
            self._chunked, self._remaining, self._bodyless = True, None, False
            framing += b"transfer-encoding: chunked\r\n"
        else:
            cl = event.content_length
            self._chunked, self._remaining, self._bodyless = False, cl or 0, False
            if cl is not None:
                framing += b"content-length: %d\r\n" % cl
        line = b"%s %s HTTP/1.1\r\n" % (event.method, event.target)
        if b"\r" in line[:-2] or b"\n" in line[:-2] or b" " in event.target:
            raise LocalProtocolError("header_injection", "CR, LF or space in the request line")
        if upgrade is not None and (b"\r" in upgrade or b"\n" in upgrade or b"\x00" in upgrade):
            raise LocalProtocolError("header_injection", "CR, LF or NUL inside a header name or value")
        return head(line, event.headers, framing)

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for `data`; b"" means upstream closed. Raises HttpError (status 502)."""
        parser = self._parser
        try:
            events = parser.feed(data) if data else parser.feed_eof()
            for ev in events:
                t = type(ev)
                if t is ResponseHead:
                    if not ev.keep_alive:   # (a 101 never is)
                        self._reusable = False
                elif t is EndOfMessage:
                    self._response_done = True
                    if self.state is _AWAITING:
                        self.state = _IDLE
                elif t is not Body and t is not InformationalResponse:   # ConnectionClosed
                    self._reusable = False
        except HttpError:
            self._reusable = False
            raise
        finally:                                  # (the parser may have been tainted too)
            self.reusable = self.state is _IDLE and self._reusable and not parser.tainted
        return events

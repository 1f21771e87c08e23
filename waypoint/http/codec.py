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
from .framing import LAST_CHUNK, Limits, chunk, last_chunk, serialize_head, status_line
from .parser import RequestParser, ResponseParser

__all__ = ["ServerConnection", "ClientConnection", "SendState"]


class SendState(enum.Enum):
    """Where the outgoing message of a connection stands."""

    IDLE = "idle"            # between messages (server: may send 1xx or a final head)
    BODY = "body"            # head sent, Body* then EndOfMessage
    AWAITING = "awaiting"    # client: request sent, response not complete yet
    TUNNEL = "tunnel"        # protocols switched (101): Body is raw bytes, EndOfMessage ends it
    CLOSED = "closed"        # last message had close semantics; nothing more may be sent


_SERVER_SEND: dict[tuple[SendState, type], SendState] = {
    (SendState.IDLE, InformationalResponse): SendState.IDLE,
    (SendState.IDLE, ResponseHead): SendState.BODY,
    (SendState.BODY, Body): SendState.BODY,
    (SendState.BODY, EndOfMessage): SendState.IDLE,       # or CLOSED, see _end_response
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


class _Outgoing:
    """Byte accounting of the message being sent: enforces Content-Length, knows chunking."""

    __slots__ = ("chunked", "remaining", "bodyless")

    def __init__(self, chunked: bool, remaining: int | None, bodyless: bool) -> None:
        self.chunked = chunked
        self.remaining = remaining
        self.bodyless = bodyless

    def body(self, data: bytes | memoryview) -> bytes | memoryview:
        n = len(data)
        if not n:
            return b""
        if self.bodyless:
            raise LocalProtocolError("body_not_allowed", "this message cannot carry a body")
        if self.remaining is not None:
            if n > self.remaining:
                raise LocalProtocolError("body_exceeds_content_length")
            self.remaining -= n
        return chunk(data) if self.chunked else data

    def end(self, trailers) -> bytes:
        if self.remaining:
            raise LocalProtocolError("body_shorter_than_content_length", f"{self.remaining} bytes missing")
        return last_chunk(trailers) if self.chunked else b""


def _transition(table: dict, state: SendState, event: Event) -> SendState:
    nxt = table.get((state, type(event)))
    if nxt is None:
        raise LocalProtocolError("bad_event_order", f"cannot send {type(event).__name__} in state {state.name}")
    return nxt


class ServerConnection:
    """The downstream side: parses requests, serializes responses (in request order)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._parser = RequestParser(limits or Limits())
        self._pending: deque[RequestHead] = deque()   # received, response not finished
        self._complete: deque[bool] = deque()         # parallel: request body fully received?
        self.state = SendState.IDLE
        self._out: _Outgoing | None = None
        self._close_after = False
        self._closing = False

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for `data`; b"" means the client closed. Raises HttpError on hostile input."""
        events = self._parser.feed(data) if data else self._parser.feed_eof()
        for ev in events:
            if type(ev) is RequestHead:
                self._pending.append(ev)
                self._complete.append(False)
            elif type(ev) is EndOfMessage:
                self._complete[-1] = True
        return events

    # -- sending --------------------------------------------------------------------------

    def close_after_response(self) -> None:
        """Send `connection: close` with the next response head (drain, fatal error)."""
        self._close_after = True

    @property
    def should_close(self) -> bool:
        """True once the last response ended with close semantics: close after writing."""
        return self.state is SendState.CLOSED

    def send(self, event: Event) -> bytes:
        """Bytes for `event`, answering the oldest request still unanswered."""
        nxt = _transition(_SERVER_SEND, self.state, event)
        if not self._pending and self.state is not SendState.TUNNEL:
            raise LocalProtocolError("no_request", "no request is waiting for a response")
        t = type(event)
        if self.state is SendState.TUNNEL:
            self.state = nxt
            return bytes(event.data) if t is Body else b""
        if t is Body:
            self.state = nxt
            return self._out.body(event.data)
        if t is EndOfMessage:
            out = self._out.end(event.trailers)
            self._out = None
            self._pending.popleft()
            self._complete.popleft()
            self.state = SendState.CLOSED if self._closing else nxt
            return out
        req = self._pending[0]
        if t is InformationalResponse:
            if not 100 <= event.status < 200 or event.status == 101:
                raise LocalProtocolError("bad_status", "informational responses are 100, 102-199")
            if req.http_version == "1.0":
                return b""                      # RFC 9110 15.2: never 1xx to an HTTP/1.0 client
            return serialize_head(status_line(event.status, event.reason), event.headers, [])
        if event.status == 101:
            if req.upgrade is None:
                raise LocalProtocolError("bad_status", "101 answers only an upgrade request")
            self.state = SendState.TUNNEL
            self._closing = True
            return serialize_head(status_line(101, event.reason), event.headers,
                                  [b"connection: upgrade", b"upgrade: " + req.upgrade])
        self.state = nxt
        return self._response_head(req, event)

    def _response_head(self, req: RequestHead, head: ResponseHead) -> bytes:
        status = head.status
        if status < 200:
            raise LocalProtocolError("bad_status", "use InformationalResponse for 1xx")
        extra: list[bytes] = []
        # After an upgrade request the client's bytes are not HTTP: any answer but a 101 ends it.
        keep = req.keep_alive and not self._close_after and self._complete[0] and req.upgrade is None
        if req.method == b"HEAD" or status == 204 or status == 304:
            self._out = _Outgoing(False, None, True)
            if head.content_length is not None and status != 204:
                extra.append(b"content-length: %d" % head.content_length)
        elif head.content_length is not None:
            self._out = _Outgoing(False, head.content_length, False)
            extra.append(b"content-length: %d" % head.content_length)
        elif req.http_version == "1.1":
            self._out = _Outgoing(True, None, False)
            extra.append(b"transfer-encoding: chunked")
        else:
            self._out = _Outgoing(False, None, False)   # close-delimited for HTTP/1.0
            keep = False
        if not keep:
            extra.append(b"connection: close")
            self._closing = True
        elif req.http_version == "1.0":
            extra.append(b"connection: keep-alive")
        return serialize_head(status_line(status, head.reason), head.headers, extra)


class ClientConnection:
    """The upstream side: serializes requests (HTTP/1.1), parses their responses."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._parser = ResponseParser(limits or Limits())
        self.state = SendState.IDLE
        self._out: _Outgoing | None = None
        self._reusable = True
        self._response_done = True

    @property
    def reusable(self) -> bool:
        """The request/response exchange is over and the connection may carry another."""
        return (self.state is SendState.IDLE and self._reusable and not self._parser.tainted)

    def send(self, event: Event) -> bytes:
        """Bytes for `event`. One exchange at a time: RequestHead, Body*, EndOfMessage."""
        nxt = _transition(_CLIENT_SEND, self.state, event)
        t = type(event)
        if nxt is SendState.TUNNEL or self.state is SendState.TUNNEL:
            if not self._parser.tunnel:
                raise LocalProtocolError("bad_event_order", "raw bytes only after a 101")
            self.state = nxt
            return bytes(event.data) if t is Body else b""
        if t is Body:
            self.state = nxt
            return self._out.body(event.data)
        if t is EndOfMessage:
            out = self._out.end(event.trailers)
            self._out = None
            self.state = nxt if not self._response_done else SendState.IDLE
            return out
        if not self._reusable or self._parser.tainted:
            raise LocalProtocolError("connection_not_reusable")
        self.state = nxt
        self._response_done = False
        self._parser.request_method = event.method
        self._parser.request_upgrade = event.upgrade
        extra: list[bytes] = []
        if event.upgrade is not None:
            extra += [b"connection: upgrade", b"upgrade: " + event.upgrade]
        if event.chunked:
            self._out = _Outgoing(True, None, False)
            extra.append(b"transfer-encoding: chunked")
        else:
            cl = event.content_length
            self._out = _Outgoing(False, cl or 0, False)
            if cl is not None:
                extra.append(b"content-length: %d" % cl)
        line = b"%s %s HTTP/1.1\r\n" % (event.method, event.target)
        if b"\r" in line[:-2] or b"\n" in line[:-2] or b" " in event.target:
            raise LocalProtocolError("header_injection", "CR, LF or space in the request line")
        return serialize_head(line, event.headers, extra)

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for `data`; b"" means upstream closed. Raises HttpError (status 502)."""
        try:
            events = self._parser.feed(data) if data else self._parser.feed_eof()
        except HttpError:
            self._reusable = False
            raise
        for ev in events:
            t = type(ev)
            if t is ResponseHead:
                if not ev.keep_alive:   # (a 101 never is)
                    self._reusable = False
            elif t is EndOfMessage:
                self._response_done = True
                if self.state is SendState.AWAITING:
                    self.state = SendState.IDLE
            elif t is not Body and t is not InformationalResponse:   # ConnectionClosed
                self._reusable = False
        return events


"""HTTP/2 to a backend: one h2c connection (in one HBONE stream, or TCP) multiplexing many requests, each a `ClientStream`.

`H2Upstream` is the asyncio.Protocol of the upstream transport; `new_stream()` gives the
object the pipeline's `exchange()` drives like an HTTP/1.1 `UpstreamConn`: `codec.send`
of RequestHead / Body / EndOfMessage (trailers included) opens and feeds a stream, `next()`
yields the response's ResponseHead, Body and EndOfMessage (trailers), `None` when the stream
was reset or the connection went away. `reusable` of a stream means the connection is still
good after a complete exchange; the connection itself is pooled by waypoint/upstream.py
while it has stream capacity (the backend's MAX_CONCURRENT_STREAMS) and no GOAWAY.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from waypoint.http import Body, EndOfMessage, HttpError, InformationalResponse, LocalProtocolError, RequestHead
from waypoint.http import ResponseHead

from .connection import ClientConnection, ConnectionEnded, ErrorCode, Settings, StreamReset, Writable
from .convert import request_to_h2
from .stream import StreamChannel

__all__ = ["H2Upstream", "ClientStream"]


class ClientStream(StreamChannel):
    """One request/response exchange on an `H2Upstream` (see the module docstring)."""

    __slots__ = ("target", "started_at", "first_byte_at", "_clock")

    def __init__(self, mux: H2Upstream) -> None:
        super().__init__(mux, 0)
        self.target = mux.target
        self.started_at = 0.0
        self.first_byte_at: float | None = None
        self._clock = mux.clock

    def deliver(self, ev) -> None:
        if self.first_byte_at is None and self._clock is not None:
            self.first_byte_at = self._clock.now()
        super().deliver(ev)

    @property
    def rtt(self) -> float | None:
        if self.first_byte_at is None:
            return None
        return max(0.0, self.first_byte_at - self.started_at)

    def send(self, ev) -> bytes:
        t = type(ev)
        c = self.mux.conn
        if self.lost:
            return b""
        if t is Body:
            if ev.data:
                if self.local_ended:
                    raise LocalProtocolError("body_not_allowed", "the request ended with its head")
                c.send_body(self.sid, ev.data)
        elif t is RequestHead:
            if self.sid:
                raise LocalProtocolError("connection_not_reusable", "one request per HTTP/2 stream")
            if not self.mux.usable:
                raise LocalProtocolError("connection_not_reusable", "the HTTP/2 connection is going away")
            end = not ev.chunked and not ev.content_length
            self.sid = c.new_stream_id()
            self.mux.streams[self.sid] = self
            c.send_request(self.sid, request_to_h2(ev), end)
            self.local_ended = end
        elif t is EndOfMessage:
            if not self.local_ended:
                self.local_ended = True
                c.send_end(self.sid, ev.trailers)
        return b""

    @property
    def reusable(self) -> bool:
        """The exchange completed both ways and the connection can carry more."""
        return self.local_ended and self.remote_ended and not self.lost and self.mux.usable

    @property
    def usable(self) -> bool:
        return not self.lost and self.mux.usable

    def abort(self) -> None:
        self.reset(ErrorCode.CANCEL)

    def reset(self, code: int) -> None:
        if not self.sid:                 # never opened: nothing on the wire
            if not self.lost:
                self.gone()
            return
        super().reset(code)

    def close(self) -> None:
        """Done: a stream not complete both ways is cancelled (we no longer want its response)."""
        if self.lost:
            return
        if not (self.local_ended and self.remote_ended):
            self.reset(ErrorCode.CANCEL)
        else:
            super().close()


class H2Upstream:
    """asyncio.Protocol for one HTTP/2 connection to a backend endpoint."""

    def __init__(self, target, *, clock=None, settings: Settings | None = None,
                 on_lost: Callable[[H2Upstream], None] | None = None) -> None:
        self.target = target
        self.clock = clock
        self.conn = ClientConnection(settings)
        self.streams: dict[int, ClientStream] = {}
        self.transport = None
        self.transport_paused = False
        self.going_away = False
        self.gone = False
        self.active = 0
        """Streams handed out and not yet released (capacity counts them before their HEADERS)."""
        self.served = 0
        self.idle_since = 0.0
        self.counted = False
        self._on_lost = on_lost
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def usable(self) -> bool:
        return not self.gone and not self.going_away and self.transport is not None

    @property
    def has_capacity(self) -> bool:
        limit = self.conn.h2.remote_settings.max_concurrent_streams
        return self.usable and self.active < limit

    def new_stream(self) -> ClientStream:
        self.active += 1
        return ClientStream(self)

    def release(self, s: ClientStream) -> None:
        self.active = max(0, self.active - 1)
        self.served += 1
        s.close()
        self.flush()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate()
        self.flush()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data) -> None:
        streams = self.streams
        for sid, ev in self.conn.receive_data(data):
            t = type(ev)
            s = streams.get(sid)
            if t is Body:
                if s is not None:
                    s.deliver(ev)
                else:
                    self.conn.ack(sid, len(ev.data))
            elif t is ResponseHead or t is InformationalResponse:
                if s is not None:
                    s.deliver(ev)
            elif t is EndOfMessage:
                if s is not None:
                    s.deliver_end(ev)
            elif t is StreamReset:
                if s is not None:
                    s.gone()
            elif t is Writable:
                if s is not None:
                    s.writable()
            elif isinstance(ev, HttpError):
                if s is not None:
                    s.deliver(ev)
            elif t is ConnectionEnded:
                self._ended(ev)
        self.flush()

    def eof_received(self) -> bool:
        self.going_away = True
        return True

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.gone = True
        for s in list(self.streams.values()):
            s.gone()
        if not self.ready.done():
            self.ready.set_result(None)
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        self.transport_paused = True

    def resume_writing(self) -> None:
        self.transport_paused = False
        for s in list(self.streams.values()):
            s.writable()

    # -- multiplexer side --------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)
        if self.going_away and not self.streams and self.transport is not None:
            self.transport.close()

    def forget(self, s: StreamChannel) -> None:
        if s.sid:
            self.streams.pop(s.sid, None)

    def _ended(self, ev: ConnectionEnded) -> None:
        self.going_away = True
        if ev.reason != "goaway":
            self.flush()
            for s in list(self.streams.values()):
                s.gone()
            if self.transport is not None:
                self.transport.close()
            return
        for sid, s in list(self.streams.items()):
            if sid > ev.last_stream_id:      # never processed by the backend (safe to retry)
                s.gone()

    def close(self) -> None:
        self.going_away = True
        if self.transport is not None:
            self.conn.close()
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.gone = True
        if self.transport is not None:
            t = self.transport
            t.abort() if hasattr(t, "abort") else t.close()

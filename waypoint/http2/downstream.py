"""The waypoint's HTTP/2 server over one HBONE stream: every request stream runs `Pipeline.handle` as its own task.

`H2Downstream` is the asyncio.Protocol of an HBONE stream that began with the HTTP/2
prior-knowledge preface. It feeds the sans-IO ServerConnection and, for each new request
stream, creates a `ServerStream` (the pipeline's downstream connection object, stream.py)
and starts `run(head, stream)`. Streams are concurrent and independent: one slow upstream
holds only its own stream window. An RST_STREAM from the client makes that stream `lost`
(the exchange stops, as for a client that went away over HTTP/1.1); a connection error
sends GOAWAY and ends every stream. The protocol finishes (`closed`) when the client has
gone (EOF or GOAWAY) and every stream task is done.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from waypoint.http import (Body, EndOfMessage, HttpError, InformationalResponse, RequestHead, ResponseHead)

from .base import current_stream
from .connection import (ConnectionEnded, ErrorCode, ServerConnection, Settings, StreamReset, Writable)
from .convert import grpc_status_of
from .stream import StreamChannel

__all__ = ["H2Downstream", "ServerStream", "current_stream"]

log = logging.getLogger("ambient.waypoint")

PREMATURE_RESET_MIN = 500
"""Envoy's premature_reset_total_stream_count default."""


class ServerStream(StreamChannel):
    """One request stream as the pipeline's downstream connection (`codec` is the stream)."""

    __slots__ = ("grpc_status",)

    def __init__(self, mux, sid: int) -> None:
        super().__init__(mux, sid)
        self.grpc_status: str | None = None
        """grpc-status sent in the response headers or trailers (for metrics)."""

    def send(self, ev) -> bytes:
        if self.lost or self.local_ended:
            return b""
        t = type(ev)
        c = self.mux.conn
        if t is Body:
            c.send_body(self.sid, ev.data)
        elif t is ResponseHead:
            self.grpc_status = grpc_status_of(ev.headers)
            c.send_head(self.sid, ev)
        elif t is EndOfMessage:
            if ev.trailers:
                self.grpc_status = grpc_status_of(ev.trailers) or self.grpc_status
            self.local_ended = True
            c.send_end(self.sid, ev.trailers)
        elif t is InformationalResponse:
            c.send_informational(self.sid, ev)
        return b""

    @property
    def should_close(self) -> bool:
        """The response is complete while the request is not: the stream is reset rather than
        the rest of the request awaited (RFC 9113 8.1)."""
        return self.local_ended and not self.remote_ended

    def close_after_response(self) -> None:
        """Nothing to do: each request has its own stream."""


class H2Downstream:
    """asyncio.Protocol for one HTTP/2 connection from a client (see the module docstring)."""

    def __init__(self, run: Callable[[RequestHead, ServerStream], Awaitable[None]], *,
                 refused: Callable[[HttpError], None] | None = None, settings: Settings | None = None) -> None:
        self.conn = ServerConnection(settings)
        self.run = run
        self.refused = refused
        self.streams: dict[int, ServerStream] = {}
        self.tasks: set[asyncio.Task] = set()
        self.transport = None
        self.transport_paused = False
        self.client_done = False
        self.requests = 0
        self.premature_resets = 0
        """Streams the client reset before their response ended."""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate()
        self.flush()

    def data_received(self, data) -> None:
        try:
            self._received(data)
        except Exception:       # never let one client's bytes take the waypoint's loop down
            log.exception("waypoint HTTP/2 connection failed; closing it")
            self.conn.close(ErrorCode.INTERNAL_ERROR)
            self._ended(ConnectionEnded(code=int(ErrorCode.INTERNAL_ERROR), reason="internal_error"))

    def _received(self, data) -> None:
        streams = self.streams
        for sid, ev in self.conn.receive_data(data):
            t = type(ev)
            if t is Body:
                s = streams.get(sid)
                if s is not None:
                    s.deliver(ev)
                else:
                    self.conn.ack(sid, len(ev.data))    # a stream we already finished: credit it back
            elif t is RequestHead:
                self._start(sid, ev)
            elif t is EndOfMessage:
                s = streams.get(sid)
                if s is not None:
                    s.deliver_end(ev)
            elif t is StreamReset:
                s = streams.get(sid)
                if s is not None:
                    if not s.local_ended:
                        self.premature_resets += 1
                    s.lose()
                    if (self.premature_resets >= PREMATURE_RESET_MIN
                            and self.premature_resets * 2 > self.requests):
                        # Envoy's defence against rapid reset (CVE-2023-44487): more than half of
                        # at least 500 streams cancelled before their response -> end the connection
                        log.warning("waypoint HTTP/2: %d of %d streams reset early by the client; closing",
                                    self.premature_resets, self.requests)
                        self.conn.close(ErrorCode.ENHANCE_YOUR_CALM)
                        self._ended(ConnectionEnded(code=int(ErrorCode.ENHANCE_YOUR_CALM), reason="rapid_reset"))
                        return
            elif t is Writable:
                s = streams.get(sid)
                if s is not None:
                    s.writable()
            elif isinstance(ev, HttpError):
                s = streams.get(sid)
                if s is not None:
                    s.deliver(ev)
                    s.lose()
                elif self.refused is not None:
                    self.refused(ev)
            elif t is ConnectionEnded:
                self._ended(ev)
        self.flush()

    def eof_received(self) -> bool:
        self.client_done = True
        self._maybe_close()
        return True

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.client_done = True
        for s in list(self.streams.values()):
            s.lose()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.transport_paused = True

    def resume_writing(self) -> None:
        self.transport_paused = False
        for s in list(self.streams.values()):
            s.writable()

    # -- multiplexer side (used by the streams) -------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def forget(self, s: StreamChannel) -> None:
        self.streams.pop(s.sid, None)

    # -- internals -------------------------------------------------------------------------------

    def _start(self, sid: int, head: RequestHead) -> None:
        s = ServerStream(self, sid)
        self.streams[sid] = s
        self.requests += 1
        task = asyncio.get_running_loop().create_task(self._serve(head, s))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _serve(self, head: RequestHead, s: ServerStream) -> None:
        current_stream.set(s)
        try:
            await self.run(head, s)
        except Exception:
            log.exception("waypoint HTTP/2 stream %d failed", s.sid)
            s.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            if not s.local_ended and not s.lost:
                s.reset(ErrorCode.INTERNAL_ERROR)    # the pipeline always answers: a bug otherwise
            s.close()
            self.flush()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._maybe_close()

    def _ended(self, ev: ConnectionEnded) -> None:
        self.client_done = True
        if ev.reason != "goaway":                  # our protocol error: GOAWAY is queued, end now
            self.flush()
            for s in list(self.streams.values()):
                s.lose()
            if self.transport is not None:
                self.transport.close()           # GOAWAY goes out; the HBONE stream ends with the peer
            if not self.closed.done():
                self.closed.set_result(None)     # we are done with it whatever the peer does
            return
        for sid, s in list(self.streams.items()):
            if sid > ev.last_stream_id:            # the client says it never saw them
                s.lose()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.client_done and not self.tasks and self.transport is not None:
            self.conn.close()
            self.flush()
            self.transport.close()
            if not self.closed.done():
                self.closed.set_result(None)

    def close(self) -> None:
        """Stop: cancel stream tasks, GOAWAY, close the transport."""
        for t in list(self.tasks):
            t.cancel()
        if self.transport is not None:
            self.conn.close()
            self.flush()
            self.transport.close()

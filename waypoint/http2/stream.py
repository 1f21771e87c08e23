"""One HTTP/2 stream as the pipeline's connection object: the HttpChannel interface over a shared h2 connection.

The pipeline drives a downstream or upstream "connection" through `next()`, `codec.send(ev)`
-> bytes, `write(bytes)`, `writing_paused`/`drain()`, `lost`, `abort()` and `close()`
(waypoint/channel.py). For HTTP/2 a stream plays that part: `codec` is the stream itself,
`send(ev)` hands the event to the shared sans-IO connection and returns b"" (the frames are
queued there), and `write()` flushes the connection to its transport. So exchange() and the
local replies run unchanged, one stream at a time, many streams per connection.

Backpressure: a Body is credited to the peer only when `next()` hands it over
(ack-on-consume, connection.py); a write waits (`writing_paused`) while the stream still has
unframed data (the peer's window is closed) or the carrying transport is paused.
"""
from __future__ import annotations

import asyncio
from collections import deque

from waypoint.http import Body, HttpError

from .connection import ErrorCode

__all__ = ["StreamChannel"]


class StreamChannel:
    """Receive queue and write side of one stream of a `Multiplexer` (see the module docstring)."""

    __slots__ = ("mux", "sid", "codec", "_events", "_waiter", "_write_ok", "ended", "lost", "error",
                 "local_ended", "remote_ended", "__weakref__")

    def __init__(self, mux, sid: int) -> None:
        self.mux = mux
        self.sid = sid
        self.codec = self
        self._events: deque = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._write_ok: asyncio.Future[None] | None = None
        self.ended = False
        """No more events will come."""
        self.lost = False
        """Reset or the connection gone: nothing more can be written."""
        self.error: HttpError | None = None
        self.local_ended = False
        self.remote_ended = False

    # -- fed by the multiplexer ------------------------------------------------------------

    def deliver(self, ev) -> None:
        if self.ended:
            return
        self._events.append(ev)
        if isinstance(ev, HttpError):
            self.error = ev
            self.ended = True
        self._wake()

    def deliver_end(self, ev) -> None:
        self.remote_ended = True
        self.deliver(ev)
        self.ended = True

    def gone(self) -> None:
        """Reset by the peer or the connection ended."""
        self.lost = True
        self.ended = True
        self.mux.forget(self)
        self._wake()
        self.writable()

    def writable(self) -> None:
        w, self._write_ok = self._write_ok, None
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    # -- the HttpChannel interface ---------------------------------------------------------

    async def next(self):
        """The next event; None when the stream ended or was reset; raises the HttpError."""
        q = self._events
        while not q:
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        ev = q.popleft()
        if type(ev) is Body:
            if not self.lost:
                self.mux.conn.ack(self.sid, len(ev.data))
                self.mux.flush()
        elif isinstance(ev, HttpError):
            raise ev
        return ev

    def write(self, data: bytes | memoryview) -> None:
        """Flush what `send` queued (the codec returns b"": its frames are on the connection)."""
        if data:
            raise ValueError("an HTTP/2 stream is written through codec.send only")
        self.mux.flush()

    @property
    def writing_paused(self) -> bool:
        return not self.lost and (self.mux.conn.pending(self.sid) > 0 or self.mux.transport_paused)

    async def drain(self) -> None:
        while self.writing_paused:
            if self._write_ok is None:
                self._write_ok = asyncio.get_running_loop().create_future()
            await self._write_ok

    def abort(self) -> None:
        """Reset the stream (INTERNAL_ERROR: the exchange failed midway)."""
        self.reset(ErrorCode.INTERNAL_ERROR)

    def reset(self, code: int) -> None:
        if not self.lost:
            self.mux.conn.reset(self.sid, code)
            self.mux.flush()
            self.gone()

    def close(self) -> None:
        """Done with the stream: if either side is still open, it is reset (NO_ERROR once our
        response is complete, RFC 9113 8.1; CANCEL otherwise)."""
        if self.lost:
            return
        if not (self.local_ended and self.remote_ended):
            self.reset(ErrorCode.NO_ERROR if self.local_ended else ErrorCode.CANCEL)
        else:
            self.lost = True
            self.ended = True
            self.mux.forget(self)

"""HttpChannel: an asyncio.Protocol that turns a transport's bytes into codec events the request tasks pull.

Theory of operation
-------------------
The transport (an HBONE stream, or TCP to a plain upstream) pushes bytes; the sans-IO codec
turns each read into events; the request task that owns the connection pulls them in order
with `await next()`. Flow control is end to end: queued body bytes above `high` pause the
transport's reading (an HBONE stream then stops returning flow-control credit, so the peer
stops sending after one window) and pulling below `low` resumes it. Writing is the mirror
image: the transport calls `pause_writing` when its peer is slow and `drain()` waits for
`resume_writing`. So memory per connection is bounded by the two water marks plus the
transport's own buffers, whatever the body size.

A codec error is delivered in order, as the HttpError raised by `next()` after the events
that preceded it; the end of the connection is `None`.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .http import Body, EndOfMessage, Event, HttpError

__all__ = ["HttpChannel", "HIGH_WATER", "LOW_WATER"]

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class HttpChannel(asyncio.Protocol):
    """One HTTP/1.1 connection's receive queue and write side (see the module docstring)."""

    __slots__ = ("_receive", "transport", "_loop", "_events", "_queued", "_waiter", "_paused_reading",
                 "_write_ok", "writing_paused", "ended", "error", "lost", "high", "low")

    def __init__(self, receive: Callable[[bytes], list[Event]], *, high: int = HIGH_WATER,
                 low: int = LOW_WATER) -> None:
        self._receive = receive
        self.transport: asyncio.BaseTransport | None = None
        # Looked up once: on Python < 3.12 every asyncio.get_running_loop() is a getpid()
        # syscall, and next() makes a future per wait (two per proxied request).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: deque[Event | HttpError] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._write_ok: asyncio.Future[None] | None = None   # set while writing is paused
        self.writing_paused = False
        """The transport's peer is slow (pause_writing until resume_writing): `drain()` waits."""
        self.ended = False
        """No more events will come (peer EOF processed, error, or connection lost)."""
        self.error: HttpError | None = None
        self.lost = False
        """The transport is gone (reset or closed): nothing more can be written."""
        self.high = high
        self.low = low

    # -- protocol side ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data) -> None:
        if self.ended:
            return
        try:
            events = self._receive(data)   # llhttp reads memoryviews in place
        except HttpError as e:
            events = ()
            self.error = e
        q = self._events
        q.extend(events)
        for ev in events:
            if type(ev) is Body:
                self._queued += len(ev.data)
        if self.error is not None:
            q.append(self.error)
            self.ended = True
        if self._queued > self.high and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        w = self._waiter                  # _wake(), inlined (every read)
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def eof_received(self) -> bool:
        if not self.ended:
            try:
                self._events.extend(self._receive(b""))
            except HttpError as e:
                self.error = e
                self._events.append(e)
            self.ended = True
            self._wake()
        return True   # keep our sending side open: the response may still be on its way

    def connection_lost(self, exc) -> None:
        self.ended = True
        self.lost = True
        self._wake()
        w = self._write_ok
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        if self._write_ok is None:
            self._write_ok = asyncio.get_running_loop().create_future()
            self.writing_paused = True

    def resume_writing(self) -> None:
        w, self._write_ok = self._write_ok, None
        self.writing_paused = False
        if w is not None and not w.done():
            w.set_result(None)

    # -- consumer side ----------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def next(self) -> Event | None:
        """The next event; None when the connection ended; raises the codec's HttpError."""
        q = self._events
        while not q:
            if self.ended:
                return None
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            await self._waiter
        ev = q.popleft()
        if type(ev) is Body:
            self._queued -= len(ev.data)
            if self._paused_reading and self._queued <= self.low and self.transport is not None:
                self._paused_reading = False
                self.transport.resume_reading()
        elif isinstance(ev, HttpError):
            raise ev
        return ev

    def pop_if(self, kind: type) -> Event | None:
        """The next event, without waiting, if it is queued and a `kind` (else None and the
        queue is untouched): for consumers that can finish synchronously (a body that is
        already complete)."""
        q = self._events
        if q and type(q[0]) is kind:
            ev = q.popleft()
            if kind is Body:
                self._queued -= len(ev.data)
                if self._paused_reading and self._queued <= self.low and self.transport is not None:
                    self._paused_reading = False
                    self.transport.resume_reading()
            return ev
        return None

    def write(self, data: bytes | memoryview) -> None:
        if data and not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        """Wait while the transport's peer is slow (pause_writing until resume_writing)."""
        w = self._write_ok
        if w is not None:
            await w

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            if hasattr(self.transport, "abort"):
                self.transport.abort()
            else:
                self.transport.close()

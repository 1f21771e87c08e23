"""One HBONE CONNECT stream as a transport: `HboneStream` feeds an asyncio.Protocol-like consumer in process.

Theory of operation
-------------------
Every stream of a `Session` is represented by one object in `session.tunnels` that the
session calls back (`on_data`, `on_end`, `on_response`, `on_reset`, `on_unblocked`,
`tls_paused`, `tls_resumed`). `StreamCore` holds what every such object shares: the
counters, the `done` future (resolving to a `TunnelResult`, never raising), the client's
`response` future and the end-of-stream bookkeeping in `_settle`. Two kinds exist:

* `HboneStream` (this module): the stream *is* the transport of an in-process consumer
  (a waypoint running HTTP over it, a test). It is what `HbonePool.open_stream` returns
  after the 200 and what `PendingStream.accept` returns on the server.
* `Tunnel` (tunnel.py): the stream spliced to a TCP transport, the byte path of ztunnel.
  `tunnel.splice()` turns an HboneStream that has no consumer yet into a Tunnel by moving
  its state over (same `done` future), so the splice path keeps its per-chunk cost.

Receiving (peer -> consumer). DATA (bytes or read-only memoryviews of immutable bytes: safe
to keep) goes to `protocol.data_received` at once, and its flow-control credit is returned
after that call (ack-on-consume). Before a protocol is set, or while `pause_reading()` is
in force, chunks are held *unacknowledged*: the peer can send at most one stream window
(4 MiB by default) before it blocks, so the window bounds what we hold. `resume_reading()`
delivers what was held, then returns its credit. END_STREAM is delivered as
`eof_received()` after the held data.

Sending (consumer -> peer). `write()` frames within the send windows and keeps the rest on
the connection by reference (bytearrays are copied once, because they could change).
`pause_writing()` is called when either the stream/connection send window is exhausted or
the TLS transport is above its high-water mark, `resume_writing()` when both cleared.
`write_eof()` sends END_STREAM (TCP-like half-close). `close()` is write_eof plus "no more
reading": later DATA is dropped and credited. `abort(reason)` resets the stream
(RST_STREAM CANCEL).

End. When both directions have ended (our END_STREAM sent, the peer's delivered) the result
is clean (`error=None`); a reset (by the peer: "peer_reset", by us: the abort reason, the
connection lost: "connection_lost"/"goaway") ends it with that reason.
`protocol.connection_lost(None | TunnelError(reason))` is called once, then `done` resolves.
"""
from __future__ import annotations

import asyncio

from .api import TunnelError, TunnelResult
from .connection import ErrorCode

__all__ = ["StreamCore", "HboneStream"]

_BLOCK_WINDOW = 1    # writing paused: stream/connection send window exhausted
_BLOCK_TLS = 2       # writing paused: TLS transport above its high-water mark


class StreamCore:
    """State shared by every per-stream object of a Session (see the module docstring)."""

    __slots__ = ("session", "conn", "sid", "sent", "received", "status", "unacked", "local_eof", "remote_eof",
                 "early", "early_unacked", "discard", "done", "response", "started", "server_side",
                 "response_headers")

    def __init__(self, session, *, server_side: bool) -> None:
        loop = session.loop
        self.session = session
        self.conn = session.conn
        self.sid = 0
        self.sent = 0
        self.received = 0
        self.status = 0
        self.unacked = 0                            # credit held back while the consumer is slow
        self.local_eof = False
        self.remote_eof = False
        self.early: list | None = None              # chunks received before a consumer exists
        self.early_unacked = 0
        self.discard = False                        # client: non-200, drop any body
        self.done: asyncio.Future[TunnelResult] = loop.create_future()
        self.response: asyncio.Future[int] | None = None if server_side else loop.create_future()
        self.started = loop.time()
        self.server_side = server_side
        self.response_headers: tuple[tuple[str, str], ...] = ()

    def take_state(self, other: StreamCore) -> None:
        """Become `other` (same stream, same futures): the hand-over from HboneStream to Tunnel."""
        for name in StreamCore.__slots__:
            setattr(self, name, getattr(other, name))

    def on_response(self, status: int, end_stream: bool, headers=()) -> None:
        self.status = status
        self.response_headers = headers
        if self.response is not None and not self.response.done():
            self.response.set_result(status)
        if end_stream:
            self.remote_eof = True

    def _settle(self, error: str | None) -> bool:
        """Common end: reset on error, return unconsumed credit, resolve futures. False if
        the stream had already ended."""
        if self.done.done():
            return False
        if error is not None and self.sid:
            self.conn.reset_stream(self.sid, ErrorCode.CANCEL)
        # Credit that no consumer will return any more goes back to the connection window.
        leftover = self.unacked + self.early_unacked
        self.unacked = self.early_unacked = 0
        self.early = None
        if leftover:
            self.conn.acknowledge_received_data(self.sid, leftover)
        return True

    def _resolve(self, error: str | None) -> None:
        if self.response is not None and not self.response.done():
            self.response.set_exception(TunnelError(error or "stream_closed",
                                                    f"stream ended before the CONNECT response ({error})"))
        self.done.set_result(TunnelResult(bytes_sent=self.sent, bytes_received=self.received,
                                          status=self.status, duration=self.session.loop.time() - self.started,
                                          error=error))
        self.session.want_flush()
        self.session.tunnel_done(self)


class HboneStream(StreamCore):
    """An open CONNECT stream used as a transport by an in-process asyncio.Protocol-like
    consumer (see the module docstring). `done` resolves to the TunnelResult."""

    __slots__ = ("protocol", "read_paused", "write_block", "closing", "eof_pending", "spliced", "extra")

    def __init__(self, session, *, server_side: bool, extra: dict | None = None) -> None:
        super().__init__(session, server_side=server_side)
        self.protocol = None
        self.read_paused = False
        self.write_block = _BLOCK_TLS if session.tls_paused else 0
        self.closing = False
        self.eof_pending = False                    # the peer's END_STREAM, not yet delivered
        self.spliced = False
        self.extra = extra if extra is not None else {}

    # -- transport API (for the consumer) ---------------------------------------------------

    def set_protocol(self, protocol) -> None:
        """Attach the consumer: `connection_made(self)` is called, then anything held is
        delivered (unless reading is paused), then eof/connection_lost if already due."""
        self._check_usable()
        self.protocol = protocol
        protocol.connection_made(self)
        if self.write_block:
            protocol.pause_writing()
        if self.done.done():
            self._lost(self.done.result().error)
            return
        self._deliver()

    def get_protocol(self):
        return self.protocol

    def write(self, data: bytes | memoryview) -> None:
        """Send `data` (kept by reference until framed: a bytearray is copied)."""
        if self.local_eof or self.done.done():
            return
        if self.spliced:
            raise RuntimeError("this HBONE stream was spliced to a socket")
        if type(data) is bytearray:
            data = bytes(data)
        self.sent += len(data)
        if not self.conn.send_data(self.sid, data) and not self.write_block & _BLOCK_WINDOW:
            self._block(_BLOCK_WINDOW)
        session = self.session
        if not session.flush_scheduled:               # a consumer writing head and body: one call
            session.want_flush()

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.write(c)

    def write_eof(self) -> None:
        """Half-close: END_STREAM after what was written. Reading goes on."""
        if self.local_eof or self.done.done():
            return
        self._check_usable()
        self.local_eof = True
        self.conn.end_stream(self.sid)
        self.session.want_flush()
        if self.remote_eof:
            self._finish(None)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """write_eof() and stop reading: DATA still coming is dropped (and credited); the
        stream ends cleanly once the peer ends its side."""
        if self.done.done():
            return
        self.closing = True
        self.read_paused = False
        if self.early:                                # never to be read: give the credit back
            n, self.early_unacked, self.early = self.early_unacked, 0, None
            self.conn.acknowledge_received_data(self.sid, n)
        if self.eof_pending:
            self.eof_pending = False
            self.remote_eof = True
        if self.local_eof:
            if self.remote_eof:
                self._finish(None)
        else:
            self.write_eof()

    def abort(self, reason: str = "aborted") -> None:
        """Reset the stream now (RST_STREAM CANCEL); the result's error is `reason`."""
        if self.done.done():
            return
        self.closing = True
        self._finish(reason)

    def is_closing(self) -> bool:
        return self.closing or self.done.done()

    def pause_reading(self) -> None:
        """Stop delivering DATA and stop returning its credit (the peer blocks on the window)."""
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._deliver()

    def is_reading(self) -> bool:
        return not self.read_paused

    def get_write_buffer_size(self) -> int:
        return self.conn.pending_bytes(self.sid) if not self.done.done() else 0

    def get_extra_info(self, name: str, default=None):
        """stream_id, peer_identity, authority, headers (request), response_headers, status,
        and the TLS transport's peername, sockname, ssl_object, socket."""
        if name == "stream_id":
            return self.sid
        if name == "status":
            return self.status
        if name == "response_headers":
            return self.response_headers
        if name in self.extra:
            return self.extra[name]
        t = self.session.transport
        return t.get_extra_info(name, default) if t is not None else default

    # -- stream side (called by the Session) ----------------------------------------------

    def on_data(self, data, n: int, end: bool) -> None:
        if self.discard or self.closing or self.done.done():
            if n:
                self.conn.acknowledge_received_data(self.sid, n)
            if end:
                self.on_end()
            return
        p = self.protocol
        if p is None or self.read_paused or self.early:
            if data:
                if self.early is None:
                    self.early = []
                self.early.append(data)             # a view of immutable bytes: no copy
            self.early_unacked += n
            if end:
                self.eof_pending = True
            return
        if data:
            self.received += len(data)
            p.data_received(data)
        if n and not self.done.done():
            self.conn.acknowledge_received_data(self.sid, n)   # the session flushes after this read
        if end:
            self.on_end()

    def on_end(self) -> None:
        if self.done.done():
            return
        if self.protocol is None or self.read_paused or self.early:
            self.eof_pending = True
            return
        self._deliver_eof()

    def on_reset(self, reason: str) -> None:
        self._finish(reason)

    def on_unblocked(self) -> None:
        self._unblock(_BLOCK_WINDOW)

    def tls_paused(self) -> None:
        self._block(_BLOCK_TLS)

    def tls_resumed(self) -> None:
        self._unblock(_BLOCK_TLS)

    # -- internals --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.spliced:
            raise RuntimeError("this HBONE stream was spliced to a socket")

    def _deliver(self) -> None:
        """Hand held chunks to the consumer while it reads, crediting each after delivery."""
        p = self.protocol
        while self.early and not self.read_paused and not self.done.done():
            chunk = self.early.pop(0)
            self.received += len(chunk)
            p.data_received(chunk)
        if not self.early and not self.done.done():
            n, self.early_unacked = self.early_unacked, 0
            if n:
                self.conn.acknowledge_received_data(self.sid, n)
                self.session.want_flush()
            if self.eof_pending and not self.read_paused:
                self.eof_pending = False
                self._deliver_eof()

    def _deliver_eof(self) -> None:
        self.remote_eof = True
        p = self.protocol
        if p is not None and not self.closing and hasattr(p, "eof_received"):
            p.eof_received()
        if self.local_eof and not self.done.done():
            self._finish(None)

    def _block(self, bit: int) -> None:
        was = self.write_block
        self.write_block |= bit
        if not was and self.protocol is not None and not self.done.done():
            self.protocol.pause_writing()

    def _unblock(self, bit: int) -> None:
        if self.write_block & bit:
            self.write_block &= ~bit
            if not self.write_block and self.protocol is not None and not self.done.done():
                self.protocol.resume_writing()

    def _finish(self, error: str | None) -> None:
        if not self._settle(error):
            return
        self._lost(error)
        self._resolve(error)

    def _lost(self, error: str | None) -> None:
        p = self.protocol
        if p is None:
            return
        self.protocol = None                        # connection_lost exactly once
        p.connection_lost(None if error is None else TunnelError(error, f"HBONE stream ended: {error}"))

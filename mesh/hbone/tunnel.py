"""The plain-TCP side of one HBONE stream: an asyncio.Protocol relaying bytes with backpressure.

Theory of operation
-------------------
A `Tunnel` joins one HTTP/2 stream of a `Session` (TLS side) to one TCP transport (the
downstream app socket on the client, the upstream app socket on the server). A stream is
born as an `HboneStream` (stream.py); `splice()` hands it over to a Tunnel (`take_over`
moves its state and held bytes, the `done` future stays the same), so the relay below is
the only code on the spliced byte path.

TCP -> stream: every read (up to uvloop's 256 KiB) is handed to `H2Connection.send_data`
as is; the session writes everything queued once per loop iteration. When the stream or
connection send window is exhausted, send_data keeps the remainder and we pause reading
the TCP socket until `SendUnblocked`; when the TLS transport is above its high-water mark
the session pauses every tunnel's TCP reading the same way (`_READ_TLS`).

Stream -> TCP: DATA chunks (memoryviews, cut-through) are written to the TCP transport at
once. Their flow-control credit is returned (`acknowledge_received_data`) only while that
transport is below its high-water mark; while it is paused the credit accumulates in
`unacked` and is returned by `resume_writing`. So a slow reader costs at most one stream
window (16 MiB) plus the TCP high-water mark of buffer, never more.

Half-close (RFC 9113 §8.5): TCP EOF -> END_STREAM; END_STREAM -> TCP write_eof. When both
directions have ended the TCP socket is closed and the result is recorded. A TCP reset
becomes RST_STREAM(CONNECT_ERROR); a RST_STREAM from the peer aborts (resets) the socket.

Per-chunk work is counters and method calls only: no dicts, no logging, no copies.
"""
from __future__ import annotations

import asyncio
import socket

from .api import TunnelResult
from .connection import ErrorCode
from .stream import HboneStream, StreamCore

__all__ = ["Tunnel", "HoldingProtocol", "splice", "set_nodelay"]

_READ_WINDOW = 1     # reading paused: stream/connection send window exhausted
_READ_TLS = 2        # reading paused: TLS transport above its high-water mark
_READ_CLOSED = 4     # our side of the stream has ended

# TCP write buffer limits: above HIGH we stop returning flow-control credit for this stream.
TCP_HIGH_WATER = 1024 * 1024
TCP_LOW_WATER = 256 * 1024


def retire(transport: asyncio.BaseTransport) -> None:
    """Keep a closed TCP transport referenced for a moment (belt and braces). The uvloop 0.23
    crash (tests/bench/repro_uvloop_shutdown_crash.py) needs a transport freed while still OPEN
    with a write_eof() shutdown pending: its dealloc calls uv_close, libuv cancels the shutdown and
    __uv_stream_on_shutdown revives the dying object (refcnt 0) and frees it twice. close()/abort()
    already prevents that (uvloop holds the handle until its close callback); the invariant that
    matters is: never drop the last reference to an open, half-closed transport."""
    try:
        asyncio.get_running_loop().call_later(0.5, _keep, transport)
    except RuntimeError:
        pass


def _keep(_transport: object) -> None:
    pass


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class HoldingProtocol(asyncio.Protocol):
    """Protocol for an accepted downstream connection while its tunnel is being set up.

    uvloop starts reading a new transport right *after* `connection_made` returns, so a
    pause_reading() there does not stick and early bytes (or even EOF) can arrive before
    the tunnel exists. This protocol keeps them (pausing after the first read, so at most
    one read is held) and `Tunnel.attach` replays them after the CONNECT succeeded.
    """

    __slots__ = ("transport", "held", "eof", "lost")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.held.append(data)
        self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Tunnel(StreamCore, asyncio.Protocol):
    """One stream spliced to a TCP transport; `done` resolves to a TunnelResult (never raises)."""

    __slots__ = ("transport", "write_paused", "read_block", "on_attach")

    def __init__(self, session, *, server_side: bool, on_attach=None) -> None:
        super().__init__(session, server_side=server_side)
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_block = 0
        self.on_attach = on_attach                  # server: sends 200 once the upstream is connected

    @classmethod
    def take_over(cls, stream: HboneStream, *, on_attach=None) -> Tunnel:
        """The Tunnel that continues `stream` (no consumer yet) in its session: chunks and
        END_STREAM held by the stream are replayed once the TCP side is connected."""
        if stream.protocol is not None or stream.spliced:
            raise RuntimeError("only a stream without a consumer can be spliced")
        tun = cls.__new__(cls)
        tun.take_state(stream)
        tun.transport = None
        tun.write_paused = False
        tun.read_block = 0
        tun.on_attach = on_attach
        if stream.eof_pending:
            tun.remote_eof = True
        stream.spliced = True
        if not tun.done.done():
            tun.session.tunnels[tun.sid] = tun
        return tun

    # -- TCP side (asyncio.Protocol) ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER, low=TCP_LOW_WATER)  # type: ignore[attr-defined]
        if self.done.done():                        # the stream died while we were connecting
            transport.abort()  # type: ignore[attr-defined]
            return
        if self.on_attach is not None:
            self.on_attach(self)
        if self.early is not None:
            early, self.early = self.early, None
            for chunk in early:
                transport.write(chunk)  # type: ignore[attr-defined]
                self.received += len(chunk)
            n, self.early_unacked = self.early_unacked, 0
            self._credit(n)
        if self.remote_eof:
            self._write_eof()
        if self.session.tls_paused:
            self._block(_READ_TLS)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.sent += n
        if not self.conn.send_data(self.sid, data):
            self._block(_READ_WINDOW)
        session = self.session
        if not session.flush_scheduled:     # else data_queued would leave it to that flush
            session.data_queued(n)

    def eof_received(self) -> bool:
        self.local_eof = True
        self.read_block |= _READ_CLOSED
        self.conn.end_stream(self.sid)
        self.session.want_flush()
        if self.remote_eof:
            self._finish(None)
        return True                                 # keep writing: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.transport is not None:
            retire(self.transport)
        self.transport = None
        self.conn.reset_stream(self.sid, ErrorCode.CONNECT_ERROR if exc else ErrorCode.CANCEL)
        self.session.want_flush()
        self._finish("tcp_reset" if exc else "tcp_closed")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.acknowledge_received_data(self.sid, n)
            self.session.want_flush()

    # -- stream side (called by the Session) ----------------------------------------------

    def on_data(self, data, n: int, end: bool) -> None:
        t = self.transport
        if t is None:
            if self.discard or self.done.done():
                self.conn.acknowledge_received_data(self.sid, n)
            else:                                   # server, upstream not connected yet
                if self.early is None:
                    self.early = []
                self.early.append(bytes(data))
                self.early_unacked += n
                if end:
                    self.remote_eof = True
            return
        if data:
            t.write(data)
            self.received += len(data)
        if self.write_paused:
            self.unacked += n
        elif n:
            self.conn.acknowledge_received_data(self.sid, n)
        if end:
            self.remote_eof = True
            self._write_eof()

    def on_end(self) -> None:
        self.remote_eof = True
        if self.transport is not None:
            self._write_eof()

    def on_reset(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._finish(reason)

    def on_unblocked(self) -> None:
        self._unblock(_READ_WINDOW)

    def tls_paused(self) -> None:
        self._block(_READ_TLS)

    def tls_resumed(self) -> None:
        self._unblock(_READ_TLS)

    def abort(self, reason: str) -> None:
        """Tear down both sides now (cancellation, pool close)."""
        if self.done.done():
            return
        self.conn.reset_stream(self.sid, ErrorCode.CANCEL)
        self.session.want_flush()
        self.on_reset(reason)

    # -- internals --------------------------------------------------------------------------

    def attach(self, transport: asyncio.Transport) -> None:
        """Client: take over the caller's (paused) downstream transport after the 200,
        replaying what a HoldingProtocol caught before."""
        held = transport.get_protocol()
        transport.set_protocol(self)
        self.connection_made(transport)
        if isinstance(held, HoldingProtocol):
            for chunk in held.held:
                if self.done.done():
                    return
                self.data_received(chunk)
            held.held = []
            if held.lost:
                self.connection_lost(None)
                return
            if held.eof:
                self.eof_received()
                return
        if not self.done.done():
            transport.resume_reading()

    def _credit(self, n: int) -> None:
        if not n:
            return
        if self.write_paused:
            self.unacked += n
        else:
            self.conn.acknowledge_received_data(self.sid, n)
            self.session.want_flush()

    def _write_eof(self) -> None:
        t = self.transport
        if t is None:
            return
        if t.can_write_eof():
            t.write_eof()
        if self.local_eof:
            self._finish(None)

    def _block(self, bit: int) -> None:
        if not self.read_block and self.transport is not None:
            self.transport.pause_reading()
        self.read_block |= bit

    def _unblock(self, bit: int) -> None:
        if self.read_block & bit:
            self.read_block &= ~bit
            if not self.read_block and self.transport is not None:
                self.transport.resume_reading()

    def _finish(self, error: str | None) -> None:
        if not self._settle(error):
            return
        t = self.transport
        if t is not None:
            if error is None:
                t.close()                           # flushes what is buffered, then FIN
            else:
                t.abort()
            retire(t)
        self._resolve(error)


def splice(stream: HboneStream, transport: asyncio.Transport) -> asyncio.Future[TunnelResult]:
    """Relay between an open `stream` that has no consumer yet and a connected TCP
    `transport` until both directions end (ztunnel's copy). Anything the stream held, and
    what a HoldingProtocol on `transport` caught, is replayed. Returns the stream's `done`.
    From here on the byte path is `Tunnel`'s: DATA is written straight into the transport,
    TCP reads go straight to `send_data`."""
    tun = Tunnel.take_over(stream)
    tun.attach(transport)
    return tun.done

"""One TLS + HTTP/2 connection on the event loop: drives H2Connection, dispatches to Tunnels, coalesces writes.

Theory of operation
-------------------
`Session` is the asyncio.Protocol of the TLS transport. Reads go through
`H2Connection.receive_data`; DATA events are dispatched straight to the stream's object
(a `Tunnel` spliced to TCP, or an `HboneStream` feeding an in-process consumer)
(no per-chunk allocation beyond the event itself). Everything the connection queues is
written with ONE `transport.write` per loop iteration: at the end of each TLS read, and
via a single `call_soon(flush)` for writes triggered from TCP reads, so many streams'
frames share TLS records (the prototype's biggest small-message win). A small read on a
connection that carries only that stream is written at once (`flush_at_once`): nothing
could share its record, and the deferral would cost the request a loop hop.

When the TLS transport goes above its high-water mark every tunnel stops reading its TCP
socket; `resume_writing` restarts them. Control frames we owe the peer (ACKs, resets) count as
written once the transport took them below its high-water mark (the connection's
`max_pending_control_frames` bound on a peer that does not read). A ProtocolError sends GOAWAY and closes the
connection; losing the connection aborts all its tunnels. Subclasses (client/server) add
peer verification and what to do with responses/requests.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import sys

from .connection import (ConnectionConfig, DataReceived, GoAway, H2Connection, HandshakeCompleted,
                         ProtocolError, RequestReceived, RequestRejected, ResponseReceived, Role,
                         SendUnblocked, StreamEnded, StreamReset)
from .stream import StreamCore
from .tunnel import set_nodelay

__all__ = ["Session", "flush_at_once"]

log = logging.getLogger(__name__)

TLS_HIGH_WATER = 4 * 1024 * 1024
TLS_LOW_WATER = 1024 * 1024
READ_BUFFER = 256 * 1024   # what the TLS layer decrypts into per read (uvloop's own read size)
MIN_READ_BUFFER = 4 * 1024

# A TCP read up to this size (a request or a response, not a bulk transfer) may be written at once.
SMALL_READ = 16 * 1024


def flush_at_once(nbytes: int, tunnels: int, flush_scheduled: bool) -> bool:
    """Whether a tunnel's TCP read of `nbytes` goes to the TLS transport now rather than by
    the deferred (call_soon) flush. Deferring lets the reads of many streams in one loop
    iteration share one TLS record and write; with one stream on the connection and nothing
    queued there is nothing to share, and the deferral only adds a loop hop to the request's
    latency. Large reads (bulk) keep the deferred path."""
    return tunnels == 1 and not flush_scheduled and nbytes <= SMALL_READ


class Session(asyncio.BufferedProtocol):
    """Base for ClientSession and ServerSession.

    A BufferedProtocol: the TLS layer decrypts straight into our read buffer. Fed as a plain
    Protocol, uvloop allocates a 256 KiB bytes per TLS record and joins them into another
    (an extra copy and fresh pages for every read: 11 % of a receiving ztunnel's CPU in page
    faults under iperf3). The buffer is reused only when nothing refers to it any more: DATA
    payloads are memoryviews into it (cut-through), and whoever keeps one (a TCP transport
    that could not write it all at once, an in-process consumer) keeps that buffer alive
    while the next read gets a fresh one."""

    def __init__(self, role: Role, config: ConnectionConfig) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = H2Connection(role, config, clock=self.loop.time)
        self._conn_out = self.conn.output            # truthy when the connection has bytes to write
        self.tunnels: dict[int, StreamCore] = {}        # Tunnel or HboneStream, by stream id
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.tls_paused = False
        self.closed = False
        self.close_reason: str | None = None
        self.flush_scheduled = False
        """A flush is queued with call_soon (a writer may test this instead of calling want_flush)."""
        self._rbuf = bytearray(0)

    # -- hooks for subclasses -------------------------------------------------------------

    def verify_peer(self, ssl_object: ssl.SSLObject) -> None:
        """Raise to refuse the peer (after the TLS handshake, before any HTTP/2)."""

    def on_request(self, ev: RequestReceived) -> None:
        raise NotImplementedError

    def on_request_rejected(self, ev: RequestRejected) -> None:
        pass

    def on_handshake(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def on_goaway(self, ev: GoAway) -> None:
        pass

    def on_closed(self) -> None:
        pass

    def on_protocol_error(self, error: ProtocolError) -> None:
        """The peer broke HTTP/2: GOAWAY is queued and the connection is being closed."""

    def tunnel_done(self, tunnel: StreamCore) -> None:
        self.tunnels.pop(tunnel.sid, None)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=TLS_HIGH_WATER, low=TLS_LOW_WATER)  # type: ignore[attr-defined]
        try:
            self.verify_peer(transport.get_extra_info("ssl_object"))
        except Exception as e:
            self.fail(e)
            transport.abort()  # type: ignore[attr-defined]
            return
        self.conn.initiate()
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        # sizehint is what the TLS layer holds still encrypted (>= what it will decrypt). The
        # buffer is sized to it: a DATA view that outlives the read (a TCP transport buffering
        # it) pins the whole buffer, so a small read must not pin a large one; and a session
        # whose reads are small again gives a large buffer back.
        # min(max(sizehint, MIN_READ_BUFFER), READ_BUFFER) without two builtin calls per read
        want = MIN_READ_BUFFER if sizehint < MIN_READ_BUFFER else sizehint if sizehint < READ_BUFFER else READ_BUFFER
        # 2 = our attribute + getrefcount's argument: no memoryview of it is alive.
        if sys.getrefcount(self._rbuf) != 2 or not want <= len(self._rbuf) <= 4 * want:
            self._rbuf = bytearray(want)
        return memoryview(self._rbuf)

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(memoryview(self._rbuf)[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            log.info("hbone: closing connection from %s: protocol error %s (%s)",
                     self._peername(), e.reason, e)
            self.close_reason = e.reason
            self.on_protocol_error(e)
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        tunnels = self.tunnels
        for ev in events:
            if type(ev) is DataReceived:
                tun = tunnels.get(ev.stream_id)
                if tun is not None:
                    tun.on_data(ev.data, ev.flow_controlled_length, ev.end_stream)
                elif ev.flow_controlled_length:
                    self.conn.acknowledge_received_data(ev.stream_id, ev.flow_controlled_length)
            else:
                self._dispatch(ev)
        if self._conn_out:
            self.flush()

    def _dispatch(self, ev) -> None:
        t = type(ev)
        if t is SendUnblocked:
            tun = self.tunnels.get(ev.stream_id)
            if tun is not None:
                tun.on_unblocked()
        elif t is ResponseReceived:
            tun = self.tunnels.get(ev.stream_id)
            if tun is not None:
                tun.on_response(ev.status, ev.end_stream, ev.headers)
        elif t is RequestReceived:
            self.on_request(ev)
        elif t is StreamEnded:
            tun = self.tunnels.get(ev.stream_id)
            if tun is not None:
                tun.on_end()
        elif t is StreamReset:
            tun = self.tunnels.get(ev.stream_id)
            if tun is not None:
                tun.on_reset(ev.reason)
        elif t is HandshakeCompleted:
            self.on_handshake()
        elif t is RequestRejected:
            self.on_request_rejected(ev)
        elif t is GoAway:
            self.on_goaway(ev)

    def eof_received(self) -> bool:
        return False                                 # TLS: close on EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        reason = self.close_reason or "connection_lost"
        if not self.ready.done():
            self.fail(exc or ConnectionError("connection closed during the HTTP/2 handshake"))
        for tun in list(self.tunnels.values()):
            tun.on_reset(reason)
        self.on_closed()

    def pause_writing(self) -> None:
        self.tls_paused = True
        for tun in self.tunnels.values():
            tun.tls_paused()

    def resume_writing(self) -> None:
        self.tls_paused = False
        self.conn.control_frames_written()
        for tun in list(self.tunnels.values()):
            tun.tls_resumed()

    # -- output ---------------------------------------------------------------------------

    def data_queued(self, nbytes: int) -> None:
        """A tunnel queued `nbytes` read from its TCP socket: written now or by the deferred
        flush, as `flush_at_once` decides."""
        if flush_at_once(nbytes, len(self.tunnels), self.flush_scheduled):
            self.flush()
        else:
            self.want_flush()

    def want_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self._conn_out and self.transport is not None:
            conn = self.conn
            chunks = conn.chunks_to_send()
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:                             # one TLS output pass and socket write for all
                self.transport.writelines(chunks)
            # Else resume_writing says when it left; nothing owed (the usual case): no call.
            if not self.tls_paused and conn.abuse.control_pending:
                conn.control_frames_written()

    # -- lifecycle ------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()                   # retrieved: waiters may be gone

    def goaway(self) -> None:
        """Stop accepting new streams (graceful drain); close once no tunnel is left."""
        if self.closed or self.transport is None:
            return
        self.conn.close()
        self.flush()
        if not self.tunnels:
            self.transport.close()

    def abort(self, reason: str, *, hard: bool = False) -> None:
        """Close now: all tunnels are reset. `hard`: drop the TCP connection at once, without
        waiting for TLS close_notify (the peer is gone, e.g. its pod's netns was deleted)."""
        if self.transport is not None and not self.closed:
            self.close_reason = reason
            self.conn.close()
            self.flush()
            if hard:
                self.transport.abort()
            else:
                self.transport.close()

    def _peername(self):
        return self.transport.get_extra_info("peername") if self.transport is not None else None

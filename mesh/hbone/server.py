"""HboneServer: accepts mTLS HTTP/2 connections on a caller-made listening socket and serves CONNECT tunnels.

Theory of operation
-------------------
Each accepted TLS connection becomes a `ServerSession`. After the handshake the client's
SPIFFE identity must be in our trust domain (else the connection is closed), and the
HTTP/2 preface + SETTINGS must arrive within `handshake_timeout`.

For every CONNECT the connection layer has already validated (RFC 9113 §8.5; malformed ->
400 with a reason), the session calls `handler(ConnectRequest)` in a task. The handler
returns a *connected* socket to the application or raises `Reject(status, reason)`. Only
when the socket is attached to the event loop is `:status 200` sent -- so a 200 always
means "upstream connected" (as ztunnel does). Bytes the client sent early are held (they
are unacknowledged, so bounded by our stream window) and written once connected.
A rejection answers with its status, END_STREAM and RST_STREAM(NO_ERROR).

`close()` stops accepting and sends GOAWAY on every connection: tunnels that exist keep
running, connections close as they drain; `wait_closed()` waits for that.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from mesh.identity import SpiffeId
from mesh.tls import PeerIdentityError, check_peer

from .api import ConnectRequest, Reject, TunnelResult
from .connection import ConnectionConfig, ErrorCode, LocalProtocolError, RequestReceived, RequestRejected, Role
from .session import Session
from .tunnel import Tunnel

__all__ = ["HboneServer"]

log = logging.getLogger(__name__)

Handler = Callable[[ConnectRequest], Awaitable[socket.socket]]
OnResult = Callable[[ConnectRequest, TunnelResult], None]


class ServerSession(Session):
    def __init__(self, server: HboneServer) -> None:
        super().__init__(Role.SERVER, server.config)
        self.server = server
        self.peer_identity: SpiffeId | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._local: tuple[str, int] = ("", 0)
        self._peer: tuple[str, int] = ("", 0)

    def verify_peer(self, ssl_object: ssl.SSLObject) -> None:
        try:
            identity = check_peer(ssl_object, trust_domain=self.server.trust_domain)
        except PeerIdentityError as e:
            log.info("hbone server: refusing client: %s (%s)", e, e.reason)
            raise
        if not isinstance(identity, SpiffeId):
            raise PeerIdentityError("not_a_workload", f"{identity} is not a workload identity")
        self.peer_identity = identity

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._local = _addr(transport.get_extra_info("sockname"))
        self._peer = _addr(transport.get_extra_info("peername"))
        self.server._sessions.add(self)
        super().connection_made(transport)
        if not self.closed and self.transport is not None:
            self._timer = self.loop.call_later(self.server.handshake_timeout, self._handshake_timeout)
            if self.server._closing:
                self.goaway()

    def _handshake_timeout(self) -> None:
        if not self.conn.handshake_complete and self.transport is not None:
            log.info("hbone server: no HTTP/2 preface from %s in %.1fs", self._peer, self.server.handshake_timeout)
            self.abort("h2_handshake_timeout")

    def on_handshake(self) -> None:
        super().on_handshake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_request(self, ev: RequestReceived) -> None:
        req = ConnectRequest(authority=ev.authority, headers=ev.headers, peer_identity=self.peer_identity,
                             local_addr=self._local, peer_addr=self._peer, stream_id=ev.stream_id)
        tun = Tunnel(self, server_side=True, on_attach=self._accept)
        tun.sid = ev.stream_id
        if ev.end_stream:
            tun.remote_eof = True
        self.tunnels[ev.stream_id] = tun
        self.loop.create_task(self._serve(req, tun))

    def on_request_rejected(self, ev: RequestRejected) -> None:
        log.info("hbone server: rejected CONNECT from %s on stream %d: %s (status %s)",
                 self._peer, ev.stream_id, ev.reason, ev.status or "RST")

    def _accept(self, tun: Tunnel) -> None:
        """Upstream is connected (called from the TCP side's connection_made): answer 200."""
        tun.on_attach = None
        tun.status = 200
        self.conn.send_response(tun.sid, 200)
        self.want_flush()

    async def _serve(self, req: ConnectRequest, tun: Tunnel) -> None:
        server = self.server
        try:
            sock = await server.handler(req)
        except Reject as r:
            self._reject(tun, r.status, r.reason)
        except Exception as e:
            log.warning("hbone server: handler failed for %s: %r", req.authority, e)
            self._reject(tun, 503, "handler_failed")
        else:
            if tun.done.done():                     # stream reset / connection gone meanwhile
                sock.close()
            else:
                try:
                    sock.setblocking(False)
                    await self.loop.create_connection(lambda: tun, sock=sock)
                except OSError as e:
                    sock.close()
                    log.info("hbone server: upstream socket unusable for %s: %s", req.authority, e)
                    self._reject(tun, 503, "upstream_failed")
        result = await tun.done
        if server.on_result is not None:
            try:
                server.on_result(req, result)
            except Exception:
                log.exception("hbone server: on_result callback failed")

    def _reject(self, tun: Tunnel, status: int, reason: str) -> None:
        if tun.done.done():
            return
        tun.status = status
        try:
            self.conn.send_response(tun.sid, status, end_stream=True)
            self.conn.reset_stream(tun.sid, ErrorCode.NO_ERROR)
        except LocalProtocolError:
            pass
        self.want_flush()
        tun._finish(reason)

    def tunnel_done(self, tunnel: Tunnel) -> None:
        super().tunnel_done(tunnel)
        if self.conn.goaway_sent and not self.tunnels and self.transport is not None:
            self.flush()
            self.transport.close()

    def on_closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.server._session_closed(self)


class HboneServer:
    """Serves HBONE on one listening socket (one per pod, with that pod's certificate)."""

    def __init__(self, handler: Handler, *, trust_domain: str, handshake_timeout: float,
                 max_concurrent_streams: int, on_result: OnResult | None,
                 config: ConnectionConfig | None = None) -> None:
        self.handler = handler
        self.trust_domain = trust_domain
        self.handshake_timeout = handshake_timeout
        self.on_result = on_result
        base = config or ConnectionConfig()
        self.config = ConnectionConfig(initial_window_size=base.initial_window_size,
                                       connection_window_size=base.connection_window_size,
                                       max_frame_size=base.max_frame_size,
                                       max_concurrent_streams=max_concurrent_streams,
                                       max_header_list_size=base.max_header_list_size)
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[ServerSession] = set()
        self._closing = False
        self._drained: asyncio.Event | None = None

    @classmethod
    async def start(cls, sock: socket.socket, ssl_context: ssl.SSLContext, handler: Handler, *,
                    trust_domain: str, handshake_timeout: float = 10.0, max_concurrent_streams: int = 1000,
                    on_result: OnResult | None = None, config: ConnectionConfig | None = None) -> HboneServer:
        """Serve on an already bound and listening socket (see the module docstring)."""
        self = cls(handler, trust_domain=trust_domain, handshake_timeout=handshake_timeout,
                   max_concurrent_streams=max_concurrent_streams, on_result=on_result, config=config)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._server = await loop.create_server(lambda: ServerSession(self), sock=sock, ssl=ssl_context,
                                                ssl_handshake_timeout=handshake_timeout)
        return self

    @property
    def sockets(self):
        return self._server.sockets if self._server is not None else ()

    @property
    def connection_count(self) -> int:
        return len(self._sessions)

    def close(self) -> None:
        """Stop accepting; GOAWAY every connection so it closes once its tunnels end."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for s in list(self._sessions):
            s.goaway()
        self._check_drained()

    async def wait_closed(self) -> None:
        """Wait until close() was called and every connection has drained."""
        if self._drained is not None:
            await self._drained.wait()

    def _session_closed(self, s: ServerSession) -> None:
        self._sessions.discard(s)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._closing and not self._sessions and self._drained is not None:
            self._drained.set()


def _addr(value) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return ("", 0)

"""HboneServer: accepts mTLS HTTP/2 connections on a caller-made listening socket and serves CONNECT tunnels.

Theory of operation
-------------------
The server accepts TCP connections itself (`sock_accept`) and runs each TLS handshake as a
task (`connect_accepted_socket`), so a failed handshake is seen, named and reported instead
of dying silently inside the event loop. Hostile input is bounded at every step:

* at most `max_pending_handshakes` connections may be between accept and a complete TLS +
  HTTP/2 handshake; a new one beyond that evicts the *oldest* pending one (a flood of
  half-open connections cannot grow memory, and a real client, whose handshake takes
  milliseconds, is rarely the oldest);
* TLS must complete within `handshake_timeout`, then the HTTP/2 preface + SETTINGS within
  `handshake_timeout` again; a header block (HEADERS + CONTINUATION) left open for longer
  than `handshake_timeout` closes the connection too;
* after TLS the client's SPIFFE identity must be a workload in our trust domain.

Every refusal that happens before the handler sees a request -- connection level or a
CONNECT the HTTP/2 layer refused (400 with its reason / RST) -- is reported once through
`on_reject(Rejection)` with a stable `reason` (see `api.Rejection`); refusals by the handler
are reported through `on_result` with the `Reject.reason`.

For every CONNECT the connection layer has already validated (RFC 9113 §8.5; malformed ->
400 with a reason), the session calls the handler in a task. Two handler shapes (told apart
by their arity, once, at start):

* `handler(req: ConnectRequest) -> socket` (ztunnel inbound): returns a *connected* socket
  to the application or raises `Reject(status, reason)`;
* `handler(req, pending: PendingStream) -> None | socket`: decides on the stream itself --
  `await pending.splice(sock)` (as above), `pending.accept()` (200 now, the returned
  `HboneStream` is served in process: a waypoint runs HTTP over it), or raise `Reject` /
  `pending.reject(...)`. Returning a socket means splice it; returning None undecided -> 503.

A stream reset before the handler answered (by the peer, or with its connection) stops it:
a handler that has not started yet is never called, a running one is cancelled (its upstream
connect with it), so a rapid reset costs no connects to the application; `on_result` still
sees the stream's end. Rapid reset and floods themselves are bounded by the connection
(abuse.py) and close it with GOAWAY ENHANCE_YOUR_CALM, reported through `on_reject` (stage
"h2").

A splice sends `:status 200` only once the socket is attached to the event loop -- so a 200
from a splice always means "upstream connected" (as ztunnel does). Bytes the client sent
early are held (they are unacknowledged, so bounded by our stream window) and go to the
socket or the in-process consumer. A rejection answers with its status, END_STREAM and
RST_STREAM(NO_ERROR). Every CONNECT the handler saw is reported once to `on_result` when
its stream ended (rejections with their `reason` as the result error).

`close()` stops accepting and sends GOAWAY on every connection: tunnels that exist keep
running, connections close as they drain; `wait_closed()` waits for that.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import logging
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from mesh.identity import SpiffeId
from mesh.tls import PeerIdentityError, check_peer

from .api import ConnectRequest, Reject, Rejection, TunnelResult
from .connection import (ConnectionConfig, ErrorCode, LocalProtocolError, ProtocolError, RequestReceived,
                         RequestRejected, Role)
from .session import Session
from .stream import HboneStream, StreamCore
from .tunnel import Tunnel

__all__ = ["HboneServer", "PendingStream"]

log = logging.getLogger(__name__)

SocketHandler = Callable[[ConnectRequest], Awaitable[socket.socket]]
StreamHandler = Callable[[ConnectRequest, "PendingStream"], Awaitable["socket.socket | None"]]
Handler = SocketHandler | StreamHandler
OnResult = Callable[[ConnectRequest, TunnelResult], None]
OnReject = Callable[[Rejection], None]

# OpenSSL reasons of a failed server handshake -> stable labels.
_TLS_REASONS = {
    "HTTP_REQUEST": "http1_request", "HTTPS_PROXY_REQUEST": "http1_request",
    "WRONG_VERSION_NUMBER": "not_tls", "UNKNOWN_PROTOCOL": "not_tls", "PACKET_LENGTH_TOO_LONG": "not_tls",
    "RECORD_LENGTH_MISMATCH": "not_tls", "UNEXPECTED_RECORD": "not_tls", "RECORD_LAYER_FAILURE": "not_tls",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "UNSUPPORTED_PROTOCOL": "wrong_tls_version", "NO_PROTOCOLS_AVAILABLE": "wrong_tls_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "wrong_tls_version", "WRONG_SSL_VERSION": "wrong_tls_version",
    "VERSION_TOO_LOW": "wrong_tls_version", "UNSUPPORTED_SSL_VERSION": "wrong_tls_version",
    "NO_SHARED_CIPHER": "no_shared_cipher", "NO_SHARED_GROUPS": "no_shared_cipher",
    "UNEXPECTED_EOF_WHILE_READING": "tls_aborted",
}
# X509_V_ERR_* codes -> stable labels.
_VERIFY_REASONS = {10: "cert_expired", 9: "cert_not_yet_valid", 2: "untrusted_cert", 18: "untrusted_cert",
                   19: "untrusted_cert", 20: "untrusted_cert", 21: "untrusted_cert", 7: "bad_cert_signature",
                   4: "bad_cert_signature", 23: "cert_revoked", 26: "cert_wrong_purpose"}


def tls_failure_reason(exc: BaseException) -> str:
    """A stable label for why a (server or client) TLS handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_cert")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _TLS_REASONS:
            return _TLS_REASONS[reason]
        if reason.startswith("SSLV3_ALERT_") or reason.startswith("TLSV1_ALERT_"):
            return "tls_alert_" + reason.split("_ALERT_", 1)[1].lower()
        if isinstance(exc, ssl.SSLEOFError):
            return "tls_aborted"
        return "tls_failed"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionAbortedError)):
        return "handshake_timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "tls_aborted"
    return "tls_failed"


class ServerSession(Session):
    def __init__(self, server: HboneServer) -> None:
        super().__init__(Role.SERVER, server.config)
        self.server = server
        self.peer_identity: SpiffeId | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._block_timer: asyncio.TimerHandle | None = None
        self._local: tuple[str, int] = ("", 0)
        self._peer: tuple[str, int] = ("", 0)
        self._rejected = False                  # a connection-level Rejection was reported
        # Running handler tasks of CONNECTs not answered yet, by stream id: cancelled if the
        # stream goes first.
        self._undecided: dict[int, tuple[PendingStream, asyncio.Task]] = {}

    def _report(self, reason: str, stage: str, detail: str = "") -> None:
        if stage != "stream":
            if self._rejected:
                return
            self._rejected = True
        self.server._report(Rejection(reason=reason, stage=stage, peer_addr=self._peer, local_addr=self._local,
                                      peer_identity=self.peer_identity, detail=detail))

    def verify_peer(self, ssl_object: ssl.SSLObject) -> None:
        try:
            identity = check_peer(ssl_object, trust_domain=self.server.trust_domain)
            if not isinstance(identity, SpiffeId):
                raise PeerIdentityError("not_a_workload", f"{identity} is not a workload identity")
        except PeerIdentityError as e:
            log.info("hbone server: refusing client: %s (%s)", e, e.reason)
            self._report(e.reason, "tls", str(e))
            raise
        self.peer_identity = identity

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._local = _addr(transport.get_extra_info("sockname"))
        self._peer = _addr(transport.get_extra_info("peername"))
        self.server._sessions.add(self)
        self.server._session_pending(self)
        super().connection_made(transport)
        if not self.closed and self.transport is not None:
            self._timer = self.loop.call_later(self.server.handshake_timeout, self._handshake_timeout)
            if self.server._closing:
                self.goaway()

    def _handshake_timeout(self) -> None:
        if not self.conn.handshake_complete and self.transport is not None:
            log.info("hbone server: no HTTP/2 preface from %s in %.1fs", self._peer, self.server.handshake_timeout)
            self._report("h2_handshake_timeout", "h2")
            self.abort("h2_handshake_timeout")

    def on_handshake(self) -> None:
        super().on_handshake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server._handshake_done(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A header block must not stay open (CONTINUATION trickled forever or never sent).
        if self.conn.header_block_open and not self.closed:
            if self._block_timer is None:
                self._block_timer = self.loop.call_later(self.server.handshake_timeout, self._block_timeout)
        elif self._block_timer is not None:
            self._block_timer.cancel()
            self._block_timer = None

    def _block_timeout(self) -> None:
        self._block_timer = None
        if self.conn.header_block_open and self.transport is not None:
            log.info("hbone server: header block from %s not finished in %.1fs", self._peer,
                     self.server.handshake_timeout)
            self._report("header_block_timeout", "h2")
            self.abort("header_block_timeout")

    def on_protocol_error(self, error: ProtocolError) -> None:
        self._report(error.reason, "h2", str(error))

    def on_request(self, ev: RequestReceived) -> None:
        req = ConnectRequest(authority=ev.authority, headers=ev.headers, peer_identity=self.peer_identity,
                             local_addr=self._local, peer_addr=self._peer, stream_id=ev.stream_id)
        stream = HboneStream(self, server_side=True,
                             extra={"peer_identity": self.peer_identity, "authority": ev.authority,
                                    "headers": ev.headers, "request": req})
        stream.sid = ev.stream_id
        if ev.end_stream:
            stream.eof_pending = True
        self.tunnels[ev.stream_id] = stream
        self.loop.create_task(self._serve(PendingStream(self, req, stream)))

    def on_request_rejected(self, ev: RequestRejected) -> None:
        log.info("hbone server: rejected CONNECT from %s on stream %d: %s (status %s)",
                 self._peer, ev.stream_id, ev.reason, ev.status or "RST")
        self.server._report(Rejection(reason=ev.reason, stage="stream", peer_addr=self._peer,
                                      local_addr=self._local, peer_identity=self.peer_identity,
                                      status=ev.status, detail=f"stream {ev.stream_id}"))

    def _accept(self, tun: Tunnel) -> None:
        """Upstream is connected (called from the TCP side's connection_made): answer 200."""
        tun.on_attach = None
        tun.status = 200
        self.conn.send_response(tun.sid, 200)
        self.want_flush()

    async def _serve(self, pending: PendingStream) -> None:
        server = self.server
        req = pending.request
        try:
            if pending.current.done.done():
                # Reset (or the connection lost) before the handler even ran: a rapid reset
                # must not cost an upstream connect.
                sock = None
                pending.decided = True
            else:
                self._undecided[req.stream_id] = (pending, asyncio.current_task())  # type: ignore[assignment]
                try:
                    if server.handler_takes_stream:
                        sock = await server.handler(req, pending)
                    else:
                        sock = await server.handler(req)
                finally:
                    self._undecided.pop(req.stream_id, None)
        except asyncio.CancelledError:
            if not pending.gone:
                raise
            # Our own cancel (tunnel_done): the stream was reset while the handler worked.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            sock = None
            pending.decided = True
        except Reject as r:
            self._refuse(pending, r.status, r.reason)
        except Exception as e:
            log.warning("hbone server: handler failed for %s: %r", req.authority, e)
            self._refuse(pending, 503, "handler_failed")
        else:
            if sock is not None:
                await pending.splice(sock)
            elif not pending.decided:
                log.warning("hbone server: handler for %s neither spliced, accepted nor rejected", req.authority)
                self._reject(pending.current, 503, "handler_failed")
        result = await pending.current.done
        if server.on_result is not None:
            try:
                server.on_result(req, result)
            except Exception:
                log.exception("hbone server: on_result callback failed")

    def _refuse(self, pending: PendingStream, status: int, reason: str) -> None:
        """The handler raised: answer `status`, or reset the stream if it was answered already."""
        if pending.current.status:
            pending.current.abort(reason)  # type: ignore[attr-defined]
        else:
            self._reject(pending.current, status, reason)

    def _reject(self, tun: StreamCore, status: int, reason: str) -> None:
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

    def tunnel_done(self, tunnel: StreamCore) -> None:
        super().tunnel_done(tunnel)
        undecided = self._undecided.pop(tunnel.sid, None)
        if undecided is not None and not undecided[0].decided:
            # Reset before the handler answered: stop it (an upstream connect in progress is
            # closed by the cancellation) instead of connecting to an app nobody waits for.
            pending, task = undecided
            pending.gone = True
            task.cancel()
        if self.conn.goaway_sent and not self.tunnels and self.transport is not None:
            self.flush()
            self.transport.close()

    def on_closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._block_timer is not None:
            self._block_timer.cancel()
        if not self.conn.handshake_complete and not self.server._closing:
            self._report("h2_handshake_failed", "h2", "closed before the HTTP/2 preface and SETTINGS")
        self.server._session_closed(self)


class PendingStream:
    """A CONNECT the handler has not answered yet. Decide once: `await splice(sock)` (relay to
    a connected socket; 200 once it is attached), `accept()` (200 now; the stream is served
    in process), or `reject()` / raise `Reject`. Bytes the client sent meanwhile are held
    (unacknowledged, so bounded by the stream window) and go to whichever side takes it."""

    __slots__ = ("request", "current", "decided", "gone", "_session")

    def __init__(self, session: ServerSession, request: ConnectRequest, stream: HboneStream) -> None:
        self.request = request
        self.current: StreamCore = stream
        """The stream's object now: the HboneStream, or the Tunnel once spliced."""
        self.decided = False
        self.gone = False
        """The stream ended before a decision: the handler's task was cancelled."""
        self._session = session

    @property
    def done(self) -> asyncio.Future[TunnelResult]:
        """Resolves to the stream's TunnelResult, whatever the decision."""
        return self.current.done

    def _decide(self) -> None:
        if self.decided:
            raise RuntimeError(f"CONNECT {self.request.authority} was already answered")
        self.decided = True
        self._session._undecided.pop(self.current.sid, None)

    async def splice(self, sock: socket.socket) -> None:
        """Relay the stream to a connected socket (ztunnel inbound). `:status 200` is sent
        only once the socket is attached to the loop; an unusable socket -> 503
        upstream_failed. Returns at once; the relay runs until both directions end."""
        self._decide()
        stream = self.current
        if stream.done.done():                      # stream reset / connection gone meanwhile
            sock.close()
            return
        session = self._session
        tun = Tunnel.take_over(stream, on_attach=session._accept)  # type: ignore[arg-type]
        self.current = tun
        try:
            sock.setblocking(False)
            await session.loop.create_connection(lambda: tun, sock=sock)
        except OSError as e:
            sock.close()
            log.info("hbone server: upstream socket unusable for %s: %s", self.request.authority, e)
            session._reject(tun, 503, "upstream_failed")

    def accept(self, headers: Sequence[tuple[str, str]] = ()) -> HboneStream:
        """Answer 200 now and serve the stream in process: set a protocol on the returned
        HboneStream (bytes received so far are delivered to it)."""
        self._decide()
        stream = self.current
        assert isinstance(stream, HboneStream)
        if not stream.done.done():
            stream.status = 200
            self._session.conn.send_response(stream.sid, 200, headers)
            self._session.want_flush()
        return stream

    def reject(self, status: int, reason: str) -> None:
        """Refuse with `status` (same as raising Reject(status, reason) from the handler)."""
        self._decide()
        self._session._reject(self.current, status, reason)


class HboneServer:
    """Serves HBONE on one listening socket (one per pod, with that pod's certificate)."""

    def __init__(self, handler: Handler, *, trust_domain: str, handshake_timeout: float,
                 max_concurrent_streams: int, on_result: OnResult | None,
                 config: ConnectionConfig | None = None, max_pending_handshakes: int = 256,
                 on_reject: OnReject | None = None) -> None:
        if max_pending_handshakes < 1:
            raise ValueError("max_pending_handshakes must be >= 1")
        self.handler = handler
        self.handler_takes_stream = _takes_two_args(handler)
        """Whether `handler(req, pending)` is called (else `handler(req)` -> socket)."""
        self.trust_domain = trust_domain
        self.handshake_timeout = handshake_timeout
        self.max_pending_handshakes = max_pending_handshakes
        self.on_result = on_result
        self.on_reject = on_reject
        self.config = dataclasses.replace(config or ConnectionConfig(), max_concurrent_streams=max_concurrent_streams)
        self._sock: socket.socket | None = None
        self._ssl: ssl.SSLContext | None = None
        self._accepter: asyncio.Task[None] | None = None
        # Connections between accept and a complete TLS + HTTP/2 handshake, oldest first:
        # the TLS task, then (after TLS) the session until its SETTINGS arrive.
        self._pending: OrderedDict[object, Callable[[], None]] = OrderedDict()
        self._sessions: set[ServerSession] = set()
        self._closing = False
        self._drained: asyncio.Event | None = None
        self.rejections: dict[str, int] = {}
        """Count of `Rejection`s per reason since start (diagnostics, tests)."""

    @classmethod
    async def start(cls, sock: socket.socket, ssl_context: ssl.SSLContext, handler: Handler, *,
                    trust_domain: str, handshake_timeout: float = 10.0, max_concurrent_streams: int = 1000,
                    on_result: OnResult | None = None, config: ConnectionConfig | None = None,
                    max_pending_handshakes: int = 256, on_reject: OnReject | None = None) -> HboneServer:
        """Serve on an already bound and listening socket (see the module docstring)."""
        self = cls(handler, trust_domain=trust_domain, handshake_timeout=handshake_timeout,
                   max_concurrent_streams=max_concurrent_streams, on_result=on_result, config=config,
                   max_pending_handshakes=max_pending_handshakes, on_reject=on_reject)
        sock.setblocking(False)
        self._sock = sock
        self._ssl = ssl_context
        self._drained = asyncio.Event()
        self._accepter = asyncio.get_running_loop().create_task(self._accept_loop())
        return self

    @property
    def sockets(self):
        return (self._sock,) if self._sock is not None and not self._closing else ()

    @property
    def connection_count(self) -> int:
        return len(self._sessions)

    @property
    def pending_handshakes(self) -> int:
        return len(self._pending)

    # -- accepting ------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sock
        assert sock is not None
        local = _addr(sock.getsockname())
        while not self._closing:
            try:
                conn, peer = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if self._closing or e.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    return
                if e.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EAGAIN):
                    # Out of descriptors/buffers: say so, give connections time to end, retry.
                    self._report(Rejection(reason="accept_failed", stage="accept", peer_addr=("", 0),
                                           local_addr=local, detail=str(e)))
                    await asyncio.sleep(0.1)
                continue
            peer = _addr(peer)
            while len(self._pending) >= self.max_pending_handshakes:
                _, evict = self._pending.popitem(last=False)
                evict()
            task = loop.create_task(self._handshake(conn, peer, local))
            self._pending[task] = lambda task=task, peer=peer: self._evict_task(task, peer, local)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._pending.pop(task, None)
        if not task.cancelled():
            task.exception()                   # retrieved (never raises: _handshake catches)

    def _evict_task(self, task: asyncio.Task, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self._report(Rejection(reason="too_many_pending_handshakes", stage="accept", peer_addr=peer,
                               local_addr=local, detail=f"more than {self.max_pending_handshakes} pending"))
        task.cancel()

    async def _handshake(self, conn: socket.socket, peer: tuple[str, int], local: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            await loop.connect_accepted_socket(lambda: ServerSession(self), conn, ssl=self._ssl,
                                               ssl_handshake_timeout=self.handshake_timeout)
        except asyncio.CancelledError:
            _close_rst(conn)
            raise
        except Exception as e:
            _close_rst(conn)
            if self._closing:
                return
            reason = tls_failure_reason(e)
            log.info("hbone server: TLS handshake from %s failed: %s (%s)", peer, reason, e)
            self._report(Rejection(reason=reason, stage="tls", peer_addr=peer, local_addr=local,
                                   detail=str(e) or type(e).__name__))

    def _session_pending(self, s: ServerSession) -> None:
        """TLS done, HTTP/2 SETTINGS not yet: the session keeps its place in the pending set."""
        self._pending[s] = lambda: self._evict_session(s)

    def _evict_session(self, s: ServerSession) -> None:
        s._report("too_many_pending_handshakes", "accept", f"more than {self.max_pending_handshakes} pending")
        s.abort("too_many_pending_handshakes")

    def _handshake_done(self, s: ServerSession) -> None:
        self._pending.pop(s, None)

    def _report(self, r: Rejection) -> None:
        self.rejections[r.reason] = self.rejections.get(r.reason, 0) + 1
        if self.on_reject is not None:
            try:
                self.on_reject(r)
            except Exception:
                log.exception("hbone server: on_reject callback failed")

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting; GOAWAY every connection so it closes once its tunnels end."""
        if self._closing:
            return
        self._closing = True
        if self._accepter is not None:
            self._accepter.cancel()
        for key in list(self._pending):
            if isinstance(key, asyncio.Task):
                key.cancel()
        self._pending.clear()
        if self._sock is not None:
            self._sock.close()
        for s in list(self._sessions):
            s.goaway()
        self._check_drained()

    def abort(self, reason: str) -> None:
        """close(), then drop every connection now: their tunnels end with `reason`."""
        self.close()
        for s in list(self._sessions):
            s.abort(reason, hard=True)

    async def wait_closed(self) -> None:
        """Wait until close() was called and every connection has drained."""
        if self._drained is not None:
            await self._drained.wait()

    def _session_closed(self, s: ServerSession) -> None:
        self._sessions.discard(s)
        self._pending.pop(s, None)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._closing and not self._sessions and self._drained is not None:
            self._drained.set()


def _takes_two_args(fn) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def _close_rst(conn: socket.socket) -> None:
    """Close an accepted socket that never became a session, with RST (SO_LINGER 0)."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    conn.close()


def _addr(value) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return ("", 0)

"""HBONE client connections: TLS without SNI over a caller-made socket, server identity check, CONNECT streams."""
from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence

from mesh.identity import SpiffeId
from mesh.tls import PeerIdentityError, check_peer

from .api import TunnelError
from .connection import ConnectionConfig, GoAway, LocalProtocolError, Role
from .session import Session
from .stream import HboneStream

__all__ = ["ClientSession", "establish"]


class ClientSession(Session):
    """A client HTTP/2 connection to one destination identity; carries many tunnels."""

    def __init__(self, *, expected: SpiffeId, trust_domain: str, config: ConnectionConfig,
                 on_closed: Callable[[ClientSession], None] | None = None,
                 on_idle: Callable[[ClientSession], None] | None = None) -> None:
        super().__init__(Role.CLIENT, config)
        self.expected = expected
        self.trust_domain = trust_domain
        self.reserved = 0              # tunnels open or being opened on this connection (pool)
        self.idle_since: float | None = None
        self._on_closed = on_closed
        self._on_idle = on_idle

    def verify_peer(self, ssl_object: ssl.SSLObject) -> None:
        try:
            check_peer(ssl_object, trust_domain=self.trust_domain, expected=(self.expected,))
        except PeerIdentityError as e:
            raise TunnelError("identity_mismatch",
                              f"HBONE server is not {self.expected.uri}: {e} ({e.reason})") from None

    @property
    def usable(self) -> bool:
        return not self.closed and self.conn.goaway_received is None and not self.conn.goaway_sent

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> HboneStream:
        """Send a CONNECT; the returned stream's `response` resolves to the status."""
        if self.closed:
            raise TunnelError("connection_lost", "HBONE connection closed")
        tun = HboneStream(self, server_side=False,
                          extra={"peer_identity": self.expected, "authority": authority, "headers": tuple(headers)})
        try:
            tun.sid = self.conn.send_connect(authority, headers)
        except LocalProtocolError as e:
            raise TunnelError("stream_unavailable", f"cannot open a stream: {e.reason}") from None
        self.tunnels[tun.sid] = tun
        self.want_flush()
        return tun

    def on_request(self, ev) -> None:              # servers never open streams to us
        pass

    def on_goaway(self, ev: GoAway) -> None:
        if self._on_closed is not None:
            self._on_closed(self)                   # leaves the pool: no new streams here
        if not self.tunnels and self.transport is not None:
            self.flush()
            self.transport.close()

    def tunnel_done(self, tunnel) -> None:
        super().tunnel_done(tunnel)
        if not self.usable and not self.tunnels and self.transport is not None:
            self.flush()
            self.transport.close()                  # drained after GOAWAY

    def on_closed(self) -> None:
        if self._on_closed is not None:
            self._on_closed(self)


async def establish(sock: socket.socket, ssl_context: ssl.SSLContext, *, expected: SpiffeId,
                    trust_domain: str, timeout: float, config: ConnectionConfig,
                    on_closed: Callable[[ClientSession], None] | None = None) -> ClientSession:
    """TLS (no SNI) + identity check + HTTP/2 SETTINGS exchange on a connected socket."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    session = ClientSession(expected=expected, trust_domain=trust_domain, config=config, on_closed=on_closed)
    try:
        # server_hostname="" -> no SNI (HBONE names peers by SPIFFE URI, IPs are illegal in SNI).
        await asyncio.wait_for(
            loop.create_connection(lambda: session, sock=sock, ssl=ssl_context, server_hostname="",
                                   ssl_handshake_timeout=timeout), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        sock.close()
        raise TunnelError("tls_failed", "TLS handshake with the HBONE server timed out") from None
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise TunnelError("tls_failed", f"TLS handshake with the HBONE server failed: {e}") from None
    try:
        await asyncio.wait_for(asyncio.shield(session.ready), timeout)
    except TunnelError:
        session.abort("identity_mismatch")
        raise
    except (asyncio.TimeoutError, TimeoutError):
        session.abort("h2_handshake_failed")
        raise TunnelError("h2_handshake_failed", "no HTTP/2 SETTINGS from the HBONE server in time") from None
    except (ssl.SSLError, OSError, ConnectionError) as e:
        # TLS 1.3: a server that rejects our certificate says so only after our handshake.
        session.abort("tls_failed")
        reason = "tls_failed" if isinstance(e, ssl.SSLError) else "h2_handshake_failed"
        raise TunnelError(reason, f"HBONE connection failed during the HTTP/2 handshake: {e}") from None
    return session

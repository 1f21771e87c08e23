"""Public value types and errors of the HBONE stack: pool key, CONNECT request, results, rejections."""
from __future__ import annotations

from dataclasses import dataclass

from mesh.identity import SpiffeId

__all__ = ["PoolKey", "ConnectRequest", "TunnelResult", "TunnelError", "Reject", "Rejection"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolKey:
    """ztunnel's WorkloadKey: connections are shared only between tunnels with the same
    source/destination identities and IPs, so one pod's traffic never rides another's mTLS."""

    src_identity: SpiffeId
    dst_identity: SpiffeId
    src_ip: str
    dst_ip: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest:
    """A validated inbound CONNECT, as the server's handler sees it."""

    authority: str
    """`:authority`, `host:port` (the destination the client asks for)."""
    headers: tuple[tuple[str, str], ...]
    """Regular request headers in order (baggage, forwarded, traceparent, ...)."""
    peer_identity: SpiffeId
    """The client's SPIFFE identity from its (verified) certificate."""
    local_addr: tuple[str, int]
    """Our end of the TLS connection."""
    peer_addr: tuple[str, int]
    """The client's end of the TLS connection."""
    stream_id: int = 0
    """HTTP/2 stream id (diagnostics only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelResult:
    """How one tunnel ended; the basis for access logs and istio_tcp_* metrics."""

    bytes_sent: int
    """Bytes carried into the tunnel towards the peer (client: downstream -> server;
    server: application -> client)."""
    bytes_received: int
    """Bytes that came out of the tunnel from the peer."""
    status: int
    """The CONNECT response status (200 for a tunnel that was opened)."""
    duration: float
    """Seconds from the CONNECT being sent/received to the end of both directions."""
    error: str | None = None
    """None for a clean end (both directions half-closed), else a stable reason label:
    peer_reset, tcp_reset, tcp_closed, connection_lost, goaway, cancelled, ..."""


class TunnelError(Exception):
    """Opening a tunnel failed. `reason` is a stable label (connect_failed, tls_failed,
    identity_mismatch, h2_handshake_failed, connect_rejected, stream_reset, connection_lost,
    connect_timeout, ...); `status` is the CONNECT status when the peer answered."""

    def __init__(self, reason: str, message: str = "", *, status: int | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.status = status

    def copy(self) -> TunnelError:
        """A fresh instance for another waiter (one exception object must not be raised by
        several tasks: tracebacks would pile up on it)."""
        return TunnelError(self.reason, str(self), status=self.status)


class Reject(Exception):
    """Raised by an HboneServer handler to refuse a CONNECT with `status` (400 bad request,
    401 denied by policy, 503 no upstream...); `reason` is a stable label for logs."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """Something an HboneServer refused *before* its handler saw a request: a connection
    (not TLS, no/bad client certificate, TLS < 1.3, no HTTP/2, handshake timeout, protocol
    error, too many pending handshakes...) or a CONNECT the HTTP/2 layer refused itself
    (malformed or not a CONNECT -> 400, refused stream -> RST). Requests the handler refuses
    (`Reject`) are reported through `on_result` instead, so each refusal is reported once."""

    reason: str
    """Stable label, e.g. not_tls, http1_request, no_client_cert, wrong_tls_version,
    cert_expired, cert_not_yet_valid, untrusted_cert, tls_failed, tls_aborted,
    handshake_timeout, h2_handshake_timeout, h2_handshake_failed, wrong_trust_domain,
    bad_preface, header_list_too_large, too_many_continuations, header_block_timeout,
    too_many_pending_handshakes, accept_failed, not_connect, scheme_or_path_present, and the
    HTTP/2 abuse bounds (abuse.py): rapid_reset, stream_rate_limited, stream_rate_exceeded,
    ping_flood, settings_flood, control_frame_flood, empty_frame_flood, window_update_flood..."""
    stage: str
    """Where it happened: "accept" (before TLS), "tls", "h2" (after TLS, connection
    closed), "stream" (one CONNECT refused, the connection lives on)."""
    peer_addr: tuple[str, int]
    local_addr: tuple[str, int]
    peer_identity: SpiffeId | None = None
    """The client's identity when TLS had completed."""
    status: int | None = None
    """Stream stage: the :status answered (400), or 0 when the stream was reset."""
    detail: str = ""
    """Human-readable detail (the TLS error text, ...)."""

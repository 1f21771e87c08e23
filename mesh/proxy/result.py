"""One typed result per connection (ztunnel's ConnectionResult): the only thing access logs and metrics see.

A data path fills a `ResultBuilder` as the connection goes (addresses, then the peer workload,
then the identity, then the bytes) and turns it into a frozen `ConnectionResult` exactly once,
when the connection ends or is refused; the recorder makes both the access-log line and the
metrics from that one value. Bytes always count source -> destination (`bytes_sent`) and back
(`bytes_recv`), whichever side of a tunnel the proxy was on: `ResultBuilder.tunnel_bytes` is the
one place that knows which way round a tunnel's own counters are.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .reason import Direction, Reason, classify

__all__ = ["Direction", "Listener", "SecurityPolicy", "Stage", "Peer", "ConnectionResult", "ResultBuilder",
           "split_uid"]


class Listener(enum.Enum):
    """The in-pod listener that took the connection."""

    OUTBOUND = "outbound"
    INBOUND = "inbound"
    HBONE = "hbone"


class SecurityPolicy(enum.Enum):
    """How the connection was protected; `.value` is the access-log word, `metric` the label."""

    MUTUAL_TLS = "mutual_tls"
    PLAINTEXT = "plaintext"

    @property
    def metric(self) -> str:
        # Istio's connection_security_policy has no "plaintext": it says "unknown".
        return "mutual_tls" if self is SecurityPolicy.MUTUAL_TLS else "unknown"


class Stage(enum.Enum):
    """Where an HBONE listener refused a connection before any request existed."""

    ACCEPT = "accept"
    TLS = "tls"
    H2 = "h2"
    STREAM = "stream"


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a connection, as far as it is known."""

    workload: str | None = None
    """Workload name (without namespace)."""
    namespace: str | None = None
    identity: str | None = None
    """SPIFFE URI."""
    addr: str | None = None
    """`ip:port` (for an inbound HBONE destination: the CONNECT authority)."""


def split_uid(uid: str | None) -> tuple[str | None, str | None]:
    """`ns/name` -> (name, ns)."""
    if not uid:
        return None, None
    ns, sep, name = uid.partition("/")
    return (name, ns) if sep else (uid, None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionResult:
    """How one connection (or one refused attempt) went."""

    direction: Direction
    listener: Listener
    src: Peer
    dst: Peer
    dst_service: str | None = None
    """`name.namespace.svc.cluster.local` when addressed to a Service VIP."""
    dst_hbone_addr: str | None = None
    """Outbound over HBONE: the `podIP:15008` the tunnel went to."""
    security: SecurityPolicy = SecurityPolicy.PLAINTEXT
    bytes_sent: int = 0
    """Source -> destination."""
    bytes_recv: int = 0
    """Destination -> source."""
    duration: float = 0.0
    """Seconds from accept to the end of both directions."""
    reason: Reason | None = None
    """None for a clean end; else why it failed or was refused."""
    policy: str | None = None
    """The authorization policy (`ns/name`) that decided a denial."""
    status: int | None = None
    """HBONE status answered or received, when one was."""
    detail: str = ""
    """Human-readable detail of the reason (TLS error text, exception type)."""
    stage: Stage | None = None
    """Set for refusals of the HBONE listener before any request (`event: rejected`)."""
    count: int = 1
    """How many refusals this one record stands for (rejections are logged rate-limited)."""
    traceparent: str | None = None
    """The W3C trace context the HBONE CONNECT carried (a waypoint's span, or a source
    ztunnel's per-connection one), when it carried a valid one."""

    @property
    def response_flag(self) -> str:
        return self.reason.flag_for(self.direction) if self.reason is not None else "-"

    @property
    def rejected(self) -> bool:
        """Refused before a request existed: counted as a rejection, not an Istio TCP connection."""
        return self.stage is not None

    def log_fields(self) -> dict[str, Any]:
        """The access-log entry (Istio's field names; None fields left out)."""
        out: dict[str, Any] = {"direction": self.direction.value}
        if self.stage is not None:
            out.update(event="rejected", listener=self.listener.value, stage=self.stage.value)
        for side, p in (("src", self.src), ("dst", self.dst)):
            for name, v in (("workload", p.workload), ("namespace", p.namespace), ("identity", p.identity),
                            ("addr", p.addr)):
                if v is not None:
                    out[f"{side}.{name}"] = v
        if self.dst_service is not None:
            out["dst.service"] = self.dst_service
        if self.dst_hbone_addr is not None:
            out["dst.hbone_addr"] = self.dst_hbone_addr
        out["security"] = self.security.value
        if self.stage is None:
            out["bytes_sent"] = self.bytes_sent
            out["bytes_recv"] = self.bytes_recv
            out["duration_ms"] = round(self.duration * 1000, 1)
        if self.reason is not None:
            out["error"] = self.reason.label
            out["response_flags"] = self.response_flag
        if self.policy is not None:
            out["policy"] = self.policy
        if self.status is not None:
            out["status"] = self.status
        if self.detail:
            out["detail"] = self.detail[:200]
        if self.stage is not None:
            out["count"] = self.count
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        return out


class ResultBuilder:
    """A connection's result while it is being carried; `build()` makes the frozen result."""

    __slots__ = ("direction", "listener", "started", "src_uid", "src_identity", "src_addr", "dst_uid",
                 "dst_identity", "dst_addr", "dst_service", "dst_hbone_addr", "security", "bytes_sent",
                 "bytes_recv", "reason", "policy", "status", "detail", "stage", "count", "traceparent")

    def __init__(self, direction: Direction, listener: Listener, started: float, *,
                 security: SecurityPolicy = SecurityPolicy.PLAINTEXT) -> None:
        self.direction = direction
        self.listener = listener
        self.started = started
        self.src_uid: str | None = None
        self.src_identity: str | None = None
        self.src_addr: str | None = None
        self.dst_uid: str | None = None
        self.dst_identity: str | None = None
        self.dst_addr: str | None = None
        self.dst_service: str | None = None
        self.dst_hbone_addr: str | None = None
        self.security = security
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.reason: Reason | None = None
        self.policy: str | None = None
        self.status: int | None = None
        self.detail = ""
        self.stage: Stage | None = None
        self.count = 1
        self.traceparent: str | None = None

    def fail(self, error: BaseException | str | Reason, detail: str = "") -> Reason:
        """Record why the connection failed (the first reason wins); returns it."""
        r = error if isinstance(error, Reason) else classify(error)
        if self.reason is None:
            self.reason = r
            if isinstance(error, BaseException):
                status = getattr(error, "status", None)
                if isinstance(status, int) and status:
                    self.status = status
                detail = detail or (str(error) if r is not Reason.UNEXPECTED else
                                    f"{type(error).__name__}: {error}")
            elif isinstance(error, str) and r.label != error:
                detail = f"{error}: {detail}" if detail else error   # e.g. which tls_alert_*
            self.detail = detail
        return r

    def tunnel_bytes(self, sent: int, received: int, *, server_side: bool) -> None:
        """A tunnel's or relay's own counters: `sent` went from us into it. The client side
        of a tunnel sends source -> destination; the server side sends the other way."""
        if server_side:
            sent, received = received, sent
        self.bytes_sent, self.bytes_recv = sent, received

    def build(self, now: float) -> ConnectionResult:
        src_w, src_ns = split_uid(self.src_uid)
        dst_w, dst_ns = split_uid(self.dst_uid)
        return ConnectionResult(
            direction=self.direction, listener=self.listener,
            src=Peer(src_w, src_ns, self.src_identity, self.src_addr),
            dst=Peer(dst_w, dst_ns, self.dst_identity, self.dst_addr),
            dst_service=self.dst_service, dst_hbone_addr=self.dst_hbone_addr, security=self.security,
            bytes_sent=self.bytes_sent, bytes_recv=self.bytes_recv, duration=max(0.0, now - self.started),
            reason=self.reason, policy=self.policy, status=self.status, detail=self.detail, stage=self.stage,
            count=self.count, traceparent=self.traceparent)

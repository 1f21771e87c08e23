"""Istio's TCP metrics for ztunnel (names and labels Grafana dashboards expect), per connection.

Recorded once when a connection ends, from its `ConnectionResult`: counters are looked up per
label set then, never per chunk of data. The label set is the `TcpLabels` dataclass, so a
missing or misspelt label is an error where the labels are made.

Hostile or malformed inbound input is counted by one ztunnel-specific counter (Istio has no
metric for connections refused before a request exists):

    ztunnel_inbound_rejected_total{listener, reason, destination_workload,
                                   destination_workload_namespace}

* refusals of the 15008 listener before any request (results with a `stage`: TLS, HTTP/2,
  limits, and CONNECTs the HTTP/2 layer refused) -- these are NOT in istio_tcp_* (no request,
  no source identity);
* CONNECTs ztunnel refused as bad requests (Kind.BAD_REQUEST: authority_not_ip, ztunnel_port,
  ...) and plaintext connections to ztunnel's own ports on 15006: counted here AND, being
  ordinary connection records, in istio_tcp_connections_failed with response_flags "DPE".

Outbound connections refused for want of a route (Kind.NO_ROUTE: waypoint_missing,
no_healthy_upstream, no_service_port, ...) are in istio_tcp_connections_failed with their
response flag (UH, NR), which several reasons share; the reason itself is counted by

    ztunnel_outbound_refused_total{reason, source_workload, source_workload_namespace,
                                   destination_service}

Policy denials stay istio_tcp_connections_failed{response_flags="DENY"} only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from mesh.metrics import Registry, build_info
from mesh.proxy.reason import Direction, Kind
from mesh.proxy.result import ConnectionResult

__all__ = ["TcpMetrics", "TcpLabels", "RejectedLabels", "RefusedLabels"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpLabels:
    """The labels of every istio_tcp_* series (Istio's names, in Istio's order)."""

    reporter: str
    source_workload: str
    source_workload_namespace: str
    source_principal: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    destination_service: str
    request_protocol: str
    response_flags: str
    connection_security_policy: str

    @classmethod
    def of(cls, r: ConnectionResult) -> TcpLabels:
        return cls(reporter="source" if r.direction is Direction.OUTBOUND else "destination",
                   source_workload=r.src.workload or "unknown",
                   source_workload_namespace=r.src.namespace or "unknown",
                   source_principal=r.src.identity or "unknown",
                   destination_workload=r.dst.workload or "unknown",
                   destination_workload_namespace=r.dst.namespace or "unknown",
                   destination_principal=r.dst.identity or "unknown",
                   destination_service=r.dst_service or "unknown", request_protocol="tcp",
                   response_flags=r.response_flag, connection_security_policy=r.security.metric)

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, n) for n in _TCP_LABELS)


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedLabels:
    """The labels of ztunnel_inbound_rejected_total."""

    listener: str
    reason: str
    destination_workload: str
    destination_workload_namespace: str

    def values(self) -> tuple[str, ...]:
        return (self.listener, self.reason, self.destination_workload, self.destination_workload_namespace)


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusedLabels:
    """The labels of ztunnel_outbound_refused_total."""

    reason: str
    source_workload: str
    source_workload_namespace: str
    destination_service: str

    def values(self) -> tuple[str, ...]:
        return (self.reason, self.source_workload, self.source_workload_namespace, self.destination_service)


_TCP_LABELS = tuple(f.name for f in fields(TcpLabels))
_REFUSED_LABELS = tuple(f.name for f in fields(RefusedLabels))
_REJECTED_LABELS = tuple(f.name for f in fields(RejectedLabels))
_BUILD = build_info("ztunnel")


class TcpMetrics:
    def __init__(self) -> None:
        self.registry = Registry()
        c = lambda name, doc: self.registry.counter(name, doc, _TCP_LABELS)  # noqa: E731
        self.opened = c("istio_tcp_connections_opened", "Total TCP connections opened")
        self.closed = c("istio_tcp_connections_closed", "Total TCP connections closed")
        self.failed = c("istio_tcp_connections_failed", "Total TCP connections that failed")
        self.received = c("istio_tcp_received_bytes", "Bytes received by the destination")
        self.sent = c("istio_tcp_sent_bytes", "Bytes sent back by the destination")
        self.rejected = self.registry.counter(
            "ztunnel_inbound_rejected", "Inbound connections or CONNECTs refused for what the peer sent "
            "(hostile/malformed input, limits), by stable reason", _REJECTED_LABELS)
        self.refused = self.registry.counter(
            "ztunnel_outbound_refused", "Outbound connections refused for want of a route (a missing "
            "waypoint, no endpoints, no such port), by stable reason", _REFUSED_LABELS)

    def record(self, r: ConnectionResult) -> None:
        reason = r.reason
        if reason is not None and r.direction is Direction.INBOUND and (r.rejected or reason.kind is Kind.BAD_REQUEST):
            self.rejected.labels(*RejectedLabels(
                listener=r.listener.value, reason=reason.label, destination_workload=r.dst.workload or "unknown",
                destination_workload_namespace=r.dst.namespace or "unknown").values()).inc(r.count)
        if r.rejected:
            return
        if reason is not None and r.direction is Direction.OUTBOUND and reason.kind is Kind.NO_ROUTE:
            self.refused.labels(*RefusedLabels(
                reason=reason.label, source_workload=r.src.workload or "unknown",
                source_workload_namespace=r.src.namespace or "unknown",
                destination_service=r.dst_service or "unknown").values()).inc()
        labels = TcpLabels.of(r).values()
        self.opened.labels(*labels).inc()
        self.closed.labels(*labels).inc()
        if reason is not None:
            self.failed.labels(*labels).inc()
        # Istio counts bytes from the destination's point of view: received = client -> server.
        self.received.labels(*labels).inc(r.bytes_sent)
        self.sent.labels(*labels).inc(r.bytes_recv)

    def exposition(self) -> bytes:
        return self.registry.exposition() + _BUILD



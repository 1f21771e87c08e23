"""Istio's TCP metrics for ztunnel (names and labels Grafana dashboards expect), per connection.

Recorded once when a connection ends, from its access-log entry: counters are looked up per
label set then, never per chunk of data.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

__all__ = ["TcpMetrics"]

_LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal",
           "destination_workload", "destination_workload_namespace", "destination_principal",
           "destination_service", "request_protocol", "response_flags", "connection_security_policy")

# Error reasons -> Istio response_flags.
_FLAGS = {"denied_by_policy": "DENY", "no_allow_match": "DENY", "mtls_required": "DENY",
          "connect_failed": "CONNECT", "connect_timeout": "CONNECT", "upstream_connect_failed": "CONNECT",
          "no_healthy_upstream": "CONNECT", "tls_failed": "TLS_FAILURE", "identity_mismatch": "IDENTITY_ERROR",
          "h2_handshake_failed": "H2_HANDSHAKE_FAILURE"}


def _split(uid: str | None) -> tuple[str, str]:
    if not uid:
        return "unknown", "unknown"
    ns, _, name = uid.partition("/")
    return name, ns


def _principal(identity: str | None) -> str:
    return identity or "unknown"


class TcpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        c = lambda name, doc: Counter(name, doc, _LABELS, registry=self.registry)  # noqa: E731
        self.opened = c("istio_tcp_connections_opened", "Total TCP connections opened")
        self.closed = c("istio_tcp_connections_closed", "Total TCP connections closed")
        self.failed = c("istio_tcp_connections_failed", "Total TCP connections that failed")
        self.received = c("istio_tcp_received_bytes", "Bytes received by the destination")
        self.sent = c("istio_tcp_sent_bytes", "Bytes sent back by the destination")

    def record(self, e: dict[str, Any]) -> None:
        src_name, src_ns = _split(e.get("src.workload"))
        dst_name, dst_ns = _split(e.get("dst.workload"))
        err = e.get("error")
        labels = (
            "source" if e.get("direction") == "outbound" else "destination",
            src_name, src_ns, _principal(e.get("src.identity")),
            dst_name, dst_ns, _principal(e.get("dst.identity")),
            e.get("dst.service") or "unknown", "tcp",
            _FLAGS.get(err, "-") if err else "-",
            "mutual_tls" if e.get("security") == "mutual_tls" or e.get("dst.hbone_addr") else "unknown",
        )
        self.opened.labels(*labels).inc()
        self.closed.labels(*labels).inc()
        if err:
            self.failed.labels(*labels).inc()
        # Istio counts bytes from the destination's point of view: received = client -> server.
        self.received.labels(*labels).inc(e.get("bytes_sent") or 0)
        self.sent.labels(*labels).inc(e.get("bytes_recv") or 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Istio's TCP metrics for ztunnel (names and labels Grafana dashboards expect), per connection.

Recorded once when a connection ends, from its access-log entry: counters are looked up per
label set then, never per chunk of data.

Hostile or malformed inbound input is counted by one ztunnel-specific counter (Istio has no
metric for connections refused before a request exists):

    ztunnel_inbound_rejected_total{listener, reason, destination_workload,
                                   destination_workload_namespace}

* connection level on 15008 (access-log entries with `event: rejected`): not_tls,
  http1_request, no_client_cert, wrong_tls_version, cert_expired, cert_not_yet_valid,
  untrusted_cert, wrong_trust_domain, handshake_timeout, tls_aborted, h2_handshake_timeout,
  h2_handshake_failed, bad_preface, header_list_too_large, too_many_continuations,
  header_block_timeout, too_many_pending_handshakes, accept_failed, ... -- these are NOT in
  istio_tcp_* (no request, no source identity);
* CONNECTs the HTTP/2 layer refused (also `event: rejected`, stage "stream"): not_connect,
  scheme_or_path_present, missing_authority, ... (400) -- also only here;
* CONNECTs ztunnel refused as bad requests (400: authority_not_ip, authority_not_local,
  ztunnel_port, ...) and plaintext connections to ztunnel's own ports on 15006: counted
  here AND, being ordinary connection records, in istio_tcp_connections_failed with
  response_flags "DPE" (Envoy's downstream protocol error).

Policy denials stay istio_tcp_connections_failed{response_flags="DENY"} only.
"""
from __future__ import annotations

from typing import Any

from mesh.metrics import Registry

__all__ = ["TcpMetrics", "BAD_REQUEST_REASONS"]

_LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal",
           "destination_workload", "destination_workload_namespace", "destination_principal",
           "destination_service", "request_protocol", "response_flags", "connection_security_policy")

# Error reasons -> Istio response_flags.
_FLAGS = {"denied_by_policy": "DENY", "no_allow_match": "DENY", "mtls_required": "DENY",
          "connect_failed": "CONNECT", "connect_timeout": "CONNECT", "upstream_connect_failed": "CONNECT",
          "no_healthy_upstream": "CONNECT", "tls_failed": "TLS_FAILURE", "identity_mismatch": "IDENTITY_ERROR",
          "h2_handshake_failed": "H2_HANDSHAKE_FAILURE"}

BAD_REQUEST_REASONS = frozenset(("authority_without_port", "authority_not_ip", "authority_bad_port",
                                 "authority_not_local", "ztunnel_port"))
"""Reasons of connection records that are refused input (400 / reset) rather than failures."""
_FLAGS.update(dict.fromkeys(BAD_REQUEST_REASONS, "DPE"))
_REJECTED_LABELS = ("listener", "reason", "destination_workload", "destination_workload_namespace")


def _principal(identity: str | None) -> str:
    return identity or "unknown"


class TcpMetrics:
    def __init__(self) -> None:
        self.registry = Registry()
        c = lambda name, doc: self.registry.counter(name, doc, _LABELS)  # noqa: E731
        self.opened = c("istio_tcp_connections_opened", "Total TCP connections opened")
        self.closed = c("istio_tcp_connections_closed", "Total TCP connections closed")
        self.failed = c("istio_tcp_connections_failed", "Total TCP connections that failed")
        self.received = c("istio_tcp_received_bytes", "Bytes received by the destination")
        self.sent = c("istio_tcp_sent_bytes", "Bytes sent back by the destination")
        self.rejected = self.registry.counter(
            "ztunnel_inbound_rejected", "Inbound connections or CONNECTs refused for what the peer sent "
            "(hostile/malformed input, limits), by stable reason", _REJECTED_LABELS)

    def record(self, e: dict[str, Any]) -> None:
        src_name, src_ns = e.get("src.workload") or "unknown", e.get("src.namespace") or "unknown"
        dst_name, dst_ns = e.get("dst.workload") or "unknown", e.get("dst.namespace") or "unknown"
        err = e.get("error")
        if e.get("event") == "rejected":
            self.rejected.labels(e.get("listener") or "hbone", err or "unknown", dst_name,
                                 dst_ns).inc(e.get("count") or 1)
            return
        if err in BAD_REQUEST_REASONS and e.get("direction") == "inbound":
            listener = "hbone" if e.get("security") == "mutual_tls" else "inbound"
            self.rejected.labels(listener, err, dst_name, dst_ns).inc()
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
        return self.registry.exposition()

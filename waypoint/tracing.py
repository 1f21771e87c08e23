"""The waypoint's tracing: per request, honour the caller's trace context, forward ours, and report one SERVER span.

Off unless a Telemetry and the mesh config name an opentelemetry provider
(waypoint/trace_policy.py); then, per request, `begin` reads the trace headers
(mesh/tracecontext.py), decides the span (child of the caller's, or a new trace sampled at
the configured percentage), rewrites the headers sent upstream and, for a sampled request,
starts the SDK span (waypoint/trace_export.py); `end` adds what the request's result says
(status, response flags, upstream cluster...) with Envoy's and Istio's attribute names and
ends it. The policy is recomputed when the proxy state's version changes. While it is off,
`begin` is one comparison and the request's headers pass untouched.

`CONNECT_TRACEPARENT` holds the current request's `traceparent` for the HBONE CONNECT of a
new upstream connection (waypoint/upstream.py), so the destination's ztunnel sees the span
that caused the connection.
"""
from __future__ import annotations

import contextvars
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

from mesh.clock import Clock
from mesh.model.telemetry import CustomTag
from mesh.state import ProxyState
from mesh.tracecontext import TraceDecision, decide, extract, format_traceparent, propagate

from .telemetry import RequestResult
from .trace_policy import TracePolicy, collector_address, resolve

__all__ = ["Tracing", "ActiveSpan", "SpanStats", "CONNECT_TRACEPARENT"]

log = logging.getLogger("ambient.waypoint")

CONNECT_TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("connect_traceparent",
                                                                                 default=None)
_ACTIVE: contextvars.ContextVar[ActiveSpan | None] = contextvars.ContextVar("active_span", default=None)
"""The request's span between `begin` and `end` (a request runs in one task: HTTP/1.1 requests of a
connection one after another, each HTTP/2 stream in its own)."""


@dataclass(slots=True)
class ActiveSpan:
    """One request's trace: the decision, and the SDK span when it is sampled and reported."""

    decision: TraceDecision
    span: Any = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """The request's headers as it came (custom header tags read them)."""


@dataclass(slots=True)
class SpanStats:
    """Counts of the waypoint's spans; each field has one writer (the loop or the export thread)."""

    started: int = 0
    not_sampled: int = 0
    dropped: int = 0
    """Queue full: the oldest queued span was dropped."""
    exported: int = 0
    export_failed: int = 0


def _tag_value(tag: CustomTag, headers: tuple[tuple[bytes, bytes], ...]) -> str:
    if tag.literal is not None:
        return tag.literal
    if tag.header is not None:
        name = tag.header.encode()
        return next((v.decode("latin-1") for n, v in headers if n == name), tag.default)
    return os.environ.get(tag.environment or "", tag.default)


class Tracing:
    """Tracing for one waypoint (see the module docstring)."""

    def __init__(self, *, state: ProxyState, namespace: str, name: str, clock: Clock, rng: random.Random,
                 trust_domain: str = "cluster.local", pod_ip: str = "", queue_size: int | None = None) -> None:
        self.state = state
        self.namespace = namespace
        self.name = name
        self.clock = clock
        self.rng = rng
        self.trust_domain = trust_domain
        self.pod_ip = pod_ip or os.environ.get("POD_IP", "")
        self.queue_size = queue_size
        self._version = -1
        self.policy: TracePolicy | None = None
        self._sink: Any = None
        self._sink_key: tuple[Any, ...] | None = None
        self.stats = SpanStats()

    # -- policy -------------------------------------------------------------------------------

    def _refresh(self) -> None:
        self._version = self.state.version
        policy = resolve(self.state.telemetries(), self.state.mesh_config(), namespace=self.namespace, name=self.name)
        addr = collector_address(policy.provider, self.state.services()) if policy is not None else None
        key = (policy.provider, addr) if policy is not None and policy.report and addr is not None else None
        if policy != self.policy:
            log.info("waypoint %s/%s tracing: %s", self.namespace, self.name,
                     f"provider {policy.provider.name} at {policy.percentage:g} %" if policy else "off")
        self.policy = policy
        if key == self._sink_key:
            return
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._sink_key = key
        if key is not None:
            from .trace_export import QUEUE_SIZE, SpanSink   # the SDK loads only once tracing is on
            p = policy.provider
            self._sink = SpanSink(
                f"http://{addr[0]}:{addr[1]}{p.http.path}", service_name=f"{self.name}.{self.namespace}",
                resource={"k8s.namespace.name": self.namespace, "istio.canonical_service": self.name},
                headers=dict(p.http.headers), timeout=p.http.timeout, max_tag_length=p.max_tag_length,
                stats=self.stats, queue_size=self.queue_size or QUEUE_SIZE)
            log.info("waypoint %s/%s exports spans to %s", self.namespace, self.name, self._sink.url)
        elif policy is not None and policy.report:
            log.warning("waypoint %s/%s: tracing provider %s (%s:%d) has no endpoint; spans are not exported",
                        self.namespace, self.name, policy.provider.name, policy.provider.service, policy.provider.port)

    # -- per request --------------------------------------------------------------------------

    def begin(self, headers: list[tuple[bytes, bytes]], start: float) -> list[tuple[bytes, bytes]]:
        """The headers to send upstream; the request's span is kept until `end`."""
        if self.state.version != self._version:
            self._refresh()
        policy = self.policy
        if policy is None:
            return headers
        incoming = extract(headers)
        decision = decide(incoming, policy.percentage, self.rng)
        out = propagate(headers, decision, incoming.formats)
        active = ActiveSpan(decision, headers=tuple(headers))
        CONNECT_TRACEPARENT.set(format_traceparent(decision.context))
        if decision.sampled and self._sink is not None:
            self.stats.started += 1
            active.span = self._sink.start(decision, "waypoint", int(start * 1e9), {})
        elif not decision.sampled:
            self.stats.not_sampled += 1
        _ACTIVE.set(active)
        return out

    def end(self, r: RequestResult) -> None:
        """Finish the request's span with its result (Envoy's tags, Istio's istio.* tags)."""
        active = _ACTIVE.get()
        if active is None:
            return
        _ACTIVE.set(None)
        CONNECT_TRACEPARENT.set(None)
        if active.span is None:
            return
        span, lb = active.span, r.labels
        parts = r.upstream_cluster.split("|")
        host = parts[3] if len(parts) == 4 else (r.authority or "-")
        port = parts[1] if len(parts) == 4 else ""
        span.update_name(f"{host}:{port}/*" if port else f"{host}/*")
        status = int(lb.response_code or 0)
        attrs = {
            "component": "proxy",
            "node_id": f"waypoint~{self.pod_ip}~{self.name}.{self.namespace}~{self.namespace}.svc.cluster.local",
            "zone": "",
            "guid:x-request-id": r.request_id,
            "http.url": f"http://{r.authority}{r.path}",
            "http.method": r.method,
            "http.protocol": r.protocol,
            "http.status_code": str(status),
            "downstream_cluster": "-",
            "user_agent": r.user_agent or "-",
            "request_size": str(r.request_bytes),
            "response_size": str(r.response_bytes),
            "response_flags": lb.response_flags,
            "upstream_cluster": r.upstream_cluster or "-",
            "upstream_cluster.name": r.upstream_cluster or "-",
            "upstream_address": r.upstream_host or "-",
            "peer.address": r.downstream_remote_address.rpartition(":")[0],
            "istio.canonical_service": self.name,
            "istio.canonical_revision": "latest",
            "istio.namespace": self.namespace,
            "istio.mesh_id": self.trust_domain,
            "istio.cluster_id": "Kubernetes",
            "source.principal": lb.source_principal,
            "destination.service": lb.destination_service,
        }
        if self.policy is not None:
            for k, tag in self.policy.custom_tags:
                attrs[k] = _tag_value(tag, active.headers)
        if status >= 500 or status == 0:
            attrs["error"] = "true"
        span.set_attributes(attrs)
        if status >= 500 or status == 0:
            from opentelemetry.trace import Status, StatusCode
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=int((r.start_time + r.duration_ms / 1000.0) * 1e9))

    # -- admin --------------------------------------------------------------------------------

    def exposition(self) -> str:
        """Prometheus text of the span counts (only once tracing has been on)."""
        s = self.stats
        if self.policy is None and not (s.started or s.not_sampled):
            return ""
        name = "ambient_waypoint_trace_spans_total"
        lines = [f"# HELP {name} The waypoint's request spans by outcome (dropped: export queue full).",
                 f"# TYPE {name} counter"]
        for outcome, v in (("started", s.started), ("not_sampled", s.not_sampled), ("dropped", s.dropped),
                           ("exported", s.exported), ("export_failed", s.export_failed)):
            lines.append(f'{name}{{outcome="{outcome}"}} {v}')
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """For /config_dump: the policy in force, where spans go, the counts."""
        p = self.policy
        return {"provider": p.provider.name if p else None, "sampling_percentage": p.percentage if p else None,
                "reporting": p.report if p else None, "exporting_to": self._sink.url if self._sink else None,
                "spans": {"started": self.stats.started, "not_sampled": self.stats.not_sampled,
                          "dropped": self.stats.dropped, "exported": self.stats.exported,
                          "export_failed": self.stats.export_failed}}

    def flush(self) -> bool:
        """Blocking: export what is queued (tests, shutdown)."""
        return self._sink.flush() if self._sink is not None else True

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
            self._sink_key = None

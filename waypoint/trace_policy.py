"""Which tracing applies to a waypoint, from the Telemetry objects and the mesh config (pure).

Istio's hierarchy, most specific last: a Telemetry in the root namespace (istio-system)
without selector or targetRefs applies mesh-wide; one in the waypoint's namespace without
them applies to that namespace; one whose targetRefs name the waypoint's Gateway applies to
it. Each level's `tracing[]` entries (all but CLIENT-only ones: the waypoint's span is a
SERVER span) override the fields they set -- providers, randomSamplingPercentage,
disableSpanReporting -- and add their customTags. Where no level names a provider, the mesh
config's `defaultProviders.tracing` does; where none sets a percentage,
`defaultConfig.tracing.sampling` (1 %) does. No provider, `enableTracing: false`, or a name
that is not an opentelemetry provider of the mesh config: no tracing (the request's trace
headers pass untouched), which is the default.

`disableSpanReporting: true` keeps the context propagation (the waypoint still takes part
in the caller's trace) and reports no span, as Envoy does.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.model import ServiceInfo
from mesh.model.policy import ROOT_NAMESPACE
from mesh.model.telemetry import CustomTag, MeshConfig, Telemetry, TracingMode, TracingProvider

__all__ = ["TracePolicy", "resolve", "collector_address"]

_GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True, slots=True, kw_only=True)
class TracePolicy:
    provider: TracingProvider
    percentage: float
    """Random sampling percentage for requests that come without a sampling decision."""
    report: bool = True
    """False: propagate context, export nothing (disableSpanReporting)."""
    custom_tags: tuple[tuple[str, CustomTag], ...] = ()


def _levels(telemetries: Iterable[Telemetry], namespace: str, name: str) -> list[Telemetry]:
    mesh, ns, targeted = [], [], []
    for t in telemetries:
        if t.selector is not None:
            continue    # sidecar workloads only (warned at the config edge)
        if t.target_refs:
            if t.namespace == namespace and any(
                    r.kind == "Gateway" and r.group == _GATEWAY_GROUP and r.name == name for r in t.target_refs):
                targeted.append(t)
        elif t.namespace == ROOT_NAMESPACE:
            mesh.append(t)
        elif t.namespace == namespace:
            ns.append(t)
    by_name = lambda t: t.name  # noqa: E731 -- several at one level: a stable order (Istio: the oldest)
    if namespace == ROOT_NAMESPACE:
        ns = []   # the root namespace's own Telemetry is already the mesh-wide level
    return sorted(mesh, key=by_name) + sorted(ns, key=by_name) + sorted(targeted, key=by_name)


def resolve(telemetries: Iterable[Telemetry], mesh: MeshConfig | None, *, namespace: str,
            name: str) -> TracePolicy | None:
    """The tracing for waypoint `namespace/name`, or None when it does not trace."""
    if mesh is None or not mesh.enable_tracing:
        return None
    providers: tuple[str, ...] | None = None
    percentage: float | None = None
    disable: bool | None = None
    tags: dict[str, CustomTag] = {}
    for t in _levels(telemetries, namespace, name):
        for e in t.tracing:
            if e.mode is TracingMode.CLIENT:
                continue
            if e.providers is not None:
                providers = e.providers
            if e.random_sampling_percentage is not None:
                percentage = e.random_sampling_percentage
            if e.disable_span_reporting is not None:
                disable = e.disable_span_reporting
            tags.update(e.custom_tags)
    names = providers if providers is not None else mesh.default_tracing_providers
    if not names:
        return None
    provider = mesh.provider(names[0])
    if provider is None:
        return None
    return TracePolicy(provider=provider,
                       percentage=mesh.default_sampling_percentage if percentage is None else percentage,
                       report=not disable, custom_tags=tuple(sorted(tags.items())))


def _service_of(host: str, services: Iterable[ServiceInfo]) -> ServiceInfo | None:
    parts = host.rstrip(".").split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        parts = parts[:2]     # name.namespace.svc[.cluster.local]
    if len(parts) != 2:
        return None
    return next((s for s in services if s.name == parts[0] and s.namespace == parts[1]), None)


def collector_address(provider: TracingProvider, services: Iterable[ServiceInfo]) -> tuple[str, int] | None:
    """Where to send the provider's spans: its `service` if that is an IPv4 address, else an
    endpoint of the Service it names (`name.namespace[.svc.cluster.local]`), at the target
    port of the Service port `port`; None while the Service has no endpoint."""
    try:
        return str(ipaddress.IPv4Address(provider.service)), provider.port
    except ValueError:
        pass
    svc = _service_of(provider.service, services)
    if svc is None or not svc.endpoints:
        return None
    sp = next((p for p in svc.ports if p.port == provider.port), None)
    port = sp.target_port if sp is not None and isinstance(sp.target_port, int) else provider.port
    ep = min(svc.endpoints, key=lambda e: e.workload_uid)   # one collector replica, chosen stably
    return str(ep.ip), port

"""Route status: Gateway API conditions for each HTTPRoute parentRef, host resolution for each VirtualService.

Pure, over the resource set the control plane holds; `ambient status` shows the result. It
says what the waypoint does with the route, so its rules follow waypoint/plan.py and
waypoint/routing/match.py, and the reasons are Gateway API's (as Istio reports them,
pilot/pkg/config/kube/gateway/conversion.go `referenceAllowed` / `buildDestination`):

`Accepted`, per parentRef:
  * a Service parent (GAMMA) is accepted when the Service exists, else `NoMatchingParent`
    ("parent service not found", as Istio). Its `port`, if any, limits the route to that
    port; a port the Service lacks is also `NoMatchingParent` (the route could never apply).
    The message says whether the Service's traffic goes through a waypoint at all: without
    one the route is accepted but has no effect, as in Istio.
  * a Gateway parent: an istio-waypoint Gateway is `NotAllowedByListeners` (its HBONE
    listener takes no routes here: attach the route to the Service); any other Gateway,
    existing or not, is `NoMatchingParent` (no controller here serves it).
`ResolvedRefs`, per parentRef, over every backendRef and RequestMirror backendRef: a kind
other than core Service is `InvalidKind`; a Service that does not exist, or lacks the port,
is `BackendNotFound` (the waypoint answers 500 for that share of traffic). Cross-namespace
backendRefs of a route attached to a Service are not checked against ReferenceGrants (mesh
routes, producer and consumer, may name the Service they attach to in its namespace); for a
Gateway parent one is `RefNotPermitted`, since no ReferenceGrant is read here. The first
failing backend's reason is the condition's; the message lists them all.

A VirtualService's `hosts` resolve as the waypoint binds them (a short name in the
VirtualService's namespace, `name.ns[.svc[.cluster.local]]`, `*.suffix`, `*`), and each
`route[].destination.host` / mirror host as the planner looks it up; one that names no Service
is listed as unresolved (its traffic gets 500, or is not routed by this VirtualService).
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.model import Namespace, PolicyObject, Service
from mesh.model.route import BackendRef, HTTPRoute, ParentRef, VirtualService
from mesh.model.workload import WAYPOINT_CLASS, BindingSource, WaypointStatus

from .translate import waypoint_binding, waypoints_of

__all__ = ["Reason", "Condition", "ParentStatus", "RouteStatus", "HostResolution", "VirtualServiceStatus",
           "route_statuses", "virtual_service_statuses", "route_status_dict"]

DOMAIN = "cluster.local"


class Reason(enum.Enum):
    """Gateway API's route condition reasons that this mesh can give (a closed set)."""

    ACCEPTED = "Accepted"
    NO_MATCHING_PARENT = "NoMatchingParent"
    NOT_ALLOWED_BY_LISTENERS = "NotAllowedByListeners"
    RESOLVED_REFS = "ResolvedRefs"
    BACKEND_NOT_FOUND = "BackendNotFound"
    INVALID_KIND = "InvalidKind"
    REF_NOT_PERMITTED = "RefNotPermitted"


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    """`Accepted` or `ResolvedRefs`."""
    status: bool
    reason: Reason
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "status": "True" if self.status else "False",
                "reason": self.reason.value, "message": self.message}


@dataclass(frozen=True, slots=True)
class ParentStatus:
    parent: str
    """As written: `Service shop/reviews:80`, `Gateway shop/wp`."""
    accepted: Condition
    resolved_refs: Condition


@dataclass(frozen=True, slots=True)
class RouteStatus:
    route: str
    """`namespace/name`."""
    parents: tuple[ParentStatus, ...]


@dataclass(frozen=True, slots=True)
class HostResolution:
    host: str
    services: tuple[str, ...]
    """`namespace/name` of each Service the host names; empty: unresolved."""


@dataclass(frozen=True, slots=True)
class VirtualServiceStatus:
    virtual_service: str
    hosts: tuple[HostResolution, ...]
    destinations: tuple[HostResolution, ...]

    @property
    def resolved(self) -> bool:
        return all(h.services for h in self.hosts + self.destinations)


def _parent_text(p: ParentRef) -> str:
    return f"{p.kind} {p.namespace}/{p.name}" + (f":{p.port}" if p.port is not None else "") + (
        f" section {p.section_name}" if p.section_name else "")


def _waypoint_note(svc: Service, namespaces: Mapping[str, Namespace], waypoints) -> str:
    b = waypoint_binding(svc.labels, svc.namespace, namespaces.get(svc.namespace),
                         source=BindingSource.SERVICE, waypoints=waypoints)
    if b is None or b.status is WaypointStatus.NOT_FOR_TRAFFIC:
        return (f"; but Service {svc.namespace}/{svc.name} uses no waypoint, so the route has no effect "
                "(label it or its namespace istio.io/use-waypoint)")
    if b.status is WaypointStatus.MISSING:
        return f"; its waypoint {b.namespace}/{b.name} does not exist (traffic is refused)"
    return f"; served by waypoint {b.namespace}/{b.name}"


def _accepted(p: ParentRef, services: Mapping[str, Service], gateways: Mapping[str, PolicyObject],
              namespaces: Mapping[str, Namespace], waypoints) -> Condition:
    uid = f"{p.namespace}/{p.name}"
    if p.is_service:
        svc = services.get(uid)
        if svc is None:
            return Condition("Accepted", False, Reason.NO_MATCHING_PARENT, f"parent Service {uid} not found")
        if p.port is not None and all(sp.port != p.port for sp in svc.ports):
            return Condition("Accepted", False, Reason.NO_MATCHING_PARENT,
                             f"parent Service {uid} has no port {p.port} "
                             f"(ports {', '.join(str(sp.port) for sp in svc.ports) or 'none'})")
        return Condition("Accepted", True, Reason.ACCEPTED,
                         f"attached to Service {uid}" + (f" port {p.port}" if p.port is not None else "")
                         + _waypoint_note(svc, namespaces, waypoints))
    gw = gateways.get(uid)
    if gw is not None and gw.spec.get("gatewayClassName") == WAYPOINT_CLASS:
        return Condition("Accepted", False, Reason.NOT_ALLOWED_BY_LISTENERS,
                         f"waypoint Gateway {uid}: its HBONE listener takes no routes here; "
                         "attach the route to the Service (parentRefs: group \"\", kind Service)")
    if gw is None:
        return Condition("Accepted", False, Reason.NO_MATCHING_PARENT, f"parent Gateway {uid} not found")
    return Condition("Accepted", False, Reason.NO_MATCHING_PARENT,
                     f"Gateway {uid} (class {gw.spec.get('gatewayClassName')!r}) is served by no controller "
                     "here; only istio-waypoint Gateways run")


def _backend_problem(b: BackendRef, route_ns: str, services: Mapping[str, Service],
                     grants_needed: bool) -> tuple[Reason, str] | None:
    what = f"backendRef {b.namespace}/{b.name}"
    if (b.group, b.kind) != ("", "Service"):
        return Reason.INVALID_KIND, f"{what}: kind {b.group or 'core'}/{b.kind} is not supported (only Service)"
    if grants_needed and b.namespace != route_ns:
        return (Reason.REF_NOT_PERMITTED,
                f"{what} not accessible to an HTTPRoute in namespace {route_ns!r} (missing a ReferenceGrant?)")
    svc = services.get(f"{b.namespace}/{b.name}")
    if svc is None:
        return Reason.BACKEND_NOT_FOUND, f"{what}: Service not found"
    if b.port is not None and all(sp.port != b.port for sp in svc.ports):
        return Reason.BACKEND_NOT_FOUND, f"{what}: Service has no port {b.port}"
    return None


def _backends(route: HTTPRoute) -> Iterable[BackendRef]:
    for rule in route.rules:
        for f in (rule.filters, *(b.filters for b in rule.backend_refs)):
            yield from (m.backend for m in f.mirrors)
        yield from rule.backend_refs


def _resolved(route: HTTPRoute, p: ParentRef, services: Mapping[str, Service]) -> Condition:
    problems = [x for b in _backends(route)
                if (x := _backend_problem(b, route.namespace, services, grants_needed=not p.is_service))]
    if not problems:
        return Condition("ResolvedRefs", True, Reason.RESOLVED_REFS, "all backendRefs resolved")
    return Condition("ResolvedRefs", False, problems[0][0], "; ".join(m for _, m in problems))


def _index(resources: Iterable[Any]):
    services: dict[str, Service] = {}
    gateways: dict[str, PolicyObject] = {}
    namespaces: dict[str, Namespace] = {}
    for r in resources:
        if isinstance(r, Service):
            services[f"{r.namespace}/{r.name}"] = r
        elif isinstance(r, Namespace):
            namespaces[r.name] = r
        elif isinstance(r, PolicyObject) and r.policy_kind == "Gateway" and r.api_version.startswith(
                "gateway.networking.k8s.io/"):
            gateways[f"{r.namespace}/{r.name}"] = r
    return services, gateways, namespaces


def route_statuses(resources: Iterable[Any], *, trust_domain: str = "cluster.local") -> list[RouteStatus]:
    """Each HTTPRoute among `resources` with its per-parentRef conditions, by namespace/name."""
    resources = list(resources)
    services, gateways, namespaces = _index(resources)
    waypoints = waypoints_of(resources, trust_domain=trust_domain)
    out = []
    for r in sorted((x for x in resources if isinstance(x, HTTPRoute)), key=lambda x: (x.namespace, x.name)):
        out.append(RouteStatus(route=f"{r.namespace}/{r.name}", parents=tuple(
            ParentStatus(parent=_parent_text(p),
                         accepted=_accepted(p, services, gateways, namespaces, waypoints),
                         resolved_refs=_resolved(r, p, services))
            for p in r.parent_refs)))
    return out


def _vs_host_services(vs: VirtualService, host: str, services: Mapping[str, Service]) -> tuple[str, ...]:
    """What `hosts[]` binds (waypoint.routing.match.bound_virtual_services)."""
    def names(s: Service) -> bool:
        fqdn = f"{s.name}.{s.namespace}.svc.{DOMAIN}"
        if host == "*":
            return True
        if host.startswith("*."):
            return fqdn.endswith(host[1:])
        if host == s.name:
            return vs.namespace == s.namespace
        return host in (fqdn, f"{s.name}.{s.namespace}.svc", f"{s.name}.{s.namespace}")
    return tuple(sorted(uid for uid, s in services.items() if names(s)))


def _destination_service(host: str, namespace: str, services: Mapping[str, Service]) -> tuple[str, ...]:
    """What a destination host names (waypoint.plan._service_by_host)."""
    parts = host.split(".")
    if len(parts) == 1:
        uid = f"{namespace}/{host}"
    elif len(parts) == 2 or parts[2] == "svc":
        uid = f"{parts[1]}/{parts[0]}"
    else:
        return ()
    return (uid,) if uid in services else ()


def virtual_service_statuses(resources: Iterable[Any]) -> list[VirtualServiceStatus]:
    """Each VirtualService with the Services its hosts and its destinations resolve to."""
    resources = list(resources)
    services, _, _ = _index(resources)
    out = []
    for vs in sorted((x for x in resources if isinstance(x, VirtualService)), key=lambda x: (x.namespace, x.name)):
        dests: dict[str, None] = {}
        for h in vs.http:
            for d in h.route:
                dests[d.destination.host] = None
            for m in (h.mirror, *(x.destination for x in h.mirrors)):
                if m is not None:
                    dests[m.host] = None
        out.append(VirtualServiceStatus(
            virtual_service=f"{vs.namespace}/{vs.name}",
            hosts=tuple(HostResolution(h, _vs_host_services(vs, h, services)) for h in vs.hosts),
            destinations=tuple(HostResolution(h, _destination_service(h, vs.namespace, services)) for h in dests)))
    return out


def route_status_dict(resources: Iterable[Any], *, trust_domain: str = "cluster.local") -> dict[str, Any]:
    """The JSON `ambient status` shows under `routes`."""
    resources = list(resources)
    return {
        "http_routes": [{"route": s.route, "parents": [
            {"parent": p.parent, "conditions": [p.accepted.as_dict(), p.resolved_refs.as_dict()]}
            for p in s.parents]} for s in route_statuses(resources, trust_domain=trust_domain)],
        "virtual_services": [{"virtual_service": v.virtual_service, "resolved": v.resolved,
                              "hosts": {h.host: list(h.services) for h in v.hosts},
                              "destinations": {h.host: list(h.services) for h in v.destinations}}
                             for v in virtual_service_statuses(resources)],
    }

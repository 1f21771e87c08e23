"""From cluster resources to what proxies receive: workloads, services, namespaces, policies, waypoints.

Pure: the control plane calls `translate` on every change of the resource store and diffs the
result against what it distributed last (`diff`). Only scheduled pods with an IP become
workloads, the way Istio only publishes pods that have a podIP.

Waypoints (`waypoint_binding`): a Gateway with gatewayClassName `istio-waypoint` is a waypoint
(distributed as `Waypoint`). `istio.io/use-waypoint: NAME` binds traffic to it, from
  * a Service (else its Namespace) for traffic addressed to the Service,
  * a Pod (else its Namespace) for traffic addressed to the pod's IP;
the object's own label wins over the namespace's, and `none` on the object opts it out of the
namespace's waypoint. `istio.io/use-waypoint-namespace` beside it names the waypoint's
namespace (default: the labelled object's). The waypoint's `istio.io/waypoint-for` (service,
the default; workload; all; none) says which traffic it takes; a namespace-level binding that
does not fit the traffic is no binding at all (the common case: pods of a namespace whose
waypoint is for services), an object-level one stays visible as NOT_FOR_TRAFFIC. A binding to a
waypoint that does not exist is MISSING, so the data path refuses instead of silently
bypassing L7 policy as Istio does; for pod traffic inherited from the namespace a missing
waypoint is assumed to have the default waypoint-for (service), i.e. no binding.
A waypoint's `address` is the IP of its pod (labelled gateway-name: <name> in its namespace; the
first by name if several), None until one is scheduled with an IP.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mesh.identity import SpiffeId
from mesh.model import (WAYPOINT_LABEL, Endpoint, Namespace, PolicyObject, Pod, Resource,
                     Service, ServiceInfo, TunnelProtocol, Workload)
from mesh.model.policy import AuthorizationPolicy, PeerAuthentication
from mesh.model.route import DestinationRule, HTTPRoute, VirtualService
from mesh.model.telemetry import MeshConfig, Telemetry
from mesh.model.workload import (GATEWAY_NAME_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL, WAYPOINT_NAMESPACE_LABEL,
                                 BindingSource, Waypoint, WaypointBinding, WaypointFor, WaypointStatus)
from mesh.distribution.protocol import resource_ref

__all__ = ["translate", "diff", "enrolled", "waypoints_of", "waypoint_binding"]


def enrolled(pod: Pod, namespace: Namespace | None) -> bool:
    """Ambient enrollment: the namespace opts in and the pod does not opt out."""
    return namespace is not None and namespace.ambient and not pod.opted_out


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    # An empty selector selects nothing for a Service (Kubernetes: no endpoints managed).
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def waypoints_of(objects: Iterable[Any], *, trust_domain: str, pods: Iterable[Pod] = ()
                 ) -> dict[tuple[str, str], Waypoint]:
    """The waypoints among `objects`, keyed by (namespace, name), addressed by their pods among `pods`."""
    addresses: dict[tuple[str, str], Any] = {}
    for p in sorted(pods, key=lambda p: p.name, reverse=True):  # the first by name wins
        gw = p.labels.get(GATEWAY_NAME_LABEL)
        if gw and p.pod_ip is not None and p.node_name:
            addresses[(p.namespace, gw)] = p.pod_ip
    out = {}
    for o in objects:
        if not (isinstance(o, PolicyObject) and o.policy_kind == "Gateway"
                and o.spec.get("gatewayClassName") == WAYPOINT_CLASS):
            continue
        try:
            wfor = WaypointFor(o.labels.get(WAYPOINT_FOR_LABEL, "service"))
        except ValueError:
            wfor = WaypointFor.SERVICE  # Istio reads an unknown value as the default
        out[(o.namespace, o.name)] = Waypoint(
            name=o.name, namespace=o.namespace, waypoint_for=wfor,
            identity=SpiffeId(trust_domain=trust_domain, namespace=o.namespace, service_account=o.name),
            address=addresses.get((o.namespace, o.name)))
    return out


def waypoint_binding(labels: Mapping[str, str], namespace: str, ns: Namespace | None, *,
                     source: BindingSource, waypoints: Mapping[tuple[str, str], Waypoint]
                     ) -> WaypointBinding | None:
    """The binding for traffic addressed to an object (a Service: service traffic; a Pod: pod
    traffic) with `labels` in `namespace`. See the module docstring for the rules."""
    service_traffic = source is BindingSource.SERVICE
    name, holder = labels.get(WAYPOINT_LABEL), labels
    if not name and ns is not None:
        name, holder, source = ns.labels.get(WAYPOINT_LABEL), ns.labels, BindingSource.NAMESPACE
    if not name or name == "none":
        return None
    wp_ns = holder.get(WAYPOINT_NAMESPACE_LABEL) or namespace
    wp = waypoints.get((wp_ns, name))
    inherited = source is BindingSource.NAMESPACE
    if wp is None:
        if inherited and not service_traffic:
            return None
        return WaypointBinding(namespace=wp_ns, name=name, source=source, status=WaypointStatus.MISSING)
    takes = wp.waypoint_for.services if service_traffic else wp.waypoint_for.workloads
    if not takes and inherited:
        return None
    return WaypointBinding(namespace=wp_ns, name=name, source=source, identity=wp.identity,
                           status=WaypointStatus.BOUND if takes else WaypointStatus.NOT_FOR_TRAFFIC)


def translate(resources: Iterable[Resource], *, trust_domain: str) -> dict[tuple[str, str], Any]:
    """The full distributed state for a set of resources, keyed by `resource_ref`."""
    namespaces: dict[str, Namespace] = {}
    pods: list[Pod] = []
    services: list[Service] = []
    policies: list[Any] = []
    for r in resources:
        if isinstance(r, Namespace):
            namespaces[r.name] = r
        elif isinstance(r, Pod):
            pods.append(r)
        elif isinstance(r, Service):
            services.append(r)
        elif isinstance(r, (PolicyObject, AuthorizationPolicy, PeerAuthentication, HTTPRoute,
                            VirtualService, DestinationRule, Telemetry, MeshConfig)):
            policies.append(r)

    live = [p for p in pods if p.pod_ip is not None and p.node_name]
    out: dict[tuple[str, str], Any] = {}
    waypoints = waypoints_of(policies, trust_domain=trust_domain, pods=live)
    for wp in waypoints.values():
        out[resource_ref(wp)] = wp
    svc_of: dict[str, list[str]] = {}
    for s in services:
        if s.cluster_ip is None:
            continue
        ns = namespaces.get(s.namespace)
        eps = tuple(Endpoint(workload_uid=f"{p.namespace}/{p.name}", ip=p.pod_ip)
                    for p in sorted(live, key=lambda p: p.name)
                    if p.namespace == s.namespace and _selects(s.selector, p.labels))
        for e in eps:
            svc_of.setdefault(e.workload_uid, []).append(f"{s.namespace}/{s.name}")
        waypoint = s.labels.get(WAYPOINT_LABEL) or (ns.labels.get(WAYPOINT_LABEL) if ns else None)
        info = ServiceInfo(name=s.name, namespace=s.namespace, vip=s.cluster_ip, ports=s.ports,
                           endpoints=eps, waypoint=waypoint,
                           retry_budget=s.retry_budget,
                           waypoint_binding=waypoint_binding(s.labels, s.namespace, ns, source=BindingSource.SERVICE,
                                                             waypoints=waypoints))
        out[resource_ref(info)] = info

    for p in live:
        ns = namespaces.get(p.namespace)
        uid = f"{p.namespace}/{p.name}"
        w = Workload(
            uid=uid, name=p.name, namespace=p.namespace, node=p.node_name, ip=p.pod_ip,
            service_account=p.service_account,
            identity=SpiffeId(trust_domain=trust_domain, namespace=p.namespace,
                              service_account=p.service_account),
            protocol=TunnelProtocol.HBONE if enrolled(p, ns) else TunnelProtocol.NONE,
            labels=p.labels, services=tuple(sorted(svc_of.get(uid, ()))),
            waypoint=p.labels.get(WAYPOINT_LABEL) or (ns.labels.get(WAYPOINT_LABEL) if ns else None),
            waypoint_binding=waypoint_binding(p.labels, p.namespace, ns, source=BindingSource.POD,
                                              waypoints=waypoints),
        )
        out[resource_ref(w)] = w
    for obj in (*namespaces.values(), *policies):
        out[resource_ref(obj)] = obj
    return out


def diff(old: Mapping[tuple[str, str], Any], new: Mapping[tuple[str, str], Any]
         ) -> tuple[list[Any], list[tuple[str, str]]]:
    """(upserts, removals) turning `old` into `new`; equal objects are not resent."""
    upserts = [obj for ref, obj in new.items() if old.get(ref) != obj]
    removals = [ref for ref in old if ref not in new]
    return upserts, removals



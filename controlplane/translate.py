"""From cluster resources to what proxies receive: workloads, services, namespaces, policies.

Pure: the control plane calls `translate` on every change of the resource store and diffs the
result against what it distributed last (`diff`). Only scheduled pods with an IP become
workloads, the way Istio only publishes pods that have a podIP.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mesh.identity import SpiffeId
from mesh.model import (WAYPOINT_LABEL, Endpoint, Namespace, PolicyObject, Pod, Resource,
                     Service, ServiceInfo, TunnelProtocol, Workload)
from mesh.model.policy import AuthorizationPolicy, PeerAuthentication
from mesh.model.route import DestinationRule, HTTPRoute, VirtualService
from mesh.distribution.protocol import resource_ref

__all__ = ["translate", "diff", "enrolled"]


def enrolled(pod: Pod, namespace: Namespace | None) -> bool:
    """Ambient enrollment: the namespace opts in and the pod does not opt out."""
    return namespace is not None and namespace.ambient and not pod.opted_out


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    # An empty selector selects nothing for a Service (Kubernetes: no endpoints managed).
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


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
                            VirtualService, DestinationRule)):
            policies.append(r)

    live = [p for p in pods if p.pod_ip is not None and p.node_name]
    out: dict[tuple[str, str], Any] = {}
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
                           endpoints=eps, waypoint=waypoint)
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



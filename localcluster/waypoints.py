"""Waypoint placement in local mode (istiod's gateway controller): an istio-waypoint Gateway -> its ServiceAccount and Pod.

Pure. At plan time the runner asks `synthesize` for the objects each `istio-waypoint` Gateway
owns: a ServiceAccount `NS/GW` (unless the user made one) and a Pod `NS/GW-waypoint` with no
containers, labelled `gateway.networking.k8s.io/gateway-name: GW` (so translation gives the
Waypoint its address) and `istio.io/dataplane-mode: none` (its traffic is never captured: the
waypoint's upstream connections must not be sent back to it). The pod is scheduled and
addressed like any other; the runner runs the waypoint process in its netns as a system
workload. Synthesized objects carry the `OWNER_ANNOTATION` naming their Gateway: deleting the
Gateway deletes them, and they cannot be applied or deleted on their own.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.model import (AMBIENT_LABEL, FrozenMap, ObjectMeta, Pod, PolicyObject, Resource, ResourceKey,
                        ServiceAccount, ServiceInfo)
from mesh.model.workload import GATEWAY_NAME_LABEL, WAYPOINT_CLASS, BindingSource, WaypointStatus

__all__ = ["OWNER_ANNOTATION", "HBONE_LISTENER_PORT", "is_waypoint_gateway", "gateway_problem", "pod_name",
           "synthesize", "owner_of", "WaypointUsers", "users_of"]

OWNER_ANNOTATION = "ambient.local/owned-by"
"""On a synthesized object: `Gateway/<ns>/<name>` (Kubernetes would use an ownerReference)."""
HBONE_LISTENER_PORT = 15008


def is_waypoint_gateway(r: Any) -> bool:
    # The same test as controlplane.translate.waypoints_of: what it publishes, this deploys.
    return (isinstance(r, PolicyObject) and r.policy_kind == "Gateway"
            and r.spec.get("gatewayClassName") == WAYPOINT_CLASS)


def gateway_problem(gw: PolicyObject) -> tuple[str, str] | None:
    """(field, message) if an istio-waypoint Gateway cannot be deployed, else None."""
    listeners = gw.spec.get("listeners") or ()
    for lst in listeners:
        if isinstance(lst, Mapping) and lst.get("port") == HBONE_LISTENER_PORT and lst.get("protocol") == "HBONE":
            return None
    have = ", ".join(f"{lst.get('port')}/{lst.get('protocol')}" for lst in listeners if isinstance(lst, Mapping))
    return ("spec.listeners",
            f"an istio-waypoint Gateway needs a listener {{name: mesh, port: {HBONE_LISTENER_PORT}, protocol: HBONE}}"
            f" (the waypoint serves HBONE on {HBONE_LISTENER_PORT}); it has {have or 'none'}")


def pod_name(gateway: str) -> str:
    return f"{gateway}-waypoint"


def _owner(gw: PolicyObject) -> str:
    return f"Gateway/{gw.namespace}/{gw.name}"


def owner_of(r: Resource) -> ResourceKey | None:
    """The Gateway that owns a synthesized object, or None for the user's own objects."""
    v = r.meta.annotations.get(OWNER_ANNOTATION)
    if not v:
        return None
    kind, ns, name = v.split("/", 2)
    return ResourceKey(kind, ns, name)


def synthesize(gw: PolicyObject, existing: Mapping[ResourceKey, Resource]) -> list[Resource]:
    """The objects `gw` owns, as they should be now; an existing synthesized pod is returned
    unchanged (node and IP kept), so re-applying the Gateway changes nothing."""
    ann = FrozenMap({OWNER_ANNOTATION: _owner(gw)})
    out: list[Resource] = []
    sa_key = ResourceKey(ServiceAccount.kind, gw.namespace, gw.name)
    old_sa = existing.get(sa_key)
    if old_sa is None or owner_of(old_sa) is not None:  # the user's own ServiceAccount stays theirs
        out.append(ServiceAccount(meta=ObjectMeta(name=gw.name, namespace=gw.namespace, annotations=ann)))
    pod = Pod(meta=ObjectMeta(name=pod_name(gw.name), namespace=gw.namespace, annotations=ann,
                              labels=FrozenMap({GATEWAY_NAME_LABEL: gw.name, AMBIENT_LABEL: "none"})),
              service_account=gw.name)
    old = existing.get(pod.key)
    if isinstance(old, Pod) and old.meta == pod.meta and old.service_account == pod.service_account:
        pod = old
    out.append(pod)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointUsers:
    """Who binds to one waypoint (for `ambient status`): objects by their own label, and
    namespaces whose label binds their services/pods."""

    services: tuple[str, ...] = ()
    pods: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {"services": list(self.services), "pods": list(self.pods), "namespaces": list(self.namespaces)}


def users_of(distributed: Iterable[Any]) -> tuple[dict[str, WaypointUsers], dict[str, WaypointUsers]]:
    """(bound, missing) by waypoint `ns/name`, from the control plane's distributed objects
    (ServiceInfo and Workload carry their `waypoint_binding`)."""
    acc: dict[tuple[bool, str], dict[str, set[str]]] = {}
    for o in distributed:
        b = getattr(o, "waypoint_binding", None)
        if b is None or b.status is WaypointStatus.NOT_FOR_TRAFFIC:
            continue
        slot = acc.setdefault((b.status is WaypointStatus.BOUND, b.uid),
                              {"services": set(), "pods": set(), "namespaces": set()})
        if b.source is BindingSource.NAMESPACE:
            slot["namespaces"].add(o.namespace)
        else:
            slot["services" if isinstance(o, ServiceInfo) else "pods"].add(o.uid)
    bound: dict[str, WaypointUsers] = {}
    missing: dict[str, WaypointUsers] = {}
    for (is_bound, uid), s in sorted(acc.items()):
        (bound if is_bound else missing)[uid] = WaypointUsers(**{k: tuple(sorted(v)) for k, v in s.items()})
    return bound, missing

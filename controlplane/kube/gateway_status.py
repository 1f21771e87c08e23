"""Gateway API status the control plane writes: waypoint Gateways and the HTTPRoutes bound to them or to Services (pure).

Gateway (class istio-waypoint): `Accepted` (False `ListenersNotValid` without the HBONE 15008
listener a waypoint serves), `Programmed` (True once its Service has a ClusterIP, which is then
`status.addresses[0]`, type IPAddress, as `kubectl get gateway` shows Istio's; False
`AddressNotAssigned` before, `Invalid` when not accepted, when an object of its name belongs to
someone else, or when the API server refused its objects), and per listener the routes attached to it.

HTTPRoute: one `status.parents[]` entry per parentRef this control plane answers for (a Service,
GAMMA; or a waypoint Gateway), with controllerName istio.io/mesh-controller, beside any other
controller's entries (kept as they are). `Accepted`: False `UnsupportedValue` when the config
edge rejected the route, `NoMatchingParent` when the Service (or its port, or the Gateway's
listener) does not exist. `ResolvedRefs`: False `InvalidKind` for a backend that is not a core
Service, `BackendNotFound` for a Service (or port) that does not exist.

Conditions keep their lastTransitionTime while their status stays the same, so a status that did
not change compares equal and is not written again (no write loop through our own watch).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .waypoint_objects import GATEWAY_API_VERSION, HBONE_PORT, MESH_CONTROLLER, GatewayInfo

__all__ = ["Reason", "ServiceFacts", "RouteParent", "RouteBackend", "RouteInfo", "route_info",
           "gateway_status", "route_status", "condition", "GROUP"]

GROUP = GATEWAY_API_VERSION.split("/")[0]


class Reason(enum.Enum):
    """The reasons we write (Gateway API's names)."""

    ACCEPTED = "Accepted"
    LISTENERS_NOT_VALID = "ListenersNotValid"
    PROGRAMMED = "Programmed"
    INVALID = "Invalid"
    ADDRESS_NOT_ASSIGNED = "AddressNotAssigned"
    UNSUPPORTED_PROTOCOL = "UnsupportedProtocol"
    UNSUPPORTED_VALUE = "UnsupportedValue"
    NO_MATCHING_PARENT = "NoMatchingParent"
    RESOLVED_REFS = "ResolvedRefs"
    INVALID_KIND = "InvalidKind"
    BACKEND_NOT_FOUND = "BackendNotFound"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceFacts:
    cluster_ip: str | None
    ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteParent:
    raw: Mapping[str, Any]
    """As written in the spec (echoed in status.parents[].parentRef)."""
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteBackend:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteInfo:
    namespace: str
    name: str
    generation: int
    parents: tuple[RouteParent, ...] = ()
    backends: tuple[RouteBackend, ...] = ()


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def route_info(obj: Mapping[str, Any]) -> RouteInfo:
    """Tolerant of what the config edge rejects: status must be written for bad routes too."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ns = str(meta.get("namespace") or "")
    parents = []
    for p in spec.get("parentRefs") or ():
        if not isinstance(p, Mapping) or not isinstance(p.get("name"), str):
            continue
        group = p.get("group")
        parents.append(RouteParent(raw=dict(p), group=GROUP if group is None else str(group),
                                   kind=str(p.get("kind") or "Gateway"), namespace=str(p.get("namespace") or ns),
                                   name=p["name"], port=_int(p.get("port")),
                                   section_name=p.get("sectionName") if isinstance(p.get("sectionName"), str) else None))
    backends = []
    for rule in spec.get("rules") or ():
        for b in (rule.get("backendRefs") or ()) if isinstance(rule, Mapping) else ():
            if isinstance(b, Mapping) and isinstance(b.get("name"), str):
                backends.append(RouteBackend(group=str(b.get("group") or ""), kind=str(b.get("kind") or "Service"),
                                             namespace=str(b.get("namespace") or ns), name=b["name"],
                                             port=_int(b.get("port"))))
    return RouteInfo(namespace=ns, name=str(meta.get("name") or ""), generation=int(meta.get("generation") or 0),
                     parents=tuple(parents), backends=tuple(backends))


def condition(type_: str, ok: bool, reason: Reason, message: str, generation: int, now: str,
              previous: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime from `previous` while the status is unchanged."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
    return {"type": type_, "status": status, "reason": reason.value, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since or now}


def gateway_status(gw: GatewayInfo, service: ServiceFacts | None, *, conflicts: Sequence[str] = (),
                   apply_error: str | None = None,
                   attached_routes: Mapping[str, int] | None = None, previous: Mapping[str, Any] | None = None,
                   now: str, cluster_domain: str = "cluster.local") -> dict[str, Any]:
    """The whole status of a waypoint Gateway. `attached_routes`: listener name -> routes;
    `apply_error`: why the API server refused its objects, if it did."""
    prev = previous or {}
    old = prev.get("conditions") or ()
    hbone = gw.hbone_listener
    if hbone is None:
        have = ", ".join(f"{x.port}/{x.protocol}" for x in gw.listeners) or "none"
        accepted = condition("Accepted", False, Reason.LISTENERS_NOT_VALID,
                             f"an istio-waypoint Gateway needs a listener {{name: mesh, port: {HBONE_PORT}, "
                             f"protocol: HBONE}}; it has {have}", gw.generation, now, old)
    else:
        accepted = condition("Accepted", True, Reason.ACCEPTED, "Resource accepted", gw.generation, now, old)
    addresses: list[dict[str, str]] = []
    if hbone is None:
        programmed = condition("Programmed", False, Reason.INVALID, "the Gateway is not accepted", gw.generation,
                               now, old)
    elif conflicts:
        programmed = condition("Programmed", False, Reason.INVALID,
                               f"{', '.join(conflicts)} exists and is not owned by this Gateway: delete or rename it",
                               gw.generation, now, old)
    elif apply_error is not None:
        programmed = condition("Programmed", False, Reason.INVALID,
                               f"its ServiceAccount, Deployment or Service was refused: {apply_error}"[:1024],
                               gw.generation, now, old)
    elif service is None or not service.cluster_ip:
        programmed = condition("Programmed", False, Reason.ADDRESS_NOT_ASSIGNED,
                               f"waiting for Service {gw.namespace}/{gw.name} to have a ClusterIP",
                               gw.generation, now, old)
    else:
        host = f"{gw.name}.{gw.namespace}.svc.{cluster_domain}"
        programmed = condition("Programmed", True, Reason.PROGRAMMED,
                               f"Resource programmed, assigned to service(s) {host}:{HBONE_PORT}",
                               gw.generation, now, old)
        addresses = [{"type": "IPAddress", "value": service.cluster_ip}]
    old_listeners = {x.get("name"): x.get("conditions") or () for x in prev.get("listeners") or ()}
    listeners = []
    for x in gw.listeners:
        lo = old_listeners.get(x.name, ())
        ok = x is hbone
        reason = Reason.ACCEPTED if ok else Reason.UNSUPPORTED_PROTOCOL
        msg = "No errors found" if ok else f"a waypoint serves only HBONE on {HBONE_PORT}"
        listeners.append({
            "name": x.name, "attachedRoutes": (attached_routes or {}).get(x.name, 0),
            "supportedKinds": [{"group": GROUP, "kind": "HTTPRoute"}] if ok else [],
            "conditions": [condition("Accepted", ok, reason, msg, gw.generation, now, lo),
                           condition("Programmed", ok and programmed["status"] == "True",
                                     Reason.PROGRAMMED if ok else Reason.INVALID, msg, gw.generation, now, lo),
                           condition("ResolvedRefs", True, Reason.RESOLVED_REFS, "No errors found",
                                     gw.generation, now, lo)]})
    return {"addresses": addresses, "conditions": [accepted, programmed], "listeners": listeners}


def _parent_result(p: RouteParent, rejected: str | None, services: Mapping[tuple[str, str], ServiceFacts],
                   gateways: Mapping[tuple[str, str], GatewayInfo]) -> tuple[bool, Reason, str] | None:
    """(accepted, reason, message) for a parentRef we answer for; None when it is not ours."""
    if (p.group, p.kind) == ("", "Service"):
        svc = services.get((p.namespace, p.name))
        if svc is None:
            return False, Reason.NO_MATCHING_PARENT, f"Service {p.namespace}/{p.name} not found"
        if p.port is not None and p.port not in svc.ports:
            return False, Reason.NO_MATCHING_PARENT, f"Service {p.namespace}/{p.name} has no port {p.port}"
    elif (p.group, p.kind) == (GROUP, "Gateway"):
        gw = gateways.get((p.namespace, p.name))
        if gw is None or not gw.is_waypoint:
            return None  # another controller's Gateway (or none): not ours to report on
        if p.section_name is not None and p.section_name not in {x.name for x in gw.listeners}:
            return False, Reason.NO_MATCHING_PARENT, f"Gateway {p.namespace}/{p.name} has no listener {p.section_name}"
        if p.port is not None and p.port not in {x.port for x in gw.listeners}:
            return False, Reason.NO_MATCHING_PARENT, f"Gateway {p.namespace}/{p.name} has no listener on port {p.port}"
    else:
        return None
    if rejected is not None:
        return False, Reason.UNSUPPORTED_VALUE, rejected
    return True, Reason.ACCEPTED, "Route was valid"


def _refs_result(r: RouteInfo, services: Mapping[tuple[str, str], ServiceFacts]) -> tuple[bool, Reason, str]:
    for b in r.backends:
        if (b.group, b.kind) != ("", "Service"):
            return False, Reason.INVALID_KIND, f"backendRef {b.group or 'core'}/{b.kind} {b.name}: only Services"
        svc = services.get((b.namespace, b.name))
        if svc is None:
            return False, Reason.BACKEND_NOT_FOUND, f"backend Service {b.namespace}/{b.name} not found"
        if b.port is not None and b.port not in svc.ports:
            return False, Reason.BACKEND_NOT_FOUND, f"backend Service {b.namespace}/{b.name} has no port {b.port}"
    return True, Reason.RESOLVED_REFS, "All references resolved"


def route_status(r: RouteInfo, *, rejected: str | None, services: Mapping[tuple[str, str], ServiceFacts],
                 gateways: Mapping[tuple[str, str], GatewayInfo], previous: Mapping[str, Any] | None,
                 now: str) -> dict[str, Any]:
    """The route's whole status: other controllers' parents as they were, then ours.
    `rejected`: why the config edge refused the route, or None."""
    prev_parents = [p for p in (previous or {}).get("parents") or () if isinstance(p, Mapping)]
    others = [p for p in prev_parents if p.get("controllerName") != MESH_CONTROLLER]
    mine_before = [p for p in prev_parents if p.get("controllerName") == MESH_CONTROLLER]
    refs = _refs_result(r, services)
    ours = []
    for p in r.parents:
        res = _parent_result(p, rejected, services, gateways)
        if res is None:
            continue
        old = next((x.get("conditions") or () for x in mine_before if x.get("parentRef") == p.raw), ())
        ours.append({"parentRef": dict(p.raw), "controllerName": MESH_CONTROLLER, "conditions": [
            condition("Accepted", res[0], res[1], res[2][:1024], r.generation, now, old),
            condition("ResolvedRefs", refs[0], refs[1], refs[2], r.generation, now, old)]})
    return {"parents": [*others, *ours]}

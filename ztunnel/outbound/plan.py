"""Outbound planning: original destination -> how to reach it (pure; Istio's build_request).

    Service VIP, bound to a waypoint  -> HBONE to waypointIP:15008, :authority = VIP:port
    Service VIP     -> pick an endpoint; continue with that endpoint and the target port
    pod IP, bound to a waypoint       -> HBONE to waypointIP:15008, :authority = podIP:port
    meshed pod      -> HBONE to podIP:15008 with :authority = podIP:port
    anything else   -> plain TCP passthrough to the original destination

Waypoint bindings (mesh.model.workload.WaypointBinding) come from the control plane: a
Service's binding governs traffic addressed to its VIP, a Workload's binding traffic addressed
to its pod IP (not traffic that reached it through a Service VIP: that one followed the
Service's binding, as in Istio). BOUND goes to the waypoint, expecting the waypoint's identity;
MISSING, or a bound waypoint that has no address (yet), is refused with `waypoint_missing`:
never sent around the waypoint, whose L7 policy would then be skipped. NOT_FOR_TRAFFIC goes
direct. The waypoint's own pod is not captured (dataplane-mode none), so its upstream traffic
never comes back here.

Same-node destinations take the same path (HBONE through the destination pod's 15008), as
ztunnel does since in-pod mode.
"""
from __future__ import annotations

import enum
import ipaddress
import random
from dataclasses import dataclass
from typing import Protocol

from mesh.identity import SpiffeId
from mesh.model import ServiceInfo, TunnelProtocol, Workload
from mesh.model.workload import Waypoint, WaypointBinding, WaypointStatus

__all__ = ["HBONE_PORT", "Addresses", "Route", "OutboundPlan", "PlanError", "plan_outbound"]

HBONE_PORT = 15008


class Addresses(Protocol):
    """What planning reads of the mesh (mesh.state.ProxyState provides it): indexed lookups by
    the address' text, so a connection costs no parsing when the address is known."""

    def service_at(self, ip: str) -> ServiceInfo | None: ...

    def workload_at(self, ip: str) -> Workload | None: ...

    def waypoint(self, namespace: str, name: str) -> Waypoint | None: ...


class Route(enum.Enum):
    HBONE = "hbone"
    PASSTHROUGH = "passthrough"


class PlanError(Exception):
    """No way to reach the destination; `reason` is the metric label and log word."""

    def __init__(self, reason: str, message: str, *, service: ServiceInfo | None = None,
                 workload: Workload | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.service = service
        """The Service the connection was addressed to, when known (for the result)."""
        self.workload = workload
        """The pod the connection was addressed to, when known."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundPlan:
    route: Route
    connect: tuple[str, int]
    """Where the TCP connection goes: podIP:15008 for HBONE, else the destination itself."""
    authority: str = ""
    """HBONE :authority (`ip:port` of the destination workload; through a waypoint, the address
    the client dialled: service VIP:port or podIP:port)."""
    dst_workload: Workload | None = None
    """The destination pod; None when a waypoint takes service traffic (it picks the endpoint)."""
    dst_identity: SpiffeId | None = None
    """Expected server identity (checked after the TLS handshake): the pod's, or the waypoint's."""
    service: ServiceInfo | None = None
    waypoint: Waypoint | None = None
    """The waypoint the connection goes through, if any."""


def _target_port(svc: ServiceInfo, port: int) -> int:
    for p in svc.ports:
        if p.port == port:
            if isinstance(p.target_port, int):
                return p.target_port
            raise PlanError("named_target_port",
                            f"service {svc.uid} port {port} targets named port {p.target_port!r}, "
                            "which local mode cannot resolve (pods declare no container ports)")
    raise PlanError("no_service_port", f"service {svc.uid} has no port {port}")


def _bound_waypoint(state: Addresses, b: WaypointBinding | None, svc: ServiceInfo | None,
                    dst: Workload | None) -> Waypoint | None:
    """The waypoint `b` sends this traffic to; None to go direct; PlanError to refuse."""
    if b is None or b.status is WaypointStatus.NOT_FOR_TRAFFIC:
        return None
    wp = state.waypoint(b.namespace, b.name) if b.status is WaypointStatus.BOUND else None
    what = f"service {svc.uid}" if svc is not None else f"pod {dst.uid}" if dst is not None else "destination"
    if wp is None:
        raise PlanError("waypoint_missing", f"{what} is bound to waypoint {b.uid}, which does not exist "
                        "(no istio-waypoint Gateway of that name): refused rather than bypassing it",
                        service=svc, workload=dst)
    if wp.address is None:
        raise PlanError("waypoint_missing", f"{what} is bound to waypoint {b.uid}, which has no address "
                        "yet (its pod is not scheduled or has no IP): refused rather than bypassing it",
                        service=svc, workload=dst)
    return wp


def _via(wp: Waypoint, authority: str, svc: ServiceInfo | None, dst: Workload | None) -> OutboundPlan:
    return OutboundPlan(route=Route.HBONE, connect=(str(wp.address), HBONE_PORT), authority=authority,
                        dst_workload=dst, dst_identity=wp.identity, service=svc, waypoint=wp)


def plan_outbound(state: Addresses, source: Workload, dst_ip: str, dst_port: int,
                  rng: random.Random) -> OutboundPlan:
    """How `source`'s connection to dst_ip:dst_port travels; PlanError if it cannot."""
    ip = dst_ip
    svc = state.service_at(ip)
    if svc is not None:
        wp = _bound_waypoint(state, svc.waypoint_binding, svc, None)
        if wp is not None:
            if not any(p.port == dst_port for p in svc.ports):
                raise PlanError("no_service_port", f"service {svc.uid} has no port {dst_port}", service=svc)
            return _via(wp, f"{ip}:{dst_port}", svc, None)  # the waypoint picks the endpoint
        port = _target_port(svc, dst_port)
        if not svc.endpoints:
            raise PlanError("no_healthy_upstream", f"service {svc.uid} has no endpoints")
        ep = svc.endpoints[rng.randrange(len(svc.endpoints))]
        ip, dst_port = str(ep.ip), port
    dst = state.workload_at(ip)
    if svc is None and dst is not None:
        wp = _bound_waypoint(state, dst.waypoint_binding, None, dst)
        if wp is not None:
            return _via(wp, f"{ip}:{dst_port}", None, dst)
    if dst is not None and dst.protocol is TunnelProtocol.HBONE:
        return OutboundPlan(route=Route.HBONE, connect=(ip, HBONE_PORT),
                            authority=f"{ip}:{dst_port}", dst_workload=dst, dst_identity=dst.identity,
                            service=svc)
    if svc is None and dst is None:
        # Unknown to the mesh: passthrough. Known addresses are canonical text already (they
        # matched str(IPv4Address)); anything else is checked and normalised here.
        ip = str(ipaddress.IPv4Address(ip))
    return OutboundPlan(route=Route.PASSTHROUGH, connect=(ip, dst_port), dst_workload=dst,
                        service=svc)

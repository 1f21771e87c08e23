"""Outbound planning: original destination -> how to reach it (pure; Istio's build_request).

    Service VIP     -> pick an endpoint; continue with that endpoint and the target port
    meshed pod      -> HBONE to podIP:15008 with :authority = podIP:port
    anything else   -> plain TCP passthrough to the original destination

Same-node destinations take the same path (HBONE through the destination pod's 15008), as
ztunnel does since in-pod mode. Waypoints come with the L7 issue.
"""
from __future__ import annotations

import enum
import ipaddress
import random
from dataclasses import dataclass
from typing import Protocol

from mesh.identity import SpiffeId
from mesh.model import ServiceInfo, TunnelProtocol, Workload

__all__ = ["HBONE_PORT", "Addresses", "Route", "OutboundPlan", "PlanError", "plan_outbound"]

HBONE_PORT = 15008


class Addresses(Protocol):
    """What planning reads of the mesh (mesh.state.ProxyState provides it): indexed lookups by
    the address' text, so a connection costs no parsing when the address is known."""

    def service_at(self, ip: str) -> ServiceInfo | None: ...

    def workload_at(self, ip: str) -> Workload | None: ...


class Route(enum.Enum):
    HBONE = "hbone"
    PASSTHROUGH = "passthrough"


class PlanError(Exception):
    """No way to reach the destination; `reason` is the metric label and log word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundPlan:
    route: Route
    connect: tuple[str, int]
    """Where the TCP connection goes: podIP:15008 for HBONE, else the destination itself."""
    authority: str = ""
    """HBONE :authority (`ip:port` of the destination workload)."""
    dst_workload: Workload | None = None
    dst_identity: SpiffeId | None = None
    """Expected server identity (checked after the TLS handshake)."""
    service: ServiceInfo | None = None


def _target_port(svc: ServiceInfo, port: int) -> int:
    for p in svc.ports:
        if p.port == port:
            if isinstance(p.target_port, int):
                return p.target_port
            raise PlanError("named_target_port",
                            f"service {svc.uid} port {port} targets named port {p.target_port!r}, "
                            "which local mode cannot resolve (pods declare no container ports)")
    raise PlanError("no_service_port", f"service {svc.uid} has no port {port}")


def plan_outbound(state: Addresses, source: Workload, dst_ip: str, dst_port: int,
                  rng: random.Random) -> OutboundPlan:
    """How `source`'s connection to dst_ip:dst_port travels; PlanError if it cannot."""
    ip = dst_ip
    svc = state.service_at(ip)
    if svc is not None:
        port = _target_port(svc, dst_port)
        if not svc.endpoints:
            raise PlanError("no_healthy_upstream", f"service {svc.uid} has no endpoints")
        ep = svc.endpoints[rng.randrange(len(svc.endpoints))]
        ip, dst_port = str(ep.ip), port
    dst = state.workload_at(ip)
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

"""What the control plane distributes: workloads and services as proxies see them."""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from ..identity import SpiffeId
from .base import FrozenMap
from .resources import ServicePort

__all__ = ["TunnelProtocol", "Workload", "Endpoint", "ServiceInfo"]


class TunnelProtocol(enum.Enum):
    """How traffic reaches a workload (Istio's tunnel_protocol)."""

    NONE = "NONE"
    """Not in the mesh: plain TCP."""
    HBONE = "HBONE"
    """Enrolled in ambient: HBONE to podIP:15008."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A pod, as ztunnel needs it (Istio's `istio.workload.Workload`)."""

    uid: str
    """`<namespace>/<pod name>`."""
    name: str
    namespace: str
    node: str
    ip: ipaddress.IPv4Address
    service_account: str
    identity: SpiffeId
    protocol: TunnelProtocol
    labels: FrozenMap = field(default_factory=FrozenMap)
    services: tuple[str, ...] = ()
    """`<namespace>/<service name>` of the services selecting this pod."""
    waypoint: str | None = None
    """Value of istio.io/use-waypoint (pod, else namespace), when set."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    workload_uid: str
    ip: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceInfo:
    """A Service with its VIP and the endpoints selected from running pods."""

    name: str
    namespace: str
    vip: ipaddress.IPv4Address
    ports: tuple[ServicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    waypoint: str | None = None

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

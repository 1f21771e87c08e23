"""What the control plane distributes: workloads and services as proxies see them."""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from ..identity import SpiffeId
from .base import FrozenMap
from .resources import RetryBudgetSpec, ServicePort

__all__ = ["TunnelProtocol", "Workload", "Endpoint", "ServiceInfo", "WAYPOINT_CLASS", "WAYPOINT_FOR_LABEL",
           "WAYPOINT_NAMESPACE_LABEL", "GATEWAY_NAME_LABEL", "WaypointFor", "BindingSource", "WaypointStatus",
           "WaypointBinding", "Waypoint"]

WAYPOINT_CLASS = "istio-waypoint"
"""gatewayClassName of a Gateway that is a waypoint."""
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
"""Beside istio.io/use-waypoint on the same object: the waypoint's namespace (default: the object's)."""
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
"""On a Gateway's pods (the waypoint deployment's): the Gateway's name."""


class WaypointFor(enum.Enum):
    """Which traffic a waypoint takes (its `istio.io/waypoint-for` label; default `service`)."""

    SERVICE = "service"
    """Traffic addressed to a Service (its VIP)."""
    WORKLOAD = "workload"
    """Traffic addressed to a pod IP."""
    ALL = "all"
    NONE = "none"

    @property
    def services(self) -> bool:
        return self in (WaypointFor.SERVICE, WaypointFor.ALL)

    @property
    def workloads(self) -> bool:
        return self in (WaypointFor.WORKLOAD, WaypointFor.ALL)


class BindingSource(enum.Enum):
    """The object whose istio.io/use-waypoint label made the binding."""

    POD = "pod"
    SERVICE = "service"
    NAMESPACE = "namespace"


class WaypointStatus(enum.Enum):
    BOUND = "bound"
    """The waypoint exists and takes this traffic: send it there."""
    MISSING = "missing"
    """No istio-waypoint Gateway of that name: REFUSE the traffic (Istio would bypass the
    waypoint, skipping its L7 policy; we do not)."""
    NOT_FOR_TRAFFIC = "not_for_traffic"
    """The object's own label names a waypoint whose waypoint-for excludes this traffic: it
    goes direct, as in Istio; kept so the config dump says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointBinding:
    """Which waypoint a Service's (service-addressed) or a Workload's (pod-addressed) traffic uses."""

    namespace: str
    name: str
    source: BindingSource
    status: WaypointStatus
    identity: SpiffeId | None = None
    """The waypoint's identity (`spiffe://<td>/ns/<ns>/sa/<gateway name>`); None when missing."""

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Waypoint:
    """A Gateway with gatewayClassName istio-waypoint, as proxies need it."""

    name: str
    namespace: str
    waypoint_for: WaypointFor = WaypointFor.SERVICE
    identity: SpiffeId
    """Its pods run as service account <gateway name> (Istio's waypoint deployment)."""
    address: ipaddress.IPv4Address | None = None
    """The IP of its pod (labelled gateway-name: <name> in its namespace); None until it has one,
    and traffic bound to it is refused meanwhile (fail closed)."""

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


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
    """Value of istio.io/use-waypoint (pod, else namespace), when set (raw; see waypoint_binding)."""
    waypoint_binding: WaypointBinding | None = None
    """The waypoint for traffic addressed to this pod's IP; None = direct."""


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
    """Value of istio.io/use-waypoint (service, else namespace), when set (raw; see waypoint_binding)."""
    waypoint_binding: WaypointBinding | None = None
    """The waypoint for traffic addressed to this Service; None = direct."""
    retry_budget: RetryBudgetSpec | None = None
    """The Service's retry-budget tuning (its `retry.ambient.dev/*` annotations); None: defaults."""

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

"""The Kubernetes kinds the mesh reads, as frozen dataclasses (converted once in mesh.config)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar

from .base import FrozenMap, ObjectMeta, ResourceKey

__all__ = [
    "AMBIENT_LABEL", "WAYPOINT_LABEL", "Resource", "Namespace", "Node", "ServiceAccount",
    "Container", "Pod", "ServicePort", "Service", "PolicyObject", "POLICY_KINDS", "CORE_KINDS",
    "RetryBudgetSpec", "RETRY_BUDGET_ANNOTATION_PREFIX",
]

AMBIENT_LABEL = "istio.io/dataplane-mode"
"""`ambient` on a namespace enrolls its pods; `none` on a pod opts that pod out."""
WAYPOINT_LABEL = "istio.io/use-waypoint"


@dataclass(frozen=True, slots=True, kw_only=True)
class Resource:
    """Base of every kind: metadata plus the kind name (a class constant)."""

    kind: ClassVar[str] = ""
    namespaced: ClassVar[bool] = True
    meta: ObjectMeta

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.kind, self.meta.namespace, self.meta.name)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def labels(self) -> FrozenMap:
        return self.meta.labels


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace(Resource):
    kind: ClassVar[str] = "Namespace"
    namespaced: ClassVar[bool] = False

    @property
    def ambient(self) -> bool:
        return self.meta.labels.get(AMBIENT_LABEL) == "ambient"


@dataclass(frozen=True, slots=True, kw_only=True)
class Node(Resource):
    kind: ClassVar[str] = "Node"
    namespaced: ClassVar[bool] = False
    pod_cidr: ipaddress.IPv4Network | None = None
    """spec.podCIDR; allocated from the cluster pod range when absent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccount(Resource):
    kind: ClassVar[str] = "ServiceAccount"


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    name: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: FrozenMap = field(default_factory=FrozenMap)
    """Plain `value` env vars only (name -> value)."""
    working_dir: str | None = None
    run_as_user: int | None = None
    """securityContext.runAsUser; None: the pod's, else the runtime's default."""
    run_as_group: int | None = None
    """securityContext.runAsGroup; None: the pod's, else the runtime's default."""

    @property
    def argv(self) -> tuple[str, ...]:
        return self.command + self.args


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod(Resource):
    kind: ClassVar[str] = "Pod"
    node_name: str | None = None
    """spec.nodeName; the local runner schedules the pod when absent."""
    service_account: str = "default"
    containers: tuple[Container, ...] = ()
    pod_ip: ipaddress.IPv4Address | None = None
    """status.podIP when the user pins one; otherwise allocated from the node's CIDR."""
    source_dir: str = ""
    """Directory of the YAML file the pod came from: the default working directory of its
    containers in local mode (a local-mode convenience; Kubernetes ignores it)."""
    run_as_user: int | None = None
    """spec.securityContext.runAsUser: the default of containers that set none."""
    run_as_group: int | None = None
    """spec.securityContext.runAsGroup: the default of containers that set none."""

    @property
    def opted_out(self) -> bool:
        return self.meta.labels.get(AMBIENT_LABEL) == "none"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int | str
    """A number, or the name of a container port (kept as given)."""
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""
    """spec.ports[].appProtocol as given (Istio's protocol selection reads it before the name)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudgetSpec:
    """A Service's retry-budget tuning, from its `retry.ambient.dev/*` annotations (None: the
    mesh's default; see waypoint/resilience/budget.py)."""

    enabled: bool = True
    """`retry.ambient.dev/budget: "off"` turns the budget off (maxRetries still applies)."""
    percent: float | None = None
    """`retry.ambient.dev/budget-percent`: retries as a percentage of requests, 0..1000."""
    min_retries_per_second: float | None = None
    """`retry.ambient.dev/budget-min-retries-per-second`: the floor."""
    window: float | None = None
    """`retry.ambient.dev/budget-window`: seconds (a duration such as `10s`, 1 s .. 10 min)."""


RETRY_BUDGET_ANNOTATION_PREFIX = "retry.ambient.dev/"


@dataclass(frozen=True, slots=True, kw_only=True)
class Service(Resource):
    kind: ClassVar[str] = "Service"
    selector: FrozenMap = field(default_factory=FrozenMap)
    ports: tuple[ServicePort, ...] = ()
    cluster_ip: ipaddress.IPv4Address | None = None
    """spec.clusterIP when given; otherwise allocated from the service CIDR."""
    retry_budget: RetryBudgetSpec | None = None
    """From the `retry.ambient.dev/*` annotations; None when there are none."""


POLICY_KINDS: dict[str, tuple[str, ...]] = {
    # kind -> accepted apiVersions
    "AuthorizationPolicy": ("security.istio.io/v1", "security.istio.io/v1beta1"),
    "PeerAuthentication": ("security.istio.io/v1", "security.istio.io/v1beta1"),
    "VirtualService": ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
    "DestinationRule": ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"),
    "Telemetry": ("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"),
    # ConfigMap istio-system/istio is the mesh config (model.telemetry.MeshConfig); others are stored.
    "ConfigMap": ("v1",),
    # Also Istio's own ingress/egress Gateway (networking.istio.io): accepted, stored, not used.
    "Gateway": ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1",
                "networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyObject(Resource):
    """A policy/routing object kept with its spec deep-frozen until the issue that enforces it
    gives it a typed model. `kind` is per instance here, so it shadows the class constant."""

    policy_kind: str
    api_version: str
    spec: FrozenMap = field(default_factory=FrozenMap)

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.policy_kind, self.meta.namespace, self.meta.name)


CORE_KINDS: dict[str, type[Resource]] = {
    c.kind: c for c in (Namespace, Node, ServiceAccount, Pod, Service)
}

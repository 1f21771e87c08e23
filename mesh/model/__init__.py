"""The mesh's data model: frozen dataclasses, the only types passed inward from the config edge."""
from .base import FrozenMap, ObjectMeta, ResourceKey, freeze
from .resources import (AMBIENT_LABEL, CORE_KINDS, POLICY_KINDS, WAYPOINT_LABEL, Container, Namespace,
                        Node, PolicyObject, Pod, Resource, RETRY_BUDGET_ANNOTATION_PREFIX, RetryBudgetSpec, Service,
                        ServiceAccount, ServicePort)
from .workload import Endpoint, ServiceInfo, TunnelProtocol, Workload

__all__ = [
    "FrozenMap", "ObjectMeta", "ResourceKey", "freeze", "AMBIENT_LABEL", "WAYPOINT_LABEL",
    "CORE_KINDS", "POLICY_KINDS", "Container", "Namespace", "Node", "PolicyObject", "Pod",
    "Resource", "Service", "ServiceAccount", "ServicePort", "Endpoint", "ServiceInfo",
    "TunnelProtocol", "Workload", "RetryBudgetSpec", "RETRY_BUDGET_ANNOTATION_PREFIX",
]

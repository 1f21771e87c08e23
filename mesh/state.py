"""A proxy's view of the mesh: workloads, services, namespaces and policies, with indexes.

Filled only by the control-plane client (snapshot, then deltas); read by proxies through the
lookups below. Pure data, no I/O: the client owns the connection, this owns the state.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from .distribution.protocol import Delta, Snapshot, resource_ref
from .model import Namespace, PolicyObject, ServiceInfo, Workload
from .model.policy import AuthorizationPolicy, PeerAuthentication
from .model.route import DestinationRule, HTTPRoute, VirtualService

__all__ = ["ProxyState", "StateVersionError"]


class StateVersionError(Exception):
    """A delta that does not follow the state's version (the client must resync)."""

    reason = "state_version_gap"


@dataclass(slots=True)
class _Indexes:
    workload_by_ip: dict[ipaddress.IPv4Address, Workload]
    service_by_vip: dict[ipaddress.IPv4Address, ServiceInfo]


class ProxyState:
    """Everything a proxy knows, keyed by (wire type, uid), plus lookup indexes."""

    def __init__(self) -> None:
        self.version = 0
        """Version of the last snapshot or delta applied; 0 = nothing received yet."""
        self.synced = False
        self._objects: dict[tuple[str, str], Any] = {}
        self._idx = _Indexes({}, {})

    # -- updates (from the control-plane client) --

    def apply_snapshot(self, snap: Snapshot) -> None:
        self._objects = {resource_ref(r): r for r in snap.resources}
        self.version = snap.version
        self.synced = True
        self._reindex()

    def apply_delta(self, delta: Delta) -> None:
        if not self.synced or delta.version <= self.version:
            raise StateVersionError(f"delta {delta.version} does not follow state {self.version}")
        for ref in delta.removals:
            self._objects.pop(ref, None)
        for r in delta.upserts:
            self._objects[resource_ref(r)] = r
        self.version = delta.version
        self._reindex()

    def _reindex(self) -> None:
        self._idx = _Indexes(
            {w.ip: w for w in self.workloads()},
            {s.vip: s for s in self.services()},
        )

    # -- lookups --

    def _of(self, kind: str) -> Iterable[Any]:
        return (o for (k, _), o in self._objects.items() if k == kind)

    def workloads(self) -> list[Workload]:
        return sorted(self._of("Workload"), key=lambda w: w.uid)

    def services(self) -> list[ServiceInfo]:
        return sorted(self._of("Service"), key=lambda s: s.uid)

    def namespaces(self) -> list[Namespace]:
        return sorted(self._of("Namespace"), key=lambda n: n.name)

    def policies(self) -> list[PolicyObject]:
        return sorted(self._of("Policy"), key=lambda p: (p.key.kind, p.namespace, p.name))

    def authorization_policies(self) -> list[AuthorizationPolicy]:
        return sorted(self._of("AuthorizationPolicy"), key=lambda p: (p.namespace, p.name))

    def peer_authentications(self) -> list[PeerAuthentication]:
        return sorted(self._of("PeerAuthentication"), key=lambda p: (p.namespace, p.name))

    def http_routes(self) -> list[HTTPRoute]:
        """Sorted by namespace/name: the tie-break Gateway API precedence falls back to."""
        return sorted(self._of("HTTPRoute"), key=lambda r: (r.namespace, r.name))

    def virtual_services(self) -> list[VirtualService]:
        return sorted(self._of("VirtualService"), key=lambda v: (v.namespace, v.name))

    def destination_rules(self) -> list[DestinationRule]:
        return sorted(self._of("DestinationRule"), key=lambda d: (d.namespace, d.name))

    def workload(self, uid: str) -> Workload | None:
        return self._objects.get(("Workload", uid))

    def workload_by_ip(self, ip: ipaddress.IPv4Address) -> Workload | None:
        return self._idx.workload_by_ip.get(ip)

    def service_by_vip(self, ip: ipaddress.IPv4Address) -> ServiceInfo | None:
        return self._idx.service_by_vip.get(ip)

    def namespace(self, name: str) -> Namespace | None:
        return self._objects.get(("Namespace", name))

    def workloads_on_node(self, node: str) -> list[Workload]:
        return [w for w in self.workloads() if w.node == node]

"""The Kubernetes kinds the control plane watches, their API paths, and the projection of an
API object onto the fields the config edge reads (pure).

The projection exists because an API server's objects are a superset of what a user writes
for local mode: a Pod from a Deployment carries env `valueFrom`, UDP ports and status the mesh
does not act on, and which the config edge (written for what local mode can run) rejects. In
Kubernetes the kubelet runs containers, so only the mesh-relevant fields are passed on:
  * Pod: metadata, nodeName, service account, container names, status.podIP (dropped once the
    pod has terminated: a Succeeded/Failed pod's IP may already belong to another pod);
  * Service: metadata, selector, type, TCP ports (UDP/SCTP ports are not the mesh's business);
    a headless Service (clusterIP None) is kept without a VIP; a Service with no TCP port at
    all (kube-dns on UDP only, say) is not a mesh Service: `project` returns None;
  * ConfigMap (only those named `istio`; istio-system/istio is the mesh config): its `mesh` key;
  * everything else: apiVersion, kind, metadata (name, namespace, labels, annotations), spec.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.model import CORE_KINDS, ResourceKey

__all__ = ["WatchedKind", "WATCHED", "WAYPOINT_DEPLOYMENTS", "ROOT_CONFIGMAPS", "project", "key_of"]


@dataclass(frozen=True, slots=True)
class WatchedKind:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    namespaced: bool
    field_selector: str = ""
    """Only these objects (`spec.nodeName=n1`: a node agent's pods); "" = all."""
    label_selector: str = ""
    """Only objects with these labels (the Deployments the waypoint controller made); "" = all."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def only_name(self) -> str | None:
        """The one name this watch selects (fieldSelector `metadata.name=X` alone), else None:
        RBAC then authorizes its list and watch by resourceName X."""
        key, sep, name = self.field_selector.partition("=")
        return name if key == "metadata.name" and sep and name and "," not in name else None

    @property
    def path(self) -> str:
        """The collection across all namespaces: GET it to list, with ?watch=1 to watch."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/{self.plural}"


WATCHED: tuple[WatchedKind, ...] = (
    WatchedKind("Namespace", "", "v1", "namespaces", False),
    WatchedKind("Node", "", "v1", "nodes", False),
    WatchedKind("ServiceAccount", "", "v1", "serviceaccounts", True),
    WatchedKind("Pod", "", "v1", "pods", True),
    WatchedKind("Service", "", "v1", "services", True),
    WatchedKind("Gateway", "gateway.networking.k8s.io", "v1", "gateways", True),
    WatchedKind("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes", True),
    WatchedKind("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", True),
    WatchedKind("PeerAuthentication", "security.istio.io", "v1", "peerauthentications", True),
    WatchedKind("VirtualService", "networking.istio.io", "v1", "virtualservices", True),
    WatchedKind("DestinationRule", "networking.istio.io", "v1", "destinationrules", True),
    WatchedKind("Telemetry", "telemetry.istio.io", "v1", "telemetries", True),
    # The mesh config (tracing providers): ConfigMap istio-system/istio, as istiod reads it.
    WatchedKind("ConfigMap", "", "v1", "configmaps", True, field_selector="metadata.name=istio"),
)

WAYPOINT_DEPLOYMENTS = WatchedKind("Deployment", "apps", "v1", "deployments", True,
                                   label_selector="gateway.istio.io/managed=istio.io-mesh-controller")
"""Not for the store: the waypoint controller's own watch of the Deployments it made."""
ROOT_CONFIGMAPS = WatchedKind("ConfigMap", "", "v1", "configmaps", True,
                              field_selector="metadata.name=istio-ca-root-cert")
"""Not for the store: the root publisher's own watch of the root ConfigMap in every namespace."""


def key_of(kind: WatchedKind, obj: Mapping[str, Any]) -> ResourceKey:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or "" if kind.namespaced else ""
    return ResourceKey(kind.kind, ns, meta.get("name") or "")


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if meta.get(k) is not None}


def _pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    out_spec = {k: spec[k] for k in ("nodeName", "serviceAccountName", "serviceAccount") if spec.get(k)}
    out_spec["containers"] = [{"name": c.get("name")} for c in spec.get("containers") or ()]
    out_status = {}
    if status.get("podIP") and status.get("phase") not in ("Succeeded", "Failed"):
        out_status["podIP"] = status["podIP"]
    return {"spec": out_spec, "status": out_status}


def _service(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    spec = obj.get("spec") or {}
    ports = [p for p in spec.get("ports") or () if (p.get("protocol") or "TCP") == "TCP"]
    if not ports:
        return None
    out = {k: spec[k] for k in ("selector", "type") if spec.get(k)}
    if spec.get("clusterIP") not in (None, "", "None"):
        out["clusterIP"] = spec["clusterIP"]
    out["ports"] = [{k: p[k] for k in ("name", "port", "targetPort", "protocol", "appProtocol") if p.get(k) is not None}
                    for p in ports]
    return {"spec": out}


def project(kind: WatchedKind, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The object as the config edge should see it, or None when it is not the mesh's concern."""
    base: dict[str, Any] = {"apiVersion": obj.get("apiVersion") or kind.api_version,
                            "kind": obj.get("kind") or kind.kind, "metadata": _meta(obj)}
    if kind.kind == "Pod":
        body: dict[str, Any] | None = _pod(obj)
    elif kind.kind == "Service":
        body = _service(obj)
    elif kind.kind == "Node":  # a Node's spec carries taints, providerID...: only podCIDR is read
        cidr = (obj.get("spec") or {}).get("podCIDR")
        body = {"spec": {"podCIDR": cidr}} if cidr else {}
    elif kind.kind == "ConfigMap":  # the mesh config: its `mesh` key only
        data = obj.get("data") or {}
        body = {"data": {"mesh": data["mesh"]}} if isinstance(data.get("mesh"), str) else {}
    elif kind.kind in CORE_KINDS:  # Namespace, ServiceAccount: metadata is all the mesh reads
        body = {}
    else:
        body = {"spec": obj["spec"]} if obj.get("spec") is not None else {}
    if body is None:
        return None
    base.update(body)
    return base

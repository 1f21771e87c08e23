"""What an istio-waypoint Gateway deploys in Kubernetes: its ServiceAccount, Deployment and Service (pure).

As istiod's gateway controller (its `waypoint` template): all three are named after the
Gateway, labelled `gateway.networking.k8s.io/gateway-name` (and the older
`istio.io/gateway-name`), and owned by it through an ownerReference, so the cluster's garbage
collector deletes them with the Gateway. The pod template is never captured
(`istio.io/dataplane-mode: none`: the waypoint's own upstream connections must not come back to
it); its container serves HBONE on 15008, metrics on 15020 and readiness on 15021. The Service
selects the pods by the gateway-name label and has Istio's ports: `status-port` 15021 and one
per listener (`mesh` 15008, appProtocol `hbone`).

`plan` decides, from the Gateway and the objects of those names that exist now, which objects
to (server-side) apply: a missing one, or one whose fields differ from the desired ones
(`drifted`: the desired fields must all be present with equal values; what the API server
adds, defaults and status, is ignored). An object of that name the Gateway does not own is
never overwritten: a ServiceAccount the user made stays theirs and is used as it is (as local
mode does), a Deployment or Service is a conflict the Gateway's status reports.
A Gateway being deleted (deletionTimestamp) gets nothing: its dependents are going.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.model import AMBIENT_LABEL
from mesh.model.workload import GATEWAY_NAME_LABEL, WAYPOINT_CLASS

__all__ = ["GatewayInfo", "Listener", "WaypointOptions", "WaypointPlan", "gateway_info", "desired_objects",
           "plan", "drifted", "owned_by", "gateway_class", "GATEWAY_API_VERSION", "MANAGED_LABEL", "MANAGED_VALUE",
           "MESH_CONTROLLER", "ISTIO_GATEWAY_NAME_LABEL", "HBONE_PORT", "STATUS_PORT", "METRICS_PORT"]

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
MESH_CONTROLLER = "istio.io/mesh-controller"
"""The controllerName of the istio-waypoint GatewayClass (and of route status we write)."""
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"  # the controller name with "/" made label-safe, as Istio
ISTIO_GATEWAY_NAME_LABEL = "istio.io/gateway-name"
CLASS_LABEL = "gateway.networking.k8s.io/gateway-class-name"
HBONE_PORT = 15008
STATUS_PORT = 15021
METRICS_PORT = 15020


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayInfo:
    """The fields of a Gateway object the controller reads (converted once from the API's dict)."""

    namespace: str
    name: str
    uid: str
    generation: int
    gateway_class: str
    listeners: tuple[Listener, ...] = ()
    labels: Mapping[str, str] | None = None
    deleting: bool = False

    @property
    def is_waypoint(self) -> bool:
        return self.gateway_class == WAYPOINT_CLASS

    @property
    def hbone_listener(self) -> Listener | None:
        """The `{port: 15008, protocol: HBONE}` listener a waypoint serves, if it has one."""
        return next((x for x in self.listeners if x.port == HBONE_PORT and x.protocol == "HBONE"), None)


def gateway_info(obj: Mapping[str, Any]) -> GatewayInfo:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    listeners = []
    for i, x in enumerate(spec.get("listeners") or ()):
        if isinstance(x, Mapping) and isinstance(x.get("port"), int):
            listeners.append(Listener(str(x.get("name") or f"listener-{i}"), x["port"], str(x.get("protocol") or "")))
    return GatewayInfo(namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
                       uid=str(meta.get("uid") or ""), generation=int(meta.get("generation") or 0),
                       gateway_class=str(spec.get("gatewayClassName") or ""), listeners=tuple(listeners),
                       labels=dict(meta.get("labels") or {}), deleting=bool(meta.get("deletionTimestamp")))


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointOptions:
    image: str = "ambient-mesh:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    trust_domain: str = "cluster.local"
    control_plane: str = "istiod.istio-system.svc:15012"


def _port_name(listener: Listener, i: int) -> str:
    # A Service port name is a DNS label (<= 15 characters, as a container port's); Istio sanitizes the same way.
    name = re.sub(r"[^a-z0-9-]", "-", listener.name.lower()).strip("-")[:15].strip("-")
    return name or f"{listener.protocol.lower() or 'port'}-{i}"


def _owner(gw: GatewayInfo) -> list[dict[str, Any]]:
    return [{"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway", "name": gw.name, "uid": gw.uid}]


def _meta(gw: GatewayInfo, kind_labels: Mapping[str, str] = {}) -> dict[str, Any]:
    labels = {GATEWAY_NAME_LABEL: gw.name, ISTIO_GATEWAY_NAME_LABEL: gw.name, CLASS_LABEL: gw.gateway_class,
              MANAGED_LABEL: MANAGED_VALUE, **kind_labels}
    return {"name": gw.name, "namespace": gw.namespace, "labels": labels, "ownerReferences": _owner(gw)}


def desired_objects(gw: GatewayInfo, o: WaypointOptions) -> list[dict[str, Any]]:
    """[ServiceAccount, Deployment, Service] for a waypoint Gateway, as the API should hold them."""
    selector = {GATEWAY_NAME_LABEL: gw.name}
    pod_labels = {"sidecar.istio.io/inject": "false", AMBIENT_LABEL: "none",
                  "service.istio.io/canonical-name": gw.name, "service.istio.io/canonical-revision": "latest",
                  GATEWAY_NAME_LABEL: gw.name, ISTIO_GATEWAY_NAME_LABEL: gw.name, CLASS_LABEL: gw.gateway_class,
                  MANAGED_LABEL: MANAGED_VALUE}
    container = {
        "name": "istio-proxy", "image": o.image, "imagePullPolicy": o.image_pull_policy,
        "command": ["python3", "-m", "waypoint", "--gateway", f"{gw.namespace}/{gw.name}",
                    "--run-dir", "/var/run/ambient", "--control-plane", o.control_plane,
                    "--ca-token", "/var/run/secrets/tokens/istio-token",
                    "--ca-root", "/var/run/secrets/istio/root-cert.pem", "--trust-domain", o.trust_domain,
                    "--hbone-address", f"0.0.0.0:{HBONE_PORT}", "--metrics-address", f"0.0.0.0:{METRICS_PORT}",
                    "--status-address", f"0.0.0.0:{STATUS_PORT}"],
        "env": [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in (
            ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
            ("INSTANCE_IP", "status.podIP"), ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ("NODE_NAME", "spec.nodeName"))],
        "ports": [{"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
                           "periodSeconds": 15, "failureThreshold": 4},
        "securityContext": {"privileged": False, "runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
                         {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": True},
                         {"name": "run", "mountPath": "/var/run/ambient"}],
    }
    volumes = [
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
        {"name": "run", "emptyDir": {}},
    ]
    ports = [{"name": "status-port", "port": STATUS_PORT, "protocol": "TCP", "appProtocol": "tcp"}]
    seen = {STATUS_PORT}
    for i, x in enumerate(gw.listeners):
        if x.port not in seen:
            seen.add(x.port)
            ports.append({"name": _port_name(x, i), "port": x.port, "protocol": "TCP",
                          "appProtocol": x.protocol.lower() or "tcp"})
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(gw)},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(gw),
         "spec": {"selector": {"matchLabels": selector},
                  "template": {"metadata": {"labels": pod_labels, "annotations": {
                      "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": str(METRICS_PORT),
                      "prometheus.io/scrape": "true"}},
                      "spec": {"serviceAccountName": gw.name, "terminationGracePeriodSeconds": 10,
                               "containers": [container], "volumes": volumes}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(gw),
         "spec": {"type": "ClusterIP", "selector": selector, "ports": ports}},
    ]


def gateway_class() -> dict[str, Any]:
    """The istio-waypoint GatewayClass, as istiod creates it at start (not in the install
    manifests: a custom resource cannot be applied together with its CRD in one kubectl apply)."""
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "GatewayClass",
            "metadata": {"name": WAYPOINT_CLASS, "labels": {"app.kubernetes.io/part-of": "ambient"}},
            "spec": {"controllerName": MESH_CONTROLLER,
                     "description": "The ambient mesh's waypoints: one Deployment per Gateway"}}


def owned_by(obj: Mapping[str, Any], gw: GatewayInfo) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return any(r.get("kind") == "Gateway" and r.get("uid") == gw.uid for r in refs)


def drifted(desired: Any, existing: Any) -> bool:
    """True unless every field of `desired` is in `existing` with an equal value (lists of named
    entries by name, other lists item by item); fields only `existing` has (server defaults,
    status, entries others added) do not count."""
    if isinstance(desired, Mapping):
        if not isinstance(existing, Mapping):
            return True
        return any(k not in existing or drifted(v, existing[k]) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(existing, list):
            return True
        if desired and all(isinstance(d, Mapping) and "name" in d for d in desired):
            # Lists keyed by name (containers, env, ports, volumes) merge by key under server-side
            # apply: an entry someone else added is theirs, not drift.
            have = {e.get("name"): e for e in existing if isinstance(e, Mapping)}
            return any(d["name"] not in have or drifted(d, have[d["name"]]) for d in desired)
        return len(desired) != len(existing) or any(drifted(d, e) for d, e in zip(desired, existing))
    return desired != existing


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointPlan:
    apply: tuple[dict[str, Any], ...] = ()
    """Objects to server-side apply (missing or drifted), in dependency order."""
    conflicts: tuple[str, ...] = ()
    """`Kind/ns/name` that exist but belong to someone else: not touched."""
    user_service_account: bool = False
    """The Gateway's ServiceAccount is the user's own: used as it is."""


def plan(gw: GatewayInfo, existing: Mapping[str, Mapping[str, Any] | None], o: WaypointOptions) -> WaypointPlan:
    """`existing`: kind -> the object named after the Gateway in its namespace, or None."""
    if not gw.is_waypoint or gw.deleting or gw.hbone_listener is None or not gw.uid:
        return WaypointPlan()
    apply, conflicts, user_sa = [], [], False
    for obj in desired_objects(gw, o):
        kind = obj["kind"]
        have = existing.get(kind)
        if have is not None and not owned_by(have, gw):
            if kind == "ServiceAccount":
                user_sa = True
            else:
                conflicts.append(f"{kind}/{gw.namespace}/{gw.name}")
            continue
        if have is None or drifted(obj, have):
            apply.append(obj)
    return WaypointPlan(apply=tuple(apply), conflicts=tuple(conflicts), user_service_account=user_sa)

"""CustomResourceDefinitions for the Istio and Gateway API kinds the mesh reads (pure).

The schemas are permissive on purpose (spec and status preserve unknown fields): the control
plane's config edge is the validator, and reports what it rejects as Events, where Istio's
CRDs would carry OpenAPI/CEL rules that a 1.20 API server cannot enforce anyway. The Gateway
API CRDs are printed only when asked for (`gateway_api=True`): clusters that already have the
upstream ones must keep those, as Istio documents the Gateway API CRDs as a prerequisite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CrdSpec", "ISTIO_CRDS", "GATEWAY_API_CRDS", "crds", "GATEWAY_API_APPROVAL"]

GATEWAY_API_APPROVAL = "https://github.com/kubernetes-sigs/gateway-api/pull/1538"
"""The upstream CRDs' `api-approved.kubernetes.io` value: *.k8s.io groups must carry one."""


@dataclass(frozen=True, slots=True)
class CrdSpec:
    group: str
    kind: str
    plural: str
    versions: tuple[str, ...]  # served; the first is the storage version
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    columns: tuple[tuple[str, str, str], ...] = ()
    """`kubectl get` columns (name, type, jsonPath), as the upstream CRDs print; AGE is added."""


ISTIO_CRDS: tuple[CrdSpec, ...] = (
    CrdSpec("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", ("v1", "v1beta1"), short_names=("ap",)),
    CrdSpec("security.istio.io", "PeerAuthentication", "peerauthentications", ("v1", "v1beta1"), short_names=("pa",)),
    CrdSpec("networking.istio.io", "VirtualService", "virtualservices", ("v1", "v1beta1", "v1alpha3"), short_names=("vs",)),
    CrdSpec("networking.istio.io", "DestinationRule", "destinationrules", ("v1", "v1beta1", "v1alpha3"), short_names=("dr",)),
    CrdSpec("telemetry.istio.io", "Telemetry", "telemetries", ("v1", "v1alpha1"), short_names=("telemetry",)),
)
def _condition(type_: str) -> str:
    return f'.status.conditions[?(@.type=="{type_}")].status'


GATEWAY_API_CRDS: tuple[CrdSpec, ...] = (
    CrdSpec("gateway.networking.k8s.io", "GatewayClass", "gatewayclasses", ("v1", "v1beta1"), namespaced=False,
            short_names=("gc",), columns=(("Controller", "string", ".spec.controllerName"),
                                          ("Accepted", "string", _condition("Accepted")))),
    CrdSpec("gateway.networking.k8s.io", "Gateway", "gateways", ("v1", "v1beta1"), short_names=("gtw",),
            columns=(("Class", "string", ".spec.gatewayClassName"), ("Address", "string", ".status.addresses[*].value"),
                     ("Programmed", "string", _condition("Programmed")))),
    CrdSpec("gateway.networking.k8s.io", "HTTPRoute", "httproutes", ("v1", "v1beta1"),
            columns=(("Hostnames", "string", ".spec.hostnames"),)),
)

_OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _columns(spec: CrdSpec) -> list[dict[str, str]]:
    return [*({"name": n, "type": t, "jsonPath": p} for n, t, p in spec.columns),
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]


def crd(spec: CrdSpec) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{spec.plural}.{spec.group}",
                            "labels": {"app.kubernetes.io/part-of": "ambient"}}
    if spec.group.endswith(".k8s.io"):
        meta["annotations"] = {"api-approved.kubernetes.io": GATEWAY_API_APPROVAL}
    names: dict[str, Any] = {"kind": spec.kind, "listKind": f"{spec.kind}List", "plural": spec.plural,
                             "singular": spec.kind.lower()}
    if spec.short_names:
        names["shortNames"] = list(spec.short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": meta,
        "spec": {
            "group": spec.group, "names": names,
            "scope": "Namespaced" if spec.namespaced else "Cluster",
            "versions": [{"name": v, "served": True, "storage": i == 0, "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                              "spec": dict(_OPEN), "status": dict(_OPEN)}}},
                          **({"additionalPrinterColumns": _columns(spec)} if spec.columns else {})}
                         for i, v in enumerate(spec.versions)],
        },
    }


def crds(*, gateway_api: bool) -> list[dict[str, Any]]:
    return [crd(s) for s in (*ISTIO_CRDS, *(GATEWAY_API_CRDS if gateway_api else ()))]

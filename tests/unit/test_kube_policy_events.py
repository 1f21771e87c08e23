"""Policy problems reported as Events (pure): well-formed objects that do not take effect as written."""
from __future__ import annotations

import yaml
import pytest

from controlplane.kube.policy_events import ProblemReason, problems
from mesh.config import Origin
from mesh.config.convert import convert_located
from mesh.model import ResourceKey


def _load(text: str) -> list:
    out = []
    for doc in yaml.safe_load_all(text):
        loaded, errors = convert_located(doc, Origin(""))
        assert loaded is not None, errors
        out.append(loaded.resource)
    return out


BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Service
metadata: {name: bound, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {selector: {app: b}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: app}
spec: {selector: {app: p}, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: app}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
"""


def _policy(kind: str, name: str) -> str:
    group = "gateway.networking.k8s.io" if kind == "Gateway" else '""'
    return f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: app}}
spec:
  targetRefs: [{{group: {group}, kind: {kind}, name: {name}}}]
  action: DENY
  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]
"""


@pytest.mark.parametrize("extra, want", [
    pytest.param(_policy("Service", "bound"), {}, id="service-with-a-waypoint"),
    pytest.param(_policy("Gateway", "wp"), {}, id="the-waypoint-itself"),
    pytest.param(_policy("Service", "ghost"), {"AuthorizationPolicy/p": ProblemReason.TARGET_NOT_FOUND},
                 id="service-missing"),
    pytest.param(_policy("Gateway", "ghost"), {"AuthorizationPolicy/p": ProblemReason.TARGET_NOT_FOUND},
                 id="gateway-missing"),
    pytest.param(_policy("Gateway", "ingress"), {"AuthorizationPolicy/p": ProblemReason.TARGET_NOT_WAYPOINT},
                 id="not-a-waypoint-gateway"),
    pytest.param(_policy("Service", "plain"), {"AuthorizationPolicy/p": ProblemReason.NO_WAYPOINT},
                 id="service-without-waypoint"),
    pytest.param("""
---
apiVersion: v1
kind: Service
metadata: {name: lost, namespace: app, labels: {istio.io/use-waypoint: ghost}}
spec: {selector: {app: l}, ports: [{port: 80}]}
""", {"Service/lost": ProblemReason.WAYPOINT_NOT_FOUND}, id="use-waypoint-names-a-missing-one"),
    pytest.param("""
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: app}}
""", {}, id="cross-namespace-waypoint-exists"),
    pytest.param("""
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/use-waypoint: wp}}
""", {"Namespace/other": ProblemReason.WAYPOINT_NOT_FOUND}, id="namespace-label-without-waypoint-there"),
])
def test_problems(extra: str, want: dict) -> None:
    got = problems(_load(BASE + extra))
    assert {f"{k.kind}/{k.name}": p.reason for k, p in got.items()} == want
    for p in got.values():
        assert p.message


def test_a_policy_with_a_missing_target_names_it() -> None:
    [p] = problems(_load(BASE + _policy("Service", "ghost"))).values()
    assert "Service app/ghost" in p.message
    assert ResourceKey("AuthorizationPolicy", "app", "p") in problems(_load(BASE + _policy("Service", "ghost")))

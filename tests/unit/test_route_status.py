"""Route status as `ambient status` shows it: Gateway API Accepted / ResolvedRefs per HTTPRoute
parentRef with Istio's reasons, and which Services a VirtualService's hosts and destinations name."""
from __future__ import annotations

import textwrap

import pytest

from controlplane.route_status import Reason, route_status_dict, route_statuses, virtual_service_statuses
from mesh.config import parse_text

BASE = textwrap.dedent("""
    apiVersion: v1
    kind: Namespace
    metadata: {name: shop}
    ---
    apiVersion: v1
    kind: Namespace
    metadata: {name: front}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: reviews, namespace: shop, labels: {istio.io/use-waypoint: wp}}
    spec:
      selector: {app: reviews}
      ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 9080, targetPort: 9080}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: ratings, namespace: shop}
    spec:
      selector: {app: ratings}
      ports: [{port: 80, targetPort: 8080}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: lonely, namespace: shop, labels: {istio.io/use-waypoint: gone}}
    spec:
      selector: {app: lonely}
      ports: [{port: 80, targetPort: 8080}]
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: wp, namespace: shop}
    spec:
      gatewayClassName: istio-waypoint
      listeners: [{name: mesh, port: 15008, protocol: HBONE}]
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: ingress, namespace: shop}
    spec:
      gatewayClassName: istio
      listeners: [{name: http, port: 80, protocol: HTTP}]
    """)


def resources(extra: str):
    return [loaded.resource for loaded in parse_text(BASE + "---\n" + textwrap.dedent(extra), "t.yaml")]


def route(parent: str, backends: str = "[{name: reviews, port: 80}]", ns: str = "shop", filters: str = "") -> str:
    return textwrap.dedent(f"""
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {{name: r, namespace: {ns}}}
        spec:
          parentRefs: [{parent}]
          rules:
          - backendRefs: {backends}
        """) + textwrap.indent(filters, "    ")


SVC = '{group: "", kind: Service, name: reviews}'

# (route YAML, Accepted (status, reason, message fragment), ResolvedRefs (status, reason, fragment))
CASES = [
    pytest.param(route(SVC), (True, Reason.ACCEPTED, "served by waypoint shop/wp"),
                 (True, Reason.RESOLVED_REFS, "all backendRefs resolved"), id="producer-route"),
    pytest.param(route('{group: "", kind: Service, name: reviews, port: 9080}', "[{name: reviews, port: 9080}]"),
                 (True, Reason.ACCEPTED, "port 9080"), (True, Reason.RESOLVED_REFS, ""), id="port-scoped"),
    pytest.param(route('{group: "", kind: Service, name: reviews, namespace: shop}',
                       "[{name: reviews, namespace: shop, port: 80}]", ns="front"),
                 (True, Reason.ACCEPTED, "attached to Service shop/reviews"),
                 (True, Reason.RESOLVED_REFS, ""), id="consumer-route-no-grant-needed"),
    pytest.param(route('{group: "", kind: Service, name: nosuch}'),
                 (False, Reason.NO_MATCHING_PARENT, "parent Service shop/nosuch not found"),
                 (True, Reason.RESOLVED_REFS, ""), id="parent-service-missing"),
    pytest.param(route('{group: "", kind: Service, name: reviews, port: 81}'),
                 (False, Reason.NO_MATCHING_PARENT, "has no port 81 (ports 80, 9080)"),
                 (True, Reason.RESOLVED_REFS, ""), id="parent-port-missing"),
    pytest.param(route('{group: "", kind: Service, name: ratings}', "[{name: ratings, port: 80}]"),
                 (True, Reason.ACCEPTED, "uses no waypoint, so the route has no effect"),
                 (True, Reason.RESOLVED_REFS, ""), id="service-without-waypoint"),
    pytest.param(route('{group: "", kind: Service, name: lonely}', "[{name: lonely, port: 80}]"),
                 (True, Reason.ACCEPTED, "waypoint shop/gone does not exist"),
                 (True, Reason.RESOLVED_REFS, ""), id="service-with-missing-waypoint"),
    pytest.param(route("{name: wp}"), (False, Reason.NOT_ALLOWED_BY_LISTENERS, "attach the route to the Service"),
                 (True, Reason.RESOLVED_REFS, ""), id="waypoint-gateway-parent"),
    pytest.param(route("{name: ingress}"), (False, Reason.NO_MATCHING_PARENT, "class 'istio'"),
                 (True, Reason.RESOLVED_REFS, ""), id="other-gateway-parent"),
    pytest.param(route("{name: nogw}"), (False, Reason.NO_MATCHING_PARENT, "parent Gateway shop/nogw not found"),
                 (True, Reason.RESOLVED_REFS, ""), id="gateway-missing"),
    pytest.param(route(SVC, "[{name: nosuch, port: 80}]"), (True, Reason.ACCEPTED, ""),
                 (False, Reason.BACKEND_NOT_FOUND, "backendRef shop/nosuch: Service not found"), id="backend-missing"),
    pytest.param(route(SVC, "[{name: reviews, port: 81}]"), (True, Reason.ACCEPTED, ""),
                 (False, Reason.BACKEND_NOT_FOUND, "Service has no port 81"), id="backend-port-missing"),
    pytest.param(route(SVC, "[{group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews, port: 80}]"),
                 (True, Reason.ACCEPTED, ""),
                 (False, Reason.INVALID_KIND, "kind multicluster.x-k8s.io/ServiceImport is not supported"),
                 id="backend-invalid-kind"),
    pytest.param(route("{name: wp}", "[{name: reviews, namespace: front, port: 80}]"),
                 (False, Reason.NOT_ALLOWED_BY_LISTENERS, ""),
                 (False, Reason.REF_NOT_PERMITTED, "missing a ReferenceGrant?"), id="gateway-parent-cross-ns-backend"),
    pytest.param(route(SVC, filters="filters:\n- type: RequestMirror\n  requestMirror: "
                                    "{backendRef: {name: shadow, port: 80}}\n"),
                 (True, Reason.ACCEPTED, ""),
                 (False, Reason.BACKEND_NOT_FOUND, "backendRef shop/shadow: Service not found"),
                 id="mirror-backend-missing"),
    pytest.param(route(SVC, "[{name: nosuch, port: 80}, {kind: Widget, group: example.com, name: w}]"),
                 (True, Reason.ACCEPTED, ""),
                 (False, Reason.BACKEND_NOT_FOUND, "shop/nosuch: Service not found; backendRef shop/w: kind "
                  "example.com/Widget"), id="first-failure-is-the-reason-all-in-message"),
]


@pytest.mark.parametrize("text, accepted, resolved", CASES)
def test_http_route_conditions(text, accepted, resolved):
    [st] = route_statuses(resources(text))
    [parent] = st.parents
    for cond, (status, reason, fragment) in ((parent.accepted, accepted), (parent.resolved_refs, resolved)):
        assert (cond.status, cond.reason) == (status, reason), cond
        assert fragment in cond.message, cond


def test_each_parent_ref_gets_its_own_conditions():
    [st] = route_statuses(resources(route(f'{SVC}, {{group: "", kind: Service, name: gone}}, {{name: wp}}')))
    assert st.route == "shop/r"
    assert [(p.parent, p.accepted.reason) for p in st.parents] == [
        ("Service shop/reviews", Reason.ACCEPTED), ("Service shop/gone", Reason.NO_MATCHING_PARENT),
        ("Gateway shop/wp", Reason.NOT_ALLOWED_BY_LISTENERS)]


def test_a_non_service_backend_kind_is_accepted_with_a_warning_naming_it():
    loaded = parse_text(route(SVC, "[{group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews}]"), "t.yaml")
    [w] = loaded[0].warnings
    assert (w.field, w.reason) == ("spec.rules[0].backendRefs[0].kind", "not_enforced")
    assert "multicluster.x-k8s.io/ServiceImport backends are not supported" in w.message


VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: %s
  http:
  - mirror: {host: shadow}
    route:
    - {destination: {host: reviews}, weight: 50}
    - {destination: {host: ratings.shop.svc.cluster.local}, weight: 30}
    - {destination: {host: nowhere}, weight: 20}
"""


@pytest.mark.parametrize("hosts, expected", [
    ("[reviews]", {"reviews": ["shop/reviews"]}),
    ("[reviews.shop.svc.cluster.local, ratings.shop]", {"reviews.shop.svc.cluster.local": ["shop/reviews"],
                                                        "ratings.shop": ["shop/ratings"]}),
    ("['*.shop.svc.cluster.local']", {"*.shop.svc.cluster.local": ["shop/lonely", "shop/ratings", "shop/reviews"]}),
    ("[payments.example.com]", {"payments.example.com": []}),
])
def test_virtual_service_hosts_and_destinations_resolve_or_not(hosts, expected):
    [st] = virtual_service_statuses(resources(VS % hosts))
    assert {h.host: list(h.services) for h in st.hosts} == expected
    assert {h.host: list(h.services) for h in st.destinations} == {
        "reviews": ["shop/reviews"], "ratings.shop.svc.cluster.local": ["shop/ratings"], "nowhere": [],
        "shadow": []}
    assert not st.resolved


def test_status_dict_is_json_shaped():
    d = route_status_dict(resources(route(SVC) + "---\n" + VS % "[reviews]"))
    assert d["http_routes"] == [{"route": "shop/r", "parents": [{"parent": "Service shop/reviews", "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted",
         "message": "attached to Service shop/reviews; served by waypoint shop/wp"},
        {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "all backendRefs resolved"},
    ]}]}]
    [vs] = d["virtual_services"]
    assert vs["virtual_service"] == "shop/vs" and vs["resolved"] is False and vs["hosts"] == {"reviews": ["shop/reviews"]}

"""Route selection tables: Gateway API HTTPRoute precedence (conformance semantics of
HTTPRoutePathMatchOrder, HTTPRouteMatchingAcrossRoutes, HTTPRouteHeaderMatching,
HTTPRouteMethodMatching, HTTPRouteExactPathMatching, MeshHTTPRouteQueryParamMatching) and
VirtualService first-match order."""
from __future__ import annotations

import pytest

from mesh.config import load_text
from mesh.model import ObjectMeta
from mesh.model.route import (HeaderMatch, HTTPRoute, HTTPRouteMatch, HTTPRouteRule, ParentRef,
                              PathMatch, PathMatchType, QueryParamMatch, ValueMatchType)
from waypoint.routing import (RequestInfo, bound_routes, bound_virtual_services, find_route,
                              find_vs_route)

EXACT, PREFIX, REGEX = PathMatchType.EXACT, PathMatchType.PREFIX, PathMatchType.REGEX


def m(path: str = "/", kind: PathMatchType = PREFIX, method: str | None = None,
      headers: dict[str, str] | None = None, query: dict[str, str] | None = None,
      regex_headers: bool = False) -> HTTPRouteMatch:
    vt = ValueMatchType.REGEX if regex_headers else ValueMatchType.EXACT
    return HTTPRouteMatch(path=PathMatch(type=kind, value=path), method=method,
                          headers=tuple(HeaderMatch(name=k, value=v, type=vt) for k, v in (headers or {}).items()),
                          query_params=tuple(QueryParamMatch(name=k, value=v) for k, v in (query or {}).items()))


def rule(name: str, *matches: HTTPRouteMatch) -> HTTPRouteRule:
    return HTTPRouteRule(name=name, matches=matches or (HTTPRouteMatch(),))


def route(name: str, *rules: HTTPRouteRule, ns: str = "demo", port: int | None = None) -> HTTPRoute:
    return HTTPRoute(meta=ObjectMeta(name=name, namespace=ns), rules=rules, parent_refs=(
        ParentRef(group="", kind="Service", namespace="demo", name="echo", port=port),))


# Rules deliberately out of precedence order (HTTPRoutePathMatchOrder).
ORDER = [route("paths",
               rule("slash", m("/")),
               rule("match", m("/match")),
               rule("match-prefix", m("/match/prefix")),
               rule("match-exact", m("/match/exact", EXACT)),
               rule("match-prefix-one", m("/match/prefix/one/")),
               rule("match-exact-one", m("/match/exact/one", EXACT)),
               rule("post", m("/match", method="POST")),
               rule("hdr1", m("/match", headers={"version": "one"})),
               rule("hdr2", m("/match", headers={"version": "two", "color": "red"})),
               rule("query", m("/match", query={"animal": "whale"})),
               rule("hdr-query", m("/match", headers={"version": "one"}, query={"animal": "whale"})),
               rule("exact-get", m("/match/exact", EXACT, method="GET")))]

# Several routes (HTTPRouteMatchingAcrossRoutes), regex, ORed matches, ties.
ACROSS = [
    route("b1",
          rule("regex", m("/v[0-9]+/items", REGEX)),
          rule("multi", m("/one", EXACT), m("/two", EXACT)),
          rule("dup", m("/one", EXACT)),
          rule("shared", m("/shared")),
          rule("user", m("/users", headers={"x-user": "bob|alice"}, regex_headers=True)),
          rule("method-only", m(method="DELETE"))),
    route("b0", rule("shared", m("/shared"))),
    route("b2", rule("deeper", m("/shared/deeper"))),
    route("z-other", rule("shared", m("/shared")), ns="alpha"),
    route("c", rule("longer-regex", m("/v[0-9]+/items/[a-z]+", REGEX))),
]


def req(target: str, method: str = "GET", **headers: str) -> RequestInfo:
    return RequestInfo.from_target(method, target, [(k.replace("_", "-"), v) for k, v in headers.items()],
                                   host="echo", port=80)


CASES = [
    # -- path precedence: exact > longest prefix, element-wise prefixes
    ("root", ORDER, req("/"), "paths/slash"),
    ("unknown path falls to /", ORDER, req("/unknown"), "paths/slash"),
    ("prefix itself", ORDER, req("/match"), "paths/match"),
    ("prefix with trailing slash", ORDER, req("/match/"), "paths/match"),
    ("prefix is element-wise", ORDER, req("/matchx"), "paths/slash"),
    ("longer prefix wins", ORDER, req("/match/prefix"), "paths/match-prefix"),
    ("longest prefix wins", ORDER, req("/match/prefix/one"), "paths/match-prefix-one"),
    ("trailing-slash prefix value", ORDER, req("/match/prefix/one/x"), "paths/match-prefix-one"),
    ("not element boundary", ORDER, req("/match/prefix/onex"), "paths/match-prefix"),
    ("exact beats prefix; then method", ORDER, req("/match/exact"), "paths/exact-get"),
    ("exact without method", ORDER, req("/match/exact", "POST"), "paths/match-exact"),
    ("exact needs equality", ORDER, req("/match/exact/"), "paths/match"),
    ("exact over longer prefix", ORDER, req("/match/exact/one"), "paths/match-exact-one"),
    ("query string not in path", ORDER, req("/match/exact/one?x=1"), "paths/match-exact-one"),
    # -- method > header count > query count
    ("method beats headers", ORDER, req("/match", "POST", version="one"), "paths/post"),
    ("one header", ORDER, req("/match", version="one"), "paths/hdr1"),
    ("two headers", ORDER, req("/match", version="two", color="red"), "paths/hdr2"),
    ("headers are ANDed", ORDER, req("/match", version="two"), "paths/match"),
    ("header names case-insensitive", ORDER, req("/match", Version="one"), "paths/hdr1"),
    ("header values case-sensitive", ORDER, req("/match", version="ONE"), "paths/match"),
    ("query param", ORDER, req("/match?animal=whale"), "paths/query"),
    ("header count before query count", ORDER, req("/match?animal=whale", version="two", color="red"),
     "paths/hdr2"),
    ("header+query beats header", ORDER, req("/match?animal=whale", version="one"), "paths/hdr-query"),
    ("query names case-sensitive", ORDER, req("/match?Animal=whale"), "paths/match"),
    ("repeated query: first value", ORDER, req("/match?animal=dolphin&animal=whale"), "paths/match"),
    ("query value decoded", ORDER, req("/match?animal=wh%61le"), "paths/query"),
    # -- regex, ORed matches, rule order, ties across routes
    ("regex full match", ACROSS, req("/v1/items"), "b1/regex"),
    ("regex is a full match", ACROSS, req("/v1/items/extra/x"), None),
    ("longer regex wins among regexes", ACROSS, req("/v12/items/abc"), "c/longer-regex"),
    ("first of ORed matches", ACROSS, req("/one"), "b1/multi"),
    ("second of ORed matches", ACROSS, req("/two"), "b1/multi"),
    ("same match later rule loses", ACROSS, req("/one", "POST"), "b1/multi"),
    ("tie: namespace/name order", ACROSS, req("/shared/x"), "z-other/shared"),
    ("longer prefix beats route order", ACROSS, req("/shared/deeper/x"), "b2/deeper"),
    ("regex header value", ACROSS, req("/users", x_user="alice"), "b1/user"),
    ("regex header is a full match", ACROSS, req("/users", x_user="alicex"), None),
    ("missing header never matches", ACROSS, req("/users"), None),
    ("method-only match (default path /)", ACROSS, req("/anything", "DELETE"), "b1/method-only"),
    ("no match: None (404)", ACROSS, req("/nothing"), None),
    ("no routes: None", [], req("/"), None),
    ("default rule matches all", [route("d", HTTPRouteRule(name="all"))], req("/x/y?z"), "d/all"),
]


@pytest.mark.parametrize("name, routes, request_, expected", CASES, ids=[c[0] for c in CASES])
def test_find_route_precedence(name, routes, request_, expected):
    got = find_route(routes, request_)
    assert (None if got is None else f"{got.route.name}/{got.rule.name}") == expected
    if got is not None:
        assert got.rule is got.route.rules[got.rule_index]
        assert got.match is got.rule.matches[got.match_index]


def test_route_order_does_not_depend_on_input_order():
    for routes in (ACROSS, list(reversed(ACROSS))):
        assert find_route(routes, req("/shared")).route.name == "z-other"


def test_header_repeated_values_are_joined():
    r = [route("r", rule("both", m(headers={"x-a": "1,2"})))]
    got = find_route(r, RequestInfo(method="GET", path="/", headers=(("x-a", "1"), ("x-a", "2"))))
    assert got is not None and got.rule.name == "both"


def test_routes_from_yaml():
    [r] = load_text("""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: yaml, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - name: v2
    matches: [{headers: [{name: X-Version, value: v2}]}]
  - name: rest
""", "r.yaml")
    assert find_route([r], req("/", X_Version="v2")).rule.name == "v2"
    assert find_route([r], req("/")).rule.name == "rest"


# --- binding -------------------------------------------------------------------------------

def _named(routes):
    return [f"{r.namespace}/{r.name}" for r in routes]


BIND = [route("any-port"), route("port-80", port=80), route("port-81", port=81),
        route("consumer", ns="client-ns"),
        HTTPRoute(meta=ObjectMeta(name="other-svc", namespace="demo"), parent_refs=(
            ParentRef(group="", kind="Service", namespace="demo", name="other"),)),
        HTTPRoute(meta=ObjectMeta(name="gw", namespace="demo"), parent_refs=(
            ParentRef(namespace="demo", name="echo"),))]  # a Gateway named echo, not the Service


@pytest.mark.parametrize("port, client, expected", [
    (80, None, ["demo/any-port", "demo/port-80"]),
    (81, "demo", ["demo/any-port", "demo/port-81"]),
    (82, "elsewhere", ["demo/any-port"]),
    (80, "client-ns", ["client-ns/consumer"]),
])
def test_bound_routes_by_service_port_and_consumer(port, client, expected):
    got = bound_routes(BIND, service_namespace="demo", service_name="echo", port=port,
                       client_namespace=client)
    assert _named(got) == expected


# --- VirtualService ------------------------------------------------------------------------

VS_YAML = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-echo, namespace: demo}
spec:
  hosts: [echo]
  http:
  - name: exact
    match: [{uri: {exact: /login}, method: {exact: POST}}]
    route: [{destination: {host: echo, subset: auth}}]
  - name: v2-or-header
    match:
    - uri: {prefix: /v2}
    - headers: {x-version: {exact: v2}}
    route: [{destination: {host: echo, subset: v2}}]
  - name: case
    match: [{uri: {prefix: /CaseY}, ignoreUriCase: true}]
    route: [{destination: {host: echo, subset: case}}]
  - name: regex-query
    match: [{uri: {regex: "/items/[0-9]+"}, queryParams: {debug: {exact: "1"}}}]
    route: [{destination: {host: echo, subset: debug}}]
  - name: presence
    match: [{headers: {x-trace: {prefix: ""}}, port: 8080}]
    route: [{destination: {host: echo, subset: traced}}]
  - name: fallback
    route: [{destination: {host: echo, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-echo, namespace: demo}
spec:
  hosts: [echo.demo.svc.cluster.local]
  http:
  - name: first-service
    match: [{uri: {prefix: /a-first}}]
    route: [{destination: {host: echo, subset: a}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other, namespace: demo}
spec:
  hosts: [other]
  http:
  - route: [{destination: {host: other}}]
"""
VSS = load_text(VS_YAML, "vs.yaml")
BOUND_VS = bound_virtual_services(VSS, service_namespace="demo", service_name="echo")


def vreq(target, method="GET", port=80, **headers):
    return RequestInfo.from_target(method, target, [(k.replace("_", "-"), v) for k, v in headers.items()],
                                   host="echo", port=port)


@pytest.mark.parametrize("request_, expected", [
    (vreq("/login", "POST"), "b-echo/exact"),
    (vreq("/login"), "b-echo/fallback"),
    (vreq("/v2/x"), "b-echo/v2-or-header"),
    (vreq("/v2x"), "b-echo/v2-or-header"),  # Istio prefixes are plain string prefixes
    (vreq("/", x_version="v2"), "b-echo/v2-or-header"),
    (vreq("/casey/x"), "b-echo/case"),
    (vreq("/items/42?debug=1"), "b-echo/regex-query"),
    (vreq("/items/42"), "b-echo/fallback"),
    (vreq("/items/42x?debug=1"), "b-echo/fallback"),
    (vreq("/t", port=8080, x_trace=""), "b-echo/presence"),
    (vreq("/t", port=80, x_trace="1"), "b-echo/fallback"),
    (vreq("/a-first"), "a-echo/first-service"),
], ids=lambda x: x.path if isinstance(x, RequestInfo) else x)
def test_find_vs_route_first_match_wins(request_, expected):
    got = find_vs_route(BOUND_VS, request_)
    assert f"{got.virtual_service.name}/{got.route.name}" == expected
    assert got.route is got.virtual_service.http[got.route_index]


def test_vs_binding_and_no_match():
    assert [v.name for v in BOUND_VS] == ["a-echo", "b-echo"]
    strict = [v for v in VSS if v.name == "a-echo"]
    assert find_vs_route(strict, vreq("/elsewhere")) is None
    assert bound_virtual_services(VSS, service_namespace="prod", service_name="echo") == []

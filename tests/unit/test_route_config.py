"""HTTPRoute / VirtualService / DestinationRule YAML -> typed route model, and bad input by
reason, object, field and line."""
from __future__ import annotations

import textwrap

import pytest

from mesh.config import REASONS, ConfigError, ConfigErrors, load_text
from mesh.config.route import parse_gep2257, parse_go_duration
from mesh.distribution.protocol import Snapshot
from controlplane.translate import translate
from mesh.model import FrozenMap, ObjectMeta
from mesh.model.route import (BackendRef, ConnectionPool, DestinationRule, HeaderMatch,
                              HeaderModifier, HTTPFilters, HTTPRoute, HTTPRouteMatch,
                              HTTPRouteRetry, HTTPRouteRule, HTTPRouteTimeouts, HTTPSettings,
                              IstioStringMatch, LoadBalancer, OutlierDetection, ParentRef,
                              PathMatch, PathMatchType, PathModifier, PathModifierType,
                              QueryParamMatch, RequestMirror, RequestRedirect, StringMatchType,
                              Subset, TCPSettings, TrafficPolicy, URLRewrite, ValueMatchType,
                              VirtualService, VSDestination, VSFault, VSFaultAbort, VSFaultDelay,
                              VSHeaders, VSHTTPRoute, VSMatch, VSRetries, VSRewrite,
                              VSRouteDestination)
from mesh.state import ProxyState

SRC = "routes.yaml"
GW = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\n"
VSH = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: demo}\n"
DRH = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: demo}\n"
META = ObjectMeta(name="r", namespace="demo")
SVC = ParentRef(group="", kind="Service", namespace="demo", name="echo", port=None)


def y(header: str, body: str) -> str:
    return header + textwrap.dedent(body).lstrip("\n")


def load_one(text: str):
    [obj] = load_text(text, SRC)
    return obj


# --- valid --------------------------------------------------------------------------------

VALID = [
    pytest.param(y(GW, """
        spec:
          parentRefs: [{group: "", kind: Service, name: echo}]
        """), HTTPRoute(meta=META, parent_refs=(SVC,)), id="defaults-one-rule-prefix-slash"),
    pytest.param(y(GW.replace("/v1\n", "/v1beta1\n"), """
        spec:
          parentRefs:
          - {group: "", kind: Service, name: echo, namespace: other, port: 8080}
          - {name: waypoint, sectionName: mesh}
          hostnames: [echo.demo.svc.cluster.local, "*.example.com"]
          rules:
          - name: canary
            matches:
            - path: {type: Exact, value: /api}
              headers:
              - {name: X-Canary, value: "true"}
              - {type: RegularExpression, name: x-user, value: "bob|alice"}
              queryParams: [{name: Debug, value: ""}]
              method: POST
            - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
            backendRefs:
            - {name: echo-v1, port: 80, weight: 90}
            - {name: echo-v2, namespace: canary, port: 80, weight: 0}
            - {name: echo-v3, port: 80}
            timeouts: {request: 1h30m, backendRequest: 500ms}
            retry: {codes: [500, 503], attempts: 3, backoff: 100ms}
        """), HTTPRoute(
            meta=META,
            parent_refs=(ParentRef(group="", kind="Service", namespace="other", name="echo", port=8080),
                         ParentRef(namespace="demo", name="waypoint", section_name="mesh")),
            hostnames=("echo.demo.svc.cluster.local", "*.example.com"),
            rules=(HTTPRouteRule(
                name="canary",
                matches=(HTTPRouteMatch(
                    path=PathMatch(type=PathMatchType.EXACT, value="/api"),
                    headers=(HeaderMatch(name="x-canary", value="true"),
                             HeaderMatch(name="x-user", value="bob|alice", type=ValueMatchType.REGEX)),
                    query_params=(QueryParamMatch(name="Debug", value=""),), method="POST"),
                    HTTPRouteMatch(path=PathMatch(type=PathMatchType.REGEX, value="/v[0-9]+/.*"))),
                backend_refs=(BackendRef(name="echo-v1", namespace="demo", port=80, weight=90),
                              BackendRef(name="echo-v2", namespace="canary", port=80, weight=0),
                              BackendRef(name="echo-v3", namespace="demo", port=80, weight=1)),
                timeouts=HTTPRouteTimeouts(request=5400.0, backend_request=0.5),
                retry=HTTPRouteRetry(codes=(500, 503), attempts=3, backoff=0.1)),)),
        id="httproute-full-match-backends-timeouts-retry"),
    pytest.param(y(GW, """
        spec:
          rules:
          - matches: [{path: {type: PathPrefix, value: /old}}]
            filters:
            - type: RequestHeaderModifier
              requestHeaderModifier:
                set: [{name: X-Set, value: a}]
                add: [{name: X-Add, value: b}]
                remove: [X-Gone]
            - type: ResponseHeaderModifier
              responseHeaderModifier: {add: [{name: x-served-by, value: waypoint}]}
            - type: RequestMirror
              requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}
            - type: RequestMirror
              requestMirror: {backendRef: {name: shadow2, port: 80}, fraction: {numerator: 1, denominator: 8}}
            - type: URLRewrite
              urlRewrite: {hostname: new.example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
            backendRefs:
            - name: echo
              port: 80
              filters:
              - type: RequestHeaderModifier
                requestHeaderModifier: {set: [{name: x-backend, value: echo}]}
            timeouts: {request: 0s}
        """), HTTPRoute(meta=META, rules=(HTTPRouteRule(
            matches=(HTTPRouteMatch(path=PathMatch(value="/old")),),
            filters=HTTPFilters(
                request_headers=HeaderModifier(set=(("x-set", "a"),), add=(("x-add", "b"),),
                                               remove=("x-gone",)),
                response_headers=HeaderModifier(add=(("x-served-by", "waypoint"),)),
                mirrors=(RequestMirror(backend=BackendRef(name="shadow", namespace="demo", port=80),
                                       percent=25.0),
                         RequestMirror(backend=BackendRef(name="shadow2", namespace="demo", port=80),
                                       percent=12.5)),
                rewrite=URLRewrite(hostname="new.example.com", path=PathModifier(
                    type=PathModifierType.REPLACE_PREFIX_MATCH, value="/new"))),
            backend_refs=(BackendRef(name="echo", namespace="demo", port=80, filters=HTTPFilters(
                request_headers=HeaderModifier(set=(("x-backend", "echo"),)))),),
            timeouts=HTTPRouteTimeouts(request=0.0)),)), id="httproute-filters-rewrite-mirrors"),
    pytest.param(y(GW, """
        spec:
          rules:
          - filters:
            - type: RequestRedirect
              requestRedirect: {scheme: https, port: 443, statusCode: 301,
                                path: {type: ReplaceFullPath, replaceFullPath: /moved}}
        """), HTTPRoute(meta=META, rules=(HTTPRouteRule(filters=HTTPFilters(
            redirect=RequestRedirect(scheme="https", port=443, status_code=301, path=PathModifier(
                type=PathModifierType.REPLACE_FULL_PATH, value="/moved")))),)),
        id="httproute-redirect"),
    pytest.param(y(VSH, """
        spec:
          hosts: [echo]
          http:
          - name: v2
            match:
            - uri: {prefix: /v2}
              headers: {X-User: {exact: bob}}
              queryParams: {debug: {regex: "1|true"}}
              method: {exact: GET}
              ignoreUriCase: true
            - port: 8080
            route: [{destination: {host: echo, subset: v2, port: {number: 80}}}]
            timeout: 0.5s
            retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx, connect-failure"}
            fault:
              delay: {fixedDelay: 1m30s, percentage: {value: 10.5}}
              abort: {httpStatus: 503, percentage: {value: 1}}
            mirror: {host: shadow}
            mirrorPercentage: {value: 5}
            headers:
              request: {set: {X-A: "1"}, remove: [x-b]}
              response: {add: {x-c: c}}
            rewrite: {uri: /}
          - route:
            - {destination: {host: echo, subset: v1}, weight: 75}
            - {destination: {host: echo, subset: v2}, weight: 25}
        """), VirtualService(meta=ObjectMeta(name="vs", namespace="demo"), hosts=("echo",), http=(
            VSHTTPRoute(
                name="v2",
                match=(VSMatch(uri=IstioStringMatch(type=StringMatchType.PREFIX, value="/v2"),
                               headers=(("x-user", IstioStringMatch(type=StringMatchType.EXACT, value="bob")),),
                               query_params=(("debug", IstioStringMatch(type=StringMatchType.REGEX,
                                                                        value="1|true")),),
                               method=IstioStringMatch(type=StringMatchType.EXACT, value="GET"),
                               ignore_uri_case=True),
                       VSMatch(port=8080)),
                route=(VSRouteDestination(destination=VSDestination(host="echo", subset="v2", port=80),
                                          weight=100),),
                timeout=0.5, retries=VSRetries(attempts=3, per_try_timeout=2.0,
                                               retry_on=("5xx", "connect-failure")),
                fault=VSFault(delay=VSFaultDelay(fixed_delay=90.0, percentage=10.5),
                              abort=VSFaultAbort(http_status=503, percentage=1.0)),
                mirror=VSDestination(host="shadow"), mirror_percentage=5.0,
                headers=VSHeaders(request=HeaderModifier(set=(("x-a", "1"),), remove=("x-b",)),
                                  response=HeaderModifier(add=(("x-c", "c"),))),
                rewrite=VSRewrite(uri="/")),
            VSHTTPRoute(route=(
                VSRouteDestination(destination=VSDestination(host="echo", subset="v1"), weight=75),
                VSRouteDestination(destination=VSDestination(host="echo", subset="v2"), weight=25))))),
        id="virtualservice-full"),
    pytest.param(y(DRH, """
        spec:
          host: echo.demo.svc.cluster.local
          trafficPolicy:
            connectionPool:
              tcp: {maxConnections: 100, connectTimeout: 30ms}
              http: {http1MaxPendingRequests: 10, http2MaxRequests: 100, maxRequestsPerConnection: 1,
                     maxRetries: 3, idleTimeout: 1h}
            outlierDetection: {consecutive5xxErrors: 7, consecutiveGatewayErrors: 3, interval: 5m,
                               baseEjectionTime: 15m, maxEjectionPercent: 50, minHealthPercent: 10}
            loadBalancer: {simple: LEAST_REQUEST}
          subsets:
          - {name: v1, labels: {version: v1}}
          - name: v2
            labels: {version: v2}
            trafficPolicy: {loadBalancer: {simple: RANDOM}}
        """), DestinationRule(
            meta=ObjectMeta(name="dr", namespace="demo"), host="echo.demo.svc.cluster.local",
            traffic_policy=TrafficPolicy(
                connection_pool=ConnectionPool(
                    tcp=TCPSettings(max_connections=100, connect_timeout=0.03),
                    http=HTTPSettings(http1_max_pending_requests=10, http2_max_requests=100,
                                      max_requests_per_connection=1, max_retries=3, idle_timeout=3600.0)),
                outlier_detection=OutlierDetection(consecutive_5xx_errors=7, consecutive_gateway_errors=3,
                                                   interval=300.0, base_ejection_time=900.0,
                                                   max_ejection_percent=50, min_health_percent=10),
                load_balancer=LoadBalancer.LEAST_REQUEST),
            subsets=(Subset(name="v1", labels=FrozenMap({"version": "v1"})),
                     Subset(name="v2", labels=FrozenMap({"version": "v2"}),
                            traffic_policy=TrafficPolicy(load_balancer=LoadBalancer.RANDOM)))),
        id="destinationrule-full"),
]


@pytest.mark.parametrize("text, expected", VALID)
def test_valid_yaml_converts_to_typed_objects(text, expected):
    got = load_one(text)
    assert type(got) is type(expected)
    assert got == expected


# --- bad ----------------------------------------------------------------------------------

def R(body: str) -> str:
    return y(GW, body)


BAD = [
    # (text, reason, field, line, fragment)
    pytest.param(R("spec:\n  rulez: []\n"), "unknown_field", "spec.rulez", 5, "unknown field",
                 id="unknown-spec-field"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{path: {type: Prefix, value: /a}}]\n"), "bad_value",
                 "spec.rules[0].matches[0].path.type", 6, "must be Exact, PathPrefix or RegularExpression",
                 id="bad-path-type"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{path: {value: api}}]\n"), "bad_value",
                 "spec.rules[0].matches[0].path.value", 6, "starting with '/'", id="relative-path"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{path: {value: /a//b}}]\n"), "bad_value",
                 "spec.rules[0].matches[0].path.value", 6, 'must not contain "//"', id="path-double-slash"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{path: {type: RegularExpression, value: '/a(['}}]\n"),
                 "bad_value", "spec.rules[0].matches[0].path.value", 6, "not a valid regular expression",
                 id="bad-regex"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{headers: [{name: x-a, value: '1'}, {name: X-A, value: '2'}]}]\n"),
                 "duplicate", "spec.rules[0].matches[0].headers[1].name", 6, 'duplicate header "x-a"',
                 id="duplicate-header-match"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{headers: [{name: x-a, value: 1}]}]\n"), "bad_value",
                 "spec.rules[0].matches[0].headers[0].value", 6, "quote it", id="header-value-number"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{method: get}]\n"), "bad_value",
                 "spec.rules[0].matches[0].method", 6, "must be one of", id="lowercase-method"),
    pytest.param(R("spec:\n  rules:\n  - backendRefs: [{name: a, port: 80, weight: 1000001}]\n"), "bad_value",
                 "spec.rules[0].backendRefs[0].weight", 6, "between 0 and 1000000", id="weight-too-big"),
    pytest.param(R("spec:\n  rules:\n  - backendRefs: [{name: a, port: 80, weight: -1}]\n"), "bad_value",
                 "spec.rules[0].backendRefs[0].weight", 6, "between 0 and 1000000", id="weight-negative"),
    pytest.param(R("spec:\n  rules:\n  - backendRefs: [{name: a}]\n"), "missing_field",
                 "spec.rules[0].backendRefs[0].port", 6, "required for a Service backend", id="backend-no-port"),
    pytest.param(R("spec:\n  parentRefs: [{kind: Service, name: echo}]\n"), "unsupported",
                 "spec.parentRefs[0].kind", 5, "gateway.networking.k8s.io/Service is not supported",
                 id="parent-service-without-core-group"),
    pytest.param(R("spec:\n  rules:\n  - timeouts: {request: 10}\n"), "bad_value",
                 "spec.rules[0].timeouts.request", 6, "must be a string", id="timeout-number"),
    pytest.param(R("spec:\n  rules:\n  - timeouts: {request: 1.5s}\n"), "bad_value",
                 "spec.rules[0].timeouts.request", 6, "GEP-2257", id="timeout-decimal"),
    pytest.param(R("spec:\n  rules:\n  - timeouts:\n      request: 1s\n      backendRequest: 2s\n"), "bad_value",
                 "spec.rules[0].timeouts.backendRequest", 8, "must not exceed request timeout 1s",
                 id="backend-timeout-over-request"),
    pytest.param(R("spec:\n  rules:\n  - retry: {codes: [200]}\n"), "bad_value",
                 "spec.rules[0].retry.codes[0]", 6, "between 400 and 599", id="retry-code"),
    pytest.param(R("spec:\n  rules:\n  - retry: {attempts: 0}\n"), "bad_value",
                 "spec.rules[0].retry.attempts", 6, "at least 1", id="retry-attempts"),
    pytest.param(R("spec:\n  rules:\n  - filters:\n    - type: RequestHeaderModifier\n"), "missing_field",
                 "spec.rules[0].filters[0].requestHeaderModifier", 7, "is required for a RequestHeaderModifier",
                 id="filter-without-config"),
    pytest.param(R("spec:\n  rules:\n  - filters:\n    - type: RequestHeaderModifier\n"
                   "      requestHeaderModifier: {remove: [a]}\n    - type: RequestHeaderModifier\n"
                   "      requestHeaderModifier: {remove: [b]}\n"), "duplicate",
                 "spec.rules[0].filters[1].type", 9, "only once per rule", id="filter-twice"),
    pytest.param(R("spec:\n  rules:\n  - filters:\n    - type: RequestMirror\n"
                   "      requestMirror: {backendRef: {name: m, port: 80}, percent: 150}\n"), "bad_value",
                 "spec.rules[0].filters[0].requestMirror.percent", 8, "between 0 and 100", id="mirror-percent"),
    pytest.param(R("spec:\n  rules:\n  - filters:\n    - type: CORS\n      cors: {}\n"), "unsupported",
                 "spec.rules[0].filters[0].type", 7, "CORS filters are not supported", id="cors"),
    pytest.param(R("spec:\n  rules:\n  - filters:\n    - type: RequestRedirect\n"
                   "      requestRedirect: {statusCode: 304}\n"), "bad_value",
                 "spec.rules[0].filters[0].requestRedirect.statusCode", 8, "301, 302, 303, 307 or 308",
                 id="redirect-status"),
    pytest.param(R("spec:\n  rules:\n  - filters:\n    - type: RequestRedirect\n"
                   "      requestRedirect: {scheme: https}\n    backendRefs: [{name: a, port: 80}]\n"),
                 "bad_value", "spec.rules[0].backendRefs", 9, "RequestRedirect", id="redirect-with-backends"),
    pytest.param(R("spec:\n  rules:\n  - matches: [{path: {type: Exact, value: /a}}]\n    filters:\n"
                   "    - type: URLRewrite\n      urlRewrite: {path: {type: ReplacePrefixMatch, "
                   "replacePrefixMatch: /b}}\n"), "bad_value",
                 "spec.rules[0].filters[0].urlRewrite.path", 9, "exactly one PathPrefix match",
                 id="rewrite-prefix-needs-prefix-match"),
    pytest.param(R("spec:\n  hostnames: [Echo.Demo]\n"), "bad_value", "spec.hostnames[0]", 5,
                 "not a valid hostname", id="hostname-uppercase"),
    pytest.param(R("spec:\n  rules:\n  - {name: a}\n  - {name: a}\n"), "duplicate", "spec.rules[1].name", 7,
                 'duplicate rule name "a"', id="duplicate-rule-name"),
    pytest.param(R("spec:\n  rules:\n  - sessionPersistence: {}\n"), "unsupported",
                 "spec.rules[0].sessionPersistence", 6, "not supported", id="session-persistence"),
    # VirtualService
    pytest.param(y(VSH, "spec:\n  http: []\n"), "missing_field", "spec.hosts", 4, "is required",
                 id="vs-no-hosts"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    match: [{uri: {exact: /a, prefix: /b}}]\n"), "bad_value", "spec.http[0].match[0].uri",
                 8, "exactly one of exact, prefix or regex", id="vs-two-string-kinds"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - match: [{uri: {prefix: /}}]\n"), "missing_field",
                 "spec.http[0].route", 7, "is required", id="vs-no-route"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    timeout: 10\n"), "bad_value", "spec.http[0].timeout", 8, "must be a string",
                 id="vs-timeout-number"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    fault: {abort: {percentage: {value: 50}}}\n"), "missing_field",
                 "spec.http[0].fault.abort.httpStatus", 8, "is required", id="vs-abort-no-status"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n"), "bad_value",
                 "spec.http[0].fault.delay.percentage.value", 8, "between 0 and 100", id="vs-delay-percent"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    mirrorPercentage: {value: 5}\n"), "missing_field", "spec.http[0].mirrorPercentage",
                 8, "needs mirror", id="vs-mirror-percentage-alone"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    match: [{sourceLabels: {version: 1}}]\n"), "bad_value",
                 "spec.http[0].match[0].sourceLabels.version", 8, "quote it", id="vs-source-labels-number"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  tcp:\n  - rout: []\n"), "unknown_field", "spec.tcp[0].rout", 7,
                 "unknown field", id="vs-tcp-typo"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    redirect: {uri: /x}\n"), "bad_value", "spec.http[0].route", 7,
                 "must not be set together with redirect", id="vs-redirect-with-route"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n"
                       "    delegate: {name: x}\n"), "unsupported", "spec.http[0].delegate", 8,
                 "would send traffic elsewhere", id="vs-delegate"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - directResponse: {status: 503}\n"
                       "    fault: {abort: {httpStatus: 500, percentage: {value: 1}}}\n"), "bad_value",
                 "spec.http[0].fault", 8, "must not be set together with directResponse", id="vs-direct-with-fault"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - redirect: {redirectCode: 304, uri: /x}\n"),
                 "bad_value", "spec.http[0].redirect.redirectCode", 7, "Istio drops", id="vs-redirect-code"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - redirect: {redirectCode: 302}\n"),
                 "bad_value", "spec.http[0].redirect", 7, "must specify uri", id="vs-redirect-empty"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - match: [{uri: {prefix: /}}]\n"),
                 "missing_field", "spec.http[0].route", 7, "or directResponse", id="vs-no-route"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - directResponse: {status: 200, body: {bytes: '%%%'}}\n"),
                 "bad_value", "spec.http[0].directResponse.body.bytes", 7, "base64", id="vs-direct-bad-bytes"),
    pytest.param(y(VSH, "spec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}, weight: 0}]\n"),
                 "bad_value", "spec.http[0].route", 7, "non-zero weight", id="vs-all-zero-weights"),
    # DestinationRule
    pytest.param(y(DRH, "spec:\n  subsets: []\n"), "missing_field", "spec.host", 4, "is required",
                 id="dr-no-host"),
    pytest.param(y(DRH, "spec:\n  host: a\n  subsets: [{name: v1}, {name: v1}]\n"), "duplicate",
                 "spec.subsets[1].name", 6, 'duplicate subset "v1"', id="dr-duplicate-subset"),
    pytest.param(y(DRH, "spec:\n  host: a\n  subsets: [{name: v1, labels: {version: 1}}]\n"), "bad_value",
                 "spec.subsets[0].labels.version", 6, "quote it", id="dr-label-number"),
    pytest.param(y(DRH, "spec:\n  host: a\n  trafficPolicy:\n    loadBalancer: {simple: FASTEST}\n"),
                 "bad_value", "spec.trafficPolicy.loadBalancer.simple", 7, "must be one of",
                 id="dr-lb"),
    pytest.param(y(DRH, "spec:\n  host: a\n  trafficPolicy:\n    outlierDetection: {interval: soon}\n"),
                 "bad_value", "spec.trafficPolicy.outlierDetection.interval", 7, "not a valid duration",
                 id="dr-interval"),
    pytest.param(y(DRH, "spec:\n  host: a\n  trafficPolicy:\n    tls: {mode: ISTIO}\n"),
                 "bad_value", "spec.trafficPolicy.tls.mode", 7, "must be one of", id="dr-tls-mode"),
]


@pytest.mark.parametrize("text, reason, field, line, fragment", BAD)
def test_bad_input_names_reason_field_and_line(text, reason, field, line, fragment):
    with pytest.raises(ConfigErrors) as info:
        load_text(text, SRC)
    errors = list(info.value.errors)
    assert [(e.reason, e.field) for e in errors] == [(reason, field)], [str(e) for e in errors]
    [e] = errors
    assert reason in REASONS
    assert e.line == line, str(e)
    assert fragment in e.message
    kind = text.split("kind: ")[1].split("\n")[0]
    assert str(e).startswith(f"{SRC}:{line} (document 1): {kind} demo/")


def test_every_problem_is_reported_at_once():
    text = R("""
        spec:
          bogus: 1
          parentRefs: [{group: "", kind: Service}]
          rules:
          - matches: [{method: FETCH}]
            backendRefs: [{name: a, port: 0}]
          - timeouts: {request: forever}
        """)
    with pytest.raises(ConfigErrors) as info:
        load_text(text, SRC)
    got = sorted((e.reason, e.field) for e in info.value.errors)
    assert got == sorted([
        ("unknown_field", "spec.bogus"),
        ("missing_field", "spec.parentRefs[0].name"),
        ("bad_value", "spec.rules[0].matches[0].method"),
        ("bad_value", "spec.rules[0].backendRefs[0].port"),
        ("bad_value", "spec.rules[1].timeouts.request"),
    ])
    assert all(isinstance(e, ConfigError) for e in info.value.errors)


@pytest.mark.parametrize("text, seconds", [
    ("10s", 10.0), ("500ms", 0.5), ("1h30m", 5400.0), ("0s", 0.0), ("1h2m3s4ms", 3723.004),
    ("1.5s", None), ("10", None), ("s", None), ("1s1s", None), ("123456s", None), ("-1s", None),
])
def test_gep2257_durations(text, seconds):
    assert parse_gep2257(text) == seconds


@pytest.mark.parametrize("text, seconds", [
    ("10s", 10.0), ("0.5s", 0.5), ("1m30s", 90.0), ("250ms", 0.25), ("1h", 3600.0), ("", None),
    ("10", None), ("1d", None),
])
def test_istio_durations(text, seconds):
    got = parse_go_duration(text)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_typed_routes_are_distributed_to_proxies():
    objs = load_text(VALID[1].values[0] + "---\n" + VALID[4].values[0] + "---\n" + VALID[5].values[0], SRC)
    dist = translate(objs, trust_domain="cluster.local")
    assert {ref for ref in dist} >= {("HTTPRoute", "demo/r"), ("VirtualService", "demo/vs"),
                                    ("DestinationRule", "demo/dr")}
    st = ProxyState()
    st.apply_snapshot(Snapshot(version=1, resources=tuple(dist.values())))
    assert st.http_routes() == [objs[0]]
    assert st.virtual_services() == [objs[1]]
    assert st.destination_rules() == [objs[2]]
    assert st.policies() == []

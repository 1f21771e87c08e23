"""Istio's YAML as Istio accepts it: every schema field accepted (deprecated forms mapped as Istio
maps them), fields the mesh does not enforce kept with a warning naming them, typos refused."""
from __future__ import annotations

import textwrap

import pytest

from mesh.config import WARNING_REASONS, ConfigErrors, parse_text
from mesh.model import PolicyObject
from mesh.model.route import (ClientTLS, H2UpgradePolicy, IstioStringMatch, LoadBalancer,
                              StringMatchType, TCPKeepalive, TLSMode, VSDestination, VSDirectResponse, VSMirror,
                              VSRedirect)
from waypoint.routing.match import RequestInfo, vs_match_holds

SRC = "istio.yaml"
VS = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: demo}\n"
DR = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: demo}\n"
PRESENT = IstioStringMatch(type=StringMatchType.PRESENT, value="")


def http(rule: str) -> str:
    """A VirtualService with one http rule (rule given as YAML lines under `- `)."""
    body = textwrap.indent(textwrap.dedent(rule).strip("\n"), "    ")
    return VS + "spec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n" + body + "\n"


def traffic(policy: str) -> str:
    body = textwrap.indent(textwrap.dedent(policy).strip("\n"), "    ")
    return DR + "spec:\n  host: reviews\n  trafficPolicy:\n" + body + "\n"


def load(text: str):
    [loaded] = parse_text(text, SRC)
    assert all(w.reason in WARNING_REASONS for w in loaded.warnings)
    return loaded.resource, [(w.field, w.reason) for w in loaded.warnings]


def rule(vs):
    return vs.http[0]


def tp(dr):
    return dr.traffic_policy


# (yaml, what to read off the model, expected value, expected warnings (field, reason))
CASES = [
    pytest.param(http("match: [{withoutHeaders: {x-canary: {exact: 'yes'}, x-debug: {}}}]"),
                 lambda vs: rule(vs).match[0].without_headers,
                 (("x-canary", IstioStringMatch(type=StringMatchType.EXACT, value="yes")), ("x-debug", PRESENT)),
                 [], id="withoutHeaders"),
    pytest.param(http("match: [{headers: {end-user: {regex: '*'}, x-any: {}}}]"),
                 lambda vs: rule(vs).match[0].headers, (("end-user", PRESENT), ("x-any", PRESENT)), [],
                 id="header-regex-star-is-presence"),
    pytest.param(http("fault: {delay: {fixedDelay: 7s, percent: 30}}"),
                 lambda vs: rule(vs).fault.delay.percentage, 30.0,
                 [("spec.http[0].fault.delay.percent", "deprecated")], id="fault-delay-percent-int"),
    pytest.param(http("fault: {delay: {fixedDelay: 7s, percent: 30, percentage: {value: 2.5}}}"),
                 lambda vs: rule(vs).fault.delay.percentage, 2.5,
                 [("spec.http[0].fault.delay.percent", "deprecated")], id="fault-delay-percentage-wins"),
    pytest.param(http("mirror: {host: shadow}\nmirrorPercent: 40"),
                 lambda vs: rule(vs).mirror_percentage, 40.0,
                 [("spec.http[0].mirrorPercent", "deprecated")], id="mirrorPercent"),
    pytest.param(http("mirror: {host: shadow}\nmirror_percent: 0"),
                 lambda vs: rule(vs).mirror_percentage, 0.0,
                 [("spec.http[0].mirror_percent", "deprecated")], id="mirror_percent-json-name"),
    pytest.param(http("mirrors:\n- {destination: {host: a}, percentage: {value: 10}}\n- {destination: {host: b}}"),
                 lambda vs: rule(vs).mirrors,
                 (VSMirror(destination=VSDestination(host="a"), percentage=10.0),
                  VSMirror(destination=VSDestination(host="b"))),
                 [], id="mirrors-list"),
    pytest.param(VS + "spec:\n  hosts: [r]\n  http:\n  - redirect: {uri: /v2, authority: b.example, "
                      "derivePort: FROM_REQUEST_PORT, scheme: https, redirectCode: 308}\n",
                 lambda vs: vs.http[0].redirect,
                 VSRedirect(uri="/v2", authority="b.example", derive_port="FROM_REQUEST_PORT", scheme="https",
                            redirect_code=308), [], id="redirect"),
    pytest.param(VS + "spec:\n  hosts: [r]\n  http:\n  - redirect: {port: 8080}\n",
                 lambda vs: (vs.http[0].redirect, vs.http[0].route),
                 (VSRedirect(port=8080), ()), [], id="redirect-port-default-301"),
    pytest.param(VS + "spec:\n  hosts: [r]\n  http:\n  - directResponse: {status: 503, body: {string: down}}\n",
                 lambda vs: vs.http[0].direct_response, VSDirectResponse(status=503, body=b"down"), [],
                 id="directResponse-string"),
    pytest.param(VS + "spec:\n  hosts: [r]\n  http:\n  - directResponse: {status: 200, body: {bytes: AAEC}}\n",
                 lambda vs: vs.http[0].direct_response, VSDirectResponse(status=200, body=b"\0\1\2"), [],
                 id="directResponse-bytes"),
    pytest.param(http("match: [{sourceLabels: {app: productpage}, uri: {prefix: /}}]"),
                 lambda vs: rule(vs).match[0].applies_at_waypoint, False,
                 [("spec.http[0].match[0].sourceLabels", "not_enforced")], id="sourceLabels"),
    pytest.param(http("match: [{gateways: [mesh], sourceNamespace: x}]"),
                 lambda vs: (rule(vs).match[0].gateways, rule(vs).match[0].applies_at_waypoint),
                 (("mesh",), False), [("spec.http[0].match[0].sourceNamespace", "not_enforced")],
                 id="gateways-mesh-and-sourceNamespace"),
    pytest.param(http("fault: {abort: {httpStatus: 600, percentage: {value: 1}}}"),
                 lambda vs: rule(vs).fault.abort.http_status, 600, [], id="abort-httpStatus-600"),
    pytest.param(http("fault: {abort: {grpcStatus: UNAVAILABLE}}"),
                 lambda vs: (rule(vs).fault.abort.http_status, rule(vs).fault.abort.grpc_status),
                 (200, "UNAVAILABLE"), [("spec.http[0].fault.abort.percentage", "unset_percentage")],
                 id="abort-grpcStatus"),
    # Istio: an unset fault percentage injects nothing ("If left unspecified, no request will be
    # delayed" / "... aborted"); valid, so accepted, with a warning naming the trap.
    pytest.param(http("fault: {delay: {fixedDelay: 1s}, abort: {httpStatus: 503}}"),
                 lambda vs: (rule(vs).fault.delay.percentage, rule(vs).fault.abort.percentage), (0.0, 0.0),
                 [("spec.http[0].fault.delay.percentage", "unset_percentage"),
                  ("spec.http[0].fault.abort.percentage", "unset_percentage")], id="fault-percentage-unset-is-zero"),
    pytest.param(http("retries: {attempts: 3, retryIgnorePreviousHosts: false, backoff: 50ms}"),
                 lambda vs: (rule(vs).retries.retry_ignore_previous_hosts, rule(vs).retries.backoff),
                 (False, 0.05), [], id="retries-extras"),                 # both enforced by the waypoint
    pytest.param(http("retries: {attempts: 3, retryRemoteLocalities: true}"),
                 lambda vs: rule(vs).retries.retry_remote_localities, True,
                 [("spec.http[0].retries.retryRemoteLocalities", "not_enforced")], id="retries-localities"),
    pytest.param(http("corsPolicy: {allowOrigins: [{exact: 'https://a.example'}], allowMethods: [GET]}"),
                 lambda vs: len(vs.http), 1, [("spec.http[0].corsPolicy", "not_enforced")], id="corsPolicy"),
    pytest.param(VS + "spec:\n  hosts: [reviews]\n  tcp:\n  - match: [{port: 27017}]\n"
                 "    route: [{destination: {host: mongo, port: {number: 5555}}}]\n"
                 "  tls:\n  - match: [{port: 443, sniHosts: [login.bookinfo.com]}]\n"
                 "    route: [{destination: {host: login.prod.svc.cluster.local}}]\n",
                 lambda vs: vs.http, (), [("spec.tcp", "not_enforced"), ("spec.tls", "not_enforced")],
                 id="vs-tcp-and-tls-routes"),
    # DestinationRule
    # Bookinfo's destination-rule-all-mtls.yaml: ISTIO_MUTUAL is what ambient does: no warning.
    pytest.param(DR + "spec:\n  host: productpage\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n"
                 "  subsets:\n  - name: v1\n    labels: {version: v1}\n",
                 lambda dr: tp(dr).tls, ClientTLS(mode=TLSMode.ISTIO_MUTUAL), [], id="dr-tls-istio-mutual-bookinfo"),
    pytest.param(traffic("outlierDetection: {consecutiveErrors: 7, interval: 5m}"),
                 lambda dr: tp(dr).outlier_detection.consecutive_5xx_errors, None,
                 [("spec.trafficPolicy.outlierDetection.consecutiveErrors", "deprecated")],
                 id="outlier-consecutiveErrors-ignored-as-istio"),
    pytest.param(traffic("outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3}"),
                 lambda dr: (tp(dr).outlier_detection.split_external_local_origin_errors,
                             tp(dr).outlier_detection.consecutive_local_origin_failures), (True, 3),
                 [("spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors", "not_enforced"),
                  ("spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures", "not_enforced")],
                 id="outlier-local-origin"),
    pytest.param(traffic("connectionPool:\n  tcp: {maxConnections: 5, tcpKeepalive: {probes: 3, time: 7200s, "
                         "interval: 75s}, maxConnectionDuration: 1h}"),
                 lambda dr: (tp(dr).connection_pool.tcp.tcp_keepalive,
                             tp(dr).connection_pool.tcp.max_connection_duration),
                 (TCPKeepalive(probes=3, time=7200.0, interval=75.0), 3600.0),
                 [("spec.trafficPolicy.connectionPool.tcp.tcpKeepalive", "not_enforced"),
                  ("spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration", "not_enforced")],
                 id="pool-tcp-keepalive-max-duration"),
    pytest.param(traffic("connectionPool:\n  http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true, "
                         "maxConcurrentStreams: 100}"),
                 lambda dr: (tp(dr).connection_pool.http.h2_upgrade_policy,
                             tp(dr).connection_pool.http.use_client_protocol,
                             tp(dr).connection_pool.http.max_concurrent_streams),
                 (H2UpgradePolicy.UPGRADE, True, 100),
                 [("spec.trafficPolicy.connectionPool.http.h2UpgradePolicy", "not_enforced"),
                  ("spec.trafficPolicy.connectionPool.http.useClientProtocol", "not_enforced"),
                  ("spec.trafficPolicy.connectionPool.http.maxConcurrentStreams", "not_enforced")],
                 id="pool-http-h2"),
    pytest.param(traffic("loadBalancer: {simple: LEAST_CONN}"), lambda dr: tp(dr).load_balancer,
                 LoadBalancer.LEAST_REQUEST, [("spec.trafficPolicy.loadBalancer.simple", "deprecated")],
                 id="lb-least-conn"),
    pytest.param(traffic("tls: {mode: SIMPLE, sni: a.example}"), lambda dr: tp(dr).tls,
                 ClientTLS(mode=TLSMode.SIMPLE, sni="a.example"),
                 [("spec.trafficPolicy.tls.mode", "not_enforced")], id="tls-simple-warns"),
]


@pytest.mark.parametrize("text, read, expected, warnings", CASES)
def test_istio_accepts_it_so_do_we(text, read, expected, warnings) -> None:
    resource, got_warnings = load(text)
    assert read(resource) == expected
    assert got_warnings == warnings


def test_istio_gateway_kind_is_stored_with_a_warning() -> None:
    text = ("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bookinfo-gateway}\n"
            "spec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 8080, name: http, "
            "protocol: HTTP}\n    hosts: ['*']\n")
    [loaded] = parse_text(text, SRC)
    assert isinstance(loaded.resource, PolicyObject)
    assert (loaded.resource.policy_kind, loaded.resource.api_version) == ("Gateway", "networking.istio.io/v1")
    [w] = loaded.warnings
    assert str(w).startswith("istio.yaml:1 (document 1): Gateway default/bookinfo-gateway: apiVersion: "
                             "warning: an Istio Gateway")


@pytest.mark.parametrize("text, field, reason", [
    pytest.param(http("match: [{withoutHeader: {x: {}}}]"), "spec.http[0].match[0].withoutHeader",
                 "unknown_field", id="typo-withoutHeader"),
    pytest.param(http("fault: {abort: {httpStatus: 601}}"), "spec.http[0].fault.abort.httpStatus", "bad_value",
                 id="abort-601"),
    pytest.param(http("fault: {abort: {grpcStatus: '14'}}"), "spec.http[0].fault.abort.grpcStatus", "bad_value",
                 id="grpc-status-number"),
    pytest.param(http("mirror: {host: shadow}\nmirrorPercent: 101"), "spec.http[0].mirrorPercent", "bad_value",
                 id="mirrorPercent-over-100"),
    pytest.param(http("match: [{uri: {regex: '*'}}]"), "spec.http[0].match[0].uri.regex", "bad_value",
                 id="uri-regex-star-is-not-presence"),
    pytest.param(traffic("outlierDetection: {consecutiveLocalOriginFailures: 3}"),
                 "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures", "bad_value",
                 id="local-origin-needs-split"),
    pytest.param(traffic("connectionPool:\n  http: {h2UpgradePolicy: SOMETIMES}"),
                 "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy", "bad_value", id="h2-policy"),
    pytest.param(traffic("connectionPool:\n  tcp: {tcpKeepAlive: {probes: 3}}"),
                 "spec.trafficPolicy.connectionPool.tcp.tcpKeepAlive", "unknown_field", id="typo-keepalive"),
    pytest.param(traffic("portLevelSettings:\n- port: {number: 80}\n  loadBalancr: {simple: RANDOM}"),
                 "spec.trafficPolicy.portLevelSettings[0].loadBalancr", "unknown_field", id="typo-port-level"),
])
def test_typos_and_values_istio_rejects_stay_refused(text, field, reason) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_text(text, SRC)
    assert [(e.field, e.reason) for e in info.value.errors] == [(field, reason)]


def req(**headers: str) -> RequestInfo:
    return RequestInfo.from_target("GET", "/", headers.items())


def test_waypoint_evaluates_without_headers_and_skips_source_label_blocks() -> None:
    vs, _ = load(http("match: [{withoutHeaders: {x-canary: {exact: 'yes'}, x-debug: {}}}]"))
    m = rule(vs).match[0]
    assert vs_match_holds(m, req())  # missing x-canary counts as "", which is not "yes"
    assert vs_match_holds(m, req(**{"x-canary": "no"}))
    assert not vs_match_holds(m, req(**{"x-canary": "yes"}))
    assert not vs_match_holds(m, req(**{"x-debug": ""}))  # present (even empty) fails "without {}"
    vs, _ = load(http("match: [{headers: {end-user: {regex: '*'}}}]"))
    assert vs_match_holds(rule(vs).match[0], req(**{"end-user": ""}))
    assert not vs_match_holds(rule(vs).match[0], req())
    vs, _ = load(http("match: [{sourceLabels: {app: productpage}}]"))
    assert not vs_match_holds(rule(vs).match[0], req())
    vs, _ = load(http("match: [{gateways: [bookinfo-gateway]}]"))
    assert not vs_match_holds(rule(vs).match[0], req())

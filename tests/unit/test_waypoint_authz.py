"""L7 authorization table at the waypoint: Istio YAML in (config edge), decision out (waypoint.authz)."""
import ipaddress
import textwrap

import pytest

from mesh.config import load_text
from mesh.identity import SpiffeId
from mesh.model.base import ResourceKey
from mesh.model.policy import Action, AuthorizationPolicy
from waypoint.authz import RBAC_DENIED_BODY, Reason, Request, applies, evaluate

TD = "cluster.local"
WP = ResourceKey("Gateway", "foo", "waypoint")
SVC = ResourceKey("Service", "foo", "httpbin")
IP = ipaddress.IPv4Address


def sa(ns, name):
    return SpiffeId(trust_domain=TD, namespace=ns, service_account=name)


SLEEP = sa("foo", "sleep")
CLIENT = sa("bar", "client")

TO_SVC = "targetRefs: [{kind: Service, group: '', name: httpbin}]"
TO_WP = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"


def req(method="GET", path="/", host="httpbin.foo.svc.cluster.local:8000", headers=(), src=SLEEP,
        ip="10.244.1.7", remote=None, dst="10.96.0.20", port=8000, service=SVC):
    return Request(method=method, path=path, host=host, headers=tuple(headers), source_identity=src,
                   source_ip=IP(ip), remote_ip=IP(remote) if remote else None, destination_ip=IP(dst),
                   destination_port=port, service=service)


def ap(name, spec, ns="foo", target=TO_SVC, annotations=""):
    body = textwrap.indent((target + "\n" if target else "") + textwrap.dedent(spec).strip(), "  ")
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec:\n{body}\n")


def load(docs):
    return [o for o in load_text("---\n".join(docs), "policies.yaml") if isinstance(o, AuthorizationPolicy)]


def decide(docs, r):
    return evaluate(load(docs), r, waypoint=WP)


# The Istio docs' examples (authorization-policy reference, http-traffic task).
GET_INFO = ap("httpbin", """
    action: ALLOW
    rules:
    - from:
      - source: {principals: [cluster.local/ns/foo/sa/sleep]}
      - source: {namespaces: [test]}
      to:
      - operation: {methods: [GET], paths: ["/info*"]}
      - operation: {methods: [POST], paths: [/data]}
    """)
DENY_ADMIN = ap("deny-admin", """
    action: DENY
    rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
    """)
JWT_ALLOW = ap("jwt", """
    rules:
    - to: [{operation: {methods: [GET]}}]
      when: [{key: "request.auth.claims[iss]", values: ["https://accounts.google.com"]}]
    """)


def allow(rule_yaml, name="a"):
    return ap(name, f"action: ALLOW\nrules: [{rule_yaml}]")


def deny(rule_yaml, name="d"):
    return ap(name, f"action: DENY\nrules: [{rule_yaml}]")


CASES = [
    # -- no policy, allow-nothing, allow-all
    ("no-policy", [], req(), True, "allowed"),
    ("allow-nothing", [ap("none", "action: ALLOW")], req(), False, "no_allow_match"),
    ("allow-all-empty-rule", [ap("all", "rules: [{}]")], req(), True, "allowed"),
    # -- docs example: GET /info* and POST /data, from sleep or namespace test
    ("docs-get-info", [GET_INFO], req("GET", "/info"), True, "allowed"),
    ("docs-get-info-prefix", [GET_INFO], req("GET", "/info/v2"), True, "allowed"),
    ("docs-post-info-denied", [GET_INFO], req("POST", "/info"), False, "no_allow_match"),
    ("docs-post-data", [GET_INFO], req("POST", "/data"), True, "allowed"),
    ("docs-get-data-denied", [GET_INFO], req("GET", "/data"), False, "no_allow_match"),
    ("docs-post-data-exact-only", [GET_INFO], req("POST", "/data/x"), False, "no_allow_match"),
    ("docs-namespace-test", [GET_INFO], req("GET", "/info", src=sa("test", "x")), True, "allowed"),
    ("docs-other-source-denied", [GET_INFO], req("GET", "/info", src=CLIENT), False, "no_allow_match"),
    # -- paths
    ("deny-admin-prefix", [DENY_ADMIN], req("GET", "/admin/users"), False, "denied_by_policy"),
    ("deny-admin-no-slash-passes", [DENY_ADMIN], req("GET", "/admin"), True, "allowed"),
    ("deny-admin-other-path", [DENY_ADMIN], req("GET", "/status"), True, "allowed"),
    ("not-paths-public", [allow("{to: [{operation: {notPaths: ['/private*']}}]}")], req(path="/public"), True, "allowed"),
    ("not-paths-private", [allow("{to: [{operation: {notPaths: ['/private*']}}]}")], req(path="/private/x"), False, "no_allow_match"),
    ("suffix-path", [allow("{to: [{operation: {paths: ['*/info']}}]}")], req(path="/v1/info"), True, "allowed"),
    ("suffix-path-miss", [allow("{to: [{operation: {paths: ['*/info']}}]}")], req(path="/v1/infos"), False, "no_allow_match"),
    ("presence-path", [allow("{to: [{operation: {paths: ['*']}}]}")], req(path="/anything"), True, "allowed"),
    ("template-one-segment", [allow("{to: [{operation: {paths: ['/foo/{*}/bar']}}]}")], req(path="/foo/x/bar"), True, "allowed"),
    ("template-one-segment-only", [allow("{to: [{operation: {paths: ['/foo/{*}/bar']}}]}")], req(path="/foo/x/y/bar"), False, "no_allow_match"),
    ("template-many-segments", [allow("{to: [{operation: {paths: ['/api/{**}']}}]}")], req(path="/api/a/b/c"), True, "allowed"),
    ("template-many-needs-one", [allow("{to: [{operation: {paths: ['/api/{**}']}}]}")], req(path="/api/"), False, "no_allow_match"),
    ("paths-case-sensitive", [DENY_ADMIN], req("GET", "/ADMIN/users"), True, "allowed"),
    # -- methods
    ("not-methods-delete", [allow("{to: [{operation: {notMethods: [DELETE]}}]}")], req("DELETE"), False, "no_allow_match"),
    ("not-methods-get", [allow("{to: [{operation: {notMethods: [DELETE]}}]}")], req("GET"), True, "allowed"),
    ("methods-case-sensitive", [allow("{to: [{operation: {methods: [GET]}}]}")], req("get"), False, "no_allow_match"),
    # -- hosts (case-insensitive, port ignored)
    ("host-exact-ci-port", [allow("{to: [{operation: {hosts: [httpbin.foo.svc.cluster.local]}}]}")],
     req(host="HTTPBIN.Foo.svc.cluster.local:8000"), True, "allowed"),
    ("host-suffix-miss", [allow("{to: [{operation: {hosts: ['*.foo.svc.cluster.local']}}]}")],
     req(host="httpbin.bar.svc.cluster.local"), False, "no_allow_match"),
    ("host-suffix", [allow("{to: [{operation: {hosts: ['*.foo.svc.cluster.local']}}]}")],
     req(host="httpbin.foo.svc.cluster.local"), True, "allowed"),
    ("host-prefix", [allow("{to: [{operation: {hosts: ['httpbin*']}}]}")], req(host="httpbin:8000"), True, "allowed"),
    ("not-hosts", [deny("{to: [{operation: {notHosts: ['*.foo.svc.cluster.local']}}]}")],
     req(host="evil.example.com"), False, "denied_by_policy"),
    # -- ports
    ("ports-match", [allow("{to: [{operation: {ports: ['8000']}}]}")], req(port=8000), True, "allowed"),
    ("ports-miss", [allow("{to: [{operation: {ports: ['8000']}}]}")], req(port=9000), False, "no_allow_match"),
    ("not-ports", [deny("{to: [{operation: {notPorts: [8000]}}]}")], req(port=9000), False, "denied_by_policy"),
    # -- sources
    ("principal-allowed", [allow("{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}")], req(), True, "allowed"),
    ("principal-other", [allow("{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}")], req(src=CLIENT), False, "no_allow_match"),
    ("principal-prefix", [allow("{from: [{source: {principals: ['cluster.local/ns/bar/*']}}]}")], req(src=CLIENT), True, "allowed"),
    ("principal-no-identity", [allow("{from: [{source: {principals: ['*']}}]}")], req(src=None), False, "no_allow_match"),
    ("not-principals-deny", [deny("{from: [{source: {notPrincipals: [cluster.local/ns/foo/sa/sleep]}}]}")], req(src=CLIENT), False, "denied_by_policy"),
    ("namespace-allowed", [allow("{from: [{source: {namespaces: [bar]}}]}")], req(src=CLIENT), True, "allowed"),
    ("namespace-other", [allow("{from: [{source: {namespaces: [bar]}}]}")], req(src=SLEEP), False, "no_allow_match"),
    ("not-namespaces-deny", [deny("{from: [{source: {notNamespaces: [foo]}}]}")], req(src=CLIENT), False, "denied_by_policy"),
    ("not-namespaces-same-ns", [deny("{from: [{source: {notNamespaces: [foo]}}]}")], req(src=SLEEP), True, "allowed"),
    ("ip-blocks", [allow("{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}")], req(ip="10.244.1.9"), True, "allowed"),
    ("ip-blocks-miss", [allow("{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}")], req(ip="10.244.2.9"), False, "no_allow_match"),
    ("not-ip-blocks", [deny("{from: [{source: {notIpBlocks: [10.244.0.0/16]}}]}")], req(ip="172.29.0.1"), False, "denied_by_policy"),
    ("remote-ip-blocks-uses-remote", [allow("{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}")],
     req(ip="10.244.1.7", remote="192.0.2.5"), True, "allowed"),
    ("remote-ip-blocks-defaults-to-peer", [allow("{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}")],
     req(ip="10.244.1.7"), False, "no_allow_match"),
    # -- when
    ("header-when", [allow("{when: [{key: 'request.headers[X-User]', values: [admin]}]}")],
     req(headers=[("x-user", "admin")]), True, "allowed"),
    ("header-when-missing", [allow("{when: [{key: 'request.headers[x-user]', values: [admin]}]}")], req(), False, "no_allow_match"),
    ("header-when-other-value", [allow("{when: [{key: 'request.headers[x-user]', values: [admin]}]}")],
     req(headers=[("x-user", "bob")]), False, "no_allow_match"),
    ("header-when-prefix", [allow("{when: [{key: 'request.headers[authorization]', values: ['Bearer *']}]}")],
     req(headers=[("authorization", "Bearer abc")]), True, "allowed"),
    ("header-not-values-missing", [deny("{when: [{key: 'request.headers[x-token]', notValues: [trusted]}]}")],
     req(), False, "denied_by_policy"),
    ("header-not-values-present", [deny("{when: [{key: 'request.headers[x-token]', notValues: [trusted]}]}")],
     req(headers=[("x-token", "trusted")]), True, "allowed"),
    ("when-source-namespace", [allow("{when: [{key: source.namespace, values: [bar]}]}")], req(src=CLIENT), True, "allowed"),
    ("when-source-principal", [deny("{when: [{key: source.principal, values: ['*/sa/sleep']}]}")], req(), False, "denied_by_policy"),
    ("when-destination-port", [allow("{when: [{key: destination.port, values: ['8000']}]}")], req(port=8001), False, "no_allow_match"),
    ("when-destination-ip", [allow("{when: [{key: destination.ip, values: [10.96.0.0/16]}]}")], req(), True, "allowed"),
    ("when-source-ip-not", [deny("{when: [{key: source.ip, notValues: [10.244.0.0/16]}]}")], req(ip="10.244.1.7"), True, "allowed"),
    ("when-remote-ip", [allow("{when: [{key: remote.ip, values: [192.0.2.5]}]}")], req(remote="192.0.2.5"), True, "allowed"),
    # -- what the mesh cannot evaluate fails closed
    ("jwt-allow-never-matches", [JWT_ALLOW], req("GET"), False, "no_allow_match"),
    ("jwt-deny-matches", [deny("{to: [{operation: {methods: [GET]}}], when: [{key: 'request.auth.claims[groups]', values: [x]}]}")],
     req("GET"), False, "denied_by_policy"),
    ("jwt-deny-other-parts-still-count", [deny("{to: [{operation: {methods: [POST]}}], when: [{key: request.auth.principal, values: [x]}]}")],
     req("GET"), True, "allowed"),
    ("request-principals-allow", [allow("{from: [{source: {requestPrincipals: ['*']}}]}")], req(), False, "no_allow_match"),
    ("request-principals-deny", [deny("{from: [{source: {notRequestPrincipals: ['*']}}]}")], req(), False, "denied_by_policy"),
    ("sni-allow-fails-closed", [allow("{when: [{key: connection.sni, values: ['*']}]}")], req(), False, "no_allow_match"),
    # -- precedence and actions
    ("deny-beats-allow", [ap("allow-get", "rules: [{to: [{operation: {methods: [GET, POST]}}]}]"),
                          deny("{to: [{operation: {methods: [POST], paths: [/explicit-deny]}}]}")],
     req("POST", "/explicit-deny"), False, "denied_by_policy"),
    ("deny-beats-allow-other-path", [ap("allow-get", "rules: [{to: [{operation: {methods: [GET, POST]}}]}]"),
                                     deny("{to: [{operation: {methods: [POST], paths: [/explicit-deny]}}]}")],
     req("POST", "/ok"), True, "allowed"),
    ("any-allow-suffices", [allow("{to: [{operation: {paths: [/a]}}]}", "a1"), allow("{to: [{operation: {paths: [/b]}}]}", "a2")],
     req(path="/b"), True, "allowed"),
    ("audit-never-decides", [ap("audit", "action: AUDIT\nrules: [{}]")], req(), True, "allowed"),
    ("audit-with-allow", [ap("audit", "action: AUDIT\nrules: [{}]"), ap("none", "action: ALLOW")], req(), False, "no_allow_match"),
    ("custom-matching-fails-closed", [ap("ext", "action: CUSTOM\nprovider: {name: opa}\nrules: [{to: [{operation: {paths: ['/secure*']}}]}]")],
     req(path="/secure/x"), False, "custom_unsupported"),
    ("custom-not-matching", [ap("ext", "action: CUSTOM\nprovider: {name: opa}\nrules: [{to: [{operation: {paths: ['/secure*']}}]}]")],
     req(path="/open"), True, "allowed"),
    ("custom-before-allow", [ap("ext", "action: CUSTOM\nrules: [{}]"), ap("all", "rules: [{}]")], req(), False, "custom_unsupported"),
    # -- attachment
    ("selector-policy-is-ztunnels", [ap("sel", "selector: {matchLabels: {app: httpbin}}\naction: DENY\nrules: [{}]", target="")],
     req(), True, "allowed"),
    ("namespace-policy-is-ztunnels", [ap("nsw", "action: DENY\nrules: [{}]", target="")], req(), True, "allowed"),
    ("other-service", [ap("d", "action: DENY\nrules: [{}]", target="targetRefs: [{kind: Service, name: other}]")], req(), True, "allowed"),
    ("service-in-other-namespace", [ap("d", "action: DENY\nrules: [{}]", ns="bar")], req(), True, "allowed"),
    ("waypoint-gateway", [ap("d", "action: DENY\nrules: [{}]", target=TO_WP)], req(), False, "denied_by_policy"),
    ("waypoint-gateway-pod-addressed", [ap("d", "action: DENY\nrules: [{}]", target=TO_WP)], req(service=None), False, "denied_by_policy"),
    ("gateway-wrong-group", [ap("d", "action: DENY\nrules: [{}]", target="targetRefs: [{kind: Gateway, name: waypoint}]")],
     req(), True, "allowed"),
    ("gateway-other-name", [ap("d", "action: DENY\nrules: [{}]",
                               target="targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]")],
     req(), True, "allowed"),
    ("gatewayclass-root", [ap("d", "action: DENY\nrules: [{}]", ns="istio-system",
                              target="targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]")],
     req(), False, "denied_by_policy"),
    ("gatewayclass-not-root", [ap("d", "action: DENY\nrules: [{}]",
                                  target="targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]")],
     req(), True, "allowed"),
    ("service-policy-pod-addressed", [ap("d", "action: DENY\nrules: [{}]")], req(service=None), True, "allowed"),
    ("targetref-singular", [ap("d", "action: DENY\nrules: [{}]", target="targetRef: {kind: Service, group: '', name: httpbin}")],
     req(), False, "denied_by_policy"),
]


@pytest.mark.parametrize("name, docs, r, allowed, reason", CASES, ids=[c[0] for c in CASES])
def test_waypoint_authorization(name, docs, r, allowed, reason):
    d = decide(docs, r)
    assert (d.allowed, d.reason.value) == (allowed, reason), d.message
    assert (d.reply is None) == allowed


def test_case_count():
    assert len(CASES) >= 40


def test_deny_is_envoys_rbac_reply_and_names_policy_and_rule():
    d = decide([ap("x", "rules: [{}]", target=""), DENY_ADMIN], req(path="/admin/a"))
    assert d.policy == "foo/deny-admin" and d.rule == 0
    assert (d.reply.status, d.reply.body, d.reply.response_flags) == (403, b"RBAC: access denied", "-")
    assert len(RBAC_DENIED_BODY) == 19
    assert d.reply.details == "rbac_access_denied_matched_policy[ns[foo]-policy[deny-admin]-rule[0]]"
    assert "deny-admin" in d.message


def test_no_allow_match_details_say_none():
    d = decide([GET_INFO], req("DELETE", "/info"))
    assert d.reply.details == "rbac_access_denied_matched_policy[none]" and d.policy is None
    assert "foo/httpbin" in d.message


def test_allow_names_the_matching_rule():
    two = ap("two", "rules: [{to: [{operation: {paths: [/a]}}]}, {to: [{operation: {paths: [/b]}}]}]")
    d = decide([two], req(path="/b"))
    assert (d.policy, d.rule) == ("foo/two", 1)


def test_custom_says_why_and_uses_ext_authz_flag():
    d = decide([ap("ext", "action: CUSTOM\nprovider: {name: opa}\nrules: [{}]")], req())
    assert (d.reply.status, d.reply.response_flags) == (403, "UAEX")
    assert "opa" in d.message and "not supported" in d.message


def test_audit_matches_are_reported():
    d = decide([ap("audit", "action: AUDIT\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")], req(path="/admin"))
    assert d.allowed and d.audited == ("foo/audit",)
    assert decide([ap("audit", "action: AUDIT\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")],
                  req(path="/x")).audited == ()


def test_failed_closed_names_the_attributes():
    d = decide([JWT_ALLOW, ap("rp", "action: DENY\nrules: [{from: [{source: {requestPrincipals: [a]}}]}]")], req("POST"))
    assert d.failed_closed == ("foo/jwt: rules[0].when request.auth.claims[iss]",
                               "foo/rp: rules[0].from[0].source.requestPrincipals")


def test_dry_run_deny_is_reported_not_enforced():
    d = decide([ap("d", "action: DENY\nrules: [{}]", annotations=", annotations: {istio.io/dry-run: 'true'}")], req())
    assert d.allowed and d.dry_run == ("foo/d",)


def test_repeated_header_values_are_joined_as_envoy_does():
    d = decide([allow("{when: [{key: 'request.headers[x-a]', values: ['1,2']}]}")], req(headers=[("x-a", "1"), ("x-a", "2")]))
    assert d.allowed


def test_config_keeps_l7_values_typed():
    (p,) = load([ap("t", """
        action: CUSTOM
        provider: {name: ext}
        rules:
        - from: [{source: {remoteIpBlocks: [192.0.2.0/24], requestPrincipals: [iss/sub]}}]
          to: [{operation: {methods: [GET], notPaths: [/x], hosts: [a.b], ports: ['80']}}]
          when: [{key: 'request.headers[x]', values: [y]}, {key: source.ip, values: [10.0.0.1]}]
        """)])
    (rule,) = p.rules
    assert p.action is Action.CUSTOM and p.provider == "ext"
    assert rule.operations[0].methods == ("GET",) and rule.operations[0].not_paths == ("/x",)
    assert rule.operations[0].hosts == ("a.b",) and rule.operations[0].ports == (80,)
    assert rule.sources[0].remote_ip_blocks == (ipaddress.IPv4Network("192.0.2.0/24"),)
    assert [c.key for c in rule.conditions] == ["source.ip"]
    assert [c.key for c in rule.l7_conditions] == ["request.headers[x]"]


def test_applies_is_per_service():
    (p,) = load([DENY_ADMIN])
    assert applies(p, WP, SVC)
    assert not applies(p, WP, ResourceKey("Service", "foo", "other"))
    assert not applies(p, WP, None)

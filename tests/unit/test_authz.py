"""L4 authorization table: Istio YAML in, decision out (config edge + ztunnel.authz together)."""
import ipaddress
import textwrap

import pytest

from mesh.config import ConfigError, load_text
from mesh.identity import SpiffeId
from mesh.model import FrozenMap, TunnelProtocol, Workload
from mesh.model.policy import AuthorizationPolicy, MtlsMode, PeerAuthentication
from mesh.distribution.protocol import Snapshot
from mesh.state import ProxyState
from ztunnel.authz import Connection, effective_mtls, evaluate, evaluate_applicable

TD = "cluster.local"
WEB = Workload(uid="foo/web", name="web", namespace="foo", node="n1", ip=ipaddress.IPv4Address("10.244.0.5"),
               service_account="web", identity=SpiffeId(trust_domain=TD, namespace="foo", service_account="web"),
               protocol=TunnelProtocol.HBONE, labels=FrozenMap({"app": "web", "version": "v1"}))


def sa(ns, name):
    return SpiffeId(trust_domain=TD, namespace=ns, service_account=name)


SLEEP = sa("foo", "sleep")          # same namespace
CLIENT = sa("bar", "client")        # other namespace
ADMIN = sa("ops", "admin")


def conn(src=SLEEP, ip="10.244.1.7", port=8080):
    return Connection(src_identity=src, src_ip=ipaddress.IPv4Address(ip),
                      dst_ip=WEB.ip, dst_port=port)


def ap(name, spec, ns="foo", annotations=""):
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ") if spec.strip() else "  {}"
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec:\n{body}\n")


def pa(name, spec, ns="foo"):
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return f"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"


def decide(docs, c):
    objs = load_text("---\n".join(docs), "policies.yaml")
    aps = [o for o in objs if isinstance(o, AuthorizationPolicy)]
    pas = [o for o in objs if isinstance(o, PeerAuthentication)]
    return evaluate(aps, pas, WEB, c)


ALLOW_SLEEP = ap("allow-sleep", """
    selector: {matchLabels: {app: web}}
    action: ALLOW
    rules:
    - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
    """)

CASES = [
    # -- no policy / empty policies
    ("no-policy-allows", [], conn(), True, "allowed"),
    ("no-policy-allows-plaintext", [], conn(src=None), True, "allowed"),
    ("deny-all-empty-spec", [ap("deny-all", "")], conn(), False, "no_allow_match"),
    ("deny-all-blocks-plaintext-too", [ap("deny-all", "")], conn(src=None), False, "no_allow_match"),
    ("allow-all-rules-empty-object", [ap("allow-all", "rules: [{}]")], conn(src=None), True, "allowed"),
    ("allow-nothing-rules-empty-list", [ap("allow-nothing", "action: ALLOW\nrules: []")], conn(), False, "no_allow_match"),
    ("deny-without-rules-matches-nothing", [ap("d", "action: DENY")], conn(), True, "allowed"),
    ("deny-rules-empty-object-denies-all", [ap("d", "action: DENY\nrules: [{}]")], conn(), False, "denied_by_policy"),
    # -- principals
    ("allow-principal-match", [ALLOW_SLEEP], conn(), True, "allowed"),
    ("allow-principal-other", [ALLOW_SLEEP], conn(src=CLIENT), False, "no_allow_match"),
    ("allow-principal-plaintext", [ALLOW_SLEEP], conn(src=None), False, "no_allow_match"),
    ("principal-prefix", [ap("p", "rules: [{from: [{source: {principals: ['cluster.local/ns/bar/*']}}]}]")],
     conn(src=CLIENT), True, "allowed"),
    ("principal-suffix", [ap("p", "rules: [{from: [{source: {principals: ['*/sa/admin']}}]}]")],
     conn(src=ADMIN), True, "allowed"),
    ("principal-presence-needs-identity", [ap("p", "rules: [{from: [{source: {principals: ['*']}}]}]")],
     conn(src=None), False, "no_allow_match"),
    ("principal-presence-any-identity", [ap("p", "rules: [{from: [{source: {principals: ['*']}}]}]")],
     conn(src=ADMIN), True, "allowed"),
    ("not-principals-excludes", [ap("p", "rules: [{from: [{source: {notPrincipals: [cluster.local/ns/foo/sa/sleep]}}]}]")],
     conn(), False, "no_allow_match"),
    ("not-principals-others-pass", [ap("p", "rules: [{from: [{source: {notPrincipals: [cluster.local/ns/foo/sa/sleep]}}]}]")],
     conn(src=CLIENT), True, "allowed"),
    ("deny-not-principals-presence-is-strict", [ap("p", "action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]")],
     conn(src=None), False, "denied_by_policy"),
    ("deny-not-principals-presence-lets-mtls", [ap("p", "action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]")],
     conn(), True, "allowed"),
    # -- namespaces
    ("allow-namespace", [ap("ns", "rules: [{from: [{source: {namespaces: [bar]}}]}]")], conn(src=CLIENT), True, "allowed"),
    ("allow-namespace-other", [ap("ns", "rules: [{from: [{source: {namespaces: [bar]}}]}]")], conn(), False, "no_allow_match"),
    ("not-namespaces", [ap("ns", "rules: [{from: [{source: {notNamespaces: [bar]}}]}]")], conn(src=CLIENT), False, "no_allow_match"),
    ("namespace-wildcard", [ap("ns", "rules: [{from: [{source: {namespaces: ['b*']}}]}]")], conn(src=CLIENT), True, "allowed"),
    ("namespace-needs-identity", [ap("ns", "rules: [{from: [{source: {namespaces: [foo]}}]}]")], conn(src=None), False, "no_allow_match"),
    # -- ip blocks
    ("deny-ipblock", [ap("d", "action: DENY\nrules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]")],
     conn(), False, "denied_by_policy"),
    ("deny-ipblock-single-ip", [ap("d", "action: DENY\nrules: [{from: [{source: {ipBlocks: [10.244.1.7]}}]}]")],
     conn(), False, "denied_by_policy"),
    ("deny-ipblock-miss", [ap("d", "action: DENY\nrules: [{from: [{source: {ipBlocks: [10.244.2.0/24]}}]}]")],
     conn(), True, "allowed"),
    ("allow-not-ipblocks", [ap("a", "rules: [{from: [{source: {notIpBlocks: [10.244.1.0/24]}}]}]")],
     conn(ip="10.244.3.3"), True, "allowed"),
    ("allow-not-ipblocks-excluded", [ap("a", "rules: [{from: [{source: {notIpBlocks: [10.244.1.0/24]}}]}]")],
     conn(), False, "no_allow_match"),
    # -- ports
    ("allow-port", [ap("a", "rules: [{to: [{operation: {ports: ['8080']}}]}]")], conn(), True, "allowed"),
    ("allow-port-miss", [ap("a", "rules: [{to: [{operation: {ports: ['9090']}}]}]")], conn(), False, "no_allow_match"),
    ("allow-port-int", [ap("a", "rules: [{to: [{operation: {ports: [8080]}}]}]")], conn(), True, "allowed"),
    ("deny-not-ports", [ap("d", "action: DENY\nrules: [{to: [{operation: {notPorts: ['8080']}}]}]")],
     conn(port=9090), False, "denied_by_policy"),
    ("deny-not-ports-pass", [ap("d", "action: DENY\nrules: [{to: [{operation: {notPorts: ['8080']}}]}]")],
     conn(), True, "allowed"),
    # -- AND inside a source, OR across sources and rules
    ("source-fields-and", [ap("a", "rules: [{from: [{source: {namespaces: [foo], ipBlocks: [10.9.0.0/16]}}]}]")],
     conn(), False, "no_allow_match"),
    ("sources-or", [ap("a", "rules: [{from: [{source: {namespaces: [zzz]}}, {source: {ipBlocks: [10.244.1.0/24]}}]}]")],
     conn(), True, "allowed"),
    ("rules-or", [ap("a", "rules: [{from: [{source: {namespaces: [zzz]}}]}, {to: [{operation: {ports: ['8080']}}]}]")],
     conn(), True, "allowed"),
    ("from-and-to-and", [ap("a", "rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: ['9999']}}]}]")],
     conn(), False, "no_allow_match"),
    # -- when (L4 keys)
    ("when-source-ip", [ap("a", "rules: [{when: [{key: source.ip, values: [10.244.1.0/24]}]}]")], conn(), True, "allowed"),
    ("when-source-namespace", [ap("a", "rules: [{when: [{key: source.namespace, values: [bar]}]}]")], conn(src=CLIENT), True, "allowed"),
    ("when-source-principal-not", [ap("a", "rules: [{when: [{key: source.principal, notValues: [cluster.local/ns/foo/sa/sleep]}]}]")],
     conn(), False, "no_allow_match"),
    ("when-destination-port", [ap("a", "rules: [{when: [{key: destination.port, values: ['8080']}]}]")], conn(), True, "allowed"),
    ("when-destination-ip", [ap("a", "rules: [{when: [{key: destination.ip, values: [10.244.0.0/24]}]}]")], conn(), True, "allowed"),
    ("when-all-must-match", [ap("a", "rules: [{when: [{key: destination.port, values: ['8080']}, {key: source.namespace, values: [bar]}]}]")],
     conn(), False, "no_allow_match"),
    # -- ALLOW/DENY interplay
    ("deny-beats-allow", [ALLOW_SLEEP, ap("d", "action: DENY\nrules: [{to: [{operation: {ports: ['8080']}}]}]")],
     conn(), False, "denied_by_policy"),
    ("allow-any-of-several", [ALLOW_SLEEP, ap("a2", "rules: [{from: [{source: {namespaces: [bar]}}]}]")],
     conn(src=CLIENT), True, "allowed"),
    ("deny-miss-allow-hit", [ALLOW_SLEEP, ap("d", "action: DENY\nrules: [{from: [{source: {namespaces: [bar]}}]}]")],
     conn(), True, "allowed"),
    # -- scope
    ("selector-other-workload-ignored", [ap("a", "selector: {matchLabels: {app: db}}\nrules: []")], conn(), True, "allowed"),
    ("other-namespace-ignored", [ap("a", "rules: []", ns="bar")], conn(), True, "allowed"),
    ("root-namespace-is-mesh-wide", [ap("a", "rules: []", ns="istio-system")], conn(), False, "no_allow_match"),
    ("root-namespace-selector", [ap("a", "selector: {matchLabels: {version: v1}}\naction: DENY\nrules: [{}]", ns="istio-system")],
     conn(), False, "denied_by_policy"),
    ("target-refs-are-for-waypoints", [ap("a", "targetRefs: [{kind: Service, group: '', name: web}]\nrules: []")],
     conn(), True, "allowed"),
    # -- L7 fields fail closed
    ("l7-allow-rule-never-matches", [ap("a", "rules: [{to: [{operation: {methods: [GET]}}]}]")], conn(), False, "no_allow_match"),
    ("l7-deny-rule-matches-on-l4-part", [ap("d", "action: DENY\nrules: [{to: [{operation: {ports: ['8080'], paths: [/admin]}}]}]")],
     conn(), False, "denied_by_policy"),
    ("l7-deny-rule-l4-part-miss", [ap("d", "action: DENY\nrules: [{to: [{operation: {ports: ['9'], paths: [/admin]}}]}]")],
     conn(), True, "allowed"),
    ("l7-when-header-allow", [ap("a", "rules: [{when: [{key: 'request.headers[x-token]', values: [abc]}]}]")],
     conn(), False, "no_allow_match"),
    # -- dry run
    ("dry-run-not-enforced", [ap("d", "action: DENY\nrules: [{}]", annotations=", annotations: {istio.io/dry-run: 'true'}")],
     conn(), True, "allowed"),
    # -- PeerAuthentication
    ("strict-namespace-refuses-plaintext", [pa("s", "mtls: {mode: STRICT}")], conn(src=None), False, "mtls_required"),
    ("strict-allows-mtls", [pa("s", "mtls: {mode: STRICT}")], conn(), True, "allowed"),
    ("strict-mesh-wide", [pa("default", "mtls: {mode: STRICT}", ns="istio-system")], conn(src=None), False, "mtls_required"),
    ("permissive-workload-overrides-strict-ns", [pa("s", "mtls: {mode: STRICT}"),
                                                 pa("w", "selector: {matchLabels: {app: web}}\nmtls: {mode: PERMISSIVE}")],
     conn(src=None), True, "allowed"),
    ("port-level-permissive", [pa("w", "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: PERMISSIVE}}")],
     conn(src=None), True, "allowed"),
    ("port-level-other-port-strict", [pa("w", "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: PERMISSIVE}}")],
     conn(src=None, port=9090), False, "mtls_required"),
    ("unset-inherits-mesh-strict", [pa("default", "mtls: {mode: STRICT}", ns="istio-system"), pa("n", "mtls: {mode: UNSET}")],
     conn(src=None), False, "mtls_required"),
    ("namespace-permissive-beats-mesh-strict", [pa("default", "mtls: {mode: STRICT}", ns="istio-system"), pa("n", "mtls: {mode: PERMISSIVE}")],
     conn(src=None), True, "allowed"),
    ("disable-acts-permissive", [pa("n", "mtls: {mode: DISABLE}")], conn(src=None), True, "allowed"),
    ("strict-then-policy", [pa("s", "mtls: {mode: STRICT}"), ALLOW_SLEEP], conn(src=CLIENT), False, "no_allow_match"),
]


@pytest.mark.parametrize("docs, c, allowed, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision(docs, c, allowed, reason):
    d = decide(docs, c)
    assert (d.allowed, d.reason) == (allowed, reason)


@pytest.mark.parametrize("docs, c", [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_indexed_lookup_decides_the_same(docs, c):
    # ztunnel's per-connection path: the state's pre-filtered policies, not all of them.
    objs = load_text("---\n".join(docs), "policies.yaml") if docs else []
    st = ProxyState()
    st.apply_snapshot(Snapshot(version=1, resources=(WEB, *objs)))
    assert evaluate_applicable(st.policies_for(WEB), WEB, c) == decide(docs, c)


def test_case_count():
    assert len(CASES) >= 40


def test_decision_names_the_policy_and_failed_closed_fields():
    d = decide([ap("d", "action: DENY\nrules: [{to: [{operation: {ports: ['8080'], paths: [/admin]}}]}]")], conn())
    assert d.policy == "foo/d"
    assert d.failed_closed == ("foo/d: to[0].operation.paths",)


def test_dry_run_reports_what_it_would_have_done():
    d = decide([ap("d", "action: DENY\nrules: [{}]", annotations=", annotations: {istio.io/dry-run: 'true'}")], conn())
    assert d.allowed and d.dry_run == ("foo/d",)


def test_effective_mtls_default_is_permissive():
    assert effective_mtls([], WEB, 80) is MtlsMode.PERMISSIVE


@pytest.mark.parametrize("doc, field, words", [
    (ap("x", "action: AUDIT"), "spec.action", "not supported"),
    (ap("x", "action: ALOW"), "spec.action", "ALLOW or DENY"),
    (ap("x", "rules: [{from: [{source: {principal: [a]}}]}]"), "spec.rules[0].from[0].source.principal", "unknown field"),
    (ap("x", "rules: [{to: [{operation: {ports: [http]}}]}]"), "spec.rules[0].to[0].operation.ports[0]", "port number"),
    (ap("x", "rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]"), "spec.rules[0].from[0].source.ipBlocks[0]", "IPv4"),
    (ap("x", "rules: [{when: [{key: source.ip}]}]"), "spec.rules[0].when[0]", "values"),
    (ap("x", "rules: [{when: [{key: source.ip, values: [nope]}]}]"), "spec.rules[0].when[0]", "IPv4"),
    (ap("x", "selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Service, name: a}]"), "spec.selector", "mutually exclusive"),
    (pa("x", "mtls: {mode: STRICTER}"), "spec.mtls.mode", "STRICT"),
    (pa("x", "portLevelMtls: {8080: {mode: STRICT}}"), "spec.portLevelMtls", "selector"),
])
def test_bad_policies_are_refused_with_the_field(doc, field, words):
    with pytest.raises(ConfigError) as e:
        load_text(doc, "bad.yaml")
    text = str(e.value)
    assert "bad.yaml" in text and field in text and words in text, text

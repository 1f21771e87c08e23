"""End to end (root) through real pods and the real waypoint: VirtualService header, query and method
matches; HTTPRoute precedence (exact > prefix > regex), 404 on no match, port-scoped parentRefs,
producer vs consumer routes; each HTTPRoute filter (header modifiers, URL rewrite, redirects with
their exact Location, request mirror); weights 70/30; L7 AuthorizationPolicy by path, method and
principal with Istio's exact 403; Istio's accepted-but-once-refused forms applied through
`ambient apply`; and the waypoint's metrics parsed by prometheus_client's own parser."""
import asyncio
import json
import os
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.admin_http import get_unix

from .cluster_helper import (HTTP_PORTS, IDLE, app_pod_yaml, cluster_fixture, namespace_yaml, nodes_yaml,
                             service_accounts_yaml, service_yaml, waypoint_yaml)

NAME = f"wr{os.getpid() % 100000}"

# Echo backend: the request as JSON (pod, method, path, headers); GET /_count/<path> answers how
# many requests for <path> this pod has seen (mirrors are observed that way).
HTTPD = '''
import collections, http.server, json, os, sys
SEEN = collections.Counter()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        if self.path.startswith("/_count/"):
            body = json.dumps({"count": SEEN["/" + self.path[len("/_count/"):]]}).encode()
        else:
            SEEN[self.path] += 1
            hs = {}
            for k, v in self.headers.items():   # repeated fields joined, as a proxy may fold them
                hs[k.lower()] = hs[k.lower()] + ", " + v if k.lower() in hs else v
            body = json.dumps({"pod": os.environ["POD_NAME"], "method": self.command, "path": self.path,
                               "headers": hs}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_DELETE = do_PUT = answer
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# Requests from a JSON file: [{host, port, method, path, headers, n}], keep-alive per host:port;
# for each: the last response's status, headers and body (JSON when it parses) and, over its n
# tries, the tally of backend pods.
REQ = '''
import http.client, json, sys
conns, out = {}, []
for q in json.load(open(sys.argv[1])):
    key = (q["host"], q.get("port", 80))
    res = {"pods": {}, "statuses": {}}
    for _ in range(q.get("n", 1)):
        for attempt in (0, 1):
            c = conns.get(key) or http.client.HTTPConnection(*key, timeout=10)
            conns[key] = c
            try:
                c.request(q.get("method", "GET"), q["path"], headers=q.get("headers", {}))
                r = c.getresponse()
                raw = r.read()
                break
            except (OSError, http.client.HTTPException):
                c.close()
                conns.pop(key, None)
                if attempt:
                    raise
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        res.update(status=r.status, headers={k.lower(): v for k, v in r.getheaders()}, body=body)
        res["statuses"][str(r.status)] = res["statuses"].get(str(r.status), 0) + 1
        if isinstance(body, dict) and "pod" in body:
            res["pods"][body["pod"]] = res["pods"].get(body["pod"], 0) + 1
    out.append(res)
print(json.dumps(out))
'''


HTTPD_CMD = ["python3", "httpd.py", "8080"]
CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True) + namespace_yaml("front", ambient=True)
           + service_accounts_yaml(("shop", "web"), ("shop", "client"), ("front", "outsider"))
           + app_pod_yaml("web-v1", "shop", "n2", HTTPD_CMD, {"app": "web", "version": "v1"}, sa="web")
           + app_pod_yaml("web-v2", "shop", "n2", HTTPD_CMD, {"app": "web", "version": "v2"}, sa="web")
           + app_pod_yaml("client", "shop", "n1", IDLE, sa="client")
           + app_pod_yaml("client", "front", "n1", IDLE, {"app": "outsider"}, sa="outsider")
           + service_yaml("web", "shop", {"app": "web"}, HTTP_PORTS + [{"name": "http-alt", "port": 9080,
                                                                        "targetPort": 8080}], waypoint="wp")
           + service_yaml("web-v1", "shop", {"app": "web", "version": "v1"}, waypoint="wp")
           + service_yaml("web-v2", "shop", {"app": "web", "version": "v2"}, waypoint="wp") + waypoint_yaml())

cluster = cluster_fixture(NAME, "wproute", CLUSTER, {"httpd.py": HTTPD, "req.py": REQ})


def requests(cluster, queries, ns="shop"):
    """Run `queries` (dicts for req.py; `host` is a Service name, replaced by its VIP) from `ns`/client."""
    vips = {s["name"]: s["cluster_ip"] for s in cluster.status()["services"]}
    qs = [{**q, "host": vips[q["host"]]} for q in queries]
    path = cluster.write(f"q-{ns}.json", json.dumps(qs))
    p = cluster.ambient("exec", "-n", ns, "client", "--", "python3", "req.py", path, timeout=180)
    return json.loads(p.stdout.strip().splitlines()[-1])


def q(path="/", *, host="web", port=80, method="GET", headers=None, n=1):
    return {"host": host, "port": port, "method": method, "path": path, "headers": headers or {}, "n": n}


class applied:
    """`with applied(cluster, yaml):` applies, then deletes on the way out."""

    def __init__(self, cluster, text, name):
        self.cluster, self.text, self.name = cluster, textwrap.dedent(text), name

    def __enter__(self):
        return self.cluster.apply(self.text, f"{self.name}.yaml")

    def __exit__(self, *exc):
        self.cluster.delete(self.text, f"{self.name}-del.yaml")


SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""


@pytest.mark.root
def test_virtual_service_header_query_and_method_matches(cluster):
    vs = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: web, namespace: shop}
    spec:
      hosts: [web]
      http:
      - match: [{headers: {end-user: {exact: jason}}}]
        route: [{destination: {host: web, subset: v2}}]
      - match: [{queryParams: {canary: {exact: "1"}}}, {method: {exact: DELETE}}]
        route: [{destination: {host: web, subset: v2}}]
      - route: [{destination: {host: web, subset: v1}}]
    """
    with applied(cluster, textwrap.dedent(vs) + "---\n" + SUBSETS, "vs-match"):
        got = requests(cluster, [q(headers={"end-user": "jason"}, n=10), q(headers={"end-user": "bob"}, n=10),
                                 q("/?canary=1", n=10), q("/?canary=0", n=10), q(method="DELETE", n=10), q(n=10)])
    assert [r["pods"] for r in got] == [{"web-v2": 10}, {"web-v1": 10}, {"web-v2": 10}, {"web-v1": 10},
                                        {"web-v2": 10}, {"web-v1": 10}], got


def rule_tag(tag):
    return f"filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: x-rule, value: {tag}}}]}}}}]"


PRODUCER = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
  - matches: [{{path: {{type: RegularExpression, value: "/api/.*"}}}}, {{path: {{type: RegularExpression, value: "/r[0-9]+"}}}}]
    {rule_tag("regex")}
    backendRefs: [{{name: web-v2, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    {rule_tag("prefix")}
    backendRefs: [{{name: web-v1, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /api/exact}}}}]
    {rule_tag("exact")}
    backendRefs: [{{name: web-v2, port: 80}}]
"""

CONSUMER = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-for-front, namespace: front}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, namespace: shop}}]
  rules:
  - {rule_tag("consumer")}
    backendRefs: [{{name: web-v1, namespace: shop, port: 80}}]
"""


@pytest.mark.root
def test_http_route_precedence_404_port_scope_and_consumer_routes(cluster):
    with applied(cluster, PRODUCER + "---\n" + CONSUMER, "routes"):
        shop = requests(cluster, [q("/api/exact"), q("/api/other"), q("/api"), q("/r42"), q("/apix"), q("/"),
                                  q("/apix", port=9080, n=10)])
        front = requests(cluster, [q("/api/exact"), q("/apix"), q("/apix", port=9080)], ns="front")
    tags = [(r["status"], r["headers"].get("x-rule"), r["body"].get("pod") if isinstance(r["body"], dict) else None)
            for r in shop[:6]]
    assert tags == [(200, "exact", "web-v2"),      # Exact beats the prefix and the regex
                    (200, "prefix", "web-v1"),     # a prefix beats a regex (both match)
                    (200, "prefix", "web-v1"),
                    (200, "regex", "web-v2"),
                    (404, None, None),             # /apix: PathPrefix /api matches whole segments only
                    (404, None, None)], shop       # once a route attaches, no match is 404
    assert shop[4]["body"] == "" and shop[4]["headers"].get("content-length") == "0"
    # The route names port 80; port 9080 of the same Service keeps default routing (both pods).
    assert shop[6]["statuses"] == {"200": 10} and set(shop[6]["pods"]) <= {"web-v1", "web-v2"}
    assert "x-rule" not in shop[6]["headers"]
    # A client in `front` gets its namespace's consumer route instead of the producer's, on every port.
    assert [(r["status"], r["headers"].get("x-rule"), r["body"]["pod"]) for r in front] == [
        (200, "consumer", "web-v1")] * 3, front


FILTERS = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {value: /hdr}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: forced}]
        add: [{name: x-add, value: added}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: content-type, value: text/x-set}]
        add: [{name: x-resp, value: "1"}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {value: /go-secure}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: secure.example, port: 443, statusCode: 301}}]
  - matches: [{path: {value: /go-port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /landing}}}]
  - matches: [{path: {value: /go-prefix}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}, statusCode: 308}}]
  - matches: [{path: {value: /mirrored}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: web-v2, port: 80}}}]
    backendRefs: [{name: web-v1, port: 80}]
"""


@pytest.mark.root
def test_http_route_filters_and_redirect_locations(cluster):
    with applied(cluster, FILTERS, "filters"):
        got = requests(cluster, [
            q("/hdr", headers={"x-set": "mine", "x-add": "mine", "x-drop": "bye"}),
            q("/old/page?k=v"), q("/full?k=v"),
            q("/go-secure/a?x=1"), q("/go-port/a?x=1", headers={"host": "web.shop:80"}), q("/go-prefix/deep/path"),
            q("/mirrored", n=5)])
        mirrored = requests(cluster, [q("/_count/mirrored", host="web-v2")])[0]["body"]["count"]
    hdr, old, full, secure, port, prefix, mirror = got
    h = hdr["body"]["headers"]
    assert (h["x-set"], h["x-add"], "x-drop" in h) == ("forced", "mine, added", False), h  # set replaces, add appends
    assert hdr["headers"]["content-type"] == "text/x-set" and hdr["headers"]["x-resp"] == "1"
    assert (old["body"]["path"], old["body"]["headers"]["host"]) == ("/new/page?k=v", "rewritten.example")
    assert full["body"]["path"] == "/replaced?k=v"
    assert (secure["status"], secure["headers"]["location"]) == (301, "https://secure.example/go-secure/a?x=1")
    assert (port["status"], port["headers"]["location"]) == (302, "http://web.shop:8443/landing?x=1")
    assert (prefix["status"], prefix["headers"]["location"]) == (308, "http://other.example/moved/deep/path")
    assert mirror["pods"] == {"web-v1": 5} and mirrored == 5, (mirror, mirrored)


@pytest.mark.root
def test_http_route_weights_70_30(cluster):
    weights = """
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web, namespace: shop}
    spec:
      parentRefs: [{group: "", kind: Service, name: web}]
      rules:
      - backendRefs: [{name: web-v1, port: 80, weight: 70}, {name: web-v2, port: 80, weight: 30}]
    """
    with applied(cluster, weights, "weights"):
        [r] = requests(cluster, [q(n=1000)])
    assert r["statuses"] == {"200": 1000}, r["statuses"]
    share = r["pods"].get("web-v2", 0) / 1000
    print(f"weights 70/30: v2 share {share:.1%} of 1000 ({r['pods']})")
    assert abs(share - 0.30) <= 0.05, r["pods"]


AUTHZ = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {methods: [GET, HEAD], paths: [/public/*, /api/exact]}}]
  - from: [{source: {namespaces: [front]}}]
    to: [{operation: {methods: [GET], paths: [/open]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-deny, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules:
  - to: [{operation: {paths: [/public/secret]}}]
"""


@pytest.mark.root
def test_l7_authorization_by_path_method_and_principal_with_istios_403(cluster):
    with applied(cluster, AUTHZ, "authz"):
        shop = requests(cluster, [q("/public/a"), q("/public/a", method="POST"), q("/private"), q("/api/exact"),
                                  q("/public/secret"), q("/open")])
        front = requests(cluster, [q("/public/a"), q("/open"), q("/open", method="DELETE")], ns="front")
    assert [r["status"] for r in shop] == [200, 403, 403, 200, 403, 403], shop
    assert [r["status"] for r in front] == [403, 200, 403], front
    for r in (shop[1], shop[2], shop[4], front[0], front[2]):
        assert r["body"] == "RBAC: access denied" and r["headers"]["content-type"] == "text/plain", r
    assert shop[0]["body"]["pod"] in ("web-v1", "web-v2")


# Item 9 of issue 8: each form Istio accepts that `apply` used to refuse, in one apply of two
# files, the second redefining the first's VirtualService (kubectl takes the last).
ISTIO_FORMS_A = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-istio, namespace: shop}
spec:
  hosts: [web-v2]
  http:
  - route: [{destination: {host: web-v2}}]
"""
ISTIO_FORMS_B = """
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: web-istio, namespace: shop}
spec:
  hosts: [web-v2]
  http:
  - match: [{withoutHeaders: {x-skip: {}}, headers: {end-user: {regex: "*"}}}, {sourceLabels: {app: client}}]
    fault:
      delay: {fixedDelay: 0.001s, percent: 0}
      abort: {httpStatus: 600, percentage: {value: 0}}
    retries: {attempts: 1, retryIgnorePreviousHosts: true, backoff: 0.01s}
    mirrors: [{destination: {host: web-v1}, percentage: {value: 0}}]
    route: [{destination: {host: web-v1}}]
  - match: [{uri: {prefix: /grpc-abort}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0}}}
    mirror: {host: web-v1}
    mirrorPercent: 0
    route: [{destination: {host: web-v2}}]
  tcp:
  - route: [{destination: {host: web-v2}}]
  tls:
  - match: [{sniHosts: [web-v2.shop.svc.cluster.local]}]
    route: [{destination: {host: web-v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-v2, namespace: shop}
spec:
  host: web-v2
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    outlierDetection:
      consecutiveErrors: 5
      splitExternalLocalOriginErrors: true
      consecutiveLocalOriginFailures: 3
    connectionPool:
      tcp: {tcpKeepalive: {time: 60s}, maxConnectionDuration: 1h}
      http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true, maxConcurrentStreams: 100}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


@pytest.mark.root
def test_istio_forms_once_refused_apply_with_warnings_and_route(cluster):
    a = cluster.write("istio-a.yaml", ISTIO_FORMS_A)
    b = cluster.write("istio-b.yaml", ISTIO_FORMS_B)
    try:
        out = cluster.ambient("apply", a, b)
        text = out.stdout + out.stderr
        for field in ("spec.http[0].match[1].sourceLabels", "spec.http[0].fault.delay.percent",
                      "spec.http[1].mirrorPercent", "spec.tcp", "spec.tls",
                      "spec.trafficPolicy.outlierDetection.consecutiveErrors",
                      "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
                      "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams", "apiVersion"):
            assert field in text, (field, text)
        assert "also defined at" in text and "this last definition is used" in text, text
        warnings = cluster.status()["warnings"]
        assert any("sourceLabels" in w for w in warnings.get("VirtualService shop/web-istio", [])), warnings
        assert "Gateway shop/ingress" in warnings and "DestinationRule shop/web-v2" in warnings, warnings
        # The last definition is the one in force, and it routes: `regex: "*"` is presence,
        # withoutHeaders excludes, the sourceLabels block is skipped at a waypoint (Istio), and an
        # unmatched request is 404 once a VirtualService binds the host.
        got = requests(cluster, [q(host="web-v2", headers={"end-user": "x"}, n=5),
                                 q(host="web-v2", headers={"end-user": "x", "x-skip": "1"}),
                                 q(host="web-v2"), q("/grpc-abort", host="web-v2")])
        assert got[0]["pods"] == {"web-v1": 5}, got
        assert [r["status"] for r in got[1:]] == [404, 404, 200] and got[3]["body"]["pod"] == "web-v2", got
    finally:
        cluster.ambient("delete", b)


ISTIO_DURATION_BUCKETS = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                          600000, 1800000, 3600000]


@pytest.mark.root
def test_waypoint_metrics_parse_with_prometheus_client_and_carry_istios_labels(cluster):
    requests(cluster, [q(host="web-v2", n=3)])
    sock = os.path.join(cluster.paths.waypoint_dir("shop", "wp"), "admin.sock")
    status, body = asyncio.run(get_unix(sock, "/metrics"))
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # One series per route (the `route` label: the matched rule); the one without a route.
    found = [s for s in fams["istio_requests"].samples if s.name == "istio_requests_total"
             and s.labels.get("destination_service_name") == "web-v2" and s.labels.get("response_code") == "200"
             and s.labels.get("source_workload") == "client" and s.labels.get("route") == "default"]
    assert len(found) == 1, [x.labels for x in found]
    [s] = found
    want = {"reporter": "waypoint", "source_workload": "client", "source_workload_namespace": "shop",
            "source_principal": "spiffe://cluster.local/ns/shop/sa/client", "source_app": "client",
            "destination_service": "web-v2.shop.svc.cluster.local", "destination_service_name": "web-v2",
            "destination_service_namespace": "shop", "destination_workload": "web-v2",
            "destination_workload_namespace": "shop", "destination_principal": "spiffe://cluster.local/ns/shop/sa/web",
            "destination_app": "web", "destination_version": "v2", "response_code": "200", "response_flags": "-",
            "request_protocol": "http", "connection_security_policy": "mutual_tls", "grpc_response_status": ""}
    assert {k: s.labels.get(k) for k in want} == want, s.labels
    assert s.value >= 3
    dur = fams["istio_request_duration_milliseconds"]
    assert dur.type == "histogram"
    les = sorted({float(x.labels["le"]) for x in dur.samples if x.name.endswith("_bucket") and x.labels["le"] != "+Inf"})
    assert les == ISTIO_DURATION_BUCKETS
    for name in ("istio_request_bytes", "istio_response_bytes"):
        assert fams[name].type == "histogram"
        counts = [x for x in fams[name].samples if x.name == name + "_count"
                  and x.labels.get("destination_service_name") == "web-v2"]
        assert counts and sum(x.value for x in counts) >= 3, name

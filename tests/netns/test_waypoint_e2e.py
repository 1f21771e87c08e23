"""End to end (root) through the real waypoint: meshed client pod -> its ztunnel -> HBONE -> waypoint
-> HBONE -> the server pod's ztunnel -> the server; an L4 policy that admits only the waypoint's
principal; and the seed article's canary VirtualService (95/5 over v1/v2 subsets)."""
import json
import os

import pytest

from .cluster_helper import (app_pod_yaml, cluster_fixture, idle_pod_yaml, namespace_yaml, nodes_yaml,
                             service_accounts_yaml, service_yaml, wait_for, waypoint_yaml)

NAME = f"we{os.getpid() % 100000}"
WP_PRINCIPAL = "spiffe://cluster.local/ns/shop/sa/wp"

HTTPD = '''
import http.server, os, sys
BODY = (os.environ["POD_NAME"] + "\\n").encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # head and body in one write (else Nagle + delayed ACK: 40 ms a response)
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# N GETs over keep-alive connections (reconnecting when one closes); a tally as JSON.
HTTPGET = '''
import http.client, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"status": {}, "body": {}, "errors": [], "connections": 0}
conn = None
t0 = time.monotonic()
deadline = t0 + 120
for i in range(n):
    if time.monotonic() > deadline:
        out["errors"].append("deadline")
        break
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            out["connections"] += 1
        conn.request("GET", "/", headers={"host": "payment-service"})
        r = conn.getresponse()
        body = r.read().decode().strip()
        out["status"][str(r.status)] = out["status"].get(str(r.status), 0) + 1
        out["body"][body] = out["body"].get(body, 0) + 1
        if r.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")
        if conn is not None:
            conn.close()
        conn = None
out["seconds"] = round(time.monotonic() - t0, 2)
print(json.dumps(out))
'''


def server_pod(name, version, node):
    return app_pod_yaml(name, "shop", node, ["python3", "httpd.py", "8080"], {"app": "payment", "version": version},
                        sa="payment", container="httpd")


CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True) + service_accounts_yaml(("shop", "payment"))
           + server_pod("payment-v1", "v1", "n2") + server_pod("payment-v2", "v2", "n2")
           + idle_pod_yaml("client", "shop", "n1")
           + service_yaml("payment-service", "shop", {"app": "payment"}, waypoint="wp") + waypoint_yaml())

# The seed article's canary, as written there (plus the namespace), and the subsets it names.
CANARY = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: payment-service
  namespace: shop
spec:
  hosts:
  - payment-service
  http:
  - route:
    - destination:
        host: payment-service
        subset: v1
      weight: 95
    - destination:
        host: payment-service
        subset: v2
      weight: 5
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: payment-service
  namespace: shop
spec:
  host: payment-service
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"""

ONLY_VIA_WAYPOINT = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-via-waypoint, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: payment}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{WP_PRINCIPAL.removeprefix('spiffe://')}"]}}}}]
"""

cluster = cluster_fixture(NAME, "wpe2e", CLUSTER, {"httpd.py": HTTPD, "httpget.py": HTTPGET})


def get(cluster, host, n=1, port=80):
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "httpget.py", host, str(port), str(n),
                        timeout=180)
    return json.loads(p.stdout)


def vip(st):
    return next(s["cluster_ip"] for s in st["services"] if s["name"] == "payment-service")


def log_entries(cluster, node, since=0):
    with open(os.path.join(cluster.paths.logs_dir, f"ztunnel-{node}.log"), errors="replace") as f:
        lines = f.readlines()[since:]
    return [json.loads(ln[ln.index("{"):]) for ln in lines if "ambient.access" in ln and "{" in ln]


def log_len(cluster, node):
    with open(os.path.join(cluster.paths.logs_dir, f"ztunnel-{node}.log"), errors="replace") as f:
        return len(f.readlines())


@pytest.mark.root
def test_http_request_goes_client_ztunnel_waypoint_server(cluster):
    st = cluster.status()
    wp = next(w for w in st["waypoints"] if w["name"] == "wp")
    assert wp["ready"] and wp["used_by"]["services"] == ["shop/payment-service"]
    n1 = log_len(cluster, "n1")
    got = get(cluster, vip(st), n=20)
    assert got["status"] == {"200": 20} and not got["errors"], got
    assert set(got["body"]) <= {"payment-v1", "payment-v2"}
    # The client's ztunnel sent it to the waypoint, expecting the waypoint's identity...
    wait_for(lambda: [e for e in log_entries(cluster, "n1", n1) if e.get("dst.service", "").startswith("payment")])
    out = [e for e in log_entries(cluster, "n1", n1) if e.get("dst.service", "").startswith("payment")]
    assert out[0]["dst.hbone_addr"] == f"{wp['ip']}:15008" and out[0]["dst.identity"] == WP_PRINCIPAL
    assert out[0]["src.identity"] == "spiffe://cluster.local/ns/shop/sa/default" and "error" not in out[0]
    # (The servers' ztunnel sees the waypoint's principal as the source: the next test shows it
    # with a policy; its access log has no line yet, the waypoint keeps its upstream tunnels open.)


@pytest.mark.root
def test_policy_admitting_only_the_waypoint_stops_direct_calls(cluster):
    st = cluster.status()
    pod_ip = next(p["ip"] for p in st["pods"] if p["name"] == "payment-v1")
    assert get(cluster, pod_ip, port=8080)["status"] == {"200": 1}  # no policy yet: the pod IP is open
    cluster.apply(ONLY_VIA_WAYPOINT, "policy.yaml")
    try:
        direct = get(cluster, pod_ip, port=8080)
        assert direct["status"] == {} and direct["errors"], direct
        via = get(cluster, vip(st), n=10)
        assert via["status"] == {"200": 10} and not via["errors"], via
    finally:
        cluster.delete(ONLY_VIA_WAYPOINT, "policy-del.yaml")


@pytest.mark.root
def test_canary_virtual_service_sends_five_percent_to_v2(cluster):
    cluster.apply(CANARY, "canary.yaml")
    try:
        got = get(cluster, vip(cluster.status()), n=2000)
    finally:
        cluster.delete(CANARY, "canary-del.yaml")
    assert got["status"] == {"200": 2000} and not got["errors"], {k: v for k, v in got.items() if k != "errors"}
    v2 = got["body"].get("payment-v2", 0) / 2000
    print(f"canary: v2 share {v2:.2%} of 2000 ({got['body']}) in {got['seconds']}s over "
          f"{got['connections']} connection(s)")
    assert set(got["body"]) == {"payment-v1", "payment-v2"}
    assert abs(v2 - 0.05) <= 0.015, got["body"]


ROUTE_STATUS = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payment-route, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: payment-service, port: 80}
  - {name: wp}
  rules:
  - backendRefs:
    - {name: payment-service, port: 80, weight: 1}
    - {name: payment-canary, port: 80, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ghost, namespace: shop}
spec:
  hosts: [ghost]
  http:
  - route: [{destination: {host: payment-service}}]
"""


@pytest.mark.root
def test_ambient_status_shows_route_conditions_and_unresolved_hosts(cluster):
    cluster.apply(ROUTE_STATUS, "route-status.yaml")
    try:
        routes = cluster.status()["routes"]
        [r] = routes["http_routes"]
        assert r["route"] == "shop/payment-route"
        got = {p["parent"]: [(c["type"], c["status"], c["reason"]) for c in p["conditions"]] for p in r["parents"]}
        assert got == {
            "Service shop/payment-service:80": [("Accepted", "True", "Accepted"),
                                                ("ResolvedRefs", "False", "BackendNotFound")],
            "Gateway shop/wp": [("Accepted", "False", "NotAllowedByListeners"),
                                ("ResolvedRefs", "False", "BackendNotFound")]}
        [vs] = routes["virtual_services"]
        assert vs == {"virtual_service": "shop/ghost", "resolved": False, "hosts": {"ghost": []},
                      "destinations": {"payment-service": ["shop/payment-service"]}}
        text = cluster.ambient("status").stdout
        section = text[text.index("\nROUTES\n"):]
        assert "HTTPRoute shop/payment-route  Service shop/payment-service:80  True Accepted" in section, section
        assert "False BackendNotFound  backendRef shop/payment-canary: Service not found" in section, section
        assert "Gateway shop/wp" in section and "False NotAllowedByListeners" in section, section
        assert "VirtualService shop/ghost" in section and "names no Service: ghost" in section, section
        # What the status says is what the waypoint does: the missing backend has weight 0, so
        # every request still reaches payment-service.
        got = get(cluster, vip(cluster.status()), n=10)
        assert got["status"] == {"200": 10} and not got["errors"], got
    finally:
        cluster.delete(ROUTE_STATUS, "route-status-del.yaml")

"""End to end (root) through real pods and the real waypoint: peak-EWMA steering away from a 10x slower
replica, outlier detection ejecting a replica that answers 503 and bringing it back after the ejection
time, and the maxConnections + http1MaxPendingRequests circuit breaker answering 503 UO beyond the
configured concurrency (with the waypoint's envoy_cluster_* counters agreeing).

Each replica runs a small HTTP server with a control endpoint, `/_control?delay_ms=&status=`, which the
client pod calls on the replica's pod IP directly (pod-addressed traffic does not go through the
Service's waypoint) to make that one replica slow or failing."""
import asyncio
import json
import math
import os
import textwrap

import pytest

from mesh.admin_http import get_unix

from .cluster_helper import (app_pod_yaml, cluster_fixture, idle_pod_yaml, namespace_yaml, nodes_yaml,
                             service_accounts_yaml, service_yaml, waypoint_yaml)

NAME = f"wn{os.getpid() % 100000}"
HOST = "web-service"

HTTPD = '''
import http.server, os, sys, time, urllib.parse
NAME = os.environ["POD_NAME"]
STATE = {"delay_ms": 0, "status": 200}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # head and body in one write (else Nagle + delayed ACK: 40 ms a response)
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/_control":
            for k, v in urllib.parse.parse_qsl(url.query):
                STATE[k] = int(v)
            status, body = 200, ("ok %s %s\\n" % (NAME, STATE)).encode()
        else:
            if STATE["delay_ms"]:
                time.sleep(STATE["delay_ms"] / 1000.0)
            status, body = STATE["status"], (NAME + "\\n").encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# The client: a JSON list of steps on argv, a JSON list of results on stdout. Steps:
#   {"control": ip, "query": "status=503"}           one GET /_control on ip:8080
#   {"seq": n, "until_body": name?, "until_status": s?, "count": k?, "sleep_ms": m?, "max_s": t?}
#        serial GETs to the Service over one keep-alive connection; stops after n, or when the
#        body is `until_body` / the status `until_status` has been seen `count` times, or after max_s
#   {"par": c}                                         c GETs at once, each on its own connection
CLIENT = '''
import http.client, json, sys, threading, time
host = sys.argv[1]
steps = json.loads(sys.argv[2])
out = []
def one(conn):
    conn.request("GET", "/", headers={"host": "''' + HOST + '''"})
    r = conn.getresponse()
    body = r.read().decode().strip()
    return [round(time.monotonic(), 4), r.status, body, r.getheader("x-envoy-overloaded", "")]
for st in steps:
    if "control" in st:
        c = http.client.HTTPConnection(st["control"], 8080, timeout=10)
        c.request("GET", "/_control?" + st["query"])
        r = c.getresponse()
        out.append({"control": r.status, "body": r.read().decode().strip()})
        c.close()
    elif "seq" in st:
        rows, conn, seen = [], None, 0
        t_end = time.monotonic() + st.get("max_s", 120)
        for i in range(st["seq"]):
            if time.monotonic() > t_end:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, 80, timeout=10)
                row = one(conn)
            except Exception as e:
                rows.append([round(time.monotonic(), 4), 0, type(e).__name__ + ": " + str(e), ""])
                conn = None
                continue
            rows.append(row)
            if row[2] == st.get("until_body") or row[1] == st.get("until_status"):
                seen += 1
                if seen >= st.get("count", 1):
                    break
            if st.get("sleep_ms"):
                time.sleep(st["sleep_ms"] / 1000.0)
        if conn is not None:
            conn.close()
        out.append({"rows": rows})
    elif "par" in st:
        rows, lock = [], threading.Lock()
        conns = [http.client.HTTPConnection(host, 80, timeout=30) for _ in range(st["par"])]
        barrier = threading.Barrier(st["par"])
        def run(conn):
            barrier.wait()
            try:
                row = one(conn)
            except Exception as e:
                row = [round(time.monotonic(), 4), 0, type(e).__name__ + ": " + str(e), ""]
            with lock:
                rows.append(row)
            conn.close()
        ts = [threading.Thread(target=run, args=(c,)) for c in conns]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out.append({"rows": rows})
print(json.dumps(out))
'''


def server_pod(name, version, node):
    return app_pod_yaml(name, "shop", node, ["python3", "httpd.py", "8080"], {"app": "web", "version": version},
                        sa="web", container="httpd")


CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True) + service_accounts_yaml(("shop", "web"))
           + server_pod("web-a", "v1", "n2") + server_pod("web-b", "v1", "n2") + server_pod("web-c", "v2", "n2")
           + idle_pod_yaml("client", "shop", "n1")
           + service_yaml(HOST, "shop", {"app": "web"}, waypoint="wp") + waypoint_yaml())


def destination_rule(spec: str) -> str:
    return textwrap.dedent(f"""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: web, namespace: shop}}
        spec:
          host: {HOST}
        """) + textwrap.indent(textwrap.dedent(spec), "  ")


cluster = cluster_fixture(NAME, "wpendpoints", CLUSTER, {"httpd.py": HTTPD, "load.py": CLIENT})


def steps(cluster, *plan):
    st = cluster.status()
    vip = next(s["cluster_ip"] for s in st["services"] if s["name"] == HOST)
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "load.py", vip, json.dumps(list(plan)),
                        timeout=240)
    return json.loads(p.stdout)


def pod_ip(cluster, name):
    return cluster.ip(name)


def reset(cluster):
    """Every replica fast and healthy again."""
    ctl = [{"control": pod_ip(cluster, n), "query": "delay_ms=0&status=200"} for n in ("web-a", "web-b", "web-c")]
    assert all(r["control"] == 200 for r in steps(cluster, *ctl))


def waypoint_stats(cluster) -> dict[tuple[str, str], float]:
    """envoy_cluster_* samples of the waypoint's /metrics: {(name, cluster_name): value}."""
    sock = os.path.join(cluster.paths.waypoint_dir("shop", "wp"), "admin.sock")
    status, body = asyncio.run(get_unix(sock, "/metrics"))
    assert status == 200
    out = {}
    for ln in body.decode().splitlines():
        if ln.startswith("envoy_cluster_"):
            name, _, rest = ln.partition('{cluster_name="')
            cname, _, value = rest.rpartition('"} ')
            out[(name, cname)] = float(value)
    return out


@pytest.mark.root
def test_peak_ewma_sends_most_requests_to_the_fast_replicas(cluster):
    reset(cluster)
    try:
        (warm,) = steps(cluster, {"seq": 60})
        t = [r[0] for r in warm["rows"]]
        gaps = sorted(b - a for a, b in zip(t, t[1:]))
        median_ms = gaps[len(gaps) // 2] * 1000      # a whole request as the client sees it
        delay = max(5, math.ceil(10 * median_ms))     # web-c: 10x that (the waypoint sees less than the client)
        (ctl, run) = steps(cluster, {"control": pod_ip(cluster, "web-c"), "query": f"delay_ms={delay}"},
                           {"seq": 200})
        rows = run["rows"]
        assert ctl["control"] == 200 and all(r[1] == 200 for r in rows), rows[:5]
        bodies = [r[2] for r in rows]
        fast = (bodies.count("web-a") + bodies.count("web-b")) / len(bodies)
        print(f"peak EWMA, requests take {median_ms:.1f} ms, web-c {delay} ms slower: {fast:.1%} of "
              f"{len(bodies)} to web-a/web-b (web-c {bodies.count('web-c')})")
        assert len(bodies) == 200 and fast >= 0.8
    finally:
        reset(cluster)


# Round robin, so the failing replica gets every third request whatever the machine's load does to
# latencies (peak EWMA may shun it after one slow answer).
OUTLIER = destination_rule("""
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 4s, maxEjectionPercent: 50}
    """)


@pytest.mark.root
def test_outlier_detection_ejects_a_503_replica_and_brings_it_back_after_the_ejection_time(cluster):
    reset(cluster)
    cluster.apply(OUTLIER, "outlier.yaml")
    try:
        b = pod_ip(cluster, "web-b")
        ctl, fail, window, ctl2, back = steps(
            cluster,
            {"control": b, "query": "status=503"},
            {"seq": 30, "until_status": 503, "count": 3},            # until web-b was ejected
            {"seq": 1000, "max_s": 2.5},                              # well inside its 4 s ejection
            {"control": b, "query": "status=200"},
            {"seq": 2000, "until_body": "web-b", "sleep_ms": 20, "max_s": 40})
        failures = [r for r in fail["rows"] if r[1] == 503]
        assert len(failures) == 3 and all(r[2] == "web-b" for r in failures), fail["rows"][-5:]
        ejected_at = failures[-1][0]
        rows = window["rows"]
        assert len(rows) >= 5 and all(r[1] == 200 and r[2] != "web-b" for r in rows), rows
        came_back = back["rows"][-1]
        assert came_back[2] == "web-b" and came_back[1] == 200, back["rows"][-3:]
        assert all(r[1] == 200 for r in back["rows"])
        print(f"outlier: web-b ejected after 3 x 503, back after {came_back[0] - ejected_at:.1f}s "
              f"(baseEjectionTime 4s, sweeps every 1s)")
        assert came_back[0] - ejected_at >= 3.9
        stats = waypoint_stats(cluster)
        key = f"outbound|80||{HOST}.shop.svc.cluster.local"
        assert stats[("envoy_cluster_outlier_detection_ejections_enforced_total", key)] >= 1
        assert stats[("envoy_cluster_outlier_detection_ejections_active", key)] == 0
    finally:
        cluster.delete(OUTLIER, "outlier-del.yaml")
        reset(cluster)


# Everything to subset v2 (web-c alone), whose connection pool is one connection and one pending request.
CIRCUIT = destination_rule("""
    subsets:
    - name: v2
      labels: {version: v2}
      trafficPolicy:
        connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
    """) + textwrap.dedent(f"""
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: web, namespace: shop}}
    spec:
      hosts: [{HOST}]
      http:
      - route: [{{destination: {{host: {HOST}, subset: v2}}}}]
    """)


@pytest.mark.root
def test_max_connections_and_pending_requests_overflow_is_503_uo(cluster):
    reset(cluster)
    cluster.apply(CIRCUIT, "circuit.yaml")
    key = f"outbound|80|v2|{HOST}.shop.svc.cluster.local"
    try:
        c = pod_ip(cluster, "web-c")
        warm, ctl, two, six = steps(
            cluster,
            {"seq": 3},                                    # one upstream connection, kept alive
            {"control": c, "query": "delay_ms=2500"},
            {"par": 2},                                    # = maxConnections + http1MaxPendingRequests
            {"par": 6})
        assert [r[1] for r in warm["rows"]] == [200] * 3 and {r[2] for r in warm["rows"]} == {"web-c"}
        assert sorted(r[1] for r in two["rows"]) == [200, 200], two["rows"]
        statuses = sorted(r[1] for r in six["rows"])
        print(f"circuit breaker, 6 at once against 1 connection + 1 pending: {statuses}")
        uo = [r for r in six["rows"] if r[1] == 503]
        assert statuses.count(200) >= 2 and len(uo) >= 3 and statuses.count(200) + len(uo) == 6, six["rows"]
        assert all(r[2] == "upstream connect error or disconnect/reset before headers. reset reason: overflow"
                   and r[3] == "true" for r in uo), uo
        stats = waypoint_stats(cluster)
        assert stats[("envoy_cluster_upstream_rq_pending_overflow", key)] == len(uo)
        assert stats[("envoy_cluster_upstream_cx_overflow", key)] >= 1
    finally:
        cluster.delete(CIRCUIT, "circuit-del.yaml")
        reset(cluster)

"""Retries, retry budgets and timeouts end to end (root): client pod -> ztunnel -> waypoint -> ztunnel -> a scripted
server pod, with the waypoint's access log read for flags."""
import json
import os
import textwrap

import pytest

from .cluster_helper import (LocalCluster, app_pod_yaml, idle_pod_yaml, namespace_yaml, nodes_yaml, service_yaml,
                             wait_for, waypoint_yaml)

NAME = f"wr{os.getpid() % 100000}"

# The server: behaviour by path; per-pod counters at GET /stats.
SERVER = r'''
import http.server, json, os, socket, struct, sys, threading, time
LOCK = threading.Lock()
STATS = {"requests": 0, "paths": {}, "attempts": {}, "bodies": []}
SEEN = set()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    def reply(self, status, body=b"ok\n"):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def handle_one(self):
        n = int(self.headers.get("content-length") or 0)
        got = len(self.rfile.read(n)) if n else 0
        p = self.path
        if p == "/stats":
            with LOCK:
                return self.reply(200, json.dumps(STATS).encode())
        if p == "/stats/reset":
            with LOCK:
                STATS.update(requests=0, paths={}, attempts={}, bodies=[])
                SEEN.clear()
            return self.reply(200)
        with LOCK:
            STATS["requests"] += 1
            k = p.split("/")[1]
            STATS["paths"][k] = STATS["paths"].get(k, 0) + 1
            a = self.headers.get("x-envoy-attempt-count", "-")
            STATS["attempts"][a] = STATS["attempts"].get(a, 0) + 1
            if self.command == "POST":
                STATS["bodies"].append(got)
            first = p not in SEEN
            SEEN.add(p)
        if k == "flaky":                       # one request in three fails (/flaky/N, N a multiple of 3)
            return self.reply(503 if first and int(p.split("/")[2]) % 3 == 0 else 200)
        if k in ("fail", "post"):
            return self.reply(503)
        if k == "reset" and first:             # drop the connection without a response, with an RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if k in ("slow", "pertry") and (first or p.endswith("/always")):
            time.sleep(3)
        return self.reply(200)
    do_GET = do_POST = handle_one
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# N requests over C keep-alive connections: statuses, bodies seen, per-request seconds.
CLIENT = r'''
import http.client, json, sys, threading, time
host, method, path, n, c, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
lock = threading.Lock()
left = [n]
out = {"status": {}, "body": {}, "seconds": [], "errors": []}
def worker():
    conn = None
    while True:
        with lock:
            if left[0] <= 0:
                return
            left[0] -= 1
            i = n - left[0]
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, 80, timeout=20)
            conn.request(method, path.replace("{i}", str(i)), body=b"b" * size if method == "POST" else None,
                         headers={"host": "scripted"})
            r = conn.getresponse()
            body = r.read().decode(errors="replace").strip()
            with lock:
                out["status"][str(r.status)] = out["status"].get(str(r.status), 0) + 1
                out["body"][body] = out["body"].get(body, 0) + 1
                out["seconds"].append(round(time.monotonic() - t0, 4))
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except Exception as e:
            with lock:
                out["errors"].append(f"{type(e).__name__}: {e}")
            if conn is not None:
                conn.close()
            conn = None
ts = [threading.Thread(target=worker) for _ in range(c)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
'''

SERVICES = [("scripted", "10.96.60.10"), ("budgeted", "10.96.60.11")]
"""`scripted` has its retry budget off (its floor of 10 retries a second would otherwise decide
the retry tests); `budgeted` has the default budget, for the budget test."""

CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True)
           + app_pod_yaml("server", "shop", "n2", ["python3", "server.py", "8080"], {"app": "scripted"})
           + idle_pod_yaml("client", "shop", "n1") + waypoint_yaml()
           + "".join(service_yaml(name, "shop", {"app": "scripted"}, waypoint="wp", cluster_ip=ip,
                                  annotations={"retry.ambient.dev/budget": "off"} if name == "scripted" else {})
                     for name, ip in SERVICES) + textwrap.dedent("""
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: scripted, namespace: shop}
    spec:
      hosts: [scripted]
      http:
      - match: [{uri: {prefix: /flaky}}]
        retries: {attempts: 2, retryOn: 5xx}
        route: [{destination: {host: scripted}}]
      - match: [{uri: {prefix: /reset}}]
        retries: {attempts: 2, retryOn: reset}
        route: [{destination: {host: scripted}}]
      - match: [{uri: {prefix: /post}}]
        retries: {attempts: 2, retryOn: 5xx}
        route: [{destination: {host: scripted}}]
      - match: [{uri: {prefix: /slow}}]
        timeout: 1s
        route: [{destination: {host: scripted}}]
      - match: [{uri: {prefix: /pertry}}]
        retries: {attempts: 1, perTryTimeout: 500ms, retryOn: 5xx}
        route: [{destination: {host: scripted}}]
      - route: [{destination: {host: scripted}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: budgeted, namespace: shop}
    spec:
      hosts: [budgeted]
      http:
      - retries: {attempts: 2, retryOn: 5xx}
        route: [{destination: {host: budgeted}}]
    """))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("wretry")
    c = LocalCluster(NAME, d)
    (d / "server.py").write_text(SERVER)
    (d / "rclient.py").write_text(CLIENT)
    c.ambient("down", check=False)
    try:
        c.ambient("up", c.write("cluster.yaml", CLUSTER), timeout=300)
        assert wait_for(lambda: run(c, "GET", "/warm", 1)["status"] == {"200": 1}, timeout=60, step=0.5)
        yield c
    finally:
        c.destroy()


def run(c, method, path, n, conc=1, size=0, host="10.96.60.10"):
    p = c.ambient("exec", "-n", "shop", "client", "--", "python3", "rclient.py", host, method, path, str(n),
                  str(conc), str(size), timeout=240, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def stats(c, reset=False):
    out = run(c, "GET", "/stats/reset" if reset else "/stats", 1, host=next(ip for n, ip in SERVICES))
    assert list(out["status"]) == ["200"], out
    return None if reset else json.loads(next(iter(out["body"])))


def access(c, path_prefix):
    with open(os.path.join(c.paths.logs_dir, "waypoint-shop-wp.log"), errors="replace") as f:
        lines = [ln for ln in f if "ambient.access" in ln]
    return [ln for ln in lines if f'"GET {path_prefix}' in ln or f'"POST {path_prefix}' in ln]


@pytest.mark.root
def test_one_in_three_503_succeeds_with_attempts_2(cluster):
    stats(cluster, reset=True)
    got = run(cluster, "GET", "/flaky/{i}", 60)
    assert got["status"] == {"200": 60}, got
    s = stats(cluster)
    assert s["paths"]["flaky"] == 80           # every third request failed once and was retried
    assert s["attempts"] == {"1": 60, "2": 20}


@pytest.mark.root
def test_a_reset_is_retried(cluster):
    stats(cluster, reset=True)
    got = run(cluster, "GET", "/reset/{i}", 10)
    assert got["status"] == {"200": 10}, got
    assert stats(cluster)["attempts"] == {"1": 10, "2": 10}


@pytest.mark.root
def test_post_body_replayed_within_64k_not_past_it(cluster):
    stats(cluster, reset=True)
    assert run(cluster, "POST", "/post/small", 1, size=60_000)["status"] == {"503": 1}
    assert stats(cluster)["bodies"] == [60_000] * 3          # replayed whole, twice
    stats(cluster, reset=True)
    assert run(cluster, "POST", "/post/large", 1, size=1_000_000)["status"] == {"503": 1}
    assert stats(cluster)["bodies"] == [1_000_000]           # past the buffer: sent once, not retried


@pytest.mark.root
def test_budget_holds_a_failing_backend_to_1_2x(cluster):
    stats(cluster, reset=True)
    n = 1000
    got = run(cluster, "GET", "/fail", n, conc=8, host="10.96.60.11")
    assert got["status"] == {"503": n}, got
    attempts = stats(cluster)["paths"]["fail"]
    assert n * 1.1 <= attempts <= n * 1.2, attempts
    assert wait_for(lambda: sum('"URX"' in ln or " URX " in ln for ln in access(cluster, "/fail")) >= n * 0.8,
                    timeout=10), access(cluster, "/fail")[-3:]


@pytest.mark.root
def test_route_timeout_504_ut_within_10_percent(cluster):
    got = run(cluster, "GET", "/slow/{i}", 3)
    assert got["status"] == {"504": 3} and got["body"] == {"upstream request timeout": 3}, got
    assert all(0.9 <= t <= 1.1 for t in got["seconds"]), got["seconds"]
    assert wait_for(lambda: sum(" UT " in ln for ln in access(cluster, "/slow")) == 3, timeout=10)


@pytest.mark.root
def test_per_try_timeout_fires_and_is_retried(cluster):
    got = run(cluster, "GET", "/pertry/{i}", 3)                 # the first try hangs, the retry answers
    assert got["status"] == {"200": 3}, got
    assert all(0.45 <= t <= 0.55 + 0.025 + 0.1 for t in got["seconds"]), got["seconds"]
    got = run(cluster, "GET", "/pertry/{i}/always", 3)          # both tries hang: 2 x 500 ms (+ backoff)
    assert got["status"] == {"504": 3} and got["body"] == {"upstream request timeout": 3}, got
    assert all(0.9 <= t <= 1.1 for t in got["seconds"]), got["seconds"]
    assert wait_for(lambda: sum(" UT,URX " in ln for ln in access(cluster, "/pertry")) == 3, timeout=10)

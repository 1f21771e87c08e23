"""End to end (root) through real pods: VirtualService fault delay/abort at 0, 50 and 100 % and traffic mirroring
at the real waypoint (client pod -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel -> server pods).

Shares are checked within binomial tolerance (4.5 standard deviations, so a correct waypoint
fails about once in 150,000 runs) over 1,000 requests per case, sent by a concurrent keep-alive
client inside the client pod so the whole file takes well under a minute of traffic.
"""
import asyncio
import json
import math
import os
import re
import textwrap

import pytest

from mesh.admin_http import get_unix

from .cluster_helper import (app_pod_yaml, cluster_fixture, idle_pod_yaml, namespace_yaml, nodes_yaml, service_yaml,
                             wait_for, waypoint_yaml)

NAME = f"wf{os.getpid() % 100000}"
DELAY = 0.2
# A delay may end up to ~1 ms early against the client's monotonic clock: the waypoint's
# asyncio.sleep runs on a libuv timer, in whole milliseconds on the loop time cached at the
# start of the iteration (seen once in CI: 0.19997 s for a 0.2 s delay).
TIMER_SLACK = 0.001
N = 1000

# Counts requests per first path segment and per Host; `/_count` answers the tally.
HTTPD = '''
import http.server, json, os, sys, threading, time
NAME = os.environ["POD_NAME"]
SLEEP = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
counts, lock = {}, threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    def do_GET(self):
        if self.path == "/_count":
            with lock:
                body = json.dumps(counts).encode()
        else:
            with lock:
                for k in ("/" + self.path.split("/")[1] + "/", "host:" + self.headers.get("host", "")):
                    counts[k] = counts.get(k, 0) + 1
            if SLEEP:
                time.sleep(SLEEP)
            body = (NAME + "\\n").encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.daemon_threads = True
# socketserver listens with a backlog of 5: a burst of new connections (16 clients, their mirror
# copies) overflows it on a loaded box, SYNs are dropped and retried past the 5 s dial timeout.
http.server.ThreadingHTTPServer.request_queue_size = 128
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# argv: host port concurrency '{"/prefix/": count, ...}'. Requests interleaved (seeded shuffle)
# over `concurrency` keep-alive connections; per prefix: statuses, bodies, sorted latencies.
LOAD = '''
import asyncio, json, random, sys, time
host, port, conc, plan = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
work = [p for p, n in plan.items() for _ in range(n)]
random.Random(1).shuffle(work)
out = {p: {"status": {}, "body": {}, "lat": []} for p in plan}
errors = []
async def one(items):
    r = w = None
    for i, p in items:
        try:
            if w is None:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            t0 = time.monotonic()
            w.write(f"GET {p}{i} HTTP/1.1\\r\\nhost: web\\r\\n\\r\\n".encode())
            head = (await asyncio.wait_for(r.readuntil(b"\\r\\n\\r\\n"), 30)).decode("latin-1").split("\\r\\n")
            hs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:] if ln)}
            body = await asyncio.wait_for(r.readexactly(int(hs.get("content-length", "0"))), 30)
            lat = time.monotonic() - t0
            o = out[p]
            st = head[0].split(" ")[1]
            o["status"][st] = o["status"].get(st, 0) + 1
            b = body.decode(errors="replace").strip()
            o["body"][b] = o["body"].get(b, 0) + 1
            o["lat"].append(lat)
            if hs.get("connection", "").lower() == "close":
                w.close()
                w = None
        except Exception as e:
            errors.append(f"{p}{i}: {type(e).__name__}: {e}")
            if w is not None:
                w.close()
            w = None
async def main():
    t0 = time.monotonic()
    items = list(enumerate(work))
    await asyncio.gather(*(one(items[k::conc]) for k in range(conc)))
    for o in out.values():
        o["lat"].sort()
    print(json.dumps({"paths": out, "errors": errors[:20], "n_errors": len(errors),
                      "seconds": round(time.monotonic() - t0, 2)}))
asyncio.run(main())
'''

# A WebSocket echo app: RFC 6455 handshake, then raw bytes echoed until the client half-closes.
WSD = '''
import asyncio, base64, hashlib, sys
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
async def serve(r, w):
    head = (await r.readuntil(b"\\r\\n\\r\\n")).decode("latin-1").split("\\r\\n")
    hs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:] if ln)}
    if hs.get("upgrade", "").lower() != "websocket":
        w.write(b"HTTP/1.1 426 Upgrade Required\\r\\ncontent-length: 0\\r\\n\\r\\n")
        w.close()
        return
    acc = base64.b64encode(hashlib.sha1((hs["sec-websocket-key"] + GUID).encode()).digest()).decode()
    w.write(("HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
             f"Sec-WebSocket-Accept: {acc}\\r\\n\\r\\n").encode())
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(serve, "0.0.0.0", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
'''

# argv: host port nbytes: upgrade, send nbytes, read them back, half-close, expect EOF.
WSC = '''
import asyncio, base64, hashlib, json, os, sys
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
async def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(f"GET /chat HTTP/1.1\\r\\nHost: ws\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
            f"Sec-WebSocket-Key: {key}\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n".encode())
    head = (await asyncio.wait_for(r.readuntil(b"\\r\\n\\r\\n"), 10)).decode("latin-1").split("\\r\\n")
    hs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:] if ln)}
    want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    data = os.urandom(n)
    w.write(data)
    echoed = await asyncio.wait_for(r.readexactly(n), 60)
    w.write_eof()
    rest = await asyncio.wait_for(r.read(), 10)
    print(json.dumps({"status": head[0], "accept_ok": hs.get("sec-websocket-accept") == want,
                      "upgrade": hs.get("upgrade"), "echo_ok": echoed == data, "rest": len(rest)}))
asyncio.run(main())
'''

COUNT = '''
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
c.request("GET", "/_count")
print(c.getresponse().read().decode())
'''


def pod(name, app, node, args=("8080",)):
    return app_pod_yaml(name, "shop", node, ["python3", "httpd.py", *args], {"app": app})


def service(name, waypoint=False):
    # labels: {} on the plain ones too: the objects stay what this file applied before the shared builder
    return service_yaml(name, "shop", {"app": name}, waypoint="wp" if waypoint else None, labels={})


CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True)
           + pod("web-1", "web", "n2") + pod("shadow-1", "shadow", "n2") + pod("slow-1", "slow", "n2", ("8080", "1.0"))
           + idle_pod_yaml("dead-1", "shop", "n2", {"app": "dead"}) + idle_pod_yaml("client", "shop", "n1")
           + waypoint_yaml() + app_pod_yaml("ws-1", "shop", "n2", ["python3", "wsd.py", "8080"], {"app": "ws"})
           + service("web", waypoint=True) + service("shadow") + service("slow") + service("dead")
           + service("ws", waypoint=True))


def rule(prefix, extra=""):
    return (f"  - name: {prefix}\n    match: [{{uri: {{prefix: /{prefix}/}}}}]\n"
            f"    route: [{{destination: {{host: web}}}}]\n" + textwrap.indent(extra, "    "))


def vs(rules):
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n"
            "spec:\n  hosts: [web]\n  http:\n" + "".join(rules) + "  - route: [{destination: {host: web}}]\n")


FAULTS = vs([rule(f"d{p}", f"fault: {{delay: {{fixedDelay: {int(DELAY * 1000)}ms, percentage: {{value: {p}}}}}}}\n")
             for p in (0, 50, 100)]
            + [rule(f"a{p}", f"fault: {{abort: {{httpStatus: 503, percentage: {{value: {p}}}}}}}\n")
               for p in (0, 50, 100)])
MIRRORS = vs([rule("m50", "mirror: {host: shadow}\nmirrorPercentage: {value: 50}\n"),
              rule("m100", "mirrors: [{destination: {host: shadow}}]\n"),
              rule("dead", "mirror: {host: dead}\n"), rule("slow", "mirror: {host: slow}\n")])

cluster = cluster_fixture(NAME, "wpfault", CLUSTER, {"httpd.py": HTTPD, "load.py": LOAD, "count.py": COUNT,
                                                    "wsd.py": WSD, "wsc.py": WSC})


def web_vip(cluster):
    return next(s["cluster_ip"] for s in cluster.status()["services"] if s["name"] == "web")


def load(cluster, plan, concurrency):
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "load.py", web_vip(cluster), "80",
                        str(concurrency), json.dumps(plan), timeout=300)
    got = json.loads(p.stdout)
    assert got["n_errors"] == 0, got["errors"]
    return got


def within_binomial(hits, n, p, z=4.5):
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


def waypoint_log(cluster):
    path = os.path.join(cluster.paths.logs_dir, "waypoint-shop-wp.log")
    with open(path, errors="replace") as f:
        return f.readlines()


ACCESS = re.compile(r'"GET (/[^/ ]+/)\d+ HTTP/1\.1" (\d+) (\S+) ')


def flags_by_prefix(lines):
    out = {}
    for ln in lines:
        m = ACCESS.search(ln) if "ambient.access" in ln else None
        if m:
            key = (m.group(1), m.group(2), m.group(3))
            out[key] = out.get(key, 0) + 1
    return out


def waypoint_metrics(cluster):
    sock = os.path.join(cluster.paths.waypoint_dir("shop", "wp"), "admin.sock")
    status, body = asyncio.run(get_unix(sock, "/metrics"))
    assert status == 200
    return {k.decode(): int(v) for k, v in re.findall(rb'waypoint_mirror_requests_total\{result="(\w+)"\} (\d+)', body)}


def mirrors_in_flight(cluster):
    sock = os.path.join(cluster.paths.waypoint_dir("shop", "wp"), "admin.sock")
    status, body = asyncio.run(get_unix(sock, "/config_dump"))
    assert status == 200
    return json.loads(body)["inbound"]["mirrors_in_flight"]


def counts(cluster, pod):
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "count.py", cluster.ip(pod))
    return json.loads(p.stdout)


def p99(lat):
    return lat[min(len(lat) - 1, int(math.ceil(0.99 * len(lat))) - 1)]


@pytest.mark.root
def test_fault_delay_and_abort_at_0_50_100_percent(cluster):
    cluster.apply(FAULTS, "faults.yaml")
    try:
        since = len(waypoint_log(cluster))
        got = load(cluster, {f"/{k}{p}/": N for k in "da" for p in (0, 50, 100)}, concurrency=64)
    finally:
        cluster.delete(FAULTS, "faults-del.yaml")
    paths = got["paths"]
    print(f"faults: {6 * N} requests in {got['seconds']}s; a50 {paths['/a50/']['status']}")
    # Aborts, as the client sees them: Envoy's local reply, the upstream never asked.
    assert paths["/a0/"]["status"] == {"200": N} and paths["/a0/"]["body"] == {"web-1": N}
    assert paths["/a100/"]["status"] == {"503": N} and paths["/a100/"]["body"] == {"fault filter abort": N}
    a50 = paths["/a50/"]["status"]
    assert set(a50) == {"200", "503"} and within_binomial(a50["503"], N, 0.5), a50
    assert paths["/a50/"]["body"] == {"web-1": a50["200"], "fault filter abort": a50["503"]}
    # Delays: every request answered by the upstream, the delayed ones flagged DI.
    for p in (0, 50, 100):
        assert paths[f"/d{p}/"]["status"] == {"200": N}, paths[f"/d{p}/"]["status"]
    assert paths["/d100/"]["lat"][0] >= DELAY - TIMER_SLACK         # each one was held
    lines = waypoint_log(cluster)[since:]
    flags = flags_by_prefix(lines)
    di = {p: flags.get((f"/d{p}/", "200", "DI"), 0) for p in (0, 50, 100)}
    assert di[0] == 0 and flags.get(("/d0/", "200", "-")) == N, flags
    assert di[100] == N, flags
    assert within_binomial(di[50], N, 0.5) and di[50] + flags.get(("/d50/", "200", "-"), 0) == N, flags
    assert sum(1 for t in paths["/d50/"]["lat"] if t >= DELAY - TIMER_SLACK) >= di[50]   # DI ones really waited
    assert flags.get(("/a100/", "503", "FI")) == N and flags.get(("/a50/", "503", "FI")) == a50["503"], flags


@pytest.mark.root
def test_mirror_receives_the_share_asked_for(cluster):
    before = counts(cluster, "shadow-1")
    cluster.apply(MIRRORS, "mirrors.yaml")
    try:
        m0 = waypoint_metrics(cluster)
        got = load(cluster, {"/m50/": N, "/m100/": 300}, concurrency=16)
        assert got["paths"]["/m50/"]["status"] == {"200": N} and got["paths"]["/m100/"]["status"] == {"200": 300}

        wait_for(lambda: mirrors_in_flight(cluster) == 0, timeout=30, step=0.2)   # every copy has ended
        after = counts(cluster, "shadow-1")
    finally:
        cluster.delete(MIRRORS, "mirrors-del.yaml")
    m1 = waypoint_metrics(cluster)
    delta = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
    got50 = after.get("/m50/", 0) - before.get("/m50/", 0)
    got100 = after.get("/m100/", 0) - before.get("/m100/", 0)
    print(f"mirrors: m50 {got50}/{N}, m100 {got100}/300, results {delta}")
    # Every copy drawn is accounted for: it completed (and arrived) or, when the shadow stalled
    # while the primary went on (a loaded box: 4 of ~800 in one run), found its 64 slots full and
    # was dropped, never queued. /m100/ drew exactly 300, so the rest of the draws are /m50/'s.
    overflow = delta.get("overflow", 0)
    assert {k for k, v in delta.items() if v} <= {"completed", "overflow"}, delta   # no connect failure, reset, timeout
    assert delta.get("completed", 0) == got50 + got100, delta
    assert overflow <= (got50 + got100) // 20, delta
    assert 300 - overflow <= got100 <= 300, (got100, delta)
    assert within_binomial(got50 + got100 + overflow - 300, N, 0.5), (got50, delta)
    # The copy's Host is the primary's: no "-shadow" suffix (Istio >= 1.28).
    assert after.get("host:web", 0) - before.get("host:web", 0) == got50 + got100, after
    assert not any(k.startswith("host:") and "shadow" in k for k in after), after


@pytest.mark.root
def test_dead_or_slow_mirror_changes_neither_status_nor_p99(cluster):
    cluster.apply(MIRRORS, "mirrors2.yaml")
    try:
        m0 = waypoint_metrics(cluster)
        # Interleaved on the same connections: machine noise hits all three paths alike.
        got = load(cluster, {"/base/": N, "/dead/": N, "/slow/": N}, concurrency=32)
        wait_for(lambda: mirrors_in_flight(cluster) == 0, timeout=30, step=0.2)
        m1 = waypoint_metrics(cluster)
    finally:
        cluster.delete(MIRRORS, "mirrors2-del.yaml")
    paths = got["paths"]
    q = {p: p99(paths[f"/{p}/"]["lat"]) for p in ("base", "dead", "slow")}
    delta = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
    print(f"mirror p99 (ms): { {k: round(v * 1000, 1) for k, v in q.items()} }; results {delta}; "
          f"{got['seconds']}s")
    for p in ("base", "dead", "slow"):
        assert paths[f"/{p}/"]["status"] == {"200": N} and paths[f"/{p}/"]["body"] == {"web-1": N}
    for p in ("dead", "slow"):
        assert q[p] <= 1.5 * q["base"] + 0.025, q
    # Every copy is accounted for: the dead mirror's failed, the slow one's completed (1 s each)
    # or, with its 64 slots full, were dropped -- without starving the dead mirror's copies.
    # (On a loaded machine a few dead-mirror connects can be slow enough to fill its own slots too.)
    failed, overflow = delta.get("connect_failure", 0), delta.get("overflow", 0)
    assert sum(delta.values()) == 2 * N and failed >= N - N // 20, delta
    assert overflow > 0, delta


@pytest.mark.root
def test_websocket_passes_through_the_waypoint(cluster):
    vip = next(s["cluster_ip"] for s in cluster.status()["services"] if s["name"] == "ws")
    since = len(waypoint_log(cluster))
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "wsc.py", vip, "80", str(1 << 20),
                        timeout=120)
    got = json.loads(p.stdout)
    assert got == {"status": "HTTP/1.1 101 Switching Protocols", "accept_ok": True, "upgrade": "websocket",
                   "echo_ok": True, "rest": 0}, got
    # One access-log line for the whole WebSocket, at its end: a 101 with both directions' bytes.
    wait_for(lambda: any('"GET /chat HTTP/1.1" 101' in ln for ln in waypoint_log(cluster)[since:]), timeout=10)
    (line,) = [ln for ln in waypoint_log(cluster)[since:] if '"GET /chat HTTP/1.1"' in ln]
    assert f" 101 - via_upstream - \"-\" {1 << 20} {1 << 20} " in line, line

"""Observability end to end (root): a real Prometheus (`ambient up --prometheus`) scrapes every proxy
through the runner's 127.0.0.1 scrape endpoint, follows nodes that come and go, answers the PromQL
of Istio's service/workload/mesh/ztunnel dashboards for a meshed app behind a waypoint, and
`ambient stat` / `ambient edges` agree with PromQL evaluated at the same time."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from localcluster.prometheus import query
from mesh.linux.netns import NETNS_DIR
from .cluster_helper import (ROOT, LocalCluster, app_pod_yaml, idle_pod_yaml, namespace_yaml, nodes_yaml,
                             service_accounts_yaml, service_yaml, wait_for, waypoint_yaml)

NAME = f"ob{os.getpid() % 100000}"
SVC = "payment.shop.svc.cluster.local"
N_REQUESTS = 300

HTTPD = '''
import http.server, os, sys
BODY = (os.environ["POD_NAME"] + "\\n").encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    def do_GET(self):
        code = 503 if self.path.startswith("/fail") else 200
        self.send_response(code)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# N GETs of PATH over one keep-alive connection (reconnecting if closed); a tally as JSON.
HTTPGET = '''
import http.client, json, sys, time
host, port, n, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {"status": {}, "errors": []}
conn, deadline = None, time.monotonic() + 120
for i in range(n):
    if time.monotonic() > deadline:
        out["errors"].append("deadline"); break
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", path, headers={"host": "payment"})
        r = conn.getresponse(); r.read()
        out["status"][str(r.status)] = out["status"].get(str(r.status), 0) + 1
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")
        conn = None
print(json.dumps(out))
'''

CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True) + service_accounts_yaml(("shop", "payment"))
           + app_pod_yaml("payment-v1", "shop", "n2", ["python3", "httpd.py", "8080"],
                          {"app": "payment", "version": "v1"}, sa="payment", container="httpd")
           + idle_pod_yaml("client", "shop", "n1")
           + service_yaml("payment", "shop", {"app": "payment"}, waypoint="wp") + waypoint_yaml()
           + textwrap.dedent("""
               ---
               apiVersion: gateway.networking.k8s.io/v1
               kind: HTTPRoute
               metadata: {name: payment, namespace: shop}
               spec:
                 parentRefs: [{group: "", kind: Service, name: payment, port: 80}]
                 rules:
                 - backendRefs: [{name: payment, port: 80}]
               """))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


C: LocalCluster = None
URL = ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    global C, URL
    d = tmp_path_factory.mktemp("obs")
    C = LocalCluster(NAME, d)
    (d / "httpd.py").write_text(HTTPD)
    (d / "httpget.py").write_text(HTTPGET)
    port = free_port()
    URL = f"http://127.0.0.1:{port}"
    C.ambient("down", check=False)
    C.ambient("up", C.write("cluster.yaml", CLUSTER), "--prometheus", "--prometheus-port", str(port),
              "--scrape-interval", "1s", timeout=180)
    yield C
    C.destroy()


def get(cluster, n, path="/"):
    vip = next(s["cluster_ip"] for s in cluster.status()["services"] if s["name"] == "payment")
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "httpget.py", vip, "80", str(n), path,
                        timeout=180)
    return json.loads(p.stdout)


def values(promql, at=None):
    return [(r["metric"], float(r["value"][1])) for r in query(URL, promql, at=at)]


def scalar(promql, at=None):
    got = values(promql, at)
    assert len(got) == 1, (promql, got)
    return got[0][1]


def up_pods():
    return {m.get("pod"): v for m, v in values("up")}


def at_least(expr, n, at=None):
    got = values(expr, at)
    return bool(got) and got[0][1] >= n


def settled_time():
    """A time at which every target's samples are stored: the oldest of their latest scrapes (a
    scrape in flight now started after it), so two queries at that time see the same data."""
    return scalar("min(timestamp(up))")


@pytest.fixture(scope="module")
def traffic(cluster):
    """N_REQUESTS 200s and 10 503s through the waypoint, then until Prometheus has scraped them all.

    A warm-up round first makes the series: Prometheus' rate() counts increases between samples,
    so what a series holds when it first appears is not in any rate (as with Istio's own)."""
    http_sel = f'istio_requests_total{{reporter="waypoint",destination_service="{SVC}"}}'
    # The ztunnels count a connection when it closes: each exec's client has ended, so has it.
    tcp_sel = f'istio_tcp_connections_opened_total{{reporter="source",destination_service="{SVC}"}}'

    assert get(cluster, 1)["status"] == {"200": 1} and get(cluster, 1, "/fail")["status"] == {"503": 1}
    # Every warm-up series scraped twice: from here on increases are seen.
    for sel in (http_sel, tcp_sel):
        wait_for(lambda: at_least(f"min(count_over_time({sel}[1m]))", 2), timeout=30, step=0.5)
    ok = get(cluster, N_REQUESTS)
    bad = get(cluster, 10, "/fail")
    assert ok["status"] == {"200": N_REQUESTS} and bad["status"] == {"503": 10}, (ok, bad)
    # ... stored for every target (see settled_time), so tests querying then see all of it.
    wait_for(lambda: at_least(f"sum({http_sel})", N_REQUESTS + 12, settled_time()), timeout=30, step=0.5)
    wait_for(lambda: at_least(f"sum({tcp_sel})", 4, settled_time()), timeout=30, step=0.5)
    return N_REQUESTS


@pytest.mark.root
def test_prometheus_scrapes_every_proxy_on_loopback_only(cluster):
    st = cluster.status()
    prom = st["observability"]["prometheus"]
    assert prom["running"] and prom["url"] == URL
    wait_for(lambda: up_pods() == {"ztunnel-n1": 1, "ztunnel-n2": 1, "wp-waypoint": 1, "istiod-local": 1},
             timeout=30, step=0.5)
    targets = json.loads(subprocess.run(["curl", "-s", "--noproxy", "*", f"{URL}/api/v1/targets"],
                                        capture_output=True, text=True, check=True).stdout)["data"]["activeTargets"]
    assert targets and all(t["scrapeUrl"].startswith("http://127.0.0.1:") for t in targets), targets
    assert {t["labels"]["app"] for t in targets} == {"ztunnel", "waypoint", "istiod"}
    # Every socket the Prometheus process listens on is on 127.0.0.1.
    ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    mine = [ln for ln in ss.splitlines() if f"pid={prom['pid']}," in ln]
    assert mine and all(ln.split()[3].startswith("127.0.0.1:") for ln in mine), mine
    # The proxies' own Prometheus text, also on Istio's port in their netns (the waypoint's too).
    wp = next(w for w in st["waypoints"] if w["name"] == "wp")
    pod = next(p for p in st["pods"] if p["name"] == "wp-waypoint")
    out = subprocess.run(["nsenter", f"--net={os.path.join(NETNS_DIR, pod['netns'])}",
                          "curl", "-s", "--noproxy", "*", "http://127.0.0.1:15020/stats/prometheus"],
                         capture_output=True, text=True, timeout=10)
    assert 'istio_build{component="proxy"' in out.stdout, (wp, out.stderr)


WP2 = waypoint_yaml("wp2")


@pytest.mark.root
@pytest.mark.parametrize("yaml_text, pod", [(nodes_yaml("n3"), "ztunnel-n3"), (WP2, "wp2-waypoint")])
def test_nodes_and_waypoints_that_come_and_go_are_discovered(cluster, yaml_text, pod):
    cluster.apply(yaml_text, "more.yaml")
    wait_for(lambda: up_pods().get(pod) == 1, timeout=30, step=0.5)
    cluster.delete(yaml_text, "more-del.yaml")

    def gone():
        doc = json.loads(subprocess.run(["curl", "-s", "--noproxy", "*", f"{URL}/api/v1/targets"],
                                        capture_output=True, text=True, check=True).stdout)
        return not [t for t in doc["data"]["activeTargets"] if t["labels"].get("pod") == pod]
    wait_for(gone, timeout=30, step=0.5)


# Istio's dashboards' queries (istio-dashboards.md), with $service the FQDN, $namespace/$workload
# the destination, $__rate_interval 1m. The HTTP panels' reporter: in ambient the waypoint is the
# L7 reporter (reporter="waypoint"), so $qrep includes it; TCP panels use source|destination.
DASHBOARD = {
    "service request volume": f'sum(irate(istio_requests_total{{reporter=~"destination|waypoint",destination_service="{SVC}"}}[1m]))',
    "service success rate": f'sum(irate(istio_requests_total{{reporter=~"destination|waypoint",destination_service="{SVC}",response_code!~"5.*"}}[1m])) / sum(irate(istio_requests_total{{reporter=~"destination|waypoint",destination_service="{SVC}"}}[1m])) or on () vector(1)',
    "service p50": f'histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{{reporter=~"destination|waypoint",destination_service="{SVC}"}}[1m])) by (le)) / 1000',
    "service p99": f'histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{{reporter=~"destination|waypoint",destination_service="{SVC}"}}[1m])) by (le)) / 1000',
    "service by source": f'round(sum(irate(istio_requests_total{{connection_security_policy="mutual_tls",destination_service="{SVC}",reporter=~"destination|waypoint"}}[1m])) by (source_workload, source_workload_namespace, response_code), 0.001)',
    "service request size": f'histogram_quantile(0.90, sum(irate(istio_request_bytes_bucket{{reporter=~"destination|waypoint",destination_service="{SVC}"}}[1m])) by (le))',
    "service response size": f'histogram_quantile(0.90, sum(irate(istio_response_bytes_bucket{{reporter=~"destination|waypoint",destination_service="{SVC}"}}[1m])) by (le))',
    "service tcp sent": f'sum(rate(istio_tcp_sent_bytes_total{{reporter=~"source|destination",destination_service="{SVC}"}}[1m]))',
    "service tcp received": f'sum(rate(istio_tcp_received_bytes_total{{reporter=~"source|destination",destination_service="{SVC}"}}[1m]))',
    "workload incoming": 'sum(irate(istio_requests_total{reporter=~"destination|waypoint",destination_workload_namespace=~"shop",destination_workload=~"payment-v1"}[1m])) by (source_workload, source_workload_namespace, response_code)',
    "workload p95": 'histogram_quantile(0.95, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"destination|waypoint",destination_workload=~"payment-v1",destination_workload_namespace=~"shop"}[1m])) by (le)) / 1000',
    "mesh global volume": 'round(sum(irate(istio_requests_total{reporter=~"source|waypoint"}[1m])), 0.001)',
    "mesh 5xx": 'sum(irate(istio_requests_total{reporter=~"source|waypoint",response_code=~"5.."}[1m])) or on () vector(0)',
    "mesh per workload": 'sum by (destination_workload, destination_workload_namespace, destination_service) (rate(istio_requests_total{reporter=~"source|waypoint"}[1m]))',
    "ztunnel connections": 'sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"ztunnel-.*"}[1m]))',
    "ztunnel versions": 'sum by (tag) (istio_build{component="ztunnel"})',
    "ztunnel fds": 'sum by (pod) (process_open_fds{app="ztunnel"})',
    "ztunnel memory": 'sum by (pod) (process_resident_memory_bytes{app="ztunnel"})',
    "ztunnel cpu": 'sum by (pod) (rate(process_cpu_seconds_total{app="ztunnel"}[1m]))',
}


@pytest.mark.root
@pytest.mark.parametrize("panel", list(DASHBOARD))
def test_istio_dashboard_queries_return_data(cluster, traffic, panel):
    got = values(DASHBOARD[panel])
    assert got, f"{panel}: no data for {DASHBOARD[panel]}"
    if panel in ("service tcp sent", "service tcp received", "mesh per workload", "ztunnel fds", "ztunnel memory"):
        assert any(v > 0 for _, v in got), (panel, got)
    if panel == "ztunnel versions":
        assert got == [({"tag": "0.1.0"}, 2.0)]
    if panel == "service by source":
        assert {m["source_workload"] for m, _ in got} == {"client"}


def _stat(cluster, *args):
    p = cluster.ambient("stat", *args, "-o", "json", check=False)
    assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


@pytest.mark.root
def test_stat_agrees_with_promql_over_the_same_window(cluster, traffic):
    at = settled_time()
    doc = _stat(cluster, "svc/payment", "-n", "shop", "-t", "1m", "--at", str(at))
    (row,) = doc["rows"]
    assert doc["time"] == at
    sel = f'reporter="waypoint",destination_service="{SVC}"'
    rps = scalar(f"sum(rate(istio_requests_total{{{sel}}}[1m]))", at)
    good = scalar(f'sum(rate(istio_requests_total{{{sel},response_code!~"5.*"}}[1m]))', at)
    p99 = scalar(f"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{{sel}}}[1m])) by (le))", at)
    tcp = scalar(f'sum(rate(istio_tcp_connections_opened_total{{reporter="source",destination_service="{SVC}"}}[1m]))', at)
    assert row["name"] == SVC and row["rps"] == pytest.approx(rps, rel=1e-9)
    assert row["success"] == pytest.approx(good / rps, rel=1e-9) and 0.9 < row["success"] < 1
    assert row["latency_ms_p99"] == pytest.approx(p99, rel=1e-9) and row["tcp_connections_per_second"] == pytest.approx(tcp)
    # ... and with what was sent: 310 requests in the last minute (rate extrapolates to the window).
    assert 0.5 * (traffic + 10) <= rps * 60 <= 2 * (traffic + 10), rps
    # The table is the same numbers, rounded.
    table = cluster.ambient("stat", "svc/payment", "-n", "shop").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "SUCCESS", "RPS"] and table[1].split()[0] == SVC
    success = float(table[1].split()[1].rstrip("%"))
    assert abs(success - row["success"] * 100) < 0.5  # a minute later the window moved a little


@pytest.mark.root
def test_stat_pod_route_waypoint_and_from(cluster, traffic):
    pod = _stat(cluster, "pod/payment-v1", "-n", "shop")
    assert [r["name"] for r in pod["rows"]] == ["shop/payment-v1"] and pod["rows"][0]["rps"] > 0
    route = _stat(cluster, "route/payment", "-n", "shop")
    assert [r["name"] for r in route["rows"]] == ["shop/shop.payment.0"] and route["rows"][0]["rps"] > 0
    wp = _stat(cluster, "waypoint/wp", "-n", "shop", "--at", str(settled_time()))
    assert [r["name"] for r in wp["rows"]] == ["shop/wp"]
    # All of this waypoint's requests took that one rule: the same rate at the same time.
    by_route = scalar('sum(rate(istio_requests_total{reporter="waypoint",route="shop.payment.0"}[1m]))', wp["time"])
    assert wp["rows"][0]["rps"] == pytest.approx(by_route, rel=1e-9)
    frm = _stat(cluster, "svc", "-n", "shop", "--from", "pod/client")
    assert [r["name"] for r in frm["rows"]] == [SVC]
    nothing = cluster.ambient("stat", "svc", "-n", "shop", "--from", "pod/nobody", check=False)
    assert nothing.returncode == 3 and "no traffic" in nothing.stderr


@pytest.mark.root
def test_edges_show_identities_and_mtls(cluster, traffic):
    p = cluster.ambient("edges", "-n", "shop", "-o", "json", "-t", "5m")
    es = {(e["src"], e["dst"]): e for e in json.loads(p.stdout)["edges"]}
    e = es[("shop/client", "shop/payment-v1")]
    assert e["mtls"] and e["requests"] > 0
    assert e["source_principal"] == "spiffe://cluster.local/ns/shop/sa/default"
    assert e["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/payment"
    assert any(x["connections"] > 0 for x in es.values()), es  # the ztunnels' TCP edges
    assert all(x["mtls"] for x in es.values()), es
    table = cluster.ambient("edges", "-n", "shop", "-t", "5m").stdout
    assert "SRC" in table.splitlines()[0] and "√ mTLS" in table


@pytest.mark.root
def test_mesh_health_metrics(cluster, traffic):
    assert scalar("pilot_xds") >= 3  # two ztunnels and the waypoint subscribed
    cp_version = scalar("ambient_control_plane_config_version")
    versions = {m["proxy"]: v for m, v in values("ambient_proxy_config_version")}
    assert set(versions) >= {"ztunnel-n1", "ztunnel-n2", "wp-waypoint"} and set(versions.values()) == {cp_version}
    expiry = {m["resource_name"]: v for m, v in values('istio_agent_cert_expiry_seconds{proxy="ztunnel-n2"}')}
    assert 0 < expiry["spiffe://cluster.local/ns/shop/sa/payment"] <= 24 * 3600
    progs = {m["program"]: v for m, v in values('ambient_ebpf_programs_attached{workload="payment-v1"}')}
    assert progs == {"connect4": 1, "connect6": 1, "sockops": 1, "sk_lookup": 1}, progs
    assert scalar("citadel_server_success_cert_issuance_count") >= 3
    assert scalar('ambient_certificates_issued_total{identity="spiffe://cluster.local/ns/shop/sa/payment"}') >= 1
    # A change reaches every proxy: pushes counted, convergence observed.
    before = scalar('pilot_xds_pushes{type="delta"}')
    cluster.apply(namespace_yaml("extra"), "extra.yaml")
    wait_for(lambda: scalar('pilot_xds_pushes{type="delta"}') >= before + 3, timeout=20, step=0.5)
    wait_for(lambda: scalar("pilot_proxy_convergence_time_count") >= 1, timeout=20, step=0.5)
    assert scalar("pilot_proxy_convergence_time_sum") / scalar("pilot_proxy_convergence_time_count") < 5
    # Errors by reason: the recording rule exists and evaluates (zero or more series).
    assert values("service:istio_requests:rate1m")
    query(URL, "mesh:errors_by_reason:rate1m")


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.mark.root
def test_dashboard_page_in_headless_chromium(cluster, traffic):
    from playwright.sync_api import sync_playwright
    url = cluster.status()["observability"]["scrape_endpoint"] + "/dashboard"
    elsewhere = []

    def only_loopback(route):  # the page must need nothing but its own origin; never let it out
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(url)
            row = page.locator(f'#services tr[data-name="{SVC}"]')
            row.wait_for(timeout=20000)
            cells = row.locator("td").all_text_contents()
            assert cells[0] == SVC and cells[1].endswith("%") and float(cells[2]) > 0, cells
            proxies = {r.locator("td").first.text_content(): r.locator("td").all_text_contents()
                       for r in page.locator("#proxies tbody tr").all()}
            assert set(proxies) == {"ztunnel-n1", "ztunnel-n2", "wp-waypoint"}, proxies
            assert all(c[3] == "up" and c[4] == "yes" for c in proxies.values()), proxies
            assert proxies["ztunnel-n2"][7] == "4"  # payment-v1's connect4, connect6, sockops, sk_lookup
            edge = page.locator('#edges tr[data-name="shop/client -> shop/payment-v1"] td').all_text_contents()
            assert edge[2:5] == ["cluster.local/ns/shop/sa/default", "cluster.local/ns/shop/sa/payment", "mTLS"], edge
            assert page.locator("#cp tr[data-name='subscribed proxies'] td").nth(1).text_content() == "3"
            assert page.locator("#error").text_content() == ""
        finally:
            browser.close()
    assert elsewhere == []


GHOST = service_yaml("ghost", "shop", {"app": "payment"}, waypoint="nowhere")  # a waypoint that does not exist


@pytest.mark.root
def test_errors_by_reason_reach_the_recording_rule(cluster, traffic):
    cluster.apply(GHOST, "ghost.yaml")
    vip = next(s["cluster_ip"] for s in cluster.status()["services"] if s["name"] == "ghost")

    def refused():  # a binding to a waypoint that does not exist: ztunnel refuses, reason waypoint_missing
        p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "httpget.py", vip, "80", "1", "/")
        out = json.loads(p.stdout)
        assert out["status"] == {} and out["errors"], out
    sel = 'ztunnel_outbound_refused_total{reason="waypoint_missing"}'
    refused()
    wait_for(lambda: at_least(f"min(count_over_time({sel}[1m]))", 2), timeout=30, step=0.5)
    refused()  # now an increase the rate sees
    rule = 'mesh:errors_by_reason:rate1m{source="ztunnel_outbound",reason="waypoint_missing"}'
    wait_for(lambda: values(rule) and values(rule)[0][1] > 0, timeout=30, step=0.5)
    cluster.delete(GHOST, "ghost-del.yaml")
    rules = json.loads(subprocess.run(["curl", "-s", "--noproxy", "*", f"{URL}/api/v1/rules"], capture_output=True,
                                      text=True, check=True).stdout)["data"]["groups"]
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] != "ok"]
    assert rules and not bad, bad  # every golden-signal rule evaluates


@pytest.mark.root
def test_cli_habits(cluster):
    head = subprocess.run(f"{sys.executable} -m localcluster.cli -c {NAME} status | head -1", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert head.returncode == 0 and head.stdout.startswith("cluster ") and head.stderr == "", head
    watch = subprocess.run(f"{sys.executable} -m localcluster.cli -c {NAME} stat svc -n shop --watch --interval 0.2"
                           " | head -3", shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert watch.returncode == 0 and len(watch.stdout.splitlines()) == 3 and watch.stderr == "", watch
    swatch = subprocess.run(f"{sys.executable} -m localcluster.cli -c {NAME} status --watch --interval 0.2 | head -40",
                            shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert swatch.returncode == 0 and swatch.stdout.count("cluster ") >= 2 and swatch.stderr == "", swatch
    y = cluster.ambient("status", "-o", "yaml").stdout
    assert "observability:" in y
    bad = cluster.ambient("stat", "nonsense/x", check=False)
    assert bad.returncode == 1 and "unknown resource" in bad.stderr
    usage = cluster.ambient("stat", check=False)
    assert usage.returncode == 2
    off_host = cluster.ambient("stat", "svc", "--prometheus-url", "http://10.1.1.1:9090", check=False)
    assert off_host.returncode == 1 and "only 127.0.0.1" in off_host.stderr
    no_cluster = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", "nosuchcluster", "edges"],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert no_cluster.returncode == 1 and "not reachable" in no_cluster.stderr
    taken = subprocess.run([sys.executable, "-m", "localcluster.cli", "-c", "nosuchcluster", "up",
                            cluster.write("n.yaml", nodes_yaml("x1")), "--prometheus", "--prometheus-port",
                            URL.rsplit(":", 1)[1]], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert taken.returncode == 1 and "already in use" in taken.stderr, taken  # ours has it; nothing started
    assert not os.path.exists(LocalCluster("nosuchcluster", cluster.dir).paths.run_dir)


@pytest.mark.root
def test_down_removes_prometheus_and_its_data(cluster):
    st = cluster.status()
    pid, data = st["observability"]["prometheus"]["pid"], st["observability"]["prometheus"]["data_dir"]
    assert os.path.isdir(data)
    with open(f"/proc/{pid}/cgroup") as f:  # in the cluster's tree: killed by `down` even after a runner crash
        assert f"/amb-{NAME}/prometheus" in f.read()
    cluster.ambient("down")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    assert not os.path.exists(data)

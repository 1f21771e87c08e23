"""The seed article's incident, found in a minute (root): the 11-service cascade (deploy/local/cascade.yaml) under
steady load with a real Prometheus; `catalog` starts failing, and within 60 s `ambient stat -o json --sort success`
ranks it worst and the dashboard in headless Chromium shows it red. `ambient stat`'s numbers equal Prometheus' own
PromQL at the same time, and `ambient logs --access` finds the failing requests."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from localcluster.prometheus import query
from .cluster_helper import ROOT, LocalCluster, wait_for

NAME = f"inc{os.getpid() % 100000}"
YAML = os.path.join(ROOT, "deploy", "local", "cascade.yaml")
CHECKOUT = "10.96.50.10:80"
CATALOG = "catalog.pay.svc.cluster.local"
CATALOG_PODS = ("catalog-1", "catalog-2")
FAIL = 0.5   # catalog's 503 share: its callers' retries (cascade.yaml) leave it ~13-25 % failing, the rest ~100 %
RATE = 10    # requests per second into checkout, each through all eleven services
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

C: LocalCluster = None
URL = ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def values(promql, at=None):
    return [(r["metric"], float(r["value"][1])) for r in query(URL, promql, at=at)]


def settled_time():
    """The oldest of every target's latest scrape: two queries at that time see the same samples."""
    (got,) = values("min(timestamp(up))")
    return got[1]


def in_load_pod(*argv, timeout=60):
    return C.ambient("exec", "-n", "pay", "load", "--", "python3", *argv, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    global C, URL
    C = LocalCluster(NAME, tmp_path_factory.mktemp("incident"))
    port = free_port()
    URL = f"http://127.0.0.1:{port}"
    C.ambient("down", check=False)
    C.ambient("up", YAML, "--prometheus", "--prometheus-port", str(port), "--scrape-interval", "1s", timeout=180)
    load = None
    try:
        # Every hop answers (the waypoint is ready) before the steady load starts.
        wait_for(lambda: json.loads(in_load_pod("apps/load.py", CHECKOUT, "-n", "10", "-c", "2").stdout)
                 ["status"].get("200") == 10, timeout=60, step=0.5)
        load = subprocess.Popen([sys.executable, "-m", "localcluster.cli", "-c", NAME, "exec", "-n", "pay", "load",
                                 "--", "python3", "apps/load.py", CHECKOUT, "-n", "0", "-c", "4", "--rate", str(RATE),
                                 "--max-seconds", "300"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        yield C
    finally:
        if load is not None:
            os.killpg(load.pid, signal.SIGKILL)
            load.wait()
        C.destroy()


def _stat(*args):
    p = C.ambient("stat", "svc", "-n", "pay", *args, "-o", "json", check=False)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


def _catalog_row(page):
    return page.locator(f'#services tr[data-name="{CATALOG}"] td').nth(1)


@pytest.fixture(scope="module")
def incident(cluster, tmp_path_factory):
    """Healthy traffic in Prometheus, the dashboard open; then catalog fails. When did each view point at it?"""
    from playwright.sync_api import sync_playwright
    shots = tmp_path_factory.mktemp("screenshots")
    # Every service's request series scraped twice: rate() sees what comes next.
    wait_for(lambda: len(values('count_over_time(istio_requests_total{reporter="waypoint",'
                                f'destination_service="{CATALOG}",response_code="200"}}[1m]) >= 2')) > 0,
             timeout=60, step=0.5)
    healthy = _stat()
    url = cluster.status()["observability"]["scrape_endpoint"] + "/dashboard"
    got = {"healthy": healthy, "screenshots": str(shots)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("http://127.0.0.1:") else r.abort())
            page.goto(url)
            _catalog_row(page).wait_for(timeout=30000)
            got["healthy_cell"] = (_catalog_row(page).text_content(), _catalog_row(page).get_attribute("class"))
            page.screenshot(path=str(shots / "healthy.png"), full_page=True)
            ips = [C.ip(pod) for pod in CATALOG_PODS]
            t_fail = time.monotonic()
            for ip in ips:
                assert in_load_pod("apps/fetch.py", "POST", f"http://{ip}:8080/fail?rate={FAIL}").returncode == 0
            deadline = t_fail + 90   # beyond the 60 s target, so a miss reports how late it was
            while time.monotonic() < deadline and ("stat_s" not in got or "dashboard_s" not in got):
                if "stat_s" not in got:
                    doc = _stat("--sort", "success")
                    if doc["rows"] and doc["rows"][0]["name"] == CATALOG:
                        got["stat_s"], got["stat"] = time.monotonic() - t_fail, doc
                if "dashboard_s" not in got and _catalog_row(page).get_attribute("class") == "bad":
                    got["dashboard_s"] = time.monotonic() - t_fail
                    got["dashboard_cell"] = _catalog_row(page).text_content()
                    page.screenshot(path=str(shots / "catalog-failing.png"), full_page=True)
                time.sleep(0.5)
        finally:
            browser.close()
    print(json.dumps({k: v for k, v in got.items() if k.endswith("_s") or k.endswith("cell")}))
    return got


@pytest.mark.root
def test_failing_catalog_is_ranked_worst_and_shown_red_within_a_minute(incident):
    rows = {r["name"]: r for r in incident["healthy"]["rows"]}
    # Before: every one of the eleven services answered, all through the waypoint, none failing (a
    # warm-up round that met a pod still starting may be in the window: 99 %).
    assert len(rows) == 11 and all(r["success"] >= 0.99 for r in rows.values()), rows
    assert incident["healthy_cell"][1] != "bad", incident["healthy_cell"]
    assert incident.get("stat_s", 999) <= 60, incident
    assert incident.get("dashboard_s", 999) <= 60, incident
    ranked = incident["stat"]["rows"]
    assert ranked[0]["name"] == CATALOG and ranked[0]["success"] < 1
    assert all(r["success"] > ranked[0]["success"] for r in ranked[1:]), ranked
    assert incident["dashboard_cell"].endswith("%") and float(incident["dashboard_cell"][:-1]) < 95
    assert os.path.getsize(os.path.join(incident["screenshots"], "catalog-failing.png")) > 0


@pytest.mark.root
def test_stat_agrees_with_promql_over_the_same_window(incident):
    at = settled_time()
    doc = _stat("--at", str(at), "-t", "1m")
    assert doc["time"] == at
    sel = 'reporter="waypoint",destination_service_namespace="pay"'
    by = "destination_service"
    rps = {m[by]: v for m, v in values(f"sum by ({by}) (rate(istio_requests_total{{{sel}}}[1m]))", at)}
    good = {m[by]: v for m, v in values(f'sum by ({by}) (rate(istio_requests_total{{{sel},response_code!~"5.*"}}[1m]))',
                                        at)}
    p99 = {m[by]: v for m, v in values(f"histogram_quantile(0.99, sum by (le, {by}) "
                                       f"(rate(istio_request_duration_milliseconds_bucket{{{sel}}}[1m])))", at)}
    got = {r["name"]: r for r in doc["rows"]}
    assert set(got) == set(rps) and len(got) == 11
    for svc, r in got.items():
        assert r["rps"] == pytest.approx(rps[svc], rel=1e-9), svc
        assert r["success"] == pytest.approx(good.get(svc, 0.0) / rps[svc], rel=1e-9), svc
        assert r["latency_ms_p99"] == pytest.approx(p99[svc], rel=1e-9), svc
    # The window holds the failure (how much of it depends on how fast the first test saw it: a
    # 1 m window blends the healthy minute before; a loaded box gave 97 %): catalog is the worst.
    assert got[CATALOG]["success"] < min(r["success"] for svc, r in got.items() if svc != CATALOG), got
    # The table prints the same numbers, rounded.
    table = C.ambient("stat", "svc", "-n", "pay", "--at", str(at), "--sort", "success").stdout.splitlines()
    name, success, rps_cell = table[1].split()[:3]
    assert name == CATALOG and success == f"{got[CATALOG]['success'] * 100:.2f}%"
    assert rps_cell == f"{got[CATALOG]['rps']:.2f}"


@pytest.mark.root
def test_access_logs_find_the_failing_requests(incident):
    p = C.ambient("logs", "--access", "-n", "pay", "--svc", "catalog", "--status", "5xx", "--since", "2m", "-o", "json")
    recs = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert recs and p.stderr == "", p.stderr
    assert all(r["service"] == CATALOG and r["code"] == 503 and r["proxy"]["kind"] == "waypoint" for r in recs)
    # The waypoint logs addresses; the records name the pods behind them.
    assert {r["src"]["workload"] for r in recs} == {"pricing-1"}
    # (a retry the budget refused was sent nowhere: no upstream host)
    assert {r["dst"]["workload"] for r in recs if r["dst"]["addr"]} <= set(CATALOG_PODS)
    assert all(r["time"] >= time.time() - 120 for r in recs)
    # ... and the same requests as text, one line each; a healthy service's 5xx: none (exit 3).
    text = C.ambient("logs", "--access", "-n", "pay", "--svc", "catalog", "--status", "503", "--since", "2m").stdout
    assert " pay/pricing-1 -> catalog.pay (pay/catalog-" in text and '"GET /" 503 ' in text
    none = C.ambient("logs", "--access", "--svc", "users", "--status", "5xx", "--since", "2m", check=False)
    assert none.returncode == 3 and none.stdout == ""
    # ztunnel's side: the load pod's connections into checkout, mTLS.
    zt = C.ambient("logs", "--access", "--proxy", "ztunnel", "-n", "pay", "-o", "json").stdout.splitlines()
    assert any(json.loads(ln)["src"]["workload"] == "load" and json.loads(ln)["security"] == "mutual_tls"
               for ln in zt)


@pytest.mark.root
def test_access_logs_follow_into_head_exits_quietly(incident):
    p = subprocess.run(f"{sys.executable} -m localcluster.cli -c {NAME} logs --access --follow --since 1s "
                       "--svc checkout | head -3", shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0 and p.stderr == "" and len(p.stdout.splitlines()) == 3, p
    assert all("-> checkout.pay" in ln for ln in p.stdout.splitlines()), p.stdout
    once = subprocess.run(f"{sys.executable} -m localcluster.cli -c {NAME} logs --access | head -1", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert once.returncode == 0 and once.stderr == "" and len(once.stdout.splitlines()) == 1, once
    bad = C.ambient("logs", "--access", "--status", "6xx", check=False)
    assert bad.returncode == 1 and "bad --status item" in bad.stderr


@pytest.mark.root
def test_logs_of_a_pod_and_usage_errors(incident):
    assert C.ambient("logs", "-n", "pay", "catalog-1", "--tail", "5").returncode == 0
    for args, why in [(("--svc", "catalog"), "--svc need --access"), ((), "which pod?"),
                      (("--access", "-n", "pay", "catalog-1"), "give no pod"), (("-n", "pay", "nobody"), "no pod pay/nobody")]:
        p = C.ambient("logs", *args, check=False)
        assert p.returncode == 1 and why in p.stderr, (args, p.stderr)

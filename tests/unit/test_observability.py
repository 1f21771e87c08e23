"""Observability decisions: stat/edges PromQL and rows, mesh-health text, convergence, scrape discovery, Prometheus files."""
import os
import re
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from localcluster import prometheus
from localcluster.meshmetrics import (CertSample, ControlPlaneSample, Convergence, MeshSample, ProxySample,
                                      render)
from localcluster.scrape import MESH_PATH, ScrapeTarget, http_sd, process_metrics
from localcluster.stat import edge_query, edge_table, edges, rows, sort_rows, stat_queries, table
from mesh.metrics import build_info, family


def _selector(promql):
    """The label matchers of the first selector in `promql`, as (label, op, value) tuples."""
    body = re.search(r"\{([^}]*)\}", promql).group(1)
    return re.findall(r'(\w+)(=~|!~|!=|=)"((?:[^"\\]|\\.)*)"', body)


def _promql_regex(v):
    return re.compile(v.encode().decode("unicode_escape"))  # PromQL string escapes -> RE2 text


@pytest.mark.parametrize("kind, ns, name, src, want", [
    ("svc", "shop", "payment", None, {("destination_service_namespace", "=", "shop"),
                                      ("destination_service_name", "=", "payment")}),
    ("service", None, None, None, set()),
    ("pod", "shop", "payment-v1", None, {("destination_workload_namespace", "=", "shop"),
                                         ("destination_workload", "=", "payment-v1")}),
    ("route", "shop", "shop.payment.0", None, {("destination_service_namespace", "=", "shop"),
                                               ("route", "=", "shop.payment.0")}),
    ("waypoint", "shop", "wp", None, {("gateway", "=", "shop/wp")}),
    ("waypoint", "shop", None, None, {("namespace", "=", "shop")}),
    ("svc", "shop", None, ("shop", "client"), {("destination_service_namespace", "=", "shop"),
                                               ("source_workload_namespace", "=", "shop"),
                                               ("source_workload", "=", "client")}),
])
def test_stat_http_selectors(kind, ns, name, src, want):
    q = stat_queries(kind, namespace=ns, name=name, src=src, window="1m")
    for promql in (q.rps, q.ok, *(x for _, x in q.latency)):
        got = set(_selector(promql))
        assert ("reporter", "=", "waypoint") in got
        assert got - {("reporter", "=", "waypoint"), ("response_code", "!~", "5..")} == want, promql
    assert "[1m]" in q.rps and q.ok.count('response_code!~"5.."') == 1
    assert [p for p, _ in q.latency] == ["p50", "p95", "p99"]
    assert q.latency[2][1].startswith("histogram_quantile(0.99, sum by (le, ")


@pytest.mark.parametrize("ns, name, matches, not_matches", [
    ("shop", "payment", ["payment.shop.svc.cluster.local"], ["payment.other.svc.cluster.local",
                                                              "payment2.shop.svc.cluster.local"]),
    ("shop", None, ["a.shop.svc.cluster.local"], ["a.shop2.svc.cluster.local"]),
    (None, "pay.ment", ["pay.ment.x.svc.cluster.local"], ["payXment.x.svc.cluster.local"]),
])
def test_stat_svc_tcp_uses_the_fqdn_as_only_the_client_ztunnel_knows_it(ns, name, matches, not_matches):
    q = stat_queries("svc", namespace=ns, name=name, src=None, window="30s")
    (sel,) = [s for s in _selector(q.tcp) if s[0] == "destination_service"]
    assert ("reporter", "=", "source") in _selector(q.tcp) and sel[1] == "=~"
    rx = _promql_regex(sel[2])
    assert all(rx.fullmatch(m) for m in matches) and not any(rx.fullmatch(m) for m in not_matches)


def test_stat_svc_tcp_without_filters_leaves_out_connections_to_no_service():
    q = stat_queries("svc", namespace=None, name=None, src=None, window="1m")
    assert _selector(q.tcp) == [("reporter", "=", "source"), ("destination_service", "!=", "unknown")]


def test_stat_route_by_name_matches_every_rule_of_the_route():
    q = stat_queries("route", namespace="shop", name="payment", src=None, window="1m")
    (sel,) = [s for s in _selector(q.rps) if s[0] == "route"]
    rx = _promql_regex(sel[2])
    assert rx.fullmatch("shop.payment.0") and rx.fullmatch("shop.payment.12") and rx.fullmatch("payment")
    assert not rx.fullmatch("shop.payments.0") and not rx.fullmatch("shop.xpayment.0")
    assert stat_queries("route", namespace=None, name=None, src=None, window="1m").tcp is None
    assert stat_queries("pod", namespace=None, name=None, src=None, window="1m").tcp.startswith(
        'sum by (destination_workload_namespace, destination_workload) (rate(istio_tcp_connections_opened_total'
        '{reporter="destination"}')


def _vec(value, **labels):
    return {"metric": labels, "value": [1700000000.0, str(value)]}


def test_rows_join_the_queries_by_key_and_compute_success():
    q = stat_queries("svc", namespace="shop", name=None, src=None, window="1m")
    a, b = "a.shop.svc.cluster.local", "b.shop.svc.cluster.local"
    res = {"rps": [_vec(10, destination_service=a), _vec(2, destination_service=b)],
           "ok": [_vec(9, destination_service=a)],  # b: only 5xx, so no "ok" series at all
           "p50": [_vec(3, destination_service=a), _vec("NaN", destination_service=b)],
           "p95": [_vec(7.5, destination_service=a)], "p99": [_vec(9.9, destination_service=a)],
           "tcp": [_vec(0.5, destination_service=a), _vec(0.25, destination_service="c.shop.svc.cluster.local")]}
    rs = rows(q, res)
    assert [r["name"] for r in rs] == [a, b, "c.shop.svc.cluster.local"]
    ra, rb, rc = rs
    assert ra["rps"] == 10 and ra["success"] == pytest.approx(0.9) and ra["latency_ms_p95"] == 7.5
    assert ra["tcp_connections_per_second"] == 0.5
    assert rb["success"] == 0.0 and rb["latency_ms_p50"] is None  # NaN (no buckets) is no number
    assert rc["rps"] is None and rc["success"] is None and rc["tcp_connections_per_second"] == 0.25
    t = table("svc", rs)
    assert t[0] == ["NAME", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN/S"]
    assert t[1] == [a, "90.00%", "10.00", "3.0ms", "7.5ms", "9.9ms", "0.50"]
    assert table("svc", [dict(ra, latency_ms_p99=12.4)])[1][5] == "12ms"
    assert t[3][1:3] == ["-", "-"]


def _row(name, success, rps, p99=None):
    return {"name": name, "success": success, "rps": rps, "latency_ms_p50": None, "latency_ms_p95": None,
            "latency_ms_p99": p99, "tcp_connections_per_second": None}


@pytest.mark.parametrize("by, want", [
    ("name", ["a", "b", "c", "d", "e"]),
    ("success", ["c", "a", "e", "b", "d"]),   # worst first, ties by name, rows with no number last
    ("rps", ["b", "e", "a", "c", "d"]),       # busiest first
    ("p99", ["c", "a", "b", "d", "e"]),
])
def test_sort_rows(by, want):
    rs = [_row("b", 1.0, 9.0, 2.0), _row("a", 0.5, 1.0, 3.0), _row("e", 0.99, 5.0), _row("d", None, None, 1.0),
          _row("c", 0.0, 0.5, 40.0)]
    assert [r["name"] for r in sort_rows(rs, by)] == want


def test_edges_merge_tcp_and_http_per_identity_pair():
    tcp_q, http_q = edge_query(namespace="shop", window="5m")
    assert tcp_q.startswith("max by (") and ", reporter)" in tcp_q and tcp_q.endswith("> 0")
    assert 'reporter="waypoint",destination_workload_namespace="shop"' in http_q
    k = dict(source_workload_namespace="shop", source_workload="client",
             source_principal="spiffe://cluster.local/ns/shop/sa/default", destination_workload_namespace="shop",
             destination_workload="payment-v1", destination_principal="spiffe://cluster.local/ns/shop/sa/payment",
             connection_security_policy="mutual_tls")
    plain = dict(k, source_workload="legacy", source_principal="unknown", connection_security_policy="none")
    es = edges([_vec(3, **k), _vec(1, **plain)], [_vec(40, **k)])
    assert [(e["src"], e["connections"], e["requests"], e["mtls"]) for e in es] == [
        ("shop/client", 3, 40, True), ("shop/legacy", 1, 0, False)]
    t = edge_table(es)
    assert t[1][:5] == ["shop/client", "shop/payment-v1", "cluster.local/ns/shop/sa/default",
                        "cluster.local/ns/shop/sa/payment", "√ mTLS"]
    assert t[2][4] == "plaintext"


def _sample(version=5, proxies=None, times=None, now=1000.0):
    cp = ControlPlaneSample(running=True, version=version, subscribed=2, snapshots=2, pushes=10, certificates=4,
                            csr_denied_by_reason={"not_on_node": 1}, version_times=times or {5: 100.0},
                            issued_by_identity={"spiffe://td/ns/shop/sa/a": 3})
    return MeshSample(now=now, control_plane=cp, proxies=tuple(proxies or ()))


def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_mesh_health_text_parses_with_istio_names():
    zt = ProxySample(proxy="ztunnel-n1", kind="ztunnel", node="n1", up=True, version=5, connected=True,
                     last_update_at=100.01, connect_failures=2,
                     certificates=(CertSample(identity="spiffe://td/ns/shop/sa/a", not_after=1600.0, fetch_errors=1),),
                     enroll_failing=("shop/b",),
                     ebpf=(("shop/a", "connect4"), ("shop/a", "sockops"), ("shop/a", "sk_lookup")))
    down = ProxySample(proxy="wp-waypoint", kind="waypoint", node="n2", up=False)
    fams = _families(render(_sample(proxies=[zt, down]), Convergence()))
    assert [s.value for s in fams["pilot_xds"].samples] == [2]
    pushes = {s.labels["type"]: s.value for s in fams["pilot_xds_pushes"].samples}
    assert pushes == {"snapshot": 2, "delta": 8}
    assert [s.value for s in fams["citadel_server_csr_count"].samples] == [5]
    assert [(s.labels, s.value) for s in fams["ambient_certificates_issued"].samples] == [
        ({"identity": "spiffe://td/ns/shop/sa/a"}, 3)]
    assert {s.labels["proxy"]: s.value for s in fams["ambient_proxy_up"].samples} == {"ztunnel-n1": 1, "wp-waypoint": 0}
    assert [(s.labels, s.value) for s in fams["ambient_proxy_config_version"].samples] == [
        ({"proxy": "ztunnel-n1", "proxy_kind": "ztunnel"}, 5)]
    (exp,) = fams["istio_agent_cert_expiry_seconds"].samples
    assert exp.value == 600 and exp.labels["resource_name"] == "spiffe://td/ns/shop/sa/a"
    progs = {s.labels["program"]: s.labels for s in fams["ambient_ebpf_programs_attached"].samples}
    assert set(progs) == {"connect4", "sockops", "sk_lookup"}
    assert progs["connect4"] == {"node": "n1", "workload_namespace": "shop", "workload": "a", "program": "connect4"}
    errs = {(s.labels["component"], s.labels["reason"]): s.value for s in fams["ambient_mesh_errors"].samples}
    assert errs[("control_plane", "not_on_node")] == 1 and errs[("ztunnel", "control_plane_unavailable")] == 2
    assert errs[("ztunnel", "certificate_fetch_failed")] == 1
    assert [s.labels for s in fams["ambient_pod_enroll_failing"].samples] == [
        {"proxy": "ztunnel-n1", "workload_namespace": "shop", "workload": "b"}]
    assert [s.labels for s in fams["istio_build"].samples] == [{"component": "pilot", "tag": "0.1.0"}]
    for f in fams.values():  # no label that would clash with the scrape target's pod/namespace
        for s in f.samples:
            assert not {"pod", "namespace"} & set(s.labels), (f.name, s.labels)


def test_convergence_observes_new_versions_only():
    conv = Convergence()
    p = lambda v, t: ProxySample(proxy="z", kind="ztunnel", node="n", up=True, version=v, last_update_at=t)  # noqa: E731
    times = {5: 100.0, 6: 200.0, 7: 300.0}
    conv.observe(_sample(proxies=[p(5, 150.0)], times=times))  # first sight: a baseline, not a push
    assert conv.count == 0
    conv.observe(_sample(proxies=[p(6, 200.004)], times=times))
    conv.observe(_sample(proxies=[p(6, 200.004)], times=times))  # same version again: nothing new
    conv.observe(_sample(proxies=[p(8, 400.0)], times=times))  # a version whose time is unknown
    assert conv.count == 1 and conv.sum == pytest.approx(0.004)
    (fam,) = text_string_to_metric_families(conv.render())
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    assert buckets["0.0025"] == 0 and buckets["0.005"] == 1 and buckets["+Inf"] == 1


def test_scrape_targets_are_labelled_as_kubernetes_sd_would():
    z = ScrapeTarget(kind="ztunnel", target="n1", replica=1, admin_socket="/x", pod="ztunnel-n1",
                     namespace="istio-system", node="n1")
    w = ScrapeTarget(kind="waypoint", target="shop/wp", admin_socket="/y", pod="wp-waypoint", namespace="shop",
                     node="n2")
    sd = http_sd([z, w], "127.0.0.1:4000")
    assert all(g["targets"] == ["127.0.0.1:4000"] for g in sd)
    assert [g["labels"]["__metrics_path__"] for g in sd] == ["/metrics/ztunnel/n1/1", "/metrics/waypoint/shop/wp/0",
                                                             MESH_PATH]
    assert sd[0]["labels"] | {} == {"__metrics_path__": "/metrics/ztunnel/n1/1", "pod": "ztunnel-n1",
                                    "namespace": "istio-system", "app": "ztunnel", "node": "n1", "worker": "1"}
    assert sd[1]["labels"]["gateway"] == "shop/wp" and sd[2]["labels"]["app"] == "istiod"


def test_process_metrics_from_proc_stat():
    # pid (comm with ) and spaces) state ppid ... utime=250 stime=50 ... starttime=1000 vsize rss
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 6 + ["1000", "123456789", "2000"]
    stat = "4242 (python3 (a) b) " + " ".join(fields) + "\n"
    fams = _families(process_metrics(stat, 17, clk_tck=100, page_size=4096, boot_time=1.7e9))
    v = {n: f.samples[0].value for n, f in fams.items()}
    assert v == {"process_cpu_seconds": 3.0, "process_resident_memory_bytes": 2000 * 4096,
                 "process_virtual_memory_bytes": 123456789, "process_start_time_seconds": 1.7e9 + 10,
                 "process_open_fds": 17}


def test_family_and_build_info_text():
    assert family("x_total", "counter", "doc", [({"a": 'q"'}, 2), ({}, 0.5)]) == (
        '# HELP x_total doc\n# TYPE x_total counter\nx_total{a="q\\""} 2\nx_total 0.5\n')
    assert b'istio_build{component="ztunnel",tag="0.1.0"} 1\n' in build_info("ztunnel")


def test_prometheus_config_scrapes_only_loopback_and_promtool_accepts_it(tmp_path):
    cfg_path = prometheus.write_files(str(tmp_path), "http://127.0.0.1:4000/targets", scrape_interval=1.0)
    cfg = yaml.safe_load(open(cfg_path))
    (job,) = cfg["scrape_configs"]
    assert job["http_sd_configs"] == [{"url": "http://127.0.0.1:4000/targets", "refresh_interval": "2s"}]
    (keep,) = job["relabel_configs"]
    assert keep["action"] == "keep" and keep["source_labels"] == ["__address__"]
    rx = re.compile(keep["regex"])
    assert rx.fullmatch("127.0.0.1:15020") and not rx.fullmatch("10.244.0.2:15020") and not rx.fullmatch(
        "127.0.0.10:1")
    assert cfg["global"]["scrape_interval"] == "1000ms" and os.path.isdir(tmp_path / "data")
    for what, path in (("config", cfg_path), ("rules", str(tmp_path / "rules.yml"))):
        p = subprocess.run(["promtool", "check", what, path], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (what, p.stdout, p.stderr)


def test_recording_rules_cover_the_golden_signals():
    rules = {r["record"] for r in prometheus.recording_rules()["groups"][0]["rules"]}
    for want in ("service:istio_requests:rate1m", "service:istio_requests:success_ratio1m",
                 "service:istio_request_duration_milliseconds:p99_1m", "workload:istio_requests:rate1m",
                 "edge:istio_tcp_connections_opened:rate1m", "proxy:process_cpu_seconds:rate1m",
                 "mesh:errors_by_reason:rate1m"):
        assert want in rules


def test_queries_go_to_loopback_only():
    with pytest.raises(prometheus.PrometheusError) as e:
        prometheus.query("http://10.0.0.1:9090", "up")
    assert e.value.reason == "not_local"


def test_dashboard_document_without_prometheus_and_a_self_contained_page():
    import asyncio

    from localcluster import dashboard
    zt = ProxySample(proxy="ztunnel-n1", kind="ztunnel", node="n1", up=True, version=5, connected=True,
                     certificates=(CertSample(identity="a", not_after=1600.0), CertSample(identity="b", not_after=1300.0)),
                     ebpf=(("shop/a", "connect4"), ("shop/a", "sockops")))
    conv = Convergence()
    conv.sum, conv.count = 0.01, 2
    doc = asyncio.run(dashboard.data("c1", _sample(proxies=[zt]), conv, None))
    assert doc["proxies"] == [{"proxy": "ztunnel-n1", "kind": "ztunnel", "node": "n1", "up": True, "connected": True,
                               "version": 5, "cert_expiry_seconds": 300.0, "ebpf_links": 2}]
    assert doc["control_plane"]["convergence_mean_seconds"] == 0.005 and doc["services"] == [] and doc["error"] is None
    # Nothing from elsewhere: no URL with a scheme or host, no external script or style.
    assert not re.search(rb"(https?|wss?):|//[a-z0-9]", dashboard.PAGE) and b"src=" not in dashboard.PAGE and b"<link" not in dashboard.PAGE
    assert b"innerHTML" not in dashboard.PAGE  # data goes in as text only


def test_prometheus_workload_refuses_a_port_in_use(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(prometheus.PrometheusError) as e:
            prometheus.workload(str(tmp_path), "http://127.0.0.1:1/targets", port=port, scrape_interval=1.0,
                                log_path=str(tmp_path / "log"))
        assert e.value.reason == "port_in_use" and str(port) in str(e.value)
    sw = prometheus.workload(str(tmp_path), "http://127.0.0.1:1/targets", port=port, scrape_interval=1.0,
                             log_path=str(tmp_path / "log"))
    (spec,) = sw.replicas
    assert sw.key == ("prometheus", "istio-system/prometheus") and spec.admin_socket is None
    assert f"--web.listen-address=127.0.0.1:{port}" in spec.argv and spec.netns is None

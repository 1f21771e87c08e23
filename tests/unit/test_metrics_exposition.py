"""Our Prometheus exposition, read back by prometheus_client's own parser (the reference)."""
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import Registry
from ztunnel.metrics import TcpMetrics


def parse(text: bytes):
    return {s.name + str(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_counters_round_trip_through_the_reference_parser():
    r = Registry()
    c = r.counter("demo_requests", "Requests, by route", ("route", "code"))
    c.labels("/a", "200").inc()
    c.labels("/a", "200").inc(2)
    c.labels('we"ird\\path\n', "503").inc(0.5)
    got = parse(r.exposition())
    assert got == {"demo_requests_total[('code', '200'), ('route', '/a')]": 3.0,
                   "demo_requests_total[('code', '503'), ('route', 'we\"ird\\\\path\\n')]": 0.5}


def test_ztunnel_tcp_metrics_keep_istio_names_and_labels():
    m = TcpMetrics()
    m.record({"direction": "inbound", "src.workload": "c", "src.namespace": "a", "dst.workload": "s",
              "dst.namespace": "b", "src.identity": "spiffe://cluster.local/ns/a/sa/c", "security": "mutual_tls",
              "bytes_sent": 10, "bytes_recv": 20})
    m.record({"direction": "inbound", "dst.workload": "s", "dst.namespace": "b", "error": "no_allow_match"})
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert {"istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_connections_failed",
            "istio_tcp_received_bytes", "istio_tcp_sent_bytes", "ztunnel_inbound_rejected"} <= set(fams)
    opened = {s.labels["response_flags"]: s.value for s in fams["istio_tcp_connections_opened"].samples}
    assert opened == {"-": 1.0, "DENY": 1.0}
    received = [s for s in fams["istio_tcp_received_bytes"].samples if s.labels["response_flags"] == "-"]
    assert received[0].value == 10.0 and received[0].labels["source_principal"] == "spiffe://cluster.local/ns/a/sa/c"
    assert received[0].labels["reporter"] == "destination" and received[0].labels["connection_security_policy"] == "mutual_tls"

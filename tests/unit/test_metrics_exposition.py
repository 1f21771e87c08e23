"""Our Prometheus exposition, read back by prometheus_client's own parser (the reference)."""
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import Registry
from mesh.proxy.reason import Direction, Reason
from mesh.proxy.result import ConnectionResult, Listener, Peer, SecurityPolicy, Stage
from ztunnel.metrics import TcpLabels, TcpMetrics


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


def families(m: TcpMetrics):
    return {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}


def test_ztunnel_tcp_metrics_keep_istio_names_and_labels():
    m = TcpMetrics()
    m.record(ConnectionResult(direction=Direction.INBOUND, listener=Listener.HBONE,
                              src=Peer("c", "a", "spiffe://cluster.local/ns/a/sa/c"), dst=Peer("s", "b"),
                              security=SecurityPolicy.MUTUAL_TLS, bytes_sent=10, bytes_recv=20))
    m.record(ConnectionResult(direction=Direction.INBOUND, listener=Listener.INBOUND, src=Peer(),
                              dst=Peer("s", "b"), reason=Reason.NO_ALLOW_MATCH))
    fams = families(m)
    assert {"istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_connections_failed",
            "istio_tcp_received_bytes", "istio_tcp_sent_bytes", "ztunnel_inbound_rejected"} <= set(fams)
    assert set(fams["istio_tcp_connections_opened"].samples[0].labels) == set(TcpLabels.__dataclass_fields__)
    opened = {s.labels["response_flags"]: s.value for s in fams["istio_tcp_connections_opened"].samples}
    assert opened == {"-": 1.0, "DENY": 1.0}
    received = {s.labels["response_flags"]: s for s in fams["istio_tcp_received_bytes"].samples}
    ok = received["-"]
    assert ok.value == 10.0 and ok.labels["source_principal"] == "spiffe://cluster.local/ns/a/sa/c"
    assert ok.labels["reporter"] == "destination" and ok.labels["connection_security_policy"] == "mutual_tls"
    assert received["DENY"].labels["connection_security_policy"] == "unknown"
    sent = {s.labels["response_flags"]: s.value for s in fams["istio_tcp_sent_bytes"].samples}
    assert sent["-"] == 20.0
    failed = {s.labels["response_flags"]: s.value for s in fams["istio_tcp_connections_failed"].samples}
    assert failed == {"DENY": 1.0}
    # A policy denial is not a rejection of hostile input.
    assert not fams["ztunnel_inbound_rejected"].samples


def test_rejections_count_only_in_the_rejected_family_with_their_count():
    m = TcpMetrics()
    m.record(ConnectionResult(direction=Direction.INBOUND, listener=Listener.HBONE, src=Peer(),
                              dst=Peer("s", "b"), reason=Reason.NOT_TLS, stage=Stage.TLS, count=7))
    fams = families(m)
    assert not fams["istio_tcp_connections_opened"].samples
    (s,) = fams["ztunnel_inbound_rejected"].samples
    assert s.value == 7.0 and s.labels == {"listener": "hbone", "reason": "not_tls", "destination_workload": "s",
                                          "destination_workload_namespace": "b"}


def test_bad_requests_count_as_failed_connections_and_as_rejections():
    m = TcpMetrics()
    m.record(ConnectionResult(direction=Direction.INBOUND, listener=Listener.INBOUND, src=Peer(),
                              dst=Peer("s", "b"), reason=Reason.ZTUNNEL_PORT))
    fams = families(m)
    (f,) = fams["istio_tcp_connections_failed"].samples
    assert f.labels["response_flags"] == "DPE"
    (s,) = fams["ztunnel_inbound_rejected"].samples
    assert s.labels["listener"] == "inbound" and s.labels["reason"] == "ztunnel_port"


def test_outbound_reports_as_source_and_mirrors_peer_protocol_flags():
    m = TcpMetrics()
    m.record(ConnectionResult(direction=Direction.OUTBOUND, listener=Listener.OUTBOUND, src=Peer("c", "a"),
                              dst=Peer("s", "b"), security=SecurityPolicy.MUTUAL_TLS, reason=Reason.BAD_FRAME_SIZE,
                              bytes_sent=3, bytes_recv=4))
    (s,) = families(m)["istio_tcp_connections_failed"].samples
    assert s.labels["reporter"] == "source" and s.labels["response_flags"] == "UPE"

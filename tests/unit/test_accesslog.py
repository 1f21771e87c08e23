"""`ambient logs --access`: the proxies' own log lines (made by their real formatters) parsed into records, filtered, printed."""
import dataclasses
import json
import logging
import os

import pytest

from localcluster.accesslog import (AccessLogError, AccessRecord, Endpoint, Filter, Proxy, Reader, StatusMatch, seek_since,
                                    enrich, json_doc, parse_line, parse_status, proxy_logs, text_line)
from mesh.proxy.reason import Direction, Reason
from mesh.proxy.result import ConnectionResult, Listener, Peer, SecurityPolicy
from waypoint.telemetry import RequestLabels, RequestResult, access_log_line

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")  # mesh/proxy/bootstrap.py's
WP = Proxy("waypoint", "pay/waypoint")
ZT = Proxy("ztunnel", "node-1")
T0 = 1796309827.25  # 2026-12-03T14:57:07.250Z


def logged(message, level=logging.INFO, name="ambient.access", created=T0):
    rec = logging.LogRecord(name, level, __file__, 1, "%s", (message,), None)
    rec.created, rec.msecs = created, (created % 1) * 1000
    return FORMAT.format(rec) + "\n"


LABELS = RequestLabels(destination_service="catalog.pay.svc.cluster.local", destination_service_name="catalog",
                       destination_service_namespace="pay", response_code="503", response_flags="URX")


def request(**kw):
    base = dict(labels=LABELS, start_time=T0, duration_ms=12.6, request_bytes=0, response_bytes=17, method="GET",
                path="/items?id=7", protocol="HTTP/1.1", response_code_details="via_upstream", user_agent="load/1",
                request_id="rid-1", authority="catalog", upstream_host="10.244.2.5:8080",
                upstream_cluster="outbound|80||catalog.pay.svc.cluster.local",
                downstream_local_address="10.96.50.20:80", downstream_remote_address="10.244.1.9:40312",
                route_name="default")
    return RequestResult(**(base | kw))


def connection(**kw):
    base = dict(direction=Direction.OUTBOUND, listener=Listener.OUTBOUND,
                src=Peer(workload="load", namespace="pay", identity="spiffe://cluster.local/ns/pay/sa/default",
                         addr="10.244.1.3:51000"),
                dst=Peer(workload="checkout-1", namespace="pay", identity="spiffe://cluster.local/ns/pay/sa/checkout",
                         addr="10.244.2.4:8080"),
                dst_service="checkout.pay.svc.cluster.local", security=SecurityPolicy.MUTUAL_TLS, bytes_sent=120,
                bytes_recv=340, duration=0.0123, status=200)
    return ConnectionResult(**(base | kw))


def ztunnel_line(result, **kw):
    return logged("connection complete " + json.dumps(result.log_fields(), separators=(",", ":")), **kw)


def test_waypoint_line_to_record():
    r = parse_line(logged(access_log_line(request())), WP)
    assert r == AccessRecord(
        time=T0, proxy=WP, src=Endpoint(addr="10.244.1.9:40312"), dst=Endpoint(addr="10.244.2.5:8080", namespace="pay"),
        service="catalog.pay.svc.cluster.local", code=503, flags="URX", duration_ms=12.0, bytes_sent=0,
        bytes_recv=17, method="GET", path="/items?id=7", protocol="HTTP/1.1", authority="catalog",
        request_id="rid-1", user_agent="load/1", details="via_upstream", route="default",
        upstream_cluster="outbound|80||catalog.pay.svc.cluster.local")
    assert r.failed and r.service_name == ("catalog", "pay")


@pytest.mark.parametrize("change, check", [
    ({"user_agent": 'a "quoted" agent'}, lambda r: r.user_agent == 'a "quoted" agent'),
    ({"user_agent": "x\nforged line"}, lambda r: r.user_agent == "x\\x0aforged line"),   # escaped: still one line
    ({"upstream_cluster": "", "upstream_host": "", "route_name": ""},
     lambda r: r.service is None and r.dst == Endpoint() and r.route is None),
    ({"labels": dataclasses.replace(LABELS, response_code="0", response_flags="DC")},
     lambda r: r.code == 0 and r.flags == "DC" and r.failed),
    ({"labels": dataclasses.replace(LABELS, response_code="200", response_flags="-")},
     lambda r: r.code == 200 and r.flags is None and not r.failed),
    ({"upstream_cluster": "inbound-vip|8000|http|httpbin.foo.svc.cluster.local"},
     lambda r: r.service == "httpbin.foo.svc.cluster.local" and r.dst.namespace == "foo"),
    ({"start_time": 1796309827.0}, lambda r: r.time == 1796309827.0),
])
def test_waypoint_line_variants(change, check):
    r = parse_line(logged(access_log_line(request(**change))), WP)
    assert check(r), r


def test_ztunnel_line_to_record():
    r = parse_line(ztunnel_line(connection()), ZT)
    assert r == AccessRecord(
        time=pytest.approx(T0, abs=0.002), proxy=ZT,
        src=Endpoint(workload="load", namespace="pay", identity="spiffe://cluster.local/ns/pay/sa/default",
                     addr="10.244.1.3:51000"),
        dst=Endpoint(workload="checkout-1", namespace="pay", identity="spiffe://cluster.local/ns/pay/sa/checkout",
                     addr="10.244.2.4:8080"),
        service="checkout.pay.svc.cluster.local", code=200, duration_ms=12.3, bytes_sent=120, bytes_recv=340,
        direction="outbound", security="mutual_tls")
    assert not r.failed


def test_ztunnel_failure_and_rejection_lines():
    denied = parse_line(ztunnel_line(connection(reason=Reason.DENIED_BY_POLICY, policy="pay/deny-all", status=401,
                                                direction=Direction.INBOUND, listener=Listener.HBONE),
                                     level=logging.WARNING), ZT)
    assert denied.error == Reason.DENIED_BY_POLICY.label and denied.code == 401 and denied.policy == "pay/deny-all"
    assert denied.failed and denied.flags is not None and denied.direction == "inbound"
    refused = parse_line(ztunnel_line(connection(reason=Reason.WAYPOINT_MISSING, status=None, bytes_sent=0)), ZT)
    assert refused.code is None and refused.error == "waypoint_missing" and refused.failed


@pytest.mark.parametrize("line", [
    "2026-12-03 14:57:07,250 INFO ztunnel.app enrolled pod pay/load\n",
    "Traceback (most recent call last):\n",
    "\n",
    "2026-12-03 14:57:07,250 INFO\n",
])
def test_other_lines_are_not_records(line):
    assert parse_line(line, ZT) is None and parse_line(line, WP) is None


@pytest.mark.parametrize("line, proxy, reason", [
    (logged("connection complete {not json"), ZT, "not JSON"),
    (logged("connection complete [1, 2]"), ZT, "not a JSON object"),
    (logged('connection complete {"status": "x"}'), ZT, "bad field"),
    (logged("something else"), ZT, "not a ztunnel connection record"),
    (logged('[2026-12-03T14:57:07.250Z] "GET / HTTP/1.1" 200 -'), WP, "not Istio's access-log format"),
    ("2026-13-45 99:57:07,250 INFO ambient.access connection complete {}\n", ZT, "bad log time"),
    (logged(access_log_line(request()).replace("2026-12-03T", "2026-12-xxT")), WP, "bad START_TIME"),
])
def test_unreadable_access_lines_say_why(line, proxy, reason):
    with pytest.raises(AccessLogError, match=reason):
        parse_line(line, proxy)


def test_enrich_names_pods_behind_addresses():
    r = parse_line(logged(access_log_line(request())), WP)
    e = enrich(r, {"10.244.1.9": ("pay", "pricing-1"), "10.244.2.5": ("pay", "catalog-2")})
    assert (e.src.label(), e.dst.label()) == ("pay/pricing-1", "pay/catalog-2")
    assert enrich(r, {}) is r
    z = parse_line(ztunnel_line(connection()), ZT)
    assert enrich(z, {"10.244.1.3": ("other", "x")}).src.workload == "load"  # what ztunnel knew stays


@pytest.mark.parametrize("spec, want", [
    ("5xx", (StatusMatch(klass=5),)),
    ("503", (StatusMatch(code=503),)),
    ("2xx,404", (StatusMatch(klass=2), StatusMatch(code=404))),
    ("ERROR", (StatusMatch(error=True),)),
])
def test_parse_status(spec, want):
    assert parse_status(spec) == want


@pytest.mark.parametrize("spec", ["6xx", "50", "5XXX", "", "ok", "5xx,,"])
def test_parse_status_refuses(spec):
    with pytest.raises(ValueError, match="bad --status item"):
        parse_status(spec)


def rec(**kw):
    base = dict(time=100.0, proxy=WP, src=Endpoint(workload="pricing-1", namespace="pay"),
                dst=Endpoint(workload="catalog-2", namespace="pay"), service="catalog.pay.svc.cluster.local", code=503)
    return AccessRecord(**(base | kw))


@pytest.mark.parametrize("flt, record, shown", [
    (Filter(), rec(), True),
    (Filter(status=parse_status("5xx")), rec(), True),
    (Filter(status=parse_status("5xx")), rec(code=200), False),
    (Filter(status=parse_status("503")), rec(code=504), False),
    (Filter(status=parse_status("2xx,503")), rec(code=503), True),
    (Filter(status=parse_status("5xx")), rec(code=None, error="connection_failed"), False),
    (Filter(status=parse_status("error")), rec(code=None, error="connection_failed"), True),
    (Filter(status=parse_status("error")), rec(code=200), False),
    (Filter(service="catalog"), rec(), True),
    (Filter(service="catalog.pay"), rec(), True),
    (Filter(service="pay/catalog"), rec(), True),
    (Filter(service="catalog.pay.svc.cluster.local"), rec(), True),
    (Filter(service="catalog.shop"), rec(), False),
    (Filter(service="shop/catalog"), rec(), False),
    (Filter(service="cart"), rec(), False),
    (Filter(service="catalog"), rec(service=None), False),
    (Filter(namespace="pay"), rec(), True),
    (Filter(namespace="shop"), rec(), False),
    (Filter(namespace="shop"), rec(src=Endpoint(workload="c", namespace="shop")), True),  # from it
    (Filter(namespace="pay"), rec(src=Endpoint(), dst=Endpoint()), True),   # the Service's namespace
    (Filter(since=100.0), rec(), True),
    (Filter(since=100.5), rec(), False),
    (Filter(kind="ztunnel"), rec(), False),
    (Filter(kind="waypoint", namespace="pay", service="catalog", status=parse_status("5xx"), since=50), rec(), True),
])
def test_filter(flt, record, shown):
    assert flt.matches(record) is shown


def test_text_and_json_output():
    r = enrich(parse_line(logged(access_log_line(request())), WP),
               {"10.244.1.9": ("pay", "pricing-1"), "10.244.2.5": ("pay", "catalog-2")})
    assert text_line(r) == ('2026-12-03T14:57:07.250Z waypoint/pay/waypoint pay/pricing-1 -> catalog.pay '
                            '(pay/catalog-2) "GET /items?id=7" 503 URX via_upstream 12ms route=default id=rid-1')
    z = parse_line(ztunnel_line(connection()), ZT)
    assert text_line(z).endswith("ztunnel/node-1 pay/load -> checkout.pay (pay/checkout-1) outbound mTLS 200 - ok "
                                 "12.3ms 120B/340B")
    d = json.loads(json.dumps(json_doc(r)))
    assert d["proxy"] == {"kind": "waypoint", "name": "pay/waypoint"} and d["code"] == 503
    assert d["src"]["workload"] == "pricing-1" and d["time_iso"] == "2026-12-03T14:57:07.250Z"


def test_proxy_logs_tells_workers_from_nodes_with_dashes():
    names = ["ztunnel-node-1.log", "ztunnel-node-1-1.log", "ztunnel-n.log", "waypoint-pay-waypoint.log",
             "pay_load_idle.log", "prometheus.log", "ztunnel-gone.log"]
    got = proxy_logs("/l", names, ["node-1", "n"], [("pay", "waypoint")])
    assert got == {"/l/ztunnel-node-1.log": Proxy("ztunnel", "node-1"),
                   "/l/ztunnel-node-1-1.log": Proxy("ztunnel", "node-1/1"),
                   "/l/ztunnel-n.log": Proxy("ztunnel", "n"),
                   "/l/waypoint-pay-waypoint.log": Proxy("waypoint", "pay/waypoint")}


def test_reader_reads_complete_lines_once_and_follows_appends(tmp_path):
    zt, wp = tmp_path / "ztunnel-node-1.log", tmp_path / "waypoint-pay-waypoint.log"
    first = ztunnel_line(connection(), created=T0 + 2)
    zt.write_text("2026-12-03 14:57:07,250 INFO ztunnel.app started\n" + first)
    half = logged(access_log_line(request()))
    wp.write_text(half[:40])   # a line being written
    rd = Reader(files={str(zt): ZT, str(wp): WP}, pods={"10.244.1.9": ("pay", "pricing-1")})
    assert [r.proxy for r in rd.read()] == [ZT]
    assert rd.read() == []
    with open(wp, "a") as f:
        f.write(half[40:] + logged("connection complete {broken"))
    (got,) = rd.read()
    assert got.proxy == WP and got.src.workload == "pricing-1" and rd.unreadable == 1  # the broken one
    with open(zt, "a") as f:
        f.write(logged("connection complete {broken"))
    assert rd.read() == [] and rd.unreadable == 2
    os.truncate(zt, 0)   # a new file in its place: read from the top
    zt.write_text(first)
    assert [r.proxy for r in rd.read()] == [ZT]


def test_reader_sorts_across_files_by_time(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text(logged(access_log_line(request(start_time=T0 + 1))) + logged(access_log_line(request(start_time=T0 + 3))))
    b.write_text(logged(access_log_line(request(start_time=T0 + 2))))
    rd = Reader(files={str(a): WP, str(b): Proxy("waypoint", "pay/other")}, pods={})
    assert [r.time for r in rd.read()] == [T0 + 1, T0 + 2, T0 + 3]


def test_seek_since_skips_what_is_older_and_keeps_everything_newer(tmp_path):
    path = tmp_path / "ztunnel-node-1.log"
    lines = []
    for i in range(20000):   # 2 records a second for ~3 hours, a traceback now and then
        lines.append(ztunnel_line(connection(), created=T0 + i / 2))
        if i % 997 == 0:
            lines.append("Traceback (most recent call last):\n  File x\n")
    path.write_text("".join(lines))
    size = path.stat().st_size
    since = T0 + 6000.2
    with open(path, "rb") as f:
        off = seek_since(f, size, since)
        assert 0.55 * size < off <= 0.6 * size   # close before the 12001st of 20000 records
        f.seek(off)
        rest = f.read().decode()
    assert rest.startswith(lines[0][:4])   # a line boundary
    before = path.read_bytes()[:off].decode()
    assert all(parse_line(ln, ZT).time < since for ln in before.splitlines(True) if "ambient.access" in ln)
    assert sum(1 for ln in rest.splitlines() if "ambient.access" in ln) >= 20000 - 12001
    rd = Reader(files={str(path): ZT}, pods={}, since=since)
    got = [r for r in rd.read() if r.time >= since]
    assert len(got) == 20000 - 12001
    with open(path, "rb") as f:
        assert seek_since(f, size, T0 - 1) == 0 and seek_since(f, size, T0 + 1e6) >= size - (1 << 16)

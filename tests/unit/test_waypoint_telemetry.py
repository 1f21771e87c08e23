"""Waypoint telemetry: Istio's request metrics as Prometheus parses them, the cap, the access-log line."""
import dataclasses
import math
import random
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from waypoint.telemetry import (BYTES_BUCKETS, DURATION_BUCKETS_MS, RequestLabels, RequestResult,
                                WaypointMetrics, access_log_line)

ISTIO_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_canonical_service", "source_canonical_revision", "destination_workload",
    "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "request_protocol", "response_code",
    "grpc_response_status", "response_flags", "connection_security_policy", "destination_cluster",
    "source_cluster"}
ROUTE = {"route"}  # ours, not Istio's: the matched route's name, for `ambient stat route/NAME`

WEB = RequestLabels(source_workload="sleep", source_workload_namespace="foo",
                    source_principal="spiffe://cluster.local/ns/foo/sa/sleep",
                    destination_workload="httpbin", destination_workload_namespace="foo",
                    destination_service="httpbin.foo.svc.cluster.local", destination_service_name="httpbin",
                    destination_service_namespace="foo", response_code="200")
E503 = dataclasses.replace(WEB, response_code="503", response_flags="UH")


def result(labels=WEB, ms=3.0, req=0, resp=0, **kw):
    return RequestResult(labels=labels, start_time=kw.pop("start_time", 0.0), duration_ms=ms,
                         request_bytes=req, response_bytes=resp, **kw)


def families(m):
    return {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}


def samples(fam, suffix, **labels):
    return [s for s in fam.samples if s.name == fam.name + suffix
            and all(s.labels.get(k) == v for k, v in labels.items())]


def test_families_names_types_and_istio_labels():
    m = WaypointMetrics()
    m.record(result())
    fams = families(m)
    assert {n: f.type for n, f in fams.items()} == {
        "istio_requests": "counter", "istio_request_duration_milliseconds": "histogram",
        "istio_request_bytes": "histogram", "istio_response_bytes": "histogram",
        "waypoint_metric_series_overflow": "counter", "waypoint_mirror_requests": "counter",
        "ambient_waypoint_retry_budget_exhausted": "counter"}
    (s,) = samples(fams["istio_requests"], "_total")
    assert set(s.labels) == ISTIO_LABELS | ROUTE and s.labels["route"] == "unknown"
    assert s.labels["reporter"] == "waypoint" and s.labels["destination_service"] == "httpbin.foo.svc.cluster.local"
    assert s.labels["connection_security_policy"] == "mutual_tls" and s.labels["response_flags"] == "-"
    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        for b in samples(fams[name], "_bucket"):
            assert set(b.labels) == ISTIO_LABELS | ROUTE | {"le"}


def test_counter_counts_per_label_set():
    m = WaypointMetrics()
    for _ in range(3):
        m.record(result())
    m.record(result(E503))
    fam = families(m)["istio_requests"]
    assert [s.value for s in samples(fam, "_total", response_code="200")] == [3]
    assert [(s.value, s.labels["response_flags"]) for s in samples(fam, "_total", response_code="503")] == [(1, "UH")]


@pytest.mark.parametrize("name, bounds, field", [
    ("istio_request_duration_milliseconds", DURATION_BUCKETS_MS, "ms"),
    ("istio_request_bytes", BYTES_BUCKETS, "req"),
    ("istio_response_bytes", BYTES_BUCKETS, "resp"),
])
def test_histogram_buckets_sum_and_count(name, bounds, field):
    values = [0, 0.4, 1, 7, 250, 251, 5e6, 4e9]
    values = values if field == "ms" else [int(v) for v in values]
    m = WaypointMetrics()
    for v in values:
        m.record(result(**{field: v}))
    fam = families(m)[name]
    buckets = samples(fam, "_bucket")
    les = [float(b.labels["le"]) for b in buckets]
    assert les == [float(b) for b in bounds] + [math.inf]
    for b in buckets:  # cumulative: le is "less than or equal"
        assert b.value == sum(1 for v in values if v <= float(b.labels["le"])), b.labels["le"]
    assert [s.value for s in samples(fam, "_count")] == [len(values)]
    assert samples(fam, "_sum")[0].value == pytest.approx(sum(values))


def test_istio_duration_buckets():
    assert DURATION_BUCKETS_MS == (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                                   60000, 300000, 600000, 1800000, 3600000)


def test_route_name_is_a_label_of_its_own_series():
    m = WaypointMetrics()
    m.record(result(route_name="reviews-v2"))
    m.record(result(route_name="reviews-v2"))
    m.record(result(route_name="default"))
    m.record(result())
    fam = families(m)["istio_requests"]
    assert {s.labels["route"]: s.value for s in samples(fam, "_total")} == {
        "reviews-v2": 2, "default": 1, "unknown": 1}
    dur = families(m)["istio_request_duration_milliseconds"]
    assert [s.value for s in samples(dur, "_count", route="reviews-v2")] == [2]


def test_label_values_are_escaped():
    odd = dataclasses.replace(WEB, source_workload='a"b\\c\nd')
    m = WaypointMetrics()
    m.record(result(odd))
    (s,) = samples(families(m)["istio_requests"], "_total")
    assert s.labels["source_workload"] == 'a"b\\c\nd'


def test_series_cap_folds_into_overflow_and_keeps_totals():
    m = WaypointMetrics(max_series=2)
    codes = ["200", "201", "202", "203", "200"]
    for c in codes:
        m.record(result(dataclasses.replace(WEB, response_code=c)))
    assert len(m) == 3 and m.overflowed == 2
    fams = families(m)
    totals = samples(fams["istio_requests"], "_total")
    assert sum(s.value for s in totals) == len(codes)
    (over,) = [s for s in totals if s.labels["response_code"] == "overflow"]
    assert over.value == 2 and over.labels["reporter"] == "waypoint"
    assert all(v == "overflow" for k, v in over.labels.items() if k != "reporter")
    assert [s.value for s in fams["waypoint_metric_series_overflow"].samples] == [2]


def test_the_same_labels_object_counts_each_request_in_its_series_or_the_overflow():
    # The pipeline passes one labels object per connection: the identity index must not
    # change what is counted, below the cap or past it.
    m = WaypointMetrics(max_series=1)
    a, b = WEB, dataclasses.replace(WEB, response_code="201")
    for labels in (a, b, a, b, b, a):
        m.record(result(labels))
    assert m.overflowed == 3
    totals = {s.labels["response_code"]: s.value for s in samples(families(m)["istio_requests"], "_total")}
    assert totals == {"200": 3, "overflow": 3}


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_series"):
        WaypointMetrics(max_series=0)
    with pytest.raises(ValueError, match="increasing"):
        WaypointMetrics(duration_buckets=(5, 1))


def test_chunks_join_to_the_exposition():
    m = WaypointMetrics()
    m.record(result())
    m.record(result(E503))
    assert b"".join(m.exposition_chunks()) == m.exposition()


FULL = RequestResult(
    labels=dataclasses.replace(WEB, response_code="403"), start_time=1657683532.810, duration_ms=16.7,
    request_bytes=12, response_bytes=19, method="GET", path="/admin?x=1", protocol="HTTP/1.1",
    response_code_details="rbac_access_denied_matched_policy[ns[foo]-policy[deny]-rule[0]]",
    user_agent="curl/8.0", request_id="8fce-1", authority="httpbin.foo:8000",
    downstream_local_address="10.96.0.20:8000", downstream_remote_address="10.244.1.7:40305",
    route_name="default")


def test_access_log_line_follows_istios_default_format():
    assert access_log_line(FULL) == (
        '[2022-07-13T03:38:52.810Z] "GET /admin?x=1 HTTP/1.1" 403 - '
        'rbac_access_denied_matched_policy[ns[foo]-policy[deny]-rule[0]] - "-" 12 19 16 - "-" "curl/8.0" '
        '"8fce-1" "httpbin.foo:8000" "-" - - 10.96.0.20:8000 10.244.1.7:40305 - default')


def test_access_log_line_is_one_line_whatever_the_headers():
    line = access_log_line(dataclasses.replace(FULL, user_agent="x\nforged line\r\x1b"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert '"x\\x0aforged line\\x0d\\x1b"' in line


@pytest.mark.parametrize("change", [
    {},
    {"user_agent": "", "request_id": "", "authority": "", "path": "", "route_name": ""},       # all "-"
    {"upstream_service_time_ms": 0}, {"upstream_service_time_ms": 12},
    {"path": "/caf\u00e9"},                               # printable non-ASCII: as it is
    {"path": "/a\u00a0b"},                                # not printable, not a control character: kept
    {"x_forwarded_for": "1.2.3.4\t"}, {"route_name": "r\x7f"}, {"method": "G\x00T"},
    {"response_code_details": "d\n", "upstream_cluster": "c\r"},
])
def test_access_log_line_is_the_per_field_format(change):
    # The one-f-string line must print every field exactly as `_f` does (its slow path is `_f`).
    from waypoint import telemetry
    r = dataclasses.replace(FULL, **change)
    assert access_log_line(r) == telemetry._escaped_line(r)
    assert "\n" not in access_log_line(r) and "\x00" not in access_log_line(r)


def test_access_log_upstream_fields():
    line = access_log_line(dataclasses.replace(
        FULL, labels=dataclasses.replace(WEB, response_code="503", response_flags="UF,URX"),
        upstream_host="10.244.2.3:8080", upstream_cluster="inbound-vip|8000|http|httpbin.foo.svc.cluster.local",
        upstream_service_time_ms=4, upstream_transport_failure_reason="connection refused"))
    assert ' 503 UF,URX ' in line and '"connection refused"' in line and ' 16 4 "-"' in line
    assert '"10.244.2.3:8080" inbound-vip|8000|http|httpbin.foo.svc.cluster.local ' in line


def test_mirror_results_are_counted_by_label():
    m = WaypointMetrics()
    for r in ("completed", "completed", "overflow"):
        m.count_mirror(r)
    fam = families(m)["waypoint_mirror_requests"]
    assert {s.labels["result"]: s.value for s in fam.samples} == {"completed": 2.0, "overflow": 1.0}


@pytest.mark.parametrize("bits", [0, (1 << 128) - 1, 0x0123456789abcdef0123456789abcdef, 1 << 76, 0xc000 << 48,
                                  *(random.Random(s).getrandbits(128) for s in range(50))])
def test_generated_request_id_is_uuid4_text(bits):
    # x-request-id as Envoy generates it (a UUID4), formatted without the uuid.UUID object.
    from waypoint.pipeline import request_id
    assert request_id(bits) == str(uuid.UUID(int=bits, version=4)).encode()

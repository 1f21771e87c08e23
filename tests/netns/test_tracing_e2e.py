"""Tracing end to end (root): client -> svc-a's waypoint -> a -> svc-b's waypoint -> b, the apps propagating trace headers
(deploy/local/apps/chain.py), spans received by a real OTLP/HTTP receiver running as a pod behind a Service named in the
mesh config, sampling set by a Telemetry."""
import json
import os
import time
from pathlib import Path

import pytest

from .cluster_helper import (APPS, ROOT, app_pod_yaml, cluster_fixture, idle_pod_yaml, namespace_yaml, nodes_yaml,
                             service_yaml, waypoint_yaml)

NAME = f"tr{os.getpid() % 100000}"
VIP_A, VIP_B = "10.96.60.10", "10.96.60.11"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def app(name, node, calls=()):
    """Pod `name` running chain.py, Service svc-`name` and its own waypoint wp-`name`."""
    call = [arg for c in calls for arg in ("--call", c)]
    return (app_pod_yaml(name, "shop", node, ["python3", "chain.py", "--port", "8080", *call])
            + service_yaml(f"svc-{name}", "shop", {"app": name}, waypoint=f"wp-{name}",
                           cluster_ip=VIP_A if name == "a" else VIP_B)
            + waypoint_yaml(f"wp-{name}"))


CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True) + namespace_yaml("observability")
           + app("a", "n1", calls=(f"{VIP_B}:80",)) + app("b", "n2") + idle_pod_yaml("client", "shop", "n1")
           + app_pod_yaml("otel-collector", "observability", "n2", ["python3", "otlp_receiver.py", "4318", "600"],
                          container="receiver")
           + service_yaml("otel-collector", "observability", {"app": "otel-collector"},
                          [{"name": "otlp-http", "port": 4318, "targetPort": 4318}]))

MESH_CONFIG = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry:
        service: otel-collector.observability.svc.cluster.local
        port: 4318
        http: {path: /v1/traces, timeout: 5s}
"""


def telemetry(percentage):
    return f"""
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  tracing:
  - providers: [{{name: otel}}]
    randomSamplingPercentage: {percentage}
"""


# N GETs to svc-a, each with the headers given as JSON; prints the statuses.
GET = '''
import http.client, json, sys
n, headers = int(sys.argv[1]), json.loads(sys.argv[2])
conn = http.client.HTTPConnection("%s", 80, timeout=10)
out = {}
for i in range(n):
    conn.request("GET", "/", headers={"host": "svc-a", **headers})
    r = conn.getresponse()
    r.read()
    out[str(r.status)] = out.get(str(r.status), 0) + 1
print(json.dumps(out))
''' % VIP_A


cluster = cluster_fixture(NAME, "trace", CLUSTER, {
    "chain.py": Path(APPS, "chain.py").read_text(),
    "otlp_receiver.py": Path(ROOT, "tests", "otlp_receiver.py").read_text(),
    "get.py": GET})


def get(cluster, n, headers=None):
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", "get.py", str(n), json.dumps(headers or {}),
                        timeout=120)
    return json.loads(p.stdout)


def spans(cluster):
    p = cluster.ambient("logs", "-n", "observability", "otel-collector", "--tail", "100000")
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]


def wait_spans(cluster, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    got = spans(cluster)
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.3)
        got = spans(cluster)
    return got


@pytest.mark.root
def test_spans_arrive_with_the_parent_chain_across_two_waypoints(cluster):
    # Off by default: nothing reaches the collector.
    assert get(cluster, 3) == {"200": 3}
    cluster.apply(MESH_CONFIG + "---\n" + telemetry(0), "tracing-0.yaml")
    assert get(cluster, 20) == {"200": 20}
    time.sleep(2.5)                                     # two flush intervals: still nothing exported
    assert spans(cluster) == []
    # A sampled caller is honoured at 0 %: one trace, four hops, each span the child of the one before.
    tp = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    assert get(cluster, 1, {"traceparent": tp}) == {"200": 1}
    got = wait_spans(cluster, 2)
    assert len(got) == 2, got
    by_wp = {s["attributes"]["istio.canonical_service"]: s for s in got}
    wa, wb = by_wp["wp-a"], by_wp["wp-b"]
    assert wa["trace_id"] == wb["trace_id"] == CALLER_TRACE
    assert wa["parent_span_id"] == CALLER_SPAN          # the client's span
    assert wb["parent_span_id"] == wa["span_id"]        # app a forwarded wp-a's span id, as apps must
    for s, svc in ((wa, "svc-a"), (wb, "svc-b")):
        assert s["kind"] == "SERVER" and s["name"] == f"{svc}.shop.svc.cluster.local:80/*"
        assert s["attributes"]["http.status_code"] == "200" and s["attributes"]["response_flags"] == "-"
        assert s["attributes"]["upstream_cluster"] == f"outbound|80||{svc}.shop.svc.cluster.local"
        assert s["resource"]["service.name"] == f"{s['attributes']['istio.canonical_service']}.shop"
    # wp-b's span lies inside wp-a's (a waits for b before answering).
    assert wa["start_ns"] <= wb["start_ns"] and wb["end_ns"] <= wa["end_ns"]
    # 100 %: every request is a trace of its own with both hops (no caller context: wp-a's span is the root).
    cluster.apply(telemetry(100), "tracing-100.yaml")
    assert get(cluster, 10) == {"200": 10}
    got = wait_spans(cluster, 22)[2:]
    assert len(got) == 20, got
    traces: dict[str, dict[str, dict]] = {}
    for s in got:
        traces.setdefault(s["trace_id"], {})[s["attributes"]["istio.canonical_service"]] = s
    assert len(traces) == 10
    for t in traces.values():
        assert set(t) == {"wp-a", "wp-b"}
        assert t["wp-a"]["parent_span_id"] == "" and t["wp-b"]["parent_span_id"] == t["wp-a"]["span_id"]

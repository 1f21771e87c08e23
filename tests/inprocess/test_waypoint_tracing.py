"""Tracing through the real waypoint on loopback: spans decoded by a real OTLP/HTTP receiver, headers seen by the app, CONNECT's traceparent."""
from __future__ import annotations

import asyncio
import socket
import time

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess.waypoint_harness import WaypointMesh
from tests.otlp_receiver import Receiver

VIP = "10.96.0.10"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def mesh_config(receiver_ip: str, port: int, timeout: str = "2s") -> str:
    return f"""
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: istio, namespace: istio-system}}
        data:
          mesh: |
            extensionProviders:
            - name: otel
              opentelemetry:
                service: {receiver_ip}
                port: {port}
                http: {{path: /v1/traces, timeout: {timeout}}}
        """


def telemetry(percentage: float, *, name: str = "mesh-default", extra: str = "") -> str:
    return f"""
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {{name: {name}, namespace: istio-system}}
        spec:
          tracing:
          - providers: [{{name: otel}}]
            randomSamplingPercentage: {percentage}
            {extra}
        """


def run(coro, timeout: float = 60):
    async def main():
        mesh = WaypointMesh()
        await mesh.start()
        receiver = Receiver(mesh.ip())
        try:
            return await asyncio.wait_for(coro(mesh, receiver), timeout)
        finally:
            receiver.close()
            await mesh.close()
    return uvloop.run(main())


async def spans_for(mesh, receiver, n: int, timeout: float = 10.0) -> list[dict]:
    """Flush the waypoint's exporter (off the loop) until the receiver holds `n` spans."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.to_thread(mesh.inbound.pipeline.tracing.flush)
        got = receiver.snapshot()
        if len(got) >= n:
            return got
        await asyncio.sleep(0.05)
    return receiver.snapshot()


async def reviews(mesh):
    pod = await mesh.pod("reviews-v1", labels={"app": "reviews", "version": "v1"})
    mesh.service("reviews", VIP, [pod])
    return pod


def seen_headers(pod) -> list[dict[str, str]]:
    return [dict(hs) for _, _, hs, _ in pod.backend.seen]


def test_off_by_default_trace_headers_pass_untouched():
    async def go(mesh, receiver):
        pod = await reviews(mesh)
        c = await mesh.client(f"{VIP}:80")
        tp = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        r = await c.request("GET", "/", {"traceparent": tp, "x-b3-traceid": "a" * 16, "x-b3-spanid": "b" * 16})
        assert r.status == 200
        h = seen_headers(pod)[0]
        assert h["traceparent"] == tp and h["x-b3-traceid"] == "a" * 16 and h["x-b3-spanid"] == "b" * 16
        assert "traceparent" not in pod.connect_headers[0]
        # A provider in the mesh config alone (no Telemetry, no defaultProviders) traces nothing either.
        ip, port = receiver.address
        mesh.apply(mesh_config(ip, port))
        await c.request("GET", "/")
        assert "traceparent" not in seen_headers(pod)[1]
        assert receiver.snapshot() == [] and mesh.inbound.pipeline.tracing.policy is None
        c.close()
    run(go)


def test_child_span_of_the_callers_context_exported_and_forwarded():
    async def go(mesh, receiver):
        pod = await reviews(mesh)
        ip, port = receiver.address
        mesh.apply(mesh_config(ip, port) + "---" + telemetry(0, extra="customTags: {team: {literal: {value: shop}}}"))
        c = await mesh.client(f"{VIP}:80")
        # A sampled caller: honoured even at 0 % (the percentage only decides for new traces).
        r = await c.request("GET", "/reviews/1?x=1", {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                                                      "tracestate": "vendor=abc", "user-agent": "t/1"})
        assert r.status == 200
        h = seen_headers(pod)[0]
        ver, trace, span, flags = h["traceparent"].split("-")
        assert (ver, trace, flags) == ("00", CALLER_TRACE, "01") and span != CALLER_SPAN
        assert h["tracestate"] == "vendor=abc"
        # The upstream CONNECT carried the same span context (the span caused that connection).
        assert pod.connect_headers[0]["traceparent"] == h["traceparent"]
        [s] = await spans_for(mesh, receiver, 1)
        assert (s["trace_id"], s["span_id"], s["parent_span_id"]) == (CALLER_TRACE, span, CALLER_SPAN)
        assert s["kind"] == "SERVER" and s["name"] == "reviews.shop.svc.cluster.local:80/*"
        assert s["trace_state"] == "vendor=abc"
        a = s["attributes"]
        assert a["http.method"] == "GET" and a["http.status_code"] == "200" and a["response_flags"] == "-"
        assert a["http.url"] == "http://svc/reviews/1?x=1" and a["user_agent"] == "t/1"
        assert a["upstream_cluster"] == "outbound|80||reviews.shop.svc.cluster.local"
        assert a["istio.canonical_service"] == "waypoint" and a["istio.namespace"] == "shop"
        assert a["node_id"].startswith("waypoint~") and a["team"] == "shop"
        assert a["guid:x-request-id"] == h["x-request-id"]
        assert s["resource"]["service.name"] == "waypoint.shop"
        assert s["end_ns"] > s["start_ns"] > 0
        dump = mesh.inbound.pipeline.tracing.snapshot()
        assert dump["provider"] == "otel" and dump["sampling_percentage"] == 0.0
        assert dump["exporting_to"] == f"http://{ip}:{port}/v1/traces" and dump["spans"]["exported"] == 1
        c.close()
    run(go)


def test_sampling_percentage_zero_none_hundred_all():
    async def go(mesh, receiver):
        pod = await reviews(mesh)
        ip, port = receiver.address
        cfg = mesh.apply(mesh_config(ip, port))
        tel = mesh.apply(telemetry(0))
        c = await mesh.client(f"{VIP}:80")
        for _ in range(20):
            assert (await c.request("GET", "/")).status == 200
        # Not sampled: a new trace per request, propagated with flags 00, nothing exported.
        tps = [h["traceparent"] for h in seen_headers(pod)]
        assert len({t.split("-")[1] for t in tps}) == 20 and all(t.endswith("-00") for t in tps)
        assert await spans_for(mesh, receiver, 1, timeout=1.5) == []
        mesh.remove(tel)
        mesh.apply(telemetry(100))
        for _ in range(20):
            assert (await c.request("GET", "/")).status == 200
        got = await spans_for(mesh, receiver, 20)
        assert len(got) == 20 and all(s["parent_span_id"] == "" for s in got)   # roots: no caller context
        tps = [h["traceparent"] for h in seen_headers(pod)[20:]]
        assert {(s["trace_id"], s["span_id"]) for s in got} == {tuple(t.split("-")[1:3]) for t in tps}
        # A caller that decided not to sample is honoured at 100 %.
        await c.request("GET", "/", {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
        assert seen_headers(pod)[-1]["traceparent"].split("-")[1::2] == [CALLER_TRACE, "00"]
        assert len(await spans_for(mesh, receiver, 21, timeout=1.5)) == 20
        metrics = (mesh.inbound.pipeline.tracing.exposition())
        counts = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
        assert counts["started"] == 20 and counts["not_sampled"] == 21 and counts["exported"] == 20
        assert cfg
        c.close()
    run(go)


def test_b3_multi_and_single_are_honoured_and_rewritten():
    async def go(mesh, receiver):
        pod = await reviews(mesh)
        ip, port = receiver.address
        mesh.apply(mesh_config(ip, port) + "---" + telemetry(0))
        c = await mesh.client(f"{VIP}:80")
        await c.request("GET", "/", {"x-b3-traceid": "1" * 16, "x-b3-spanid": "2" * 16, "x-b3-sampled": "1"})
        await c.request("GET", "/", {"b3": f"{'3' * 32}-{'4' * 16}-1"})
        h1, h2 = seen_headers(pod)
        assert h1["x-b3-traceid"] == "0" * 16 + "1" * 16 and h1["x-b3-parentspanid"] == "2" * 16
        assert h1["x-b3-sampled"] == "1" and h1["traceparent"].split("-")[2] == h1["x-b3-spanid"]
        trace, span, flag, parent = h2["b3"].split("-")
        assert (trace, flag, parent) == ("3" * 32, "1", "4" * 16) and h2["traceparent"].split("-")[2] == span
        got = sorted(await spans_for(mesh, receiver, 2), key=lambda s: s["trace_id"])
        assert [(s["trace_id"], s["parent_span_id"]) for s in got] == [("0" * 16 + "1" * 16, "2" * 16),
                                                                         ("3" * 32, "4" * 16)]
        c.close()
    run(go)


def test_a_collector_that_hangs_does_not_hold_requests_and_drops_are_counted():
    async def go(mesh, receiver):
        pod = await reviews(mesh)
        # A collector that accepts connections (the kernel's backlog) and never answers: each
        # export waits for its whole timeout (30 s) on the exporter's thread.
        hung = socket.socket()
        hung.bind((mesh.ip(), 0))
        hung.listen(64)
        try:
            mesh.apply(mesh_config(*hung.getsockname(), timeout="30s") + "---" + telemetry(100))
            tracing = mesh.inbound.pipeline.tracing
            tracing.queue_size = 4
            c = await mesh.client(f"{VIP}:80")
            for _ in range(50):
                assert (await c.request("GET", "/")).status == 200
            s = tracing.stats
            # All fifty were answered while the first export was still waiting: the request
            # path never waits for the collector; the queue (4) overflowed and said so.
            assert pod.backend.requests == 50 and s.started == 50
            assert s.exported == 0 and s.export_failed == 0 and s.dropped >= 40, s
            text = tracing.exposition()
            assert f'ambient_waypoint_trace_spans_total{{outcome="dropped"}} {s.dropped}' in text
            c.close()
        finally:
            hung.close()
    run(go)


def test_concurrent_http2_streams_each_get_their_own_child_span():
    from tests.inprocess.h2_support import h2_client

    async def go(mesh, receiver):
        pod = await reviews(mesh)
        pod.backend.delay = 0.2                  # the streams overlap in the waypoint
        ip, port = receiver.address
        mesh.apply(mesh_config(ip, port) + "---" + telemetry(0))
        c = await h2_client(mesh, f"{VIP}:80")
        callers = [f"{i + 1:016x}" for i in range(8)]
        rs = await asyncio.gather(*(c.request("GET", f"/s/{i}", [("traceparent", f"00-{CALLER_TRACE}-{s}-01")],
                                              authority="reviews") for i, s in enumerate(callers)))
        assert [r.status for r in rs] == [200] * 8
        got = await spans_for(mesh, receiver, 8)
        # Each stream's span is the child of its own caller and forwarded only on its own request.
        by_path = {s["attributes"]["http.url"].rsplit("/", 1)[1]: s for s in got}
        sent = {r.json()["path"].rsplit("/", 1)[1]: dict(r.json()["headers"])["traceparent"] for r in rs}
        for i, caller in enumerate(callers):
            s = by_path[str(i)]
            assert s["parent_span_id"] == caller and sent[str(i)].split("-")[2] == s["span_id"]
        assert len({s["span_id"] for s in got}) == 8
    run(go)

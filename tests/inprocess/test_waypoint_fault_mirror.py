"""Fault injection and mirroring through the waypoint's real handler, on loopback with real mTLS and HBONE."""
from __future__ import annotations

import asyncio
import logging
import math
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess.test_waypoint_l7 import run
from tests.inprocess.waypoint_harness import WaypointMesh

VIP, SHADOW_VIP = "10.96.0.20", "10.96.0.21"


def vs(http: str) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n"
            "spec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n" + http)


async def web(mesh: WaypointMesh, *, shadow: bool = True, shadow_backend: bool = True):
    a = await mesh.pod("web-1", labels={"app": "web"})
    mesh.service("web", VIP, [a])
    s = None
    if shadow:
        s = await mesh.pod("shadow-1", labels={"app": "shadow"}, backend=shadow_backend)
        mesh.service("shadow", SHADOW_VIP, [s])
    return a, s


def flags_counts(mesh) -> dict[tuple[str, str], float]:
    fams = {f.name: f for f in text_string_to_metric_families(mesh.metrics.exposition().decode())}
    out: dict[tuple[str, str], float] = {}
    for s in fams["istio_requests"].samples:      # summed: gRPC requests are series of their own
        if s.name == "istio_requests_total":
            k = (s.labels["response_code"], s.labels["response_flags"])
            out[k] = out.get(k, 0) + s.value
    return out


async def until(pred, timeout=10.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.01)


def within_binomial(hits: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


def test_abort_is_a_local_reply_before_any_upstream_contact(caplog):
    async def go(mesh):
        a, _ = await web(mesh, shadow=False)
        mesh.apply(vs("    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n"))
        c = await mesh.client(f"{VIP}:80")
        with caplog.at_level(logging.INFO, logger="ambient.access"):
            for _ in range(3):   # keep-alive survives the local reply, also with a request body
                r = await c.request("POST", "/x", body=b"hello")
                assert (r.status, r.body, r.header("content-type")) == (503, b"fault filter abort", "text/plain")
        assert a.connects == 0 and a.backend.requests == 0
        assert flags_counts(mesh) == {("503", "FI"): 3}
        lines = [x.getMessage() for x in caplog.records if x.name == "ambient.access"]
        assert len(lines) == 3 and all(" 503 FI fault_filter_abort " in ln for ln in lines), lines
        c.close()
    run(go)


def test_delay_holds_the_request_then_routes_it():
    async def go(mesh):
        a, _ = await web(mesh, shadow=False)
        mesh.apply(vs("    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n"))
        c = await mesh.client(f"{VIP}:80")
        t0 = time.monotonic()
        r = await c.request("GET", "/d")
        took = time.monotonic() - t0
        assert r.status == 200 and r.json()["name"] == "web-1"
        assert took >= 0.3, took
        assert flags_counts(mesh) == {("200", "DI"): 1}
        c.close()
    run(go)


def test_delay_then_abort_flags_di_fi_and_grpc_abort():
    async def go(mesh):
        await web(mesh, shadow=False)
        mesh.apply(vs("    fault:\n      delay: {fixedDelay: 50ms, percentage: {value: 100}}\n"
                      "      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}\n"))
        c = await mesh.client(f"{VIP}:80")
        r = await c.request("POST", "/pkg.Svc/Call", {"content-type": "application/grpc"}, body=b"\0\0\0\0\0")
        assert (r.status, r.header("grpc-status"), r.header("grpc-message"), r.header("content-type"), r.body) == (
            200, "14", "fault filter abort", "application/grpc", b"")
        r = await c.request("GET", "/plain")            # not a gRPC request: 200 with the text body
        assert (r.status, r.body, r.header("grpc-status")) == (200, b"fault filter abort", None)
        assert flags_counts(mesh) == {("200", "DI,FI"): 2}
        c.close()
    run(go)


def test_abort_at_fifty_percent_over_many_requests():
    async def go(mesh):
        a, _ = await web(mesh, shadow=False)
        mesh.apply(vs("    fault: {abort: {httpStatus: 500, percentage: {value: 50}}}\n"))
        c = await mesh.client(f"{VIP}:80")
        n = 600
        for _ in range(n):
            c.send("GET", "/")
        statuses = [(await c.response()).status for _ in range(n)]
        aborted = statuses.count(500)
        assert aborted + statuses.count(200) == n
        assert within_binomial(aborted, n, 0.5), aborted
        assert a.backend.requests == n - aborted
        c.close()
    run(go)


def test_mirror_gets_the_primarys_request_and_its_answer_is_discarded():
    async def go(mesh):
        a, s = await web(mesh)
        mesh.apply(vs("    headers: {request: {set: {x-route: r1}}}\n    mirror: {host: shadow}\n"))
        c = await mesh.client(f"{VIP}:80")
        body = b"b" * 100_000
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        r = await c.request("POST", "/m?x=1", {"x-request-id": "rid-7", "traceparent": tp}, body=body,
                            host="web.shop:80")
        assert r.status == 200 and r.json()["name"] == "web-1" and r.json()["body_bytes"] == len(body)
        await until(lambda: s.backend.seen)
        method, target, hs, got = s.backend.seen[0]
        h = dict(hs)
        assert (method, target, got) == ("POST", "/m?x=1", len(body))
        # The Host as current Istio (>= 1.28) sends it: unchanged, no "-shadow" suffix.
        assert (h["host"], h["x-request-id"], h["x-route"]) == ("web.shop:80", "rid-7", "r1")
        # The copy keeps the trace context, marked not sampled (Istio's mirror policy trace_sampled: false).
        assert h["traceparent"] == tp[:-2] + "00" and dict(a.backend.seen[0][2])["traceparent"] == tp
        await until(lambda: mesh.metrics.mirrors.get("completed") == 1)
        assert a.backend.requests == 1 and flags_counts(mesh) == {("200", "-"): 1}
        c.close()
    run(go)


def test_dead_mirror_and_missing_mirror_never_touch_the_primary():
    async def go(mesh):
        a, s = await web(mesh, shadow_backend=False)      # the shadow pod has no ztunnel/app: refused
        mesh.apply(vs("    mirrors:\n    - {destination: {host: shadow}}\n"
                      "    - {destination: {host: nowhere}}\n"))
        c = await mesh.client(f"{VIP}:80")
        for i in range(20):
            r = await c.request("GET", f"/{i}")
            assert r.status == 200 and r.json()["name"] == "web-1"
        await until(lambda: mesh.metrics.mirrors.get("connect_failure", 0) == 20)
        assert mesh.metrics.mirrors.get("no_cluster") == 20
        assert flags_counts(mesh) == {("200", "-"): 20}
        c.close()
    run(go)


def test_slow_mirror_is_bounded_in_flight_and_does_not_slow_the_primary_or_other_mirrors():
    async def go(mesh):
        a, s = await web(mesh)
        # The slow mirror answers only after the test is over (and its copies never time out),
        # so its four slots stay held however slowly a loaded machine runs the rest.
        s.backend.delay = 60.0
        fast = await mesh.pod("fast-1", labels={"app": "fast"})
        mesh.service("fast", "10.96.0.22", [fast])
        mesh.inbound.pipeline.mirrors.max_in_flight = 4
        mesh.inbound.pipeline.mirrors.timeout = 120.0
        mesh.apply(vs("    mirrors: [{destination: {host: shadow}}, {destination: {host: fast}}]\n"))
        c = await mesh.client(f"{VIP}:80")
        t0 = time.monotonic()
        for i in range(10):
            assert (await c.request("GET", f"/{i}")).status == 200
            # The fast mirror's copy is done before the next request: its own four slots are never
            # all busy (its first copies open a new tunnel and can lag sequential primaries).
            await until(lambda: mesh.metrics.mirrors.get("completed") == i + 1)
        took = time.monotonic() - t0
        assert took < 20, took                    # ten primaries, none waited for a 60 s mirror
        assert mesh.inbound.pipeline.mirrors.in_flight == 4                 # the slow one holds its 4 slots
        assert mesh.metrics.mirrors == {"overflow": 6, "completed": 10}
        assert len(fast.backend.seen) == 10 and len(s.backend.seen) == 4
        c.close()
    run(go)


def test_slow_mirror_copy_times_out():
    async def go(mesh):
        a, s = await web(mesh)
        s.backend.delay = 5.0
        mesh.inbound.pipeline.mirrors.timeout = 0.2
        mesh.apply(vs("    mirror: {host: shadow}\n"))
        c = await mesh.client(f"{VIP}:80")
        assert (await c.request("GET", "/t")).status == 200
        await until(lambda: mesh.metrics.mirrors.get("timeout") == 1)
        assert mesh.inbound.pipeline.mirrors.in_flight == 0 and mesh.inbound.pipeline.mirrors.buffered == 0
        c.close()
    run(go)


def test_mirror_body_past_the_bound_is_not_mirrored():
    async def go(mesh):
        a, s = await web(mesh)
        mesh.inbound.pipeline.mirrors.max_body = 64 * 1024
        mesh.apply(vs("    mirror: {host: shadow}\n"))
        c = await mesh.client(f"{VIP}:80")
        r = await c.request("POST", "/big", body=b"z" * 200_000)
        assert r.status == 200 and r.json()["body_bytes"] == 200_000
        r = await c.request("POST", "/small", body=b"z" * 1000)
        assert r.status == 200
        await until(lambda: mesh.metrics.mirrors.get("completed") == 1)
        assert mesh.metrics.mirrors == {"completed": 1, "body_too_large": 1}
        assert [t for _, t, _, _ in s.backend.seen] == ["/small"]
        c.close()
    run(go)


def test_http_route_request_mirror_share():
    async def go(mesh):
        a, s = await web(mesh)
        mesh.apply("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1, denominator: 2}}
    backendRefs: [{name: web, port: 80}]
""")
        c = await mesh.client(f"{VIP}:80")
        n = 400
        for _ in range(n):
            c.send("GET", "/")
        for _ in range(n):
            assert (await c.response()).status == 200
        await until(lambda: not mesh.inbound.pipeline.mirrors.in_flight)
        got = mesh.metrics.mirrors.get("completed", 0)
        assert got == len(s.backend.seen) and within_binomial(got, n, 0.5), got
        c.close()
    run(go)


def test_client_gone_during_the_delay_is_di_dc_and_nothing_is_sent():
    async def go(mesh):
        a, _ = await web(mesh, shadow=False)
        mesh.apply(vs("    fault:\n      delay: {fixedDelay: 300ms, percentage: {value: 100}}\n"
                      "      abort: {httpStatus: 503, percentage: {value: 100}}\n"))
        c = await mesh.client(f"{VIP}:80")
        c.send("GET", "/gone")
        await asyncio.sleep(0.05)
        c.stream.abort("client went away")
        await until(lambda: flags_counts(mesh))
        assert flags_counts(mesh) == {("0", "DI,DC"): 1}          # the abort drawn never happened
        assert a.connects == 0
    run(go)

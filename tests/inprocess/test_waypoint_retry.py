"""Retries, retry budgets and timeouts through the waypoint's real handler, HBONE on loopback, scripted backends."""
from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from mesh.model import RetryBudgetSpec

from tests.inprocess.test_waypoint_l7 import VIP, run

BIG = 64 * 1024 + 1


def vs(retries: str = "", timeout: str = "", host: str = "web") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}, namespace: shop}}
spec:
  hosts: [{host}]
  http:
  - route: [{{destination: {{host: {host}}}}}]
{f"    retries: {retries}" if retries else ""}
{f"    timeout: {timeout}" if timeout else ""}
"""


def flags(mesh) -> dict[str, int]:
    fam = next(f for f in text_string_to_metric_families(mesh.metrics.exposition().decode())
               if f.name == "istio_requests")
    out: dict[str, int] = {}
    for s in fam.samples:
        k = f'{s.labels["response_code"]} {s.labels["response_flags"]}'
        out[k] = out.get(k, 0) + int(s.value)
    return out


def budget_denials(mesh) -> float:
    fam = next(f for f in text_string_to_metric_families(mesh.metrics.exposition().decode())
               if f.name == "ambient_waypoint_retry_budget_exhausted")
    return sum(s.value for s in fam.samples)


OFF = RetryBudgetSpec(enabled=False)
"""Tests not about the retry budget turn it off, so its floor (10 retries a second) cannot
decide them on a fast loopback; the budget tests use the default (None) or their own."""


async def web(mesh, n: int = 1, retry_budget=OFF):
    pods = [await mesh.pod(f"web-{i}", labels={"app": "web"}) for i in range(n)]
    mesh.service("web", VIP, pods, retry_budget=retry_budget)
    return pods


def test_one_in_three_503_succeeds_with_attempts_2_and_counts_attempts():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 2, retryOn: 5xx}"))
        c = await mesh.client(f"{VIP}:80")
        for i in range(30):
            if i % 3 == 0:
                p.backend.script.append("503")
            r = await c.request("GET", f"/{i}")
            assert r.status == 200, (i, r.status, r.body)
        # every third request needed a second attempt, which said so
        assert p.backend.requests == 40
        assert p.backend.attempt_counts.count("2") == 10 and p.backend.attempt_counts.count("1") == 30
        assert flags(mesh) == {"200 -": 30}
        c.close()
    run(go)


def test_default_policy_does_not_retry_503_and_vs_attempts_exhausted_is_urx():
    async def go(mesh):
        (p,) = await web(mesh)
        p.backend.always = "503"
        c = await mesh.client(f"{VIP}:80")
        r = await c.request("GET", "/")
        assert r.status == 503 and r.body == b"failed" and p.backend.requests == 1   # Istio's default: no 503
        mesh.apply(vs("{attempts: 2, retryOn: 5xx}"))
        r = await c.request("GET", "/")
        assert r.status == 503 and r.body == b"failed" and p.backend.requests == 4   # 1 + 1 + 2 retries
        assert flags(mesh) == {"503 -": 1, "503 URX": 1}
        c.close()
    run(go)


def test_retry_goes_to_another_endpoint():
    async def go(mesh):
        bad, good = await web(mesh, 2)
        bad.backend.always = "503"
        mesh.apply(vs("{attempts: 1, retryOn: 5xx}"))
        c = await mesh.client(f"{VIP}:80")
        for _ in range(40):
            r = await c.request("GET", "/")
            assert r.status == 200          # a retry never lands on the endpoint that just failed
        assert bad.backend.requests > 5 and good.backend.requests == 40
        assert "2" in good.backend.attempt_counts
        c.close()
    run(go)


def test_reset_is_retried_under_reset_and_not_by_default():
    async def go(mesh):
        (p,) = await web(mesh)
        c = await mesh.client(f"{VIP}:80")
        p.backend.script.append("reset")
        r = await c.request("GET", "/")
        assert r.status == 503 and r.body == (b"upstream connect error or disconnect/reset before headers. "
                                              b"reset reason: connection termination")
        mesh.apply(vs("{attempts: 2, retryOn: reset}"))
        p.backend.script.append("reset")
        r = await c.request("GET", "/")
        assert r.status == 200 and r.json()["headers"].count(["x-envoy-attempt-count", "2"]) == 1
        assert flags(mesh) == {"503 UC": 1, "200 -": 1}
        c.close()
    run(go)


def test_post_body_replayed_within_bound_and_not_past_it():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 2, retryOn: 5xx}"))
        c = await mesh.client(f"{VIP}:80")
        small = b"s" * (64 * 1024)
        p.backend.script.append("503")
        r = await c.request("POST", "/pay", body=small)
        assert r.status == 200 and r.json()["body_bytes"] == len(small)
        assert p.backend.bodies == [len(small), len(small)]     # the whole body, twice
        p.backend.script.append("503")
        r = await c.request("POST", "/pay", body=b"b" * BIG)
        assert r.status == 503 and r.body == b"failed"           # past the bound: not replayed
        assert p.backend.bodies[2:] == [BIG]
        c.close()
    run(go)


def test_connect_failure_retried_to_a_live_endpoint_by_default():
    async def go(mesh):
        gone = await mesh.pod("web-gone", labels={"app": "web"}, backend=False)
        live = await mesh.pod("web-live", labels={"app": "web"})
        mesh.service("web", VIP, [gone, live], retry_budget=OFF)
        c = await mesh.client(f"{VIP}:80")
        for _ in range(20):
            assert (await c.request("GET", "/")).status == 200
        assert live.backend.requests == 20
        c.close()
    run(go)


def _within(elapsed: float, want: float) -> bool:
    return want * 0.9 <= elapsed <= want * 1.1 + 0.05


def test_route_timeout_is_504_ut_on_time():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs(timeout="500ms"))
        c = await mesh.client(f"{VIP}:80")
        p.backend.script.append("delay:3")
        t0 = time.monotonic()
        r = await c.request("GET", "/")
        elapsed = time.monotonic() - t0
        assert r.status == 504 and r.body == b"upstream request timeout", r.body
        assert _within(elapsed, 0.5), elapsed
        assert flags(mesh) == {"504 UT": 1}
        c.close()
    run(go)


def test_per_try_timeout_retried_then_504_ut_urx():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 1, perTryTimeout: 300ms, retryOn: 5xx}"))
        c = await mesh.client(f"{VIP}:80")
        p.backend.script.append("delay:3")
        t0 = time.monotonic()
        r = await c.request("GET", "/")           # the first try times out, the retry answers
        assert r.status == 200 and 0.27 <= time.monotonic() - t0 < 1.0
        p.backend.script += ["delay:3", "delay:3"]
        t0 = time.monotonic()
        r = await c.request("GET", "/")
        elapsed = time.monotonic() - t0
        assert r.status == 504 and r.body == b"upstream request timeout"
        # two tries of 300 ms plus one backoff of at most 25 ms
        assert 0.6 * 0.9 <= elapsed <= (0.6 + 0.025) * 1.1 + 0.05, elapsed
        assert flags(mesh) == {"200 -": 1, "504 UT,URX": 1}
        c.close()
    run(go)


def test_route_timeout_covers_retries():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 5, perTryTimeout: 200ms, retryOn: 5xx}", timeout="500ms"))
        p.backend.always = "delay:3"
        c = await mesh.client(f"{VIP}:80")
        t0 = time.monotonic()
        r = await c.request("GET", "/")
        elapsed = time.monotonic() - t0
        assert r.status == 504 and _within(elapsed, 0.5), elapsed
        assert p.backend.requests <= 3
        c.close()
    run(go)


def test_budget_holds_a_failing_backend_to_1_2x_and_off_does_not():
    async def go(mesh):
        (p,) = await web(mesh, retry_budget=None)                      # the default budget
        p.backend.always = "503"
        mesh.apply(vs("{attempts: 2, retryOn: 5xx}"))
        n = 1000

        async def send(k):
            c = await mesh.client(f"{VIP}:80")
            for _ in range(k):
                assert (await c.request("GET", "/")).status == 503
            c.close()
        await asyncio.gather(*(send(n // 4) for _ in range(4)))
        assert p.backend.requests <= 1.2 * n, p.backend.requests
        assert p.backend.requests >= 1.1 * n          # the budget's 20 % were used
        assert budget_denials(mesh) >= n - 0.2 * n - 5
        assert flags(mesh) == {"503 URX": n}
    run(go, timeout=120)


def test_budget_annotation_off_lets_attempts_multiply():
    async def go(mesh):
        (p,) = await web(mesh, retry_budget=OFF)                      # retry.ambient.dev/budget: "off"
        p.backend.always = "503"
        mesh.apply(vs("{attempts: 2, retryOn: 5xx}"))
        c = await mesh.client(f"{VIP}:80")
        for _ in range(200):
            assert (await c.request("GET", "/")).status == 503
        assert p.backend.requests == 600 and budget_denials(mesh) == 0
        c.close()
    run(go, timeout=120)


def test_the_same_request_again_after_a_failure_counts_against_the_budget_and_is_refused_without_room():
    """A retry further up the chain arrives as a new request with the same x-request-id."""
    async def go(mesh):
        # floor: 5 retries per 60 s bucket (window 10 min), so the ten requests share one bucket
        (p,) = await web(mesh, retry_budget=RetryBudgetSpec(min_retries_per_second=5 / 60 + 1e-9, window=600.0))
        p.backend.always = "500"                                        # failed, not retried at this hop
        c = await mesh.client(f"{VIP}:80")
        got = [(await c.request("GET", "/item", {"x-request-id": "same"})) for _ in range(10)]
        assert [r.status for r in got] == [500] * 6 + [503] * 4         # the original and 5 repeats
        assert got[-1].body == b"retry budget exhausted" and p.backend.requests == 6
        assert (await c.request("GET", "/other", {"x-request-id": "same"})).status == 500   # another path
        assert flags(mesh) == {"500 -": 7, "503 URX": 4} and budget_denials(mesh) == 4
        c.close()
    run(go)


def test_the_same_request_again_after_it_succeeded_is_a_new_request():
    """No proxy retries a success: a client reusing its x-request-id for fresh calls is not
    refused as a retry (the key is forgotten once the response went down whole), while a
    repeat of the one that failed still counts."""
    async def go(mesh):
        (p,) = await web(mesh, retry_budget=RetryBudgetSpec(min_retries_per_second=5 / 60 + 1e-9, window=600.0))
        c = await mesh.client(f"{VIP}:80")
        got = [(await c.request("GET", "/item", {"x-request-id": "same"})).status for _ in range(10)]
        assert got == [200] * 10 and p.backend.requests == 10 and budget_denials(mesh) == 0
        p.backend.script += ["500"] * 6                                 # now it fails: its key stays
        got = [(await c.request("GET", "/item", {"x-request-id": "same"})).status for _ in range(7)]
        assert got == [500] * 6 + [503]                                 # 5 repeats fit the floor, the 6th not
        assert p.backend.requests == 16 and budget_denials(mesh) == 1
        c.close()
    run(go)


def route(rule: str) -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
  - backendRefs: [{{name: web, port: 80}}]
{rule}
"""


def test_httproute_retry_attempts_count_retries_and_codes_select():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(route("    retry: {attempts: 1, codes: [503], backoff: 10ms}"))
        c = await mesh.client(f"{VIP}:80")
        p.backend.script += ["503"]
        assert (await c.request("GET", "/")).status == 200                  # one retry
        p.backend.script += ["503", "503"]
        r = await c.request("GET", "/")
        assert r.status == 503 and p.backend.requests == 4                  # attempts: 1 = two tries at most
        p.backend.script += ["500"]
        assert (await c.request("GET", "/")).status == 500 and p.backend.requests == 5   # 500 not in codes
        p.backend.script += ["reset"]
        assert (await c.request("GET", "/")).status == 200                  # connection errors always retried
        assert flags(mesh) == {"200 -": 2, "503 URX": 1, "500 -": 1}
        c.close()
    run(go)


def test_httproute_timeouts_request_and_backend_request():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(route("    timeouts: {request: 600ms, backendRequest: 200ms}"))
        c = await mesh.client(f"{VIP}:80")
        p.backend.script += ["delay:3"]
        t0 = time.monotonic()
        r = await c.request("GET", "/")
        elapsed = time.monotonic() - t0
        assert r.status == 504 and r.body == b"upstream request timeout" and _within(elapsed, 0.2), elapsed
        mesh.apply(route("    timeouts: {request: 400ms}"))
        p.backend.script += ["delay:3"]
        t0 = time.monotonic()
        r = await c.request("GET", "/")
        assert r.status == 504 and _within(time.monotonic() - t0, 0.4)
        assert flags(mesh) == {"504 UT": 2}
        c.close()
    run(go)


GRPC = {"content-type": "application/grpc", "te": "trailers"}


def test_grpc_status_retried_under_grpc_conditions_and_grpc_timeout_honoured():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 2, retryOn: unavailable}"))
        c = await mesh.client(f"{VIP}:80")
        p.backend.script += ["grpc:14"]                                   # UNAVAILABLE: retried
        r = await c.request("POST", "/pkg.Svc/Call", GRPC, body=b"\0\0\0\0\0")
        assert r.status == 200 and r.header("grpc-status") is None and p.backend.requests == 2
        p.backend.script += ["grpc:13"]                                   # INTERNAL: not under unavailable
        r = await c.request("POST", "/pkg.Svc/Call", GRPC, body=b"\0\0\0\0\0")
        assert r.header("grpc-status") == "13" and p.backend.requests == 3
        p.backend.script += ["delay:3"]                                   # no route timeout: the client's deadline
        t0 = time.monotonic()
        r = await c.request("POST", "/pkg.Svc/Call", {**GRPC, "grpc-timeout": "300m"}, body=b"\0\0\0\0\0")
        elapsed = time.monotonic() - t0
        assert (r.status, r.header("content-type"), r.header("grpc-status"), r.header("grpc-message")) == \
            (200, "application/grpc", "4", "upstream request timeout"), r.headers
        assert _within(elapsed, 0.3), elapsed
        mesh.apply(vs(timeout="200ms"))                                   # the route's timeout caps it
        p.backend.script += ["delay:3"]
        t0 = time.monotonic()
        r = await c.request("POST", "/pkg.Svc/Call", {**GRPC, "grpc-timeout": "5S"}, body=b"\0\0\0\0\0")
        assert r.header("grpc-status") == "4" and _within(time.monotonic() - t0, 0.2)
        c.close()
    run(go)


def test_destination_rule_max_retries_caps_retries_in_flight_uo():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 2, retryOn: 5xx}") + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy: {connectionPool: {http: {maxRetries: 1}}}
""")
        p.backend.script += ["503", "delay:0.5", "503"]     # a: 503, its retry held; b: 503
        a = await mesh.client(f"{VIP}:80")
        ra = asyncio.ensure_future(a.request("GET", "/a"))
        await asyncio.sleep(0.1)                 # a's retry is in flight (the backend holds it 0.5 s)
        b = await mesh.client(f"{VIP}:80")
        rb = await b.request("GET", "/b")
        assert rb.status == 503 and rb.body == b"failed"     # b's retry would be the second in flight
        assert (await ra).status == 200
        assert flags(mesh) == {"200 -": 1, "503 UO": 1}
        a.close()
        b.close()
    run(go)


def test_envoy_retry_statistics_per_cluster():
    async def go(mesh):
        (p,) = await web(mesh)
        mesh.apply(vs("{attempts: 1, retryOn: 5xx}"))
        c = await mesh.client(f"{VIP}:80")
        p.backend.script += ["503"]
        assert (await c.request("GET", "/")).status == 200                 # retried, then fine
        p.backend.script += ["503", "503"]
        assert (await c.request("GET", "/")).status == 503                 # retried, then out of attempts
        text = mesh.inbound.upstreams.exposition().decode()
        got = {f.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if f.name.startswith("envoy_cluster_upstream_rq_retry")}
        assert got == {"envoy_cluster_upstream_rq_retry": 2, "envoy_cluster_upstream_rq_retry_success": 1,
                       "envoy_cluster_upstream_rq_retry_overflow": 0, "envoy_cluster_upstream_rq_retry_limit_exceeded": 1}
        c.close()
    run(go)


"""The endpoint layer through the real waypoint handler on loopback (real mTLS/HBONE): peak-EWMA default,
outlier ejection and return, maxConnections/http1MaxPendingRequests overflow (503 UO), connectTimeout
(503 UF), maxRequestsPerConnection, consistent hashing, round robin, and endpoint updates reaching an
already open downstream connection.

Timing: the machine may be loaded (the unprivileged tier run of test_architecture runs all of this
at once), so nothing here depends on exact timing: bounds are one-sided and generous, waits poll
against deadlines, and every client connection is opened before the part that measures."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess.test_waypoint_l7 import run as run_l7

VIP = "10.96.0.20"
CLUSTER = "outbound|80||web.shop.svc.cluster.local"


def run(coro, timeout: float = 120):
    return run_l7(coro, timeout)


async def web(mesh, n: int, dr_spec: str = ""):
    pods = [await mesh.pod(f"web-{i}", labels={"app": "web"}) for i in range(n)]
    mesh.service("web", VIP, pods)
    if dr_spec:
        mesh.apply("apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
                   "metadata: {name: web, namespace: shop}\nspec:\n  host: web\n  trafficPolicy: " + dr_spec)
    return pods


def stat(mesh, name: str, cluster: str = CLUSTER) -> float:
    """A cluster stat by its exposed name (the parser adds `_total` to counters that lack it)."""
    text = mesh.inbound.upstreams.exposition().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (name, name + "_total") and s.labels.get("cluster_name") == cluster:
                return s.value
    raise AssertionError(f"{name}{{cluster_name={cluster!r}}} not exposed")


async def get(client, path: str = "/", headers=None):
    r = await client.request("GET", path, headers)
    name = r.header("x-backend")
    return r.status, name, r


def test_peak_ewma_is_the_default_and_avoids_a_ten_times_slower_endpoint():
    async def go(mesh):
        pods = await web(mesh, 3)
        pods[2].backend.always = "delay:0.1"    # loopback answers take a few ms: this one 10x+ more
        c = await mesh.client(f"{VIP}:80")
        got = Counter()
        for _ in range(150):
            status, name, _ = await get(c)
            assert status == 200
            got[name] += 1
        fast = (got["web-0"] + got["web-1"]) / 150
        print(f"peak EWMA: {dict(got)}; fast share {fast:.0%}")
        assert fast >= 0.8, got
        assert got["web-0"] and got["web-1"]    # both fast ones serve
        c.close()
    run(go)


# Round robin, so the failing endpoint gets every other request whatever the machine's load does to
# latencies (peak EWMA could shun it after one slow answer and never let it fail twice).
OUTLIER = ("{loadBalancer: {simple: ROUND_ROBIN}, "
           "outlierDetection: {consecutive5xxErrors: 2, interval: 0.2s, baseEjectionTime: 2s}}")


def test_outlier_detection_ejects_a_503_endpoint_and_brings_it_back_after_the_ejection_time():
    async def go(mesh):
        good, bad = await web(mesh, 2, OUTLIER)
        bad.backend.always = "503"
        c = await mesh.client(f"{VIP}:80")
        fails = 0
        for _ in range(10):                    # until the bad one answered 503 twice in a row
            status, name, _ = await get(c)
            if status == 503:
                assert name == "web-1"
                fails += 1
                if fails == 2:
                    break
        assert fails == 2
        ejected_at = time.monotonic()
        assert stat(mesh, "envoy_cluster_outlier_detection_ejections_active") == 1
        assert stat(mesh, "envoy_cluster_outlier_detection_ejections_enforced_total") == 1
        before = bad.backend.requests
        for _ in range(30):                    # ejected: only the good one is chosen
            status, name, _ = await get(c)
            assert (status, name) == (200, "web-0")
        assert bad.backend.requests == before
        bad.backend.always = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:     # back once its 2 s are over and a sweep ran
            status, name, _ = await get(c)
            assert status == 200
            if name == "web-1":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the ejected endpoint never came back")
        assert time.monotonic() - ejected_at >= 1.9
        assert stat(mesh, "envoy_cluster_outlier_detection_ejections_active") == 0
        c.close()
    run(go)


LIMITS = "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}"


def test_max_connections_and_pending_requests_overflow_is_503_uo_beyond_the_configured_concurrency():
    async def go(mesh):
        (pod,) = await web(mesh, 1, LIMITS)
        first = await mesh.client(f"{VIP}:80")
        assert (await get(first))[0] == 200               # one upstream connection, kept alive
        first.close()
        pod.backend.always = "delay:1.5"

        async def one():
            c = await mesh.client(f"{VIP}:80")
            try:
                return await get(c)
            finally:
                c.close()
        # 1 connection + 1 pending: two at once both succeed (one waits for the other's connection)
        two = await asyncio.gather(one(), one())
        assert [s for s, _, _ in two] == [200, 200]
        assert stat(mesh, "envoy_cluster_upstream_rq_pending_overflow") == 0
        # five at once: one in flight, one pending, the rest overflow (at least one whatever the load)
        five = await asyncio.gather(*(one() for _ in range(5)))
        statuses = Counter(s for s, _, _ in five)
        assert statuses[200] >= 2 and statuses[503] >= 1 and statuses[200] + statuses[503] == 5, statuses
        for s, _, r in five:
            if s == 503:
                assert r.body == (b"upstream connect error or disconnect/reset before headers. "
                                  b"reset reason: overflow")
                assert r.header("x-envoy-overloaded") == "true"
        assert pod.connects == 1 and pod.backend.connections == 1   # never more than maxConnections
        assert stat(mesh, "envoy_cluster_upstream_rq_pending_overflow") == statuses[503]
        assert stat(mesh, "envoy_cluster_upstream_cx_overflow") >= 2   # the queued requests
        flags = [s.labels["response_flags"] for f in text_string_to_metric_families(mesh.metrics.exposition().decode())
                 if f.name == "istio_requests" for s in f.samples
                 if s.name == "istio_requests_total" and s.labels["response_code"] == "503" for _ in range(int(s.value))]
        assert flags == ["UO"] * statuses[503]
        assert stat(mesh, "envoy_cluster_upstream_rq_active") == 0          # every count came back
        assert stat(mesh, "envoy_cluster_upstream_rq_pending_active") == 0
        assert stat(mesh, "envoy_cluster_upstream_cx_active") == 1
    run(go)


def test_connect_timeout_is_503_uf_connection_timeout():
    async def go(mesh):
        pod = await mesh.pod("web-0", labels={"app": "web"}, backend=False)
        # Its "ztunnel" takes the TCP connection (the kernel's backlog) and never answers TLS.
        silent = socket.socket()
        silent.bind((pod.ip, 15008))
        silent.listen(8)
        try:
            mesh.service("web", VIP, [pod])
            mesh.apply("apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
                       "metadata: {name: web, namespace: shop}\nspec:\n  host: web\n"
                       "  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0.3s}}}")
            c = await mesh.client(f"{VIP}:80")
            t0 = time.monotonic()
            status, _, r = await get(c)
            assert status == 503 and r.body.endswith(b"reset reason: connection timeout"), r.body
            assert time.monotonic() - t0 < 8                # not the HBONE handshake's own 10 s
            # Istio's default retry policy retries connect-failure twice (a connect timeout is one)
            assert r.body.startswith(b"upstream connect error or disconnect/reset before headers. retried and the "
                                     b"latest reset reason: connection timeout")
            assert stat(mesh, "envoy_cluster_upstream_cx_connect_timeout") == 3
            assert stat(mesh, "envoy_cluster_upstream_cx_active") == 0
            c.close()
        finally:
            silent.close()
    run(go)


def test_max_requests_per_connection_one_opens_a_connection_per_request():
    async def go(mesh):
        (pod,) = await web(mesh, 1, "{connectionPool: {http: {maxRequestsPerConnection: 1}}}")
        c = await mesh.client(f"{VIP}:80")
        for _ in range(4):
            assert (await get(c))[0] == 200
        assert pod.connects == 4 and pod.backend.connections == 4
        assert stat(mesh, "envoy_cluster_upstream_cx_max_requests") == 4
        c.close()
    run(go)


def test_consistent_hash_on_a_header_keeps_each_user_on_one_endpoint():
    async def go(mesh):
        await web(mesh, 3, "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}")
        c = await mesh.client(f"{VIP}:80")
        owner = {}
        for rnd in range(2):
            for u in range(30):
                status, name, _ = await get(c, headers={"x-user": f"user-{u}"})
                assert status == 200
                assert owner.setdefault(u, name) == name
        assert len(set(owner.values())) == 3
        c.close()
    run(go)


def test_round_robin_rotates_over_the_endpoints():
    async def go(mesh):
        await web(mesh, 3, "{loadBalancer: {simple: ROUND_ROBIN}}")
        c = await mesh.client(f"{VIP}:80")
        names = [(await get(c))[1] for _ in range(9)]
        assert names[:3] == names[3:6] == names[6:] and set(names) == {"web-0", "web-1", "web-2"}
        c.close()
    run(go)


def test_endpoint_changes_reach_a_downstream_connection_opened_before_them():
    async def go(mesh):
        a = await mesh.pod("web-a", labels={"app": "web"})
        b = await mesh.pod("web-b", labels={"app": "web"})
        svc = mesh.service("web", VIP, [a])
        c = await mesh.client(f"{VIP}:80")
        assert (await get(c))[1] == "web-a"
        mesh.objects.remove(svc)
        mesh.service("web", VIP, [b])            # a scale-down/up while the client stays connected
        for _ in range(5):
            status, name, r = await get(c)
            assert (status, name) == (200, "web-b")
            assert json.loads(r.body)["name"] == "web-b"
        # the kept-alive connection to web-a, which left, is closed by the next background pass
        deadline = time.monotonic() + 30
        while stat(mesh, "envoy_cluster_upstream_cx_active") != 1:
            assert time.monotonic() < deadline, mesh.inbound.upstreams.snapshot()
            await asyncio.sleep(0.05)
        (snap,) = mesh.inbound.upstreams.snapshot()
        assert [e["address"] for e in snap["endpoints"]] == [f"{b.ip}:8080"] and snap["idle_connections"] == 1
        c.close()
    run(go)


def test_targets_from_endpoints_outside_any_cluster_connect_without_limits():
    # Code not yet on choose() (endpoints() + pick()) still gets pooled connections.
    from waypoint.plan import Forward
    from waypoint.upstream import endpoints

    async def go(mesh):
        (pod,) = await web(mesh, 1, LIMITS)
        ups = mesh.inbound.upstreams
        svc = mesh.state.service("shop/web")
        (t,) = endpoints(mesh.state, Forward(service=svc, port=80, target_port=8080))
        assert t.cluster == ""
        a = await ups.acquire(t, mesh.wp_ip)
        b = await ups.acquire(t, mesh.wp_ip)             # maxConnections does not apply here
        for conn in (a, b):
            ups.release(conn, True)
        assert ups.idle_count() == 2 and pod.connects == 2
        c = await ups.acquire(t, mesh.wp_ip)
        assert c in (a, b) and pod.connects == 2        # reused
        ups.release(c, False)
        assert len(ups.clusters) == 0                    # nothing was registered as a cluster
    run(go)


def test_a_request_waiting_for_a_connection_is_withdrawn_when_its_client_leaves():
    async def go(mesh):
        (pod,) = await web(mesh, 1, "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 5}}}")
        first = await mesh.client(f"{VIP}:80")
        assert (await get(first))[0] == 200
        pod.backend.always = "delay:1.5"
        busy = asyncio.ensure_future(get(first))                  # holds the one connection
        deadline = time.monotonic() + 30
        while stat(mesh, "envoy_cluster_upstream_rq_active") != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        leaver = await mesh.client(f"{VIP}:80")
        leaver.send("GET", "/")
        while stat(mesh, "envoy_cluster_upstream_rq_pending_active") != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        leaver.close()                                            # gives up while queued
        while stat(mesh, "envoy_cluster_upstream_rq_pending_active") != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert stat(mesh, "envoy_cluster_upstream_rq_cancelled") == 1
        assert (await busy)[0] == 200
        assert pod.backend.requests == 2                          # the withdrawn one never went up
        fam = next(f for f in text_string_to_metric_families(mesh.metrics.exposition().decode())
                   if f.name == "istio_requests")
        assert any(s.labels["response_flags"] == "DC" and s.labels["response_code"] == "0" for s in fam.samples)
        first.close()
    run(go)


def test_http2_max_requests_bounds_requests_in_flight_across_connections():
    async def go(mesh):
        pods = await web(mesh, 2, "{connectionPool: {http: {http2MaxRequests: 1}}}")
        for p in pods:
            p.backend.always = "delay:1.5"

        async def one():
            c = await mesh.client(f"{VIP}:80")
            try:
                return await get(c)
            finally:
                c.close()
        got = await asyncio.gather(*(one() for _ in range(3)))
        statuses = sorted(s for s, _, _ in got)
        assert statuses[0] == 200 and statuses.count(503) >= 1, statuses
        for s, _, r in got:
            if s == 503:
                assert r.header("x-envoy-overloaded") == "true" and r.body.endswith(b"reset reason: overflow")
        assert stat(mesh, "envoy_cluster_upstream_rq_pending_overflow") == statuses.count(503)
    run(go)


def test_idle_timeout_closes_a_kept_alive_upstream_connection():
    async def go(mesh):
        (pod,) = await web(mesh, 1, "{connectionPool: {http: {idleTimeout: 2s}}}")
        c = await mesh.client(f"{VIP}:80")
        assert (await get(c))[0] == 200 and (await get(c))[0] == 200
        assert pod.connects == 1                                  # kept alive while in use
        deadline = time.monotonic() + 30
        while stat(mesh, "envoy_cluster_upstream_cx_idle_timeout") < 1:   # the background pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert stat(mesh, "envoy_cluster_upstream_cx_active") == 0
        assert (await get(c))[0] == 200 and pod.connects == 2
        c.close()
    run(go)

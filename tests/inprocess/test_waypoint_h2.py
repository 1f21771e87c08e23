"""HTTP/2 (prior knowledge) clients through the real waypoint handler, on loopback with real mTLS: h2 -> HTTP/1.1 and h2 -> h2."""
from __future__ import annotations

import asyncio
import logging

from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess.h2_support import h2_client
from tests.inprocess.test_waypoint_l7 import VIP, reviews, run


def test_h2_client_to_http1_backend_translates_authority_cookies_and_body():
    async def go(mesh):
        (pod,) = await reviews(mesh, ("v1",))
        c = await h2_client(mesh, f"{VIP}:80")
        r = await c.request("POST", "/r/1?q=2", [("cookie", "a=1"), ("cookie", "b=2"), ("x-u", "z")],
                            body=b"hello" * 1000, authority="reviews.shop")
        assert r.status == 200, r
        j = r.json()
        hs = dict((k, v) for k, v in j["headers"])
        assert j["path"] == "/r/1?q=2" and j["method"] == "POST" and j["body_bytes"] == 5000
        assert hs["host"] == "reviews.shop" and hs["cookie"] == "a=1; b=2" and hs["x-u"] == "z"
        assert hs["transfer-encoding"] == "chunked"            # no content-length from the client: re-framed
        assert "x-request-id" in hs
        assert r.header("x-backend") == "reviews-v1" and r.header("content-length") == str(len(r.body))
        # a GET ends with its HEADERS: no body upstream
        r = await c.request("GET", "/g", authority="reviews.shop")
        assert r.status == 200 and r.json()["body_bytes"] == 0
        assert "transfer-encoding" not in dict(r.json()["headers"])
    run(go)


def test_h2_streams_run_concurrently_on_one_connection():
    async def go(mesh):
        (pod,) = await reviews(mesh, ("v1",))
        pod.backend.delay = 0.3
        c = await h2_client(mesh, f"{VIP}:80")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rs = await asyncio.gather(*(c.request("GET", f"/c/{i}") for i in range(20)))
        took = loop.time() - t0
        assert [r.status for r in rs] == [200] * 20
        assert sorted(r.json()["path"] for r in rs) == sorted(f"/c/{i}" for i in range(20))
        assert took < 0.3 * 20 / 2, took        # sequential would be 2 x 0.3 s x 20
        assert mesh.inbound.counts["h2_connections"] == 1
    run(go)


def test_h2_route_404_and_local_replies_keep_the_connection():
    async def go(mesh):
        await reviews(mesh, ("v1",))
        mesh.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /pkg.Greeter/}}]
    route: [{destination: {host: reviews}}]
""")
        c = await h2_client(mesh, f"{VIP}:80")
        r = await c.request("GET", "/other")
        assert r.status == 404 and r.reset is None
        r = await c.request("POST", "/pkg.Greeter/SayHello", body=b"x")
        assert r.status == 200 and r.json()["path"] == "/pkg.Greeter/SayHello"
    run(go)


def test_h2_large_download_with_a_slow_reader_is_flow_controlled():
    async def go(mesh):
        (pod,) = await reviews(mesh, ("v1",))
        c = await h2_client(mesh, f"{VIP}:80")
        c.auto_ack = False
        n = 32 << 20
        sid = c.start("GET", f"/download/{n}")
        await asyncio.sleep(0.5)
        got = c.responses[sid].received
        # the client's 64 KiB windows stop the waypoint; the backend is held by the waypoint's reads
        assert got <= 65_535, got
        c.auto_ack = True
        c.ack_all()
        r = await asyncio.wait_for(c.done[sid], 60)
        assert r.status == 200 and len(r.body) == n
    run(go, timeout=90)


def test_h2_client_reset_is_a_downstream_disconnect():
    async def go(mesh):
        (pod,) = await reviews(mesh, ("v1",))
        pod.backend.delay = 1.0
        c = await h2_client(mesh, f"{VIP}:80")
        sid = c.start("GET", "/slow")
        await asyncio.sleep(0.2)
        c.reset(sid)
        r = await c.request("GET", "/after")          # the connection goes on
        assert r.status == 200
        deadline = asyncio.get_running_loop().time() + 10
        while mesh.inbound.pipeline.requests < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        text = mesh.metrics.exposition().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        flags = {s.labels["response_flags"] for s in fams["istio_requests"].samples}
        assert "DC" in flags, flags
        protos = {s.labels["request_protocol"] for s in fams["istio_requests"].samples}
        assert protos == {"http"}
    run(go)


def _service(mesh, name, vip, pods, *, port_name="", app_protocol="", port=80):
    import ipaddress

    from mesh.model import Endpoint, ServiceInfo
    from mesh.model.resources import ServicePort
    from tests.inprocess.waypoint_harness import APP_PORT
    svc = ServiceInfo(name=name, namespace="shop", vip=ipaddress.IPv4Address(vip),
                      ports=(ServicePort(port=port, target_port=APP_PORT, name=port_name,
                                         app_protocol=app_protocol),),
                      endpoints=tuple(Endpoint(workload_uid=p.workload.uid, ip=p.workload.ip) for p in pods))
    mesh.objects.append(svc)
    mesh.publish()
    return svc


def test_app_protocol_tcp_port_is_relayed_at_l4_without_parsing():
    async def go(mesh):
        pod = await mesh.pod("db-v1", labels={"app": "db"})
        _service(mesh, "db", VIP, [pod], port_name="http", app_protocol="tcp")
        c = await mesh.client(f"{VIP}:80")
        r = await c.request("GET", "/x")                 # still answered: the bytes reach the pod untouched
        assert r.status == 200
        hs = dict(r.json()["headers"])
        assert "x-request-id" not in hs                  # the waypoint did not act on the request
        assert mesh.inbound.counts["l4_streams"] == 1 and mesh.inbound.counts["l7_streams"] == 0
        assert mesh.inbound.pipeline.requests == 0
        c.close()
    run(go)


# -- HTTP/2 to the backend ------------------------------------------------------------------------

async def _grpc_service(mesh, *, port_name="grpc", app_protocol=""):
    from tests.inprocess.h2_support import h2_pod
    pod = await h2_pod(mesh, "greeter-v1", labels={"app": "greeter", "version": "v1"})
    _service(mesh, "greeter", VIP, [pod], port_name=port_name, app_protocol=app_protocol, port=50051)
    return pod


def test_h2_to_h2_backend_multiplexes_one_pooled_connection_and_keeps_trailers():
    async def go(mesh):
        pod = await _grpc_service(mesh)
        c = await h2_client(mesh, f"{VIP}:50051")
        rs = await asyncio.gather(*(c.request("POST", f"/pkg.Greeter/SayHello?{i}",
                                              [("content-type", "application/grpc")], body=b"\0\0\0\0\x01x",
                                              trailers=[("x-client-trailer", "ct")]) for i in range(10)))
        for r in rs:
            assert r.status == 200 and r.trailers == [("x-trailer", "t1")], r
            j = r.json()
            assert j["protocol"] == "h2" and j["authority"] == "svc" and j["body_bytes"] == 6
            assert ["x-client-trailer", "ct"] in j["trailers"]
            assert ["te", "trailers"] in j["headers"]
        assert pod.connects == 1 and pod.app.connections == 1      # one HBONE stream, one h2 connection
        r = await c.request("POST", "/stream/50", [("content-type", "application/grpc")], body=b"x")
        assert r.status == 200 and r.body == b"".join(b"msg-%d;" % i for i in range(50))
        assert r.trailers == [("grpc-status", "0"), ("grpc-message", "done")]
        r = await c.request("POST", "/trailers-only", [("content-type", "application/grpc")], body=b"x")
        assert r.status == 200 and r.header("grpc-status") == "5" and r.body == b"" and r.data_frames == 0
        assert pod.connects == 1 and pod.app.connections == 1
        text = mesh.metrics.exposition().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        samples = fams["istio_requests"].samples
        assert {s.labels["request_protocol"] for s in samples} == {"grpc"}
        by_path = {}
        for s in samples:
            by_path.setdefault(s.labels["grpc_response_status"], 0)
            by_path[s.labels["grpc_response_status"]] += s.value
        # 10 unary calls answered without grpc-status (200 -> 2 UNKNOWN as Envoy maps), the stream 0, trailers-only 5
        assert by_path == {"2": 10, "0": 1, "5": 1}, by_path
    run(go)


def test_http1_client_to_h2_backend_and_app_protocol_h2c():
    async def go(mesh):
        pod = await _grpc_service(mesh, port_name="web", app_protocol="kubernetes.io/h2c")
        c = await mesh.client(f"{VIP}:50051")
        for i in range(3):
            r = await c.request("POST", f"/echo/{i}", body=b"abc", host="greeter.shop")
            assert r.status == 200, r.body
            j = r.json()
            assert j["protocol"] == "h2" and j["authority"] == "greeter.shop" and j["body_bytes"] == 3
            assert j["path"] == f"/echo/{i}"
            assert not any(k == "host" for k, _ in j["headers"])
        assert pod.app.connections == 1
        c.close()
    run(go)


def test_h2_backend_reset_and_large_upload_flow_control():
    async def go(mesh):
        pod = await _grpc_service(mesh)
        c = await h2_client(mesh, f"{VIP}:50051")
        n = 16 << 20
        r = await c.request("POST", "/upload", body=b"u" * n, timeout=60)
        assert r.status == 200 and r.json()["body_bytes"] == n
        r = await c.request("GET", f"/download/{n}", timeout=60)
        assert r.status == 200 and len(r.body) == n
    run(go, timeout=90)


def test_grpc_fault_abort_over_h2_is_trailers_only_with_its_status_label():
    async def go(mesh):
        await _grpc_service(mesh)
        mesh.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: greeter, namespace: shop}
spec:
  hosts: [greeter]
  http:
  - match: [{uri: {exact: /pkg.Greeter/Fail}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: greeter}}]
  - route: [{destination: {host: greeter}}]
""")
        c = await h2_client(mesh, f"{VIP}:50051")
        r = await c.request("POST", "/pkg.Greeter/Fail", [("content-type", "application/grpc")], body=b"\0\0\0\0\0")
        assert (r.status, r.header("grpc-status"), r.body, r.data_frames) == (200, "14", b"", 0)
        fams = {f.name: f for f in text_string_to_metric_families(mesh.metrics.exposition().decode())}
        got = {(s.labels["request_protocol"], s.labels["grpc_response_status"], s.labels["response_flags"])
               for s in fams["istio_requests"].samples if s.name == "istio_requests_total"}
        assert got == {("grpc", "14", "FI")}
    run(go)

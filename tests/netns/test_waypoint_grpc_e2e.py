"""End to end (root) gRPC and HTTP/2 through the real waypoint: grpcio client pod -> ztunnel -> HBONE ->
waypoint -> HBONE -> ztunnel -> grpcio server pods; unary, server-streaming, status codes and
trailing metadata; a VirtualService routing one gRPC method to v2; an HTTP/2 (prior knowledge)
client to an HTTP/1.1 backend and an HTTP/1.1 client to a gRPC backend."""
import asyncio
import json
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.admin_http import get_unix

from .cluster_helper import (app_pod_yaml, cluster_fixture, idle_pod_yaml, namespace_yaml, nodes_yaml,
                             service_accounts_yaml, service_yaml, wait_for, waypoint_yaml)

NAME = f"wg{os.getpid() % 100000}"

GRPC_SERVER = '''
import os
from concurrent import futures
import grpc
POD = os.environ["POD_NAME"].encode()
def hello(req, ctx):
    ctx.set_trailing_metadata((("x-pod", POD.decode()),))
    return b"hello " + req + b" from " + POD
def count(req, ctx):
    for i in range(int(req)):
        yield b"%d:%s" % (i, POD)
def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "nope")
h = grpc.method_handlers_generic_handler("demo.Greeter", {
    "SayHello": grpc.unary_unary_rpc_method_handler(hello),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Fail": grpc.unary_unary_rpc_method_handler(fail)})
s = grpc.server(futures.ThreadPoolExecutor(8))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("0.0.0.0:50051")
s.start()
s.wait_for_termination()
'''

# grpcio connects IPv4 addresses from dual-stack AF_INET6 sockets (v4-mapped, ::ffff:a.b.c.d)
# whenever ::1 is usable: the capture's connect6 hook redirects those as connect4 does
# (ebpf/bpf/capture_connect.c), so the channel dials the service VIP itself.
GRPC_CLIENT = '''
import json, sys
import grpc
host, n = sys.argv[1], int(sys.argv[2])
out = {"unary": {}, "trailer_pods": {}, "errors": []}
ch = grpc.insecure_channel(f"{host}:50051",
                           options=[("grpc.default_authority", "greeter.shop.svc.cluster.local:50051")])
grpc.channel_ready_future(ch).result(timeout=30)
hello = ch.unary_unary("/demo.Greeter/SayHello")
for i in range(n):
    try:
        r, call = hello.with_call(b"w%d" % i, timeout=10)
        pod = r.decode().rsplit(" ", 1)[1]
        out["unary"][pod] = out["unary"].get(pod, 0) + 1
        tp = dict(call.trailing_metadata()).get("x-pod")
        out["trailer_pods"][tp] = out["trailer_pods"].get(tp, 0) + 1
        out["code"] = call.code().name
    except grpc.RpcError as e:
        out["errors"].append([e.code().name, e.details()])
out["stream"] = [m.decode() for m in ch.unary_stream("/demo.Greeter/Count")(b"5", timeout=10)]
try:
    ch.unary_unary("/demo.Greeter/Fail")(b"", timeout=10)
    out["fail"] = "no error"
except grpc.RpcError as e:
    out["fail"] = [e.code().name, e.details()]
print(json.dumps(out))
'''

HTTPD = '''
import http.server, json, os, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    def do_GET(self):
        body = json.dumps({"pod": os.environ["POD_NAME"], "host": self.headers.get("host"),
                           "version": self.request_version}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''

# HTTP/2 with prior knowledge over plain TCP (what an h2c client sends), N GETs on one connection.
H2GET = '''
import json, socket, sys
import h2.connection, h2.config, h2.events
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection()
s.sendall(c.data_to_send())
out = {"status": {}, "bodies": [], "errors": []}
for i in range(n):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "web.shop"), (":path", f"/{i}")],
                   end_stream=True)
    s.sendall(c.data_to_send())
    body, status, done = b"", None, False
    while not done:
        data = s.recv(65536)
        if not data:
            out["errors"].append("eof")
            break
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[":status"]
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                c.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                done = True
            elif isinstance(ev, h2.events.StreamReset):
                out["errors"].append(f"reset {ev.error_code}")
                done = True
        s.sendall(c.data_to_send())
    out["status"][status] = out["status"].get(status, 0) + 1
    out["bodies"].append(json.loads(body) if body else None)
print(json.dumps(out))
'''

# An HTTP/1.1 client calling the gRPC method by hand (length-prefixed message, content-type grpc).
H1GRPC = '''
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 50051, timeout=10)
msg = b"h1"
c.request("POST", "/demo.Greeter/SayHello", body=b"\\0" + len(msg).to_bytes(4, "big") + msg,
          headers={"content-type": "application/grpc", "host": "greeter"})
r = c.getresponse()
body = r.read()
print(json.dumps({"status": r.status, "content_type": r.getheader("content-type"),
                  "message": body[5:].decode(errors="replace"), "length": int.from_bytes(body[1:5], "big")}))
'''


def pod(name, app, version, node, command, sa):
    return app_pod_yaml(name, "shop", node, command, {"app": app, "version": version}, sa=sa)


CLUSTER = (nodes_yaml("n1", "n2") + namespace_yaml("shop", ambient=True)
           + service_accounts_yaml(("shop", "greeter"), ("shop", "web"))
           + pod("greeter-v1", "greeter", "v1", "n2", ["python3", "grpc_server.py"], "greeter")
           + pod("greeter-v2", "greeter", "v2", "n2", ["python3", "grpc_server.py"], "greeter")
           + pod("web-v1", "web", "v1", "n2", ["python3", "httpd.py", "8080"], "web")
           + idle_pod_yaml("client", "shop", "n1")
           + service_yaml("greeter", "shop", {"app": "greeter"}, [{"name": "grpc", "port": 50051, "targetPort": 50051}],
                          waypoint="wp")
           + service_yaml("web", "shop", {"app": "web"}, waypoint="wp") + waypoint_yaml())

# Count (the server-streaming method) goes to v2; everything else to v1.
METHOD_ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: greeter, namespace: shop}
spec:
  hosts: [greeter]
  http:
  - match: [{uri: {exact: /demo.Greeter/Count}}]
    route: [{destination: {host: greeter, subset: v2}}]
  - route: [{destination: {host: greeter, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: greeter, namespace: shop}
spec:
  host: greeter
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

cluster = cluster_fixture(NAME, "wpgrpc", CLUSTER, {"grpc_server.py": GRPC_SERVER, "grpc_client.py": GRPC_CLIENT,
                                                   "httpd.py": HTTPD, "h2get.py": H2GET, "h1grpc.py": H1GRPC})


def vip(cluster, name):
    return next(s["cluster_ip"] for s in cluster.status()["services"] if s["name"] == name)


def run_client(cluster, *argv, timeout=180):
    p = cluster.ambient("exec", "-n", "shop", "client", "--", "python3", *argv, timeout=timeout)
    return json.loads(p.stdout.strip().splitlines()[-1])


def waypoint_metrics(cluster) -> bytes:
    sock = os.path.join(cluster.paths.waypoint_dir("shop", "wp"), "admin.sock")
    status, body = asyncio.run(get_unix(sock, "/metrics"))
    assert status == 200
    return body


def grpc_series(body: bytes) -> dict[tuple[str, str, str], int]:
    """gRPC request counts by (workload, HTTP status, grpc status), read with prometheus_client's parser."""
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            lab = s.labels
            if s.name == "istio_requests_total" and lab.get("request_protocol") == "grpc":
                k = (lab["destination_workload"], lab["response_code"], lab["grpc_response_status"])
                out[k] = out.get(k, 0) + int(s.value)
    return out


@pytest.mark.root
def test_grpc_unary_streaming_status_and_trailers_through_the_waypoint(cluster):
    node = next(p["node"] for p in cluster.status()["pods"] if p["name"] == "client")
    mapped = cluster.admin(node)["capture"]["counters"]["connect6_mapped"]
    got = run_client(cluster, "grpc_client.py", vip(cluster, "greeter"), "20")
    # grpcio's own dual-stack socket was captured (connect6), no helper in between
    assert cluster.admin(node)["capture"]["counters"]["connect6_mapped"] > mapped
    assert not got["errors"], got
    assert sum(got["unary"].values()) == 20 and set(got["unary"]) <= {"greeter-v1", "greeter-v2"}, got
    assert got["trailer_pods"] == got["unary"]                  # trailing metadata came through
    assert got["code"] == "OK"
    assert len(got["stream"]) == 5 and [m.split(":")[0] for m in got["stream"]] == ["0", "1", "2", "3", "4"]
    assert got["fail"] == ["NOT_FOUND", "nope"]                 # grpc-status and grpc-message in trailers
    series = grpc_series(waypoint_metrics(cluster))
    assert sum(v for (w, code, st), v in series.items() if st == "0") == 21, series
    assert sum(v for (w, code, st), v in series.items() if st == "5") == 1, series
    assert {code for (_, code, _) in series} == {"200"}
    wp_log = os.path.join(cluster.paths.logs_dir, "waypoint-shop-wp.log")
    with open(wp_log, errors="replace") as f:
        lines = [ln for ln in f if "ambient.access" in ln and "/demo.Greeter/SayHello" in ln]
    assert lines and all('"POST /demo.Greeter/SayHello HTTP/2"' in ln for ln in lines), lines[:3]


@pytest.mark.root
def test_virtual_service_routes_a_grpc_method_to_its_subset(cluster):
    cluster.apply(METHOD_ROUTE, "method-route.yaml")
    try:
        seen = []

        def routed():
            g = run_client(cluster, "grpc_client.py", vip(cluster, "greeter"), "10")
            seen.append(g)
            return g["unary"] == {"greeter-v1": 10} and all(m.endswith("greeter-v2") for m in g["stream"])
        wait_for(routed, timeout=60, step=0.5)   # `apply` returns once the waypoint has it: normally at once
        got = seen[-1]
        assert len(got["stream"]) == 5 and not got["errors"] and got["fail"] == ["NOT_FOUND", "nope"], got
    finally:
        cluster.delete(METHOD_ROUTE, "method-route-del.yaml")


@pytest.mark.root
def test_h2_client_to_http1_backend_and_http1_client_to_grpc_backend(cluster):
    got = run_client(cluster, "h2get.py", vip(cluster, "web"), "80", "5")
    assert got["status"] == {"200": 5} and not got["errors"], got
    for b in got["bodies"]:
        assert b == {"pod": "web-v1", "host": "web.shop", "version": "HTTP/1.1"}   # :authority became Host
    got = run_client(cluster, "h1grpc.py", vip(cluster, "greeter"))
    assert got["status"] == 200 and got["content_type"] == "application/grpc", got
    assert got["message"] in ("hello h1 from greeter-v1", "hello h1 from greeter-v2")
    assert got["length"] == len(got["message"])

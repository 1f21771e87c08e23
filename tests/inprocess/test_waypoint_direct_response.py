"""VirtualService `redirect` and `directResponse` answered by the waypoint itself (Envoy direct responses)."""
from __future__ import annotations

from tests.inprocess.test_waypoint_fault_mirror import VIP, flags_counts, web
from tests.inprocess.test_waypoint_l7 import run

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: web.example, redirectCode: 302}
  - match: [{uri: {prefix: /down}}]
    directResponse: {status: 503, body: {string: "down for maintenance"}}
    headers: {response: {set: {retry-after: "30"}}}
  - route: [{destination: {host: web}}]
"""


def test_redirect_and_direct_response_never_reach_the_upstream():
    async def go(mesh):
        a, _ = await web(mesh, shadow=False)
        mesh.apply(VS)
        c = await mesh.client(f"{VIP}:80")
        r = await c.request("GET", "/old/x?k=v", host="web")
        assert (r.status, r.header("location"), r.body) == (302, "http://web.example/new?k=v", b"")
        r = await c.request("POST", "/down", body=b"payload")        # keep-alive: the body is consumed
        assert (r.status, r.body, r.header("retry-after"), r.header("content-type")) == (
            503, b"down for maintenance", "30", "text/plain")
        assert a.backend.requests == 0 and a.connects == 0
        r = await c.request("GET", "/other")
        assert r.status == 200 and r.json()["name"] == "web-1"
        assert flags_counts(mesh) == {("302", "-"): 1, ("503", "-"): 1, ("200", "-"): 1}
        c.close()
    run(go)

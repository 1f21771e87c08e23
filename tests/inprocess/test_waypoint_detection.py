"""Protocol detection at the waypoint: how long a silent client is waited for (meshConfig.protocolDetectionTimeout)."""
from __future__ import annotations

import asyncio

from tests.inprocess.test_waypoint_l7 import run

VIP = "10.96.0.30"


def detection_timeout(value: str) -> str:
    return f"""
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: istio, namespace: istio-system}}
        data:
          mesh: |
            protocolDetectionTimeout: {value}
        """


async def silent_then_get(mesh, silent: float):
    pod = await mesh.pod("web-v1", labels={"app": "web", "version": "v1"})
    mesh.service("web", VIP, [pod])
    c = await mesh.client(f"{VIP}:80")         # a pre-warmed connection: open now, used later
    await asyncio.sleep(silent)
    r = await c.request("GET", "/late")
    c.close()
    return r


def test_by_default_a_client_silent_after_its_connect_still_gets_l7():
    # Istio's default (0s): wait for the client's first bytes. A 0.1 s timeout, as this
    # waypoint once had, relayed such a client at L4: no routing, no L7 policy, no metrics.
    async def go(mesh):
        r = await silent_then_get(mesh, 0.5)
        assert r.status == 200
        assert mesh.inbound.counts["l7_streams"] == 1 and mesh.inbound.counts["l4_streams"] == 0
    run(go)


def test_a_configured_detection_timeout_relays_a_silent_client_at_l4():
    async def go(mesh):
        mesh.apply(detection_timeout("200ms"))
        r = await silent_then_get(mesh, 0.8)
        assert r.status == 200                  # the backend still answers, through the L4 relay
        assert mesh.inbound.counts["l4_streams"] == 1 and mesh.inbound.counts["l7_streams"] == 0
    run(go)

"""Client HBONE -> the waypoint's real handler -> HBONE to destination ztunnels -> HTTP backends, on loopback with real mTLS."""
from __future__ import annotations

import asyncio
import logging
import random

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess.waypoint_harness import WaypointMesh

VIP = "10.96.0.10"


def run(coro, timeout: float = 60, rng=None):
    async def main():
        mesh = WaypointMesh(rng=rng)
        await mesh.start()
        try:
            return await asyncio.wait_for(coro(mesh), timeout)
        finally:
            await mesh.close()
    return uvloop.run(main())


async def reviews(mesh, versions=("v1", "v2")):
    pods = [await mesh.pod(f"reviews-{v}", labels={"app": "reviews", "version": v}) for v in versions]
    mesh.service("reviews", VIP, pods)
    return pods


def test_default_route_forwards_and_keeps_alive_upstream():
    async def go(mesh):
        (pod,) = await reviews(mesh, ("v1",))
        c = await mesh.client(f"{VIP}:80")
        for i in range(5):
            r = await c.request("GET", f"/r/{i}?q=1", {"user-agent": "t"})
            assert r.status == 200, r.body
            j = r.json()
            assert j["path"] == f"/r/{i}?q=1" and j["name"] == "reviews-v1" and j["method"] == "GET"
        assert pod.connects == 1                      # one upstream CONNECT carried all five
        assert pod.backend.connections == 1 and pod.backend.requests == 5
        c.close()
    run(go)

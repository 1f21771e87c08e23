"""ztunnel -> waypoint in process: bound traffic goes over HBONE to the waypoint's address, missing ones are refused."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace

from mesh.model.workload import BindingSource, WaypointStatus
from mesh.proxy.reason import Reason
from mesh.proxy.result import SecurityPolicy
from tests.inprocess.harness import APP_PORT, binding, roundtrip
from tests.inprocess.test_datapath import outbound_of, run, samples

WP_ID = "spiffe://cluster.local/ns/mesh/sa/wp"


def test_service_bound_to_a_waypoint_goes_to_it_with_the_vip_as_authority():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        backend = await mesh.pod("backend", sa="backend")
        wp = await mesh.waypoint("wp")
        vip = mesh.prefix + "200"
        mesh.service("echo", "mesh", vip, 80, [backend], waypoint=binding("wp"))
        got = await roundtrip(*await mesh.dial_out(client, (vip, 80)), b"ping")
        assert got == wp.greeting(f"{vip}:80") + b"ping"
        (req,) = wp.requests
        assert req.authority == f"{vip}:80"
        assert str(req.peer_identity) == "spiffe://cluster.local/ns/mesh/sa/client"
        assert req.local_addr == (str(wp.waypoint.address), 15008)
        out = await mesh.result(outbound_of(client))
        return wp, out

    wp, out = run(main)
    assert out.reason is None and out.security is SecurityPolicy.MUTUAL_TLS
    assert out.dst_hbone_addr == f"{wp.waypoint.address}:15008"
    assert out.dst.identity == WP_ID and out.dst.workload == "wp-waypoint"
    assert out.dst_service == "echo.mesh.svc.cluster.local"


def test_waypoint_identity_is_checked_not_just_any_mesh_certificate():
    """The service's binding names waypoint `wp`, but the server at its address presents `other`'s
    certificate: ztunnel must not hand the connection over."""
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        backend = await mesh.pod("backend", sa="backend")
        imposter = await mesh.waypoint("other")
        wp = replace(imposter.waypoint, name="wp", identity=binding("wp").identity)
        mesh.objects = [o for o in mesh.objects if o is not imposter.waypoint] + [wp]
        vip = mesh.prefix + "200"
        mesh.service("echo", "mesh", vip, 80, [backend], waypoint=binding("wp"))
        reader, writer = await mesh.dial_out(client, (vip, 80))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        return await mesh.result(outbound_of(client))

    out = run(main)
    assert out.reason is Reason.IDENTITY_MISMATCH and out.dst.identity == WP_ID


def test_pod_bound_to_a_waypoint_goes_to_it_with_the_pod_address_as_authority():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        wp = await mesh.waypoint("wp")
        server = await mesh.pod("server", sa="server", waypoint=binding("wp", source=BindingSource.POD))
        got = await roundtrip(*await mesh.dial_out(client, (server.ip, APP_PORT)), b"x" * 100_000)
        assert got == wp.greeting(f"{server.ip}:{APP_PORT}") + b"x" * 100_000
        (req,) = wp.requests
        assert req.authority == f"{server.ip}:{APP_PORT}"
        assert str(req.peer_identity) == "spiffe://cluster.local/ns/mesh/sa/client"
        out = await mesh.result(outbound_of(client))
        assert out.dst.workload == "server" and out.dst.identity == WP_ID
        assert out.dst_hbone_addr == f"{wp.waypoint.address}:15008" and out.bytes_sent == 100_000
    run(main)


def test_missing_waypoint_is_refused_with_waypoint_missing_in_log_and_metrics(caplog):
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        backend = await mesh.pod("backend", sa="backend")
        vip = mesh.prefix + "200"
        mesh.service("echo", "mesh", vip, 80, [backend], waypoint=binding("gone", status=WaypointStatus.MISSING))
        reader, writer = await mesh.dial_out(client, (vip, 80))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # reset, nothing of the backend
        writer.close()
        out = await mesh.result(outbound_of(client))
        assert out.reason is Reason.WAYPOINT_MISSING and out.response_flag == "UH"
        assert "mesh/gone" in out.detail and out.dst_service == "echo.mesh.svc.cluster.local"
        (f,) = samples(mesh, "istio_tcp_connections_failed_total", response_flags="UH")
        assert f.value == 1 and f.labels["destination_service"] == "echo.mesh.svc.cluster.local"
        (r,) = samples(mesh, "ztunnel_outbound_refused_total")
        assert r.labels["reason"] == "waypoint_missing" and r.labels["source_workload"] == "client" and r.value == 1

    with caplog.at_level(logging.INFO, logger="ambient.access"):
        run(main)
    lines = [json.loads(r.getMessage().split(" ", 2)[2]) for r in caplog.records if r.name == "ambient.access"]
    (entry,) = [e for e in lines if e.get("error")]
    assert (entry["error"], entry["response_flags"], entry["dst.service"]) == (
        "waypoint_missing", "UH", "echo.mesh.svc.cluster.local")


def test_waypoint_without_an_address_is_refused_and_the_backend_never_reached():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        await mesh.waypoint("wp", addressed=False)
        server = await mesh.pod("server", sa="server", waypoint=binding("wp", source=BindingSource.POD))
        reader, writer = await mesh.dial_out(client, (server.ip, APP_PORT))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        out = await mesh.result(outbound_of(client))
        assert out.reason is Reason.WAYPOINT_MISSING and "no address" in out.detail
        assert out.dst.workload == "server"
        assert not [r for r in mesh.log.results if r.dst.workload == "server" and r.direction.value == "inbound"]
    run(main)


def test_not_for_traffic_binding_goes_direct():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        wp = await mesh.waypoint("wp")
        server = await mesh.pod("server", sa="server",
                                waypoint=binding("wp", status=WaypointStatus.NOT_FOR_TRAFFIC, source=BindingSource.POD))
        got = await roundtrip(*await mesh.dial_out(client, (server.ip, APP_PORT)), b"direct")
        assert got == server.greeting() + b"direct"
        assert wp.requests == []
        out = await mesh.result(outbound_of(client))
        assert out.dst_hbone_addr == f"{server.ip}:15008" and out.dst.identity == "spiffe://cluster.local/ns/mesh/sa/server"
    run(main)

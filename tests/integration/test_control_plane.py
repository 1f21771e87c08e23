"""Control plane <-> proxy client over real mutual TLS on a Unix socket (in-process, no root)."""
import asyncio
import ipaddress
import os
import random
import subprocess
import time

import pytest

from mesh import tls
from controlplane.ca import CertificateAuthority
from mesh.ca import build_csr, generate_key
from tests.ca_reference import identity_from_cert
from mesh.clock import SystemClock
from mesh.distribution.client import CertificateRefused, ControlPlaneClient, NotConnected
from controlplane.server import ControlPlane
from mesh.distribution.protocol import ALPN
from mesh.identity import NodeId, SpiffeId
from mesh.model import Container, FrozenMap, Namespace, ObjectMeta, Pod
from mesh.state import ProxyState

TD = "cluster.local"


def pod(name, node, sa, ns="shop", ip="10.244.0.2"):
    return Pod(meta=ObjectMeta(name=name, namespace=ns), node_name=node, service_account=sa,
               pod_ip=ipaddress.IPv4Address(ip), containers=(Container(name="c", command=("true",)),))


RESOURCES = [Namespace(meta=ObjectMeta(name="shop")), pod("a", "n1", "front"), pod("b", "n2", "back", ip="10.244.1.2")]


class Env:
    def __init__(self, tmp_path):
        self.clock = SystemClock()
        self.ca = CertificateAuthority.generate(TD, clock=self.clock)
        self.sock = str(tmp_path / "cp.sock")
        self.cp = ControlPlane(ca=self.ca, socket_path=self.sock, clock=self.clock, cert_ttl=3600,
                               resources=RESOURCES)
        self.tasks = []

    def client(self, identity, ca=None):
        ca = ca or self.ca
        cert = ca.issue(identity, 3600)
        c = ControlPlaneClient(socket_path=self.sock, trust_domain=TD, state=ProxyState(), clock=self.clock,
                               rng=random.Random(1), backoff_max=0.2,
                               ssl_context=lambda: tls.client_context(cert, ca.roots_pem, alpn=(ALPN,)))
        self.tasks.append(asyncio.ensure_future(c.run()))
        return c

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.cp.stop()


def run(tmp_path, body):
    async def main():
        env = Env(tmp_path)
        await env.cp.start()
        try:
            await asyncio.wait_for(body(env), 20)
        finally:
            await env.close()
    asyncio.run(main())


async def until(pred, timeout=5.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


def test_subscribe_gets_snapshot_then_deltas_fast(tmp_path):
    async def body(env):
        c = env.client(NodeId(trust_domain=TD, node="n1"))
        await until(lambda: c.state.synced)
        assert {w.uid for w in c.state.workloads()} == {"shop/a", "shop/b"}
        for i in range(5):
            ns = Namespace(meta=ObjectMeta(name="shop", labels=FrozenMap({"rev": str(i)})))
            env.cp.resources_changed([ns, *RESOURCES[1:]])
            dt = await until(lambda: c.state.namespace("shop").labels.get("rev") == str(i))
            assert dt < 1.0
        assert c.stats["snapshots"] == 1 and c.stats["deltas"] == 5
    run(tmp_path, body)


def test_node_gets_certificates_only_for_its_pods_service_accounts(tmp_path):
    async def body(env):
        c = env.client(NodeId(trust_domain=TD, node="n1"))
        await until(lambda: c.state.synced)
        front = SpiffeId(trust_domain=TD, namespace="shop", service_account="front")
        key = generate_key()
        chain = await c.request_certificate(front, build_csr(front, key))
        from cryptography import x509
        leaf = x509.load_pem_x509_certificate(chain[0])
        assert identity_from_cert(leaf) == front
        leaf_f, root_f = tmp_path / "leaf.pem", tmp_path / "root.pem"
        leaf_f.write_bytes(chain[0])
        root_f.write_bytes(env.ca.roots_pem)
        v = subprocess.run(["openssl", "verify", "-CAfile", str(root_f), str(leaf_f)], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
        # back/back runs only on n2: refused to n1, with the reason on both sides.
        back = SpiffeId(trust_domain=TD, namespace="shop", service_account="back")
        with pytest.raises(CertificateRefused) as e:
            await c.request_certificate(back, build_csr(back, generate_key()))
        assert e.value.reason == "identity_not_on_node"
        assert "n1" in str(e.value) and "shop/back" in str(e.value)
        # A CSR whose SAN does not match the requested identity is refused by the CA.
        with pytest.raises(CertificateRefused) as e:
            await c.request_certificate(front, build_csr(back, generate_key()))
        assert e.value.reason == "san_mismatch"
        assert env.cp.stats["csr_denied"] == 2 and env.cp.stats["certificates"] == 1
    run(tmp_path, body)


def test_workload_identity_may_only_renew_itself(tmp_path):
    async def body(env):
        front = SpiffeId(trust_domain=TD, namespace="shop", service_account="front")
        c = env.client(front)
        await until(lambda: c.state.synced)
        assert await c.request_certificate(front, build_csr(front, generate_key()))
        back = SpiffeId(trust_domain=TD, namespace="shop", service_account="back")
        with pytest.raises(CertificateRefused) as e:
            await c.request_certificate(back, build_csr(back, generate_key()))
        assert e.value.reason == "identity_mismatch"
    run(tmp_path, body)


def test_client_from_another_ca_is_refused(tmp_path):
    async def body(env):
        other = CertificateAuthority.generate(TD, clock=env.clock)
        c = env.client(NodeId(trust_domain=TD, node="n1"), ca=other)
        await until(lambda: c.stats["connect_failures"] >= 2)
        assert not c.state.synced and not c.connected.is_set()
        with pytest.raises(NotConnected):
            await c.request_certificate(SpiffeId(trust_domain=TD, namespace="shop", service_account="front"),
                                        b"", timeout=0.2)
    run(tmp_path, body)


def test_state_survives_control_plane_outage_and_resyncs(tmp_path):
    async def body(env):
        c = env.client(NodeId(trust_domain=TD, node="n1"))
        await until(lambda: c.state.synced)
        v = c.state.version
        await env.cp.stop()
        await until(lambda: not c.connected.is_set())
        assert {w.uid for w in c.state.workloads()} == {"shop/a", "shop/b"}  # last state kept
        env.cp.resources_changed(RESOURCES[:2])  # shop/b goes away while the client is cut off
        await asyncio.sleep(0.3)
        assert c.state.workload("shop/b") is not None and c.state.version == v
        await env.cp.start()
        await until(lambda: c.state.workload("shop/b") is None, timeout=3)
        assert c.connected.is_set() and c.state.version > v
    run(tmp_path, body)


def test_serving_cert_is_renewed_without_connections(tmp_path):
    """A proxy connecting after a quiet spell longer than the TTL meets a valid serving cert
    (it used to be renewed only once a handshake had already succeeded)."""
    async def main():
        clock = SystemClock()
        ca = CertificateAuthority.generate(TD, clock=clock)
        sock = str(tmp_path / "cp.sock")
        cp = ControlPlane(ca=ca, socket_path=sock, clock=clock, cert_ttl=2, resources=RESOURCES)
        await cp.start()
        first = cp._serving_cert
        try:
            await asyncio.sleep(3)  # the first serving cert has expired; nobody connected
            cert = ca.issue(NodeId(trust_domain=TD, node="n1"), 3600)
            c = ControlPlaneClient(socket_path=sock, trust_domain=TD, state=ProxyState(), clock=clock,
                                   rng=random.Random(1), backoff_max=0.2,
                                   ssl_context=lambda: tls.client_context(cert, ca.roots_pem, alpn=(ALPN,)))
            task = asyncio.ensure_future(c.run())
            try:
                await until(lambda: c.state.synced, timeout=2)
                assert c.stats["connect_failures"] == 0
                assert cp._serving_cert is not first
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await cp.stop()
    asyncio.run(asyncio.wait_for(main(), 20))

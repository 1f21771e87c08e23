"""Token credentials against the real API server: ztunnel pods bound to nodes get tokens from
the TokenRequest API (audience istio-ca) and ask the control plane, over TCP, for workload
certificates. A token bound to a pod on node A cannot obtain a certificate for a pod on node B;
an expired, a wrong-audience, an unbound or a deleted pod's token is refused."""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Awaitable, Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from controlplane.ca import CertificateAuthority
from controlplane.kube.api import KubeApi
from controlplane.kube.source import KubeSource
from controlplane.kube.tokens import TokenAuthenticator
from controlplane.server import ControlPlane
from controlplane.store import ResourceStore
from mesh import tls
from mesh.ca import build_csr, generate_key
from mesh.clock import SystemClock
from mesh.distribution.client import CertificateRefused, ControlPlaneClient
from mesh.distribution.protocol import ALPN
from mesh.identity import SpiffeId
from mesh.model import Pod
from mesh.state import ProxyState

from .cluster import KubeCluster
from .support import pod_json as _pod, request_token as _token

TD = "cluster.local"


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _expired_copy(kube: KubeCluster, token: str) -> str:
    """The same claims (same pod binding, same audience), validity moved into the past, signed
    with the cluster's real ServiceAccount key: only the expiry makes it invalid."""
    header, payload, _sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    now = int(time.time())
    claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    with open(f"{kube.root}/sa.key", "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}".encode()
    return signing_input.decode() + "." + _b64(key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))


def test_a_token_gets_certificates_only_for_pods_on_its_pods_node(kube: KubeCluster, namespace: str) -> None:
    ns = namespace
    node_a, node_b = f"{ns}-a", f"{ns}-b"
    for n in (node_a, node_b):
        kube.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}))
    for sa in ("ztunnel", "web", "db"):
        kube.kubectl("create", "serviceaccount", sa, "-n", ns)
    for name, sa, node in (("zt-a", "ztunnel", node_a), ("zt-b", "ztunnel", node_b),
                           ("web-1", "web", node_a), ("db-1", "db", node_b)):
        kube.kubectl("create", "-f", "-", input=_pod(name, ns, sa, node))
    web = SpiffeId(trust_domain=TD, namespace=ns, service_account="web")
    db = SpiffeId(trust_domain=TD, namespace=ns, service_account="db")
    clock = SystemClock()
    ca = CertificateAuthority.generate(TD, clock=clock)

    async def main() -> None:
        api = await KubeApi.from_kubeconfig(kube.kubeconfig)
        store = ResourceStore()
        source = KubeSource(api, store, events=False)
        await source.start()
        await source.wait_synced(20)
        auth = TokenAuthenticator(api, audience="istio-ca", trust_domain=TD, clock=clock, node_agent=(ns, "ztunnel"))
        cp = ControlPlane(ca=ca, socket_path=None, listen=("127.0.0.1", 0), clock=clock, cert_ttl=600,
                          resources=store.objects.values(), authenticate_token=auth.authenticate)
        store.watch(cp.resources_changed)
        await cp.start()
        tasks: list[asyncio.Task[None]] = []

        def client(token: Callable[[], str]) -> ControlPlaneClient:
            c = ControlPlaneClient(address=cp.tcp_address, trust_domain=TD, state=ProxyState(), clock=clock,
                                   rng=random.Random(1), backoff_max=0.2, token=token,
                                   ssl_context=lambda: tls.server_only_client_context(ca.roots_pem, alpn=(ALPN,)))
            tasks.append(asyncio.ensure_future(c.run()))
            return c

        async def sign(c: ControlPlaneClient, ident: SpiffeId) -> str | None:
            """None when signed; else the refusal's reason."""
            try:
                chain = await c.request_certificate(ident, build_csr(ident, generate_key()), timeout=10)
            except CertificateRefused as e:
                return e.reason
            assert len(chain) == 2 and chain[-1] == ca.roots_pem
            return None

        try:
            # The store knows the pods before anyone asks.
            deadline = time.monotonic() + 10
            while len([p for p in store.of(Pod) if p.namespace == ns]) < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            tok_a = await _token(api, ns, "ztunnel", pod="zt-a")
            tok_b = await _token(api, ns, "ztunnel", pod="zt-b")
            za, zb = client(lambda: tok_a), client(lambda: tok_b)
            # A token peer is subscribed too: it gets the snapshot.
            await asyncio.wait_for(za.connected.wait(), 10)
            deadline = time.monotonic() + 10
            while not za.state.synced:
                assert time.monotonic() < deadline, "no snapshot for a token client"
                await asyncio.sleep(0.02)
            assert await sign(za, web) is None
            assert await sign(za, db) == "identity_not_on_node"  # db runs on node B only
            assert await sign(zb, db) is None
            assert await sign(zb, web) == "identity_not_on_node"

            # Refused credentials, each with its reason: a client subscribed with a good token
            # presents another with each request (every request is checked on its own).
            holder = {"tok": tok_a}
            bad = client(lambda: holder["tok"])
            deadline = time.monotonic() + 10
            while not bad.state.synced:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            holder["tok"] = await _token(api, ns, "ztunnel", pod="zt-a", audience="https://other.example")
            assert await sign(bad, web) == "token_unauthenticated"  # wrong audience: the review fails
            holder["tok"] = _expired_copy(kube, tok_a)
            assert await sign(bad, web) == "token_unauthenticated"  # expired
            holder["tok"] = await _token(api, ns, "ztunnel")  # not bound to any pod: names no node
            assert await sign(bad, web) == "token_not_pod_bound"
            holder["tok"] = "not-a-token"
            assert await sign(bad, web) == "token_unauthenticated"
            # A workload's own token gets its own identity only, wherever it runs.
            holder["tok"] = await _token(api, ns, "web", pod="web-1")
            assert await sign(bad, web) is None
            assert await sign(bad, db) == "identity_mismatch"
            # The bound pod deleted: its token stops working (after the short review cache).
            await asyncio.to_thread(kube.kubectl, "delete", "pod", "zt-b", "-n", ns, "--grace-period=0", "--force")
            auth._cache.clear()
            # The API server's own check reads an informer cache, which may lag the delete: then
            # the control plane's GET of the bound pod refuses it.
            assert await sign(zb, db) in ("token_unauthenticated", "bound_pod_gone")
            assert auth.stats["reviews"] >= 8
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await cp.stop()
            await source.stop()
            await api.close()
    asyncio.run(main())
    for n in (node_a, node_b):
        kube.kubectl("delete", "node", n, "--wait=false", check=False)


def test_a_token_client_with_a_bad_token_is_not_subscribed(kube: KubeCluster, namespace: str) -> None:
    clock = SystemClock()
    ca = CertificateAuthority.generate(TD, clock=clock)

    async def main() -> None:
        api = await KubeApi.from_kubeconfig(kube.kubeconfig)
        auth = TokenAuthenticator(api, audience="istio-ca", trust_domain=TD, clock=clock)
        cp = ControlPlane(ca=ca, socket_path=None, listen=("127.0.0.1", 0), clock=clock, cert_ttl=600,
                          authenticate_token=auth.authenticate)
        await cp.start()
        try:
            for token in ("garbage", None):
                ctx = tls.server_only_client_context(ca.roots_pem, alpn=(ALPN,))
                from mesh.distribution.protocol import Subscribe, encode
                reader, writer = await asyncio.open_connection(*cp.tcp_address, ssl=ctx, server_hostname="cp")
                writer.write(encode(Subscribe(token=token)))
                assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
                writer.close()
            assert cp.stats["auth_denied"] == 2 and cp.stats["snapshots"] == 0
        finally:
            await cp.stop()
            await api.close()
    asyncio.run(main())

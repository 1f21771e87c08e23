"""`python -m waypoint` as its own process, against a control plane and CA in this test: it
subscribes with its bootstrap credential, obtains its own certificate by CSR, serves HBONE and
reports through its admin socket."""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import uvloop

from controlplane.ca import CertificateAuthority
from controlplane.server import ControlPlane
from mesh import tls
from mesh.admin_http import get_unix
from mesh.clock import SystemClock
from mesh.identity import SpiffeId
from mesh.config import load_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TD = "cluster.local"
YAML = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def _write_bootstrap(ca: CertificateAuthority, ident: SpiffeId, directory: str) -> None:
    os.makedirs(directory, mode=0o700)
    cert = ca.issue(ident, 600)
    for name, data in {"key.pem": cert.key_pem, "cert-chain.pem": cert.full_chain_pem,
                       "root-cert.pem": ca.roots_pem}.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


async def _dump(admin: str, proc: subprocess.Popen, pred, timeout: float = 20.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        assert proc.poll() is None, f"waypoint exited with {proc.returncode}"
        if os.path.exists(admin):
            try:
                status, body = await get_unix(admin, "/config_dump")
                last = json.loads(body)
                if status == 200 and pred(last):
                    return last
            except (OSError, asyncio.TimeoutError):
                pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"config dump never matched: {last}")


def test_waypoint_process_subscribes_renews_and_serves_hbone(tmp_path):
    clock = SystemClock()
    ca = CertificateAuthority.generate(TD, clock=clock)
    ident = SpiffeId(trust_domain=TD, namespace="shop", service_account="waypoint")
    run_dir = tmp_path / "waypoints" / "shop" / "waypoint"
    _write_bootstrap(ca, ident, str(run_dir / "bootstrap"))
    sock = str(tmp_path / "cp.sock")
    admin = str(run_dir / "admin.sock")
    host = f"127.{100 + os.getpid() % 100}.{random.randrange(1, 255)}.9"

    async def main():
        cp = ControlPlane(ca=ca, socket_path=sock, clock=clock, cert_ttl=600, 
                          resources=load_text(YAML, "test.yaml"))
        await cp.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "waypoint", "--gateway", "shop/waypoint", "--run-dir", str(run_dir),
             "--control-plane", sock, "--trust-domain", TD, "--hbone-address", f"{host}:15008"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "waypoint.log", "wb"))
        try:
            dump = await _dump(admin, proc, lambda d: d["synced"] and d["listening"])
            assert dump["version"] >= 1 and dump["connected"] is True
            assert dump["gateway"] == "shop/waypoint" and dump["identity"] == ident.uri
            certs = dump["certificates"]
            assert any(c["identity"] == ident.uri for c in certs), certs
            assert cp.stats["certificates"] == 1      # its own identity, by CSR over the subscription
            status, _ = await get_unix(admin, "/healthz/ready")
            assert status == 200
            status, metrics = await get_unix(admin, "/metrics")
            assert status == 200 and b"istio_requests_total" in metrics
            # HBONE on the requested address, with the certificate the CP signed for it.
            client = ca.issue(SpiffeId(trust_domain=TD, namespace="shop", service_account="client"), 600)
            ctx = tls.client_context(client, ca.roots_pem)
            r, w = await asyncio.open_connection(host, 15008, ssl=ctx, server_hostname="waypoint")
            peer = tls.peer_identity(w.get_extra_info("ssl_object"))
            assert peer == ident
            assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            w.close()
        finally:
            proc.terminate()
            rc = await asyncio.to_thread(proc.wait, 10)
            await cp.stop()
        assert rc == 0, (tmp_path / "waypoint.log").read_text()
    uvloop.run(asyncio.wait_for(main(), 60))

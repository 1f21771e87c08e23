"""`python -m controlplane --kubernetes`: a proxy subscribed to the control plane sees pods made
with kubectl, as workloads of the mesh, through the same server as local mode."""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

from controlplane.ca import CertificateAuthority
from mesh import tls
from mesh.clock import SystemClock
from mesh.distribution.client import ControlPlaneClient
from mesh.distribution.protocol import ALPN
from mesh.identity import NodeId
from mesh.model import TunnelProtocol
from mesh.state import ProxyState

from .cluster import KubeCluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD = """{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "%s", "namespace": "%s"},
 "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "none"}]}}"""


def test_a_subscribed_proxy_sees_pods_made_with_kubectl(mesh_crds: KubeCluster, namespace: str, tmp_path) -> None:
    kube, ns = mesh_crds, namespace
    kube.kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
    kube.kubectl("create", "-f", "-", input=POD % ("a", ns))
    kube.kubectl("patch", "pod", "a", "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"podIP": "10.244.9.2"}}))
    sock, ca_dir = str(tmp_path / "cp.sock"), str(tmp_path / "ca")
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "--socket", sock, "--ca-dir", ca_dir,
                             "--kubernetes", "--kubeconfig", kube.kubeconfig],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "control plane did not listen"
            time.sleep(0.05)
        clock = SystemClock()
        ca = CertificateAuthority.load_or_create(ca_dir, "cluster.local", clock=clock)
        boot = ca.issue(NodeId(trust_domain="cluster.local", node="n1"), 600)

        async def main() -> tuple[list[tuple[str, TunnelProtocol]], list[tuple[str, TunnelProtocol]], float]:
            state = ProxyState()
            client = ControlPlaneClient(socket_path=sock, trust_domain="cluster.local", state=state, clock=clock,
                                        rng=random.Random(1), backoff_max=0.2,
                                        ssl_context=lambda: tls.client_context(boot, ca.roots_pem, alpn=(ALPN,)))
            task = asyncio.ensure_future(client.run())

            def mine():
                return sorted((w.uid, w.protocol) for w in state.workloads() if w.namespace == ns)
            try:
                for _ in range(400):
                    if state.synced and mine():
                        break
                    await asyncio.sleep(0.025)
                first = mine()
                # A change made with kubectl reaches the subscribed proxy as a delta.
                await asyncio.to_thread(kube.kubectl, "create", "-f", "-", input=POD % ("b", ns))
                await asyncio.to_thread(kube.kubectl, "patch", "pod", "b", "-n", ns, "--subresource=status",
                                        "--type=merge", "-p", json.dumps({"status": {"podIP": "10.244.9.3"}}))
                t0 = time.monotonic()
                while len(mine()) < 2 and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.02)
                return first, mine(), time.monotonic() - t0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        first, after, elapsed = asyncio.run(main())
        assert first == [(f"{ns}/a", TunnelProtocol.HBONE)]
        assert after == [(f"{ns}/a", TunnelProtocol.HBONE), (f"{ns}/b", TunnelProtocol.HBONE)]
        assert elapsed < 2.0
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0, out[-3000:]
    assert not os.path.exists(sock)

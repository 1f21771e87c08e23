"""`python -m controlplane`: the control plane on its own, serving YAML files to a real proxy client."""
import asyncio
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
from mesh.state import ProxyState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YAML = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, command: ["true"]}]
status: {podIP: 10.244.0.7}
"""


def _cp(*args, **kw):
    return subprocess.run([sys.executable, "-m", "controlplane", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, **kw)


def test_check_validates_files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(YAML)
    p = _cp("--socket", str(tmp_path / "cp.sock"), "--ca-dir", str(tmp_path / "ca"), "--check", str(good))
    assert p.returncode == 0, p.stderr
    assert "3 objects valid" in p.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(YAML.replace("podIP: 10.244.0.7", "podIP: not-an-ip"))
    p = _cp("--socket", str(tmp_path / "cp.sock"), "--ca-dir", str(tmp_path / "ca"), "--check", str(bad))
    assert p.returncode == 2
    assert "bad.yaml" in p.stderr and "status.podIP" in p.stderr


def test_serves_a_proxy_from_yaml(tmp_path):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(YAML)
    sock, ca_dir = str(tmp_path / "cp.sock"), str(tmp_path / "ca")
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "--socket", sock, "--ca-dir", ca_dir, str(cfg)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "control plane did not listen"
            time.sleep(0.05)
        clock = SystemClock()
        ca = CertificateAuthority.load_or_create(ca_dir, "cluster.local", clock=clock)  # the one it created
        boot = ca.issue(NodeId(trust_domain="cluster.local", node="n1"), 600)

        async def main():
            state = ProxyState()
            client = ControlPlaneClient(socket_path=sock, trust_domain="cluster.local", state=state, clock=clock,
                                        rng=random.Random(1), backoff_max=0.2,
                                        ssl_context=lambda: tls.client_context(boot, ca.roots_pem, alpn=(ALPN,)))
            task = asyncio.ensure_future(client.run())
            try:
                for _ in range(400):
                    if state.synced:
                        break
                    await asyncio.sleep(0.025)
                return [w.uid for w in state.workloads()]
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert asyncio.run(main()) == ["shop/web"]
    finally:
        proc.terminate()
        proc.wait(10)
    assert not os.path.exists(sock)  # stopped cleanly: socket removed

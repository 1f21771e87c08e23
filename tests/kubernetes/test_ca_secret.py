"""The mesh CA in a Secret, against the real API server: control planes starting together
end up with one root; one that loses the create race (a real 409) takes the winner's; a user's
CA Secret (cert-manager's tls layout) is loaded, not replaced; the root is published."""
from __future__ import annotations

import asyncio
import base64
import os
import tempfile

import pytest

from controlplane.ca import CertificateAuthority
from controlplane.kube.api import KubeApi
from controlplane.kube.ca_secret import (CaOrigin, CaSecretError, load_or_create_ca, publish_root,
                                         self_signed_secret)
from mesh.clock import SystemClock

from .cluster import KubeCluster

TD = "cluster.local"


def test_control_planes_starting_together_share_one_root(kube: KubeCluster, namespace: str) -> None:
    async def main() -> None:
        apis = [await KubeApi.from_kubeconfig(kube.kubeconfig) for _ in range(4)]
        try:
            results = await asyncio.gather(*(load_or_create_ca(a, namespace=namespace, trust_domain=TD,
                                                               clock=SystemClock()) for a in apis))
        finally:
            for a in apis:
                await a.close()
        roots = {ca.roots_pem for ca, _ in results}
        origins = sorted(o.value for _, o in results)
        assert len(roots) == 1, origins
        assert origins.count("created") == 1, origins
        assert set(origins) <= {"created", "loaded", "lost_race"}
        # What is stored is that root, and a restart loads it again.
        data = kube.kubectl("get", "secret", "istio-ca-secret", "-n", namespace,
                            "-o", "jsonpath={.data.ca-cert\\.pem}").stdout
        assert base64.b64decode(data) == roots.pop()
    asyncio.run(main())


def test_losing_the_create_race_takes_the_winners_root(kube: KubeCluster, namespace: str) -> None:
    clock = SystemClock()
    winner = CertificateAuthority.generate(TD, clock=clock)

    def generate_while_another_replica_creates() -> CertificateAuthority:
        # Between our GET (404) and our CREATE, another replica creates the Secret.
        import json
        kube.kubectl("create", "-f", "-", input=json.dumps(self_signed_secret(winner, namespace)))
        return CertificateAuthority.generate(TD, clock=clock)

    async def main() -> None:
        api = await KubeApi.from_kubeconfig(kube.kubeconfig)
        try:
            ca, origin = await load_or_create_ca(api, namespace=namespace, trust_domain=TD, clock=clock,
                                                 generate=generate_while_another_replica_creates)
        finally:
            await api.close()
        assert origin is CaOrigin.LOST_RACE
        assert ca.roots_pem == winner.roots_pem
    asyncio.run(main())


def test_a_user_provided_ca_secret_is_loaded_and_left_alone(kube: KubeCluster, namespace: str) -> None:
    clock = SystemClock()
    users = CertificateAuthority.generate(TD, clock=clock)
    cert, key, _ = users.to_pem()
    with tempfile.TemporaryDirectory() as d:
        for name, blob in (("tls.crt", cert), ("tls.key", key)):
            with open(os.path.join(d, name), "wb") as f:
                f.write(blob)
        # What cert-manager writes for a Certificate with isCA: true (a kubernetes.io/tls Secret).
        kube.kubectl("create", "secret", "tls", "mesh-ca", "-n", namespace,
                     f"--cert={d}/tls.crt", f"--key={d}/tls.key")
    before = kube.kubectl("get", "secret", "mesh-ca", "-n", namespace, "-o", "jsonpath={.metadata.resourceVersion}").stdout

    async def main() -> None:
        api = await KubeApi.from_kubeconfig(kube.kubeconfig)
        try:
            ca, origin = await load_or_create_ca(api, namespace=namespace, trust_domain=TD, clock=clock,
                                                 from_secret="mesh-ca")
            assert origin is CaOrigin.USER and ca.roots_pem == users.roots_pem
            with pytest.raises(CaSecretError, match="Secret .*/absent \\(--ca-from-secret\\) does not exist") as e:
                await load_or_create_ca(api, namespace=namespace, trust_domain=TD, clock=clock, from_secret="absent")
            assert e.value.reason == "ca_secret_missing"
            # The root (not the key) is published for the proxies; a second publish is a no-op.
            written = await publish_root(api, namespace=namespace, roots_pem=ca.roots_pem)
            assert written is not None and written["data"]["root-cert.pem"] == ca.roots_pem.decode()
            assert await publish_root(api, namespace=namespace, roots_pem=ca.roots_pem) is None
            other = CertificateAuthority.generate(TD, clock=clock).roots_pem
            updated = await publish_root(api, namespace=namespace, roots_pem=other, current=written)
            assert updated is not None and updated["data"]["root-cert.pem"] == other.decode()
            # From a watch cache that lags (an older version, judged to need a write): its version is
            # a 409, read fresh and written again; a cache that has not seen the object yet gets a
            # 409 on create and finds it current.
            stale = {**written, "data": {"root-cert.pem": "an edit since undone"}}
            again = await publish_root(api, namespace=namespace, roots_pem=ca.roots_pem, current=stale)
            assert again is not None and again["data"]["root-cert.pem"] == ca.roots_pem.decode()
            assert await publish_root(api, namespace=namespace, roots_pem=ca.roots_pem, current=None) is None
        finally:
            await api.close()
    asyncio.run(main())
    after = kube.kubectl("get", "secret", "mesh-ca", "-n", namespace, "-o", "jsonpath={.metadata.resourceVersion}").stdout
    assert after == before
    assert kube.kubectl("get", "secret", "istio-ca-secret", "-n", namespace, check=False).returncode != 0
    cm = kube.kubectl("get", "configmap", "istio-ca-root-cert", "-n", namespace,
                      "-o", "jsonpath={.data.root-cert\\.pem}").stdout
    assert "BEGIN CERTIFICATE" in cm and "PRIVATE KEY" not in cm


def test_the_control_plane_keeps_its_root_in_the_secret_across_restarts(kube: KubeCluster, namespace: str,
                                                                        tmp_path) -> None:
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sock = str(tmp_path / "cp.sock")

    def run_once() -> str:
        proc = subprocess.Popen([sys.executable, "-m", "controlplane", "--kubernetes", "--kubeconfig",
                                 kube.kubeconfig, "--socket", sock, "--namespace", namespace],
                                cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "control plane did not listen"
                time.sleep(0.05)
        finally:
            proc.terminate()
            out = proc.communicate(timeout=10)[0]
        assert proc.returncode == 0, out[-3000:]
        return kube.kubectl("get", "configmap", "istio-ca-root-cert", "-n", namespace,
                            "-o", "jsonpath={.data.root-cert\\.pem}").stdout

    first = run_once()
    secret = kube.kubectl("get", "secret", "istio-ca-secret", "-n", namespace,
                          "-o", "jsonpath={.data.ca-cert\\.pem}").stdout
    assert base64.b64decode(secret).decode() == first
    assert run_once() == first  # the restart loaded the same root
    # A user CA Secret that is not there stops the start with the reason, exit 1.
    p = subprocess.run([sys.executable, "-m", "controlplane", "--kubernetes", "--kubeconfig", kube.kubeconfig,
                        "--socket", sock, "--namespace", namespace, "--ca-from-secret", "cacerts"],
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "ca_secret_missing" in p.stderr, p.stderr[-2000:]

"""A real ztunnel process reaches `python -m controlplane --kubernetes` over TCP with its pod's
projected token (no bootstrap certificate), verifies the control plane against the root the
control plane published in ConfigMap istio-ca-root-cert, gets the state, and holds
certificates for the enrolled pods on its node only."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

from controlplane.kube.api import KubeApi
from mesh.admin_http import get_unix

from .cluster import KubeCluster
from .support import poll, pod_json, request_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dump(run_dir: str) -> dict | None:
    try:
        status, body = asyncio.run(get_unix(os.path.join(run_dir, "admin.sock"), "/config_dump"))
    except OSError:
        return None
    return json.loads(body) if status == 200 else None


def test_ztunnel_subscribes_over_tcp_with_its_token(mesh_crds: KubeCluster, namespace: str, tmp_path) -> None:
    kube, ns = mesh_crds, namespace
    node_a, node_b = f"{ns}-a", f"{ns}-b"
    for n in (node_a, node_b):
        kube.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}))
    kube.kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
    for sa in ("ztunnel", "web", "db"):
        kube.kubectl("create", "serviceaccount", sa, "-n", ns)
    for name, sa, node, ip in (("zt-a", "ztunnel", node_a, None), ("web-1", "web", node_a, "10.244.9.2"),
                               ("db-1", "db", node_b, "10.244.9.3")):
        kube.kubectl("create", "-f", "-", input=pod_json(name, ns, sa, node, app=name))
        if ip:
            kube.kubectl("patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"podIP": ip}}))
    port = _free_port()
    # The mesh namespace is the test's: the CA Secret, the root ConfigMap and the node agent's
    # ServiceAccount (ns/ztunnel) all live there.
    cp = subprocess.Popen([sys.executable, "-m", "controlplane", "--kubernetes", "--kubeconfig", kube.kubeconfig,
                           "--listen", f"127.0.0.1:{port}", "--namespace", ns],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    zt = None
    try:
        root = poll(lambda: kube.kubectl("get", "configmap", "istio-ca-root-cert", "-n", ns, "-o",
                                         "jsonpath={.data.root-cert\\.pem}", check=False).stdout
                    or (cp.poll() is not None and AssertionError(cp.stdout.read())), 60, "root published")
        assert isinstance(root, str) and "BEGIN CERTIFICATE" in root
        (tmp_path / "root-cert.pem").write_text(root)

        async def token() -> str:
            api = await KubeApi.from_kubeconfig(kube.kubeconfig)
            try:
                return await request_token(api, ns, "ztunnel", pod="zt-a")
            finally:
                await api.close()
        (tmp_path / "istio-token").write_text(asyncio.run(token()))
        run_dir = str(tmp_path / "zt")
        os.makedirs(run_dir)
        zt = subprocess.Popen([sys.executable, "-m", "ztunnel", "--node", node_a, "--run-dir", run_dir,
                               "--control-plane", f"127.0.0.1:{port}", "--no-tcp-admin",
                               "--ca-token", str(tmp_path / "istio-token"), "--ca-root", str(tmp_path / "root-cert.pem")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def valid_certs() -> list[str] | None:
            assert zt.poll() is None, zt.stdout.read()
            d = _dump(run_dir)
            if not d or not d["synced"]:
                return None
            return [c["identity"] for c in d["certificates"] if c["state"] == "valid"] or None
        certs = poll(valid_certs, 30, "ztunnel holds certificates")
        assert certs == [f"spiffe://cluster.local/ns/{ns}/sa/web"]  # db runs on node B
        d = _dump(run_dir)
        assert d is not None and d["connected"] and d["client"]["snapshots"] >= 1
        assert {w["uid"] for w in d["workloads"] if w["namespace"] == ns} >= {f"{ns}/web-1", f"{ns}/db-1"}
    finally:
        for p in (zt, cp):
            if p is not None and p.poll() is None:
                p.terminate()
        outs = [p.communicate(timeout=15)[0] if p is not None else "" for p in (zt, cp)]
        for n in (node_a, node_b):
            kube.kubectl("delete", "node", n, "--wait=false", check=False)
    assert cp.returncode == 0, outs[1][-3000:]
    assert zt is not None and zt.returncode in (0, -15), outs[0][-3000:]

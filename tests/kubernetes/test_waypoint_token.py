"""`python -m controlplane --kubernetes` deploys a Gateway made with kubectl (its Deployment,
Service, status), and a real waypoint process with that Gateway's ServiceAccount token (no
bootstrap certificate) subscribes over TCP, gets its certificate and reports ready on its
status port, which serves readiness and nothing else."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from controlplane.kube.api import KubeApi

from .cluster import KubeCluster
from .support import poll, request_token
from .test_waypoint_controller import GATEWAY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_the_control_plane_deploys_a_gateway_and_its_waypoint_runs_with_its_token(mesh_crds: KubeCluster,
                                                                                  namespace: str, tmp_path) -> None:
    kube, ns = mesh_crds, namespace
    port, status_port, hbone_port = _free_port(), _free_port(), _free_port()
    cp = subprocess.Popen([sys.executable, "-m", "controlplane", "--kubernetes", "--kubeconfig", kube.kubeconfig,
                           "--listen", f"127.0.0.1:{port}", "--namespace", ns, "--waypoint-image", "mesh:t"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wp = None
    try:
        root = poll(lambda: kube.kubectl("get", "configmap", "istio-ca-root-cert", "-n", ns, "-o",
                                         "jsonpath={.data.root-cert\\.pem}", check=False).stdout
                    or (cp.poll() is not None and AssertionError(cp.stdout.read())), 60, "root published")
        (tmp_path / "root-cert.pem").write_text(root)
        kube.apply(GATEWAY % {"name": "waypoint", "ns": ns})

        def programmed() -> dict | None:
            gw = json.loads(kube.kubectl("get", "gateway", "waypoint", "-n", ns, "-o", "json").stdout)
            conds = {c["type"]: c["status"] for c in (gw.get("status") or {}).get("conditions") or ()}
            return gw if conds.get("Programmed") == "True" else None
        try:
            gw = poll(programmed, 30, "Gateway Programmed by the control plane")
        except AssertionError:
            cp.terminate()
            raise AssertionError("Gateway not Programmed within 30 s: "
                                 + kube.kubectl("get", "gateway,svc,deploy,sa", "-n", ns, "-o", "yaml").stdout[-3000:]
                                 + "\n--- control plane ---\n" + cp.communicate(timeout=15)[0][-4000:]) from None
        dep = json.loads(kube.kubectl("get", "deployment", "waypoint", "-n", ns, "-o", "json").stdout)
        [c] = dep["spec"]["template"]["spec"]["containers"]
        assert c["image"] == "mesh:t"
        assert c["command"][c["command"].index("--control-plane") + 1] == f"istiod.{ns}.svc:15012"

        async def token() -> str:
            api = await KubeApi.from_kubeconfig(kube.kubeconfig)
            try:
                return await request_token(api, ns, "waypoint")  # the ServiceAccount the controller made
            finally:
                await api.close()
        (tmp_path / "istio-token").write_text(asyncio.run(token()))
        run_dir = str(tmp_path / "wp")
        os.makedirs(run_dir)
        # The container's command, with loopback addresses: this process runs on the host.
        wp = subprocess.Popen([sys.executable, "-m", "waypoint", "--gateway", f"{ns}/waypoint", "--run-dir", run_dir,
                               "--control-plane", f"127.0.0.1:{port}", "--ca-token", str(tmp_path / "istio-token"),
                               "--ca-root", str(tmp_path / "root-cert.pem"),
                               "--hbone-address", f"127.0.0.1:{hbone_port}",
                               "--status-address", f"127.0.0.1:{status_port}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def ready() -> bool:
            assert wp.poll() is None, wp.stdout.read()
            return _http(status_port, "/healthz/ready") == 200
        poll(ready, 30, "waypoint ready (synced, certificate for its identity, HBONE listening)")
        assert _http(status_port, "/config_dump") == 404  # the status port is readiness only
        with socket.create_connection(("127.0.0.1", hbone_port), timeout=2):
            pass
        assert gw["status"]["addresses"][0]["type"] == "IPAddress"
    finally:
        for p in (wp, cp):
            if p is not None and p.poll() is None:
                p.terminate()
        outs = [p.communicate(timeout=15)[0] if p is not None else "" for p in (wp, cp)]
    assert cp.returncode == 0, outs[1][-3000:]
    assert wp is not None and wp.returncode in (0, -15), outs[0][-3000:]

"""`ambient check` against the real API server: it reports the first thing missing as the mesh
is brought up step by step, with exit code 1 until healthy; the control plane's /ready probe
answers 503 until every kind is listed and 200 after."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

from .cluster import KubeCluster

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(kube: KubeCluster, kubeconfig: str | None = None) -> tuple[int, list[str]]:
    p = subprocess.run([os.path.join(BIN, "ambient"), "check", f"--kubeconfig={kubeconfig or kube.kubeconfig}"],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.splitlines()


def _first_failure(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("×"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_check_walks_the_install_and_the_ready_probe_follows_the_sync(no_mesh_namespace: KubeCluster,
                                                                      tmp_path) -> None:
    kube = no_mesh_namespace
    # No cluster at all: the first check fails, the rest are skipped, exit 1.
    bogus = tmp_path / "bogus.kubeconfig"
    bogus.write_text(open(kube.kubeconfig).read().replace(kube.server, "https://127.0.0.1:1"))
    code, lines = _check(kube, str(bogus))
    assert code == 1 and _first_failure(lines).startswith("× API server: cannot reach the API server")
    assert lines[-1] == "7 check(s) failed" and sum(line.startswith("- ") for line in lines) == 6

    code, lines = _check(kube)
    assert code == 1 and lines[:2] == ["√ API server: reachable", "√ CRDs: 8 mesh CRDs established"]
    assert _first_failure(lines) == "× mesh namespace: namespace istio-system does not exist"

    manifest = subprocess.run([os.path.join(BIN, "ambient"), "install"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    kube.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}))
    kube.kubectl("apply", "-f", "-", input=manifest)
    code, lines = _check(kube)
    assert code == 1 and _first_failure(lines).startswith("× CA Secret: Secret istio-system/istio-ca-secret does not exist")

    # The control plane, run here as the Deployment would run it (no kubelet runs its pod yet):
    # it creates the CA Secret, publishes the root, and its /ready turns 200 once synced.
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "--kubernetes", "--kubeconfig", kube.kubeconfig,
                             "--listen", "127.0.0.1:0", "--health", f"127.0.0.1:{port}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        statuses = []
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                status, body = _get(f"http://127.0.0.1:{port}/ready")
                statuses.append(status)
                if status == 200:
                    break
                assert status == 503 and not body["ready"]
                assert {c["name"] for c in body["checks"] if not c["ok"]} <= {"synced", "listening"}
            except (ConnectionError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert body["ready"] and all(c["ok"] for c in body["checks"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        code, lines = _check(kube)
        assert "√ CA Secret: istio-system/istio-ca-secret" in lines
        assert "√ root certificate published: ConfigMap istio-ca-root-cert" in lines
        # The Deployment has no running pod without a node agent: that is what check reports.
        assert code == 1 and _first_failure(lines).startswith("× control plane: 0/1 replicas available")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
        kube.kubectl("delete", "-f", "-", "--wait=false", input=subprocess.run(
            [os.path.join(BIN, "ambient"), "uninstall"], capture_output=True, text=True, timeout=60).stdout, check=False)
        kube.kubectl("delete", "secret", "istio-ca-secret", "-n", "istio-system", "--ignore-not-found", check=False)
    assert proc.returncode == 0, out[-3000:]

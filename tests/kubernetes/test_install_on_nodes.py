"""`ambient install | kubectl apply -f -` on a cluster with node agents (root: run under
`flock /tmp/netns.lock`): the control plane Deployment's pod runs on a simulated node with
in-cluster config, creates the CA Secret and publishes the root, passes its readiness probe,
and `ambient check` follows: everything up to the control plane passes. The ztunnel
DaemonSet's pods cannot run on these nodes yet (hostPath and projected volumes), which is
what check reports last."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .cluster import KubeCluster
from .nodes import Nodes
from .support import poll

BIN = os.path.dirname(sys.executable)


def _ambient(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(BIN, "ambient"), *args], capture_output=True, text=True, timeout=120)


def test_install_brings_up_the_control_plane_on_simulated_nodes(no_mesh_namespace: KubeCluster, nodes: Nodes) -> None:
    kube = no_mesh_namespace
    tag = f"i{os.getpid() % 100000}"
    nodes.start(f"{tag}-a", f"{tag}-b")
    manifest = _ambient("install").stdout
    kube.kubectl("apply", "-f", "-", input=manifest)
    try:
        def istiod() -> dict | None:
            pods = json.loads(kube.kubectl("get", "pods", "-n", "istio-system", "-l", "app=istiod", "-o", "json").stdout)
            ready = [p for p in pods["items"] if {c["type"]: c["status"] for c in p["status"].get("conditions", ())}
                     .get("Ready") == "True"]
            return ready[0] if ready else None
        pod = poll(istiod, 90, "istiod pod Ready (its /ready probe passes)")
        node = pod["spec"]["nodeName"]
        log = os.path.join(nodes.state_dir, node, "logs", f"istio-system_{pod['metadata']['name']}_discovery.log")
        text = open(log).read()
        assert "mesh CA: created (istio-ca-secret)" in text, text[-3000:]
        assert kube.kubectl("get", "secret", "istio-ca-secret", "-n", "istio-system", "-o", "name").stdout.strip()

        def checked() -> subprocess.CompletedProcess[str] | None:
            p = _ambient("check", f"--kubeconfig={kube.kubeconfig}")
            return p if "√ control plane: 1/1 replicas available (ready)" in p.stdout else None
        p = poll(checked, 60, "ambient check sees the control plane available")
        lines = p.stdout.splitlines()
        assert p.returncode == 1
        assert [line for line in lines if line.startswith("×")] == ["× ztunnel: ready on 0/2 nodes: "
                                                                   "kubectl -n istio-system get pods -l app=ztunnel -o wide"]
        # Why: the node agents refuse what they cannot provide, and say so in the pod's status.
        zt = json.loads(kube.kubectl("get", "pods", "-n", "istio-system", "-l", "app=ztunnel", "-o", "json").stdout)
        waiting = [p["status"]["containerStatuses"][0]["state"].get("waiting", {}) for p in zt["items"]
                   if p["status"].get("containerStatuses")]
        assert waiting and all(w.get("reason") == "CreateContainerConfigError" for w in waiting), waiting
    finally:
        kube.kubectl("delete", "-f", "-", "--wait=false", input=_ambient("uninstall").stdout, check=False)
        kube.kubectl("delete", "secret", "istio-ca-secret", "-n", "istio-system", "--ignore-not-found", check=False)

"""The fixture's cluster is a real Kubernetes: its own controllers and scheduler run."""
from __future__ import annotations

import json
import time

from .cluster import KubeCluster

_NODE = """{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "%s"},
 "status": {"conditions": [{"type": "Ready", "status": "True"}],
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"}}}"""


def _wait(pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_controller_manager_creates_default_service_account(kube: KubeCluster, namespace: str) -> None:
    out = _wait(lambda: kube.kubectl("get", "sa", "default", "-n", namespace, "-o", "name",
                                     check=False).stdout.strip())
    assert out == "serviceaccount/default"


def test_deployment_pods_are_created_and_scheduled_onto_a_node(kube: KubeCluster, namespace: str) -> None:
    node = f"{namespace}-n1"
    kube.kubectl("create", "-f", "-", input=_NODE % node)
    # The node's status (Ready, allocatable) goes through the status subresource, as a kubelet does.
    kube.kubectl("replace", "--subresource=status", "-f", "-", input=_NODE % node)
    # Admission taints a new node not-ready; the node lifecycle controller (off: there are no
    # kubelet heartbeats) would lift it once Ready, so the simulated node lifts it itself.
    kube.kubectl("taint", "node", node, "node.kubernetes.io/not-ready:NoSchedule-")
    kube.kubectl("create", "deployment", "web", "--image=none", "--replicas=2", "-n", namespace)

    def scheduled():
        pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        nodes = [p["spec"].get("nodeName") for p in pods]
        return nodes if len(nodes) == 2 and all(nodes) else None

    try:
        assert _wait(scheduled) == [node, node]
    finally:
        kube.kubectl("delete", "node", node, check=False)

"""`ambient waypoint apply|list|delete` against the real API server, with the waypoint
controller running: the Gateway istioctl would write, namespace enrollment, --wait until
Programmed, conflicts with someone else's Gateway, and deletion."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from .cluster import KubeCluster
from .test_waypoint_controller import _controller, _get

BIN = os.path.dirname(sys.executable)


def _ambient(kube: KubeCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(BIN, "ambient"), "waypoint", *args, "--kubeconfig", kube.kubeconfig],
                          capture_output=True, text=True, timeout=90)


def test_waypoint_apply_list_delete(mesh_crds: KubeCluster, namespace: str) -> None:
    kube, ns = mesh_crds, namespace

    async def main() -> None:
        async with _controller(kube):
            run = lambda *a: asyncio.to_thread(_ambient, kube, *a)  # noqa: E731
            p = await run("apply", "-n", ns, "--for", "all", "--enroll-namespace", "--wait", "--timeout", "20")
            assert p.returncode == 0, p.stderr
            gw = _get(kube, "gateway", "waypoint", "-n", ns)
            assert gw["spec"] == {"gatewayClassName": "istio-waypoint",
                                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
            assert gw["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}
            ip = _get(kube, "service", "waypoint", "-n", ns)["spec"]["clusterIP"]
            assert p.stdout.splitlines() == [f"waypoint {ns}/waypoint applied",
                                             f'namespace {ns} labeled with "istio.io/use-waypoint: waypoint"',
                                             f"waypoint {ns}/waypoint is programmed at {ip}"]
            assert _get(kube, "namespace", ns)["metadata"]["labels"]["istio.io/use-waypoint"] == "waypoint"
            assert (await run("apply", "-n", ns, "--for", "all")).returncode == 0  # idempotent

            # Someone else's Gateway of that name: a conflict, unless --overwrite.
            kube.apply(json.dumps({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                   "metadata": {"name": "taken", "namespace": ns},
                                   "spec": {"gatewayClassName": "istio", "listeners": [
                                       {"name": "http", "port": 80, "protocol": "HTTP"}]}}))
            p = await run("apply", "-n", ns, "--name", "taken")
            assert p.returncode == 1 and "--overwrite" in p.stderr, p.stderr
            assert _get(kube, "gateway", "taken", "-n", ns)["spec"]["gatewayClassName"] == "istio"
            p = await run("apply", "-n", ns, "--name", "taken", "--overwrite", "--for", "workload")
            assert p.returncode == 0, p.stderr
            assert _get(kube, "gateway", "taken", "-n", ns)["spec"]["gatewayClassName"] == "istio-waypoint"

            p = await run("list", "-n", ns)
            rows = [line.split() for line in p.stdout.splitlines()]
            assert rows[0] == ["NAME", "TRAFFIC-TYPE", "PROGRAMMED", "ADDRESS"]
            assert ["waypoint", "all", "True", ip] in rows and len(rows) == 3
            rows = [line.split() for line in (await run("list", "-A")).stdout.splitlines()]
            assert rows[0][0] == "NAMESPACE" and [ns, "waypoint", "all", "True", ip] in rows

            p = await run("delete", "-n", ns)
            assert (p.returncode, p.stdout.strip()) == (0, f"waypoint {ns}/waypoint deleted")
            p = await run("delete", "-n", ns, "waypoint")
            assert p.returncode == 1 and "not found" in p.stderr
            assert (await run("delete", "-n", ns, "--all")).stdout.strip() == f"waypoint {ns}/taken deleted"
            assert "No waypoints found" in (await run("list", "-n", ns)).stdout

    asyncio.run(main())


def test_the_waypoint_objects_validate_strictly_offline(tmp_path) -> None:
    """What the controller applies passes kubernetes-validate --strict (the real server accepts
    it too: the controller tests apply it)."""
    import yaml

    from controlplane.kube.waypoint_objects import WaypointOptions, desired_objects, gateway_info
    from kubemode.waypoint_cli import waypoint_gateway
    gw = waypoint_gateway("app", "waypoint", "service")
    gw["metadata"]["uid"] = "0b6c2f3e-1111-4222-8333-444455556666"
    docs = [gw, *desired_objects(gateway_info(gw), WaypointOptions())]
    f = tmp_path / "waypoint.yaml"
    f.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "Gateway"]))
    p = subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", str(f)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("passed for resource") == 3

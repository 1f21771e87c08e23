"""End to end (root): pods created and deleted on a node are invisible to the other pods there.

A client pod on n1 sends steady short connections to a Service VIP (endpoints on n1 and n2)
while pods on n1 are created and deleted in a loop. Found by a user: right after `ambient
delete` of one pod, another pod on the node lost every request through its gateway for 30 s
or more. The cause was the node bridge cni0 adopting its lowest port's MAC (a Linux bridge
whose MAC was never set does), so the gateway's MAC changed whenever the pod whose veth had
the lowest MAC came or went, and every pod's ARP entry for the gateway pointed nowhere. The
test forces that worst case (a new pod's veth gets the lowest MAC a random one can have) in
every other cycle, so it does not depend on luck.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from localcluster.paths import ClusterPaths

from .cluster_helper import ROOT, LocalCluster, pod_yaml, wait_for

NAME = f"ch{os.getpid() % 100000}"
PATHS = ClusterPaths(NAME)
CYCLES = 20
LOWEST_MAC = "02:00:00:00:00:00"  # the lowest locally administered unicast MAC


def cluster_yaml():
    return textwrap.dedent("""
        apiVersion: v1
        kind: Node
        metadata: {name: n1}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n2}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: plain}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: client, namespace: mesh}
        ---
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: server, namespace: mesh}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: echo, namespace: mesh}
        spec:
          selector: {app: echo}
          ports: [{port: 80, targetPort: 8080}]
        """) + pod_yaml("c1", "mesh", "n1", "client", "client") + pod_yaml(
        "e1", "mesh", "n2", "echo", "server") + pod_yaml("e2", "mesh", "n1", "echo", "server")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("churn")
    c = LocalCluster(NAME, d)
    if not os.path.exists(d / "steady.py"):
        os.symlink(os.path.join(ROOT, "deploy", "local", "apps", "steady.py"), d / "steady.py")
    c.ambient("down", check=False)
    try:
        c.ambient("up", c.write("cluster.yaml", cluster_yaml()))
        wait_for(lambda: len(c.enrolled("n1")) == 2 and len(c.enrolled("n2")) == 1, timeout=20)
        yield c
    finally:
        c.destroy()


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _veths(node_ns):
    return {line.split(":")[1].strip().split("@")[0] for line in _ip("-n", node_ns, "-o", "link", "show", "type", "veth")
            .splitlines() if line.strip()}


def _cni0_mac(node_ns):
    return json.loads(_ip("-n", node_ns, "-j", "link", "show", "cni0"))[0]["address"]


def test_pod_churn_on_a_node_loses_no_request_of_another_pod(cluster):
    c = cluster
    node_ns = f"{PATHS.prefix}-n-n1"
    vip = next(s["cluster_ip"] for s in c.status()["services"] if s["name"] == "echo")
    gw_mac = _cni0_mac(node_ns)
    stop = c.dir / "stop-steady"
    steady = subprocess.Popen(
        [sys.executable, "-m", "localcluster.cli", "-c", NAME, "exec", "-n", "mesh", "c1", "--", "python3",
         "steady.py", vip, "80", "--timeout", "5", "--interval", "0.02", "--duration", "240",
         "--stop-file", str(stop)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # a baseline of requests before the first pod comes
        macs = set()
        for i in range(CYCLES):
            ns, sa = ("mesh", "client") if i % 3 else ("plain", "default")  # meshed and plain pods
            y = pod_yaml(f"x{i}", ns, "n1", "churn", sa)
            before = _veths(node_ns)
            c.apply(y, name=f"x{i}.yaml")
            if i % 2 == 0:
                (new,) = _veths(node_ns) - before
                _ip("-n", node_ns, "link", "set", new, "address", LOWEST_MAC)
            macs.add(_cni0_mac(node_ns))
            c.delete(y, name=f"x{i}.yaml")
            macs.add(_cni0_mac(node_ns))
        time.sleep(3.0)  # ARP entries made stale by the churn would fail requests from here on
        stop.touch()
        out, _ = steady.communicate(timeout=30)
    finally:
        if steady.poll() is None:
            steady.kill()
            steady.wait()
    tally = json.loads(out.strip().splitlines()[-1])
    assert tally["failed"] == 0, out
    assert tally["ok"] > 100, out
    assert macs == {gw_mac}, f"the gateway's MAC changed with the churn: {gw_mac} -> {macs}"
    # The client pod's ARP entry for its gateway is the bridge's MAC.
    neigh = c.ambient("exec", "-n", "mesh", "c1", "--", "ip", "-j", "neigh", "show", "10.244.0.1").stdout
    assert [n["lladdr"] for n in json.loads(neigh)] == [gw_mac], neigh

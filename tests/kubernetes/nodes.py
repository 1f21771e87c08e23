"""Simulated nodes for the kubernetes tier: node agents (python -m localcluster.kubelet) as
processes, each registering a Node and running the Pods bound to it in netns + cgroup.

Root, and netns-creating: tests that use this run under `flock /tmp/netns.lock`. Everything
carries one prefix per test session, so `stop()` (and a crash's next run) removes it all.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from localcluster.addressing import AddressPlan
from localcluster.network import ClusterNetwork

from .cluster import KubeCluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = f"akt{os.getpid() % 100000}"
_index = itertools.count(1)  # node slots are cluster-wide: the API server is shared by the session


@dataclass
class Nodes:
    kube: KubeCluster
    state_dir: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    plan: AddressPlan = field(default_factory=AddressPlan)
    bpffs_leftovers: list[str] = field(default_factory=list)

    @property
    def net(self) -> ClusterNetwork:
        return ClusterNetwork(PREFIX)

    def start(self, *names: str, timeout: float = 30) -> "Nodes":
        self.net.ensure_fabric()  # once, before agents race to create it
        for name in names:
            i = next(_index)
            self.index[name] = i
            log = open(os.path.join(self.state_dir, f"kubelet-{name}.log"), "ab")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "localcluster.kubelet", "--kubeconfig", self.kube.kubeconfig, "--node", name,
                 "--node-index", str(i), "--prefix", PREFIX, "--state-dir", os.path.join(self.state_dir, name),
                 "--deregister"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        deadline = time.monotonic() + timeout
        for name in names:
            while not self.ready(name):
                p = self.procs[name]
                assert p.poll() is None, f"node agent {name} exited {p.returncode}:\n{self.log(name)}"
                assert time.monotonic() < deadline, f"node {name} not Ready:\n{self.log(name)}"
                time.sleep(0.1)
        return self

    def ready(self, name: str) -> bool:
        out = self.kube.kubectl("get", "node", name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        node = json.loads(out.stdout)
        conds = {c["type"]: c["status"] for c in (node.get("status") or {}).get("conditions") or ()}
        return conds.get("Ready") == "True" and not (node.get("spec") or {}).get("taints")

    def pod_cidr(self, name: str) -> str:
        return str(self.plan.pod_subnet(self.index[name]))

    def log(self, name: str, tail: int = 4000) -> str:
        try:
            with open(os.path.join(self.state_dir, f"kubelet-{name}.log"), "rb") as f:
                return f.read().decode(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for name, p in self.procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        self.net.teardown()  # whatever an agent that failed left behind
        self.bpffs_leftovers = remove_bpffs_leftovers(f"/sys/fs/bpf/{PREFIX}")


def remove_bpffs_leftovers(root: str) -> list[str]:
    """Remove the nodes' bpffs directories (`<root>/<node>/<pin dir>`) an agent that failed
    left; returns the nodes that had left some (the agents' own cleanup is what tests check)."""
    from ebpf.capture import teardown_pins
    if not os.path.isdir(root):
        return []
    left = sorted(os.listdir(root))
    for node in left:
        for pins in os.listdir(os.path.join(root, node)):
            teardown_pins(os.path.join(root, node, pins))
        os.rmdir(os.path.join(root, node))
    os.rmdir(root)
    return left

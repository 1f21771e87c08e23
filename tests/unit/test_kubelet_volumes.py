"""The node agent's volume decisions: what each volume is, mounts, where a hostPath lands on a
simulated node, and `$(VAR)` expansion (pure)."""
from __future__ import annotations

import pytest

from kubemode.manifests import manifests
from localcluster.kubelet_pods import plan_pod
from localcluster.kubelet_volumes import (ConfigMapFiles, EmptyDirVolume, FilesVolume, HostPathVolume, Mount, TokenFile, expand_argv,
                                          node_host_path, plan_volumes)


@pytest.mark.parametrize("path, where", [
    ("/var/run/ambient", "/state/n1/host/var/run/ambient"),     # the node's own disk
    ("/etc/cni/net.d", "/state/n1/host/etc/cni/net.d"),
    ("/sys/fs/bpf", "/sys/fs/bpf/p/n1"),                         # the node's part of the real bpffs
    ("/sys/fs/bpf/ambient", "/sys/fs/bpf/p/n1/ambient"),
    ("/sys/fs/cgroup", "/sys/fs/cgroup"),                        # one kernel: shared as it is
    ("/proc", "/proc"), ("/var/run/netns", "/var/run/netns"), ("/sys/fs/bpfx", "/sys/fs/bpfx"),
    ("/var/run/../run/netns", "/var/run/netns"),
])
def test_host_paths_of_a_simulated_node(path, where):
    assert node_host_path(path, node_root="/state/n1/host", bpf_root="/sys/fs/bpf/p/n1") == where


def test_the_ztunnel_daemonset_pod_is_planned_completely():
    """Everything ztunnel's DaemonSet pod asks for is something this node provides."""
    ds = next(o for o in manifests() if o["kind"] == "DaemonSet")
    pod = {"metadata": {"name": "ztunnel-x", "namespace": "istio-system", "uid": "u"},
           "spec": {**ds["spec"]["template"]["spec"], "nodeName": "n1"}}
    p = plan_pod(pod)
    [c] = p.containers
    assert c.problem is None and c.privileged and p.host_pid
    assert p.volumes["bpffs"] == HostPathVolume("bpffs", "/sys/fs/bpf", "Directory")
    assert p.volumes["istio-token"] == FilesVolume("istio-token", tokens=(TokenFile("istio-token", "istio-ca", 43200),))
    assert p.volumes["istio-root"] == FilesVolume("istio-root", config_maps=(ConfigMapFiles("istio-ca-root-cert", ()),))
    assert Mount("run", "/var/run/ambient", False) in c.mounts and Mount("cgroup", "/sys/fs/cgroup", True) in c.mounts
    env = {"NODE_NAME": "n1"}
    assert expand_argv(c.argv, env)[expand_argv(c.argv, env).index("--node") + 1] == "n1"


@pytest.mark.parametrize("vol, problem", [
    ({"name": "e", "emptyDir": {"medium": "HugePages"}}, "emptyDir medium 'HugePages'"),
    ({"name": "g", "gitRepo": {}}, "gitRepo volumes are not supported"),
    ({"name": "h", "hostPath": {"path": "rel"}}, "must be absolute"),
    ({"name": "h", "hostPath": {"path": "/x", "type": "Socket"}}, "hostPath type 'Socket'"),
    ({"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "../t"}}]}}, "without '..'"),
    ({"name": "p", "projected": {"sources": [{"downwardAPI": {}}]}}, "projected sources other than"),
    ({"name": "c", "configMap": {"name": "m", "items": [{"key": "k", "path": "/abs"}]}}, "item paths must be relative"),
])
def test_volumes_this_node_cannot_provide_are_named(vol, problem):
    ok, bad = plan_volumes([vol])
    assert not ok and problem in bad[vol["name"]]


@pytest.mark.parametrize("vol, planned", [
    ({"name": "run", "emptyDir": {}}, EmptyDirVolume("run")),
    ({"name": "run", "emptyDir": None}, EmptyDirVolume("run")),
    ({"name": "m", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}, EmptyDirVolume("m", memory=True)),
])
def test_empty_dirs_are_provided(vol, planned):
    assert plan_volumes([vol]) == ({vol["name"]: planned}, {})


def test_the_waypoint_deployment_pod_is_planned_completely():
    """Everything the waypoint Deployment's pod asks for (its run dir an emptyDir) is provided."""
    from controlplane.kube.waypoint_objects import WaypointOptions, desired_objects, gateway_info
    gw = gateway_info({"metadata": {"namespace": "ns", "name": "waypoint", "uid": "g"},
                       "spec": {"gatewayClassName": "istio-waypoint",
                                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
    dep = next(o for o in desired_objects(gw, WaypointOptions()) if o["kind"] == "Deployment")
    p = plan_pod({"metadata": {"name": "waypoint-x", "namespace": "ns", "uid": "u"},
                  "spec": {**dep["spec"]["template"]["spec"], "nodeName": "n1"}})
    [c] = p.containers
    assert c.problem is None and p.volumes["run"] == EmptyDirVolume("run")
    assert Mount("run", "/var/run/ambient", False) in c.mounts


@pytest.mark.parametrize("arg, out", [
    ("$(NODE_NAME)", "n1"), ("--node=$(NODE_NAME).x", "--node=n1.x"), ("$(UNSET)", "$(UNSET)"),
    ("$$(NODE_NAME)", "$(NODE_NAME)"), ("a$$b", "a$b"), ("$(NODE_NAME", "$(NODE_NAME"),
])
def test_command_expansion_is_kubernetes(arg, out):
    assert expand_argv([arg], {"NODE_NAME": "n1"}) == [out]

"""Kubernetes mode's pure parts: the projection of API objects onto what the config edge reads,
what a relist passes on, and the watch backoff."""
from __future__ import annotations

import pytest

from controlplane.kube.kinds import WATCHED, project
from controlplane.kube.reflector import BACKOFF_MAX, backoff_delay, relist_changes
from mesh.config import convert
from mesh.model import ResourceKey

KIND = {k.kind: k for k in WATCHED}


def _sa(name: str, rv: str) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


@pytest.mark.parametrize("known, listed, upserted, deleted", [
    ({}, [("a", "1"), ("b", "2")], ["a", "b"], []),                  # first list: everything
    ({"a": "1", "b": "2"}, [("a", "1"), ("b", "2")], [], []),        # nothing changed: nothing passed on
    ({"a": "1", "b": "2"}, [("a", "5")], ["a"], ["b"]),              # a changed, b gone
    ({"a": "1"}, [("a", "1"), ("c", "9")], ["c"], []),               # c new
    ({"a": "1", "b": "2"}, [], [], ["a", "b"]),                      # all gone (CRD removed)
])
def test_relist_passes_on_only_what_changed(known, listed, upserted, deleted):
    kind = KIND["ServiceAccount"]
    ups, dels = relist_changes(kind, {ResourceKey("ServiceAccount", "ns", k): v for k, v in known.items()},
                               [_sa(n, rv) for n, rv in listed])
    assert [u.key.name for u in ups] == upserted
    assert [d.key.name for d in dels] == deleted


@pytest.mark.parametrize("failures, jitter, expected", [
    (1, 0.0, 0.1), (1, 0.999999, 0.2), (2, 0.0, 0.2), (4, 0.0, 0.8),
    (30, 0.0, BACKOFF_MAX / 2), (30, 0.999999, BACKOFF_MAX),
])
def test_backoff_doubles_with_jitter_up_to_a_cap(failures, jitter, expected):
    assert backoff_delay(failures, jitter) == pytest.approx(expected, rel=1e-5)


def _pod(**status) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}, "uid": "u",
                         "resourceVersion": "7", "managedFields": [{"manager": "kubectl"}],
                         "ownerReferences": [{"kind": "ReplicaSet", "name": "web"}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "restartPolicy": "Always",
                     "containers": [{"name": "app", "image": "nginx",
                                     "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                     "ports": [{"containerPort": 53, "protocol": "UDP"}]}]},
            "status": status}


@pytest.mark.parametrize("status, ip", [
    ({"phase": "Running", "podIP": "10.244.0.5"}, "10.244.0.5"),
    ({"phase": "Pending"}, None),
    ({"phase": "Succeeded", "podIP": "10.244.0.5"}, None),  # terminated: its IP may be reused
    ({"phase": "Failed", "podIP": "10.244.0.5"}, None),
])
def test_a_real_pod_converts_with_ip_and_node_from_status(status, ip):
    pod = convert(project(KIND["Pod"], _pod(**status)))  # valueFrom and UDP ports are not the mesh's
    assert (pod.node_name, pod.service_account, pod.labels["app"]) == ("n1", "web", "web")
    assert (str(pod.pod_ip) if pod.pod_ip else None) == ip


def _svc(ports, cluster_ip="10.96.0.10") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "kube-system"},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"k8s-app": "dns"},
                     "sessionAffinity": "None", "ports": ports}}


def test_service_keeps_tcp_ports_and_a_headless_one_has_no_vip():
    tcp = {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
    udp = {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}
    svc = convert(project(KIND["Service"], _svc([udp, tcp])))
    assert [(p.name, p.port) for p in svc.ports] == [("dns-tcp", 53)] and str(svc.cluster_ip) == "10.96.0.10"
    assert convert(project(KIND["Service"], _svc([tcp], cluster_ip="None"))).cluster_ip is None
    assert project(KIND["Service"], _svc([udp])) is None  # UDP only: not a mesh Service


def test_a_node_keeps_only_its_pod_cidr():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.2"}]}}
    assert str(convert(project(KIND["Node"], node)).pod_cidr) == "10.244.1.0/24"


def test_paths_of_core_and_custom_kinds():
    assert KIND["Pod"].path == "/api/v1/pods"
    assert KIND["AuthorizationPolicy"].path == "/apis/security.istio.io/v1/authorizationpolicies"
    assert KIND["Namespace"].namespaced is False and KIND["Gateway"].namespaced is True

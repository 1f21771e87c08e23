"""Node agents against the real API server (root: run under `flock /tmp/netns.lock`): Nodes
register and become Ready; a Deployment made with kubectl is scheduled by kube-scheduler onto
them, its pods run in their own netns + cgroup with the status a kubelet writes, reach each
other across nodes, are restarted when they exit, and go away (processes, netns) when scaled
down; stopping the agents leaves nothing behind."""
from __future__ import annotations

import ipaddress
import json
import os
import socket

import pytest

from mesh.linux import cgroup
from mesh.linux.netns import list_netns, socket_in_netns

from .cluster import KubeCluster
from .nodes import PREFIX, Nodes
from .support import poll

SERVER = ("import os, socket\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 8080)); s.listen()\n"
          "while True:\n"
          "    c, _ = s.accept(); c.sendall((os.environ['ME'] + ' ' + os.environ['MY_IP']).encode()); c.close()\n")


def _deployment(ns: str, replicas: int) -> str:
    return json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo", "namespace": ns},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "echo"}},
                 "template": {"metadata": {"labels": {"app": "echo"}}, "spec": {
                     "terminationGracePeriodSeconds": 2,
                     # One per node, so the test sees both nodes at work.
                     "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                         {"labelSelector": {"matchLabels": {"app": "echo"}}, "topologyKey": "kubernetes.io/hostname"}]}},
                     "containers": [{"name": "echo", "image": "none", "command": ["python3", "-c", SERVER],
                                     "env": [{"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                             {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]}}}})


def _pods(kube: KubeCluster, ns: str) -> list[dict]:
    return json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", "app=echo", "-o", "json").stdout)["items"]


def _ask(netns: str, ip: str) -> str:
    s = socket_in_netns(netns)
    try:
        s.settimeout(5)
        s.connect((ip, 8080))
        return s.recv(200).decode()
    finally:
        s.close()


def _try_ask(netns: str, ip: str) -> str | None:
    try:
        return _ask(netns, ip)
    except ConnectionRefusedError:
        return None


@pytest.fixture
def nodes(kube: KubeCluster, tmp_path):
    n = Nodes(kube, str(tmp_path))
    try:
        yield n
    finally:
        n.stop()
    assert [x for x in list_netns() if x.startswith(PREFIX + "-")] == []


def test_a_deployment_runs_on_simulated_nodes(kube: KubeCluster, namespace: str, nodes: Nodes) -> None:
    ns = namespace
    a, b = f"{ns}-a", f"{ns}-b"
    nodes.start(a, b)
    kube.kubectl("apply", "-f", "-", input=_deployment(ns, 2))

    def running() -> list[dict] | None:
        pods = _pods(kube, ns)
        ok = [p for p in pods if p["status"].get("phase") == "Running"
              and {c["type"]: c["status"] for c in p["status"].get("conditions", ())}.get("Ready") == "True"]
        return ok if len(ok) == 2 else None
    pods = poll(running, 60, f"2 echo pods Running and Ready\n{nodes.log(a)}\n{nodes.log(b)}")
    by_node = {p["spec"]["nodeName"]: p for p in pods}
    assert set(by_node) == {a, b}
    for node, p in by_node.items():
        ip = p["status"]["podIP"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(nodes.pod_cidr(node))
        assert p["status"]["hostIP"] and p["status"]["containerStatuses"][0]["ready"] is True
    pa, pb = by_node[a], by_node[b]
    net = nodes.net
    # Across nodes, over the simulated fabric: pod A asks pod B, which answers with its own
    # downward-API name and IP.
    # (Ready without a readiness probe means started, as a kubelet says: the server may take a
    # moment to listen.)
    assert poll(lambda: _try_ask(net.pod_netns(pa["metadata"]["uid"]), pb["status"]["podIP"]), 20,
                "echo answers across nodes") == f"{pb['metadata']['name']} {pb['status']['podIP']}"
    # Its process is accounted to the pod's cgroup.
    rel = net.pod_cgroup_rel(pb["metadata"]["uid"])
    pids = cgroup.pids(rel, recursive=True)
    assert pids

    # A container that dies is restarted and its restartCount says so.
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

    def restarted() -> dict | None:
        p = next((x for x in _pods(kube, ns) if x["metadata"]["uid"] == pb["metadata"]["uid"]), None)
        st = p and p["status"]["containerStatuses"][0]
        return st if st and st["restartCount"] >= 1 and st["ready"] else None
    st = poll(restarted, 30, "echo container restarted")
    assert st["lastState"]["terminated"]["exitCode"] != 0
    assert poll(lambda: _try_ask(net.pod_netns(pa["metadata"]["uid"]), pb["status"]["podIP"]), 20,
                "restarted echo answers").startswith(pb["metadata"]["name"])

    # Scaled to zero: the agents stop the containers, remove the netns and finish the deletes.
    kube.kubectl("scale", "deployment", "echo", "-n", ns, "--replicas=0")
    poll(lambda: not _pods(kube, ns), 60, "pods deleted")
    for p in pods:
        assert net.pod_netns(p["metadata"]["uid"]) not in list_netns()
        assert not os.path.exists(cgroup.abspath(net.pod_cgroup_rel(p["metadata"]["uid"])))


IN_CLUSTER = ("import json, os, ssl, urllib.request\n"
              "d = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
              "tok, ns = open(d + '/token').read(), open(d + '/namespace').read()\n"
              "ctx = ssl.create_default_context(cafile=d + '/ca.crt')\n"
              "url = 'https://%s:%s/apis/authorization.k8s.io/v1/selfsubjectaccessreviews' % (\n"
              "    os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])\n"
              "body = json.dumps({'apiVersion': 'authorization.k8s.io/v1', 'kind': 'SelfSubjectAccessReview',\n"
              "    'spec': {'resourceAttributes': {'namespace': ns, 'verb': 'get', 'resource': 'pods'}}}).encode()\n"
              "req = urllib.request.Request(url, data=body, headers={'Authorization': 'Bearer ' + tok,\n"
              "                                                     'Content-Type': 'application/json'})\n"
              "r = urllib.request.urlopen(req, context=ctx, timeout=10)\n"
              "print('authenticated', r.status, ns, json.loads(r.read())['status']['allowed'])\n")


def test_a_pod_reaches_the_api_server_with_its_service_account_token(kube: KubeCluster, namespace: str,
                                                                     nodes: Nodes) -> None:
    """In-cluster config works as in a cluster: the `kubernetes` Service's ClusterIP (answered
    by the node, relayed to the API server) and the token volume a kubelet projects."""
    ns, node = namespace, f"{namespace}-c"
    nodes.start(node)
    kube.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": ns},
        "spec": {"restartPolicy": "Never", "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
                 "containers": [{"name": "c", "image": "none", "command": ["python3", "-c", IN_CLUSTER]}]}}))

    def phase() -> str | None:
        p = json.loads(kube.kubectl("get", "pod", "client", "-n", ns, "-o", "json").stdout)
        return p["status"].get("phase") if p["status"].get("phase") in ("Succeeded", "Failed") else None
    log = os.path.join(nodes.state_dir, node, "logs", f"{ns}_client_c.log")
    got = poll(phase, 60, "client pod finished")
    out = open(log).read() if os.path.exists(log) else "(no log)"
    assert got == "Succeeded", out + nodes.log(node)
    # 201 from the API server: the token authenticated the pod's ServiceAccount (an anonymous
    # request may not create a SelfSubjectAccessReview), which may not read pods.
    assert out.strip().splitlines()[-1] == f"authenticated 201 {ns} False", out

"""The node agent's pure decisions: what runs for a Pod object, and the status written back."""
from __future__ import annotations

import pytest

from localcluster.kubelet_pods import UNSUPPORTED, ContainerFacts, plan_pod, pod_status, resolve_env


def _pod(**container) -> dict:
    c = {"name": "app", "image": "none", "command": ["python3", "-c"], "args": ["print(1)"], **container}
    return {"metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1"},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [c],
                     "volumes": [{"name": "s", "secret": {"secretName": "x"}},
                                 {"name": "h", "hostPath": {"path": "/var/run/x", "type": "DirectoryOrCreate"}}],
                     "securityContext": {"runAsUser": 1000}}}


def test_plan_runs_command_and_args_with_the_downward_api():
    p = plan_pod(_pod(env=[{"name": "A", "value": "1"},
                           {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                           {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                           {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}],
                      securityContext={"runAsGroup": 7}))
    [c] = p.containers
    assert (p.key, p.uid, p.node, p.restart_policy, p.terminating, p.grace_seconds) == ("shop/web-1", "u-1", "n1", "Always", False, 30)
    assert c.argv == ("python3", "-c", "print(1)") and c.problem is None
    assert (c.run_as_user, c.run_as_group) == (1000, 7)  # the pod's user, the container's group
    assert resolve_env(c, p, pod_ip="10.244.1.2", host_ip="172.30.0.2") == {
        "A": "1", "ME": "web-1", "IP": "10.244.1.2", "SA": "web"}


@pytest.mark.parametrize("container, problem", [
    ({"command": [], "args": []}, "no command: this node runs commands, not images"),
    ({"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, "env K: only literal values"),
    ({"envFrom": [{"configMapRef": {"name": "c"}}]}, "envFrom is not supported"),
    ({"volumeMounts": [{"name": "data", "mountPath": "/data"}]}, "volumeMount /data: no volume named 'data'"),
    ({"volumeMounts": [{"name": "s", "mountPath": "/run/s"}]}, "volume s: secret volumes are not supported"),
    ({"volumeMounts": [{"name": "h", "mountPath": "/data"}]}, "an unprivileged container's volumes must be under"),
    ({"volumeMounts": [{"name": "h", "mountPath": "/data"}], "securityContext": {"privileged": True}}, None),
    ({"volumeMounts": [{"name": "h", "mountPath": "/run/h", "subPath": "x"}]}, "without subPath"),
    # The API token mount admission adds to every pod: provided by the node agent.
    ({"volumeMounts": [{"name": "default-token-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}, None),
])
def test_what_this_node_cannot_run_is_named(container, problem):
    [c] = plan_pod(_pod(**container)).containers
    assert (c.problem is None) if problem is None else problem in c.problem


def test_terminating_pod_takes_its_deletion_grace_period():
    obj = _pod()
    obj["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z", deletionGracePeriodSeconds=5)
    obj["status"] = {"podIP": "10.244.1.9"}
    p = plan_pod(obj)
    assert (p.terminating, p.grace_seconds, p.pinned_ip) == (True, 5, "10.244.1.9")


RUN = ContainerFacts("app", running=True, restarts=0, started_at="t0")


@pytest.mark.parametrize("facts, policy, phase, ready, state", [
    ([RUN], "Always", "Running", True, "running"),
    ([ContainerFacts("app", False, 0, None)], "Always", "Pending", False, "waiting"),
    ([ContainerFacts("app", False, 2, "t0", last_exit=1, finished_at="t1")], "Always", "Running", False, "waiting"),
    ([ContainerFacts("app", False, 0, "t0", last_exit=0, finished_at="t1")], "Never", "Succeeded", False, "waiting"),
    ([ContainerFacts("app", False, 0, "t0", last_exit=3, finished_at="t1")], "Never", "Failed", False, "waiting"),
    ([ContainerFacts("app", False, 0, None, problem="no command")], "Always", "Pending", False, "waiting"),
])
def test_status(facts, policy, phase, ready, state):
    obj = _pod()
    obj["spec"]["restartPolicy"] = policy
    st = pod_status(plan_pod(obj), facts, pod_ip="10.244.1.2", host_ip="172.30.0.2", start_time="t0", now="t2")
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert (st["phase"], conds["Ready"] == "True", list(st["containerStatuses"][0]["state"])) == (phase, ready, [state])
    assert st["podIP"] == "10.244.1.2" and st["podIPs"] == [{"ip": "10.244.1.2"}] and st["hostIP"] == "172.30.0.2"
    cs = st["containerStatuses"][0]
    assert cs["restartCount"] == facts[0].restarts
    if facts[0].problem:
        assert cs["state"]["waiting"] == {"reason": UNSUPPORTED, "message": "no command"}
    if facts[0].last_exit is not None:
        assert cs["lastState"]["terminated"]["exitCode"] == facts[0].last_exit


def test_readiness_probes_are_planned_and_gate_ready():
    p = plan_pod(_pod(ports=[{"name": "http-health", "containerPort": 8080}],
                      readinessProbe={"httpGet": {"path": "/ready", "port": "http-health"}, "periodSeconds": 3}))
    probe = p.containers[0].readiness
    assert (probe.port, probe.path, probe.period, probe.failure_threshold) == (8080, "/ready", 3.0, 3)
    assert plan_pod(_pod(readinessProbe={"tcpSocket": {"port": 15012}})).containers[0].readiness.path is None
    assert plan_pod(_pod(readinessProbe={"exec": {"command": ["true"]}})).containers[0].readiness is None
    running_not_ready = ContainerFacts("app", running=True, restarts=0, started_at="t0", ready=False)
    st = pod_status(p, [running_not_ready], pod_ip="10.244.1.2", host_ip="h", start_time="t0", now="t1")
    assert st["phase"] == "Running" and st["containerStatuses"][0]["ready"] is False
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "False"


@pytest.mark.parametrize("elapsed, due", [(0, False), (2885, False), (2886, True), (4000, True)])
def test_token_is_rewritten_at_80_percent_of_its_lifetime(elapsed, due):
    from localcluster.kubelet_pods import TOKEN_SECONDS, token_refresh_due
    assert token_refresh_due(1000.0, TOKEN_SECONDS, 1000.0 + elapsed) is due

"""The node's Service proxy decisions (pure): which endpoints answer a ClusterIP port, and the
hosts file that stands in for cluster DNS."""
from __future__ import annotations

from localcluster.kubeproxy import Backend, endpoints, hosts_text
from localcluster.procs import Containment, contain_argv


def _svc(name, ns, ip, ports, selector=None):
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "selector": selector, "ports": ports}}


def _pod(name, ns, ip, ready=True, terminating=False, **labels):
    meta = {"name": name, "namespace": ns, "labels": labels}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_ready_selected_pods_are_the_endpoints_by_number_or_port_name():
    svcs = [_svc("web", "shop", "10.96.0.20", [{"port": 80, "targetPort": "http"}, {"port": 81, "targetPort": 9000},
                                                 {"port": 53, "protocol": "UDP"}], {"app": "web"}),
            _svc("kubernetes", "default", "10.96.0.1", [{"port": 443, "targetPort": 6443}]),
            _svc("headless", "shop", "None", [{"port": 80}], {"app": "web"}),
            _svc("empty", "shop", "10.96.0.21", [{"port": 80}], {"app": "none"})]
    pods = [_pod("w1", "shop", "10.244.0.5", app="web"), _pod("w2", "shop", "10.244.1.5", ready=False, app="web"),
            _pod("w3", "shop", "10.244.1.6", terminating=True, app="web"), _pod("w4", "other", "10.244.1.7", app="web")]
    assert endpoints(svcs, pods) == {
        ("10.96.0.20", 80): Backend((("10.244.0.5", 8080),)),
        ("10.96.0.20", 81): Backend((("10.244.0.5", 9000),)),
        ("10.96.0.1", 443): Backend((), api=True),   # the API server: relayed to the host's loopback
        ("10.96.0.21", 80): Backend(()),              # no ready endpoint: refused
    }


def test_hosts_file_names_every_service_with_a_cluster_ip():
    text = hosts_text([_svc("istiod", "istio-system", "10.96.0.9", []), _svc("h", "a", "None", [])])
    assert text.splitlines() == ["127.0.0.1\tlocalhost",
                                 "10.96.0.9\tistiod.istio-system.svc istiod.istio-system.svc.cluster.local"]


def test_a_privileged_container_keeps_capabilities_and_the_host_mount_propagation():
    argv = contain_argv(["app"], Containment(privileged=True, host_pid=True, writable_volumes=(("/a", "/b"),),
                                             hosts_file="/h"), None)
    head = argv[:argv.index("--")]
    assert head[1:] == ["--mount", "--propagation", "unchanged"]  # no PID namespace with hostPID
    assert "setpriv" not in " ".join(argv) and "--privileged" in argv and "/a:/b:rw" in argv
    assert argv[argv.index("--hosts") + 1] == "/h"
    plain = contain_argv(["app"], Containment(uid=5, gid=5), None)
    assert "--pid" in plain and "--bounding-set=-all" in plain and "--privileged" not in plain

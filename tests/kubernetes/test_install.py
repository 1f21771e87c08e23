"""`ambient install | kubectl apply -f -` against the real API server: every manifest passes
kubernetes-validate --strict and a server-side dry run, the install comes up as objects the
cluster's controllers act on, RBAC grants the mesh's ServiceAccounts only what they use, and
`ambient uninstall | kubectl delete -f -` takes it away again (keeping the CRDs)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import yaml

from .cluster import KubeCluster

BIN = os.path.dirname(sys.executable)


def _ambient(*args: str) -> str:
    p = subprocess.run([os.path.join(BIN, "ambient"), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _can_i(kube: KubeCluster, sa: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` for a ServiceAccount: resource -> verbs."""
    out = kube.kubectl("auth", "can-i", "--list", f"--as=system:serviceaccount:istio-system:{sa}").stdout
    rules: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if not cols or cols[0].startswith("["):
            continue  # non-resource URLs (/healthz, /version...) every authenticated user has
        verbs = re.search(r"\[([^\]]*)\]\s*$", line)  # the last column: [get list watch]
        # A resource may have several rows (one with resourceNames): their verbs together.
        rules.setdefault(cols[0], set()).update(verbs.group(1).split() if verbs else ())
    return rules


def test_every_manifest_validates_strictly_offline(tmp_path) -> None:
    docs = list(yaml.safe_load_all(_ambient("install")))
    kinds = [d["kind"] for d in docs]
    assert {"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Role", "RoleBinding", "Deployment", "Service", "DaemonSet"} == set(kinds)
    f = tmp_path / "install.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    p = subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", str(f)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("passed for resource") == len(docs)
    # Without the Gateway API CRDs (a cluster that has them): only the Istio ones.
    crds = [d["metadata"]["name"] for d in yaml.safe_load_all(_ambient("install", "--skip-gateway-api-crds"))
            if d["kind"] == "CustomResourceDefinition"]
    assert crds and not [c for c in crds if c.endswith(".k8s.io")]


def test_install_applies_on_the_real_server_with_least_privilege_and_uninstalls(no_mesh_namespace: KubeCluster) -> None:
    kube = no_mesh_namespace
    manifest = _ambient("install")
    kube.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}))
    # A server-side dry run runs admission and validation (selector/template match, enums).
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest).stdout
    assert out.count("(server dry run)") == len(list(yaml.safe_load_all(manifest)))
    kube.kubectl("apply", "-f", "-", input=manifest)

    # The cluster's own controllers act on it: the Deployment gets its ReplicaSet and pod.
    deadline = time.monotonic() + 30
    while True:
        pods = json.loads(kube.kubectl("get", "pods", "-n", "istio-system", "-l", "app=istiod", "-o", "json").stdout)
        if pods["items"]:
            break
        assert time.monotonic() < deadline, "no istiod pod created"
        time.sleep(0.2)
    [pod] = pods["items"]
    assert pod["spec"]["serviceAccountName"] == "istiod"
    ds = json.loads(kube.kubectl("get", "daemonset", "ztunnel", "-n", "istio-system", "-o", "json").stdout)
    assert ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] is True

    cp = _can_i(kube, "istiod")
    # pods: get too, anywhere: a waypoint's token is bound to its pod, in the waypoint's namespace.
    assert cp.pop("pods") == {"get", "list", "watch"}
    for res in ("namespaces", "nodes",
                "authorizationpolicies.security.istio.io", "peerauthentications.security.istio.io",
                "virtualservices.networking.istio.io", "destinationrules.networking.istio.io",
                "gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io",
                "telemetries.telemetry.istio.io"):
        assert cp.pop(res) == {"list", "watch"}, res
    # ConfigMaps by name only: the mesh config and the root (listed and watched with
    # fieldSelector metadata.name), the root kept in every namespace (create is not limitable).
    assert cp.pop("configmaps") == {"list", "watch", "get", "update", "create"}
    for verb, what, ns, allowed in (("list", "configmaps", None, "no"), ("watch", "configmaps", None, "no"),
                                    ("list", "configmap/istio-ca-root-cert", None, "yes"),
                                    ("watch", "configmap/istio", None, "yes"),
                                    ("get", "configmap/istio", "default", "no"),
                                    ("update", "configmap/istio-ca-root-cert", "default", "yes"),
                                    ("get", "configmap/istio-ca-root-cert", "default", "yes"),
                                    ("update", "configmap/other", "default", "no"),
                                    ("delete", "configmap/istio-ca-root-cert", "default", "no"),
                                    ("create", "configmaps", "default", "yes")):
        scope = ["-n", ns] if ns else ["--all-namespaces"]
        got = kube.kubectl("auth", "can-i", verb, what, *scope, "--as=system:serviceaccount:istio-system:istiod",
                           check=False).stdout.strip()
        assert got == allowed, (verb, what, ns, got)
    # The waypoint controller: applies each waypoint's objects, watches its Deployments, writes status.
    for res in ("serviceaccounts", "services"):
        assert cp.pop(res) == {"list", "watch", "create", "patch"}, res
    assert cp.pop("deployments.apps") == {"list", "watch", "create", "patch"}
    for res in ("gateways.gateway.networking.k8s.io/status", "httproutes.gateway.networking.k8s.io/status"):
        assert cp.pop(res) == {"patch"}, res
    # The istio-waypoint GatewayClass: created once, patched by name only.
    assert cp.pop("gatewayclasses.gateway.networking.k8s.io") == {"create", "patch"}
    assert cp.pop("gatewayclasses.gateway.networking.k8s.io/status") == {"patch"}
    for verb, what, allowed in (("patch", "gatewayclass/istio-waypoint", "yes"), ("patch", "gatewayclass/istio", "no")):
        got = kube.kubectl("auth", "can-i", verb, what, "--as=system:serviceaccount:istio-system:istiod",
                           check=False).stdout.strip()
        assert got == allowed, (verb, what, got)
    assert cp.pop("events") == {"create"}
    assert cp.pop("tokenreviews.authentication.k8s.io") == {"create"}
    # What is left is what every authenticated identity may do (reviews about itself).
    assert set(cp) <= {"selfsubjectaccessreviews.authorization.k8s.io", "selfsubjectrulesreviews.authorization.k8s.io"}
    zt = _can_i(kube, "ztunnel")
    assert set(zt) <= {"selfsubjectaccessreviews.authorization.k8s.io", "selfsubjectrulesreviews.authorization.k8s.io"}
    for verb, res in (("get", "secrets"), ("create", "pods"), ("list", "pods"), ("delete", "deployments"),
                      ("update", "gateways"), ("patch", "httproutes")):
        no = kube.kubectl("auth", "can-i", verb, res, "--as=system:serviceaccount:istio-system:istiod", check=False)
        assert no.stdout.strip() == ("yes" if (verb, res) == ("list", "pods") else "no")
    # In its own namespace: its CA Secret (get, create once) and, as everywhere, the root ConfigMap.
    for verb, what, allowed in (("get", "secret/istio-ca-secret", "yes"), ("get", "secret/other", "no"),
                                ("list", "secrets", "no"), ("create", "secrets", "yes"),
                                ("update", "secret/istio-ca-secret", "no"),
                                ("update", "configmap/istio-ca-root-cert", "yes"),
                                ("update", "configmap/other", "no"), ("create", "configmaps", "yes"),
                                ("get", "pods", "yes"), ("delete", "pods", "no")):
        got = kube.kubectl("auth", "can-i", verb, what, "-n", "istio-system",
                           "--as=system:serviceaccount:istio-system:istiod", check=False).stdout.strip()
        assert got == allowed, (verb, what, got)

    kube.kubectl("delete", "-f", "-", "--wait=false", input=_ambient("uninstall"))
    for what in ("clusterrole/ambient-istiod", "clusterrolebinding/ambient-istiod"):
        assert kube.kubectl("get", what, check=False).returncode != 0
    ns = kube.kubectl("get", "namespace", "istio-system", "-o", "json", check=False)
    assert ns.returncode != 0 or json.loads(ns.stdout)["status"]["phase"] == "Terminating"
    # The CRDs stay (and with them every user's policy), unless --purge.
    assert kube.kubectl("get", "crd", "authorizationpolicies.security.istio.io", check=False).returncode == 0
    purge = [d["kind"] for d in yaml.safe_load_all(_ambient("uninstall", "--purge"))]
    assert purge.count("CustomResourceDefinition") == 8 and purge[-1] == "CustomResourceDefinition"

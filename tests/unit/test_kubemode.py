"""Kubernetes-mode install side, pure parts: node prerequisite rules and manifest invariants."""
from __future__ import annotations

import pytest

from controlplane.kube.kinds import ROOT_CONFIGMAPS, WATCHED, WAYPOINT_DEPLOYMENTS
from kubemode.check import Facts, Reason, judge
from kubemode.crds import GATEWAY_API_APPROVAL, crds
from kubemode.manifests import InstallOptions, manifests

GOOD = Facts(kernel="6.1.0-18-amd64", cgroup2_mount="/sys/fs/cgroup", bpffs_mounted=True, btf=True)


@pytest.mark.parametrize("facts, failed", [
    (GOOD, {}),
    (Facts("6.1.0", "/sys/fs/cgroup/unified", True, True), {}),  # hybrid: cgroup2 is still there
    (Facts("6.1.0", None, True, True), {"cgroup v2": Reason.NO_CGROUP2}),
    (Facts("6.1.0", "/sys/fs/cgroup", False, True), {"bpffs": Reason.NO_BPFFS}),
    (Facts("6.1.0", "/sys/fs/cgroup", True, False), {"BTF": Reason.NO_BTF}),
    (Facts("5.8.0", "/sys/fs/cgroup", True, True), {"sk_lookup": Reason.KERNEL_TOO_OLD}),
    (Facts("5.9.0", "/sys/fs/cgroup", True, True), {}),
    (Facts("4.19.0", "/sys/fs/cgroup", True, True),
     {"sk_lookup": Reason.KERNEL_TOO_OLD, "cgroup getsockopt": Reason.KERNEL_TOO_OLD}),
    (Facts("weird", "/sys/fs/cgroup", True, True),
     {"sk_lookup": Reason.UNKNOWN_KERNEL, "cgroup getsockopt": Reason.UNKNOWN_KERNEL}),
])
def test_prerequisites(facts, failed):
    results = judge(facts)
    assert {r.name: r.reason for r in results if not r.ok} == failed
    assert all(r.reason is Reason.OK for r in results if r.ok)


def test_the_control_plane_may_list_and_watch_exactly_the_kinds_it_watches():
    [role] = [m for m in manifests() if m["kind"] == "ClusterRole"]
    granted = {(g, r, tuple(rule["verbs"])) for rule in role["rules"] if "resourceNames" not in rule
               for g in rule["apiGroups"] for r in rule["resources"]}
    by_name = {(g, r, tuple(rule["verbs"]), tuple(rule["resourceNames"])) for rule in role["rules"]
               if "resourceNames" in rule for g in rule["apiGroups"] for r in rule["resources"]}
    # The istio-waypoint GatewayClass: created once, patched by name only; the ConfigMaps watched
    # by name (mesh config, root) listed and watched by name, the root read and replaced by name.
    assert by_name == {("gateway.networking.k8s.io", r, ("patch",), ("istio-waypoint",))
                       for r in ("gatewayclasses", "gatewayclasses/status")} | {
        ("", "configmaps", ("list", "watch"), ("istio", "istio-ca-root-cert")),
        ("", "configmaps", ("get", "update"), ("istio-ca-root-cert",))}
    kinds = (*WATCHED, WAYPOINT_DEPLOYMENTS, ROOT_CONFIGMAPS)
    watched = {(k.group, k.plural, ("list", "watch")) for k in kinds if k.only_name is None}
    # The waypoint controller applies its objects and writes Gateway API status.
    waypoints = {("", "serviceaccounts", ("create", "patch")), ("", "services", ("create", "patch")),
                 ("apps", "deployments", ("create", "patch")),
                 ("gateway.networking.k8s.io", "gateways/status", ("patch",)),
                 ("gateway.networking.k8s.io", "httproutes/status", ("patch",)),
                 ("gateway.networking.k8s.io", "gatewayclasses", ("create",)),
                 ("", "pods", ("get",))}  # the pod a waypoint's CA token is bound to
    assert granted == watched | waypoints | {("", "events", ("create",)), ("", "configmaps", ("create",)),
                                             ("authentication.k8s.io", "tokenreviews", ("create",))}


def test_every_watched_custom_kind_has_a_crd_serving_its_version():
    served = {(c["spec"]["group"], c["spec"]["names"]["plural"], v["name"])
              for c in crds(gateway_api=True) for v in c["spec"]["versions"] if v["served"]}
    for k in WATCHED:
        if k.group:
            assert (k.group, k.plural, k.version) in served, k.kind
    for c in crds(gateway_api=True):
        assert sum(v["storage"] for v in c["spec"]["versions"]) == 1
        approved = c["metadata"].get("annotations", {}).get("api-approved.kubernetes.io")
        assert approved == (GATEWAY_API_APPROVAL if c["spec"]["group"].endswith(".k8s.io") else None)


def test_install_options_reach_the_workloads():
    objs = manifests(InstallOptions(image="reg.example/mesh:1", trust_domain="corp.local", gateway_api_crds=False))
    pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("Deployment", "DaemonSet")]
    assert [c["image"] for p in pods for c in p["containers"]] == ["reg.example/mesh:1"] * 2
    assert all("corp.local" in c["command"] for p in pods for c in p["containers"])
    assert not [o for o in objs if o["kind"] == "CustomResourceDefinition"
                and o["spec"]["group"] == "gateway.networking.k8s.io"]


@pytest.mark.parametrize("ca_from_secret, secret_rules", [
    (None, {("secrets", "istio-ca-secret", "get"), ("secrets", None, "create")}),
    ("mesh-ca", {("secrets", "mesh-ca", "get")}),  # the user's: read only, nothing created
])
def test_in_its_namespace_the_control_plane_reaches_only_its_ca_secret(ca_from_secret, secret_rules):
    objs = manifests(InstallOptions(ca_from_secret=ca_from_secret))
    [role] = [m for m in objs if m["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "istio-system"
    granted = {(r, name, v) for rule in role["rules"] for r in rule["resources"]
               for name in rule.get("resourceNames", [None]) for v in rule["verbs"]}
    # (The root ConfigMap, here as in every namespace, is the ClusterRole's.)
    assert granted == secret_rules | {("pods", None, "get")}
    [deploy] = [m for m in objs if m["kind"] == "Deployment"]
    command = deploy["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--ca-dir" not in command
    assert (command[command.index("--ca-from-secret") + 1] if ca_from_secret else None) == ca_from_secret

"""The root publisher's decision (pure): which namespaces get ConfigMap istio-ca-root-cert
written, from the Namespaces and root ConfigMaps a watch cache holds; and its RBAC rules."""
from __future__ import annotations

import pytest

from controlplane.kube.ca_secret import holds_root, root_configmap
from controlplane.kube.kinds import ROOT_CONFIGMAPS, WATCHED, WatchedKind
from controlplane.kube.root_publisher import plan, skip_reason
from kubemode.manifests import manifests, watch_rules

ROOT = b"-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
OLD = b"-----BEGIN CERTIFICATE-----\nold\n-----END CERTIFICATE-----\n"


def _ns(name: str, phase: str = "Active", deleting: bool = False) -> dict:
    meta: dict = {"name": name, "resourceVersion": "1"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def _cm(ns: str, root: bytes = ROOT, **extra: str) -> dict:
    cm = root_configmap(ns, root)
    cm["metadata"]["resourceVersion"] = "7"
    cm["data"].update(extra)
    return cm


@pytest.mark.parametrize("namespaces, configmaps, want", [
    ([], {}, []),
    ([_ns("a")], {}, [("a", "create")]),  # a new namespace
    ([_ns("a")], {"a": _cm("a")}, []),  # already there
    ([_ns("a")], {"a": _cm("a", OLD)}, [("a", "update")]),  # an edit, or an older root
    ([_ns("a")], {"a": {**_cm("a"), "data": {}}}, [("a", "update")]),  # its key removed
    ([_ns("a")], {"a": _cm("a", note="the user's")}, []),  # only root-cert.pem is ours to compare
    ([_ns("a")], {"a": {**_cm("a"), "metadata": {"name": "istio-ca-root-cert", "namespace": "a"}}}, []),  # labels too
    ([_ns("a", phase="Terminating")], {}, []),  # being deleted: a create would be refused
    ([_ns("a", deleting=True)], {}, []),  # deletionTimestamp set, phase not yet Terminating
    ([_ns("kube-system"), _ns("kube-public"), _ns("kube-node-lease")], {}, []),
    ([], {"gone": _cm("gone", OLD)}, []),  # a namespace no longer listed: nothing to write
    ([_ns("b"), _ns("a"), _ns("c")], {"b": _cm("b")}, [("a", "create"), ("c", "create")]),  # sorted
])
def test_plan_writes_what_is_missing_or_differs_in_live_namespaces(namespaces, configmaps, want) -> None:
    writes = plan({n["metadata"]["name"]: n for n in namespaces}, configmaps, ROOT)
    assert [(w.namespace, w.action) for w in writes] == want
    for w in writes:  # an update carries what it was judged on (its resourceVersion is the precondition)
        assert w.current is configmaps.get(w.namespace)


@pytest.mark.parametrize("ns, reason", [
    (_ns("default"), None), (_ns("istio-system"), None), (_ns("kube-system"), "system"),
    (_ns("x", phase="Terminating"), "terminating"), (_ns("x", deleting=True), "terminating"),
    ({"metadata": {"name": "x"}}, None),  # no status yet
])
def test_skip_reason(ns, reason) -> None:
    assert skip_reason(ns) == reason


def test_the_configmap_written_is_the_one_checked() -> None:
    assert holds_root(root_configmap("a", ROOT), ROOT) and not holds_root(root_configmap("a", OLD), ROOT)
    assert root_configmap("a", ROOT)["metadata"]["name"] == ROOT_CONFIGMAPS.only_name
    assert "resourceVersion" not in root_configmap("a", ROOT)["metadata"]  # a create must not carry one


def test_an_update_replaces_only_the_root() -> None:
    current = _cm("a", OLD, note="the user's")
    current["metadata"].update(labels={"team": "x"}, annotations={"a": "b"})
    body = root_configmap("a", ROOT, current)
    assert body["data"] == {"root-cert.pem": ROOT.decode(), "note": "the user's"}
    assert body["metadata"]["labels"] == {"team": "x", "app.kubernetes.io/part-of": "ambient"}
    assert (body["metadata"]["annotations"], body["metadata"]["resourceVersion"]) == ({"a": "b"}, "7")
    assert current["data"]["root-cert.pem"] == OLD.decode()  # the cache's object is not changed


@pytest.mark.parametrize("selector, name", [
    ("metadata.name=istio", "istio"), ("", None), ("spec.nodeName=n1", None),
    ("metadata.name=a,metadata.namespace=b", None), ("metadata.name=", None), ("metadata.name!=a", None),
])
def test_only_name(selector, name) -> None:
    assert WatchedKind("ConfigMap", "", "v1", "configmaps", True, field_selector=selector).only_name == name


def test_configmaps_are_listed_and_watched_by_name_only() -> None:
    # Both ConfigMap watches select one name: RBAC grants exactly those, never every ConfigMap.
    by_name = [(g, r, n) for g, r, n in watch_rules() if n]
    assert by_name == [("", ("configmaps",), ("istio", "istio-ca-root-cert"))]
    assert all("configmaps" not in r for g, r, n in watch_rules() if not n)
    assert {k.only_name for k in (*WATCHED, ROOT_CONFIGMAPS) if k.plural == "configmaps"} == {"istio",
                                                                                              "istio-ca-root-cert"}
    [role] = [m for m in manifests() if m["kind"] == "ClusterRole"]
    cm = {(v, n) for rule in role["rules"] if "configmaps" in rule["resources"]
          for n in rule.get("resourceNames", [None]) for v in rule["verbs"]}
    assert cm == {("list", "istio"), ("watch", "istio"), ("list", "istio-ca-root-cert"),
                  ("watch", "istio-ca-root-cert"), ("get", "istio-ca-root-cert"), ("update", "istio-ca-root-cert"),
                  ("create", None)}

"""Waypoint deployment and Gateway API status in Kubernetes mode (pure): what a Gateway deploys,
what a pass re-applies, and the conditions and reasons users read."""
from __future__ import annotations

import copy

import pytest

from controlplane.kube.gateway_status import (Reason, ServiceFacts, condition, gateway_status, route_info,
                                              route_status)
from controlplane.kube.waypoint_objects import (GatewayInfo, Listener, WaypointOptions, desired_objects, drifted,
                                                gateway_info, plan)

OPTS = WaypointOptions(image="img:1")
GW = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
      "metadata": {"name": "wp", "namespace": "app", "uid": "u-1", "generation": 3},
      "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
INFO = gateway_info(GW)


def _owned(obj: dict, uid: str = "u-1") -> dict:
    """`obj` as the API server would hold it: our fields plus defaults and status."""
    out = copy.deepcopy(obj)
    out["metadata"]["ownerReferences"][0]["uid"] = uid
    out["metadata"]["resourceVersion"] = "7"
    out.setdefault("spec", {})
    if obj["kind"] == "Service":
        out["spec"]["clusterIP"] = "10.96.0.9"
        for p in out["spec"]["ports"]:
            p["targetPort"] = p["port"]
    if obj["kind"] == "Deployment":
        out["spec"]["replicas"] = 1
        out["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
        out["status"] = {"readyReplicas": 1}
    return out


def test_desired_objects_are_named_labelled_and_owned_as_istiod_does() -> None:
    sa, dep, svc = desired_objects(INFO, OPTS)
    assert [o["kind"] for o in (sa, dep, svc)] == ["ServiceAccount", "Deployment", "Service"]
    for o in (sa, dep, svc):
        m = o["metadata"]
        assert (m["name"], m["namespace"]) == ("wp", "app")
        assert m["ownerReferences"] == [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                         "name": "wp", "uid": "u-1"}]
        assert m["labels"]["gateway.networking.k8s.io/gateway-name"] == m["labels"]["istio.io/gateway-name"] == "wp"
    tmpl = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"] == {
        "gateway.networking.k8s.io/gateway-name": "wp"}
    assert tmpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"  # never captured
    assert tmpl["spec"]["serviceAccountName"] == "wp"
    [c] = tmpl["spec"]["containers"]
    assert c["image"] == "img:1" and "app/wp" in c["command"]
    assert [p["containerPort"] for p in c["ports"]] == [15008, 15020, 15021]
    assert [(p["name"], p["port"], p["appProtocol"]) for p in svc["spec"]["ports"]] == [
        ("status-port", 15021, "tcp"), ("mesh", 15008, "hbone")]
    assert "replicas" not in dep["spec"]  # the user (or an autoscaler) may scale it


def _desired(kind: str) -> dict:
    return next(o for o in desired_objects(INFO, OPTS) if o["kind"] == kind)


def _edit(obj: dict, fn) -> dict:
    obj = copy.deepcopy(obj)
    fn(obj)
    return obj


def _set_image(o: dict) -> None:
    o["spec"]["template"]["spec"]["containers"][0]["image"] = "other:2"


def _add_env(o: dict) -> None:
    o["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "EXTRA", "value": "1"})


def _drop_label(o: dict) -> None:
    del o["metadata"]["labels"]["istio.io/gateway-name"]


def _add_label(o: dict) -> None:
    o["metadata"]["labels"]["team"] = "x"


def _drop_port(o: dict) -> None:
    o["spec"]["ports"].pop()


@pytest.mark.parametrize("kind, edit, want", [
    pytest.param("Deployment", lambda o: None, False, id="as-applied-plus-server-defaults"),
    pytest.param("Deployment", _set_image, True, id="image-changed-by-hand"),
    pytest.param("Deployment", _add_env, False, id="an-env-entry-someone-added-is-theirs"),
    pytest.param("Deployment", _drop_label, True, id="a-label-removed"),
    pytest.param("Deployment", _add_label, False, id="a-label-added"),
    pytest.param("Service", lambda o: None, False, id="service-with-clusterip-and-targetports"),
    pytest.param("Service", _drop_port, True, id="service-port-removed"),
])
def test_drifted_compares_only_the_fields_the_controller_sets(kind: str, edit, want: bool) -> None:
    desired = _desired(kind)
    assert drifted(desired, _edit(_owned(desired), edit)) is want


def _existing(**objs: dict | None) -> dict:
    return {k: v for k, v in objs.items()}


SA, DEP, SVC = (_owned(_desired(k)) for k in ("ServiceAccount", "Deployment", "Service"))
USER_SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "wp", "namespace": "app"}, "spec": {}}
USER_SA = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "wp", "namespace": "app"}}


def _gw(**kw) -> GatewayInfo:
    base = dict(namespace="app", name="wp", uid="u-1", generation=1, gateway_class="istio-waypoint",
                listeners=(Listener("mesh", 15008, "HBONE"),))
    return GatewayInfo(**{**base, **kw})


@pytest.mark.parametrize("gw, existing, apply, conflicts, user_sa", [
    pytest.param(_gw(), {}, ["ServiceAccount", "Deployment", "Service"], [], False, id="new-gateway-all-three"),
    pytest.param(_gw(), _existing(ServiceAccount=SA, Deployment=DEP, Service=SVC), [], [], False, id="in-sync-nothing"),
    pytest.param(_gw(), _existing(ServiceAccount=SA, Deployment=_edit(DEP, _set_image), Service=SVC),
                 ["Deployment"], [], False, id="drifted-deployment-only"),
    pytest.param(_gw(), _existing(ServiceAccount=SA, Service=SVC), ["Deployment"], [], False,
                 id="deleted-deployment-re-created"),
    pytest.param(_gw(), _existing(ServiceAccount=USER_SA, Deployment=DEP, Service=USER_SVC), [],
                 ["Service/app/wp"], True, id="users-objects-not-touched"),
    pytest.param(_gw(uid="u-2"), _existing(ServiceAccount=SA, Deployment=DEP, Service=SVC), [],
                 ["Deployment/app/wp", "Service/app/wp"], True, id="a-previous-gateways-objects-until-gc"),
    pytest.param(_gw(gateway_class="istio"), {}, [], [], False, id="not-a-waypoint"),
    pytest.param(_gw(deleting=True), {}, [], [], False, id="being-deleted"),
    pytest.param(_gw(listeners=(Listener("http", 80, "HTTP"),)), {}, [], [], False, id="no-hbone-listener"),
])
def test_plan_applies_only_what_is_missing_or_drifted_and_owned(gw, existing, apply, conflicts, user_sa) -> None:
    p = plan(gw, existing, OPTS)
    assert ([o["kind"] for o in p.apply], list(p.conflicts), p.user_service_account) == (apply, conflicts, user_sa)


NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def _conds(st: dict) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for c in st["conditions"]]


@pytest.mark.parametrize("gw, service, conflicts, want, addresses", [
    pytest.param(_gw(), ServiceFacts(cluster_ip="10.96.0.9"), (),
                 [("Accepted", "True", "Accepted"), ("Programmed", "True", "Programmed")],
                 [{"type": "IPAddress", "value": "10.96.0.9"}], id="programmed-with-the-clusterip"),
    pytest.param(_gw(), None, (), [("Accepted", "True", "Accepted"), ("Programmed", "False", "AddressNotAssigned")],
                 [], id="no-service-yet"),
    pytest.param(_gw(), ServiceFacts(cluster_ip=None), (),
                 [("Accepted", "True", "Accepted"), ("Programmed", "False", "AddressNotAssigned")], [],
                 id="service-without-clusterip"),
    pytest.param(_gw(), ServiceFacts(cluster_ip="10.96.0.9"), ("Service/app/wp",),
                 [("Accepted", "True", "Accepted"), ("Programmed", "False", "Invalid")], [], id="name-taken"),
    pytest.param(_gw(listeners=(Listener("http", 80, "HTTP"),)), None, (),
                 [("Accepted", "False", "ListenersNotValid"), ("Programmed", "False", "Invalid")], [],
                 id="no-hbone-listener"),
])
def test_gateway_status(gw, service, conflicts, want, addresses) -> None:
    st = gateway_status(gw, service, conflicts=conflicts, attached_routes={"mesh": 2}, now=NOW)
    assert (_conds(st), st["addresses"]) == (want, addresses)
    assert all(c["observedGeneration"] == gw.generation and c["lastTransitionTime"] == NOW for c in st["conditions"])
    [lst] = st["listeners"]
    hbone = gw.hbone_listener is not None
    assert lst["attachedRoutes"] == (2 if hbone else 0) and bool(lst["supportedKinds"]) is hbone


def test_objects_the_api_server_refused_make_the_gateway_not_programmed() -> None:
    st = gateway_status(_gw(), ServiceFacts(cluster_ip="10.96.0.9"), apply_error="422 Invalid: name too long", now=NOW)
    assert _conds(st)[1] == ("Programmed", "False", "Invalid") and "name too long" in st["conditions"][1]["message"]
    assert st["addresses"] == []


def test_a_status_that_did_not_change_keeps_its_transition_times_and_compares_equal() -> None:
    svc = ServiceFacts(cluster_ip="10.96.0.9")
    first = gateway_status(_gw(), svc, now=NOW)
    assert gateway_status(_gw(), svc, previous=first, now=LATER) == first
    flipped = gateway_status(_gw(), None, previous=first, now=LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == {"Accepted": NOW, "Programmed": LATER}


def test_condition_time_moves_only_when_the_status_does() -> None:
    old = [condition("Ready", True, Reason.ACCEPTED, "m", 1, NOW)]
    assert condition("Ready", True, Reason.ACCEPTED, "other message", 2, LATER, old)["lastTransitionTime"] == NOW
    assert condition("Ready", False, Reason.INVALID, "m", 2, LATER, old)["lastTransitionTime"] == LATER


SERVICES = {("app", "web"): ServiceFacts(cluster_ip="10.96.0.5", ports=frozenset({80}))}
GATEWAYS = {("app", "wp"): _gw(), ("app", "ingress"): _gw(name="ingress", gateway_class="istio")}


def _route(parents: list, backends: list) -> dict:
    return {"metadata": {"name": "r", "namespace": "app", "generation": 4},
            "spec": {"parentRefs": parents, "rules": [{"backendRefs": backends}]}}


SVC_PARENT = {"group": "", "kind": "Service", "name": "web", "port": 80}
WEB = {"name": "web", "port": 80}


@pytest.mark.parametrize("parents, backends, rejected, want", [
    pytest.param([SVC_PARENT], [WEB], None, [("True", "Accepted", "True", "ResolvedRefs")], id="valid-gamma-route"),
    pytest.param([{"name": "wp"}], [WEB], None, [("True", "Accepted", "True", "ResolvedRefs")], id="to-the-waypoint"),
    pytest.param([{**SVC_PARENT, "port": 81}], [WEB], None, [("False", "NoMatchingParent", "True", "ResolvedRefs")],
                 id="parent-port-missing"),
    pytest.param([{**SVC_PARENT, "name": "ghost"}], [WEB], None,
                 [("False", "NoMatchingParent", "True", "ResolvedRefs")], id="parent-service-missing"),
    pytest.param([{"name": "wp", "sectionName": "http"}], [WEB], None,
                 [("False", "NoMatchingParent", "True", "ResolvedRefs")], id="no-such-listener"),
    pytest.param([SVC_PARENT], [{"name": "ghost", "port": 80}], None,
                 [("True", "Accepted", "False", "BackendNotFound")], id="backend-missing"),
    pytest.param([SVC_PARENT], [{"name": "web", "port": 9}], None,
                 [("True", "Accepted", "False", "BackendNotFound")], id="backend-port-missing"),
    pytest.param([SVC_PARENT], [{"group": "example.com", "kind": "Bucket", "name": "b"}], None,
                 [("True", "Accepted", "False", "InvalidKind")], id="backend-not-a-service"),
    pytest.param([SVC_PARENT], [WEB], "spec.rules[0]: bad", [("False", "UnsupportedValue", "True", "ResolvedRefs")],
                 id="rejected-by-the-config-edge"),
    pytest.param([{"name": "ingress"}, {"name": "nobody"}], [WEB], None, [], id="other-controllers-gateways"),
    pytest.param([SVC_PARENT, {"name": "wp"}], [WEB], None,
                 [("True", "Accepted", "True", "ResolvedRefs")] * 2, id="two-parents-two-entries"),
])
def test_route_status_per_parent(parents, backends, rejected, want) -> None:
    st = route_status(route_info(_route(parents, backends)), rejected=rejected, services=SERVICES,
                      gateways=GATEWAYS, previous=None, now=NOW)
    got = [(a["status"], a["reason"], r["status"], r["reason"]) for a, r in (p["conditions"] for p in st["parents"])]
    assert got == want
    assert all(p["controllerName"] == "istio.io/mesh-controller" for p in st["parents"])
    assert all(c["observedGeneration"] == 4 for p in st["parents"] for c in p["conditions"])


def test_route_status_keeps_other_controllers_entries_and_drops_our_stale_ones() -> None:
    theirs = {"parentRef": {"name": "ingress"}, "controllerName": "example.com/gw", "conditions": []}
    stale = {"parentRef": {"name": "gone"}, "controllerName": "istio.io/mesh-controller", "conditions": []}
    st = route_status(route_info(_route([SVC_PARENT], [WEB])), rejected=None, services=SERVICES, gateways=GATEWAYS,
                      previous={"parents": [theirs, stale]}, now=NOW)
    assert [p["parentRef"] for p in st["parents"]] == [{"name": "ingress"}, SVC_PARENT]
    again = route_status(route_info(_route([SVC_PARENT], [WEB])), rejected=None, services=SERVICES,
                         gateways=GATEWAYS, previous=st, now=LATER)
    assert again == st


def test_the_cli_writes_the_gateway_istioctl_writes_and_lists_waypoints_only() -> None:
    from kubemode.waypoint_cli import list_rows, waypoint_gateway
    gw = waypoint_gateway("app", "waypoint", "service")
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    assert gateway_info(gw).hbone_listener is not None  # what the controller deploys
    done = {**gw, "metadata": {**gw["metadata"], "labels": {"istio.io/waypoint-for": "all"}},
            "status": {"conditions": [{"type": "Programmed", "status": "True"}],
                       "addresses": [{"type": "IPAddress", "value": "10.96.0.3"}]}}
    ingress = {"metadata": {"name": "in", "namespace": "app"}, "spec": {"gatewayClassName": "istio"}}
    assert list_rows([done, ingress], False) == [["NAME", "TRAFFIC-TYPE", "PROGRAMMED", "ADDRESS"],
                                                 ["waypoint", "all", "True", "10.96.0.3"]]
    assert list_rows([gw], True)[1] == ["app", "waypoint", "service", "Unknown", "-"]

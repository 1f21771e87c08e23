"""ztunnel outbound planning through waypoints (tables): BOUND goes to the waypoint, MISSING is refused."""
import ipaddress
import random

import pytest

from controlplane.translate import translate
from mesh.distribution.protocol import Snapshot
from mesh.identity import SpiffeId
from mesh.model import Container, FrozenMap, Namespace, ObjectMeta, Pod, PolicyObject, Service, ServicePort, freeze
from mesh.model.workload import GATEWAY_NAME_LABEL
from mesh.proxy.reason import Kind, Reason, classify
from mesh.state import ProxyState
from ztunnel.outbound.plan import PlanError, Route, plan_outbound

TD = "cluster.local"
AMB = {"istio.io/dataplane-mode": "ambient"}
USE = "istio.io/use-waypoint"
FOR = "istio.io/waypoint-for"


def pod(name, ip, *, ns="mesh", sa="sa", **labels):
    return Pod(meta=ObjectMeta(name=name, namespace=ns, labels=FrozenMap(labels)), node_name="n1",
               service_account=sa, pod_ip=ipaddress.IPv4Address(ip), containers=(Container(name="c", command=("x",)),))


def svc(name, vip, selector, ports, **labels):
    return Service(meta=ObjectMeta(name=name, namespace="mesh", labels=FrozenMap(labels)),
                   selector=FrozenMap(selector), cluster_ip=ipaddress.IPv4Address(vip),
                   ports=tuple(ServicePort(port=p, target_port=t) for p, t in ports))


def gateway(name, wfor=None):
    return PolicyObject(meta=ObjectMeta(name=name, namespace="mesh", labels=FrozenMap({FOR: wfor} if wfor else {})),
                        policy_kind="Gateway", api_version="gateway.networking.k8s.io/v1",
                        spec=freeze({"gatewayClassName": "istio-waypoint",
                                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}))


def waypoint_pod(gw, ip):
    return pod(f"{gw}-waypoint", ip, sa=gw, **{GATEWAY_NAME_LABEL: gw, "istio.io/dataplane-mode": "none"})


def wp_id(name):
    return SpiffeId(trust_domain=TD, namespace="mesh", service_account=name)


@pytest.fixture(scope="module")
def state():
    st = ProxyState()
    objs = translate([
        Namespace(meta=ObjectMeta(name="mesh", labels=FrozenMap(AMB))),
        gateway("wp"), gateway("wl", wfor="workload"), gateway("unplaced", wfor="all"),
        waypoint_pod("wp", "10.244.0.50"), waypoint_pod("wl", "10.244.0.51"),
        pod("client", "10.244.0.2", app="client"),
        pod("web", "10.244.1.2", app="web"),
        pod("api", "10.244.1.3", app="api"),
        pod("pinned", "10.244.1.4", app="pinned", **{USE: "wl"}),
        pod("lost", "10.244.1.5", app="lost", **{USE: "gone"}),
        pod("wrongfor", "10.244.1.6", app="wrongfor", **{USE: "wp"}),   # wp is for services only
        pod("early", "10.244.1.7", app="early", **{USE: "unplaced"}),
        svc("web", "10.96.0.10", {"app": "web"}, [(80, 8080), (81, "http")], **{USE: "wp"}),
        svc("api", "10.96.0.11", {"app": "api"}, [(80, 9090)]),
        svc("ghost", "10.96.0.12", {"app": "web"}, [(80, 8080)], **{USE: "gone"}),
        svc("wlonly", "10.96.0.13", {"app": "web"}, [(80, 8080)], **{USE: "wl"}),  # not for services
        svc("early", "10.96.0.14", {"app": "web"}, [(80, 8080)], **{USE: "unplaced"}),
        svc("empty", "10.96.0.15", {"app": "nobody"}, [(80, 8080)], **{USE: "wp"}),
    ], trust_domain=TD)
    st.apply_snapshot(Snapshot(version=1, resources=tuple(objs.values())))
    return st


@pytest.mark.parametrize("name, dst, connect, authority, identity, waypoint", [
    ("service bound -> waypoint, authority VIP:port", ("10.96.0.10", 80), ("10.244.0.50", 15008),
     "10.96.0.10:80", wp_id("wp"), "mesh/wp"),
    ("a named target port is the waypoint's business", ("10.96.0.10", 81), ("10.244.0.50", 15008),
     "10.96.0.10:81", wp_id("wp"), "mesh/wp"),
    ("service bound without endpoints still goes to the waypoint", ("10.96.0.15", 80), ("10.244.0.50", 15008),
     "10.96.0.15:80", wp_id("wp"), "mesh/wp"),
    ("service without binding -> endpoint", ("10.96.0.11", 80), ("10.244.1.3", 15008),
     "10.244.1.3:9090", SpiffeId(trust_domain=TD, namespace="mesh", service_account="sa"), None),
    ("service-only waypoint named on a service for workloads: direct", ("10.96.0.13", 80), ("10.244.1.2", 15008),
     "10.244.1.2:8080", SpiffeId(trust_domain=TD, namespace="mesh", service_account="sa"), None),
    ("pod bound -> waypoint, authority podIP:port", ("10.244.1.4", 7000), ("10.244.0.51", 15008),
     "10.244.1.4:7000", wp_id("wl"), "mesh/wl"),
    ("pod whose waypoint is not for workloads: direct", ("10.244.1.6", 7000), ("10.244.1.6", 15008),
     "10.244.1.6:7000", SpiffeId(trust_domain=TD, namespace="mesh", service_account="sa"), None),
    ("a service's endpoint reached by pod IP is not service traffic", ("10.244.1.2", 8080), ("10.244.1.2", 15008),
     "10.244.1.2:8080", SpiffeId(trust_domain=TD, namespace="mesh", service_account="sa"), None),
])
def test_outbound_plan_through_waypoints(state, name, dst, connect, authority, identity, waypoint):
    plan = plan_outbound(state, state.workload("mesh/client"), *dst, random.Random(0))
    assert (plan.route, plan.connect, plan.authority, plan.dst_identity) == (Route.HBONE, connect, authority, identity)
    assert (plan.waypoint.uid if plan.waypoint else None) == waypoint


def test_service_traffic_through_a_waypoint_leaves_the_endpoint_to_it(state):
    plan = plan_outbound(state, state.workload("mesh/client"), "10.96.0.10", 80, random.Random(0))
    assert plan.dst_workload is None and plan.service.uid == "mesh/web"
    pod_plan = plan_outbound(state, state.workload("mesh/client"), "10.244.1.4", 7000, random.Random(0))
    assert pod_plan.dst_workload.uid == "mesh/pinned" and pod_plan.service is None


@pytest.mark.parametrize("name, dst, reason, words", [
    ("service bound to a missing waypoint", ("10.96.0.12", 80), "waypoint_missing", "does not exist"),
    ("service bound to a waypoint without a pod", ("10.96.0.14", 80), "waypoint_missing", "no address"),
    ("pod bound to a missing waypoint", ("10.244.1.5", 80), "waypoint_missing", "mesh/gone"),
    ("pod bound to a waypoint without a pod", ("10.244.1.7", 80), "waypoint_missing", "no address"),
    ("bound service, port it has not", ("10.96.0.10", 443), "no_service_port", "no port 443"),
])
def test_outbound_plan_refuses_instead_of_bypassing(state, name, dst, reason, words):
    with pytest.raises(PlanError) as e:
        plan_outbound(state, state.workload("mesh/client"), *dst, random.Random(0))
    assert e.value.reason == reason and words in str(e.value)


def test_waypoint_missing_is_a_closed_reason_with_flag_and_status():
    r = classify(PlanError("waypoint_missing", "x"))
    assert r is Reason.WAYPOINT_MISSING
    assert (r.label, r.kind, r.flag, r.status) == ("waypoint_missing", Kind.NO_ROUTE, "UH", 503)


def test_waypoint_address_is_its_pods_ip_and_follows_it():
    objs = [Namespace(meta=ObjectMeta(name="mesh", labels=FrozenMap(AMB))), gateway("wp")]
    assert translate(objs, trust_domain=TD)[("Waypoint", "mesh/wp")].address is None
    unscheduled = Pod(meta=ObjectMeta(name="wp-waypoint", namespace="mesh", labels=FrozenMap({GATEWAY_NAME_LABEL: "wp"})))
    assert translate([*objs, unscheduled], trust_domain=TD)[("Waypoint", "mesh/wp")].address is None
    out = translate([*objs, waypoint_pod("wp", "10.244.0.50")], trust_domain=TD)
    assert out[("Waypoint", "mesh/wp")].address == ipaddress.IPv4Address("10.244.0.50")
    other_ns = pod("x", "10.244.0.60", ns="other", **{GATEWAY_NAME_LABEL: "wp"})
    assert translate([*objs, other_ns], trust_domain=TD)[("Waypoint", "mesh/wp")].address is None

"""Waypoint binding in translation: which waypoint service- and pod-addressed traffic uses (Istio's labels)."""
import ipaddress

import pytest

from controlplane.translate import translate, waypoint_binding, waypoints_of
from mesh.distribution.protocol import Delta, FrameDecoder, Snapshot, decode, encode
from mesh.identity import SpiffeId
from mesh.model import (Container, FrozenMap, Namespace, ObjectMeta, Pod, PolicyObject, Service, ServicePort,
                        freeze)
from mesh.model.workload import BindingSource, Waypoint, WaypointBinding, WaypointFor, WaypointStatus
from mesh.state import ProxyState

TD = "cluster.local"
IP = ipaddress.IPv4Address
USE = "istio.io/use-waypoint"
USE_NS = "istio.io/use-waypoint-namespace"
FOR = "istio.io/waypoint-for"


def ns(name="demo", **labels):
    return Namespace(meta=ObjectMeta(name=name, labels=FrozenMap(labels)))


def gateway(name="wp", namespace="demo", cls="istio-waypoint", wfor=None):
    labels = {FOR: wfor} if wfor else {}
    return PolicyObject(meta=ObjectMeta(name=name, namespace=namespace, labels=FrozenMap(labels)),
                        policy_kind="Gateway", api_version="gateway.networking.k8s.io/v1",
                        spec=freeze({"gatewayClassName": cls,
                                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}))


def pod(name="a", namespace="demo", ip="10.244.0.2", **labels):
    return Pod(meta=ObjectMeta(name=name, namespace=namespace, labels=FrozenMap(labels)), node_name="n1",
               pod_ip=IP(ip), containers=(Container(name="c", command=("true",)),))


def svc(name="web", namespace="demo", **labels):
    return Service(meta=ObjectMeta(name=name, namespace=namespace, labels=FrozenMap(labels)),
                   selector=FrozenMap({"app": "web"}), ports=(ServicePort(port=80, target_port=8080),),
                   cluster_ip=IP("10.96.0.10"))


def wp_id(name="wp", namespace="demo"):
    return SpiffeId(trust_domain=TD, namespace=namespace, service_account=name)



B, M, X = WaypointStatus.BOUND, WaypointStatus.MISSING, WaypointStatus.NOT_FOR_TRAFFIC
SVC_S, POD_S, NS_S = BindingSource.SERVICE, BindingSource.POD, BindingSource.NAMESPACE

# (name, namespace labels, object labels, waypoints present, source, expected (ns, name, source, status) | None)
CASES = [
    ("no-labels-svc", {}, {}, [gateway()], SVC_S, None),
    ("no-labels-pod", {}, {}, [gateway()], POD_S, None),
    ("svc-label", {}, {USE: "wp"}, [gateway()], SVC_S, ("demo", "wp", SVC_S, B)),
    ("ns-label-svc", {USE: "wp"}, {}, [gateway()], SVC_S, ("demo", "wp", NS_S, B)),
    ("svc-beats-ns", {USE: "wp"}, {USE: "other"}, [gateway(), gateway("other")], SVC_S, ("demo", "other", SVC_S, B)),
    ("svc-none-opts-out", {USE: "wp"}, {USE: "none"}, [gateway()], SVC_S, None),
    ("pod-none-opts-out", {USE: "wp"}, {USE: "none"}, [gateway(wfor="all")], POD_S, None),
    ("ns-none", {USE: "none"}, {}, [gateway()], SVC_S, None),
    ("default-for-is-service: pod via ns", {USE: "wp"}, {}, [gateway()], POD_S, None),
    ("for-workload: pod via ns", {USE: "wp"}, {}, [gateway(wfor="workload")], POD_S, ("demo", "wp", NS_S, B)),
    ("for-workload: svc via ns", {USE: "wp"}, {}, [gateway(wfor="workload")], SVC_S, None),
    ("for-workload: svc own label", {}, {USE: "wp"}, [gateway(wfor="workload")], SVC_S, ("demo", "wp", SVC_S, X)),
    ("for-all: svc", {USE: "wp"}, {}, [gateway(wfor="all")], SVC_S, ("demo", "wp", NS_S, B)),
    ("for-all: pod", {USE: "wp"}, {}, [gateway(wfor="all")], POD_S, ("demo", "wp", NS_S, B)),
    ("for-none: svc via ns", {USE: "wp"}, {}, [gateway(wfor="none")], SVC_S, None),
    ("for-none: svc own label", {}, {USE: "wp"}, [gateway(wfor="none")], SVC_S, ("demo", "wp", SVC_S, X)),
    ("for-service: pod own label", {}, {USE: "wp"}, [gateway()], POD_S, ("demo", "wp", POD_S, X)),
    ("pod-beats-ns", {USE: "wp"}, {USE: "mine"}, [gateway(), gateway("mine", wfor="workload")], POD_S,
     ("demo", "mine", POD_S, B)),
    ("unknown-for-is-service", {}, {USE: "wp"}, [gateway(wfor="services")], SVC_S, ("demo", "wp", SVC_S, B)),
    ("missing: svc label", {}, {USE: "gone"}, [gateway()], SVC_S, ("demo", "gone", SVC_S, M)),
    ("missing: ns label, svc", {USE: "gone"}, {}, [], SVC_S, ("demo", "gone", NS_S, M)),
    ("missing: pod label", {}, {USE: "gone"}, [], POD_S, ("demo", "gone", POD_S, M)),
    ("missing: ns label, pod (default for)", {USE: "gone"}, {}, [], POD_S, None),
    ("not-a-waypoint-class", {}, {USE: "wp"}, [gateway(cls="istio")], SVC_S, ("demo", "wp", SVC_S, M)),
    ("other-namespace via label", {}, {USE: "shared", USE_NS: "infra"}, [gateway("shared", "infra")], SVC_S,
     ("infra", "shared", SVC_S, B)),
    ("other-namespace via ns labels", {USE: "shared", USE_NS: "infra"}, {}, [gateway("shared", "infra")], SVC_S,
     ("infra", "shared", NS_S, B)),
    ("ns-namespace-label-not-used-for-own-label", {USE_NS: "infra"}, {USE: "shared"}, [gateway("shared", "infra")],
     SVC_S, ("demo", "shared", SVC_S, M)),
    ("same name other namespace is not it", {}, {USE: "wp"}, [gateway(namespace="infra")], SVC_S,
     ("demo", "wp", SVC_S, M)),
]


@pytest.mark.parametrize("name, ns_labels, labels, gws, source, expected", CASES, ids=[c[0] for c in CASES])
def test_binding_rules(name, ns_labels, labels, gws, source, expected):
    wps = waypoints_of(gws, trust_domain=TD)
    b = waypoint_binding(labels, "demo", ns("demo", **ns_labels), source=source, waypoints=wps)
    if expected is None:
        assert b is None
        return
    assert (b.namespace, b.name, b.source, b.status) == expected
    if b.status is WaypointStatus.MISSING:
        assert b.identity is None
    else:
        assert b.identity == wp_id(b.name, b.namespace)


def test_waypoints_are_published_with_identity_and_for():
    out = translate([ns(), gateway(wfor="all"), gateway("plain", cls="istio")], trust_domain=TD)
    assert out[("Waypoint", "demo/wp")] == Waypoint(name="wp", namespace="demo", waypoint_for=WaypointFor.ALL,
                                                    identity=wp_id())
    assert str(out[("Waypoint", "demo/wp")].identity) == "spiffe://cluster.local/ns/demo/sa/wp"
    assert ("Waypoint", "demo/plain") not in out


def test_translate_binds_services_and_workloads_separately():
    out = translate([ns(**{USE: "wp"}), gateway(), svc(), pod(app="web"),
                     pod("b", ip="10.244.0.3", app="web", **{USE: "gone"})], trust_domain=TD)
    s = out[("Service", "demo/web")]
    assert (s.waypoint_binding.uid, s.waypoint_binding.status) == ("demo/wp", B)
    assert out[("Workload", "demo/a")].waypoint_binding is None  # the waypoint is for services
    b = out[("Workload", "demo/b")].waypoint_binding
    assert (b.uid, b.status, b.source) == ("demo/gone", M, POD_S)
    assert out[("Workload", "demo/b")].waypoint == "gone"  # the raw label is kept as before


def test_bindings_and_waypoints_round_trip_the_wire_and_reach_proxy_state():
    out = translate([ns(**{USE: "wp"}), gateway(wfor="all"), svc(), pod(app="web"),
                     pod("b", ip="10.244.0.3", **{USE: "gone"})], trust_domain=TD)
    snap = Snapshot(version=1, resources=tuple(out.values()))
    (obj,) = FrameDecoder().feed(encode(snap))
    back = decode(obj)
    assert back == snap
    st = ProxyState()
    st.apply_snapshot(back)
    assert st.workload_by_ip(IP("10.244.0.2")).waypoint_binding == WaypointBinding(
        namespace="demo", name="wp", source=NS_S, status=B, identity=wp_id())
    assert st.service_by_vip(IP("10.96.0.10")).waypoint_binding.identity == wp_id()
    assert [w.uid for w in st.waypoints()] == ["demo/wp"]
    assert st.waypoint("demo", "wp").identity == wp_id() and st.waypoint("demo", "nope") is None
    delta = Delta(version=2, upserts=(out[("Waypoint", "demo/wp")],), removals=(("Waypoint", "demo/old"),))
    (obj,) = FrameDecoder().feed(encode(delta))
    assert decode(obj) == delta


def test_removing_the_gateway_turns_bindings_missing():
    docs = [ns(**{USE: "wp"}), gateway(), svc()]
    assert translate(docs, trust_domain=TD)[("Service", "demo/web")].waypoint_binding.status is B
    after = translate(docs[:1] + docs[2:], trust_domain=TD)
    assert after[("Service", "demo/web")].waypoint_binding.status is M
    assert ("Waypoint", "demo/wp") not in after

"""Control-plane translation: enrollment, identities, service endpoints, diffs; proxy state."""
import ipaddress

import pytest

from controlplane.csr_authz import CsrDenied, authorize_csr
from mesh.distribution.protocol import Delta, Snapshot
from controlplane.translate import diff, translate
from mesh.identity import NodeId, SpiffeId
from mesh.model import (Container, FrozenMap, Namespace, ObjectMeta, Pod, Service, ServicePort,
                        TunnelProtocol)
from mesh.state import ProxyState, StateVersionError

TD = "cluster.local"
IP = ipaddress.IPv4Address


def ns(name, **labels):
    return Namespace(meta=ObjectMeta(name=name, labels=FrozenMap(labels)))


def pod(name, namespace="demo", node="n1", ip="10.244.0.2", sa="default", **labels):
    return Pod(meta=ObjectMeta(name=name, namespace=namespace, labels=FrozenMap(labels)),
               node_name=node, service_account=sa, pod_ip=IP(ip) if ip else None,
               containers=(Container(name="c", command=("true",)),))


def svc(name, namespace="demo", vip="10.96.0.10", **selector):
    return Service(meta=ObjectMeta(name=name, namespace=namespace), selector=FrozenMap(selector),
                   ports=(ServicePort(port=80, target_port=8080),), cluster_ip=IP(vip) if vip else None)


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.mark.parametrize("ns_labels, pod_labels, expected", [
    (AMBIENT, {}, TunnelProtocol.HBONE),
    ({}, {}, TunnelProtocol.NONE),
    (AMBIENT, {"istio.io/dataplane-mode": "none"}, TunnelProtocol.NONE),
    ({"istio.io/dataplane-mode": "none"}, {}, TunnelProtocol.NONE),
    ({"istio.io/dataplane-mode": "Ambient"}, {}, TunnelProtocol.NONE),  # values are case-sensitive
    ({}, {"istio.io/dataplane-mode": "ambient"}, TunnelProtocol.NONE),  # pods opt out, not in
])
def test_enrollment(ns_labels, pod_labels, expected):
    out = translate([ns("demo", **ns_labels), pod("a", **pod_labels)], trust_domain=TD)
    assert out[("Workload", "demo/a")].protocol is expected


def test_workload_fields_and_identity():
    out = translate([ns("demo", **AMBIENT), pod("a", sa="web", app="web", node="n2")], trust_domain="td.example")
    w = out[("Workload", "demo/a")]
    assert (w.name, w.namespace, w.node, w.ip) == ("a", "demo", "n2", IP("10.244.0.2"))
    assert w.identity == SpiffeId(trust_domain="td.example", namespace="demo", service_account="web")
    assert w.labels == {"app": "web"}


def test_unscheduled_or_ipless_pods_are_not_workloads():
    out = translate([ns("demo"), pod("a", ip=None), pod("b", node=None)], trust_domain=TD)
    assert not [k for k in out if k[0] == "Workload"]


def test_service_endpoints_follow_selector_and_namespace():
    out = translate([ns("demo"), ns("other"), pod("a", app="web"), pod("b", ip="10.244.0.3", app="db"),
                     pod("c", namespace="other", ip="10.244.0.4", app="web"),
                     svc("web", app="web"), svc("all", vip="10.96.0.11"), svc("novip", vip=None, app="web")],
                    trust_domain=TD)
    web = out[("Service", "demo/web")]
    assert [e.workload_uid for e in web.endpoints] == ["demo/a"]
    assert out[("Service", "demo/all")].endpoints == ()  # empty selector selects nothing
    assert ("Service", "demo/novip") not in out
    assert out[("Workload", "demo/a")].services == ("demo/web",)


def test_waypoint_label_from_service_pod_or_namespace():
    out = translate([ns("demo", **{"istio.io/use-waypoint": "wp"}), pod("a", app="web"),
                     pod("b", ip="10.244.0.3", **{"istio.io/use-waypoint": "own"}), svc("web", app="web")],
                    trust_domain=TD)
    assert out[("Service", "demo/web")].waypoint == "wp"
    assert out[("Workload", "demo/a")].waypoint == "wp"
    assert out[("Workload", "demo/b")].waypoint == "own"


def test_diff_sends_only_changes():
    old = translate([ns("demo"), pod("a"), pod("b", ip="10.244.0.3")], trust_domain=TD)
    new = translate([ns("demo", **AMBIENT), pod("a")], trust_domain=TD)
    upserts, removals = diff(old, new)
    assert removals == [("Workload", "demo/b")]
    assert {type(u).__name__ for u in upserts} == {"Namespace", "Workload"}
    assert diff(new, new) == ([], [])


def test_proxy_state_snapshot_delta_and_indexes():
    st = ProxyState()
    v1 = translate([ns("demo"), pod("a"), svc("web")], trust_domain=TD)
    st.apply_snapshot(Snapshot(version=5, resources=tuple(v1.values())))
    assert st.synced and st.version == 5
    assert st.workload_by_ip(IP("10.244.0.2")).uid == "demo/a"
    assert st.service_by_vip(IP("10.96.0.10")).name == "web"
    v2 = translate([ns("demo"), pod("b", ip="10.244.0.9")], trust_domain=TD)
    up, rm = diff(v1, v2)
    st.apply_delta(Delta(version=6, upserts=tuple(up), removals=tuple(rm)))
    assert st.workload_by_ip(IP("10.244.0.2")) is None
    assert st.workload_by_ip(IP("10.244.0.9")).uid == "demo/b"
    assert st.service_by_vip(IP("10.96.0.10")) is None
    with pytest.raises(StateVersionError):
        st.apply_delta(Delta(version=6))
    with pytest.raises(StateVersionError):
        ProxyState().apply_delta(Delta(version=1))


NODE1 = NodeId(trust_domain=TD, node="n1")
WEB = SpiffeId(trust_domain=TD, namespace="demo", service_account="web")


@pytest.mark.parametrize("requester, requested, pods, reason", [
    (NODE1, WEB, [pod("a", sa="web", node="n1")], None),
    (NODE1, WEB, [pod("a", sa="web", node="n2")], "identity_not_on_node"),
    (NODE1, WEB, [pod("a", sa="other", node="n1")], "identity_not_on_node"),
    (NODE1, WEB, [pod("a", namespace="prod", sa="web", node="n1")], "identity_not_on_node"),
    (NODE1, SpiffeId(trust_domain="evil", namespace="demo", service_account="web"),
     [pod("a", sa="web")], "wrong_trust_domain"),
    (WEB, WEB, [], None),
    (WEB, SpiffeId(trust_domain=TD, namespace="demo", service_account="db"), [], "identity_mismatch"),
])
def test_csr_authorization(requester, requested, pods, reason):
    if reason is None:
        authorize_csr(requester, requested, trust_domain=TD, pods=pods)
    else:
        with pytest.raises(CsrDenied) as e:
            authorize_csr(requester, requested, trust_domain=TD, pods=pods)
        assert e.value.reason == reason

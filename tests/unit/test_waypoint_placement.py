"""Waypoint placement in local mode (pure): Gateway checks, the synthesized ServiceAccount and Pod, who binds."""
import ipaddress

import pytest

from controlplane.translate import translate
from localcluster import waypoints
from mesh.model import FrozenMap, Namespace, ObjectMeta, Pod, PolicyObject, ResourceKey, Service, ServiceAccount, freeze
from mesh.model.resources import ServicePort


def gw(name="wp", ns="demo", cls="istio-waypoint", listeners=({"name": "mesh", "port": 15008, "protocol": "HBONE"},)):
    return PolicyObject(meta=ObjectMeta(name=name, namespace=ns), policy_kind="Gateway",
                        api_version="gateway.networking.k8s.io/v1",
                        spec=freeze({"gatewayClassName": cls, "listeners": list(listeners)}))


@pytest.mark.parametrize("listeners, ok", [
    ([{"name": "mesh", "port": 15008, "protocol": "HBONE"}], True),
    ([{"name": "http", "port": 80, "protocol": "HTTP"}, {"name": "mesh", "port": 15008, "protocol": "HBONE"}], True),
    ([{"name": "mesh", "port": 15008, "protocol": "TCP"}], False),
    ([{"name": "mesh", "port": 15009, "protocol": "HBONE"}], False),
    ([], False),
])
def test_gateway_needs_the_hbone_listener(listeners, ok):
    problem = waypoints.gateway_problem(gw(listeners=listeners))
    assert (problem is None) == ok
    if not ok:
        assert problem[0] == "spec.listeners" and "port: 15008, protocol: HBONE" in problem[1]


def test_only_istio_waypoint_gateways_are_deployed():
    assert waypoints.is_waypoint_gateway(gw())
    assert not waypoints.is_waypoint_gateway(gw(cls="istio"))


def test_synthesized_objects_are_owned_labelled_and_stable():
    sa, pod = waypoints.synthesize(gw(), {})
    assert isinstance(sa, ServiceAccount) and sa.key == ResourceKey("ServiceAccount", "demo", "wp")
    assert pod.key == ResourceKey("Pod", "demo", "wp-waypoint") and pod.containers == ()
    assert pod.service_account == "wp" and pod.opted_out
    assert pod.labels["gateway.networking.k8s.io/gateway-name"] == "wp"
    assert waypoints.owner_of(pod) == waypoints.owner_of(sa) == ResourceKey("Gateway", "demo", "wp")
    placed = Pod(meta=pod.meta, service_account="wp", node_name="n1", pod_ip=ipaddress.IPv4Address("10.244.0.9"))
    _, again = waypoints.synthesize(gw(), {sa.key: sa, pod.key: placed})
    assert again is placed  # re-applying keeps node and IP: nothing changes


def test_the_users_own_service_account_is_left_alone():
    mine = ServiceAccount(meta=ObjectMeta(name="wp", namespace="demo"))
    (pod,) = waypoints.synthesize(gw(), {mine.key: mine})
    assert isinstance(pod, Pod) and waypoints.owner_of(mine) is None


def test_users_of_lists_bound_services_pods_and_namespaces_and_the_missing():
    ns = Namespace(meta=ObjectMeta(name="demo", labels=FrozenMap({"istio.io/use-waypoint": "wp"})))
    svc = lambda name, **labels: Service(  # noqa: E731
        meta=ObjectMeta(name=name, namespace="demo", labels=FrozenMap(labels)), selector=FrozenMap({"app": "x"}),
        ports=(ServicePort(port=80, target_port=80),), cluster_ip=ipaddress.IPv4Address(f"10.96.0.{len(name)}"))
    pod = Pod(meta=ObjectMeta(name="p", namespace="demo", labels=FrozenMap({"istio.io/use-waypoint": "gone"})),
              node_name="n1", pod_ip=ipaddress.IPv4Address("10.244.0.3"))
    out = translate([ns, gw(listeners=[]), gw("all"), svc("a"), svc("bb", **{"istio.io/use-waypoint": "all"}),
                     svc("ccc", **{"istio.io/use-waypoint": "gone"}), pod], trust_domain="td")
    bound, missing = waypoints.users_of(out.values())
    assert bound["demo/wp"].as_dict() == {"services": [], "pods": [], "namespaces": ["demo"]}
    assert bound["demo/all"].services == ("demo/bb",)
    assert missing["demo/gone"].as_dict() == {"services": ["demo/ccc"], "pods": ["demo/p"], "namespaces": []}

"""ztunnel's pure decisions: outbound plans and inbound CONNECT authority checks (tables)."""
import ipaddress
import random

import pytest

from mesh.distribution.protocol import Snapshot
from controlplane.translate import translate
from mesh.model import (Container, FrozenMap, Namespace, ObjectMeta, Pod, Service, ServicePort)
from mesh.state import ProxyState
from ztunnel.inbound.validate import BadAuthority, target_of
from ztunnel.outbound.plan import PlanError, Route, plan_outbound

AMB = {"istio.io/dataplane-mode": "ambient"}


def pod(name, ns, ip, **labels):
    return Pod(meta=ObjectMeta(name=name, namespace=ns, labels=FrozenMap(labels)), node_name="n1",
               service_account="sa", pod_ip=ipaddress.IPv4Address(ip),
               containers=(Container(name="c", command=("x",)),))


def svc(name, ns, vip, selector, ports):
    return Service(meta=ObjectMeta(name=name, namespace=ns), selector=FrozenMap(selector),
                   cluster_ip=ipaddress.IPv4Address(vip),
                   ports=tuple(ServicePort(port=p, target_port=t) for p, t in ports))


@pytest.fixture(scope="module")
def state():
    st = ProxyState()
    objs = translate([
        Namespace(meta=ObjectMeta(name="mesh", labels=FrozenMap(AMB))), Namespace(meta=ObjectMeta(name="plain")),
        pod("client", "mesh", "10.244.0.2", app="client"), pod("web", "mesh", "10.244.1.2", app="web"),
        pod("optout", "mesh", "10.244.1.3", app="web2", **{"istio.io/dataplane-mode": "none"}),
        pod("legacy", "plain", "10.244.1.4", app="legacy"),
        svc("web", "mesh", "10.96.0.10", {"app": "web"}, [(80, 8080), (81, "http")]),
        svc("legacy", "plain", "10.96.0.11", {"app": "legacy"}, [(80, 9090)]),
        svc("empty", "mesh", "10.96.0.12", {"app": "nobody"}, [(80, 80)]),
    ], trust_domain="cluster.local")
    st.apply_snapshot(Snapshot(version=1, resources=tuple(objs.values())))
    return st


@pytest.mark.parametrize("dst, route, connect, authority", [
    (("10.244.1.2", 8080), Route.HBONE, ("10.244.1.2", 15008), "10.244.1.2:8080"),
    (("10.244.0.2", 9000), Route.HBONE, ("10.244.0.2", 15008), "10.244.0.2:9000"),   # same node too
    (("10.244.1.3", 8080), Route.PASSTHROUGH, ("10.244.1.3", 8080), ""),            # pod opted out
    (("10.244.1.4", 9090), Route.PASSTHROUGH, ("10.244.1.4", 9090), ""),            # plain namespace
    (("10.244.9.9", 80), Route.PASSTHROUGH, ("10.244.9.9", 80), ""),                # unknown address
    (("10.96.0.10", 80), Route.HBONE, ("10.244.1.2", 15008), "10.244.1.2:8080"),    # VIP -> endpoint
    (("10.96.0.11", 80), Route.PASSTHROUGH, ("10.244.1.4", 9090), ""),              # VIP of a plain svc
])
def test_outbound_plan(state, dst, route, connect, authority):
    src = state.workload("mesh/client")
    plan = plan_outbound(state, src, *dst, random.Random(0))
    assert (plan.route, plan.connect, plan.authority) == (route, connect, authority)
    if route is Route.HBONE:
        assert plan.dst_identity == plan.dst_workload.identity


@pytest.mark.parametrize("dst, reason", [
    (("10.96.0.12", 80), "no_healthy_upstream"),
    (("10.96.0.10", 443), "no_service_port"),
    (("10.96.0.10", 81), "named_target_port"),
])
def test_outbound_plan_errors(state, dst, reason):
    with pytest.raises(PlanError) as e:
        plan_outbound(state, state.workload("mesh/client"), *dst, random.Random(0))
    assert e.value.reason == reason


def test_vip_spreads_over_endpoints():
    st = ProxyState()
    objs = translate([Namespace(meta=ObjectMeta(name="mesh", labels=FrozenMap(AMB))),
                      pod("a", "mesh", "10.244.0.2", app="w"), pod("b", "mesh", "10.244.0.3", app="w"),
                      svc("w", "mesh", "10.96.0.10", {"app": "w"}, [(80, 80)])], trust_domain="td")
    st.apply_snapshot(Snapshot(version=1, resources=tuple(objs.values())))
    rng = random.Random(7)
    seen = {plan_outbound(st, st.workload("mesh/a"), "10.96.0.10", 80, rng).connect[0] for _ in range(50)}
    assert seen == {"10.244.0.2", "10.244.0.3"}


@pytest.mark.parametrize("authority, result", [
    ("10.244.0.5:8080", ("10.244.0.5", 8080)),
    ("10.244.0.5:1", ("10.244.0.5", 1)),
    ("10.244.0.6:8080", "authority_not_local"),
    ("web.mesh.svc:8080", "authority_not_ip"),
    ("10.244.0.5", "authority_without_port"),
    (":8080", "authority_without_port"),
    ("10.244.0.5:0", "authority_bad_port"),
    ("10.244.0.5:65536", "authority_bad_port"),
    ("10.244.0.5:-1", "authority_bad_port"),
    ("10.244.0.5:80a", "authority_bad_port"),
    ("[::1]:80", "authority_not_ip"),
])
def test_inbound_authority(authority, result):
    if isinstance(result, tuple):
        assert target_of(authority, "10.244.0.5") == result
    else:
        with pytest.raises(BadAuthority) as e:
            target_of(authority, "10.244.0.5")
        assert e.value.reason == result and e.value.status == 400


def test_plan_follows_deltas_of_addresses():
    from dataclasses import replace

    from mesh.distribution.protocol import Delta
    st = ProxyState()
    objs = translate([Namespace(meta=ObjectMeta(name="mesh", labels=FrozenMap(AMB))),
                      pod("a", "mesh", "10.244.0.2", app="w"), pod("b", "mesh", "10.244.0.3", app="w"),
                      svc("w", "mesh", "10.96.0.10", {"app": "w"}, [(80, 80)])], trust_domain="td")
    st.apply_snapshot(Snapshot(version=1, resources=tuple(objs.values())))
    src, rng = st.workload("mesh/a"), random.Random(0)
    moved = replace(st.workload("mesh/b"), ip=ipaddress.IPv4Address("10.244.0.9"))
    service = next(o for o in objs.values() if getattr(o, "vip", None) is not None)
    st.apply_delta(Delta(version=2, upserts=(moved, replace(service, vip=ipaddress.IPv4Address("10.96.0.20")))))
    assert plan_outbound(st, src, "10.244.0.3", 80, rng).route is Route.PASSTHROUGH  # nobody there now
    assert plan_outbound(st, src, "10.244.0.9", 80, rng).dst_workload == moved
    assert plan_outbound(st, src, "10.96.0.10", 80, rng).route is Route.PASSTHROUGH  # the old VIP
    assert plan_outbound(st, src, "10.96.0.20", 80, rng).service.vip == ipaddress.IPv4Address("10.96.0.20")


@pytest.mark.parametrize("dst", ["10.244.1.02", "10.244.1", "web", "::1"])
def test_outbound_plan_refuses_what_is_not_an_ipv4_address(state, dst):
    with pytest.raises(ValueError):
        plan_outbound(state, state.workload("mesh/client"), dst, 80, random.Random(0))

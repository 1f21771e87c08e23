"""ProxyState's indexes: kept current by snapshots and deltas, equal to a full scan of the objects."""
import ipaddress
import random

import pytest

from mesh.distribution.protocol import Delta, Snapshot, resource_ref
from mesh.identity import SpiffeId
from mesh.model import FrozenMap, Namespace, ObjectMeta, ServiceInfo, TunnelProtocol, Workload
from mesh.model.policy import (ROOT_NAMESPACE, Action, AuthorizationPolicy, MtlsMode, Operation,
                               PeerAuthentication, Rule, Source, StringMatch, TargetRef)
from mesh.state import ProxyState
from ztunnel.authz import Connection, applies, effective_mtls, evaluate, evaluate_applicable

TD = "cluster.local"
IP = ipaddress.IPv4Address


def wl(name, ns="foo", ip="10.0.0.1", node="n1", **labels):
    return Workload(uid=f"{ns}/{name}", name=name, namespace=ns, node=node, ip=IP(ip), service_account="sa",
                    identity=SpiffeId(trust_domain=TD, namespace=ns, service_account="sa"),
                    protocol=TunnelProtocol.HBONE, labels=FrozenMap(labels))


def svc(name, ns="foo", vip="10.96.0.1"):
    return ServiceInfo(name=name, namespace=ns, vip=IP(vip))


def ap(name, ns="foo", selector=None, action=Action.ALLOW, target_refs=(), rules=(Rule(),)):
    return AuthorizationPolicy(meta=ObjectMeta(name=name, namespace=ns), action=action,
                               selector=None if selector is None else FrozenMap(selector),
                               target_refs=target_refs, rules=rules)


def pa(name, ns="foo", selector=None, mode=MtlsMode.STRICT):
    return PeerAuthentication(meta=ObjectMeta(name=name, namespace=ns), mode=mode,
                              selector=None if selector is None else FrozenMap(selector))


def state(*objs):
    st = ProxyState()
    st.apply_snapshot(Snapshot(version=1, resources=objs))
    return st


def delta(st, *upserts, removals=()):
    st.apply_delta(Delta(version=st.version + 1, upserts=upserts, removals=tuple(removals)))


def names(policies):
    return [f"{p.namespace}/{p.name}" for p in policies]


# -- workloads and services


def test_snapshot_indexes_workloads_and_services():
    a, b, c = wl("a", ip="10.0.0.1", node="n1"), wl("b", ip="10.0.0.2", node="n2"), wl("c", ns="bar", ip="10.0.0.3")
    s = svc("web", vip="10.96.0.9")
    st = state(c, b, a, s)
    assert st.workloads() == [c, a, b]  # by uid: bar/c, foo/a, foo/b
    assert (st.workload_by_ip(IP("10.0.0.2")), st.workload_by_ip(IP("10.0.0.9"))) == (b, None)
    assert st.workload("foo/a") is a and st.workload("foo/zz") is None
    assert st.workloads_on_node("n1") == [c, a] and st.workloads_on_node("n2") == [b]
    assert st.workloads_on_node("n3") == []
    assert st.service_by_vip(IP("10.96.0.9")) is s and st.service("foo/web") is s and st.service("bar/web") is None


def test_a_workload_changing_ip_and_node_moves_its_entries():
    a = wl("a", ip="10.0.0.1", node="n1")
    st = state(a, wl("b", ip="10.0.0.2", node="n1"))
    moved = wl("a", ip="10.0.0.7", node="n2")
    delta(st, moved)
    assert st.workload_by_ip(IP("10.0.0.1")) is None
    assert st.workload_by_ip(IP("10.0.0.7")) is moved
    assert [w.uid for w in st.workloads_on_node("n1")] == ["foo/b"]
    assert st.workloads_on_node("n2") == [moved]
    assert st.workload("foo/a") is moved and len(st.workloads()) == 2


def test_removing_a_workload_and_a_service_drops_every_entry():
    a, s = wl("a", ip="10.0.0.1", node="n1"), svc("web", vip="10.96.0.9")
    st = state(a, s, wl("b", ip="10.0.0.2", node="n2"))
    delta(st, removals=[("Workload", "foo/a"), ("Service", "foo/web"), ("Workload", "foo/nobody")])
    assert st.workload_by_ip(IP("10.0.0.1")) is None and st.workload("foo/a") is None
    assert st.workloads_on_node("n1") == [] and [w.uid for w in st.workloads()] == ["foo/b"]
    assert st.service_by_vip(IP("10.96.0.9")) is None and st.services() == []


def test_a_service_changing_vip_moves_its_entry():
    st = state(svc("web", vip="10.96.0.9"))
    new = svc("web", vip="10.96.0.10")
    delta(st, new)
    assert st.service_by_vip(IP("10.96.0.9")) is None and st.service_by_vip(IP("10.96.0.10")) is new


def test_an_ip_claimed_twice_resolves_like_a_rebuild_and_hands_over_on_removal():
    # A pod replaced by one that reuses its IP, the old one's removal arriving a delta later.
    old, new = wl("web-1", ip="10.0.0.5"), wl("web-2", ip="10.0.0.5")
    st = state(old)
    delta(st, new)
    assert st.workload_by_ip(IP("10.0.0.5")) is new  # greatest uid, as {w.ip: w for w in sorted(...)}
    assert state(old, new).workload_by_ip(IP("10.0.0.5")) is new  # the same from a snapshot
    delta(st, removals=[("Workload", "foo/web-2")])
    assert st.workload_by_ip(IP("10.0.0.5")) is old  # the remaining claim takes over
    delta(st, removals=[("Workload", "foo/web-1")])
    assert st.workload_by_ip(IP("10.0.0.5")) is None


def test_listings_stay_sorted_through_deltas():
    st = state(ap("m"), ap("b", ns="zz"), Namespace(meta=ObjectMeta(name="foo")))
    delta(st, ap("a"), ap("z", ns="aa"), Namespace(meta=ObjectMeta(name="bar")), removals=[("AuthorizationPolicy", "zz/b")])
    assert names(st.authorization_policies()) == ["aa/z", "foo/a", "foo/m"]
    assert [n.name for n in st.namespaces()] == ["bar", "foo"]
    st.authorization_policies().clear()  # a copy: callers cannot damage the index
    assert len(st.authorization_policies()) == 3


# -- policies that apply to a workload

WEB = wl("web", app="web", version="v1")


@pytest.mark.parametrize("policy, applies_to_web", [
    (ap("ns-wide"), True),
    (ap("other-ns", ns="bar"), False),
    (ap("selects-web", selector={"app": "web"}), True),
    (ap("selects-both-labels", selector={"app": "web", "version": "v1"}), True),
    (ap("one-label-differs", selector={"app": "web", "version": "v2"}), False),
    (ap("label-web-lacks", selector={"app": "web", "tier": "front"}), False),
    (ap("empty-selector", selector={}), True),
    (ap("selects-other", selector={"app": "db"}), False),
    (ap("mesh-wide", ns=ROOT_NAMESPACE), True),
    (ap("root-selector", ns=ROOT_NAMESPACE, selector={"version": "v1"}), True),
    (ap("root-selector-miss", ns=ROOT_NAMESPACE, selector={"version": "v2"}), False),
    (ap("other-ns-selector", ns="bar", selector={"app": "web"}), False),
    (ap("waypoint", target_refs=(TargetRef(kind="Service", name="web"),)), False),
])
def test_authorization_policy_scope(policy, applies_to_web):
    st = state(WEB, policy)
    assert st.policies_for(WEB).authorization == ((policy,) if applies_to_web else ())
    assert applies(policy, WEB) is applies_to_web  # the same rule authz applies


@pytest.mark.parametrize("peer_auth, kept", [
    (pa("ns-wide"), True),
    (pa("selects-web", selector={"app": "web"}), True),
    (pa("empty-selector", selector={}), True),
    (pa("selects-other", selector={"app": "db"}), False),
    (pa("other-ns", ns="bar"), False),
    (pa("mesh-wide", ns=ROOT_NAMESPACE), True),
    (pa("root-selector", ns=ROOT_NAMESPACE, selector={"app": "web"}), False),  # selects nothing outside root
])
def test_peer_authentication_scope(peer_auth, kept):
    st = state(WEB, peer_auth)
    assert st.policies_for(WEB).peer_authentications == ((peer_auth,) if kept else ())
    plain = Connection(src_identity=None, src_ip=IP("10.0.9.9"), dst_ip=WEB.ip, dst_port=8080)
    assert (effective_mtls([peer_auth], WEB, 8080) is MtlsMode.STRICT) is kept
    assert evaluate_applicable(st.policies_for(WEB), WEB, plain) == evaluate([], [peer_auth], WEB, plain)


def test_root_namespace_workloads_get_root_selector_policies():
    w = wl("ctl", ns=ROOT_NAMESPACE, app="ctl")
    p, q = pa("sel", ns=ROOT_NAMESPACE, selector={"app": "ctl"}), ap("sel", ns=ROOT_NAMESPACE, selector={"app": "ctl"})
    st = state(w, p, q, ap("all", ns=ROOT_NAMESPACE))
    got = st.policies_for(w)
    assert got.peer_authentications == (p,)
    assert names(got.authorization) == ["istio-system/all", "istio-system/sel"]  # each once


def test_applicable_policies_come_in_evaluation_order():
    st = state(WEB, ap("z"), ap("a", selector={"app": "web"}), ap("m", ns=ROOT_NAMESPACE),
               ap("b", ns=ROOT_NAMESPACE, selector={"version": "v1"}), ap("c", ns="bar"))
    assert names(st.policies_for(WEB).authorization) == ["foo/a", "foo/z", "istio-system/b", "istio-system/m"]
    # the first matching DENY names the decision: the order decides which policy is reported
    st = state(WEB, ap("z", action=Action.DENY), ap("b", ns=ROOT_NAMESPACE, action=Action.DENY))
    c = Connection(src_identity=None, src_ip=IP("10.0.9.9"), dst_ip=WEB.ip, dst_port=80)
    assert evaluate_applicable(st.policies_for(WEB), WEB, c).policy == "foo/z"


def test_a_label_change_moves_a_workload_in_and_out_of_a_selector():
    sel = ap("v2-only", selector={"version": "v2"})
    st = state(WEB, sel, ap("ns-wide"))
    assert names(st.policies_for(WEB).authorization) == ["foo/ns-wide"]
    v2 = wl("web", app="web", version="v2")
    delta(st, v2)
    assert names(st.policies_for(v2).authorization) == ["foo/ns-wide", "foo/v2-only"]
    assert st.policies_for(st.workload("foo/web")) is st.policies_for(v2)  # memoised per labels
    v3 = wl("web", app="web", version="v3")
    delta(st, v3)
    assert names(st.policies_for(v3).authorization) == ["foo/ns-wide"]


@pytest.mark.parametrize("change, expect", [
    ("add-ns-policy", ["foo/base", "foo/new"]),
    ("add-root-policy", ["foo/base", "istio-system/new"]),
    ("add-other-ns-policy", ["foo/base"]),
    ("remove-policy", []),
    ("selector-stops-matching", []),
    ("selector-starts-matching", ["foo/base", "foo/sel"]),
    ("becomes-waypoint-policy", []),
])
def test_policy_deltas_reach_an_already_looked_up_workload(change, expect):
    st = state(WEB, ap("base"), ap("sel", selector={"app": "db"}))
    st.policies_for(WEB)  # memoised before the change: the change must not leave it stale
    v = {"add-ns-policy": lambda: delta(st, ap("new")),
         "add-root-policy": lambda: delta(st, ap("new", ns=ROOT_NAMESPACE)),
         "add-other-ns-policy": lambda: delta(st, ap("new", ns="bar")),
         "remove-policy": lambda: delta(st, removals=[("AuthorizationPolicy", "foo/base")]),
         "selector-stops-matching": lambda: delta(st, ap("base", selector={"app": "db"})),
         "selector-starts-matching": lambda: delta(st, ap("sel", selector={"app": "web"})),
         "becomes-waypoint-policy": lambda: delta(st, ap("base", target_refs=(TargetRef(kind="Service", name="w"),))),
         }[change]
    v()
    assert names(st.policies_for(WEB).authorization) == expect
    assert len(st.authorization_policies()) == (1 if change == "remove-policy" else 3 if change.startswith("add") else 2)


def test_peer_authentication_deltas_reach_the_lookup():
    st = state(WEB)
    plain = Connection(src_identity=None, src_ip=IP("10.0.9.9"), dst_ip=WEB.ip, dst_port=8080)
    assert evaluate_applicable(st.policies_for(WEB), WEB, plain).allowed
    delta(st, pa("default", ns=ROOT_NAMESPACE))
    assert evaluate_applicable(st.policies_for(WEB), WEB, plain).reason == "mtls_required"
    delta(st, pa("web", selector={"app": "web"}, mode=MtlsMode.PERMISSIVE))
    assert evaluate_applicable(st.policies_for(WEB), WEB, plain).allowed
    delta(st, removals=[("PeerAuthentication", "foo/web")])
    assert evaluate_applicable(st.policies_for(WEB), WEB, plain).reason == "mtls_required"


# -- the indexes against a full scan, over random histories

NAMESPACES = ("foo", "bar", ROOT_NAMESPACE)
LABELS = {"app": ("web", "db"), "version": ("v1", "v2"), "tier": ("front",)}


def _labels(rng):
    return {k: rng.choice(vs) for k, vs in LABELS.items() if rng.random() < 0.6}


def _selector(rng):
    r = rng.random()
    return None if r < 0.3 else {} if r < 0.4 else _labels(rng) or {"app": "web"}


def _random_object(rng):
    kind = rng.randrange(4)
    ns, n = rng.choice(NAMESPACES), rng.randrange(6)
    if kind == 0:
        return wl(f"w{n}", ns=ns, ip=f"10.0.0.{rng.randrange(5)}", node=f"n{rng.randrange(3)}", **_labels(rng))
    if kind == 1:
        return svc(f"s{n}", ns=ns, vip=f"10.96.0.{rng.randrange(4)}")
    if kind == 2:
        rule = Rule(sources=(Source(namespaces=(StringMatch.parse(rng.choice(NAMESPACES)),)),) if rng.random() < 0.5 else (),
                    operations=(Operation(ports=(rng.choice((80, 8080)),)),) if rng.random() < 0.5 else ())
        return ap(f"p{n}", ns=ns, selector=_selector(rng), action=rng.choice((Action.ALLOW, Action.DENY)),
                  target_refs=(TargetRef(kind="Service", name="x"),) if rng.random() < 0.1 else (), rules=(rule,))
    return pa(f"m{n}", ns=ns, selector=_selector(rng), mode=rng.choice(tuple(MtlsMode)))


def _check_against_full_scan(st, objects, rng):
    by_kind = {}
    for (kind, _), o in objects.items():
        by_kind.setdefault(kind, []).append(o)
    workloads = sorted(by_kind.get("Workload", []), key=lambda w: w.uid)
    services = sorted(by_kind.get("Service", []), key=lambda s: s.uid)
    aps = sorted(by_kind.get("AuthorizationPolicy", []), key=lambda p: (p.namespace, p.name))
    pas = sorted(by_kind.get("PeerAuthentication", []), key=lambda p: (p.namespace, p.name))
    assert st.workloads() == workloads and st.services() == services
    assert st.authorization_policies() == aps and st.peer_authentications() == pas
    by_ip, by_vip = {w.ip: w for w in workloads}, {s.vip: s for s in services}
    for i in range(6):
        assert st.workload_by_ip(IP(f"10.0.0.{i}")) == by_ip.get(IP(f"10.0.0.{i}"))
        assert st.service_by_vip(IP(f"10.96.0.{i}")) == by_vip.get(IP(f"10.96.0.{i}"))
    for node in ("n0", "n1", "n2"):
        assert st.workloads_on_node(node) == [w for w in workloads if w.node == node]
    for w in workloads:
        got = st.policies_for(w)
        assert list(got.authorization) == [p for p in aps if applies(p, w)]
        for port in (80, 8080):
            assert effective_mtls(got.peer_authentications, w, port) is effective_mtls(pas, w, port)
        src = rng.choice((None, SpiffeId(trust_domain=TD, namespace=rng.choice(NAMESPACES), service_account="sa")))
        c = Connection(src_identity=src, src_ip=IP("10.1.0.1"), dst_ip=w.ip, dst_port=rng.choice((80, 8080)))
        assert evaluate_applicable(got, w, c) == evaluate(aps, pas, w, c)


@pytest.mark.parametrize("seed", range(8))
def test_indexes_equal_a_full_scan_after_every_delta(seed):
    rng = random.Random(seed)
    objects = {}
    for _ in range(25):
        o = _random_object(rng)
        objects[resource_ref(o)] = o
    st = state(*objects.values())
    _check_against_full_scan(st, objects, rng)
    for _ in range(40):
        upserts = [_random_object(rng) for _ in range(rng.randrange(3))]
        removals = rng.sample(sorted(objects), k=min(len(objects), rng.randrange(3)))
        removals.append(("Workload", "foo/never-there"))
        for ref in removals:
            objects.pop(ref, None)
        for o in upserts:
            objects[resource_ref(o)] = o
        delta(st, *upserts, removals=removals)
        _check_against_full_scan(st, objects, rng)

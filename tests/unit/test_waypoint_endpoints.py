"""Per-cluster endpoint state (waypoint/endpoints.py): cluster keys, DestinationRule merge, hash keys,
refresh in place on state changes, outlier feedback from reports, and the envoy_cluster_* exposition."""
from __future__ import annotations

import ipaddress
import random
import textwrap
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.config import load_text
from mesh.distribution.protocol import Snapshot
from mesh.identity import SpiffeId
from mesh.model import Endpoint, ServiceInfo, TunnelProtocol, Workload
from mesh.model.base import FrozenMap
from mesh.model.resources import ServicePort
from mesh.model.route import (ConnectionPool, ConsistentHash, HTTPCookie, HTTPSettings, LoadBalancer,
                              OutlierDetection, TCPSettings, TrafficPolicy)
from mesh.state import ProxyState
from waypoint.endpoints import (ClusterConfig, Clusters, HashRequest, cluster_exposition, cluster_key,
                                request_hash_key, traffic_policy)
from waypoint.plan import Forward
from waypoint.resilience import Algorithm, AttemptOutcome, OutcomeKind
from waypoint.resilience.circuit import UNLIMITED

ID = SpiffeId(trust_domain="cluster.local", namespace="shop", service_account="r")


def _w(i: int, version: str = "v1") -> Workload:
    return Workload(uid=f"shop/r-{i}", name=f"r-{i}", namespace="shop", node="n",
                    ip=ipaddress.IPv4Address(f"10.0.0.{i}"), service_account="r", identity=ID,
                    protocol=TunnelProtocol.HBONE, labels=FrozenMap({"version": version}), services=("shop/r",))


def _svc(ws) -> ServiceInfo:
    return ServiceInfo(name="r", namespace="shop", vip=ipaddress.IPv4Address("10.96.0.1"),
                       ports=(ServicePort(port=80, target_port=8080, name="http"),),
                       endpoints=tuple(Endpoint(workload_uid=w.uid, ip=w.ip) for w in ws))


class World:
    """A ProxyState fed by snapshots, as the control-plane client feeds it."""

    def __init__(self, ws, yaml: str = "") -> None:
        self.state = ProxyState()
        self.version = 0
        self.put(ws, yaml)

    def put(self, ws, yaml: str = "") -> None:
        self.ws = list(ws)
        self.svc = _svc(self.ws)
        objs = [*self.ws, self.svc, *(load_text(textwrap.dedent(yaml), "t.yaml") if yaml else [])]
        self.version += 1
        self.state.apply_snapshot(Snapshot(version=self.version, resources=tuple(objs)))

    def fwd(self, subset: str = "", labels=None) -> Forward:
        return Forward(service=self.svc, port=80, target_port=8080, subset=subset,
                       subset_labels=FrozenMap(labels) if labels else None)


def dr(spec: str) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r, namespace: shop}\n"
            "spec:\n  host: r\n" + textwrap.indent(textwrap.dedent(spec), "  "))


RESP = {s: AttemptOutcome(kind=OutcomeKind.RESPONSE, status=s) for s in (200, 404, 500, 503)}


# -- keys and configuration --------------------------------------------------------------------

def test_cluster_keys_name_port_subset_and_host():
    w = World([_w(1)])
    assert cluster_key(w.fwd()) == "outbound|80||r.shop.svc.cluster.local"
    assert cluster_key(w.fwd("v1", {"version": "v1"})) == "outbound|80|v1|r.shop.svc.cluster.local"
    pod = Forward(service=None, port=8080, target_port=8080, workload=_w(3))
    assert cluster_key(pod) == "outbound|8080||10.0.0.3"


OD = OutlierDetection(consecutive_5xx_errors=3)
POOL = ConnectionPool(tcp=TCPSettings(max_connections=4))


@pytest.mark.parametrize("top, sub, want", [
    (None, None, None),
    (TrafficPolicy(outlier_detection=OD), None, TrafficPolicy(outlier_detection=OD)),
    (None, TrafficPolicy(connection_pool=POOL), TrafficPolicy(connection_pool=POOL)),
    # the subset's fields replace the top-level ones they set; the others stay
    (TrafficPolicy(outlier_detection=OD, load_balancer=LoadBalancer.RANDOM),
     TrafficPolicy(connection_pool=POOL),
     TrafficPolicy(outlier_detection=OD, connection_pool=POOL, load_balancer=LoadBalancer.RANDOM)),
    # loadBalancer is one field: a subset's consistentHash replaces the top-level simple policy
    (TrafficPolicy(load_balancer=LoadBalancer.RANDOM),
     TrafficPolicy(consistent_hash=ConsistentHash(use_source_ip=True)),
     TrafficPolicy(consistent_hash=ConsistentHash(use_source_ip=True))),
])
def test_subset_policy_merges_over_the_top_level_one(top, sub, want):
    from mesh.model.resources import ObjectMeta
    from mesh.model.route import DestinationRule, Subset
    d = DestinationRule(meta=ObjectMeta(name="r", namespace="shop"), host="r", traffic_policy=top,
                        subsets=(Subset(name="v1", labels=FrozenMap({"version": "v1"}), traffic_policy=sub),))
    svc = _svc([_w(1)])
    assert traffic_policy([d], svc, "v1" if sub is not None or want is not None else "") == want
    assert traffic_policy([d], svc, "") == top


def test_cluster_config_defaults_are_istios_except_the_balancer():
    c = ClusterConfig.from_policy(None)
    assert c.balancer.algorithm is Algorithm.PEAK_EWMA      # Istio: LEAST_REQUEST
    assert c.outlier is None                                # Istio: none without outlierDetection
    assert (c.limits.max_connections, c.limits.max_pending_requests, c.limits.max_requests) == (UNLIMITED,) * 3
    assert (c.limits.connect_timeout, c.limits.idle_timeout) == (10.0, 3600.0)
    c = ClusterConfig.from_policy(TrafficPolicy(
        outlier_detection=OutlierDetection(), load_balancer=LoadBalancer.LEAST_REQUEST,
        connection_pool=ConnectionPool(tcp=TCPSettings(max_connections=1, connect_timeout=0.5),
                                       http=HTTPSettings(http1_max_pending_requests=2, max_requests_per_connection=1))))
    assert c.balancer.algorithm is Algorithm.LEAST_REQUEST
    o = c.outlier
    assert (o.consecutive_5xx, o.consecutive_gateway, o.interval, o.base_ejection_time, o.max_ejection_percent,
            o.min_health_percent) == (5, None, 10.0, 30.0, 10, 0)
    assert (c.limits.max_connections, c.limits.max_pending_requests, c.limits.connect_timeout,
            c.limits.max_requests_per_connection) == (1, 2, 0.5, 1)


# -- hash keys ----------------------------------------------------------------------------------

REQ = HashRequest(headers=((b"x-user", b"ann"), (b"cookie", b"a=1; sid=42"), (b"x-user", b"bob")),
                  query=b"u=z&u=y&e=", source_ip="10.1.2.3")


@pytest.mark.parametrize("policy, want", [
    (ConsistentHash(http_header_name="x-user"), b"ann"),           # the first value
    (ConsistentHash(http_header_name="X-User"), b"ann"),
    (ConsistentHash(http_header_name="x-none"), None),
    (ConsistentHash(http_cookie=HTTPCookie(name="sid")), b"42"),
    (ConsistentHash(http_cookie=HTTPCookie(name="nope")), None),
    (ConsistentHash(http_query_parameter_name="u"), b"z"),
    (ConsistentHash(http_query_parameter_name="e"), b""),
    (ConsistentHash(use_source_ip=True), b"10.1.2.3"),
])
def test_request_hash_key(policy, want):
    assert request_hash_key(policy, REQ) == want


def test_malformed_cookie_header_gives_no_key():
    r = HashRequest(headers=((b"cookie", b'sid="unterminated'),))
    assert request_hash_key(ConsistentHash(http_cookie=HTTPCookie(name="sid")), r) is None


# -- choosing, refresh and feedback ---------------------------------------------------------------

def test_cluster_is_kept_while_the_state_does_not_change_and_refreshed_in_place_when_it_does():
    w = World([_w(1), _w(2)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2}}"))
    cs = Clusters(w.state)
    c = cs.cluster_for(w.fwd(), 0.0)
    assert cs.cluster_for(w.fwd(), 1.0) is c and c.addresses == ("10.0.0.1:8080", "10.0.0.2:8080")
    for _ in range(2):
        c.report(c.targets["10.0.0.2:8080"], RESP[503], 0.01, 1.0)
    assert c.outlier.is_ejected("10.0.0.2:8080")
    balancer = c.balancer
    w.put([_w(2), _w(3)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2}}"))
    old_fwd = Forward(service=_svc([_w(1), _w(2)]), port=80, target_port=8080)  # a stale Service snapshot
    assert cs.cluster_for(old_fwd, 2.0) is c
    assert c.addresses == ("10.0.0.2:8080", "10.0.0.3:8080")          # the current Service's endpoints
    assert c.balancer is balancer and c.outlier.is_ejected("10.0.0.2:8080")   # kept across the update
    picks = Counter(c.choose(2.0, random.Random(i), REQ, frozenset()).address for i in range(50))
    assert set(picks) == {"10.0.0.3:8080"}
    # a changed DestinationRule replaces the config; the balancer goes when its algorithm changes
    w.put([_w(2), _w(3)], dr("trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}"))
    cs.cluster_for(w.fwd(), 3.0)
    assert c.outlier is None and c.config.balancer.algorithm is Algorithm.ROUND_ROBIN and c.balancer is not balancer


def test_subset_cluster_holds_only_the_subsets_pods():
    w = World([_w(1, "v1"), _w(2, "v2"), _w(3, "v2")],
              dr("subsets:\n- {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}"))
    cs = Clusters(w.state)
    c = cs.cluster_for(w.fwd("v2", {"version": "v2"}), 0.0)
    assert c.key == "outbound|80|v2|r.shop.svc.cluster.local"
    assert c.addresses == ("10.0.0.2:8080", "10.0.0.3:8080") and c.config.balancer.algorithm is Algorithm.RANDOM
    assert cs.cluster_for(w.fwd(), 0.0).config.balancer.algorithm is Algorithm.PEAK_EWMA
    assert len(cs) == 2


@pytest.mark.parametrize("outcome, ejects", [
    (RESP[503], True), (RESP[500], True), (RESP[404], False), (RESP[200], False),
    (AttemptOutcome(kind=OutcomeKind.CONNECT_FAILURE), True), (AttemptOutcome(kind=OutcomeKind.RESET), True),
    (AttemptOutcome(kind=OutcomeKind.PER_TRY_TIMEOUT), True),
    (AttemptOutcome(kind=OutcomeKind.OVERFLOW), False),      # Envoy ignores overflows
    (None, False),                                          # no verdict (the client went away)
])
def test_reports_feed_outlier_detection(outcome, ejects):
    w = World([_w(1), _w(2)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}"))
    c = Clusters(w.state).cluster_for(w.fwd(), 0.0)
    t = c.targets["10.0.0.1:8080"]
    got = []
    for i in range(3):
        c.balancer.on_start(t.address)
        c.inflight += 1
        got.append(c.report(t, outcome, None, float(i)))
    assert c.outlier.is_ejected(t.address) is ejects
    assert [e is not None for e in got] == [False, False, ejects]
    assert c.stats.outlier_detection_ejections_enforced_total == int(ejects)
    assert c.inflight == 0


def test_ejected_endpoint_returns_after_base_ejection_time_on_the_sweep():
    w = World([_w(1), _w(2)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1, interval: 1s, "
                                 "baseEjectionTime: 5s}}"))
    cs = Clusters(w.state)
    c = cs.cluster_for(w.fwd(), 100.0)
    t = c.targets["10.0.0.1:8080"]
    c.report(t, RESP[503], None, 100.0)
    assert c.ejected == 1 and c.stats.outlier_detection_ejections_enforced_consecutive_5xx == 1
    assert cs.next_sweep() == 101.0
    assert cs.sweep(100.5) == [] and cs.next_sweep() == 101.0     # not due yet
    for t_ in (101.0, 102.0, 103.0, 104.0):
        assert cs.sweep(t_) == [] and c.ejected == 1
    assert cs.next_sweep() == 105.0
    assert [(x.key, back) for x, back in cs.sweep(105.0)] == [(c.key, ("10.0.0.1:8080",))] and c.ejected == 0
    c.report(t, RESP[503], None, 106.0)               # ejected again at once: twice as long
    assert c.outlier.next_unejection() == 116.0


def test_every_endpoint_ejected_means_no_healthy_upstream_and_avoid_falls_back():
    w = World([_w(1), _w(2)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1, "
                                 "maxEjectionPercent: 100}}"))
    c = Clusters(w.state).cluster_for(w.fwd(), 0.0)
    rng = random.Random(3)
    only = frozenset({"10.0.0.1:8080"})
    assert {c.choose(0.0, rng, REQ, only).address for _ in range(20)} == {"10.0.0.2:8080"}
    assert c.choose(0.0, rng, REQ, frozenset({"10.0.0.1:8080", "10.0.0.2:8080"})) is not None  # falls back
    for a in c.addresses:
        c.report(c.targets[a], RESP[503], None, 0.0)
    assert c.ejected == 2 and c.choose(0.0, rng, REQ, frozenset()) is None


def test_min_health_percent_panic_uses_every_endpoint():
    w = World([_w(1), _w(2)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1, "
                                 "minHealthPercent: 60}}"))
    c = Clusters(w.state).cluster_for(w.fwd(), 0.0)
    c.report(c.targets["10.0.0.1:8080"], RESP[503], None, 0.0)
    got = {c.choose(0.0, random.Random(i), REQ, frozenset()).address for i in range(40)}
    assert got == {"10.0.0.1:8080", "10.0.0.2:8080"} and c.stats.lb_healthy_panic == 40


def test_consistent_hash_on_a_header_keeps_keys_when_an_endpoint_leaves():
    yaml = dr("trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}")
    w = World([_w(i) for i in range(1, 6)], yaml)
    cs = Clusters(w.state)
    rng = random.Random(0)

    def owner(user: str) -> str:
        c = cs.cluster_for(w.fwd(), 0.0)
        t = c.choose(0.0, rng, HashRequest(headers=((b"x-user", user.encode()),)), frozenset())
        c.report(t, RESP[200], 0.001, 0.0)
        return t.address
    before = {f"u{i}": owner(f"u{i}") for i in range(500)}
    assert all(owner(u) == a for u, a in list(before.items())[:50])        # stable
    assert len(set(before.values())) == 5
    w.put([_w(i) for i in range(1, 5)], yaml)                               # 10.0.0.5 leaves
    after = {u: owner(u) for u in before}
    moved = [u for u in before if before[u] != after[u]]
    assert all(before[u] == "10.0.0.5:8080" for u in moved)                 # only its keys moved
    assert set(after.values()) == {f"10.0.0.{i}:8080" for i in range(1, 5)}


def test_peak_ewma_default_steers_away_from_a_slow_endpoint():
    w = World([_w(1), _w(2), _w(3)])
    c = Clusters(w.state).cluster_for(w.fwd(), 0.0)
    rng, now, picks = random.Random(5), 0.0, Counter()
    rtt = {"10.0.0.1:8080": 0.005, "10.0.0.2:8080": 0.005, "10.0.0.3:8080": 0.050}
    for _ in range(1000):
        t = c.choose(now, rng, REQ, frozenset())
        picks[t.address] += 1
        now += rtt[t.address]
        c.report(t, RESP[200], rtt[t.address], now)
    assert picks["10.0.0.3:8080"] / 1000 <= 0.05, picks


def test_exposition_names_envoy_cluster_stats_by_cluster_name():
    w = World([_w(1), _w(2)], dr("trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}"))
    cs = Clusters(w.state)
    c = cs.cluster_for(w.fwd(), 0.0)
    c.report(c.targets["10.0.0.1:8080"], RESP[503], None, 0.0)
    c.report(c.targets["10.0.0.2:8080"], RESP[200], 0.01, 0.0)
    c.stats.upstream_rq_pending_overflow = 7
    fams = {f.name: f for f in text_string_to_metric_families(cluster_exposition(cs).decode())}
    label = {"cluster_name": "outbound|80||r.shop.svc.cluster.local"}

    def value(fam: str) -> float:
        (s,) = [s for s in fams[fam].samples if s.labels == label]
        return s.value
    assert value("envoy_cluster_upstream_rq_pending_overflow") == 7
    assert value("envoy_cluster_outlier_detection_ejections_active") == 1
    assert value("envoy_cluster_outlier_detection_ejections_enforced") == 1   # ..._enforced_total
    assert value("envoy_cluster_membership_healthy") == 1 and value("envoy_cluster_membership_total") == 2
    assert value("envoy_cluster_upstream_rq_5xx") == 1 and value("envoy_cluster_upstream_rq_2xx") == 1
    assert value("envoy_cluster_upstream_cx_overflow") == 0


def test_clusters_of_deleted_services_are_forgotten_once_idle():
    w = World([_w(1)])
    cs = Clusters(w.state)
    c = cs.cluster_for(w.fwd(), 0.0)
    t = c.choose(0.0, random.Random(1), REQ, frozenset())
    w.version += 1
    w.state.apply_snapshot(Snapshot(version=w.version, resources=tuple(w.ws)))   # the Service is gone
    cs.sweep(1.0)
    assert len(cs) == 1                 # an attempt is still out
    c.report(t, RESP[200], 0.001, 1.0)
    cs.sweep(2.0)
    assert len(cs) == 0


def test_warmup_ramps_up_an_endpoint_added_after_the_cluster_was_built():
    yaml = dr("trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 10s}}}")
    w = World([_w(1), _w(2)], yaml)
    cs = Clusters(w.state)
    cs.cluster_for(w.fwd(), 0.0)
    w.put([_w(1), _w(2), _w(3)], yaml)                  # 10.0.0.3 joins at t=100

    def share(now: float) -> float:
        c = cs.cluster_for(w.fwd(), now)     # the first call after the update adds it, at 100
        picks = Counter()
        for _ in range(2100):
            t = c.choose(now, random.Random(0), REQ, frozenset())
            c.report(t, RESP[200], 0.001, now)
            picks[t.address] += 1
        return picks["10.0.0.3:8080"] / 2100
    assert share(100.0) == pytest.approx(0.1 / 2.1, abs=0.01)      # Envoy's 10 % minimum weight
    assert share(105.0) == pytest.approx(0.5 / 2.5, abs=0.01)      # linear ramp (aggression 1)
    assert share(111.0) == pytest.approx(1 / 3, abs=0.01)          # warmed up

"""Pure fault and mirror decisions: percentages as Istio translates them, draws, abort replies, plan-time resolution."""
from __future__ import annotations

import ipaddress
import math
import random
import textwrap

import pytest

from mesh.config import load_text
from mesh.distribution.protocol import Snapshot
from mesh.identity import SpiffeId
from mesh.model import Endpoint, ServiceInfo, TunnelProtocol, Workload
from mesh.model.base import FrozenMap
from mesh.model.resources import ServicePort
from mesh.model.route import VSFault, VSFaultAbort, VSFaultDelay
from mesh.state import ProxyState
from waypoint.fault import (ABORT_BODY, FaultAbort, FaultDecision, abort_reply, decide, drawn, join_flags,
                            per_million)
from waypoint.http import RequestHead
from waypoint.mirror import mirror_head
from waypoint.plan import Forward, plan_request, resolve
from waypoint.routing import RequestInfo


@pytest.mark.parametrize("pct,ppm", [
    (None, 0), (0.0, 0), (100.0, 1_000_000), (50.0, 500_000), (0.0001, 1), (0.00015, 1),  # truncation
    (12.34567, 123456), (99.9999, 999_999), (33.3, 333_000),
])
def test_per_million_is_istios_translation(pct, ppm):
    assert per_million(pct) == ppm


def test_zero_and_hundred_percent_draw_nothing():
    rng = random.Random(3)
    state = rng.getstate()
    assert [drawn(0, rng) for _ in range(100)] == [False] * 100
    assert [drawn(1_000_000, rng) for _ in range(100)] == [True] * 100
    assert rng.getstate() == state


def _within_binomial(hits: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("pct", [0.0, 0.5, 10.0, 50.0, 75.25, 100.0])
def test_draw_rate_within_binomial_tolerance(pct):
    rng, n = random.Random(11), 40_000
    hits = sum(drawn(per_million(pct), rng) for _ in range(n))
    assert _within_binomial(hits, n, pct / 100), (hits, n, pct)


D, A = VSFaultDelay(fixed_delay=0.25, percentage=100.0), VSFaultAbort(http_status=503, percentage=100.0)


@pytest.mark.parametrize("cfg,want", [
    (None, None),
    (VSFault(delay=VSFaultDelay(fixed_delay=0.25)), None),                     # percentage unset: 0 %
    (VSFault(abort=VSFaultAbort(http_status=503)), None),
    (VSFault(delay=D), FaultDecision(delay=0.25)),
    (VSFault(abort=A), FaultDecision(abort=FaultAbort(http_status=503))),
    (VSFault(delay=D, abort=A), FaultDecision(delay=0.25, abort=FaultAbort(http_status=503))),
    (VSFault(abort=VSFaultAbort(http_status=200, grpc_status="UNAVAILABLE", percentage=100.0)),
     FaultDecision(abort=FaultAbort(http_status=200, grpc_status=14))),
    (VSFault(abort=VSFaultAbort(http_status=200, grpc_status="RESOURCE_EXHAUSTED", percentage=100.0)),
     FaultDecision(abort=FaultAbort(http_status=200, grpc_status=8))),
    (VSFault(delay=VSFaultDelay(fixed_delay=1.0, percentage=0.0), abort=VSFaultAbort(http_status=418,
                                                                                      percentage=100.0)),
     FaultDecision(abort=FaultAbort(http_status=418))),
])
def test_decide(cfg, want):
    assert decide(cfg, random.Random(1)) == want


def test_delay_and_abort_are_independent_draws():
    rng, n = random.Random(5), 40_000
    cfg = VSFault(delay=VSFaultDelay(fixed_delay=0.1, percentage=50.0),
                  abort=VSFaultAbort(http_status=500, percentage=50.0))
    ds = [decide(cfg, rng) for _ in range(n)]
    delayed = sum(1 for d in ds if d is not None and d.delay)
    aborted = sum(1 for d in ds if d is not None and d.abort)
    both = sum(1 for d in ds if d is not None and d.delay and d.abort)
    assert _within_binomial(delayed, n, 0.5) and _within_binomial(aborted, n, 0.5)
    assert _within_binomial(both, n, 0.25), both


@pytest.mark.parametrize("decision,flags", [
    (FaultDecision(delay=1.0), "DI"), (FaultDecision(abort=FaultAbort(http_status=503)), "FI"),
    (FaultDecision(delay=1.0, abort=FaultAbort(http_status=503)), "DI,FI"),
])
def test_decision_flags(decision, flags):
    assert decision.flags == flags


@pytest.mark.parametrize("parts,want", [
    (("-", "DI"), "DI"), (("", ""), "-"), (("UF", "DI"), "UF,DI"), (("DC", "DI"), "DI,DC"),
    (("FI", "DI"), "DI,FI"), (("UF,URX", "DI"), "UF,DI,URX"), (("DI", "DI,FI"), "DI,FI"),
])
def test_join_flags_in_envoys_order(parts, want):
    assert join_flags(*parts) == want


GRPC = ((b"content-type", b"application/grpc"),)


@pytest.mark.parametrize("abort,headers,want", [
    (FaultAbort(http_status=503), (), (503, (), ABORT_BODY)),
    (FaultAbort(http_status=503), GRPC, (503, (), ABORT_BODY)),            # httpStatus: plain even for gRPC
    (FaultAbort(http_status=200, grpc_status=14), GRPC,
     (200, ((b"content-type", b"application/grpc"), (b"grpc-status", b"14"), (b"grpc-message", ABORT_BODY)), b"")),
    (FaultAbort(http_status=200, grpc_status=14), ((b"content-type", b"application/grpc+proto"),),
     (200, ((b"content-type", b"application/grpc"), (b"grpc-status", b"14"), (b"grpc-message", ABORT_BODY)), b"")),
    (FaultAbort(http_status=200, grpc_status=14), ((b"content-type", b"application/json"),),
     (200, (), ABORT_BODY)),                                               # not a gRPC request: HTTP 200 + text
])
def test_abort_reply(abort, headers, want):
    assert abort_reply(abort, headers) == want


# -- plan-time resolution -----------------------------------------------------------------------

def _state(yaml: str) -> ProxyState:
    objs = []
    for i, (svc, v) in enumerate((("r", "v1"), ("r", "v2"), ("shadow", "v1")), start=1):
        objs.append(Workload(uid=f"shop/{svc}-{v}", name=f"{svc}-{v}", namespace="shop", node="n",
                             ip=ipaddress.IPv4Address(f"10.0.0.{i}"), service_account=svc,
                             identity=SpiffeId(trust_domain="cluster.local", namespace="shop", service_account=svc),
                             protocol=TunnelProtocol.HBONE, labels=FrozenMap({"version": v}),
                             services=(f"shop/{svc}",)))
    for j, name in enumerate(("r", "shadow"), start=1):
        objs.append(ServiceInfo(name=name, namespace="shop", vip=ipaddress.IPv4Address(f"10.96.0.{j}"),
                                ports=(ServicePort(port=80, target_port=8080, name="http"),),
                                endpoints=tuple(Endpoint(workload_uid=w.uid, ip=w.ip) for w in objs
                                                if isinstance(w, Workload) and w.services == (f"shop/{name}",))))
    st = ProxyState()
    st.apply_snapshot(Snapshot(version=1, resources=tuple(objs + list(load_text(textwrap.dedent(yaml), "t.yaml")))))
    return st


def _plan(st, rng=None):
    d = resolve(st, "10.96.0.1:80")
    req = RequestInfo.from_target("GET", "/", (), host="r", port=80)
    return plan_request(st, d, req, b"", client_namespace="shop", waypoint_namespace="shop",
                        rng=rng or random.Random(1))


VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [r]
  http:
  - route: [{destination: {host: r}}]
"""


def test_vs_fault_is_decided_at_plan_time():
    st = _state(VS + "    fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}, "
                     "abort: {httpStatus: 503, percentage: {value: 100}}}\n")
    p = _plan(st)
    assert isinstance(p, Forward)
    assert p.fault == FaultDecision(delay=2.0, abort=FaultAbort(http_status=503))
    assert p.mirrors == ()


def test_vs_fault_at_fifty_percent_splits():
    st = _state(VS + "    fault: {abort: {httpStatus: 500, percentage: {value: 50}}}\n")
    rng, n = random.Random(2), 4000
    aborted = sum(1 for _ in range(n) if _plan(st, rng).fault is not None)
    assert _within_binomial(aborted, n, 0.5), aborted


def test_vs_mirror_defaults_to_hundred_percent_and_resolves_the_service():
    p = _plan(_state(VS + "    mirror: {host: shadow}\n"))
    (m,) = p.mirrors
    assert (m.host, m.service.name, m.port, m.target_port) == ("shadow", "shadow", 80, 8080)


@pytest.mark.parametrize("extra,n", [
    ("    mirror: {host: shadow}\n    mirrorPercentage: {value: 0}\n", 0),
    ("    mirror: {host: shadow}\n    mirrorPercentage: {value: 100}\n", 1),
    ("    mirror: {host: shadow}\n    mirrors: [{destination: {host: shadow}}, "
     "{destination: {host: r, subset: v2}}]\n", 3),
])
def test_vs_mirror_counts(extra, n):
    yaml = VS + extra + ("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
                         "metadata: {name: r, namespace: shop}\nspec:\n  host: r\n"
                         "  subsets: [{name: v2, labels: {version: v2}}]\n")
    assert len(_plan(_state(yaml)).mirrors) == n


def test_vs_mirror_to_unknown_host_or_subset_is_kept_unresolved():
    p = _plan(_state(VS + "    mirrors: [{destination: {host: nowhere}}, {destination: {host: shadow, subset: x}}]\n"))
    assert [(m.host, m.service) for m in p.mirrors] == [("nowhere", None), ("shadow", None)]


def test_vs_abort_is_never_mirrored():
    p = _plan(_state(VS + "    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n"
                          "    mirror: {host: shadow}\n"))
    assert p.fault is not None and p.mirrors == ()


def test_vs_mirror_percentage_share():
    st = _state(VS + "    mirror: {host: shadow}\n    mirrorPercentage: {value: 25.5}\n")
    rng, n = random.Random(4), 4000
    got = sum(len(_plan(st, rng).mirrors) for _ in range(n))
    assert _within_binomial(got, n, 0.255), got


ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: r, port: 80}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1, denominator: 4}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, percent: 0}
    backendRefs: [{name: r, port: 80}]
"""


def test_http_route_request_mirrors_percent_and_fraction():
    st = _state(ROUTE)
    rng, n = random.Random(9), 4000
    plans = [_plan(st, rng) for _ in range(n)]
    assert all(isinstance(p, Forward) and p.service.name == "r" for p in plans)
    counts = [len(p.mirrors) for p in plans]
    assert min(counts) >= 1 and max(counts) <= 2          # 100 % always, 0 % never
    assert _within_binomial(sum(counts) - n, n, 0.25)
    assert {(m.host, m.port) for p in plans for m in p.mirrors} == {("shop/shadow", 80)}


def test_mirror_head_is_the_primarys_upstream_request():
    st = _state(VS.replace("  - route:", "  - headers: {request: {set: {x-a: '1'}}}\n    rewrite: "
                                       "{uri: /v2, authority: r.example}\n    match: [{uri: {prefix: /api}}]\n"
                                       "    route:") + "    mirror: {host: shadow}\n")
    d = resolve(st, "10.96.0.1:80")
    req = RequestInfo.from_target("POST", "/api/x", (), host="r", port=80)
    p = plan_request(st, d, req, b"q=1", client_namespace="shop", waypoint_namespace="shop", rng=random.Random(1))
    head = RequestHead(method=b"POST", target=b"/api/x?q=1", path=b"/api/x", query=b"q=1",
                       headers=((b"host", b"r"), (b"x-request-id", b"abc")), chunked=True)
    m = mirror_head(head, list(head.headers), p, 5)
    assert (m.method, m.target, m.content_length, m.chunked) == (b"POST", b"/v2/x?q=1", 5, False)
    assert dict(m.headers) == {b"host": b"r.example", b"x-request-id": b"abc", b"x-a": b"1"}
    get = RequestHead(method=b"GET", target=b"/", headers=((b"host", b"r"),))
    assert mirror_head(get, list(get.headers), p, 0).content_length is None


# -- VirtualService redirect / directResponse (Envoy direct responses) -----------------------------

def _vs_rule(rule: str) -> ProxyState:
    return _state("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: shop}\n"
                  "spec:\n  hosts: [r]\n  http:\n  - " + rule + "\n")


def _plan_req(st, target="/old/p?q=1", host="r"):
    d = resolve(st, "10.96.0.1:80")
    path, _, query = target.partition("?")
    req = RequestInfo.from_target("GET", target, (("host", host),), host=host.partition(":")[0], port=80)
    return plan_request(st, d, req, query.encode(), client_namespace="shop", waypoint_namespace="shop",
                        rng=random.Random(1))


@pytest.mark.parametrize("redirect,host,location,code", [
    ("{uri: /new}", "r", "http://r/new?q=1", 301),                                  # query kept
    ("{uri: '/new?x=2'}", "r", "http://r/new?x=2", 301),                            # query replaced
    ("{authority: b.example}", "r:80", "http://b.example/old/p?q=1", 301),
    ("{scheme: https}", "r", "https://r/old/p?q=1", 301),                           # protocol default: no port
    ("{port: 8443, scheme: https, redirectCode: 302}", "r:80", "https://r:8443/old/p?q=1", 302),
    ("{port: 443, scheme: https}", "r:80", "https://r/old/p?q=1", 301),             # a scheme's default port
    ("{derivePort: FROM_REQUEST_PORT, authority: b}", "r", "http://b/old/p?q=1", 301),   # 80 is http's
    ("{derivePort: FROM_REQUEST_PORT, scheme: https}", "r", "https://r:80/old/p?q=1", 301),
    ("{uri: /n, redirectCode: 308}", "r:9000", "http://r:9000/n?q=1", 308),         # the Host's own port stays
])
def test_vs_redirect_location(redirect, host, location, code):
    p = _plan_req(_vs_rule(f"redirect: {redirect}"), host=host)
    assert (p.status, p.headers, p.body, p.details) == (code, ((b"location", location.encode()),), b"",
                                                        "direct_response")


def test_vs_direct_response_with_response_headers():
    p = _plan_req(_vs_rule("directResponse: {status: 503, body: {string: maintenance}}\n"
                           "    headers: {response: {set: {retry-after: '30'}}}"))
    assert (p.status, p.body, p.headers, p.details, p.flags) == (
        503, b"maintenance", ((b"retry-after", b"30"),), "direct_response", "-")

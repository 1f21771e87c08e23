"""Pure waypoint decisions: logical destination, protocol sniffing, route plans, header edits."""
from __future__ import annotations

import ipaddress
import random
import textwrap

import pytest

from mesh.config import load_text
from mesh.distribution.protocol import Snapshot
from mesh.identity import SpiffeId
from mesh.model import Endpoint, ServiceInfo, TunnelProtocol, Workload
from mesh.model.base import FrozenMap
from mesh.model.resources import ServicePort
from mesh.model.route import HeaderModifier
from mesh.state import ProxyState
from waypoint.inbound import sniff_http1
from waypoint.pipeline import _apply
from waypoint.plan import Forward, Reply, plan_request, resolve
from waypoint.resilience.retry import DEFAULT_RETRY_POLICY, NO_RETRY, RetryOn, RetryPolicy
from waypoint.routing import RequestInfo
from waypoint.endpoints import cluster_key, endpoint_targets


def _state(yaml: str = "") -> ProxyState:
    ws = [Workload(uid=f"shop/r-{v}", name=f"r-{v}", namespace="shop", node="n", ip=ipaddress.IPv4Address(f"10.0.0.{i}"),
                   service_account="r", identity=SpiffeId(trust_domain="cluster.local", namespace="shop",
                                                          service_account="r"),
                   protocol=TunnelProtocol.HBONE, labels=FrozenMap({"version": v}), services=("shop/r",))
          for i, v in ((1, "v1"), (2, "v2"))]
    svc = ServiceInfo(name="r", namespace="shop", vip=ipaddress.IPv4Address("10.96.0.1"),
                      ports=(ServicePort(port=80, target_port=8080, name="http"),
                             ServicePort(port=5432, target_port=5432, name="tcp-pg")),
                      endpoints=tuple(Endpoint(workload_uid=w.uid, ip=w.ip) for w in ws))
    objs = [*ws, svc, *(load_text(textwrap.dedent(yaml), "t.yaml") if yaml else [])]
    st = ProxyState()
    st.apply_snapshot(Snapshot(version=1, resources=tuple(objs)))
    return st


@pytest.mark.parametrize("authority,kind,port,tcp", [
    ("10.96.0.1:80", "service", 80, False),
    ("10.96.0.1:5432", "service", 5432, True),
    ("10.0.0.2:8080", "workload", 8080, False),
    ("10.96.0.1:81", None, 0, False),        # not a port of the Service
    ("10.9.9.9:80", None, 0, False),         # nobody there
    ("reviews:80", None, 0, False),          # not an IP
    ("10.96.0.1", None, 0, False),
])
def test_resolve(authority, kind, port, tcp):
    d = resolve(_state(), authority)
    if kind is None:
        assert d is None
        return
    assert (d.service is not None, d.workload is not None) == (kind == "service", kind == "workload")
    assert (d.port, d.tcp) == (port, tcp)


@pytest.mark.parametrize("data,want", [
    (b"GET / HTTP/1.1\r\n", True), (b"M-SEARCH * HTTP/1.1", True), (b"GE", None), (b"", None),
    (b"PRI * HTTP/2.0\r\n\r\nSM", False), (b"\x16\x03\x01\x02", False), (b"get / HTTP/1.1", False),
    (b"A" * 30, False), (b" GET", False),
])
def test_sniff_http1(data, want):
    assert sniff_http1(data) is want


def _plan(st, path="/", headers=(), query=b""):
    d = resolve(st, "10.96.0.1:80")
    req = RequestInfo.from_target("GET", path, headers, host="r", port=80)
    return plan_request(st, d, req, query, client_namespace="shop", waypoint_namespace="shop", rng=random.Random(1))


def test_default_route_all_endpoints():
    st = _state()
    p = _plan(st)
    assert isinstance(p, Forward) and p.target_port == 8080 and p.subset_labels is None
    assert {t.workload.name for t in endpoint_targets(st, p.service, p, cluster_key(p))} == {"r-v1", "r-v2"}


VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [r]
  http:
  - match: [{uri: {prefix: /api}}]
    rewrite: {uri: /v2api}
    route: [{destination: {host: r, subset: v2}}]
  - match: [{uri: {exact: /nosubset}}]
    route: [{destination: {host: r, subset: v9}}]
  - match: [{uri: {exact: /only}}]
    route: [{destination: {host: r, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: r
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""


def test_virtual_service_plans():
    st = _state(VS)
    p = _plan(st, "/api/x", query=b"a=1")
    assert isinstance(p, Forward) and p.target == b"/v2api/x?a=1"
    assert [t.workload.name for t in endpoint_targets(st, p.service, p, cluster_key(p))] == ["r-v2"]
    nc = _plan(st, "/nosubset")
    assert isinstance(nc, Reply) and (nc.status, nc.flags) == (503, "NC")
    nr = _plan(st, "/elsewhere")
    assert isinstance(nr, Reply) and (nr.status, nr.flags, nr.body) == (404, "NR", b"")


def test_redirect_location_keeps_query_and_non_default_port():
    st = _state("""
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{group: "", kind: Service, name: r}]
      rules:
      - filters: [{type: RequestRedirect, requestRedirect: {scheme: https, port: 8443,
                   path: {type: ReplaceFullPath, replaceFullPath: /login}}}]
    """)
    p = _plan(st, "/anything", query=b"next=1")
    assert isinstance(p, Reply) and p.status == 302
    assert p.headers == ((b"location", b"https://r:8443/login?next=1"),)


@pytest.mark.parametrize("backend, status", [
    ("{name: r, port: 80}", 200),
    ("{group: multicluster.x-k8s.io, kind: ServiceImport, name: r, port: 80}", 500),   # InvalidKind
    ("{name: nosuch, port: 80}", 500),                                                 # BackendNotFound
    ("{name: r, port: 81}", 500),                                                      # BackendNotFound (port)
])
def test_http_route_backend_that_route_status_calls_unresolved_gets_500(backend, status):
    st = _state(f"""
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{name: r, namespace: shop}}
    spec:
      parentRefs: [{{group: "", kind: Service, name: r}}]
      rules:
      - backendRefs: [{backend}]
    """)
    p = _plan(st)
    if status == 200:
        assert isinstance(p, Forward) and p.service.name == "r"
    else:
        assert isinstance(p, Reply) and (p.status, p.flags) == (500, "NC")


def test_header_modifier_order_set_add_remove():
    hs = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    out = _apply(hs, [HeaderModifier(set=(("A", "x"),), add=(("b", "y"),), remove=("c",)),
                      HeaderModifier(remove=("b",))])
    assert out == [(b"a", b"x")]


RESILIENT_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [r]
  http:
  - match: [{uri: {prefix: /none}}]
    retries: {attempts: 0}
    route: [{destination: {host: r}}]
  - match: [{uri: {prefix: /tuned}}]
    timeout: 2s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "gateway-error,409", retryIgnorePreviousHosts: false}
    route: [{destination: {host: r}}]
  - route: [{destination: {host: r}}]
"""

RESILIENT_ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: r}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /gep}}]
    timeouts: {request: 3s, backendRequest: 1s}
    retry: {attempts: 1, codes: [503], backoff: 100ms}
    backendRefs: [{name: r, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /off}}]
    timeouts: {request: "0s"}
    backendRefs: [{name: r, port: 80}]
  - backendRefs: [{name: r, port: 80}]
"""


@pytest.mark.parametrize("yaml, path, want_retry, want_timeout", [
    ("", "/", DEFAULT_RETRY_POLICY, None),                          # the default route: Istio's default policy
    (RESILIENT_VS, "/none", NO_RETRY, None),
    (RESILIENT_VS, "/tuned", RetryPolicy(num_retries=4, retry_on=RetryOn.GATEWAY_ERROR | RetryOn.RETRIABLE_STATUS_CODES,
                                        retriable_status_codes=frozenset({409}), per_try_timeout=0.5,
                                        avoid_previous_hosts=False), 2.0),
    (RESILIENT_VS, "/other", DEFAULT_RETRY_POLICY, None),
    (RESILIENT_ROUTE, "/gep", RetryPolicy(num_retries=1, retry_on=RetryOn.CONNECT_FAILURE | RetryOn.RESET
                                         | RetryOn.REFUSED_STREAM | RetryOn.RETRIABLE_STATUS_CODES,
                                         retriable_status_codes=frozenset({503}), per_try_timeout=1.0,
                                         base_interval=0.1), 3.0),
    (RESILIENT_ROUTE, "/off", DEFAULT_RETRY_POLICY, None),          # GEP-1742: 0s disables the timeout
    (RESILIENT_ROUTE, "/", DEFAULT_RETRY_POLICY, None),
])
def test_forward_carries_the_routes_retry_policy_and_timeout(yaml, path, want_retry, want_timeout):
    st = _state(yaml)
    p = _plan(st, path)
    assert isinstance(p, Forward) and (p.retry, p.timeout) == (want_retry, want_timeout)
    assert _plan(st, path).retry is p.retry                        # converted once per route, not per request

"""What the waypoint does with one request, decided purely: logical -> route -> backend -> endpoint set.

`resolve` turns the CONNECT `:authority` into the logical destination (a Service VIP:port or a
pod ip:port) and says whether that port is plain TCP (appProtocol or port name, Istio's
protocol selection in waypoint/protocols.py; such traffic is relayed at L4). `plan_request` takes the request's routing view and
returns either a `Forward` (the backend Service, port, subset labels, header and URL rewrites)
or a `Reply` the waypoint sends itself (404 NR, redirect, VirtualService directResponse, 500 for
a rule without backends, 503 NC for an undefined subset). A Forward also carries the route's fault decision
(waypoint/fault.py: VirtualService `fault`, drawn here) and the mirrors drawn for this request
(VirtualService `mirror`/`mirrorPercentage`/`mirrors`, HTTPRoute `RequestMirror` filters on the
rule and on the chosen backendRef), which waypoint/mirror.py sends.

Route sources, in Istio's order at a waypoint: HTTPRoutes bound to the Service (GAMMA: parentRef
Service, optional port; consumer routes in the client's namespace replace producer routes);
else VirtualServices naming the Service's host, from the Service's or the waypoint's namespace;
else the default route (every endpoint of the addressed Service). When routes attach and none
matches, 404 with flag NR (a waypoint adds no fallback route).
"""
from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.model import ServiceInfo, Workload
from mesh.model.base import FrozenMap
from mesh.model.route import (BackendRef, DestinationRule, HeaderModifier, HTTPFilters, HTTPRoute, PathMatchType,
                              PathModifier, PathModifierType, StringMatchType, VirtualService, VSDestination,
                              VSHeaders, VSHTTPRoute)
from mesh.model.resources import ServicePort
from mesh.state import ProxyState

from .protocols import PortProtocol, port_protocol
from .fault import FaultDecision, decide, drawn, per_million
from .headers import apply_modifiers
from .resilience.retry import (DEFAULT_RETRY_POLICY, RetryPolicy, policy_from_http_route,
                               policy_from_virtual_service)
from .routing import (RequestInfo, bound_routes, bound_virtual_services, find_route, find_vs_route,
                      pick_backend, pick_vs_destination)

__all__ = ["Destination", "Forward", "Reply", "MirrorTarget", "resolve", "refresh", "plan_request", "service_fqdn",
           "RouteSet", "destination_rule_for", "Bindings", "UNROUTED", "bindings", "plan_bound"]

DOMAIN = "cluster.local"


def service_fqdn(svc: ServiceInfo, domain: str = DOMAIN) -> str:
    return f"{svc.name}.{svc.namespace}.svc.{domain}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """The logical destination of a CONNECT: what the client dialled."""

    ip: str
    port: int
    service: ServiceInfo | None = None
    """The Service whose VIP was dialled (service-addressed)."""
    service_port: ServicePort | None = None
    workload: Workload | None = None
    """The pod whose IP was dialled (pod-addressed)."""
    tcp: bool = False
    """The port is declared TCP: relay bytes, never parse HTTP."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A response the waypoint sends itself (Envoy local reply)."""

    status: int
    body: bytes = b""
    flags: str = "-"
    """Envoy %RESPONSE_FLAGS%."""
    details: str = ""
    """Envoy %RESPONSE_CODE_DETAILS%."""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    route_name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorTarget:
    """A copy of the request to send fire-and-forget (the draw against its percentage was won)."""

    host: str
    """The mirror as configured (VirtualService host, or `namespace/name` of a backendRef)."""
    service: ServiceInfo | None
    """None: no such Service (the copy is counted as `no_cluster`, never sent)."""
    port: int = 0
    target_port: int = 0
    subset_labels: FrozenMap | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    """Send the request to one endpoint of `service` (or to the dialled pod)."""

    service: ServiceInfo | None
    port: int
    """The Service port (pod-addressed: the dialled port)."""
    target_port: int
    """The endpoint's port."""
    subset: str = ""
    """The DestinationRule subset's name ("" for none): part of the cluster key."""
    subset_labels: FrozenMap | None = None
    """Only endpoints whose pod carries all these labels (a DestinationRule subset)."""
    workload: Workload | None = None
    """Pod-addressed: this pod, no load balancing."""
    request_headers: tuple[HeaderModifier, ...] = ()
    """Applied in order (route level, then backend level)."""
    response_headers: tuple[HeaderModifier, ...] = ()
    target: bytes | None = None
    """Rewritten request-target (path + query); None = as sent."""
    authority: bytes | None = None
    """Rewritten Host; None = as sent."""
    route_name: str = ""
    fault: FaultDecision | None = None
    """The fault injected into this request (delay and/or abort), decided at plan time."""
    mirrors: tuple[MirrorTarget, ...] = ()
    """Copies to send (already drawn against their percentages)."""
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    """The route's retry policy (Istio's default when the route sets none)."""
    timeout: float | None = None
    """Seconds for the whole request, retries included (VS `timeout`, HTTPRoute
    `timeouts.request`); None: no timeout, as Istio's routes."""


_POLICIES: dict[int, tuple[object, RetryPolicy]] = {}
"""Retry policies by id() of the config object they come from (kept with it, so an id is
never reused while cached): converted once per route, not per request."""


def _cached_policy(obj: object, make) -> RetryPolicy:
    hit = _POLICIES.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    if len(_POLICIES) > 4096:   # config churn: start over rather than grow
        _POLICIES.clear()
    policy = make()
    _POLICIES[id(obj)] = (obj, policy)
    return policy


def _rule_resilience(rule) -> dict:
    """HTTPRoute rule -> Forward's retry and timeout (GEP-1731 / GEP-1742; 0 = disabled)."""
    t = rule.timeouts
    backend = (t.backend_request or None) if t is not None else None
    retry = _cached_policy(rule, lambda: policy_from_http_route(rule.retry, backend_request_timeout=backend))
    return {"retry": retry, "timeout": (t.request or None) if t is not None else None}


def _vs_resilience(route) -> dict:
    retry = (DEFAULT_RETRY_POLICY if route.retries is None
             else _cached_policy(route.retries, lambda: policy_from_virtual_service(route.retries)))
    return {"retry": retry, "timeout": route.timeout or None}


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSet:
    """The route objects a request is planned against (a ProxyState view)."""

    http_routes: Sequence[HTTPRoute] = ()
    virtual_services: Sequence[VirtualService] = ()
    destination_rules: Sequence[DestinationRule] = ()

    @classmethod
    def of(cls, state: ProxyState) -> RouteSet:
        return cls(http_routes=state.http_routes(), virtual_services=state.virtual_services(),
                   destination_rules=state.destination_rules())


def _is_tcp(sp: ServicePort | None) -> bool:
    return port_protocol(sp) is PortProtocol.TCP


def resolve(state: ProxyState, authority: str) -> Destination | None:
    """The destination `ip:port` names: a Service VIP port, else a pod; None when neither."""
    host, sep, port_s = authority.rpartition(":")
    if not sep or not port_s.isdigit():
        return None
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    port = int(port_s)
    svc = state.service_by_vip(ip)
    if svc is not None:
        sp = next((p for p in svc.ports if p.port == port), None)
        if sp is None:
            return None
        return Destination(ip=host, port=port, service=svc, service_port=sp, tcp=_is_tcp(sp))
    w = state.workload_by_ip(ip)
    if w is None:
        return None
    # Pod-addressed: a port of a Service selecting the pod may say TCP.
    sp = None
    for uid in w.services:
        s = state.service(uid)
        if s is not None:
            sp = next((p for p in s.ports if _target(p) == port), sp)
    return Destination(ip=host, port=port, workload=w, service_port=sp, tcp=_is_tcp(sp))


def refresh(state: ProxyState, dst: Destination) -> Destination:
    """`dst` with the Service as the state holds it now (a downstream connection resolves its
    destination once; its requests must see the Service's later updates). The same object when
    nothing changed or the Service is gone."""
    svc = dst.service
    if svc is None:
        return dst
    cur = state.service(svc.uid)
    if cur is None or cur is svc:
        return dst
    sp = next((p for p in cur.ports if p.port == dst.port), None)
    if sp is None:
        return dst
    return Destination(ip=dst.ip, port=dst.port, service=cur, service_port=sp, tcp=dst.tcp)


def _target(sp: ServicePort) -> int:
    # A named targetPort cannot be resolved without container ports: use the service port.
    return sp.target_port if isinstance(sp.target_port, int) else sp.port


_NO_ROUTE = Reply(status=404, flags="NR", details="route_not_found")


def _find_service(state: ProxyState, namespace: str, name: str) -> ServiceInfo | None:
    return state.service(f"{namespace}/{name}")


def _service_by_host(state: ProxyState, host: str, namespace: str) -> ServiceInfo | None:
    """A VirtualService/DestinationRule host: a short name (in `namespace`) or an FQDN."""
    parts = host.split(".")
    if len(parts) == 1:
        return _find_service(state, namespace, host)
    if len(parts) >= 2 and (len(parts) == 2 or parts[2] == "svc"):
        return _find_service(state, parts[1], parts[0])
    return None


def _forward_to(svc: ServiceInfo, port: int | None, default_port: int, **kw) -> Forward | Reply:
    sp = next((p for p in svc.ports if p.port == (port or default_port)), None)
    if sp is None and port is None and len(svc.ports) == 1:
        sp = svc.ports[0]
    if sp is None:
        return Reply(status=500, flags="NC", details="cluster_not_found", route_name=kw.get("route_name", ""))
    return Forward(service=svc, port=sp.port, target_port=_target(sp), **kw)


def _names(dr: DestinationRule, svc: ServiceInfo) -> bool:
    h = dr.host
    return (h == service_fqdn(svc) or (h == svc.name and dr.namespace == svc.namespace)
            or h == f"{svc.name}.{svc.namespace}")


def destination_rule_for(drs: Sequence[DestinationRule], svc: ServiceInfo) -> DestinationRule | None:
    """The DestinationRule whose host names `svc` (the first by namespace/name)."""
    return next((dr for dr in sorted(drs, key=lambda d: (d.namespace, d.name)) if _names(dr, svc)), None)


def _subset_labels(drs: Sequence[DestinationRule], svc: ServiceInfo, subset: str) -> FrozenMap | None:
    for dr in sorted(drs, key=lambda d: (d.namespace, d.name)):
        if _names(dr, svc):
            for s in dr.subsets:
                if s.name == subset:
                    return s.labels
    return None


def _with_query(path: str, req: RequestInfo, raw_query: bytes) -> bytes:
    return path.encode() + (b"?" + raw_query if raw_query else b"")


def _modified_path(mod: PathModifier, matched_prefix: str | None, path: str) -> str:
    if mod.type is PathModifierType.REPLACE_FULL_PATH:
        return mod.value
    prefix = (matched_prefix or "/").rstrip("/")
    rest = path[len(prefix):]
    value = mod.value.rstrip("/")
    if not rest:
        return value or "/"
    return (value + rest) if rest.startswith("/") else f"{value}/{rest}"


_WELL_KNOWN = {"http": 80, "https": 443}


def _redirect(filters: HTTPFilters, req: RequestInfo, raw_query: bytes, matched_prefix: str | None,
              route_name: str) -> Reply:
    r = filters.redirect
    assert r is not None
    scheme = r.scheme or "http"
    host = r.hostname or req.host
    if r.port is not None:
        port = r.port
    elif r.scheme is not None:
        port = _WELL_KNOWN.get(scheme, req.port)
    else:
        port = req.port  # the listener port: for a mesh route, the Service port dialled
    port_part = "" if _WELL_KNOWN.get(scheme) == port else f":{port}"
    path = _modified_path(r.path, matched_prefix, req.path) if r.path is not None else req.path
    location = f"{scheme}://{host}{port_part}".encode() + _with_query(path, req, raw_query)
    return Reply(status=r.status_code, flags="-", details="via_upstream", headers=((b"location", location),),
                 route_name=route_name)


def _mirror_target(host: str, svc: ServiceInfo | None, port: int | None, default_port: int,
                   labels: FrozenMap | None = None) -> MirrorTarget:
    if svc is None:
        return MirrorTarget(host=host, service=None)
    sp = next((p for p in svc.ports if p.port == (port or default_port)), None)
    if sp is None and port is None and len(svc.ports) == 1:
        sp = svc.ports[0]
    if sp is None:
        return MirrorTarget(host=host, service=None)
    return MirrorTarget(host=host, service=svc, port=sp.port, target_port=_target(sp), subset_labels=labels)


def _http_route_mirrors(state: ProxyState, filters: Sequence[HTTPFilters], port: int,
                        rng: random.Random) -> tuple[MirrorTarget, ...]:
    """RequestMirror filters of the rule and of the chosen backendRef, each drawn on its own."""
    out = []
    for f in filters:
        for m in f.mirrors:
            if drawn(per_million(m.percent), rng):
                b: BackendRef = m.backend
                svc = _find_service(state, b.namespace, b.name) if b.is_service else None
                out.append(_mirror_target(f"{b.namespace}/{b.name}", svc, b.port, port))
    return tuple(out)


def _vs_mirrors(state: ProxyState, drs: Sequence[DestinationRule], route: VSHTTPRoute, namespace: str,
                port: int, rng: random.Random) -> tuple[MirrorTarget, ...]:
    """`mirror` (+ `mirrorPercentage`, unset = 100 %) and each `mirrors[]` entry (unset = 100 %)."""
    wanted: list[tuple[VSDestination, float | None]] = []
    if route.mirror is not None:
        wanted.append((route.mirror, route.mirror_percentage))
    wanted.extend((m.destination, m.percentage) for m in route.mirrors)
    out = []
    for dest, pct in wanted:
        if not drawn(per_million(100.0 if pct is None else pct), rng):
            continue
        svc = _service_by_host(state, dest.host, namespace)
        labels = None
        if svc is not None and dest.subset is not None:
            labels = _subset_labels(drs, svc, dest.subset)
            if labels is None:   # an undefined subset: Envoy's shadow to a missing cluster
                svc = None
        out.append(_mirror_target(dest.host, svc, dest.port, port, labels))
    return tuple(out)


def _plan_http_route(state: ProxyState, routes: Sequence[HTTPRoute], req: RequestInfo, raw_query: bytes,
                     default: ServiceInfo, port: int, rng: random.Random) -> Forward | Reply:
    m = find_route(routes, req)
    if m is None:
        return _NO_ROUTE
    name = f"{m.route.namespace}.{m.route.name}.{m.rule_index}"
    f = m.rule.filters
    prefix = m.match.path.value if m.match.path.type is PathMatchType.PREFIX else None
    if f.redirect is not None:
        return _redirect(f, req, raw_query, prefix, name)
    backend = pick_backend(m.rule.backend_refs, rng)
    if backend is None:
        return Reply(status=500, flags="NC", details="cluster_not_found", route_name=name)
    svc = _find_service(state, backend.namespace, backend.name) if backend.is_service else None
    if svc is None:
        return Reply(status=500, flags="NC", details="cluster_not_found", route_name=name)
    target = authority = None
    if f.rewrite is not None:
        if f.rewrite.path is not None:
            target = _with_query(_modified_path(f.rewrite.path, prefix, req.path), req, raw_query)
        if f.rewrite.hostname is not None:
            authority = f.rewrite.hostname.encode()
    bf = backend.filters
    req_mods = tuple(x for x in (f.request_headers, bf.request_headers) if x is not None)
    resp_mods = tuple(x for x in (f.response_headers, bf.response_headers) if x is not None)
    mirrors = _http_route_mirrors(state, (f, bf), port, rng)
    return _forward_to(svc, backend.port, port, request_headers=req_mods, response_headers=resp_mods,
                       target=target, authority=authority, route_name=name, mirrors=mirrors,
                       **_rule_resilience(m.rule))


def _vs_mods(*hs: VSHeaders | None) -> tuple[tuple[HeaderModifier, ...], tuple[HeaderModifier, ...]]:
    return (tuple(h.request for h in hs if h is not None and h.request is not None),
            tuple(h.response for h in hs if h is not None and h.response is not None))


def _vs_local_reply(route: VSHTTPRoute, req: RequestInfo, raw_query: bytes, port: int, name: str) -> Reply:
    """`redirect` / `directResponse`: Envoy's direct response (details `direct_response`), with
    the rule's response header operations applied."""
    hs: list[tuple[bytes, bytes]] = []
    if route.direct_response is not None:
        status, body = route.direct_response.status, route.direct_response.body
    else:
        r = route.redirect
        assert r is not None
        scheme = r.scheme or "http"
        host = r.authority or next((v for n, v in req.headers if n == "host"), req.host)
        out_port = r.port if r.port is not None else (port if r.derive_port == "FROM_REQUEST_PORT" else None)
        if out_port is not None:   # Envoy's port_redirect: replaces the Host's port; a scheme's default is left out
            h, sep, p = host.rpartition(":")
            host = h if sep and p.isdigit() else host
            if _WELL_KNOWN.get(scheme) != out_port:
                host = f"{host}:{out_port}"
        if r.uri is None:
            target = _with_query(req.path, req, raw_query)
        else:   # path_redirect: a `?` in it replaces the query, else the request's query is kept
            target = r.uri.encode() if "?" in r.uri else _with_query(r.uri, req, raw_query)
        hs.append((b"location", f"{scheme}://{host}".encode() + target))
        status, body = r.redirect_code, b""
    if route.headers is not None and route.headers.response is not None:
        hs = apply_modifiers(hs, (route.headers.response,))
    return Reply(status=status, body=body, details="direct_response", headers=tuple(hs), route_name=name)


def _plan_vs(state: ProxyState, vss: Sequence[VirtualService], drs: Sequence[DestinationRule], req: RequestInfo,
             raw_query: bytes, port: int, rng: random.Random) -> Forward | Reply:
    m = find_vs_route(vss, req)
    if m is None:
        return _NO_ROUTE
    vs, route = m.virtual_service, m.route
    name = route.name or f"{vs.namespace}.{vs.name}.{m.route_index}"
    if route.redirect is not None or route.direct_response is not None:
        return _vs_local_reply(route, req, raw_query, port, name)
    dest = pick_vs_destination(route.route, rng)
    fault = decide(route.fault, rng)
    if dest is None:
        return Reply(status=500, flags="NC", details="cluster_not_found", route_name=name)
    svc = _service_by_host(state, dest.destination.host, vs.namespace)
    if svc is None:
        return Reply(status=503, flags="NC", details="cluster_not_found", route_name=name)
    labels = None
    if dest.destination.subset is not None:
        labels = _subset_labels(drs, svc, dest.destination.subset)
        if labels is None:  # a subset no DestinationRule defines: Envoy's cluster_not_found
            return Reply(status=503, flags="NC", details="cluster_not_found", route_name=name)
    target = authority = None
    if route.rewrite is not None:
        if route.rewrite.uri is not None:
            uri = m.match.uri if m.match is not None else None
            if uri is not None and uri.type is StringMatchType.PREFIX:
                path = route.rewrite.uri + req.path[len(uri.value):]
            else:
                path = route.rewrite.uri
            target = _with_query(path or "/", req, raw_query)
        if route.rewrite.authority is not None:
            authority = route.rewrite.authority.encode()
    req_mods, resp_mods = _vs_mods(route.headers, dest.headers)
    # An aborted request never reaches the router, so it is never mirrored.
    mirrors = () if fault is not None and fault.abort is not None else _vs_mirrors(
        state, drs, route, vs.namespace, port, rng)
    return _forward_to(svc, dest.destination.port, port, subset=dest.destination.subset or "",
                       subset_labels=labels, request_headers=req_mods, response_headers=resp_mods,
                       target=target, authority=authority, route_name=name, fault=fault, mirrors=mirrors,
                       **_vs_resilience(route))


@dataclass(frozen=True, slots=True, kw_only=True)
class Bindings:
    """The routes that apply to requests for one Service port from one client namespace: the
    part of planning that depends on the config and the connection, not on the request (so a
    caller may keep it per state version)."""

    http_routes: tuple[HTTPRoute, ...] = ()
    """Bound HTTPRoutes (they win over VirtualServices when any is bound)."""
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: Sequence[DestinationRule] = ()

    @property
    def routed(self) -> bool:
        """Some route attaches: the request itself must be looked at (else the default route)."""
        return bool(self.http_routes or self.virtual_services)


UNROUTED = Bindings()
"""No service (pod-addressed) or no route: the default forward."""


def bindings(state: ProxyState, dst: Destination, *, client_namespace: str | None, waypoint_namespace: str,
             routes: RouteSet | None = None) -> Bindings:
    """What applies to requests for `dst` (see the module docstring's route sources)."""
    svc = dst.service
    if svc is None:
        return UNROUTED
    rs = routes or RouteSet.of(state)
    bound = bound_routes(rs.http_routes, service_namespace=svc.namespace, service_name=svc.name, port=dst.port,
                         client_namespace=client_namespace)
    if bound:
        return Bindings(http_routes=tuple(bound), destination_rules=rs.destination_rules)
    vss = tuple(v for v in bound_virtual_services(rs.virtual_services, service_namespace=svc.namespace,
                                                  service_name=svc.name)
                if v.namespace in (svc.namespace, waypoint_namespace))
    if vss:
        return Bindings(virtual_services=vss, destination_rules=rs.destination_rules)
    return UNROUTED


def plan_bound(state: ProxyState, dst: Destination, bound: Bindings, req: RequestInfo | None, raw_query: bytes,
               rng: random.Random) -> Forward | Reply:
    """The decision for one request to `dst` under `bound` (from `bindings`); `req` may be None
    only when nothing is bound (the default route does not look at the request)."""
    if dst.service is None:
        assert dst.workload is not None
        return Forward(service=None, port=dst.port, target_port=dst.port, workload=dst.workload)
    svc = dst.service
    if bound.http_routes:
        assert req is not None
        return _plan_http_route(state, bound.http_routes, req, raw_query, svc, dst.port, rng)
    if bound.virtual_services:
        assert req is not None
        return _plan_vs(state, bound.virtual_services, bound.destination_rules, req, raw_query, dst.port, rng)
    return _default_forward(svc, dst.port)


def plan_request(state: ProxyState, dst: Destination, req: RequestInfo, raw_query: bytes, *,
                 client_namespace: str | None, waypoint_namespace: str, rng: random.Random,
                 routes: RouteSet | None = None) -> Forward | Reply:
    """The decision for one request to `dst` (see the module docstring): `bindings` then `plan_bound`."""
    bound = bindings(state, dst, client_namespace=client_namespace, waypoint_namespace=waypoint_namespace,
                     routes=routes)
    return plan_bound(state, dst, bound, req, raw_query, rng)


_DEFAULTS: dict[tuple[int, int], tuple[ServiceInfo, Forward | Reply]] = {}


def _default_forward(svc: ServiceInfo, port: int) -> Forward | Reply:
    """`_forward_to(svc, port, port, route_name="default")`, memoized: the same for every
    request to an unrouted service (the common case), and a Forward is a large frozen object.
    Keyed by the ServiceInfo's identity (frozen; the entry keeps it alive, so its id is not
    reused), so a changed Service is a new key."""
    key = (id(svc), port)
    hit = _DEFAULTS.get(key)
    if hit is not None and hit[0] is svc:
        return hit[1]
    plan = _forward_to(svc, port, port, route_name="default")
    if len(_DEFAULTS) >= 4096:
        _DEFAULTS.clear()
    _DEFAULTS[key] = (svc, plan)
    return plan

"""Which route a request takes: Gateway API HTTPRoute precedence and VirtualService order (pure).

HTTPRoute (GAMMA, bound to a Service through `parentRefs`), `find_route`:
  * a match holds when all its conditions hold (AND); a rule holds when any match holds (OR);
  * among every holding match of every rule of every route, the winner is, in order:
    1. an Exact path match; then a PathPrefix match; then a RegularExpression match (regex
       precedence is implementation-specific; we rank it last, as Istio does),
    2. the longest path value (characters),
    3. a method match,
    4. the most header matches,
    5. the most query-param matches;
  * remaining ties go to the oldest route (creationTimestamp), then `{namespace}/{name}`
    alphabetically. The model has no timestamps, so ties go by `{namespace}/{name}` alone;
  * ties within one route go to the first rule (list order), then its first match.
  * `hostnames` are not consulted: a mesh route is selected by its Service parentRef (GEP-1426).
  * No holding match: None (the waypoint answers 404).

VirtualService, `find_vs_route`: services oldest-first (again `{namespace}/{name}` here), their
`http` routes in list order, the first route with a holding match (or no `match`) wins.

Paths are compared as given (the HTTP codec normalises them); the query string is not part of
`RequestInfo.path`. Regexes are full matches (Envoy's safe_regex semantics).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl

from mesh.model.route import (HTTPRoute, HTTPRouteMatch, HTTPRouteRule, IstioStringMatch, PathMatch,
                              PathMatchType, StringMatchType, ValueMatchType, VirtualService,
                              VSHTTPRoute, VSMatch)

__all__ = ["RequestInfo", "RouteMatch", "VSRouteMatch", "bound_routes", "bound_virtual_services",
           "find_route", "find_vs_route", "path_matches", "match_holds", "vs_match_holds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestInfo:
    """What routing looks at in a request."""

    method: str
    path: str
    """Without the query string."""
    query: tuple[tuple[str, str], ...] = ()
    """Decoded (name, value) pairs in request order."""
    headers: tuple[tuple[str, str], ...] = ()
    """(lowercase name, value) pairs in request order; repeated names allowed."""
    host: str = ""
    """:authority / Host without the port."""
    port: int = 0
    """The service port the client addressed."""

    @classmethod
    def from_target(cls, method: str, target: str, headers: Iterable[tuple[str, str]] = (), *,
                    host: str = "", port: int = 0) -> RequestInfo:
        """From a request-target (`/p?a=1`): splits and decodes the query, lowercases names."""
        path, _, qs = target.partition("?")
        path = path.partition("#")[0]
        return cls(method=method, path=path or "/",
                   query=tuple(parse_qsl(qs, keep_blank_values=True)) if qs else (),
                   headers=tuple((k.lower(), v) for k, v in headers), host=host, port=port)

    def header(self, name: str) -> str | None:
        """All values of a header joined with "," (as Envoy matches them); None if absent."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None

    def query_param(self, name: str) -> str | None:
        """The first value of a query parameter (Gateway API: SHOULD match the first)."""
        return next((v for k, v in self.query if k == name), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """The decision of `find_route`: the route, its rule and the match that won."""

    route: HTTPRoute
    rule: HTTPRouteRule
    rule_index: int
    match: HTTPRouteMatch
    match_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VSRouteMatch:
    virtual_service: VirtualService
    route: VSHTTPRoute
    route_index: int
    match: VSMatch | None
    """None when the route has no `match` (it matches everything)."""


@lru_cache(maxsize=4096)
def _compiled(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def _full(pattern: str, s: str, ignore_case: bool = False) -> bool:
    try:
        return _compiled(pattern, ignore_case).fullmatch(s) is not None
    except re.error:  # validated at load time; a bad one never matches
        return False


def path_matches(pm: PathMatch, path: str) -> bool:
    if pm.type is PathMatchType.EXACT:
        return path == pm.value
    if pm.type is PathMatchType.PREFIX:
        prefix = pm.value.rstrip("/")  # "/foo/" and "/foo" both match "/foo", "/foo/", "/foo/x"
        return not prefix or path == prefix or path.startswith(prefix + "/")
    return _full(pm.value, path)


def _value_ok(kind: ValueMatchType, want: str, got: str | None) -> bool:
    if got is None:
        return False
    return got == want if kind is ValueMatchType.EXACT else _full(want, got)


def match_holds(m: HTTPRouteMatch, req: RequestInfo) -> bool:
    """All conditions of one HTTPRouteMatch hold for the request."""
    return (path_matches(m.path, req.path)
            and (m.method is None or m.method == req.method)
            and all(_value_ok(h.type, h.value, req.header(h.name)) for h in m.headers)
            and all(_value_ok(q.type, q.value, req.query_param(q.name)) for q in m.query_params))


_PATH_RANK = {PathMatchType.EXACT: 2, PathMatchType.PREFIX: 1, PathMatchType.REGEX: 0}


def _precedence(m: HTTPRouteMatch) -> tuple[int, int, bool, int, int]:
    return (_PATH_RANK[m.path.type], len(m.path.value), m.method is not None, len(m.headers),
            len(m.query_params))


def find_route(routes: Iterable[HTTPRoute], request: RequestInfo) -> RouteMatch | None:
    """The winning rule among `routes` (already bound to the addressed service and port, see
    `bound_routes`) for `request`, by Gateway API precedence; None means 404."""
    best: RouteMatch | None = None
    best_rank: tuple[int, int, bool, int, int] | None = None
    for route in sorted(routes, key=lambda r: (r.namespace, r.name)):
        for ri, rule in enumerate(route.rules):
            for mi, m in enumerate(rule.matches):
                if not match_holds(m, request):
                    continue
                rank = _precedence(m)
                if best_rank is None or rank > best_rank:  # strictly: earlier wins ties
                    best, best_rank = RouteMatch(route=route, rule=rule, rule_index=ri, match=m,
                                                 match_index=mi), rank
    return best


def bound_routes(routes: Iterable[HTTPRoute], *, service_namespace: str, service_name: str,
                 port: int, client_namespace: str | None = None) -> list[HTTPRoute]:
    """The routes that apply to a request for Service `service_namespace/service_name` on
    `port` (a parentRef without a port binds every port).

    Producer routes live in the Service's namespace and apply to every client. Consumer routes
    live in the client's namespace and apply only to that namespace's clients; when a client's
    namespace has any consumer route for the service, those replace the producer routes (GAMMA,
    GEP-1426). Routes in other namespaces do not apply.
    """
    def binds(r: HTTPRoute) -> bool:
        return any(p.is_service and p.namespace == service_namespace and p.name == service_name
                   and (p.port is None or p.port == port) for p in r.parent_refs)
    bound = [r for r in routes if binds(r)]
    if client_namespace is not None and client_namespace != service_namespace:
        consumer = [r for r in bound if r.namespace == client_namespace]
        if consumer:
            return sorted(consumer, key=lambda r: r.name)
    return sorted((r for r in bound if r.namespace == service_namespace), key=lambda r: r.name)


# --- VirtualService -----------------------------------------------------------------------


def _istio_ok(sm: IstioStringMatch | None, got: str | None, ignore_case: bool = False) -> bool:
    if sm is None:
        return True
    if got is None:
        return False
    want = sm.value
    if sm.type is StringMatchType.REGEX:
        return _full(want, got, ignore_case)
    if ignore_case:
        want, got = want.lower(), got.lower()
    return got == want if sm.type is StringMatchType.EXACT else got.startswith(want)


def _without_ok(sm: IstioStringMatch, got: str | None) -> bool:
    # Istio inverts the matcher and treats a missing header as "", except for presence matches.
    if sm.type is StringMatchType.PRESENT:
        return got is None
    return not _istio_ok(sm, "" if got is None else got)


def vs_match_holds(m: VSMatch, req: RequestInfo) -> bool:
    return (m.applies_at_waypoint
            and _istio_ok(m.uri, req.path, m.ignore_uri_case)
            and _istio_ok(m.method, req.method)
            and _istio_ok(m.authority, req.host)
            and (m.port is None or m.port == req.port)
            and all(_istio_ok(sm, req.header(name)) for name, sm in m.headers)
            and all(_istio_ok(sm, req.query_param(name)) for name, sm in m.query_params)
            and all(_without_ok(sm, req.header(name)) for name, sm in m.without_headers))


def find_vs_route(virtual_services: Iterable[VirtualService],
                  request: RequestInfo) -> VSRouteMatch | None:
    """The first `http` route (services by `{namespace}/{name}`, routes in list order) with a
    holding match; a route without `match` matches everything. None means 404."""
    for vs in sorted(virtual_services, key=lambda v: (v.namespace, v.name)):
        for i, route in enumerate(vs.http):
            if not route.match:
                return VSRouteMatch(virtual_service=vs, route=route, route_index=i, match=None)
            for m in route.match:
                if vs_match_holds(m, request):
                    return VSRouteMatch(virtual_service=vs, route=route, route_index=i, match=m)
    return None


def _host_names(namespace: str, name: str, domain: str) -> tuple[str, ...]:
    return (f"{name}.{namespace}.svc.{domain}", f"{name}.{namespace}.svc", f"{name}.{namespace}")


def bound_virtual_services(virtual_services: Iterable[VirtualService], *, service_namespace: str,
                           service_name: str, domain: str = "cluster.local") -> list[VirtualService]:
    """The VirtualServices whose `hosts` name the Service: its FQDN or shorter forms, a short
    name from the VirtualService's own namespace, or a `*.suffix` / `*` wildcard."""
    names = _host_names(service_namespace, service_name, domain)
    fqdn = names[0]

    def names_it(vs: VirtualService, h: str) -> bool:
        if h == "*":
            return True
        if h.startswith("*."):
            return fqdn.endswith(h[1:])
        if h == service_name:
            return vs.namespace == service_namespace
        return h in names

    return sorted((v for v in virtual_services if any(names_it(v, h) for h in v.hosts)),
                  key=lambda v: (v.namespace, v.name))



"""YAML -> HTTPRoute (gateway.networking.k8s.io), VirtualService and DestinationRule
(networking.istio.io), with the APIs' validation rules.

Unknown fields are errors (a typo in a route must not silently change where traffic goes);
fields the APIs define but the mesh does not implement are `unsupported` errors.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..model import FrozenMap, ObjectMeta
from ..model.route import (MAX_WEIGHT, BackendRef, ConnectionPool, DestinationRule, HeaderMatch,
                           HeaderModifier, HTTPFilters, HTTPRoute, HTTPRouteMatch, HTTPRouteRetry,
                           HTTPRouteRule, HTTPRouteTimeouts, HTTPSettings, IstioStringMatch,
                           LoadBalancer, OutlierDetection, ParentRef, PathMatch, PathMatchType,
                           PathModifier, PathModifierType, QueryParamMatch, RequestMirror,
                           RequestRedirect, StringMatchType, Subset, TCPSettings, TrafficPolicy,
                           URLRewrite, ValueMatchType, VirtualService, VSDestination, VSFault,
                           VSFaultAbort, VSFaultDelay, VSHeaders, VSHTTPRoute, VSMatch, VSRetries,
                           VSRewrite, VSRouteDestination)
from .source import Ctx, Invalid, Path, describe, get_list, get_map, get_str

__all__ = ["http_route", "virtual_service", "destination_rule", "parse_gep2257", "parse_go_duration"]

T = TypeVar("T")

# --- shared helpers ------------------------------------------------------------------------


def _known(ctx: Ctx, m: Mapping[Any, Any], path: Path, allowed: set[str],
           unsupported: Mapping[str, str] | None = None) -> None:
    for k in m:
        if unsupported and k in unsupported:
            ctx.error(path + (str(k),), f"is not supported: {unsupported[k]}", "unsupported")
        elif k not in allowed:
            ctx.error(path + (str(k),), f"unknown field; expected one of {', '.join(sorted(allowed))}",
                      "unknown_field")


def _mapping(ctx: Ctx, v: Any, path: Path, what: str = "a mapping") -> Mapping[Any, Any]:
    if not isinstance(v, Mapping):
        ctx.fail(path, f"must be {what}, got {describe(v)}")
    return v


def _int(ctx: Ctx, m: Mapping[Any, Any], path: Path, lo: int, hi: int | None = None) -> int | None:
    v = m.get(path[-1])
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        ctx.fail(path, f"must be an integer, got {describe(v)}")
    if v < lo or (hi is not None and v > hi):
        ctx.fail(path, f"must be between {lo} and {hi}, got {v}" if hi is not None
                 else f"must be at least {lo}, got {v}")
    return v


def _number(ctx: Ctx, m: Mapping[Any, Any], path: Path, lo: float, hi: float) -> float | None:
    v = m.get(path[-1])
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        ctx.fail(path, f"must be a number, got {describe(v)}")
    if not lo <= v <= hi:
        ctx.fail(path, f"must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def _items(ctx: Ctx, m: Mapping[Any, Any], path: Path, limit: int | None = None,
           required: bool = False) -> list[Any]:
    items = get_list(ctx, m, path, required=required)
    if limit is not None and len(items) > limit:
        ctx.fail(path, f"must have at most {limit} items, got {len(items)}")
    return items


def _each(ctx: Ctx, items: list[Any], path: Path, fn: Callable[[Any, Path], T]) -> tuple[T, ...]:
    """Convert every item, collecting errors of all of them; Invalid if any failed."""
    out: list[T] = []
    failed = False
    for i, x in enumerate(items):
        r = ctx.collect(lambda: fn(x, path + (i,)))
        if r is None:
            failed = True
        else:
            out.append(r)
    if failed:
        raise Invalid
    return tuple(out)


def _regex(ctx: Ctx, value: str, path: Path) -> None:
    try:
        re.compile(value)
    except re.error as e:
        ctx.fail(path, f"{json.dumps(value)} is not a valid regular expression: {e}")


_GEP2257 = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_GEP_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_GO_DURATION = re.compile(r"^(\d+(\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_GO_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_gep2257(s: str) -> float | None:
    """Gateway API duration (GEP-2257: `10s`, `500ms`, `1h30m`) in seconds, or None if invalid."""
    if not _GEP2257.match(s):
        return None
    units = re.findall(r"([0-9]+)(ms|h|m|s)", s)
    if len({u for _, u in units}) != len(units):
        return None  # each unit at most once
    return sum(int(n) * _GEP_UNIT[u] for n, u in units)


def parse_go_duration(s: str) -> float | None:
    """Istio duration (Go/protobuf style: `10s`, `0.5s`, `1m30s`, `250ms`) in seconds, or None."""
    total, rest = 0.0, s
    if not rest:
        return None
    while rest:
        m = _GO_DURATION.match(rest)
        if m is None:
            return None
        total += float(m.group(1)) * _GO_UNIT[m.group(3)]
        rest = rest[m.end():]
    return total


def _duration(ctx: Ctx, m: Mapping[Any, Any], path: Path, *, gep: bool) -> float | None:
    s = get_str(ctx, m, path)
    if s is None:
        return None
    d = parse_gep2257(s) if gep else parse_go_duration(s)
    if d is None:
        ctx.fail(path, f"{json.dumps(s)} is not a valid duration; write e.g. " +
                 ('"10s", "500ms" or "1h30m" (GEP-2257)' if gep else '"10s", "0.5s" or "1m30s"'))
    return d


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


def _header_name(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> str:
    name = get_str(ctx, m, path, required=True) or ""
    if not _HEADER_NAME.match(name):
        ctx.fail(path, f"{json.dumps(name)} is not a valid HTTP header name")
    return name


def _str_value(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> str:
    # Header and query values may legitimately be empty; only a missing key is an error.
    if path[-1] not in m or m[path[-1]] is None:
        ctx.fail(path, "is required", "missing_field")
    v = m[path[-1]]
    if not isinstance(v, str):
        ctx.fail(path, f"must be a string, got {describe(v)}; quote it in YAML to keep it a string")
    return v


def _no_dup_names(ctx: Ctx, names: list[str], path: Path, what: str) -> None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            ctx.fail(path + (i, "name"), f"duplicate {what} {json.dumps(n)} (also {seen[n]})",
                     "duplicate")
        seen[n] = i


def _header_modifier(ctx: Ctx, v: Any, path: Path, *, istio: bool = False) -> HeaderModifier:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"set", "add", "remove"})

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        p = path + (key,)
        if istio:  # Istio: a map of name -> value
            mm = get_map(ctx, m, p)
            out = []
            for k, val in mm.items():
                if not isinstance(k, str) or not _HEADER_NAME.match(k):
                    ctx.fail(p + (str(k),), f"{json.dumps(str(k))} is not a valid HTTP header name")
                if not isinstance(val, str):
                    ctx.fail(p + (k,), f"must be a string, got {describe(val)}")
                out.append((k.lower(), val))
            return tuple(out)
        raw = _items(ctx, m, p, 16)

        def one(x: Any, ip: Path) -> tuple[str, str]:
            x = _mapping(ctx, x, ip, "a mapping with name and value")
            _known(ctx, x, ip, {"name", "value"})
            return _header_name(ctx, x, ip + ("name",)).lower(), _str_value(ctx, x, ip + ("value",))
        out_t = _each(ctx, raw, p, one)
        _no_dup_names(ctx, [n for n, _ in out_t], p, "header")
        return out_t

    def remove() -> tuple[str, ...]:
        p = path + ("remove",)
        raw = _items(ctx, m, p, None if istio else 16)
        out = []
        for i, x in enumerate(raw):
            if not isinstance(x, str) or not _HEADER_NAME.match(x):
                ctx.fail(p + (i,), f"must be an HTTP header name, got {describe(x)}")
            out.append(x.lower())
        if len(set(out)) != len(out):
            ctx.fail(p, "must not repeat a header name", "duplicate")
        return tuple(out)

    s = ctx.collect(lambda: pairs("set"))
    a = ctx.collect(lambda: pairs("add"))
    r = ctx.collect(remove)
    if s is None or a is None or r is None:
        raise Invalid
    return HeaderModifier(set=s, add=a, remove=r)


# --- HTTPRoute -----------------------------------------------------------------------------

_GW_GROUP = "gateway.networking.k8s.io"
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_BAD_PATH = ("//", "/./", "/../", "%2f", "%2F", "#")


def _parent_ref(ctx: Ctx, v: Any, path: Path, ns: str) -> ParentRef:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"group", "kind", "namespace", "name", "port", "sectionName"})
    group = m.get("group", _GW_GROUP)
    if group is None:
        group = _GW_GROUP
    if not isinstance(group, str):
        ctx.fail(path + ("group",), f"must be a string, got {describe(group)}")
    kind = get_str(ctx, m, path + ("kind",)) or "Gateway"
    if (group, kind) not in (("", "Service"), (_GW_GROUP, "Gateway")):
        ctx.fail(path + ("kind",), f"{group or 'core'}/{kind} is not supported: attach to a Service "
                 '(group: "", kind: Service) or a waypoint Gateway', "unsupported")
    name = get_str(ctx, m, path + ("name",), required=True) or ""
    port = _int(ctx, m, path + ("port",), 1, 65535)
    return ParentRef(group=group, kind=kind, namespace=get_str(ctx, m, path + ("namespace",)) or ns,
                     name=name, port=port, section_name=get_str(ctx, m, path + ("sectionName",)))


def _path_match(ctx: Ctx, v: Any, path: Path) -> PathMatch:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"type", "value"})
    t = get_str(ctx, m, path + ("type",)) or "PathPrefix"
    try:
        pt = PathMatchType(t)
    except ValueError:
        ctx.fail(path + ("type",), f"must be Exact, PathPrefix or RegularExpression, got {describe(t)}")
    value = get_str(ctx, m, path + ("value",)) or "/"
    if pt is PathMatchType.REGEX:
        _regex(ctx, value, path + ("value",))
    else:
        if not value.startswith("/"):
            ctx.fail(path + ("value",), f"must be an absolute path starting with '/', got {json.dumps(value)}")
        bad = [b for b in _BAD_PATH if b in value]
        if bad:
            ctx.fail(path + ("value",), f"{json.dumps(value)} must not contain {json.dumps(bad[0])}")
    return PathMatch(type=pt, value=value)


def _value_match(ctx: Ctx, x: Any, path: Path, header: bool) -> tuple[str, str, ValueMatchType]:
    m = _mapping(ctx, x, path, "a mapping with name and value")
    _known(ctx, m, path, {"type", "name", "value"})
    if header:
        name = _header_name(ctx, m, path + ("name",)).lower()
    else:
        name = get_str(ctx, m, path + ("name",), required=True) or ""
    t = get_str(ctx, m, path + ("type",)) or "Exact"
    try:
        vt = ValueMatchType(t)
    except ValueError:
        ctx.fail(path + ("type",), f"must be Exact or RegularExpression, got {describe(t)}")
    value = _str_value(ctx, m, path + ("value",))
    if vt is ValueMatchType.REGEX:
        _regex(ctx, value, path + ("value",))
    return name, value, vt


_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def _route_match(ctx: Ctx, v: Any, path: Path) -> HTTPRouteMatch:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"path", "headers", "queryParams", "method"})
    pm = ctx.collect(lambda: _path_match(ctx, m["path"], path + ("path",))
                     if m.get("path") is not None else PathMatch())

    def headers() -> tuple[HeaderMatch, ...]:
        p = path + ("headers",)
        out = _each(ctx, _items(ctx, m, p, 16), p, lambda x, ip: HeaderMatch(
            **dict(zip(("name", "value", "type"), _value_match(ctx, x, ip, True)))))
        _no_dup_names(ctx, [h.name for h in out], p, "header")
        return out

    def queries() -> tuple[QueryParamMatch, ...]:
        p = path + ("queryParams",)
        out = _each(ctx, _items(ctx, m, p, 16), p, lambda x, ip: QueryParamMatch(
            **dict(zip(("name", "value", "type"), _value_match(ctx, x, ip, False)))))
        _no_dup_names(ctx, [q.name for q in out], p, "query parameter")
        return out

    def method() -> str | None:
        s = get_str(ctx, m, path + ("method",))
        if s is not None and s not in _METHODS:
            ctx.fail(path + ("method",), f"must be one of {', '.join(sorted(_METHODS))}, got {describe(s)}")
        return s

    h, q, meth = ctx.collect(headers), ctx.collect(queries), ctx.collect(method)
    if pm is None or h is None or q is None:
        raise Invalid
    return HTTPRouteMatch(path=pm, headers=h, query_params=q, method=meth)


def _backend_ref(ctx: Ctx, v: Any, path: Path, ns: str, *, weighted: bool = True) -> BackendRef:
    m = _mapping(ctx, v, path)
    allowed = {"group", "kind", "name", "namespace", "port"} | ({"weight", "filters"} if weighted else set())
    _known(ctx, m, path, allowed)
    group = m.get("group") or ""
    kind = get_str(ctx, m, path + ("kind",)) or "Service"
    if (group, kind) != ("", "Service"):
        ctx.fail(path + ("kind",), f"{group or 'core'}/{kind} is not supported: only Service backends",
                 "unsupported")
    name = get_str(ctx, m, path + ("name",), required=True) or ""
    port = _int(ctx, m, path + ("port",), 1, 65535)
    if port is None:
        ctx.fail(path + ("port",), "is required for a Service backend", "missing_field")
    weight = _int(ctx, m, path + ("weight",), 0, MAX_WEIGHT) if weighted else None
    filters = (_filters(ctx, m, path + ("filters",), ns, None, backend=True)
               if weighted and m.get("filters") else HTTPFilters())
    return BackendRef(group="", kind="Service", name=name,
                      namespace=get_str(ctx, m, path + ("namespace",)) or ns, port=port,
                      weight=1 if weight is None else weight, filters=filters)


def _path_modifier(ctx: Ctx, v: Any, path: Path,
                   matches: tuple[HTTPRouteMatch, ...] | None) -> PathModifier:
    """`matches` None: not known here (a backendRef filter, or the rule's matches were bad)."""
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"type", "replaceFullPath", "replacePrefixMatch"})
    t = get_str(ctx, m, path + ("type",), required=True)
    try:
        pt = PathModifierType(t)
    except ValueError:
        ctx.fail(path + ("type",), f"must be ReplaceFullPath or ReplacePrefixMatch, got {describe(t)}")
    field = "replaceFullPath" if pt is PathModifierType.REPLACE_FULL_PATH else "replacePrefixMatch"
    other = "replacePrefixMatch" if field == "replaceFullPath" else "replaceFullPath"
    if other in m:
        ctx.fail(path + (other,), f"must not be set when type is {t}")
    value = get_str(ctx, m, path + (field,), required=True) or ""
    if pt is PathModifierType.REPLACE_PREFIX_MATCH and matches is not None and not (
            len(matches) == 1 and matches[0].path.type is PathMatchType.PREFIX):
        ctx.fail(path, "ReplacePrefixMatch needs the rule to have exactly one PathPrefix match")
    return PathModifier(type=pt, value=value)


_FILTER_FIELDS = {"RequestHeaderModifier": "requestHeaderModifier",
                  "ResponseHeaderModifier": "responseHeaderModifier",
                  "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect",
                  "URLRewrite": "urlRewrite"}
_FILTER_UNSUPPORTED = {"ExtensionRef": "extensionRef", "CORS": "cors"}


def _filters(ctx: Ctx, m: Mapping[Any, Any], path: Path, ns: str,
             matches: tuple[HTTPRouteMatch, ...] | None, *, backend: bool = False) -> HTTPFilters:
    raw = _items(ctx, m, path, 16)
    found: dict[str, Any] = {}
    mirrors: list[RequestMirror] = []
    failed = False
    for i, f in enumerate(raw):
        fp = path + (i,)
        try:
            f = _mapping(ctx, f, fp)
            _known(ctx, f, fp, {"type", *_FILTER_FIELDS.values(), *_FILTER_UNSUPPORTED.values()})
            t = get_str(ctx, f, fp + ("type",), required=True) or ""
            if t in _FILTER_UNSUPPORTED:
                ctx.fail(fp + ("type",), f"{t} filters are not supported", "unsupported")
            if t not in _FILTER_FIELDS:
                ctx.fail(fp + ("type",), f"must be one of {', '.join(_FILTER_FIELDS)}, got {describe(t)}")
            field = _FILTER_FIELDS[t]
            for other in (*_FILTER_FIELDS.values(), *_FILTER_UNSUPPORTED.values()):
                if other != field and other in f:
                    ctx.fail(fp + (other,), f"must not be set for a {t} filter")
            if f.get(field) is None:
                ctx.fail(fp + (field,), f"is required for a {t} filter", "missing_field")
            if t != "RequestMirror" and t in found:
                ctx.fail(fp + ("type",), f"{t} may appear only once per rule (also filters[{found[t][0]}])",
                         "duplicate")
            cfg, vp = f[field], fp + (field,)
            if t in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                found[t] = (i, _header_modifier(ctx, cfg, vp))
            elif t == "RequestMirror":
                mirrors.append(_mirror(ctx, cfg, vp, ns))
            elif t == "RequestRedirect":
                found[t] = (i, _redirect(ctx, cfg, vp, matches))
            else:
                found[t] = (i, _rewrite(ctx, cfg, vp, matches))
        except Invalid:
            failed = True
    if failed:
        raise Invalid
    if "RequestRedirect" in found and "URLRewrite" in found:
        ctx.fail(path, "RequestRedirect and URLRewrite cannot be used together")

    def get(t: str) -> Any:
        return found[t][1] if t in found else None
    return HTTPFilters(request_headers=get("RequestHeaderModifier"),
                       response_headers=get("ResponseHeaderModifier"), mirrors=tuple(mirrors),
                       redirect=get("RequestRedirect"), rewrite=get("URLRewrite"))


def _mirror(ctx: Ctx, v: Any, path: Path, ns: str) -> RequestMirror:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"backendRef", "percent", "fraction"})
    if m.get("backendRef") is None:
        ctx.fail(path + ("backendRef",), "is required", "missing_field")
    backend = _backend_ref(ctx, m["backendRef"], path + ("backendRef",), ns, weighted=False)
    if "percent" in m and "fraction" in m:
        ctx.fail(path + ("fraction",), "percent and fraction are mutually exclusive")
    percent = _int(ctx, m, path + ("percent",), 0, 100)
    if m.get("fraction") is not None:
        fp = path + ("fraction",)
        fr = get_map(ctx, m, fp)
        _known(ctx, fr, fp, {"numerator", "denominator"})
        num = _int(ctx, fr, fp + ("numerator",), 0)
        if num is None:
            ctx.fail(fp + ("numerator",), "is required", "missing_field")
        den = _int(ctx, fr, fp + ("denominator",), 1)
        den = 100 if den is None else den
        if num > den:
            ctx.fail(fp, f"numerator ({num}) must not exceed denominator ({den})")
        return RequestMirror(backend=backend, percent=100.0 * num / den)
    return RequestMirror(backend=backend, percent=100.0 if percent is None else float(percent))


def _redirect(ctx: Ctx, v: Any, path: Path,
              matches: tuple[HTTPRouteMatch, ...] | None) -> RequestRedirect:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"scheme", "hostname", "path", "port", "statusCode"})
    scheme = get_str(ctx, m, path + ("scheme",))
    if scheme not in (None, "http", "https"):
        ctx.fail(path + ("scheme",), f"must be http or https, got {describe(scheme)}")
    status = _int(ctx, m, path + ("statusCode",), 0)
    if status is not None and status not in (301, 302, 303, 307, 308):
        ctx.fail(path + ("statusCode",), f"must be 301, 302, 303, 307 or 308, got {status}")
    pm = _path_modifier(ctx, m["path"], path + ("path",), matches) if m.get("path") is not None else None
    return RequestRedirect(scheme=scheme, hostname=_hostname(ctx, m, path + ("hostname",), False),
                           path=pm, port=_int(ctx, m, path + ("port",), 1, 65535),
                           status_code=status or 302)


def _rewrite(ctx: Ctx, v: Any, path: Path, matches: tuple[HTTPRouteMatch, ...] | None) -> URLRewrite:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"hostname", "path"})
    pm = _path_modifier(ctx, m["path"], path + ("path",), matches) if m.get("path") is not None else None
    return URLRewrite(hostname=_hostname(ctx, m, path + ("hostname",), False), path=pm)


def _hostname(ctx: Ctx, m: Mapping[Any, Any], path: Path, wildcard: bool) -> str | None:
    h = get_str(ctx, m, path)
    if h is None:
        return None
    if not (len(h) <= 253 and _HOSTNAME.match(h)) or (h.startswith("*.") and not wildcard):
        ctx.fail(path, f"{json.dumps(h)} is not a valid hostname (lowercase RFC 1123"
                 + (", optionally with a leading '*.' label)" if wildcard else ")"))
    return h


def _timeouts(ctx: Ctx, v: Any, path: Path) -> HTTPRouteTimeouts:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"request", "backendRequest"})
    req = _duration(ctx, m, path + ("request",), gep=True)
    backend = _duration(ctx, m, path + ("backendRequest",), gep=True)
    if req and backend is not None and backend > req:
        ctx.fail(path + ("backendRequest",), f"{m['backendRequest']} must not exceed request "
                 f"timeout {m['request']}")
    return HTTPRouteTimeouts(request=req, backend_request=backend)


def _retry(ctx: Ctx, v: Any, path: Path) -> HTTPRouteRetry:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"codes", "attempts", "backoff"})
    codes = []
    for i, c in enumerate(_items(ctx, m, path + ("codes",))):
        if isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 599:
            ctx.fail(path + ("codes", i), f"must be an HTTP status between 400 and 599, got {describe(c)}")
        codes.append(c)
    return HTTPRouteRetry(codes=tuple(codes), attempts=_int(ctx, m, path + ("attempts",), 1),
                          backoff=_duration(ctx, m, path + ("backoff",), gep=True))


def _rule(ctx: Ctx, v: Any, path: Path, ns: str) -> HTTPRouteRule:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"name", "matches", "filters", "backendRefs", "timeouts", "retry"},
           {"sessionPersistence": "session persistence is not implemented by the waypoint"})
    name = get_str(ctx, m, path + ("name",))
    mp = path + ("matches",)
    matches = ctx.collect(lambda: _each(ctx, _items(ctx, m, mp, 64), mp,
                                        lambda x, ip: _route_match(ctx, x, ip)))
    matches = matches or (HTTPRouteMatch(),) if matches is not None else None
    filters = ctx.collect(lambda: _filters(ctx, m, path + ("filters",), ns, matches))
    bp = path + ("backendRefs",)
    backends = ctx.collect(lambda: _each(ctx, _items(ctx, m, bp, 16), bp,
                                         lambda x, ip: _backend_ref(ctx, x, ip, ns)))
    timeouts = ctx.collect(lambda: _timeouts(ctx, m["timeouts"], path + ("timeouts",))
                           if m.get("timeouts") is not None else None)
    retry = ctx.collect(lambda: _retry(ctx, m["retry"], path + ("retry",))
                        if m.get("retry") is not None else None)
    if matches is None or filters is None or backends is None:
        raise Invalid
    if filters.redirect is not None and backends:
        ctx.fail(bp, "must be empty when the rule has a RequestRedirect filter")
    return HTTPRouteRule(name=name, matches=matches, filters=filters, backend_refs=backends,
                         timeouts=timeouts, retry=retry)


def http_route(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> HTTPRoute:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"parentRefs", "hostnames", "rules"})
    ns = meta.namespace or "default"
    pp = ("spec", "parentRefs")
    parents = ctx.collect(lambda: _each(ctx, _items(ctx, spec, pp, 32), pp,
                                        lambda x, ip: _parent_ref(ctx, x, ip, ns)))
    hp = ("spec", "hostnames")
    hostnames = []
    for i, h in enumerate(ctx.collect(lambda: _items(ctx, spec, hp, 16)) or []):
        if not isinstance(h, str):
            ctx.error(hp + (i,), f"must be a string, got {describe(h)}", "bad_value")
            continue
        if not (len(h) <= 253 and _HOSTNAME.match(h)):
            ctx.error(hp + (i,), f"{json.dumps(h)} is not a valid hostname (lowercase RFC 1123, "
                      "optionally with a leading '*.' label)", "bad_value")
            continue
        hostnames.append(h)
    rp = ("spec", "rules")
    rules = ctx.collect(lambda: _each(ctx, _items(ctx, spec, rp, 16), rp,
                                      lambda x, ip: _rule(ctx, x, ip, ns)))
    if rules is not None:
        named = [(i, r.name) for i, r in enumerate(rules) if r.name]
        seen: dict[str, int] = {}
        for i, n in named:
            if n in seen:
                ctx.error(rp + (i, "name"), f"duplicate rule name {json.dumps(n)} (also rules[{seen[n]}])",
                          "duplicate")
            seen.setdefault(n, i)
    if parents is None or rules is None or ctx.errors:
        raise Invalid
    return HTTPRoute(meta=meta, parent_refs=parents, hostnames=tuple(hostnames),
                     rules=rules or (HTTPRouteRule(),))


# --- VirtualService ------------------------------------------------------------------------


def _istio_string(ctx: Ctx, v: Any, path: Path) -> IstioStringMatch:
    m = _mapping(ctx, v, path, "a mapping with exact, prefix or regex")
    _known(ctx, m, path, {"exact", "prefix", "regex"})
    set_ = [k for k in ("exact", "prefix", "regex") if k in m]
    if len(set_) != 1:
        ctx.fail(path, "must have exactly one of exact, prefix or regex")
    k = set_[0]
    value = _str_value(ctx, m, path + (k,))
    if k == "regex":
        _regex(ctx, value, path + (k,))
    return IstioStringMatch(type=StringMatchType(k), value=value)


def _string_map(ctx: Ctx, m: Mapping[Any, Any], path: Path, header: bool
                ) -> tuple[tuple[str, IstioStringMatch], ...]:
    out = []
    for k, v in get_map(ctx, m, path).items():
        if not isinstance(k, str) or (header and not _HEADER_NAME.match(k)):
            ctx.fail(path + (str(k),), f"{json.dumps(str(k))} is not a valid "
                     + ("HTTP header name" if header else "name"))
        out.append((k.lower() if header else k, _istio_string(ctx, v, path + (k,))))
    return tuple(out)


def _vs_match(ctx: Ctx, v: Any, path: Path) -> VSMatch:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"name", "uri", "headers", "queryParams", "method", "authority", "port",
                          "ignoreUriCase"},
           {k: "ambient waypoints do not evaluate source_* or gateway conditions" for k in
            ("sourceLabels", "sourceNamespace", "gateways", "withoutHeaders", "scheme",
             "statPrefix")})

    def opt(key: str) -> IstioStringMatch | None:
        return _istio_string(ctx, m[key], path + (key,)) if m.get(key) is not None else None
    ignore = m.get("ignoreUriCase", False)
    if not isinstance(ignore, bool):
        ctx.fail(path + ("ignoreUriCase",), f"must be true or false, got {describe(ignore)}")
    return VSMatch(name=get_str(ctx, m, path + ("name",)), uri=opt("uri"),
                   headers=_string_map(ctx, m, path + ("headers",), True),
                   query_params=_string_map(ctx, m, path + ("queryParams",), False),
                   method=opt("method"), authority=opt("authority"),
                   port=_int(ctx, m, path + ("port",), 1, 65535), ignore_uri_case=ignore)


def _vs_destination(ctx: Ctx, v: Any, path: Path) -> VSDestination:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"host", "subset", "port"})
    port = None
    if m.get("port") is not None:
        pm = _mapping(ctx, m["port"], path + ("port",), "a mapping with number")
        _known(ctx, pm, path + ("port",), {"number"})
        port = _int(ctx, pm, path + ("port", "number"), 1, 65535)
    return VSDestination(host=get_str(ctx, m, path + ("host",), required=True) or "",
                         subset=get_str(ctx, m, path + ("subset",)), port=port)


def _vs_headers(ctx: Ctx, v: Any, path: Path) -> VSHeaders:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"request", "response"})
    req = _header_modifier(ctx, m["request"], path + ("request",), istio=True) if m.get("request") else None
    resp = _header_modifier(ctx, m["response"], path + ("response",), istio=True) if m.get("response") else None
    return VSHeaders(request=req, response=resp)


def _percentage(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> float | None:
    if m.get(path[-1]) is None:
        return None
    pm = _mapping(ctx, m[path[-1]], path, "a mapping with value")
    _known(ctx, pm, path, {"value"})
    return _number(ctx, pm, path + ("value",), 0.0, 100.0)


def _vs_route_dest(ctx: Ctx, v: Any, path: Path, single: bool) -> VSRouteDestination:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"destination", "weight", "headers"})
    if m.get("destination") is None:
        ctx.fail(path + ("destination",), "is required", "missing_field")
    dest = _vs_destination(ctx, m["destination"], path + ("destination",))
    weight = _int(ctx, m, path + ("weight",), 0, MAX_WEIGHT)
    headers = _vs_headers(ctx, m["headers"], path + ("headers",)) if m.get("headers") else None
    return VSRouteDestination(destination=dest, weight=(100 if single else 0) if weight is None else weight,
                              headers=headers)


def _vs_fault(ctx: Ctx, v: Any, path: Path) -> VSFault:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"delay", "abort"})
    delay = abort = None
    if m.get("delay") is not None:
        dp = path + ("delay",)
        d = _mapping(ctx, m["delay"], dp)
        _known(ctx, d, dp, {"fixedDelay", "percentage"}, {"exponentialDelay": "use fixedDelay",
                                                          "percent": "use percentage.value"})
        fixed = _duration(ctx, d, dp + ("fixedDelay",), gep=False)
        if fixed is None:
            ctx.fail(dp + ("fixedDelay",), "is required", "missing_field")
        p = _percentage(ctx, d, dp + ("percentage",))
        delay = VSFaultDelay(fixed_delay=fixed, percentage=100.0 if p is None else p)
    if m.get("abort") is not None:
        ap = path + ("abort",)
        a = _mapping(ctx, m["abort"], ap)
        _known(ctx, a, ap, {"httpStatus", "percentage"}, {"grpcStatus": "use httpStatus",
                                                          "http2Error": "use httpStatus"})
        status = _int(ctx, a, ap + ("httpStatus",), 200, 599)
        if status is None:
            ctx.fail(ap + ("httpStatus",), "is required", "missing_field")
        p = _percentage(ctx, a, ap + ("percentage",))
        abort = VSFaultAbort(http_status=status, percentage=100.0 if p is None else p)
    return VSFault(delay=delay, abort=abort)


def _vs_retries(ctx: Ctx, v: Any, path: Path) -> VSRetries:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities"})
    retry_on = get_str(ctx, m, path + ("retryOn",))
    return VSRetries(attempts=_int(ctx, m, path + ("attempts",), 0) or 0,
                     per_try_timeout=_duration(ctx, m, path + ("perTryTimeout",), gep=False),
                     retry_on=tuple(s.strip() for s in retry_on.split(",") if s.strip()) if retry_on else ())


def _vs_http(ctx: Ctx, v: Any, path: Path) -> VSHTTPRoute:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"name", "match", "route", "timeout", "retries", "fault", "mirror",
                          "mirrorPercentage", "headers", "rewrite"},
           {k: "not implemented by the waypoint" for k in
            ("redirect", "directResponse", "delegate", "corsPolicy", "mirrors", "mirrorPercent",
             "mirror_percent")})
    mp, rp = path + ("match",), path + ("route",)
    matches = ctx.collect(lambda: _each(ctx, _items(ctx, m, mp), mp, lambda x, ip: _vs_match(ctx, x, ip)))
    raw_routes = ctx.collect(lambda: _items(ctx, m, rp, required=True)) or []
    routes = ctx.collect(lambda: _each(ctx, raw_routes, rp,
                                       lambda x, ip: _vs_route_dest(ctx, x, ip, len(raw_routes) == 1)))
    timeout = ctx.collect(lambda: _duration(ctx, m, path + ("timeout",), gep=False))
    retries = ctx.collect(lambda: _vs_retries(ctx, m["retries"], path + ("retries",)) if m.get("retries") else None)
    fault = ctx.collect(lambda: _vs_fault(ctx, m["fault"], path + ("fault",)) if m.get("fault") else None)
    mirror = ctx.collect(lambda: _vs_destination(ctx, m["mirror"], path + ("mirror",)) if m.get("mirror") else None)
    mpct = ctx.collect(lambda: _percentage(ctx, m, path + ("mirrorPercentage",)))
    headers = ctx.collect(lambda: _vs_headers(ctx, m["headers"], path + ("headers",)) if m.get("headers") else None)

    def rewrite() -> VSRewrite | None:
        if m.get("rewrite") is None:
            return None
        wp = path + ("rewrite",)
        w = _mapping(ctx, m["rewrite"], wp)
        _known(ctx, w, wp, {"uri", "authority"}, {"uriRegexRewrite": "use uri"})
        return VSRewrite(uri=get_str(ctx, w, wp + ("uri",)), authority=get_str(ctx, w, wp + ("authority",)))
    rw = ctx.collect(rewrite)
    if mpct is not None and "mirror" not in m:
        ctx.error(path + ("mirrorPercentage",), "needs mirror", "missing_field")
    if matches is None or routes is None:
        raise Invalid
    if routes and all(r.weight == 0 for r in routes):
        ctx.fail(rp, "at least one destination needs a non-zero weight")
    return VSHTTPRoute(name=get_str(ctx, m, path + ("name",)), match=matches, route=routes,
                       timeout=timeout, retries=retries, fault=fault, mirror=mirror,
                       mirror_percentage=mpct, headers=headers, rewrite=rw)


def _str_items(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> tuple[str, ...]:
    out = []
    for i, s in enumerate(_items(ctx, m, path)):
        if not isinstance(s, str) or not s:
            ctx.fail(path + (i,), f"must be a non-empty string, got {describe(s)}")
        out.append(s)
    return tuple(out)


def virtual_service(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> VirtualService:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"hosts", "gateways", "http", "exportTo"},
           {"tcp": "only http routes are implemented", "tls": "only http routes are implemented"})
    hosts = ctx.collect(lambda: _str_items(ctx, spec, ("spec", "hosts")))
    if hosts == ():
        ctx.error(("spec", "hosts"), "is required and must not be empty", "missing_field")
    gateways = ctx.collect(lambda: _str_items(ctx, spec, ("spec", "gateways")))
    export_to = ctx.collect(lambda: _str_items(ctx, spec, ("spec", "exportTo")))
    hp = ("spec", "http")
    http = ctx.collect(lambda: _each(ctx, _items(ctx, spec, hp), hp, lambda x, ip: _vs_http(ctx, x, ip)))
    if ctx.errors or hosts is None or http is None:
        raise Invalid
    return VirtualService(meta=meta, hosts=hosts, gateways=gateways or (), http=http,
                          export_to=export_to or ())


# --- DestinationRule -----------------------------------------------------------------------


def _traffic_policy(ctx: Ctx, v: Any, path: Path) -> TrafficPolicy:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"connectionPool", "outlierDetection", "loadBalancer"},
           {k: "not implemented by the mesh" for k in ("tls", "portLevelSettings", "tunnel",
                                                       "proxyProtocol")})
    pool = outlier = lb = None
    if m.get("connectionPool") is not None:
        cp = path + ("connectionPool",)
        c = _mapping(ctx, m["connectionPool"], cp)
        _known(ctx, c, cp, {"tcp", "http"})
        tcp = http = None
        if c.get("tcp") is not None:
            tp = cp + ("tcp",)
            t = _mapping(ctx, c["tcp"], tp)
            _known(ctx, t, tp, {"maxConnections", "connectTimeout"})
            tcp = TCPSettings(max_connections=_int(ctx, t, tp + ("maxConnections",), 1),
                              connect_timeout=_duration(ctx, t, tp + ("connectTimeout",), gep=False))
        if c.get("http") is not None:
            hp = cp + ("http",)
            h = _mapping(ctx, c["http"], hp)
            _known(ctx, h, hp, {"http1MaxPendingRequests", "http2MaxRequests",
                                "maxRequestsPerConnection", "maxRetries", "idleTimeout"})
            http = HTTPSettings(
                http1_max_pending_requests=_int(ctx, h, hp + ("http1MaxPendingRequests",), 1),
                http2_max_requests=_int(ctx, h, hp + ("http2MaxRequests",), 1),
                max_requests_per_connection=_int(ctx, h, hp + ("maxRequestsPerConnection",), 0),
                max_retries=_int(ctx, h, hp + ("maxRetries",), 0),
                idle_timeout=_duration(ctx, h, hp + ("idleTimeout",), gep=False))
        pool = ConnectionPool(tcp=tcp, http=http)
    if m.get("outlierDetection") is not None:
        op = path + ("outlierDetection",)
        o = _mapping(ctx, m["outlierDetection"], op)
        _known(ctx, o, op, {"consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                            "baseEjectionTime", "maxEjectionPercent", "minHealthPercent"})
        outlier = OutlierDetection(
            consecutive_5xx_errors=_int(ctx, o, op + ("consecutive5xxErrors",), 0),
            consecutive_gateway_errors=_int(ctx, o, op + ("consecutiveGatewayErrors",), 0),
            interval=_duration(ctx, o, op + ("interval",), gep=False),
            base_ejection_time=_duration(ctx, o, op + ("baseEjectionTime",), gep=False),
            max_ejection_percent=_int(ctx, o, op + ("maxEjectionPercent",), 0, 100),
            min_health_percent=_int(ctx, o, op + ("minHealthPercent",), 0, 100))
    if m.get("loadBalancer") is not None:
        lp = path + ("loadBalancer",)
        lbm = _mapping(ctx, m["loadBalancer"], lp)
        _known(ctx, lbm, lp, {"simple"}, {k: "only loadBalancer.simple is implemented" for k in
                                          ("consistentHash", "localityLbSetting", "warmupDurationSecs",
                                           "warmup")})
        s = get_str(ctx, lbm, lp + ("simple",)) or "UNSPECIFIED"
        try:
            lb = LoadBalancer(s)
        except ValueError:
            ctx.fail(lp + ("simple",), "must be one of " + ", ".join(x.value for x in LoadBalancer)
                     + f"; got {describe(s)}")
    return TrafficPolicy(connection_pool=pool, outlier_detection=outlier, load_balancer=lb)


def _subset(ctx: Ctx, v: Any, path: Path) -> Subset:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"name", "labels", "trafficPolicy"})
    name = get_str(ctx, m, path + ("name",), required=True) or ""
    labels = get_map(ctx, m, path + ("labels",))
    for k, val in labels.items():
        if not isinstance(val, str):
            ctx.fail(path + ("labels", str(k)), f"must be a string, got {describe(val)}; quote it in YAML")
    tp = _traffic_policy(ctx, m["trafficPolicy"], path + ("trafficPolicy",)) if m.get("trafficPolicy") else None
    return Subset(name=name, labels=FrozenMap({str(k): x for k, x in labels.items()}), traffic_policy=tp)


def destination_rule(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> DestinationRule:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"host", "subsets", "trafficPolicy", "exportTo"},
           {"workloadSelector": "not used in ambient mode"})
    host = ctx.collect(lambda: get_str(ctx, spec, ("spec", "host"), required=True))
    sp = ("spec", "subsets")
    subsets = ctx.collect(lambda: _each(ctx, _items(ctx, spec, sp), sp, lambda x, ip: _subset(ctx, x, ip)))
    if subsets:
        ctx.collect(lambda: _no_dup_names(ctx, [s.name for s in subsets], sp, "subset"))
    tp = ctx.collect(lambda: _traffic_policy(ctx, spec["trafficPolicy"], ("spec", "trafficPolicy"))
                     if spec.get("trafficPolicy") else None)
    export_to = ctx.collect(lambda: _str_items(ctx, spec, ("spec", "exportTo")))
    if ctx.errors or host is None or subsets is None:
        raise Invalid
    return DestinationRule(meta=meta, host=host, subsets=subsets, traffic_policy=tp,
                           export_to=export_to or ())

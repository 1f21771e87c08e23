"""YAML -> Gateway API HTTPRoute (gateway.networking.k8s.io), with the API's validation rules.

Unknown fields are errors (a typo in a route must not silently change where traffic goes);
fields the API defines but the mesh does not implement are `unsupported` errors.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..model import ObjectMeta
from ..model.route import (MAX_WEIGHT, BackendRef, HeaderMatch, HTTPFilters, HTTPRoute, HTTPRouteMatch,
                           HTTPRouteRetry, HTTPRouteRule, HTTPRouteTimeouts, ParentRef, PathMatch,
                           PathMatchType, PathModifier, PathModifierType, QueryParamMatch,
                           RequestMirror, RequestRedirect, URLRewrite, ValueMatchType)
from .source import Ctx, Invalid, Path, describe, get_map, get_str
from .route_fields import (parse_gep2257, parse_go_duration, _known, _mapping, _int, _items, _each,
                           _regex, _duration, _header_name, _str_value, _no_dup_names, _header_modifier)

__all__ = ["http_route", "parse_gep2257", "parse_go_duration"]

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
    if not isinstance(group, str):
        ctx.fail(path + ("group",), f"must be a string, got {describe(group)}")
    kind = get_str(ctx, m, path + ("kind",)) or "Service"
    service = (group, kind) == ("", "Service")
    if not service:
        # Valid Gateway API (ServiceImport, a vendor's backend kind...): accepted, and as the
        # spec asks its share of traffic gets 500; the route's status says ResolvedRefs
        # InvalidKind (controlplane/route_status.py).
        ctx.warn(path + ("kind",), f"{group or 'core'}/{kind} backends are not supported (only Service): "
                 "requests routed to it get 500 (status: ResolvedRefs InvalidKind)")
    name = get_str(ctx, m, path + ("name",), required=True) or ""
    port = _int(ctx, m, path + ("port",), 1, 65535)
    if port is None and service:
        ctx.fail(path + ("port",), "is required for a Service backend", "missing_field")
    weight = _int(ctx, m, path + ("weight",), 0, MAX_WEIGHT) if weighted else None
    filters = (_filters(ctx, m, path + ("filters",), ns, None, backend=True)
               if weighted and m.get("filters") else HTTPFilters())
    return BackendRef(group=group, kind=kind, name=name,
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
    if not (len(h) <= 253 and _HOSTNAME.fullmatch(h)) or (h.startswith("*.") and not wildcard):
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
        if not (len(h) <= 253 and _HOSTNAME.fullmatch(h)):
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

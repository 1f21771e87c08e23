"""YAML -> Istio VirtualService and DestinationRule (networking.istio.io), validated.

Unknown fields are errors; fields Istio defines but the mesh does not implement are `unsupported`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..model import FrozenMap, ObjectMeta
from ..model.route import (MAX_WEIGHT, ConnectionPool, DestinationRule, HTTPSettings, IstioStringMatch,
                           LoadBalancer, OutlierDetection, StringMatchType, Subset, TCPSettings,
                           TrafficPolicy, VirtualService, VSDestination, VSFault, VSFaultAbort,
                           VSFaultDelay, VSHeaders, VSHTTPRoute, VSMatch, VSRetries, VSRewrite,
                           VSRouteDestination)
from .source import Ctx, Invalid, Path, describe, get_map, get_str
from .route_fields import (_known, _mapping, _int, _number, _items, _each, _regex, _duration,
                           _HEADER_NAME, _str_value, _no_dup_names, _header_modifier)

__all__ = ["virtual_service", "destination_rule"]

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

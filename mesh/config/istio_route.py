"""YAML -> Istio VirtualService and DestinationRule (networking.istio.io), validated.

Every field Istio's schema has is accepted (deprecated forms mapped as Istio maps them); a field
the mesh does not act on yet is kept with a warning that names it; unknown fields are errors
(typo protection). The one field that would change where traffic goes if ignored (`delegate`)
stays `unsupported`.
"""
from __future__ import annotations

import base64
import binascii
import json
from http import HTTPStatus
from collections.abc import Mapping
from typing import Any

from ..model import FrozenMap, ObjectMeta
from ..model.route import (ENVOY_RETRY_ON, MAX_WEIGHT, MESH_GATEWAY, ClientTLS, ConnectionPool,
                           ConsistentHash, DestinationRule, H2UpgradePolicy, HTTPCookie, HTTPSettings, IstioStringMatch, LoadBalancer,
                           OutlierDetection, StringMatchType, Subset, TCPKeepalive, TCPSettings,
                           TLSMode, TrafficPolicy, VirtualService, VSDestination, VSFault,
                           VSFaultAbort, VSFaultDelay, VSHeaders, VSHTTPRoute, VSMatch, VSMirror,
                           VSDirectResponse, VSRedirect, VSRetries, VSRewrite, VSRouteDestination, Warmup)
from .source import Ctx, Invalid, Path, describe, get_map, get_str
from .route_fields import (_known, _mapping, _int, _number, _items, _each, _regex, _duration,
                           _HEADER_NAME, _str_value, _no_dup_names, _header_modifier, _shape, _bool)

__all__ = ["virtual_service", "destination_rule"]

# --- VirtualService ------------------------------------------------------------------------


def _istio_string(ctx: Ctx, v: Any, path: Path, presence: bool = False) -> IstioStringMatch:
    """`presence`: a header or query parameter, where `{}` and `regex: "*"` test presence (Istio)."""
    if presence and (v is None or v == {}):
        return IstioStringMatch(type=StringMatchType.PRESENT, value="")
    m = _mapping(ctx, v, path, "a mapping with exact, prefix or regex")
    _known(ctx, m, path, {"exact", "prefix", "regex"})
    set_ = [k for k in ("exact", "prefix", "regex") if k in m]
    if len(set_) != 1:
        ctx.fail(path, "must have exactly one of exact, prefix or regex"
                 + (" (or {} to test presence)" if presence else ""))
    k = set_[0]
    value = _str_value(ctx, m, path + (k,))
    if presence and k == "regex" and value == "*":
        return IstioStringMatch(type=StringMatchType.PRESENT, value="")
    if k == "regex":
        _regex(ctx, value, path + (k,))
    return IstioStringMatch(type=StringMatchType(k), value=value)


def _string_map(ctx: Ctx, m: Mapping[Any, Any], path: Path, header: bool
                ) -> tuple[tuple[str, IstioStringMatch], ...]:
    out = []
    for k, v in get_map(ctx, m, path).items():
        if not isinstance(k, str) or (header and not _HEADER_NAME.fullmatch(k)):
            ctx.fail(path + (str(k),), f"{json.dumps(str(k))} is not a valid "
                     + ("HTTP header name" if header else "name"))
        out.append((k.lower() if header else k, _istio_string(ctx, v, path + (k,), presence=True)))
    return tuple(out)


def _vs_match(ctx: Ctx, v: Any, path: Path) -> VSMatch:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"name", "uri", "headers", "queryParams", "method", "authority", "port",
                          "ignoreUriCase", "withoutHeaders", "scheme", "sourceLabels",
                          "sourceNamespace", "gateways", "statPrefix"})

    def opt(key: str) -> IstioStringMatch | None:
        return _istio_string(ctx, m[key], path + (key,)) if m.get(key) is not None else None
    ignore = m.get("ignoreUriCase", False)
    if not isinstance(ignore, bool):
        ctx.fail(path + ("ignoreUriCase",), f"must be true or false, got {describe(ignore)}")
    labels = get_map(ctx, m, path + ("sourceLabels",))
    for k, val in labels.items():
        if not isinstance(val, str):
            ctx.fail(path + ("sourceLabels", str(k)), f"must be a string, got {describe(val)}; quote it in YAML")
    gateways = _str_items(ctx, m, path + ("gateways",))
    source_ns = get_str(ctx, m, path + ("sourceNamespace",))
    # Istio drops these blocks when it builds a waypoint's routes; say so rather than surprise.
    if "sourceLabels" in m:
        ctx.warn(path + ("sourceLabels",), "a waypoint never matches sourceLabels (Istio: \"source "
                 "label matching is not supported in ambient mode\"); this match block is skipped")
    if source_ns is not None:
        ctx.warn(path + ("sourceNamespace",), "not enforced: a waypoint does not match on the "
                 "client's namespace; this match block is skipped")
    if gateways and MESH_GATEWAY not in gateways:
        ctx.warn(path + ("gateways",), f"does not include \"{MESH_GATEWAY}\", so a waypoint skips "
                 "this match block")
    if m.get("scheme") is not None:
        ctx.warn(path + ("scheme",), "not enforced: the waypoint does not match on the scheme")
    if m.get("statPrefix") is not None:
        ctx.warn(path + ("statPrefix",), "not enforced: no per-route statistics")
    return VSMatch(name=get_str(ctx, m, path + ("name",)), uri=opt("uri"),
                   headers=_string_map(ctx, m, path + ("headers",), True),
                   query_params=_string_map(ctx, m, path + ("queryParams",), False),
                   method=opt("method"), authority=opt("authority"),
                   port=_int(ctx, m, path + ("port",), 1, 65535), ignore_uri_case=ignore,
                   without_headers=_string_map(ctx, m, path + ("withoutHeaders",), True),
                   scheme=opt("scheme"), source_labels=FrozenMap({str(k): x for k, x in labels.items()}),
                   source_namespace=source_ns, gateways=gateways)


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
        _known(ctx, d, dp, {"fixedDelay", "percentage", "percent"},
               {"exponentialDelay": "Istio rejects it too (\"not supported yet\"); use fixedDelay"})
        fixed = _duration(ctx, d, dp + ("fixedDelay",), gep=False)
        if fixed is None:
            ctx.fail(dp + ("fixedDelay",), "is required", "missing_field")
        p = _percentage(ctx, d, dp + ("percentage",))
        old = _int(ctx, d, dp + ("percent",), 0, 100)
        if old is not None:  # deprecated integer percent: used only without percentage, as Istio
            ctx.warn(dp + ("percent",), "is deprecated; use percentage.value" + (
                " (ignored: percentage is set)" if p is not None else ""), "deprecated")
            p = float(old) if p is None else p
        if p is None:  # Istio: "If left unspecified, no request will be delayed."
            ctx.warn(dp + ("percentage",), "is unset: as in Istio, no request will be delayed "
                     "(set percentage.value, e.g. 100)", "unset_percentage")
        delay = VSFaultDelay(fixed_delay=fixed, percentage=0.0 if p is None else p)
    if m.get("abort") is not None:
        ap = path + ("abort",)
        a = _mapping(ctx, m["abort"], ap)
        _known(ctx, a, ap, {"httpStatus", "grpcStatus", "percentage"},
               {"http2Error": "Istio rejects it too; use httpStatus or grpcStatus"})
        status = _int(ctx, a, ap + ("httpStatus",), 200, 600)  # Istio's bound: 600 passes
        grpc = get_str(ctx, a, ap + ("grpcStatus",))
        if status is not None and grpc is not None:
            ctx.fail(ap + ("grpcStatus",), "httpStatus and grpcStatus are mutually exclusive")
        if grpc is not None and grpc not in _GRPC_CODES:
            ctx.fail(ap + ("grpcStatus",), f"must be a gRPC status code name ({', '.join(_GRPC_CODES)}), "
                     f"got {describe(grpc)}")
        if status is None and grpc is None:
            ctx.fail(ap + ("httpStatus",), "is required (or grpcStatus)", "missing_field")
        p = _percentage(ctx, a, ap + ("percentage",))
        if p is None:  # Istio: "If not specified, no request will be aborted."
            ctx.warn(ap + ("percentage",), "is unset: as in Istio, no request will be aborted "
                     "(set percentage.value, e.g. 100)", "unset_percentage")
        abort = VSFaultAbort(http_status=200 if status is None else status, grpc_status=grpc,
                             percentage=0.0 if p is None else p)
    return VSFault(delay=delay, abort=abort)


_GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
               "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
               "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
               "UNAUTHENTICATED")


def _vs_retries(ctx: Ctx, v: Any, path: Path) -> VSRetries:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities",
                          "retryIgnorePreviousHosts", "backoff"})
    retry_on = get_str(ctx, m, path + ("retryOn",))
    tokens = _retry_on(ctx, retry_on, path + ("retryOn",)) if retry_on else ()
    attempts = _int(ctx, m, path + ("attempts",), 0) or 0
    if attempts == 0 and "attempts" in m:
        # Istio: "attempts: 0" disables retries, and other retry fields with it are an error.
        for k in ("perTryTimeout", "retryOn", "retryRemoteLocalities"):
            if m.get(k) is not None:
                ctx.fail(path + (k,), "must not be set with attempts: 0 (retries disabled)")
    if m.get("retryRemoteLocalities") is not None:
        ctx.warn(path + ("retryRemoteLocalities",), "not enforced: the mesh has no localities")
    return VSRetries(attempts=attempts,
                     per_try_timeout=_duration(ctx, m, path + ("perTryTimeout",), gep=False),
                     retry_on=tokens,
                     retry_remote_localities=_bool(ctx, m, path + ("retryRemoteLocalities",)),
                     retry_ignore_previous_hosts=_bool(ctx, m, path + ("retryIgnorePreviousHosts",)),
                     backoff=_duration(ctx, m, path + ("backoff",), gep=False))


def _retry_on(ctx: Ctx, value: str, path: Path) -> tuple[str, ...]:
    """Envoy retry conditions and HTTP status codes, comma-separated (Istio's parseRetryOn)."""
    out = []
    for raw in value.split(","):
        tok = raw.strip()
        if not tok:
            continue
        if tok != raw:
            ctx.warn(path, f"{json.dumps(raw)} has surrounding spaces, which Istio rejects; "
                     "write the conditions without spaces")
        if tok.isdigit():
            try:
                HTTPStatus(int(tok))
            except ValueError:
                ctx.fail(path, f"{json.dumps(tok)} is not a known HTTP status code")
        elif tok not in ENVOY_RETRY_ON:
            ctx.fail(path, f"{json.dumps(tok)} is not a retry condition; use HTTP status codes or "
                     + ", ".join(ENVOY_RETRY_ON))
        out.append(tok)
    return tuple(out)


def _vs_mirror(ctx: Ctx, v: Any, path: Path) -> VSMirror:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"destination", "percentage"})
    if m.get("destination") is None:
        ctx.fail(path + ("destination",), "is required", "missing_field")
    return VSMirror(destination=_vs_destination(ctx, m["destination"], path + ("destination",)),
                    percentage=_percentage(ctx, m, path + ("percentage",)))


def _old_mirror_percent(ctx: Ctx, m: Mapping[Any, Any], path: Path, mpct: float | None) -> float | None:
    """Deprecated integer `mirrorPercent` (JSON name `mirror_percent`): per hundred, 0 disables,
    used only when mirrorPercentage is absent (Istio's MirrorPercent)."""
    for k in ("mirrorPercent", "mirror_percent"):
        old = _int(ctx, m, path + (k,), 0, 100)
        if old is None:
            continue
        ctx.warn(path + (k,), "is deprecated; use mirrorPercentage.value" + (
            " (ignored: mirrorPercentage is set)" if mpct is not None else ""), "deprecated")
        if "mirror" not in m:
            ctx.fail(path + (k,), "needs mirror", "missing_field")
        if mpct is None:
            mpct = float(old)
    return mpct


_REDIRECT_CODES = (301, 302, 303, 307, 308)
"""What Istio translates (route.go applyRedirect); other 3xx pass its validation but drop the route."""
_DERIVE_PORT = ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")


def _vs_redirect(ctx: Ctx, v: Any, path: Path) -> VSRedirect:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"uri", "authority", "port", "derivePort", "scheme", "redirectCode"})
    if "port" in m and "derivePort" in m:
        ctx.fail(path + ("derivePort",), "port and derivePort are mutually exclusive")
    uri, authority = get_str(ctx, m, path + ("uri",)), get_str(ctx, m, path + ("authority",))
    scheme = get_str(ctx, m, path + ("scheme",))
    port = _int(ctx, m, path + ("port",), 1, 65535)
    derive = get_str(ctx, m, path + ("derivePort",))
    if derive is not None and derive not in _DERIVE_PORT:
        ctx.fail(path + ("derivePort",), f"must be one of {', '.join(_DERIVE_PORT)}, got {describe(derive)}")
    if scheme is not None and scheme not in ("http", "https"):
        ctx.fail(path + ("scheme",), f'must be "http" or "https", got {describe(scheme)}')
    code = _int(ctx, m, path + ("redirectCode",), 0)
    if code not in (None, 0, *_REDIRECT_CODES):
        ctx.fail(path + ("redirectCode",), f"must be one of {', '.join(map(str, _REDIRECT_CODES))} (Istio drops "
                 f"a route with any other code), got {code}")
    if not (uri or authority or scheme or port is not None or derive is not None):
        ctx.fail(path, "must specify uri, authority, scheme, or port (as Istio requires)")
    return VSRedirect(uri=uri or None, authority=authority or None, port=port,
                      derive_port=derive or "FROM_PROTOCOL_DEFAULT", scheme=scheme, redirect_code=code or 301)


_MAX_DIRECT_BODY = 1 << 20


def _vs_direct_response(ctx: Ctx, v: Any, path: Path) -> VSDirectResponse:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"status", "body"})
    status = _int(ctx, m, path + ("status",), 200, 600)   # Istio's ValidateHTTPStatus, as for aborts
    if status is None:
        ctx.fail(path + ("status",), "is required", "missing_field")
    body = b""
    if m.get("body") is not None:
        bp = path + ("body",)
        b = _mapping(ctx, m["body"], bp, "a mapping with string or bytes")
        _known(ctx, b, bp, {"string", "bytes"})
        if ("string" in b) == ("bytes" in b):
            ctx.fail(bp, "must have exactly one of string or bytes")
        if "string" in b:
            body = (get_str(ctx, b, bp + ("string",)) or "").encode()
        else:
            raw = get_str(ctx, b, bp + ("bytes",)) or ""
            try:
                body = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                ctx.fail(bp + ("bytes",), "must be base64")
        if len(body) > _MAX_DIRECT_BODY:
            ctx.fail(bp, f"must be less than 1MB (Istio's limit), got {len(body)} bytes")
    return VSDirectResponse(status=status, body=body)


def _vs_http(ctx: Ctx, v: Any, path: Path) -> VSHTTPRoute:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"name", "match", "route", "timeout", "retries", "fault", "mirror",
                          "mirrorPercentage", "headers", "rewrite", "mirrors", "mirrorPercent",
                          "mirror_percent", "corsPolicy", "redirect", "directResponse"},
           {"delegate": "not implemented by the waypoint (ignoring it would send traffic elsewhere)"})
    mp, rp = path + ("match",), path + ("route",)
    matches = ctx.collect(lambda: _each(ctx, _items(ctx, m, mp), mp, lambda x, ip: _vs_match(ctx, x, ip)))
    redirect = ctx.collect(lambda: _vs_redirect(ctx, m["redirect"], path + ("redirect",))
                           if m.get("redirect") is not None else None)
    direct = ctx.collect(lambda: _vs_direct_response(ctx, m["directResponse"], path + ("directResponse",))
                         if m.get("directResponse") is not None else None)
    local = m.get("redirect") is not None or m.get("directResponse") is not None
    for a, b in (("route", "redirect"), ("route", "directResponse"), ("redirect", "directResponse"),
                 ("fault", "redirect"), ("fault", "directResponse"), ("rewrite", "redirect")):
        if m.get(a) and m.get(b) is not None:    # Istio's validateHTTPRoute
            ctx.error(path + (a,), f"must not be set together with {b}", "bad_value")
    if not local and not m.get("route"):
        ctx.error(rp, "is required (or redirect, or directResponse)", "missing_field")
    raw_routes = ctx.collect(lambda: _items(ctx, m, rp)) or []
    routes = ctx.collect(lambda: _each(ctx, raw_routes, rp,
                                       lambda x, ip: _vs_route_dest(ctx, x, ip, len(raw_routes) == 1)))
    timeout = ctx.collect(lambda: _duration(ctx, m, path + ("timeout",), gep=False))
    retries = ctx.collect(lambda: _vs_retries(ctx, m["retries"], path + ("retries",)) if m.get("retries") else None)
    fault = ctx.collect(lambda: _vs_fault(ctx, m["fault"], path + ("fault",)) if m.get("fault") else None)
    mirror = ctx.collect(lambda: _vs_destination(ctx, m["mirror"], path + ("mirror",)) if m.get("mirror") else None)
    mpct = ctx.collect(lambda: _percentage(ctx, m, path + ("mirrorPercentage",)))
    mpct = ctx.collect(lambda: _old_mirror_percent(ctx, m, path, mpct))
    mip = path + ("mirrors",)
    mirrors = ctx.collect(lambda: _each(ctx, _items(ctx, m, mip), mip, lambda x, ip: _vs_mirror(ctx, x, ip)))
    if m.get("corsPolicy") is not None:
        ctx.collect(lambda: _shape(ctx, m["corsPolicy"], path + ("corsPolicy",), _CORS))
        ctx.warn(path + ("corsPolicy",), "not enforced: the waypoint adds no CORS headers")
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
                       mirror_percentage=mpct, headers=headers, rewrite=rw, mirrors=mirrors or (),
                       redirect=redirect, direct_response=direct)


_STRING_MATCH = {"exact": None, "prefix": None, "regex": None}
_L4_MATCH = {"destinationSubnets": None, "port": None, "sourceLabels": None, "gateways": None,
             "sourceNamespace": None}
_ROUTE_DEST = ({"destination": {"host": None, "subset": None, "port": {"number": None}}, "weight": None},)
_L4_ROUTES = {"tcp": ({"match": ({**_L4_MATCH, "sourceSubnet": None},), "route": _ROUTE_DEST},),
              "tls": ({"match": ({**_L4_MATCH, "sniHosts": None},), "route": _ROUTE_DEST},)}
_CORS = {"allowOrigin": None, "allowOrigins": (_STRING_MATCH,), "allowMethods": None,
         "allowHeaders": None, "exposeHeaders": None, "maxAge": None, "allowCredentials": None,
         "unmatchedPreflights": None}


def _str_items(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> tuple[str, ...]:
    out = []
    for i, s in enumerate(_items(ctx, m, path)):
        if not isinstance(s, str) or not s:
            ctx.fail(path + (i,), f"must be a non-empty string, got {describe(s)}")
        out.append(s)
    return tuple(out)


def virtual_service(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> VirtualService:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"hosts", "gateways", "http", "exportTo", "tcp", "tls"})
    for k in ("tcp", "tls"):
        if spec.get(k):
            ctx.collect(lambda: _shape(ctx, spec[k], ("spec", k), _L4_ROUTES[k]))
            ctx.warn(("spec", k), f"not enforced yet: {k} routes are accepted but the mesh routes "
                     "only http; such traffic goes to the service it was sent to")
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


def _connection_pool(ctx: Ctx, v: Any, cp: Path) -> ConnectionPool:
    c = _mapping(ctx, v, cp)
    _known(ctx, c, cp, {"tcp", "http"})
    tcp = http = None
    if c.get("tcp") is not None:
        tp = cp + ("tcp",)
        t = _mapping(ctx, c["tcp"], tp)
        _known(ctx, t, tp, {"maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration",
                            "idleTimeout"})
        keepalive = None
        if t.get("tcpKeepalive") is not None:
            kp = tp + ("tcpKeepalive",)
            k = _mapping(ctx, t["tcpKeepalive"], kp)
            _known(ctx, k, kp, {"probes", "time", "interval"})
            keepalive = TCPKeepalive(probes=_int(ctx, k, kp + ("probes",), 0),
                                     time=_duration(ctx, k, kp + ("time",), gep=False),
                                     interval=_duration(ctx, k, kp + ("interval",), gep=False))
        for f in ("tcpKeepalive", "maxConnectionDuration", "idleTimeout"):
            if t.get(f) is not None:
                ctx.warn(tp + (f,), "not enforced yet by the mesh")
        tcp = TCPSettings(max_connections=_int(ctx, t, tp + ("maxConnections",), 1),
                          connect_timeout=_duration(ctx, t, tp + ("connectTimeout",), gep=False),
                          tcp_keepalive=keepalive,
                          max_connection_duration=_duration(ctx, t, tp + ("maxConnectionDuration",), gep=False),
                          idle_timeout=_duration(ctx, t, tp + ("idleTimeout",), gep=False))
    if c.get("http") is not None:
        hp = cp + ("http",)
        h = _mapping(ctx, c["http"], hp)
        _known(ctx, h, hp, {"http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection",
                            "maxRetries", "idleTimeout", "h2UpgradePolicy", "useClientProtocol",
                            "maxConcurrentStreams"})
        up = get_str(ctx, h, hp + ("h2UpgradePolicy",))
        policy = None
        if up is not None:
            try:
                policy = H2UpgradePolicy(up)
            except ValueError:
                ctx.fail(hp + ("h2UpgradePolicy",), "must be one of "
                         + ", ".join(x.value for x in H2UpgradePolicy) + f"; got {describe(up)}")
        for f in ("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"):
            if h.get(f) is not None:
                ctx.warn(hp + (f,), "not enforced yet by the waypoint")
        http = HTTPSettings(
            http1_max_pending_requests=_int(ctx, h, hp + ("http1MaxPendingRequests",), 1),
            http2_max_requests=_int(ctx, h, hp + ("http2MaxRequests",), 1),
            max_requests_per_connection=_int(ctx, h, hp + ("maxRequestsPerConnection",), 0),
            max_retries=_int(ctx, h, hp + ("maxRetries",), 0),
            idle_timeout=_duration(ctx, h, hp + ("idleTimeout",), gep=False),
            h2_upgrade_policy=policy, use_client_protocol=_bool(ctx, h, hp + ("useClientProtocol",)),
            max_concurrent_streams=_int(ctx, h, hp + ("maxConcurrentStreams",), 0))
    return ConnectionPool(tcp=tcp, http=http)


def _outlier_detection(ctx: Ctx, v: Any, op: Path) -> OutlierDetection:
    o = _mapping(ctx, v, op)
    _known(ctx, o, op, {"consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                        "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
                        "splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures",
                        "consecutiveErrors"})
    if _int(ctx, o, op + ("consecutiveErrors",), 0) is not None:
        # Istio validates it, warns, and never reads it.
        ctx.warn(op + ("consecutiveErrors",), "is deprecated and ignored (as Istio ignores it); use "
                 "consecutiveGatewayErrors or consecutive5xxErrors", "deprecated")
    split = _bool(ctx, o, op + ("splitExternalLocalOriginErrors",))
    local = _int(ctx, o, op + ("consecutiveLocalOriginFailures",), 0)
    if local is not None and not split:
        ctx.fail(op + ("consecutiveLocalOriginFailures",), "needs splitExternalLocalOriginErrors: true")
    for f in ("splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures"):
        if o.get(f) is not None:
            ctx.warn(op + (f,), "not enforced yet by the mesh")
    return OutlierDetection(
        consecutive_5xx_errors=_int(ctx, o, op + ("consecutive5xxErrors",), 0),
        consecutive_gateway_errors=_int(ctx, o, op + ("consecutiveGatewayErrors",), 0),
        interval=_duration(ctx, o, op + ("interval",), gep=False),
        base_ejection_time=_duration(ctx, o, op + ("baseEjectionTime",), gep=False),
        max_ejection_percent=_int(ctx, o, op + ("maxEjectionPercent",), 0, 100),
        min_health_percent=_int(ctx, o, op + ("minHealthPercent",), 0, 100),
        split_external_local_origin_errors=split, consecutive_local_origin_failures=local)


def _tls(ctx: Ctx, v: Any, path: Path) -> ClientTLS:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"mode", "clientCertificate", "privateKey", "caCertificates", "credentialName",
                          "subjectAltNames", "sni", "insecureSkipVerify", "caCrl"})
    s = get_str(ctx, m, path + ("mode",)) or "DISABLE"
    try:
        mode = TLSMode(s)
    except ValueError:
        ctx.fail(path + ("mode",), "must be one of " + ", ".join(x.value for x in TLSMode)
                 + f"; got {describe(s)}")
    if mode is not TLSMode.ISTIO_MUTUAL:
        # Between meshed workloads ambient always uses HBONE (mutual TLS): ISTIO_MUTUAL is what
        # happens anyway; the other modes would change what the proxy sends.
        ctx.warn(path + ("mode",), f"{s} is not enforced: meshed traffic always uses HBONE mutual TLS")
    return ClientTLS(mode=mode, sni=get_str(ctx, m, path + ("sni",)),
                     subject_alt_names=_str_items(ctx, m, path + ("subjectAltNames",)))


_LB_EXTRA = {"localityLbSetting": {"distribute": None, "failover": None, "failoverPriority": None,
                                   "enabled": None}}


def _consistent_hash(ctx: Ctx, v: Any, path: Path) -> ConsistentHash:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName",
                          "ringHash", "maglev", "minimumRingSize"})
    keys = [k for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
            if m.get(k) not in (None, False)]
    if len(keys) != 1:
        ctx.fail(path, "must set exactly one of httpHeaderName, httpCookie, useSourceIp or "
                 "httpQueryParameterName" + (f" (got {', '.join(keys)})" if keys else ""))
    header = None
    if m.get("httpHeaderName") is not None:
        header = get_str(ctx, m, path + ("httpHeaderName",)) or ""
        if not _HEADER_NAME.fullmatch(header):
            ctx.fail(path + ("httpHeaderName",), f"{json.dumps(header)} is not a valid HTTP header name")
        header = header.lower()
    cookie = None
    if m.get("httpCookie") is not None:
        cp = path + ("httpCookie",)
        c = _mapping(ctx, m["httpCookie"], cp)
        _known(ctx, c, cp, {"name", "path", "ttl", "attributes"})
        ttl = _duration(ctx, c, cp + ("ttl",), gep=False)
        if ttl:
            ctx.warn(cp + ("ttl",), "not enforced yet: the waypoint does not generate the cookie; "
                     "requests without it are spread like RANDOM")
        if c.get("attributes") is not None:
            ctx.collect(lambda: _shape(ctx, c["attributes"], cp + ("attributes",), ({"name": None,
                                                                                     "value": None},)))
        cookie = HTTPCookie(name=get_str(ctx, c, cp + ("name",), required=True) or "",
                            path=get_str(ctx, c, cp + ("path",)), ttl=ttl)
    if "ringHash" in m and "maglev" in m:
        ctx.fail(path, "ringHash and maglev are mutually exclusive")
    ring = None
    if m.get("ringHash") is not None:
        rp = path + ("ringHash",)
        r = _mapping(ctx, m["ringHash"], rp)
        _known(ctx, r, rp, {"minimumRingSize"})
        ring = _int(ctx, r, rp + ("minimumRingSize",), 1, 8_388_608)
    old_ring = _int(ctx, m, path + ("minimumRingSize",), 1, 8_388_608)
    if old_ring is not None:
        ctx.warn(path + ("minimumRingSize",), "is deprecated; use ringHash.minimumRingSize", "deprecated")
    table = None
    if m.get("maglev") is not None:
        mp = path + ("maglev",)
        g = _mapping(ctx, m["maglev"], mp)
        _known(ctx, g, mp, {"tableSize"})
        table = _int(ctx, g, mp + ("tableSize",), 1)
    src = _bool(ctx, m, path + ("useSourceIp",)) or False
    return ConsistentHash(http_header_name=header, http_cookie=cookie, use_source_ip=src,
                          http_query_parameter_name=get_str(ctx, m, path + ("httpQueryParameterName",)),
                          minimum_ring_size=ring if ring is not None else old_ring,
                          maglev_table_size=table)


def _warmup(ctx: Ctx, lbm: Mapping[Any, Any], lp: Path) -> Warmup | None:
    old = _duration(ctx, lbm, lp + ("warmupDurationSecs",), gep=False)
    if old is not None:
        ctx.warn(lp + ("warmupDurationSecs",), "is deprecated; use warmup.duration" + (
            " (ignored: warmup is set)" if lbm.get("warmup") is not None else ""), "deprecated")
    if lbm.get("warmup") is None:
        return Warmup(duration=old) if old else None
    wp = lp + ("warmup",)
    w = _mapping(ctx, lbm["warmup"], wp)
    _known(ctx, w, wp, {"duration", "minimumPercent", "aggression"})
    duration = _duration(ctx, w, wp + ("duration",), gep=False)
    if duration is None:
        ctx.fail(wp + ("duration",), "is required", "missing_field")
    aggression = _number(ctx, w, wp + ("aggression",), 1.0, 1e9)
    return Warmup(duration=duration, minimum_percent=_number(ctx, w, wp + ("minimumPercent",), 0.0, 100.0),
                  aggression=aggression)


def _load_balancer(ctx: Ctx, v: Any, lp: Path
                   ) -> tuple[LoadBalancer | None, ConsistentHash | None, Warmup | None]:
    lbm = _mapping(ctx, v, lp)
    _known(ctx, lbm, lp, {"simple", "consistentHash", "warmupDurationSecs", "warmup", *_LB_EXTRA})
    for k, schema in _LB_EXTRA.items():
        if lbm.get(k) is not None:
            ctx.collect(lambda: _shape(ctx, lbm[k], lp + (k,), schema))
            ctx.warn(lp + (k,), "not enforced: the mesh has no localities")
    chash = ctx.collect(lambda: _consistent_hash(ctx, lbm["consistentHash"], lp + ("consistentHash",))
                        if lbm.get("consistentHash") is not None else None)
    warm = ctx.collect(lambda: _warmup(ctx, lbm, lp))
    for k in ("consistentHash", "warmup", "warmupDurationSecs"):
        if lbm.get(k) is not None:
            ctx.warn(lp + (k,), "not enforced yet by the waypoint")
    s = get_str(ctx, lbm, lp + ("simple",))
    if s is not None and lbm.get("consistentHash") is not None:
        ctx.fail(lp + ("simple",), "simple and consistentHash are mutually exclusive")
    if s is None:
        return (None if any(k in lbm for k in ("consistentHash", "warmupDurationSecs", "warmup", *_LB_EXTRA))
                else LoadBalancer.UNSPECIFIED), chash, warm
    if s == "LEAST_CONN":  # deprecated alias, as Istio maps it
        ctx.warn(lp + ("simple",), "LEAST_CONN is deprecated; use LEAST_REQUEST", "deprecated")
        return LoadBalancer.LEAST_REQUEST, chash, warm
    try:
        return LoadBalancer(s), chash, warm
    except ValueError:
        ctx.fail(lp + ("simple",), "must be one of " + ", ".join(x.value for x in LoadBalancer)
                 + f"; got {describe(s)}")


_TUNNEL = {"protocol": None, "targetHost": None, "targetPort": None}
_PROXY_PROTOCOL = {"version": None}


def _traffic_policy(ctx: Ctx, v: Any, path: Path, *, port_level: bool = False) -> TrafficPolicy:
    m = _mapping(ctx, v, path)
    _known(ctx, m, path, {"connectionPool", "outlierDetection", "loadBalancer", "tls"}
           | ({"port"} if port_level else {"portLevelSettings", "tunnel", "proxyProtocol"}))
    if port_level:
        pm = _mapping(ctx, m.get("port") or {}, path + ("port",), "a mapping with number")
        _known(ctx, pm, path + ("port",), {"number"})
        _int(ctx, pm, path + ("port", "number"), 1, 65535)
    for k, schema in (("tunnel", _TUNNEL), ("proxyProtocol", _PROXY_PROTOCOL)):
        if m.get(k) is not None:
            ctx.collect(lambda: _shape(ctx, m[k], path + (k,), schema))
            ctx.warn(path + (k,), "not enforced by the mesh")
    pls = path + ("portLevelSettings",)
    if not port_level and m.get("portLevelSettings"):
        ctx.collect(lambda: _each(ctx, _items(ctx, m, pls), pls,
                                  lambda x, ip: _traffic_policy(ctx, x, ip, port_level=True)))
        ctx.warn(pls, "not enforced yet: port-level settings are checked but the mesh applies "
                 "only the top-level ones")

    def opt(key: str, fn: Any) -> Any:
        return ctx.collect(lambda: fn(ctx, m[key], path + (key,)) if m.get(key) is not None else None)
    pool = opt("connectionPool", _connection_pool)
    outlier = opt("outlierDetection", _outlier_detection)
    lb, chash, warm = opt("loadBalancer", _load_balancer) or (None, None, None)
    tls = opt("tls", _tls)
    return TrafficPolicy(connection_pool=pool, outlier_detection=outlier, load_balancer=lb, tls=tls,
                         consistent_hash=chash, warmup=warm)


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
    _known(ctx, spec, ("spec",), {"host", "subsets", "trafficPolicy", "exportTo", "workloadSelector"})
    if spec.get("workloadSelector") is not None:
        ctx.collect(lambda: _shape(ctx, spec["workloadSelector"], ("spec", "workloadSelector"),
                                   {"matchLabels": None}))
        ctx.warn(("spec", "workloadSelector"), "not enforced: sidecar-only, unused in ambient mode")
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

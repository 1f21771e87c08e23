"""YAML -> Telemetry (telemetry.istio.io) and the mesh config (ConfigMap istio-system/istio, key `mesh`), for tracing.

Unknown fields are errors; fields Istio defines that the mesh does not act on (metrics and
access-log sections, other provider types, most of the mesh config) are accepted with a
`not_enforced` warning, so a config written for Istio loads and says what is ignored.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from ..model import FrozenMap, ObjectMeta, PolicyObject, freeze
from ..model.policy import ROOT_NAMESPACE, TargetRef
from ..model.telemetry import (MESH_CONFIG_NAME, CustomTag, MeshConfig, OtelHttp, Telemetry, Tracing,
                               TracingMode, TracingProvider)
from .route_fields import parse_go_duration
from .source import Ctx, Path, describe, get_list, get_map, get_port, get_str

__all__ = ["telemetry", "config_map"]

GATEWAY_GROUP = "gateway.networking.k8s.io"

# Istio's MeshConfig fields (istio.io/api mesh/v1alpha1), accepted and not acted on.
_MESH_NOT_ENFORCED = frozenset({
    "proxyListenPort", "proxyInboundListenPort", "proxyHttpPort", "connectTimeout",
    "tcpKeepalive", "ingressClass", "ingressService", "ingressControllerMode", "ingressSelector",
    "accessLogFile", "accessLogFormat", "accessLogEncoding", "enableEnvoyAccessLogService",
    "disableEnvoyListenerLog", "outboundTrafficPolicy", "inboundTrafficPolicy", "configSources",
    "enableAutoMtls", "trustDomain", "trustDomainAliases", "caCertificates", "defaultServiceExportTo",
    "defaultVirtualServiceExportTo", "defaultDestinationRuleExportTo", "rootNamespace", "localityLbSetting",
    "dnsRefreshRate", "h2UpgradePolicy", "inboundClusterStatName", "outboundClusterStatName", "certificates",
    "serviceSettings", "enablePrometheusMerge", "verifyCertificateAtClient", "ca", "discoverySelectors",
    "pathNormalization", "defaultHttpRetryPolicy", "meshMTLS", "tlsDefaults", "gatewayTopology",
    "serviceScopeConfigs", "thriftConfig", "mixerCheckServer", "mixerReportServer", "sdsUdsPath",
})
_MESH_FIELDS = _MESH_NOT_ENFORCED | {"enableTracing", "extensionProviders", "defaultProviders", "defaultConfig",
                                     "protocolDetectionTimeout"}
_PROVIDER_TYPES = frozenset({
    "envoyExtAuthzHttp", "envoyExtAuthzGrpc", "zipkin", "lightstep", "datadog", "stackdriver", "opencensus",
    "skywalking", "opentelemetry", "prometheus", "envoyFileAccessLog", "envoyHttpAls", "envoyTcpAls",
    "envoyOtelAls", "sds"})
_TRACING_CONFIG = frozenset({"sampling", "zipkin", "lightstep", "datadog", "stackdriver", "openCensusAgent",
                             "customTags", "maxPathTagLength", "tlsSettings", "enableIstioTags"})


def _known(ctx: Ctx, m: Mapping[Any, Any], path: Path, allowed: set[str] | frozenset[str]) -> None:
    for k in m:
        if k not in allowed:
            ctx.error(path + (str(k),), f"unknown field; expected one of {', '.join(sorted(allowed))}",
                      "unknown_field")


def _percentage(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> float | None:
    v = m.get(path[-1])
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
        ctx.fail(path, f"must be a percentage from 0 to 100, got {describe(v)}")
    return float(v)


def _bool(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> bool | None:
    v = m.get(path[-1])
    if v is None:
        return None
    if not isinstance(v, bool):
        ctx.fail(path, f"must be true or false, got {describe(v)}")
    return v


# --- Telemetry ----------------------------------------------------------------------------

def _custom_tag(ctx: Ctx, v: Any, path: Path) -> CustomTag:
    if not isinstance(v, Mapping):
        ctx.fail(path, f"must be a mapping with one of literal, environment, header; got {describe(v)}")
    _known(ctx, v, path, {"literal", "environment", "header"})
    if len(v) != 1:
        ctx.fail(path, "needs exactly one of literal, environment, header")
    (kind, body), = v.items()
    p = path + (kind,)
    body = get_map(ctx, v, p, required=True)
    if kind == "literal":
        _known(ctx, body, p, {"value"})
        return CustomTag(literal=get_str(ctx, body, p + ("value",), required=True))
    _known(ctx, body, p, {"name", "defaultValue"})
    name = get_str(ctx, body, p + ("name",), required=True)
    default = get_str(ctx, body, p + ("defaultValue",)) or ""
    if kind == "header":
        return CustomTag(header=(name or "").lower(), default=default)
    return CustomTag(environment=name, default=default)


def _tracing(ctx: Ctx, t: Any, path: Path) -> Tracing:
    if not isinstance(t, Mapping):
        ctx.fail(path, f"must be a mapping, got {describe(t)}")
    _known(ctx, t, path, {"match", "providers", "randomSamplingPercentage", "disableSpanReporting",
                          "customTags", "useRequestIdForTraceSampling", "enableIstioTags"})
    match = get_map(ctx, t, path + ("match",))
    _known(ctx, match, path + ("match",), {"mode"})
    mode_s = get_str(ctx, match, path + ("match", "mode")) or "CLIENT_AND_SERVER"
    try:
        mode = TracingMode(mode_s)
    except ValueError:
        ctx.fail(path + ("match", "mode"), f"must be CLIENT_AND_SERVER, CLIENT or SERVER; got {describe(mode_s)}")
    if mode is TracingMode.CLIENT:
        ctx.warn(path + ("match", "mode"), "a waypoint reports one SERVER span per request: a CLIENT-only "
                 "entry does not apply to it")
    providers: tuple[str, ...] | None = None
    if "providers" in t:
        names = []
        for i, p in enumerate(get_list(ctx, t, path + ("providers",))):
            pp = path + ("providers", i)
            if not isinstance(p, Mapping):
                ctx.fail(pp, f"must be a mapping with a name, got {describe(p)}")
            _known(ctx, p, pp, {"name"})
            names.append(get_str(ctx, p, pp + ("name",), required=True) or "")
        if len(names) > 1:
            ctx.fail(path + ("providers",), "at most one tracing provider per entry (as Istio)", "unsupported")
        providers = tuple(names) or None   # `providers: []`: the default provider, as Istio
    tags = []
    for k, v in get_map(ctx, t, path + ("customTags",)).items():
        tags.append((str(k), _custom_tag(ctx, v, path + ("customTags", str(k)))))
    if "useRequestIdForTraceSampling" in t:
        ctx.warn(path + ("useRequestIdForTraceSampling",), "sampling draws at random; the request id is not used")
    if _bool(ctx, t, path + ("enableIstioTags",)) is False:
        ctx.warn(path + ("enableIstioTags",), "the waypoint's spans always carry the istio.* attributes")
    return Tracing(mode=mode, providers=providers,
                   random_sampling_percentage=_percentage(ctx, t, path + ("randomSamplingPercentage",)),
                   disable_span_reporting=_bool(ctx, t, path + ("disableSpanReporting",)),
                   custom_tags=tuple(sorted(tags)))


def _target_refs(ctx: Ctx, spec: Mapping[Any, Any]) -> tuple[TargetRef, ...]:
    refs = []
    raw = ([spec["targetRef"]] if "targetRef" in spec else []) + get_list(ctx, spec, ("spec", "targetRefs"))
    for i, ref in enumerate(raw):
        rp = ("spec", "targetRefs", i)
        if not isinstance(ref, Mapping):
            ctx.fail(rp, f"must be a mapping, got {describe(ref)}")
        _known(ctx, ref, rp, {"group", "kind", "name", "namespace"})
        r = TargetRef(group=get_str(ctx, ref, rp + ("group",)) or "",
                      kind=get_str(ctx, ref, rp + ("kind",), required=True) or "",
                      name=get_str(ctx, ref, rp + ("name",), required=True) or "")
        if not (r.kind == "Gateway" and r.group == GATEWAY_GROUP):
            ctx.warn(rp, f"only a waypoint (kind Gateway, group {GATEWAY_GROUP}) is traced by its Telemetry; "
                     f"a {r.kind or 'target'} is not")
        refs.append(r)
    return tuple(refs)


def telemetry(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> Telemetry:
    spec = get_map(ctx, obj, ("spec",))
    _known(ctx, spec, ("spec",), {"selector", "targetRef", "targetRefs", "tracing", "metrics", "accessLogging"})
    for section in ("metrics", "accessLogging"):
        if section in spec:
            ctx.warn(("spec", section), "the waypoint's Istio metrics and access log are always on; "
                     f"{section} is not enforced")
    selector = None
    if "selector" in spec:
        sel = get_map(ctx, spec, ("spec", "selector"))
        _known(ctx, sel, ("spec", "selector"), {"matchLabels"})
        selector = FrozenMap({str(k): str(v) for k, v in get_map(ctx, sel, ("spec", "selector", "matchLabels")).items()})
        ctx.warn(("spec", "selector"), "a selector picks sidecar workloads, which this mesh does not have; "
                 "select a waypoint with targetRefs (kind Gateway)")
    refs = _target_refs(ctx, spec)
    if selector is not None and refs:
        ctx.fail(("spec", "selector"), "selector and targetRefs are mutually exclusive")
    tracing = tuple(_tracing(ctx, t, ("spec", "tracing", i))
                    for i, t in enumerate(get_list(ctx, spec, ("spec", "tracing"))))
    return Telemetry(meta=meta, selector=selector, target_refs=refs, tracing=tracing)


# --- the mesh config ----------------------------------------------------------------------

def _otel_provider(ctx: Ctx, name: str, o: Any, path: Path) -> TracingProvider:
    if not isinstance(o, Mapping):
        ctx.fail(path, f"must be a mapping, got {describe(o)}")
    _known(ctx, o, path, {"service", "port", "maxTagLength", "http", "grpc", "resourceDetectors",
                          "dynatraceSampler"})
    service = get_str(ctx, o, path + ("service",), required=True) or ""
    port = get_port(ctx, o.get("port"), path + ("port",)) if "port" in o else ctx.fail(
        path + ("port",), "is required (the collector's OTLP/HTTP port, usually 4318)", "missing_field")
    for f in ("resourceDetectors", "dynatraceSampler"):
        if f in o:
            ctx.warn(path + (f,), f"{f} is not enforced")
    if "http" not in o:
        ctx.fail(path + ("http",), "is required: this mesh exports OTLP over HTTP only (without `http` Istio "
                 "would use gRPC); add http: {path: /v1/traces}", "unsupported")
    hp = path + ("http",)
    h = get_map(ctx, o, hp)
    _known(ctx, h, hp, {"path", "timeout", "headers"})
    http_path = get_str(ctx, h, hp + ("path",)) or "/v1/traces"
    if not http_path.startswith("/"):
        http_path = "/" + http_path
    timeout = 10.0
    if (ts := get_str(ctx, h, hp + ("timeout",))) is not None:
        d = parse_go_duration(ts)
        if d is None or d <= 0:
            ctx.fail(hp + ("timeout",), f"{json.dumps(ts)} is not a valid duration; write e.g. \"10s\"")
        timeout = d
    headers = []
    for i, hv in enumerate(get_list(ctx, h, hp + ("headers",))):
        p = hp + ("headers", i)
        if not isinstance(hv, Mapping):
            ctx.fail(p, f"must be a mapping with name and value, got {describe(hv)}")
        _known(ctx, hv, p, {"name", "value", "envName"})
        if "envName" in hv:
            ctx.fail(p + ("envName",), "header values from the environment are not supported; give value",
                     "unsupported")
        headers.append((get_str(ctx, hv, p + ("name",), required=True) or "", get_str(ctx, hv, p + ("value",)) or ""))
    if "grpc" in o:
        ctx.warn(path + ("grpc",), "spans go over OTLP/HTTP (`http` is set); grpc is not used")
    max_tag = o.get("maxTagLength", 256)
    if isinstance(max_tag, bool) or not isinstance(max_tag, int) or max_tag < 1:
        ctx.fail(path + ("maxTagLength",), f"must be a positive integer, got {describe(max_tag)}")
    return TracingProvider(name=name, service=service, port=port, max_tag_length=max_tag,
                           http=OtelHttp(path=http_path, timeout=timeout, headers=tuple(headers)))


def _mesh(ctx: Ctx, m: Mapping[Any, Any], path: Path, meta: ObjectMeta) -> MeshConfig:
    _known(ctx, m, path, _MESH_FIELDS)
    for k in sorted(set(m) & _MESH_NOT_ENFORCED):
        ctx.warn(path + (k,), f"meshConfig.{k} is not enforced by this mesh")
    enable = _bool(ctx, m, path + ("enableTracing",))
    providers: list[TracingProvider] = []
    seen: set[str] = set()
    for i, e in enumerate(get_list(ctx, m, path + ("extensionProviders",))):
        p = path + ("extensionProviders", i)
        if not isinstance(e, Mapping):
            ctx.fail(p, f"must be a mapping with a name and one provider, got {describe(e)}")
        _known(ctx, e, p, _PROVIDER_TYPES | {"name"})
        name = get_str(ctx, e, p + ("name",), required=True) or ""
        if name in seen:
            ctx.fail(p + ("name",), f"provider {json.dumps(name)} is defined twice", "duplicate")
        seen.add(name)
        kinds = [k for k in e if k != "name"]
        if len(kinds) != 1:
            ctx.fail(p, f"needs exactly one provider type ({', '.join(sorted(_PROVIDER_TYPES))})")
        if kinds[0] == "opentelemetry":
            providers.append(_otel_provider(ctx, name, e["opentelemetry"], p + ("opentelemetry",)))
        else:
            ctx.warn(p + (kinds[0],), f"{kinds[0]} providers are not enforced (tracing exports to "
                     "opentelemetry providers only)")
    dp = get_map(ctx, m, path + ("defaultProviders",))
    _known(ctx, dp, path + ("defaultProviders",), {"tracing", "metrics", "accessLogging"})
    for k in ("metrics", "accessLogging"):
        if k in dp:
            ctx.warn(path + ("defaultProviders", k), f"defaultProviders.{k} is not enforced")
    default_tracing = []
    for i, n in enumerate(get_list(ctx, dp, path + ("defaultProviders", "tracing"))):
        if not isinstance(n, str) or not n:
            ctx.fail(path + ("defaultProviders", "tracing", i), f"must be a provider name, got {describe(n)}")
        default_tracing.append(n)
    sampling = 1.0
    dc = get_map(ctx, m, path + ("defaultConfig",))
    for k in sorted(k for k in dc if k != "tracing"):
        ctx.warn(path + ("defaultConfig", str(k)), f"defaultConfig.{k} (proxy config) is not enforced")
    tr = get_map(ctx, dc, path + ("defaultConfig", "tracing"))
    _known(ctx, tr, path + ("defaultConfig", "tracing"), _TRACING_CONFIG)
    for k in sorted(k for k in tr if k != "sampling"):
        ctx.warn(path + ("defaultConfig", "tracing", str(k)), f"defaultConfig.tracing.{k} is not enforced")
    s = _percentage(ctx, tr, path + ("defaultConfig", "tracing", "sampling"))
    if s is not None:
        sampling = s
    return MeshConfig(meta=meta, enable_tracing=True if enable is None else enable,
                      tracing_providers=tuple(providers), default_tracing_providers=tuple(default_tracing),
                      default_sampling_percentage=sampling,
                      protocol_detection_timeout=_detection_timeout(ctx, m, path + ("protocolDetectionTimeout",)))


def _detection_timeout(ctx: Ctx, m: Mapping[Any, Any], path: Path) -> float:
    """Istio's rule: 0s (no timeout, the default) or at least 1ms."""
    s = get_str(ctx, m, path)
    if s is None:
        return 0.0
    d = parse_go_duration(s)
    if d is None or (0 < d < 0.001):
        ctx.fail(path, f"{json.dumps(s)} is not a valid protocol detection timeout; write 0s (wait for the client, "
                       "the default) or a duration of at least 1ms, e.g. \"5s\"")
    return d or 0.0


def config_map(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> MeshConfig | PolicyObject:
    """ConfigMap `istio-system/istio` is the mesh config (its `mesh` key, YAML); any other
    ConfigMap is stored and not used."""
    _known(ctx, obj, (), {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"})
    data = get_map(ctx, obj, ("data",))
    for k, v in data.items():
        if not isinstance(v, str):
            ctx.fail(("data", str(k)), f"values must be strings, got {describe(v)}")
    if not (meta.namespace == ROOT_NAMESPACE and meta.name == MESH_CONFIG_NAME):
        ctx.warn((), f"only ConfigMap {ROOT_NAMESPACE}/{MESH_CONFIG_NAME} (the mesh config) is read; "
                 "this one is stored and not used")
        return PolicyObject(meta=meta, policy_kind="ConfigMap", api_version="v1", spec=freeze(dict(data)))
    for k in data:
        if k != "mesh":
            ctx.warn(("data", str(k)), f"only the `mesh` key is read; {k} is not used")
    text = data.get("mesh") or ""
    try:
        mesh = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1} of the value)" if mark is not None else ""
        ctx.fail(("data", "mesh"), f"is not YAML{where}: {getattr(e, 'problem', None) or e}")
    if mesh is None:
        mesh = {}
    if not isinstance(mesh, Mapping):
        ctx.fail(("data", "mesh"), f"must be a YAML mapping (Istio's MeshConfig), got {describe(mesh)}")
    return _mesh(ctx, mesh, ("data", "mesh"), meta)


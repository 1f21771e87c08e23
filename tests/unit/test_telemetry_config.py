"""Telemetry and the mesh config at the config edge, their wire form, and which tracing a waypoint resolves (tables)."""
from __future__ import annotations

import ipaddress
import textwrap

import pytest

from mesh.config import ConfigErrors, parse_text
from mesh.distribution.protocol import FrameDecoder, Snapshot, decode, encode
from mesh.model import Endpoint, ServiceInfo, ServicePort
from mesh.model.telemetry import CustomTag, MeshConfig, OtelHttp, Telemetry, TracingProvider
from waypoint.trace_policy import TracePolicy, collector_address, resolve

OTEL = "{name: otel, opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4318, http: {}}}"


def cm(mesh: str, name: str = "istio", ns: str = "istio-system") -> str:
    body = textwrap.indent(textwrap.dedent(mesh).strip(), "    ")
    return f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {ns}}}\ndata:\n  mesh: |\n{body}\n"


def tel(spec: str, name: str = "t", ns: str = "istio-system") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"


def load(text: str):
    [loaded] = parse_text(text, "t.yaml")
    return loaded.resource, [f"{w.field}: {w.message}" for w in loaded.warnings]


def test_mesh_config_with_an_opentelemetry_provider():
    r, warnings = load(cm(f"""
        enableTracing: true
        extensionProviders:
        - name: otel
          opentelemetry:
            service: otel-collector.observability.svc.cluster.local
            port: 4318
            maxTagLength: 99
            http:
              path: v1/traces
              timeout: 0.5s
              headers: [{{name: x-tenant, value: shop}}]
        defaultProviders: {{tracing: [otel]}}
        defaultConfig: {{tracing: {{sampling: 10}}}}
        """))
    assert r == MeshConfig(meta=r.meta, tracing_providers=(TracingProvider(
        name="otel", service="otel-collector.observability.svc.cluster.local", port=4318, max_tag_length=99,
        http=OtelHttp(path="/v1/traces", timeout=0.5, headers=(("x-tenant", "shop"),))),),
        default_tracing_providers=("otel",), default_sampling_percentage=10.0)
    assert warnings == [] and str(r.key) == "ConfigMap istio-system/istio"


@pytest.mark.parametrize("mesh, warning", [
    ("accessLogFile: /dev/stdout", "data.mesh.accessLogFile: meshConfig.accessLogFile is not enforced by this mesh"),
    ("extensionProviders: [{name: z, zipkin: {service: z, port: 9411}}]",
     "data.mesh.extensionProviders[0].zipkin: zipkin providers are not enforced (tracing exports to opentelemetry "
     "providers only)"),
    ("defaultConfig: {holdApplicationUntilProxyStarts: true}",
     "data.mesh.defaultConfig.holdApplicationUntilProxyStarts: defaultConfig.holdApplicationUntilProxyStarts "
     "(proxy config) is not enforced"),
    ("defaultConfig: {tracing: {zipkin: {address: z:9411}}}",
     "data.mesh.defaultConfig.tracing.zipkin: defaultConfig.tracing.zipkin is not enforced"),
    ("defaultProviders: {metrics: [prometheus]}",
     "data.mesh.defaultProviders.metrics: defaultProviders.metrics is not enforced"),
])
def test_mesh_config_fields_istio_has_and_the_mesh_ignores_are_warned(mesh, warning):
    _, warnings = load(cm(mesh))
    assert warnings == [warning]


@pytest.mark.parametrize("mesh, field, reason, message", [
    ("extensionProvider: []", "data.mesh.extensionProvider", "unknown_field", "unknown field"),
    ("extensionProviders: [{name: o, opentelemetry: {service: c, port: 4318}}]",
     "data.mesh.extensionProviders[0].opentelemetry.http", "unsupported", "OTLP over HTTP only"),
    ("extensionProviders: [{name: o, opentelemetry: {service: c, http: {}}}]",
     "data.mesh.extensionProviders[0].opentelemetry.port", "missing_field", "4318"),
    ("extensionProviders: [{name: o, opentelemetry: {port: 4318, http: {}}}]",
     "data.mesh.extensionProviders[0].opentelemetry.service", "missing_field", "required"),
    ("extensionProviders: [{name: o, opentelemetry: {service: c, port: 99999, http: {}}}]",
     "data.mesh.extensionProviders[0].opentelemetry.port", "bad_value", "65535"),
    ("extensionProviders: [{name: o, opentelemetry: {service: c, port: 1, http: {timeout: soon}}}]",
     "data.mesh.extensionProviders[0].opentelemetry.http.timeout", "bad_value", "not a valid duration"),
    ("extensionProviders: [{name: o, opentelemetry: {service: c, port: 1, http: {}, sampler: x}}]",
     "data.mesh.extensionProviders[0].opentelemetry.sampler", "unknown_field", "unknown field"),
    (f"extensionProviders: [{OTEL}, {OTEL}]", "data.mesh.extensionProviders[1].name", "duplicate", "twice"),
    ("extensionProviders: [{name: o}]", "data.mesh.extensionProviders[0]", "bad_value", "exactly one provider"),
    ("defaultConfig: {tracing: {sampling: 101}}", "data.mesh.defaultConfig.tracing.sampling", "bad_value",
     "0 to 100"),
    ("enableTracing: yes please", "data.mesh.enableTracing", "bad_value", "true or false"),
    ("[1, 2]", "data.mesh", "bad_value", "MeshConfig"),
    ("a: [", "data.mesh", "bad_value", "not YAML"),
])
def test_mesh_config_errors_name_the_field(mesh, field, reason, message):
    with pytest.raises(ConfigErrors) as e:
        load(cm(mesh))
    [err] = e.value.errors
    assert (err.field, err.reason) == (field, reason) and message in str(err), str(err)


@pytest.mark.parametrize("value, want", [("5s", 5.0), ("250ms", 0.25), ("0s", 0.0), ("1ms", 0.001)])
def test_mesh_config_protocol_detection_timeout(value, want):
    r, warnings = load(cm(f"protocolDetectionTimeout: {value}"))
    assert r.protocol_detection_timeout == want and warnings == []


def test_mesh_config_protocol_detection_timeout_defaults_to_waiting_for_the_client():
    r, _ = load(cm("enableTracing: false"))
    assert r.protocol_detection_timeout == 0.0


@pytest.mark.parametrize("value", ["0.5ms", "soon", "-1s"])
def test_mesh_config_protocol_detection_timeout_below_1ms_or_not_a_duration_is_refused(value):
    with pytest.raises(ConfigErrors) as e:
        load(cm(f"protocolDetectionTimeout: {value}"))
    [err] = e.value.errors
    assert err.field == "data.mesh.protocolDetectionTimeout" and "at least 1ms" in str(err), str(err)


def test_another_config_map_is_stored_and_not_used():
    r, warnings = load(cm("anything: 1", name="app-settings", ns="default"))
    assert r.key.kind == "ConfigMap" and not isinstance(r, MeshConfig)
    assert warnings == ["None: only ConfigMap istio-system/istio (the mesh config) is read; this one is stored "
                        "and not used"]


def test_telemetry_converts_every_tracing_field():
    r, warnings = load(tel("""
        targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
        tracing:
        - match: {mode: SERVER}
          providers: [{name: otel}]
          randomSamplingPercentage: 12.5
          disableSpanReporting: false
          customTags:
            team: {literal: {value: shop}}
            region: {environment: {name: REGION, defaultValue: eu}}
            user: {header: {name: X-User, defaultValue: anon}}
        """, ns="shop"))
    assert isinstance(r, Telemetry) and warnings == []
    [t] = r.tracing
    assert (t.providers, t.random_sampling_percentage, t.disable_span_reporting) == (("otel",), 12.5, False)
    assert t.custom_tags == (("region", CustomTag(environment="REGION", default="eu")),
                             ("team", CustomTag(literal="shop")), ("user", CustomTag(header="x-user", default="anon")))
    assert r.target_refs[0].name == "wp"


@pytest.mark.parametrize("spec, warning", [
    ("metrics: [{providers: [{name: prometheus}]}]", "spec.metrics: the waypoint's Istio metrics and access log "
     "are always on; metrics is not enforced"),
    ("selector: {matchLabels: {app: x}}", "spec.selector: a selector picks sidecar workloads, which this mesh "
     "does not have; select a waypoint with targetRefs (kind Gateway)"),
    ("targetRefs: [{kind: Service, name: reviews}]", "spec.targetRefs[0]: only a waypoint (kind Gateway, group "
     "gateway.networking.k8s.io) is traced by its Telemetry; a Service is not"),
    ("tracing: [{match: {mode: CLIENT}}]", "spec.tracing[0].match.mode: a waypoint reports one SERVER span per "
     "request: a CLIENT-only entry does not apply to it"),
    ("tracing: [{useRequestIdForTraceSampling: true}]", "spec.tracing[0].useRequestIdForTraceSampling: sampling "
     "draws at random; the request id is not used"),
])
def test_telemetry_fields_not_enforced_are_warned(spec, warning):
    _, warnings = load(tel(spec))
    assert warnings == [warning]


@pytest.mark.parametrize("spec, field, reason", [
    ("tracing: [{randomSamplingPercentage: 150}]", "spec.tracing[0].randomSamplingPercentage", "bad_value"),
    ("tracing: [{randomSamplingPercentage: \"50\"}]", "spec.tracing[0].randomSamplingPercentage", "bad_value"),
    ("tracing: [{providers: [{name: a}, {name: b}]}]", "spec.tracing[0].providers", "unsupported"),
    ("tracing: [{provider: {name: a}}]", "spec.tracing[0].provider", "unknown_field"),
    ("tracing: [{match: {mode: BOTH}}]", "spec.tracing[0].match.mode", "bad_value"),
    ("tracing: [{customTags: {a: {literal: {value: x}, header: {name: y}}}}]", "spec.tracing[0].customTags.a",
     "bad_value"),
    ("tracing: [{customTags: {a: {header: {}}}}]", "spec.tracing[0].customTags.a.header.name", "missing_field"),
    ("tracing: [{disableSpanReporting: \"yes\"}]", "spec.tracing[0].disableSpanReporting", "bad_value"),
    ("tracng: []", "spec.tracng", "unknown_field"),
    ("selector: {matchLabels: {a: b}}\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}]",
     "spec.selector", "bad_value"),
])
def test_telemetry_errors_name_the_field(spec, field, reason):
    with pytest.raises(ConfigErrors) as e:
        load(tel(spec))
    assert [(x.field, x.reason) for x in e.value.errors] == [(field, reason)], str(e.value)


def test_telemetry_and_mesh_config_travel_the_control_plane_wire():
    objs = [load(cm(f"extensionProviders: [{OTEL}]\ndefaultProviders: {{tracing: [otel]}}"))[0],
            load(tel("tracing: [{providers: [{name: otel}], randomSamplingPercentage: 5,"
                     " customTags: {a: {literal: {value: b}}}}]"))[0]]
    [frame] = FrameDecoder().feed(encode(Snapshot(version=3, resources=tuple(objs))))
    assert decode(frame).resources == tuple(objs)


# --- resolution -------------------------------------------------------------------------------

def provider(name="otel"):
    return TracingProvider(name=name, service="otel-collector.observability", port=4318)


def mesh(**kw):
    return load(cm("{}"))[0].__class__(meta=load(cm("{}"))[0].meta, **kw)


def T(ns, name="t", *, providers=None, pct=None, disable=None, gateway=None, mode="CLIENT_AND_SERVER", tags=""):
    e = {"match": {"mode": mode}}
    if providers is not None:
        e["providers"] = [{"name": p} for p in providers]
    if pct is not None:
        e["randomSamplingPercentage"] = pct
    if disable is not None:
        e["disableSpanReporting"] = disable
    spec = f"tracing: [{e}]".replace("'", '"').replace("True", "true").replace("False", "false")
    if tags:
        spec = spec[:-2] + f", \"customTags\": {tags}}}]"
    if gateway:
        spec += f"\ntargetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: {gateway}}}]"
    return load(tel(spec, name=name, ns=ns))[0]


MC = mesh(tracing_providers=(provider(), provider("other")))


@pytest.mark.parametrize("telemetries, mc, expected", [
    ([], None, None),                                                          # off by default
    ([T("istio-system", providers=["otel"])], None, None),                     # no mesh config: nowhere to send
    ([], MC, None),                                                            # providers, but none chosen
    ([], mesh(tracing_providers=(provider(),), default_tracing_providers=("otel",)),
     TracePolicy(provider=provider(), percentage=1.0)),                        # defaultProviders, Istio's 1 %
    ([T("istio-system", providers=["otel"])], MC, TracePolicy(provider=provider(), percentage=1.0)),
    ([T("istio-system", providers=["otel"], pct=100)],
     mesh(tracing_providers=(provider(),), enable_tracing=False), None),       # enableTracing: false
    ([T("istio-system", providers=["nope"])], MC, None),                       # an unknown provider name
    ([T("istio-system", providers=[], pct=5)],
     mesh(tracing_providers=(provider(),), default_tracing_providers=("otel",)),
     TracePolicy(provider=provider(), percentage=5.0)),                        # `providers: []`: the default
    # Namespace overrides mesh; the waypoint's own (targetRefs) overrides both; others do not apply.
    ([T("istio-system", providers=["otel"], pct=10), T("shop", pct=50), T("other-ns", pct=70)], MC,
     TracePolicy(provider=provider(), percentage=50.0)),
    ([T("istio-system", providers=["otel"], pct=10), T("shop", "ns", pct=50),
      T("shop", "mine", pct=100, gateway="wp"), T("shop", "theirs", pct=0, gateway="other-wp")], MC,
     TracePolicy(provider=provider(), percentage=100.0)),
    ([T("istio-system", providers=["otel"]), T("shop", providers=["other"], pct=3)], MC,
     TracePolicy(provider=provider("other"), percentage=3.0)),
    ([T("istio-system", providers=["otel"], pct=10), T("shop", pct=90, mode="CLIENT")], MC,
     TracePolicy(provider=provider(), percentage=10.0)),                       # CLIENT-only: not the waypoint's
    ([T("istio-system", providers=["otel"], pct=100), T("shop", disable=True)], MC,
     TracePolicy(provider=provider(), percentage=100.0, report=False)),
    ([T("istio-system", providers=["otel"], tags='{"a": {"literal": {"value": "1"}}}'),
      T("shop", tags='{"b": {"literal": {"value": "2"}}}')], MC,
     TracePolicy(provider=provider(), percentage=1.0,
                 custom_tags=(("a", CustomTag(literal="1")), ("b", CustomTag(literal="2"))))),
])
def test_resolve(telemetries, mc, expected):
    assert resolve(telemetries, mc, namespace="shop", name="wp") == expected


def _svc(ports, endpoints):
    return ServiceInfo(name="otel-collector", namespace="observability", vip=ipaddress.IPv4Address("10.96.0.9"),
                       ports=tuple(ports), endpoints=tuple(
                           Endpoint(workload_uid=f"observability/{n}", ip=ipaddress.IPv4Address(ip))
                           for n, ip in endpoints))


@pytest.mark.parametrize("service, port, services, expected", [
    ("127.0.0.5", 4318, [], ("127.0.0.5", 4318)),
    ("otel-collector.observability.svc.cluster.local", 4318,
     [_svc([ServicePort(port=4318, target_port=14318)], [("b", "10.244.0.9"), ("a", "10.244.1.3")])],
     ("10.244.1.3", 14318)),                           # target port; the first endpoint by name
    ("otel-collector.observability", 4318, [_svc([ServicePort(port=4318, target_port="otlp")], [("a", "10.244.0.2")])],
     ("10.244.0.2", 4318)),                            # a named target port: the service port
    ("otel-collector.observability", 4318, [_svc([], [])], None),  # no endpoint yet
    ("otel-collector", 4318, [_svc([], [("a", "10.244.0.2")])], None),  # needs name.namespace
    ("missing.observability", 4318, [_svc([], [("a", "10.244.0.2")])], None),
])
def test_collector_address(service, port, services, expected):
    p = TracingProvider(name="otel", service=service, port=port)
    assert collector_address(p, services) == expected

"""The one converter: a Kubernetes-style dict and the equivalent YAML give the same model object;
errors from a dict name the object and field without a file; a batch fails all or nothing."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from mesh.config import ConfigErrors, Origin, convert, convert_batch, load_text, parse_text
from mesh.model import Namespace, ObjectMeta, Node, PolicyObject, Pod, ResourceKey, Service, ServiceAccount
from mesh.model.policy import AuthorizationPolicy, PeerAuthentication
from mesh.model.route import DestinationRule, HTTPRoute, VirtualService
from mesh.model.telemetry import MeshConfig, Telemetry

SRC = "deploy/app.yaml"

# One object of every kind the mesh reads, with enough fields to exercise its converter.
KINDS = [
    (Namespace, """
        apiVersion: v1
        kind: Namespace
        metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}, annotations: {a: b}}
        """),
    (Node, """
        apiVersion: v1
        kind: Node
        metadata: {name: node-1}
        spec: {podCIDR: 10.244.1.0/24}
        """),
    (Pod, """
        apiVersion: v1
        kind: Pod
        metadata: {name: web-0, namespace: demo, labels: {app: web}}
        spec:
          nodeName: node-1
          serviceAccountName: web
          containers:
          - {name: server, command: [python3, -m, http.server], args: ["8080"],
             env: [{name: A, value: "1"}]}
          - {name: other, workingDir: /srv}
        status: {podIP: 10.244.1.7}
        """),
    (Service, """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: demo}
        spec:
          clusterIP: 10.96.0.10
          selector: {app: web}
          ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9090, targetPort: admin}]
        """),
    (ServiceAccount, """
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: web, namespace: demo}
        """),
    (AuthorizationPolicy, """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-web, namespace: demo}
        spec:
          selector: {matchLabels: {app: web}}
          action: ALLOW
          rules:
          - from: [{source: {principals: [cluster.local/ns/demo/sa/client], ipBlocks: [10.0.0.0/8]}}]
            to: [{operation: {ports: ["8080"], methods: [GET]}}]
            when: [{key: source.namespace, values: [demo]}]
        """),
    (PeerAuthentication, """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: strict, namespace: demo}
        spec:
          selector: {matchLabels: {app: web}}
          mtls: {mode: STRICT}
          portLevelMtls: {"8080": {mode: PERMISSIVE}}
        """),
    (HTTPRoute, """
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web, namespace: demo}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-A, value: b}]}]
            backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
            timeouts: {request: 10s}
        """),
    (VirtualService, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: demo}
        spec:
          hosts: [web]
          http:
          - match: [{uri: {prefix: /v2}, headers: {x-user: {exact: bob}}}]
            route: [{destination: {host: web, subset: v2}}]
            retries: {attempts: 3, perTryTimeout: 2s}
          - route: [{destination: {host: web, subset: v1}}]
        """),
    (DestinationRule, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: demo}
        spec:
          host: web
          trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}, loadBalancer: {simple: RANDOM}}
          subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
        """),
    (PolicyObject, """
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: demo}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
        """),
    (Telemetry, """
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: tracing, namespace: demo}
        spec:
          targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
          tracing: [{providers: [{name: otel}], randomSamplingPercentage: 50}]
        """),
    (MeshConfig, """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: istio, namespace: istio-system}
        data:
          mesh: |
            extensionProviders:
            - name: otel
              opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4318, http: {}}
        """),
]


@pytest.mark.parametrize("cls, text", KINDS, ids=[t.split("kind: ")[1].split()[0] for _, t in KINDS])
def test_dict_and_yaml_give_the_same_model_object(cls, text) -> None:
    text = textwrap.dedent(text).lstrip("\n")
    [from_yaml] = load_text(text, SRC)
    from_dict = convert(yaml.safe_load(text))
    assert type(from_dict) is cls
    if isinstance(from_yaml, Pod):
        # The only difference, by design: the YAML loader (local runtime) sets the source dir.
        assert from_dict.source_dir == "" and from_yaml.source_dir != ""
        from_yaml = dataclasses.replace(from_yaml, source_dir="")
    assert from_dict == from_yaml


def test_every_kind_is_in_the_table() -> None:
    from mesh.config import SUPPORTED_KINDS
    assert {t.split("kind: ")[1].split()[0] for _, t in KINDS} == set(SUPPORTED_KINDS)


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "demo"},
       "spec": {"containers": [{"name": "main", "command": {"a": "b"}}]}}


def test_dict_errors_name_object_and_field_without_a_file() -> None:
    with pytest.raises(ConfigErrors) as info:
        convert(POD)
    [e] = info.value.errors
    assert (e.key, e.field, e.line, e.document, e.source) == (
        ResourceKey("Pod", "demo", "web"), "spec.containers[0].command", None, None, "")
    assert str(e) == "Pod demo/web: spec.containers[0].command: must be a list of strings, got a mapping"


def test_dict_errors_without_a_name_name_the_kind() -> None:
    with pytest.raises(ConfigErrors) as info:
        convert({"apiVersion": "v1", "kind": "Service", "metadata": {}, "spec": {"ports": [{"port": 80}]}})
    [e] = info.value.errors
    assert str(e) == "Service (unnamed): metadata.name: is required"


def test_an_origin_given_with_a_dict_is_named() -> None:
    with pytest.raises(ConfigErrors) as info:
        convert(POD, origin=Origin("watch:pods", line=None))
    assert str(info.value).startswith("watch:pods: Pod demo/web: spec.containers[0].command: ")


def test_batch_collects_every_error_and_converts_nothing() -> None:
    good = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}
    bad_svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"},
               "spec": {"ports": [{"port": 0}]}}
    with pytest.raises(ConfigErrors) as info:
        convert_batch([good, POD, (bad_svc, Origin("api"))])
    assert [(str(e.key), e.field, e.source) for e in info.value.errors] == [
        ("Pod demo/web", "spec.containers[0].command", ""),
        ("Service demo/web", "spec.ports[0].port", "api")]
    got = convert_batch([good, (good, Origin("api", line=3))])
    assert [x.resource for x in got] == [Namespace(meta=ObjectMeta(name="demo"))] * 2
    assert [x.origin for x in got] == [Origin(""), Origin("api", line=3)]


def test_not_a_mapping_is_a_clear_error() -> None:
    with pytest.raises(ConfigErrors) as info:
        convert(["not", "an", "object"])  # type: ignore[arg-type]
    assert "must be a mapping (a Kubernetes object" in str(info.value)


def test_yaml_loader_keeps_file_line_context() -> None:
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo}\nspec:\n  containers:\n" \
           "  - name: main\n    command: {a: b}\n"
    with pytest.raises(ConfigErrors) as info:
        parse_text(text, SRC)
    assert str(info.value) == ("deploy/app.yaml:7 (document 1): Pod demo/web: spec.containers[0].command: "
                               "must be a list of strings, got a mapping")

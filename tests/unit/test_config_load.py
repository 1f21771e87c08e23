"""Loading Kubernetes-style YAML into the model: valid objects field by field, bad ones by reason."""
from __future__ import annotations

import io
import ipaddress
import os
import pickle
import textwrap

import pytest

from mesh.model.telemetry import Telemetry
from mesh.config import (REASONS, ConfigError, ConfigErrors, Origin, load_paths, load_text,
                         parse_paths, parse_text)
from mesh.model import (POLICY_KINDS, Container, FrozenMap, Namespace, Node, ObjectMeta,
                        PolicyObject, Pod, ResourceKey, Service, ServiceAccount, ServicePort)
from mesh.model.policy import AuthorizationPolicy, PeerAuthentication
from mesh.model.route import DestinationRule, HTTPRoute, VirtualService

SRC = "deploy/app.yaml"
SRC_DIR = os.path.abspath("deploy")


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def errors_of(text: str, source: str = SRC) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load_text(y(text), source)
    return list(info.value.errors)


# --- valid input --------------------------------------------------------------------------

VALID = [
    pytest.param("""
        apiVersion: v1
        kind: Namespace
        metadata:
          name: demo
          namespace: ignored-for-cluster-scoped
          labels: {istio.io/dataplane-mode: ambient}
          annotations: {note: "hello: world"}
        """, Namespace(meta=ObjectMeta(
            name="demo", labels=FrozenMap({"istio.io/dataplane-mode": "ambient"}),
            annotations=FrozenMap({"note": "hello: world"}))), id="namespace"),
    pytest.param("""
        apiVersion: v1
        kind: Node
        metadata: {name: node-1.local}
        spec: {podCIDR: 10.244.1.0/24}
        """, Node(meta=ObjectMeta(name="node-1.local"),
                  pod_cidr=ipaddress.IPv4Network("10.244.1.0/24")), id="node-cidr"),
    pytest.param("""
        apiVersion: v1
        kind: Node
        metadata: {name: node-2}
        """, Node(meta=ObjectMeta(name="node-2"), pod_cidr=None), id="node-no-cidr"),
    pytest.param("""
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: reviews}
        """, ServiceAccount(meta=ObjectMeta(name="reviews", namespace="default")), id="sa-default-ns"),
    pytest.param("""
        apiVersion: v1
        kind: Pod
        metadata:
          name: web-0
          namespace: demo
          labels: {app: web, version: "1", istio.io/dataplane-mode: none}
          annotations: {owner: "team a"}
        spec:
          nodeName: node-1
          serviceAccountName: web
          containers:
          - name: server
            command: [python3, -m, http.server]
            args: ["8080", --bind, 0.0.0.0]
            env:
            - {name: GREETING, value: hi}
            - {name: EMPTY}
            - {name: GREETING, value: later-wins}
            workingDir: /srv
          - name: sidecar-free
            command: [sleep, infinity]
        status: {podIP: 10.244.1.7}
        """, Pod(
            meta=ObjectMeta(name="web-0", namespace="demo",
                            labels=FrozenMap({"app": "web", "version": "1",
                                              "istio.io/dataplane-mode": "none"}),
                            annotations=FrozenMap({"owner": "team a"})),
            node_name="node-1", service_account="web",
            containers=(Container(name="server", command=("python3", "-m", "http.server"),
                                  args=("8080", "--bind", "0.0.0.0"),
                                  env=FrozenMap({"GREETING": "later-wins", "EMPTY": ""}),
                                  working_dir="/srv"),
                        Container(name="sidecar-free", command=("sleep", "infinity"))),
            pod_ip=ipaddress.IPv4Address("10.244.1.7"), source_dir=SRC_DIR), id="pod-full"),
    pytest.param("""
        apiVersion: v1
        kind: Pod
        metadata: {name: sec}
        spec:
          securityContext: {runAsUser: 1000, runAsGroup: 3000}
          containers:
          - name: inherits
            command: [id]
          - name: overrides
            command: [id]
            securityContext: {runAsUser: 0, runAsGroup: 2000}
        """, Pod(
            meta=ObjectMeta(name="sec", namespace="default"), run_as_user=1000, run_as_group=3000,
            containers=(Container(name="inherits", command=("id",)),
                        Container(name="overrides", command=("id",), run_as_user=0,
                                  run_as_group=2000)),
            source_dir=SRC_DIR), id="pod-security-context"),
    pytest.param("""
        apiVersion: v1
        kind: Pod
        metadata: {name: minimal}
        spec:
          containers: [{name: c}]
        """, Pod(meta=ObjectMeta(name="minimal", namespace="default"), node_name=None,
                 service_account="default", containers=(Container(name="c"),), pod_ip=None,
                 source_dir=SRC_DIR), id="pod-defaults"),
    pytest.param("""
        apiVersion: v1
        kind: Pod
        metadata: {name: old-style}
        spec:
          serviceAccount: legacy
          nodeName: ""
          containers: [{name: c, args: []}]
        status: {podIP: ""}
        """, Pod(meta=ObjectMeta(name="old-style", namespace="default"),
                 service_account="legacy", containers=(Container(name="c"),),
                 source_dir=SRC_DIR), id="pod-deprecated-serviceAccount"),
    pytest.param("""
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: demo, labels: {tier: front}}
        spec:
          type: ClusterIP
          clusterIP: 10.96.0.10
          selector: {app: web}
          ports:
          - {name: http, port: 80, targetPort: 8080, protocol: TCP}
          - {name: admin, port: 9090, targetPort: admin-port, appProtocol: kubernetes.io/h2c}
        """, Service(meta=ObjectMeta(name="web", namespace="demo",
                                     labels=FrozenMap({"tier": "front"})),
                     selector=FrozenMap({"app": "web"}),
                     ports=(ServicePort(port=80, target_port=8080, name="http"),
                            ServicePort(port=9090, target_port="admin-port", name="admin",
                                        app_protocol="kubernetes.io/h2c")),
                     cluster_ip=ipaddress.IPv4Address("10.96.0.10")), id="service-full"),
    pytest.param("""
        apiVersion: v1
        kind: Service
        metadata: {name: db}
        spec:
          type: LoadBalancer
          ports: [{port: 5432}]
        """, Service(meta=ObjectMeta(name="db", namespace="default"),
                     ports=(ServicePort(port=5432, target_port=5432),), cluster_ip=None),
         id="service-defaults-loadbalancer-as-clusterip"),
    pytest.param("""
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: demo}
        spec:
          gatewayClassName: istio-waypoint
          listeners:
          - {name: mesh, port: 15008, protocol: HBONE}
          expires: 2024-01-01
        """, PolicyObject(meta=ObjectMeta(name="waypoint", namespace="demo"),
                          policy_kind="Gateway", api_version="gateway.networking.k8s.io/v1",
                          spec=FrozenMap({"gatewayClassName": "istio-waypoint", "listeners": (
                              FrozenMap({"name": "mesh", "port": 15008, "protocol": "HBONE"}),),
                              "expires": "2024-01-01"})), id="policy-spec-frozen-dates-kept"),
]


@pytest.mark.parametrize("text, expected", VALID)
def test_valid_object_converts_field_by_field(text: str, expected: object) -> None:
    [got] = load_text(y(text), SRC)
    assert type(got) is type(expected)
    for field in type(expected).__dataclass_fields__:
        assert getattr(got, field) == getattr(expected, field), field
    assert got == expected


# The smallest valid spec of each policy kind (most accept none at all).
_MINIMAL_SPEC = {"VirtualService": "spec: {hosts: [web]}\n", "DestinationRule": "spec: {host: web}\n"}
_TYPED = {"AuthorizationPolicy": AuthorizationPolicy, "PeerAuthentication": PeerAuthentication,
          "HTTPRoute": HTTPRoute, "VirtualService": VirtualService,
          "DestinationRule": DestinationRule, "Telemetry": Telemetry}


def test_every_policy_kind_but_gateway_is_typed() -> None:
    # A ConfigMap is typed (MeshConfig) only as istio-system/istio; any other is stored as it is.
    assert set(POLICY_KINDS) - set(_TYPED) == {"Gateway", "ConfigMap"}


@pytest.mark.parametrize("kind, api", [(k, a) for k, apis in POLICY_KINDS.items() for a in apis])
def test_every_policy_kind_and_api_version(kind: str, api: str) -> None:
    [got] = load_text(f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: p1, namespace: ns1}}\n"
                      + _MINIMAL_SPEC.get(kind, ""), SRC)
    if kind in _TYPED:  # typed (mesh.model.policy, mesh.model.route)
        assert type(got) is _TYPED[kind]
    else:
        assert isinstance(got, PolicyObject)
        assert (got.policy_kind, got.api_version, got.spec) == (kind, api, FrozenMap())
    assert got.key == ResourceKey(kind, "ns1", "p1")


def test_multi_document_list_and_empty_documents() -> None:
    text = y("""
        ---
        # only a comment
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: a}
        ---
        ---
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: ServiceAccount, metadata: {name: s1, namespace: a}}
        - {apiVersion: v1, kind: Node, metadata: {name: n1}}
        ---
        """)
    loaded = parse_text(text, SRC)
    assert [str(x.resource.key) for x in loaded] == ["Namespace a", "ServiceAccount a/s1", "Node n1"]
    assert loaded[0].origin == Origin(SRC, 2, None, 4)
    assert loaded[2].origin == Origin(SRC, 4, 2, 13)
    assert str(loaded[2].origin) == "deploy/app.yaml:13 (document 4, item 2)"
    assert load_text("", SRC) == [] and load_text("---\n---\n", SRC) == []


def test_pod_source_dir_is_base_dir_or_file_dir_or_cwd_for_stdin(tmp_path) -> None:
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n"
    assert load_text(pod, "x/y/pods.yaml")[0].source_dir == os.path.abspath("x/y")
    assert load_text(pod, "x/pods.yaml", base_dir=str(tmp_path))[0].source_dir == str(tmp_path)
    assert load_text(pod, "<stdin>")[0].source_dir == os.getcwd()


# --- bad input ----------------------------------------------------------------------------

POD = """
    apiVersion: v1
    kind: Pod
    metadata: {name: web, namespace: demo}
    spec:
      containers:
      - name: main
"""

# (yaml, reason, object as printed (or None), field, fragment of the message, line)
BAD = [
    pytest.param("a: [1, 2\n", "yaml_syntax", None, None, "invalid YAML", 2, id="yaml-unclosed-flow"),
    pytest.param("apiVersion: v1\nkind: Pod\n\tmetadata: {}\n", "yaml_syntax", None, None,
                 "invalid YAML", 3, id="yaml-tab"),
    pytest.param("- 1\n- 2\n", "bad_value", None, None, "must be a mapping", 1, id="doc-is-list"),
    pytest.param("just a string\n", "bad_value", None, None, "must be a mapping", 1, id="doc-is-scalar"),
    pytest.param("kind: Namespace\nmetadata: {name: a}\n", "missing_field", "Namespace a",
                 "apiVersion", "is required", 1, id="missing-apiVersion"),
    pytest.param("apiVersion: v1\nmetadata: {name: a}\n", "missing_field", None, "kind",
                 "is required", 1, id="missing-kind"),
    pytest.param("apiVersion: v1\nkind: Pod\nspec: {}\n", "missing_field", "Pod (unnamed)",
                 "metadata", "is required", 1, id="missing-metadata"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\nspec: {containers: [{name: c}]}\n",
                 "missing_field",
                 "Pod (unnamed)", "metadata.name", "is required", 3, id="missing-name"),
    pytest.param("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: demo}\n",
                 "unknown_kind", "Deployment demo/d", "kind", "supported kinds: Namespace, Node",
                 2, id="unknown-kind"),
    pytest.param("apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\n"
                 "metadata: {name: p, namespace: demo}\n", "bad_api_version",
                 "AuthorizationPolicy demo/p", "apiVersion",
                 "use security.istio.io/v1 or security.istio.io/v1beta1", 1, id="policy-api-version"),
    pytest.param("apiVersion: v2\nkind: Node\nmetadata: {name: n}\n", "bad_api_version", "Node n",
                 "apiVersion", "use v1", 1, id="core-api-version"),
    pytest.param("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                 "metadata: {name: vs, namespace: demo}\nspec: [1]\n", "bad_value",
                 "VirtualService demo/vs", "spec", "must be a mapping", 4, id="policy-spec-not-map"),
    pytest.param("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels:\n    enabled: yes\n",
                 "bad_value", "Namespace a", "metadata.labels.enabled",
                 "values must be strings, got the boolean true; quote it", 6, id="label-bool"),
    pytest.param("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: {version: 2}\n",
                 "bad_value", "Namespace a", "metadata.labels.version", "got the number 2", 5,
                 id="label-int"),
    pytest.param("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: {'bad key!': x}\n",
                 "bad_value", "Namespace a", "metadata.labels", "is not valid", 5, id="label-key"),
    pytest.param("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  annotations: {n: 1}\n",
                 "bad_value", "Namespace a", "metadata.annotations.n", "must be strings", 5,
                 id="annotation-int"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {name: Web_1}\nspec: {containers: [{name: c}]}\n",
                 "bad_value", "Pod default/Web_1", "metadata.name", 'e.g. "web-1"', 3, id="bad-name"),
    pytest.param("apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n", "bad_value",
                 "Namespace a.b", "metadata.name", "RFC 1123 label", 3, id="namespace-name-dot"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: 1web}\nspec: {ports: [{port: 80}]}\n",
                 "bad_value", "Service default/1web", "metadata.name", "RFC 1035", 3,
                 id="service-name-digit"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Demo}\n"
                 "spec: {containers: [{name: c}]}\n", "bad_value", "Pod Demo/p",
                 "metadata.namespace", "RFC 1123 label", 3, id="bad-namespace"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: 0\n",
                 "bad_value", "Service default/s", "spec.ports[0].port", "between 1 and 65535", 6,
                 id="port-zero"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: '80'\n",
                 "bad_value", "Service default/s", "spec.ports[0].port", "got the string", 6,
                 id="port-string"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - name: a\n",
                 "missing_field", "Service default/s", "spec.ports[0].port", "is required", 6,
                 id="port-missing"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {selector: {a: b}}\n",
                 "missing_field", "Service default/s", "spec.ports", "must not be empty", 4,
                 id="no-ports"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n"
                 "  - {port: 80, targetPort: 70000}\n", "bad_value", "Service default/s",
                 "spec.ports[0].targetPort", "between 1 and 65535", 6, id="targetport-range"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n"
                 "  - {port: 80, targetPort: '8080'}\n", "bad_value", "Service default/s",
                 "spec.ports[0].targetPort", "write the number unquoted", 6, id="targetport-quoted"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n"
                 "  - {port: 80, targetPort: Not_A_Name}\n", "bad_value", "Service default/s",
                 "spec.ports[0].targetPort", "not a valid port name", 6, id="targetport-name"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  ports:\n"
                 "  - port: 53\n    protocol: UDP\n", "unsupported", "Service default/dns",
                 "spec.ports[0].protocol", "only TCP is supported", 7, id="udp"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n"
                 "  - {port: 80, protocol: SCTP}\n", "unsupported", "Service default/s",
                 "spec.ports[0].protocol", "only TCP is supported", 6, id="sctp"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n"
                 "  - {name: a, port: 80}\n  - {port: 81}\n", "missing_field", "Service default/s",
                 "spec.ports[1].name", "more than one port", 7, id="port-name-needed"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n"
                 "  - {name: a, port: 80}\n  - {name: a, port: 81}\n", "duplicate",
                 "Service default/s", "spec.ports[1].name", "duplicate port name", 7,
                 id="port-name-dup"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: None\n"
                 "  ports: [{port: 80}]\n", "unsupported", "Service default/s", "spec.clusterIP",
                 "headless", 5, id="headless"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.96.0\n"
                 "  ports: [{port: 80}]\n", "bad_value", "Service default/s", "spec.clusterIP",
                 "IPv4 address", 5, id="bad-clusterip"),
    pytest.param("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: Magic\n"
                 "  ports: [{port: 80}]\n", "bad_value", "Service default/s", "spec.type",
                 "must be ClusterIP", 5, id="bad-service-type"),
    pytest.param(POD + "    status: {podIP: 10.0.0.300}\n", "bad_value", "Pod demo/web",
                 "status.podIP", "IPv4 address", 7, id="bad-podip"),
    pytest.param(POD + "    status: {podIP: 'fd00::1'}\n", "bad_value", "Pod demo/web",
                 "status.podIP", "IPv4 address", 7, id="ipv6-podip"),
    pytest.param("apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.0.1.5/24}\n",
                 "bad_value", "Node n", "spec.podCIDR", "did you mean 10.0.1.0/24?", 4,
                 id="podcidr-host-bits"),
    pytest.param("apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.0.1.0}\n",
                 "bad_value", "Node n", "spec.podCIDR", "IPv4 CIDR", 4, id="podcidr-no-prefix"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {}\n", "missing_field",
                 "Pod default/web", "spec.containers", "must not be empty", 4, id="no-containers"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n", "missing_field",
                 "Pod default/web", "spec", "is required", 1, id="no-spec"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n"
                 "  - image: busybox\n", "missing_field", "Pod default/web",
                 "spec.containers[0].name", "is required", 6, id="container-without-name"),
    pytest.param(POD + "      - name: main\n", "duplicate", "Pod demo/web",
                 "spec.containers[1].name", "duplicate container name", 7, id="container-dup"),
    pytest.param(POD + "        command: python3 -m http.server\n", "bad_value", "Pod demo/web",
                 "spec.containers[0].command", "must be a list of strings", 7,
                 id="command-not-list"),
    pytest.param(POD + "        args: [--port, 8080]\n", "bad_value", "Pod demo/web",
                 "spec.containers[0].args[1]", "quote it", 7, id="args-int"),
    pytest.param(POD + "        env:\n        - name: TOKEN\n          valueFrom: {secretKeyRef: {}}\n",
                 "unsupported", "Pod demo/web", "spec.containers[0].env[0].valueFrom",
                 "not supported in local mode", 9, id="env-valueFrom"),
    pytest.param(POD + "        env: [{name: PORT, value: 8080}]\n", "bad_value", "Pod demo/web",
                 "spec.containers[0].env[0].value", "quote it", 7, id="env-value-int"),
    pytest.param(POD + "        env: [{value: x}]\n", "missing_field", "Pod demo/web",
                 "spec.containers[0].env[0].name", "is required", 7, id="env-no-name"),
    pytest.param(POD + "      serviceAccountName: a\n      serviceAccount: b\n", "bad_value",
                 "Pod demo/web", "spec.serviceAccount", "contradicts", 8, id="sa-contradiction"),
    pytest.param(POD + "        securityContext: {runAsUser: -1}\n", "bad_value", "Pod demo/web",
                 "spec.containers[0].securityContext.runAsUser", "integer in [0, 2147483647]", 7,
                 id="run-as-user-negative"),
    pytest.param(POD + "      securityContext: {runAsGroup: \"1000\"}\n", "bad_value", "Pod demo/web",
                 "spec.securityContext.runAsGroup", "the string", 7, id="run-as-group-string"),
    pytest.param(POD + "      securityContext: {runAsUser: true}\n", "bad_value", "Pod demo/web",
                 "spec.securityContext.runAsUser", "the boolean", 7, id="run-as-user-bool"),
    pytest.param(POD + "      nodeName: Node_1\n", "bad_value", "Pod demo/web", "spec.nodeName",
                 "RFC 1123 subdomain", 7, id="bad-node-name"),
    pytest.param("apiVersion: v1\nkind: Node\nmetadata:\n  name: a\n  name: b\n", "duplicate",
                 "Node b", "metadata.name", "defined twice (first at line 4)", 5, id="yaml-dup-key"),
    pytest.param("apiVersion: v1\nkind: List\nitems: {a: 1}\n", "bad_value", "List (unnamed)",
                 "items", "must be a list", 3, id="list-items-not-list"),
]


@pytest.mark.parametrize("text, reason, obj, field, fragment, line", BAD)
def test_bad_input_names_file_object_field(text: str, reason: str, obj: str | None,
                                           field: str | None, fragment: str, line: int) -> None:
    errors = errors_of(text)
    assert [e.reason for e in errors] == [reason], [str(e) for e in errors]
    [e] = errors
    assert reason in REASONS
    assert (e.source, e.field, e.line, e.document) == (SRC, field, line, 1)
    text_ = str(e)
    assert text_.startswith(f"{SRC}:{line} (document 1): ")
    if obj is not None:
        assert f": {obj}: " in text_
    if field is not None:
        assert f": {field}: " in text_
    assert fragment in text_


def test_error_string_format_and_key() -> None:
    [e] = errors_of(POD + "        command: {a: b}\n")
    assert e.key == ResourceKey("Pod", "demo", "web")
    assert str(e) == ("deploy/app.yaml:7 (document 1): Pod demo/web: spec.containers[0].command: "
                      "must be a list of strings, got a mapping")


def test_all_errors_are_reported_across_documents_and_fields() -> None:
    errors = errors_of("""
        apiVersion: v1
        kind: Service
        metadata: {name: Bad_Name}
        spec:
          ports:
          - {port: 53, protocol: UDP}
          - {port: 99999, name: b}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: p, labels: {on: yes}}
        spec:
          containers:
          - {name: a, command: x}
          - {name: b, env: [{name: A, valueFrom: {}}]}
        """)
    got = [(e.document, e.field, e.reason) for e in errors]
    assert got == [
        (1, "metadata.name", "bad_value"),
        (1, "spec.ports[0].protocol", "unsupported"),
        (1, "spec.ports[1].port", "bad_value"),
        (2, "metadata.labels", "bad_value"),  # `on` is a boolean key in YAML 1.1
        (2, "spec.containers[0].command", "bad_value"),
        (2, "spec.containers[1].env[0].valueFrom", "unsupported"),
    ]


def test_label_key_with_slash_is_quoted_in_field_path() -> None:
    [e] = errors_of("""
        apiVersion: v1
        kind: Namespace
        metadata:
          name: a
          labels: {istio.io/dataplane-mode: true}
        """)
    assert e.field == 'metadata.labels["istio.io/dataplane-mode"]'


def test_syntax_error_after_good_documents_reports_document_and_line() -> None:
    [e] = errors_of("""
        apiVersion: v1
        kind: Namespace
        metadata: {name: a}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: [b
        """)
    assert (e.reason, e.document, e.line) == ("yaml_syntax", 2, 8)
    assert str(e).startswith("deploy/app.yaml:8 (document 2): invalid YAML:")


def test_error_inside_list_item_names_item() -> None:
    [e] = errors_of("""
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Namespace, metadata: {name: a}}
        - apiVersion: v1
          kind: Node
          metadata: {name: n}
          spec: {podCIDR: nope}
        """)
    assert (e.item, e.line, e.field, e.key) == (2, 8, "spec.podCIDR", ResourceKey("Node", "", "n"))
    assert str(e).startswith("deploy/app.yaml:8 (document 1, item 2): Node n: spec.podCIDR: ")


def test_config_errors_aggregate_pickle_and_single() -> None:
    with pytest.raises(ConfigErrors) as info:
        load_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n---\n- x\n", SRC)
    err = info.value
    assert isinstance(err, ConfigError) and len(err) == 2 and err.reason == "multiple"
    assert err.reasons == ("missing_field", "bad_value")
    assert str(err).splitlines() == [str(e) for e in err]
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.reasons == err.reasons
    single = ConfigErrors([err.errors[0]])
    assert (single.reason, single.field, str(single)) == ("missing_field", "spec.containers",
                                                          str(err.errors[0]))


# --- files --------------------------------------------------------------------------------

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n"


def test_load_paths_files_directories_and_stdin(tmp_path, monkeypatch) -> None:
    (tmp_path / "b.yaml").write_text(NS % "b")
    (tmp_path / "a.yml").write_text(NS % "a")
    (tmp_path / "notes.txt").write_text("not yaml: [")
    single = tmp_path / "one.json"
    single.write_text('{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}')
    monkeypatch.setattr("sys.stdin", io.StringIO(NS % "from-stdin"))
    got = load_paths([str(tmp_path / "a.yml"), str(single), "-"])
    assert [r.name for r in got] == ["a", "n", "from-stdin"]
    got = parse_paths([str(tmp_path)])  # a.yml, b.yaml, one.json, sorted; notes.txt skipped
    assert [(x.resource.name, os.path.basename(x.origin.source)) for x in got] == [
        ("a", "a.yml"), ("b", "b.yaml"), ("n", "one.json")]


def test_load_paths_collects_errors_of_all_files(tmp_path) -> None:
    good, bad1, bad2 = tmp_path / "good.yaml", tmp_path / "bad1.yaml", tmp_path / "bad2.yaml"
    good.write_text(NS % "ok")
    bad1.write_text("apiVersion: v1\nkind: Gizmo\nmetadata: {name: g}\n")
    bad2.write_text("key: [unclosed\n")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigErrors) as info:
        load_paths([str(good), str(bad1), str(missing), str(bad2)])
    errs = info.value.errors
    assert [(e.source, e.reason) for e in errs] == [
        (str(bad1), "unknown_kind"), (str(missing), "unreadable"), (str(bad2), "yaml_syntax")]
    assert str(errs[1]).startswith(f"{missing}: cannot read file: No such file or directory")


def test_load_paths_unreadable_inputs(tmp_path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"kind: \xe9\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigErrors) as info:
        load_paths([str(tmp_path / "latin1.yaml"), str(tmp_path / "empty")])
    assert [(os.path.basename(e.source), e.reason) for e in info.value.errors] == [
        ("latin1.yaml", "unreadable"), ("empty", "unreadable")]
    assert "not UTF-8" in str(info.value.errors[0])
    with pytest.raises(TypeError):
        load_paths(str(tmp_path / "latin1.yaml"))  # a str is a sequence too: refuse it

"""Batch validation before apply: duplicates, references, IP clashes, immutability, deletion."""
from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from mesh.config import (REASONS, ConfigError, ConfigErrors, Loaded, Origin, last_wins, parse_paths,
                         parse_text, validate_batch, validate_deletion)
from mesh.model import (Container, FrozenMap, Namespace, Node, ObjectMeta, PolicyObject, Pod,
                        Resource, ResourceKey, Service, ServiceAccount, ServicePort)


def ns(name: str, **labels: str) -> Namespace:
    return Namespace(meta=ObjectMeta(name=name, labels=FrozenMap(labels)))


def node(name: str, cidr: str | None = None) -> Node:
    return Node(meta=ObjectMeta(name=name),
                pod_cidr=ipaddress.IPv4Network(cidr) if cidr else None)


def sa(name: str, namespace: str = "demo") -> ServiceAccount:
    return ServiceAccount(meta=ObjectMeta(name=name, namespace=namespace))


def pod(name: str, namespace: str = "demo", *, node_name: str | None = None, sa: str = "default",
        ip: str | None = None, command: tuple[str, ...] = ("sleep", "1"), labels: dict | None = None,
        source_dir: str = "/srv/app", working_dir: str | None = None) -> Pod:
    return Pod(meta=ObjectMeta(name=name, namespace=namespace, labels=FrozenMap(labels or {})),
               node_name=node_name, service_account=sa,
               containers=(Container(name="main", command=command, working_dir=working_dir),),
               pod_ip=ipaddress.IPv4Address(ip) if ip else None, source_dir=source_dir)


def svc(name: str, namespace: str = "demo", *, ip: str | None = None) -> Service:
    return Service(meta=ObjectMeta(name=name, namespace=namespace),
                   selector=FrozenMap({"app": name}), ports=(ServicePort(port=80, target_port=8080),),
                   cluster_ip=ipaddress.IPv4Address(ip) if ip else None)


def policy(name: str, namespace: str = "demo") -> PolicyObject:
    return PolicyObject(meta=ObjectMeta(name=name, namespace=namespace),
                        policy_kind="AuthorizationPolicy", api_version="security.istio.io/v1")


def index(*objs: Resource) -> dict[ResourceKey, Resource]:
    return {o.key: o for o in objs}


BASE = index(ns("demo"), node("node-1", "10.244.1.0/24"), sa("web"),
             pod("running", node_name="node-1", ip="10.244.1.5"), svc("api", ip="10.96.0.10"))


def errors_of(batch, existing=BASE) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        validate_batch(batch, existing)
    return list(info.value.errors)


# --- accepted -----------------------------------------------------------------------------

GOOD = [
    pytest.param([ns("shop"), sa("cart", "shop"), pod("cart", "shop", sa="cart")], BASE,
                 id="namespace-and-sa-in-same-batch"),
    pytest.param([pod("web", node_name="node-1", sa="web", ip="10.244.1.6")], BASE,
                 id="references-existing"),
    pytest.param([pod("a", "default"), pod("b", "istio-system"), policy("p", "default")], {},
                 id="implicit-namespaces"),
    pytest.param([node("node-2"), pod("p", node_name="node-2")], BASE, id="node-in-batch"),
    pytest.param(list(BASE.values()), BASE, id="re-apply-identical"),
    pytest.param([pod("running", node_name="node-1", ip="10.244.1.5",
                      labels={"app": "new", "istio.io/dataplane-mode": "none"})], BASE,
                 id="label-only-pod-change"),
    pytest.param([dataclasses.replace(BASE[ResourceKey("Pod", "demo", "running")],
                                      meta=ObjectMeta(name="running", namespace="demo",
                                                      annotations=FrozenMap({"a": "b"})))], BASE,
                 id="annotation-only-pod-change"),
    pytest.param([pod("running")], BASE, id="unset-nodeName-and-podIP-keep-current"),
    pytest.param([svc("api")], BASE, id="unset-clusterIP-keeps-current"),
    pytest.param([node("node-1")], BASE, id="unset-podCIDR-keeps-current"),
    pytest.param([svc("api", ip="10.96.0.10")], BASE, id="same-clusterIP-same-service"),
    pytest.param([ns("demo", **{"istio.io/dataplane-mode": "ambient"})], BASE,
                 id="namespace-labels-change"),
    pytest.param([pod("moved", source_dir="/a", working_dir="/w")],
                 index(ns("demo"), pod("moved", source_dir="/b", working_dir="/w")),
                 id="source-dir-irrelevant-with-workingDir"),
]


@pytest.mark.parametrize("batch, existing", GOOD)
def test_valid_batch_passes(batch, existing) -> None:
    assert validate_batch(batch, existing) is None


# --- refused ------------------------------------------------------------------------------

RUNNING = BASE[ResourceKey("Pod", "demo", "running")]

# (batch, existing, reason, key as printed, field, fragment)
BAD = [
    pytest.param([pod("p", "shop")], BASE, "unknown_reference", "Pod shop/p", "metadata.namespace",
                 'namespace "shop" does not exist', id="unknown-namespace"),
    pytest.param([policy("p", "shop")], BASE, "unknown_reference", "AuthorizationPolicy shop/p",
                 "metadata.namespace", 'namespace "shop" does not exist', id="policy-unknown-namespace"),
    pytest.param([pod("p", sa="ghost")], BASE, "unknown_reference", "Pod demo/p",
                 "spec.serviceAccountName", 'service account "ghost" does not exist in namespace "demo"',
                 id="unknown-service-account"),
    pytest.param([pod("p", "default", sa="web")], BASE, "unknown_reference", "Pod default/p",
                 "spec.serviceAccountName", "does not exist", id="service-account-other-namespace"),
    pytest.param([pod("p", node_name="node-9")], BASE, "unknown_reference", "Pod demo/p",
                 "spec.nodeName", 'node "node-9" does not exist', id="unknown-node"),
    pytest.param([svc("web", ip="10.96.0.10")], BASE, "conflict", "Service demo/web",
                 "spec.clusterIP", "clusterIP 10.96.0.10 is already used by Service demo/api",
                 id="clusterip-clash-existing"),
    pytest.param([svc("a", ip="10.96.0.20"), svc("b", ip="10.96.0.20")], BASE, "conflict",
                 "Service demo/b", "spec.clusterIP", "already used by Service demo/a",
                 id="clusterip-clash-in-batch"),
    pytest.param([pod("p", ip="10.244.1.5")], BASE, "conflict", "Pod demo/p", "status.podIP",
                 "pod IP 10.244.1.5 is already used by Pod demo/running", id="podip-clash"),
    pytest.param([pod("running", node_name="node-1", ip="10.244.1.5", command=("sleep", "2"))],
                 BASE, "immutable_field", "Pod demo/running", "spec.containers[0].command",
                 "delete and re-create the pod", id="pod-command-change"),
    pytest.param([dataclasses.replace(RUNNING, containers=RUNNING.containers * 2)], BASE,
                 "immutable_field", "Pod demo/running", "spec.containers",
                 "1 containers -> 2); delete and re-create the pod", id="pod-container-added"),
    pytest.param([pod("running", node_name="node-1", ip="10.244.1.5", sa="web")], BASE,
                 "immutable_field", "Pod demo/running", "spec.serviceAccountName",
                 "default -> web", id="pod-sa-change"),
    pytest.param([node("node-2"), pod("running", node_name="node-2", ip="10.244.1.5")], BASE,
                 "immutable_field", "Pod demo/running", "spec.nodeName", "node-1 -> node-2",
                 id="pod-node-change"),
    pytest.param([pod("running", node_name="node-1", ip="10.244.1.9")], BASE,
                 "immutable_field", "Pod demo/running", "status.podIP", "10.244.1.5 -> 10.244.1.9",
                 id="pod-ip-change"),
    pytest.param([pod("running", node_name="node-1", ip="10.244.1.5", source_dir="/elsewhere")],
                 BASE, "immutable_field", "Pod demo/running", None, "working directory",
                 id="pod-source-dir-change"),
    pytest.param([svc("api", ip="10.96.0.11")], BASE, "immutable_field", "Service demo/api",
                 "spec.clusterIP", "delete and re-create the service", id="clusterip-change"),
    pytest.param([node("node-1", "10.244.9.0/24")], BASE, "immutable_field", "Node node-1",
                 "spec.podCIDR", "10.244.1.0/24 -> 10.244.9.0/24", id="podcidr-change"),
]


@pytest.mark.parametrize("batch, existing, reason, key, field, fragment", BAD)
def test_bad_batch_is_refused(batch, existing, reason, key, field, fragment) -> None:
    errors = errors_of(batch, existing)
    assert [e.reason for e in errors] == [reason], [str(e) for e in errors]
    [e] = errors
    assert reason in REASONS
    assert (str(e.key), e.field) == (key, field)
    assert str(e).startswith(f"<batch>: {key}: " + (f"{field}: " if field else ""))
    assert fragment in str(e)


def test_all_problems_reported_and_nothing_depends_on_order() -> None:
    batch = [pod("a", "shop", sa="ghost", node_name="nowhere"), svc("api", ip="10.96.0.99"),
             sa("x"), sa("x")]
    errors = errors_of(batch)
    assert sorted((str(e.key), e.reason, e.field) for e in errors) == sorted([
        ("Pod shop/a", "unknown_reference", "metadata.namespace"),
        ("Pod shop/a", "unknown_reference", "spec.serviceAccountName"),
        ("Pod shop/a", "unknown_reference", "spec.nodeName"),
        ("Service demo/api", "immutable_field", "spec.clusterIP"),
    ])
    assert errors_of(list(reversed(batch)))  # still refused the other way round


def test_existing_is_not_modified() -> None:
    existing = dict(BASE)
    with pytest.raises(ConfigErrors):
        validate_batch([svc("api", ip="10.96.0.11"), ns("new")], existing)
    assert existing == BASE


def test_same_object_in_two_files_takes_the_last_as_kubectl(tmp_path) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    doc = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: demo, labels: {v: '%s'}}\n"
    one.write_text(doc % "1")
    two.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n" + doc % "2")
    loaded = parse_paths([str(one), str(two)])
    assert [(str(x.resource.key), x.origin.source) for x in loaded] == [
        ("Namespace x", str(two)), ("ServiceAccount demo/web", str(two))]
    web = loaded[1]
    assert web.resource.labels == {"v": "2"}
    [w] = web.warnings
    assert w.reason == "superseded"
    assert str(w) == (f"{two}:5 (document 2): ServiceAccount demo/web: warning: also defined at "
                      f"{one}:1 (document 1); this last definition is used")
    validate_batch(loaded, {ResourceKey("Namespace", "", "demo"): ns("demo")})


def test_same_object_twice_in_one_text_and_unparsed_batch_last_wins() -> None:
    doc = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: %s}\n"
    [node_] = parse_text(doc % "10.0.1.0/24" + "---\n" + doc % "10.0.2.0/24", "a.yaml")
    assert str(node_.resource.pod_cidr) == "10.0.2.0/24" and node_.origin.document == 2
    x2 = ServiceAccount(meta=ObjectMeta(name="x", namespace="demo", labels=FrozenMap({"b": "1"})))
    got = last_wins([Loaded(sa("x"), Origin("a")), Loaded(sa("y"), Origin("a")), Loaded(x2, Origin("b"))])
    assert [x.resource for x in got] == [sa("y"), x2]
    assert [w.reason for w in got[1].warnings] == ["superseded"] and got[0].warnings == ()


def test_loaded_origin_is_used_for_reference_errors() -> None:
    batch = parse_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\n"
                       "spec:\n  nodeName: node-7\n  containers: [{name: c}]\n", "deploy/app.yaml")
    [e] = errors_of(batch)
    assert str(e).startswith('deploy/app.yaml:1 (document 1): Pod demo/p: spec.nodeName: node "node-7"')


def test_loaded_and_bare_resources_can_mix() -> None:
    loaded = Loaded(sa("x"), Origin("a.yaml", 1))
    validate_batch([loaded, sa("x")], BASE)  # the same object twice: the last one counts
    errors = errors_of([Loaded(pod("p", sa="ghost"), Origin("a.yaml", 1)), pod("q", sa="ghost")])
    assert [(str(e.key), e.source) for e in errors] == [("Pod demo/p", "a.yaml"), ("Pod demo/q", "<batch>")]


# --- deletion -----------------------------------------------------------------------------

WORLD = index(ns("demo"), ns("empty"), node("node-1"), node("node-2"), sa("web"),
              pod("a", node_name="node-1"), pod("b", node_name="node-1"), svc("api"))


def test_deletion_allowed_when_nothing_depends() -> None:
    validate_deletion([ResourceKey("Node", "", "node-2"), ResourceKey("Namespace", "", "empty"),
                       ResourceKey("ServiceAccount", "demo", "web")], WORLD)
    # deleting dependents together with what they depend on is fine
    validate_deletion([ResourceKey("Pod", "demo", "a"), ResourceKey("Pod", "demo", "b"),
                       ResourceKey("Node", "", "node-1")], WORLD)
    validate_deletion([k for k in WORLD if k.namespace == "demo"]
                      + [ResourceKey("Namespace", "", "demo")], WORLD)
    validate_deletion([ResourceKey("Pod", "demo", "gone")], WORLD, missing_ok=True)


DELETE_BAD = [
    pytest.param([ResourceKey("Node", "", "node-1")], "in_use", "Node node-1",
                 "node still runs 2 pod(s): Pod demo/a, Pod demo/b; delete them first",
                 id="node-with-pods"),
    pytest.param([ResourceKey("Node", "", "node-1"), ResourceKey("Pod", "demo", "a")], "in_use",
                 "Node node-1", "node still runs 1 pod(s): Pod demo/b", id="node-with-remaining-pod"),
    pytest.param([ResourceKey("Namespace", "", "demo")], "in_use", "Namespace demo",
                 "namespace still holds 4 object(s): Pod demo/a, Pod demo/b, Service demo/api, "
                 "ServiceAccount demo/web", id="namespace-with-objects"),
    pytest.param([ResourceKey("Namespace", "", "default")], "forbidden", "Namespace default",
                 "cannot be deleted", id="default-namespace"),
    pytest.param([ResourceKey("Pod", "demo", "zzz")], "not_found", "Pod demo/zzz",
                 "does not exist", id="missing"),
]


@pytest.mark.parametrize("keys, reason, key, fragment", DELETE_BAD)
def test_deletion_refused(keys, reason, key, fragment) -> None:
    world = {**WORLD, ns("default").key: ns("default")}
    with pytest.raises(ConfigErrors) as info:
        validate_deletion(keys, world, source="cli")
    [e] = info.value.errors
    assert (e.reason, str(e.key)) == (reason, key)
    assert str(e).startswith(f"cli: {key}: ") and fragment in str(e)

"""Kubernetes core kinds (Namespace, Node, ServiceAccount, Pod, Service) to the model, with the
API server's naming rules. Local-runtime extras (a Pod's source directory) are not set here."""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..model import (Container, FrozenMap, Namespace, Node, ObjectMeta, Pod, Resource, Service,
                     ServiceAccount, ServicePort)
from .annotations import retry_budget
from .source import (Ctx, Invalid, Path, describe, get_ipv4, get_ipv4_net, get_list, get_map, get_port,
                     get_str, get_str_list, quote_hint)

__all__ = ["BUILDERS", "object_meta"]

# --- names and labels ---------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_IANA_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

_NAME_RULES = {
    "subdomain": "a lowercase RFC 1123 subdomain (lowercase letters, digits, '-' and '.', "
                 "starting and ending with a letter or digit, at most 253 characters)",
    "label": "a lowercase RFC 1123 label (lowercase letters, digits and '-', "
             "starting and ending with a letter or digit, at most 63 characters)",
    "dns1035": "a lowercase RFC 1035 label (lowercase letters, digits and '-', "
               "starting with a letter, ending with a letter or digit, at most 63 characters)",
}
# Services become DNS names, so Kubernetes holds them to RFC 1035; namespaces are labels.
_NAME_RULE_OF_KIND = {"Namespace": "label", "Service": "dns1035"}


def _name_ok(value: str, rule: str) -> bool:
    if rule == "subdomain":
        return len(value) <= 253 and all(_DNS_LABEL.fullmatch(p) for p in value.split("."))
    pattern = _DNS_LABEL if rule == "label" else _DNS_1035
    return len(value) <= 63 and bool(pattern.fullmatch(value))


def _check_name(ctx: Ctx, value: str, path: Path, rule: str) -> None:
    if _name_ok(value, rule):
        return
    message = f"{json.dumps(value)} is not valid: must be {_NAME_RULES[rule]}"
    fixed = re.sub(r"[^a-z0-9.-]+" if rule == "subdomain" else r"[^a-z0-9-]+", "-", value.lower())
    fixed = fixed.strip("-.")
    if rule == "dns1035":
        fixed = fixed.lstrip("0123456789-")
    if fixed and _name_ok(fixed, rule):
        message += f"; e.g. {json.dumps(fixed)}"
    ctx.fail(path, message)


def _label_key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return f"keys must be strings, got {describe(key)}{quote_hint(key)}"
    prefix, _, name = key.rpartition("/")
    if "/" in key and not (prefix and _name_ok(prefix, "subdomain")):
        return f"key {json.dumps(key)} has an invalid prefix: must be {_NAME_RULES['subdomain']}"
    if not (len(name) <= 63 and _LABEL_NAME.fullmatch(name)):
        return (f"key {json.dumps(key)} is not valid: the name part must be at most 63 letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit")
    return None


def _labels(ctx: Ctx, parent: Mapping[Any, Any], path: Path, *, values: str) -> FrozenMap:
    """Labels, selectors (values="label") and annotations (values="any")."""
    m = get_map(ctx, parent, path)
    for k, v in m.items():
        problem = _label_key_problem(k)
        if problem:
            ctx.fail(path, problem)
        if not isinstance(v, str):
            # Kubernetes rejects non-string values; YAML makes `yes`, `true`, `1` non-strings.
            ctx.fail(path + (k,), f"values must be strings, got {describe(v)}{quote_hint(v)}")
        if values == "label" and v and not (len(v) <= 63 and _LABEL_NAME.fullmatch(v)):
            ctx.fail(path + (k,), f"{json.dumps(v)} is not a valid label value: at most 63 "
                     "letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    return FrozenMap(m)


# --- objects ------------------------------------------------------------------------------

def object_meta(ctx: Ctx, obj: Mapping[Any, Any], kind: str, namespaced: bool) -> ObjectMeta:
    meta = get_map(ctx, obj, ("metadata",))
    name = get_str(ctx, meta, ("metadata", "name"))
    if name is None:  # already reported by the converter
        raise Invalid
    _check_name(ctx, name, ("metadata", "name"), _NAME_RULE_OF_KIND.get(kind, "subdomain"))
    namespace = ""
    if namespaced:  # cluster-scoped kinds ignore metadata.namespace, as the API server does
        namespace = get_str(ctx, meta, ("metadata", "namespace")) or "default"
        _check_name(ctx, namespace, ("metadata", "namespace"), "label")
    labels = ctx.collect(lambda: _labels(ctx, meta, ("metadata", "labels"), values="label"))
    annotations = ctx.collect(lambda: _labels(ctx, meta, ("metadata", "annotations"), values="any"))
    return ObjectMeta(name=name, namespace=namespace, labels=labels or FrozenMap(),
                      annotations=annotations or FrozenMap())


def _node(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> Node:
    spec = get_map(ctx, obj, ("spec",))
    cidr = spec.get("podCIDR")
    pod_cidr = None if cidr in (None, "") else get_ipv4_net(ctx, cidr, ("spec", "podCIDR"))
    return Node(meta=meta, pod_cidr=pod_cidr)


def _env(ctx: Ctx, c: Mapping[Any, Any], path: Path) -> FrozenMap:
    env: dict[str, str] = {}
    for i, e in enumerate(get_list(ctx, c, path)):
        p = path + (i,)
        if not isinstance(e, Mapping):
            ctx.fail(p, f"must be a mapping with name and value, got {describe(e)}")
        name = get_str(ctx, e, p + ("name",), required=True) or ""
        if "=" in name:
            ctx.fail(p + ("name",), f"{json.dumps(name)} is not a valid variable name: it "
                     "must not contain '='")
        if e.get("valueFrom") is not None:
            ctx.fail(p + ("valueFrom",), "is not supported in local mode (there are no Secrets, "
                     "ConfigMaps or downward API here); set `value` directly", "unsupported")
        env[name] = get_str(ctx, e, p + ("value",)) or ""  # a repeated name: the last one wins
    return FrozenMap(env)


def _container(ctx: Ctx, c: Any, path: Path) -> Container:
    if not isinstance(c, Mapping):
        ctx.fail(path, f"must be a mapping (a container), got {describe(c)}")
    name = get_str(ctx, c, path + ("name",), required=True)
    assert name is not None
    _check_name(ctx, name, path + ("name",), "label")
    return Container(name=name, command=get_str_list(ctx, c, path + ("command",)),
                     args=get_str_list(ctx, c, path + ("args",)), env=_env(ctx, c, path + ("env",)),
                     working_dir=get_str(ctx, c, path + ("workingDir",)),
                     **_run_as(ctx, c, path + ("securityContext",)))


def _run_as(ctx: Ctx, parent: Mapping[Any, Any], path: Path) -> dict[str, int | None]:
    """runAsUser/runAsGroup of a (pod or container) securityContext, as Container/Pod fields."""
    sc = get_map(ctx, parent, path)
    out: dict[str, int | None] = {}
    for key, attr in (("runAsUser", "run_as_user"), ("runAsGroup", "run_as_group")):
        v = sc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31):
            ctx.fail(path + (key,), f"must be an integer in [0, 2147483647], got {describe(v)}")
        out[attr] = v
    return out


def _service_account(ctx: Ctx, spec: Mapping[Any, Any]) -> str:
    sa = get_str(ctx, spec, ("spec", "serviceAccountName"))
    old = get_str(ctx, spec, ("spec", "serviceAccount"))  # deprecated alias
    if sa and old and sa != old:
        ctx.fail(("spec", "serviceAccount"), f"{json.dumps(old)} contradicts serviceAccountName "
                 f"{json.dumps(sa)}; drop the deprecated serviceAccount field")
    sa = sa or old or "default"
    _check_name(ctx, sa, ("spec", "serviceAccountName"), "subdomain")
    return sa


def _pod(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> Pod:
    spec = get_map(ctx, obj, ("spec",), required=True)

    def node_name() -> str | None:
        name = get_str(ctx, spec, ("spec", "nodeName"))
        if name is not None:
            _check_name(ctx, name, ("spec", "nodeName"), "subdomain")
        return name

    def pod_ip() -> ipaddress.IPv4Address | None:
        status = get_map(ctx, obj, ("status",))
        ip = status.get("podIP")
        return None if ip in (None, "") else get_ipv4(ctx, ip, ("status", "podIP"))

    node = ctx.collect(node_name)
    sa = ctx.collect(lambda: _service_account(ctx, spec))
    ip = ctx.collect(pod_ip)
    raw = ctx.collect(lambda: get_list(ctx, spec, ("spec", "containers"), required=True)) or []
    containers: list[Container] = []
    first: dict[str, int] = {}
    for i, c in enumerate(raw):
        path = ("spec", "containers", i)
        container = ctx.collect(lambda: _container(ctx, c, path))
        if container is None:
            continue
        if container.name in first:
            ctx.error(path + ("name",), f"duplicate container name {json.dumps(container.name)} "
                      f"(also spec.containers[{first[container.name]}])", "duplicate")
        first.setdefault(container.name, i)
        containers.append(container)
    return Pod(meta=meta, node_name=node, service_account=sa or "default",
               containers=tuple(containers), pod_ip=ip,
               **(ctx.collect(lambda: _run_as(ctx, spec, ("spec", "securityContext"))) or {}))


def _service_port(ctx: Ctx, p: Any, path: Path, many: bool) -> ServicePort:
    if not isinstance(p, Mapping):
        ctx.fail(path, f"must be a mapping with at least `port`, got {describe(p)}")
    if p.get("port") is None:
        ctx.fail(path + ("port",), "is required", "missing_field")
    port = get_port(ctx, p["port"], path + ("port",))
    protocol = p.get("protocol")
    if protocol in (None, ""):
        protocol = "TCP"
    if protocol in ("UDP", "SCTP"):
        ctx.fail(path + ("protocol",), f"{protocol} is not supported: only TCP is supported "
                 "by the mesh (remove `protocol` or set it to TCP)", "unsupported")
    if protocol != "TCP":
        ctx.fail(path + ("protocol",), f"must be TCP, got {describe(protocol)}")
    target = p.get("targetPort")
    if target in (None, ""):
        target = port  # Kubernetes' default
    elif isinstance(target, str):
        tp = path + ("targetPort",)
        if target.isdigit():
            ctx.fail(tp, f"{json.dumps(target)} is a string: write the number unquoted, or use a "
                     "named container port")
        if not (len(target) <= 15 and _IANA_PORT_NAME.fullmatch(target) and "--" not in target
                and re.search("[a-z]", target)):
            ctx.fail(tp, f"{json.dumps(target)} is not a valid port name: at most 15 lowercase "
                     "letters, digits and '-' with at least one letter, or a port number")
    else:
        get_port(ctx, target, path + ("targetPort",))
    name = get_str(ctx, p, path + ("name",))
    if name is None and many:  # as in Kubernetes: ports must be told apart once there are two
        ctx.fail(path + ("name",), "is required when a service has more than one port",
                 "missing_field")
    if name is not None:
        _check_name(ctx, name, path + ("name",), "label")
    app_protocol = get_str(ctx, p, path + ("appProtocol",))
    return ServicePort(port=port, target_port=target, name=name or "", protocol="TCP",
                       app_protocol=app_protocol or "")


def _service(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta) -> Service:
    spec = get_map(ctx, obj, ("spec",), required=True)
    selector = ctx.collect(lambda: _labels(ctx, spec, ("spec", "selector"), values="label"))

    def cluster_ip() -> ipaddress.IPv4Address | None:
        ip = spec.get("clusterIP")
        if ip in (None, ""):
            return None
        if ip == "None":
            ctx.fail(("spec", "clusterIP"), "headless services (clusterIP: None) are not "
                     "supported; remove clusterIP to get a virtual IP", "unsupported")
        return get_ipv4(ctx, ip, ("spec", "clusterIP"))

    def service_type() -> None:
        # NodePort/LoadBalancer/ExternalName are accepted and treated as ClusterIP locally.
        t = spec.get("type")
        if t not in (None, "", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
            ctx.fail(("spec", "type"), f"must be ClusterIP, NodePort, LoadBalancer or "
                     f"ExternalName, got {describe(t)}")

    ip = ctx.collect(cluster_ip)
    ctx.collect(service_type)
    raw = ctx.collect(lambda: get_list(ctx, spec, ("spec", "ports"), required=True)) or []
    ports: list[ServicePort] = []
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for i, p in enumerate(raw):
        path = ("spec", "ports", i)
        sp = ctx.collect(lambda: _service_port(ctx, p, path, many=len(raw) > 1))
        if sp is None:
            continue
        if sp.name and sp.name in names:
            ctx.error(path + ("name",), f"duplicate port name {json.dumps(sp.name)} "
                      f"(also spec.ports[{names[sp.name]}])", "duplicate")
        if sp.port in numbers:
            ctx.error(path + ("port",), f"duplicate port {sp.port} "
                      f"(also spec.ports[{numbers[sp.port]}])", "duplicate")
        names.setdefault(sp.name, i)
        numbers.setdefault(sp.port, i)
        ports.append(sp)
    return Service(meta=meta, selector=selector or FrozenMap(), ports=tuple(ports), cluster_ip=ip,
                   retry_budget=retry_budget(ctx, meta.annotations))


def _simple(cls: type[Resource]) -> Callable[[Ctx, Mapping[Any, Any], ObjectMeta], Resource]:
    return lambda ctx, obj, meta: cls(meta=meta)


BUILDERS: dict[str, Callable[[Ctx, Mapping[Any, Any], ObjectMeta], Resource]] = {
    Namespace.kind: _simple(Namespace), ServiceAccount.kind: _simple(ServiceAccount),
    Node.kind: _node, Pod.kind: _pod, Service.kind: _service,
}


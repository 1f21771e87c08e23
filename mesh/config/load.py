"""Kubernetes-style YAML to the frozen model: the one place wire dicts are converted."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..model import (CORE_KINDS, POLICY_KINDS, Container, FrozenMap, Namespace, Node, ObjectMeta,
                     PolicyObject, Pod, Resource, ResourceKey, Service, ServiceAccount, ServicePort,
                     freeze)
from .errors import ConfigError, ConfigErrors, Origin
from .policy import authorization_policy, peer_authentication
from .istio_route import destination_rule, virtual_service
from .route import http_route
from .source import (Ctx, Document, Invalid, Path, describe, format_path, get_ipv4, get_ipv4_net,
                     get_list, get_map, get_port, get_str, get_str_list, quote_hint, read_documents)

__all__ = ["SUPPORTED_KINDS", "Loaded", "load_text", "load_paths", "parse_text", "parse_paths"]

SUPPORTED_KINDS: tuple[str, ...] = (*CORE_KINDS, *POLICY_KINDS)
_YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A converted object and where it was written (for errors that point back at the file)."""

    resource: Resource
    origin: Origin


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
        return len(value) <= 253 and all(_DNS_LABEL.match(p) for p in value.split("."))
    pattern = _DNS_LABEL if rule == "label" else _DNS_1035
    return len(value) <= 63 and bool(pattern.match(value))


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
    if not (len(name) <= 63 and _LABEL_NAME.match(name)):
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
        if values == "label" and v and not (len(v) <= 63 and _LABEL_NAME.match(v)):
            ctx.fail(path + (k,), f"{json.dumps(v)} is not a valid label value: at most 63 "
                     "letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    return FrozenMap(m)


# --- objects ------------------------------------------------------------------------------

def _meta(ctx: Ctx, obj: Mapping[Any, Any], kind: str, namespaced: bool) -> ObjectMeta:
    meta = get_map(ctx, obj, ("metadata",))
    name = get_str(ctx, meta, ("metadata", "name"))
    if name is None:  # already reported by _parse_object
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


def _node(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta, base_dir: str) -> Node:
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


def _pod(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta, base_dir: str) -> Pod:
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
               containers=tuple(containers), pod_ip=ip, source_dir=base_dir,
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
        if not (len(target) <= 15 and _IANA_PORT_NAME.match(target) and "--" not in target
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
    return ServicePort(port=port, target_port=target, name=name or "", protocol="TCP")


def _service(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta, base_dir: str) -> Service:
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
    return Service(meta=meta, selector=selector or FrozenMap(), ports=tuple(ports), cluster_ip=ip)


def _simple(cls: type[Resource]) -> Callable[[Ctx, Mapping[Any, Any], ObjectMeta, str], Resource]:
    return lambda ctx, obj, meta, base_dir: cls(meta=meta)


_BUILDERS: dict[str, Callable[[Ctx, Mapping[Any, Any], ObjectMeta, str], Resource]] = {
    Namespace.kind: _simple(Namespace), ServiceAccount.kind: _simple(ServiceAccount),
    Node.kind: _node, Pod.kind: _pod, Service.kind: _service,
}


def _policy(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta, kind: str,
            api: str) -> PolicyObject:
    spec = get_map(ctx, obj, ("spec",))
    return PolicyObject(meta=meta, policy_kind=kind, api_version=api, spec=freeze(spec))


# Policy kinds with a typed model; the others stay PolicyObject until an issue enforces them.
_TYPED_POLICIES = {"AuthorizationPolicy": authorization_policy, "PeerAuthentication": peer_authentication,
                   "HTTPRoute": http_route, "VirtualService": virtual_service,
                   "DestinationRule": destination_rule}


def _parse_object(ctx: Ctx, obj: Any, base_dir: str) -> Resource | None:
    """Convert one object; errors go to ctx.errors and the result is then None."""
    if not isinstance(obj, Mapping):
        ctx.fail((), "must be a mapping (a Kubernetes object with apiVersion, kind and "
                 f"metadata), got {describe(obj)}")
    kind = get_str(ctx, obj, ("kind",), required=True)
    assert kind is not None
    ctx.kind = kind
    namespaced = CORE_KINDS[kind].namespaced if kind in CORE_KINDS else True
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        ctx.fail(("metadata",), "is required (with at least metadata.name)" if meta is None
                 else f"must be a mapping, got {describe(meta)}", "missing_field" if meta is None
                 else "bad_value")
    name = ctx.collect(lambda: get_str(ctx, meta, ("metadata", "name"), required=True))
    ctx.key = _guess_key(obj) if name is not None else None
    if kind not in SUPPORTED_KINDS:
        ctx.fail(("kind",), f"unknown kind {json.dumps(kind)}; supported kinds: "
                 f"{', '.join(SUPPORTED_KINDS)}", "unknown_kind")
    accepted = POLICY_KINDS.get(kind, ("v1",))
    api = ctx.collect(lambda: get_str(ctx, obj, ("apiVersion",), required=True))
    if api is not None and api not in accepted:
        ctx.error(("apiVersion",), f"{json.dumps(api)} is not accepted for {kind}; use "
                  f"{' or '.join(accepted)}", "bad_api_version")
    # On bad metadata, still check the spec (against a stand-in) so all errors show at once.
    meta_obj = ctx.collect(lambda: _meta(ctx, obj, kind, namespaced)) or ObjectMeta(name="")
    if kind in _TYPED_POLICIES:
        result: Resource | None = ctx.collect(lambda: _TYPED_POLICIES[kind](ctx, obj, meta_obj))
    elif kind in POLICY_KINDS:
        result = ctx.collect(lambda: _policy(ctx, obj, meta_obj, kind, api or ""))
    else:
        result = ctx.collect(lambda: _BUILDERS[kind](ctx, obj, meta_obj, base_dir))
    return None if ctx.errors else result


def _objects(doc: Document, source: str,
             errors: list[ConfigError]) -> Iterator[tuple[Any, Path, Origin]]:
    """The objects of a document: itself, or the items of a `kind: List`."""
    data = doc.data
    origin = Origin(source, doc.index)
    if isinstance(data, Mapping) and data.get("kind") == "List":
        items = data.get("items")
        if not isinstance(items, list):
            ctx = Ctx(origin, doc.lines, ())
            ctx.kind = "List"
            ctx.error(("items",), f"must be a list of objects, got {describe(items)}",
                      "missing_field" if items is None else "bad_value")
            errors.extend(ctx.errors)
            return
        for i, item in enumerate(items):
            line = doc.lines.get(("items", i))
            yield item, ("items", i), Origin(source, doc.index, i + 1, line)
    else:
        yield data, (), origin.at(doc.lines.get(()))


def _guess_key(obj: Any) -> ResourceKey | None:
    """Best-effort key of a raw object, for errors found before it is converted."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("metadata"), Mapping):
        return None
    kind, meta = obj.get("kind"), obj["metadata"]
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(kind, str) or not isinstance(name, str):
        return None
    cluster = kind in CORE_KINDS and not CORE_KINDS[kind].namespaced
    namespace = "" if cluster else ns if isinstance(ns, str) and ns else "default"
    return ResourceKey(kind, namespace, name)


def _dup_key_errors(doc: Document, source: str) -> list[ConfigError]:
    errors = []
    for path, line, first in doc.dups:
        obj, rel, item = doc.data, path, None
        if (isinstance(obj, Mapping) and obj.get("kind") == "List" and len(path) > 2
                and path[0] == "items" and isinstance(path[1], int)):
            items = obj.get("items")
            obj = items[path[1]] if isinstance(items, list) and path[1] < len(items) else None
            rel, item = path[2:], path[1] + 1
        errors.append(ConfigError(
            f"key {json.dumps(path[-1])} is defined twice (first at line {first}); "
            "YAML keeps only the last one", reason="duplicate", source=source,
            key=_guess_key(obj), field=format_path(rel), document=doc.index, item=item, line=line))
    return errors


def _default_base_dir(source: str) -> str:
    if source.startswith("<"):  # "<stdin>" and friends: relative to where we run
        return os.getcwd()
    return os.path.dirname(os.path.abspath(source))


def parse_text(text: str, source: str, *, base_dir: str | None = None) -> list[Loaded]:
    """Like load_text, but keeps each object's origin (file, document, item, line)."""
    base = os.path.abspath(base_dir) if base_dir is not None else _default_base_dir(source)
    errors: list[ConfigError] = []
    out: list[Loaded] = []
    for doc in read_documents(text, source, errors):
        errors.extend(_dup_key_errors(doc, source))
        if doc.data is None:
            continue  # empty document (e.g. a trailing ---)
        for obj, prefix, origin in _objects(doc, source, errors):
            ctx = Ctx(origin, doc.lines, prefix)
            try:
                resource = _parse_object(ctx, obj, base)
            except Invalid:
                resource = None
            errors.extend(ctx.errors)
            if resource is not None:
                out.append(Loaded(resource, origin))
    if errors:
        raise ConfigErrors(errors)
    return out


def load_text(text: str, source: str, *, base_dir: str | None = None) -> list[Resource]:
    """Convert multi-document Kubernetes YAML to model objects, or raise ConfigErrors (all of
    them). `base_dir` (default: the source file's directory) becomes each Pod's source_dir."""
    return [loaded.resource for loaded in parse_text(text, source, base_dir=base_dir)]


def _expand(paths: Sequence[str], errors: list[ConfigError]) -> Iterator[str]:
    for path in paths:
        if path != "-" and os.path.isdir(path):
            # Like `kubectl apply -f dir/`: the directory's YAML/JSON files, not recursive.
            files = sorted(f for f in os.listdir(path) if f.endswith(_YAML_SUFFIXES))
            if not files:
                errors.append(ConfigError("directory has no .yaml, .yml or .json files",
                                          reason="unreadable", source=path))
            yield from (os.path.join(path, f) for f in files)
        else:
            yield path


def parse_paths(paths: Sequence[str]) -> list[Loaded]:
    """Like load_paths, but keeps each object's origin."""
    if isinstance(paths, str):
        raise TypeError("parse_paths takes a sequence of paths, not a single string")
    errors: list[ConfigError] = []
    out: list[Loaded] = []
    for path in _expand(paths, errors):
        source = "<stdin>" if path == "-" else path
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except OSError as e:
            errors.append(ConfigError(f"cannot read file: {e.strerror or e}", reason="unreadable",
                                      source=source))
            continue
        except UnicodeDecodeError as e:
            errors.append(ConfigError(f"not UTF-8 text (byte {e.start})", reason="unreadable",
                                      source=source))
            continue
        try:
            out.extend(parse_text(text, source))
        except ConfigErrors as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigErrors(errors)
    return out


def load_paths(paths: Sequence[str]) -> list[Resource]:
    """Load files (a directory means its *.yaml/*.yml/*.json; "-" means stdin), collecting the
    errors of all files into one ConfigErrors."""
    return [loaded.resource for loaded in parse_paths(paths)]

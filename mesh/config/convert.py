"""Kubernetes-style objects (dicts, as yaml.safe_load or a Kubernetes API watch gives them) to the
model: the one converter behind the YAML loader and any API watcher.

Errors name the object (kind ns/name) and the field, plus file, document and line when the
object came from a file (the YAML loader passes its line map). A batch is converted all or
nothing: every error of every object is raised at once, in one ConfigErrors.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..model import CORE_KINDS, POLICY_KINDS, ObjectMeta, PolicyObject, Resource, ResourceKey, freeze
from .core import BUILDERS, object_meta
from .errors import ConfigError, ConfigErrors, ConfigWarning, Origin
from .istio_route import destination_rule, virtual_service
from .policy import authorization_policy, peer_authentication
from .route import http_route
from .telemetry import config_map, telemetry
from .source import Ctx, Invalid, Path, describe, get_map, get_str

__all__ = ["SUPPORTED_KINDS", "Loaded", "convert", "convert_batch", "convert_located", "guess_key"]

SUPPORTED_KINDS: tuple[str, ...] = (*CORE_KINDS, *POLICY_KINDS)

_NO_FILE = Origin("")
"""The origin of an object that came from no file: errors then start with the object's name."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """A converted object, where it was written (for errors that point back at the file), and
    what the operator should know about it (fields accepted but not enforced, deprecated forms)."""

    resource: Resource
    origin: Origin
    warnings: tuple[ConfigWarning, ...] = ()


def _policy(ctx: Ctx, obj: Mapping[Any, Any], meta: ObjectMeta, kind: str, api: str) -> PolicyObject:
    spec = get_map(ctx, obj, ("spec",))
    if kind == "Gateway" and api.startswith("networking.istio.io/"):
        ctx.warn(("apiVersion",), "an Istio Gateway configures ingress/egress gateway proxies, "
                 "which this mesh does not run; it is stored but not used (a waypoint is a "
                 "gateway.networking.k8s.io Gateway)")
    return PolicyObject(meta=meta, policy_kind=kind, api_version=api, spec=freeze(spec))


# Policy kinds with a typed model; the others stay PolicyObject until an issue enforces them.
_TYPED_POLICIES = {"AuthorizationPolicy": authorization_policy, "PeerAuthentication": peer_authentication,
                   "HTTPRoute": http_route, "VirtualService": virtual_service,
                   "DestinationRule": destination_rule, "Telemetry": telemetry, "ConfigMap": config_map}


def _convert(ctx: Ctx, obj: Any) -> Resource | None:
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
    ctx.key = guess_key(obj) if name is not None else None
    if kind not in SUPPORTED_KINDS:
        ctx.fail(("kind",), f"unknown kind {json.dumps(kind)}; supported kinds: "
                 f"{', '.join(SUPPORTED_KINDS)}", "unknown_kind")
    accepted = POLICY_KINDS.get(kind, ("v1",))
    api = ctx.collect(lambda: get_str(ctx, obj, ("apiVersion",), required=True))
    if api is not None and api not in accepted:
        ctx.error(("apiVersion",), f"{json.dumps(api)} is not accepted for {kind}; use "
                  f"{' or '.join(accepted)}", "bad_api_version")
    # On bad metadata, still check the spec (against a stand-in) so all errors show at once.
    meta_obj = ctx.collect(lambda: object_meta(ctx, obj, kind, namespaced)) or ObjectMeta(name="")
    if kind in _TYPED_POLICIES:
        result: Resource | None = ctx.collect(lambda: _TYPED_POLICIES[kind](ctx, obj, meta_obj))
    elif kind in POLICY_KINDS:
        result = ctx.collect(lambda: _policy(ctx, obj, meta_obj, kind, api or ""))
    else:
        result = ctx.collect(lambda: BUILDERS[kind](ctx, obj, meta_obj))
    return None if ctx.errors else result


def convert_located(obj: Any, origin: Origin, lines: Mapping[Path, int] | None = None,
                    prefix: Path = ()) -> tuple[Loaded | None, list[ConfigError]]:
    """Convert one object whose fields' lines are known (`lines`, keyed by path from the
    document root; `prefix` is the object's own path, for List items). Never raises."""
    ctx = Ctx(origin, lines, prefix)
    try:
        resource = _convert(ctx, obj)
    except Invalid:
        resource = None
    if resource is None:
        return None, ctx.errors
    return Loaded(resource, origin, tuple(ctx.warnings)), []


def convert_batch(objs: Iterable[Mapping[str, Any] | tuple[Mapping[str, Any], Origin]]) -> list[Loaded]:
    """Convert every object (optionally paired with its Origin), or raise one ConfigErrors with
    the errors of all of them (nothing is returned half-converted)."""
    out: list[Loaded] = []
    errors: list[ConfigError] = []
    for item in objs:
        obj, origin = item if isinstance(item, tuple) else (item, _NO_FILE)
        loaded, errs = convert_located(obj, origin)
        errors.extend(errs)
        if loaded is not None:
            out.append(loaded)
    if errors:
        raise ConfigErrors(errors)
    return out


def convert(obj: Mapping[str, Any], *, origin: Origin | None = None) -> Resource:
    """Convert one Kubernetes-style object to the model, or raise ConfigErrors (all of them)."""
    [loaded] = convert_batch([(obj, origin or _NO_FILE)])
    return loaded.resource


def guess_key(obj: Any) -> ResourceKey | None:
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

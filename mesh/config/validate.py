"""Checks a whole batch against the current objects before anything is applied (pure)."""
from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Iterable, Mapping, Sequence

from ..model import Namespace, Node, Pod, Resource, ResourceKey, Service, ServiceAccount
from .convert import Loaded
from .errors import ConfigError, ConfigErrors, ConfigWarning, Origin

__all__ = ["IMPLICIT_NAMESPACES", "last_wins", "validate_batch", "validate_deletion"]

IMPLICIT_NAMESPACES: frozenset[str] = frozenset({"default", "istio-system"})
"""Namespaces that always exist (as in every Kubernetes cluster): objects may live in them
without a Namespace object, and they cannot be deleted."""

_NO_SOURCE = Origin("<batch>")  # for bare Resources given without their origin


def _error(origin: Origin, key: ResourceKey | None, field: str | None, message: str,
           reason: str) -> ConfigError:
    return ConfigError(message, reason=reason, source=origin.source, key=key, field=field,
                       document=origin.document, item=origin.item, line=origin.line)


def _listing(keys: Iterable[ResourceKey], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def last_wins(batch: Sequence[Loaded]) -> list[Loaded]:
    """One entry per object: when files or documents of one batch define the same object, the
    last definition is used, as `kubectl apply -f a.yaml -f b.yaml` ends up with. It keeps its
    position in the batch and a warning naming the definitions it supersedes."""
    last: dict[ResourceKey, int] = {}
    for i, item in enumerate(batch):
        last[item.resource.key] = i
    earlier: dict[ResourceKey, list[Origin]] = {}
    for i, item in enumerate(batch):
        if last[item.resource.key] != i:
            earlier.setdefault(item.resource.key, []).append(item.origin)
    out = []
    for i, item in enumerate(batch):
        key = item.resource.key
        if last[key] != i:
            continue
        if key in earlier:
            where = ", ".join(str(o) for o in earlier[key])
            item = replace(item, warnings=item.warnings + (ConfigWarning(
                message=f"also defined at {where}; this last definition is used", reason="superseded",
                key=key, origin=item.origin),))
        out.append(item)
    return out


def validate_batch(batch: Sequence[Resource | Loaded],
                   existing: Mapping[ResourceKey, Resource]) -> None:
    """Raise ConfigErrors listing every problem of applying `batch` over `existing`.

    Objects in the batch replace existing ones with the same key; an object defined twice in the
    batch counts once, as its last definition (see last_wins). Fields the system fills in
    when unset (Pod nodeName and podIP, Service clusterIP, Node podCIDR) are not a change when
    the update leaves them unset: the applier keeps the current value, as `kubectl apply` does.
    """
    items = last_wins([x if isinstance(x, Loaded) else Loaded(x, _NO_SOURCE) for x in batch])
    errors: list[ConfigError] = []
    first = {item.resource.key: item for item in items}
    final: dict[ResourceKey, Resource] = dict(existing)
    final.update((k, v.resource) for k, v in first.items())

    for item in first.values():
        errors.extend(_references(item, final))
        old = existing.get(item.resource.key)
        if old is not None:
            errors.extend(_immutable(item, old))
    errors.extend(_clashes(first, existing))
    if errors:
        raise ConfigErrors(errors)


def _references(item: Loaded, final: Mapping[ResourceKey, Resource]) -> list[ConfigError]:
    r, errors = item.resource, []
    if r.namespaced and r.namespace not in IMPLICIT_NAMESPACES \
            and ResourceKey(Namespace.kind, "", r.namespace) not in final:
        errors.append(_error(item.origin, r.key, "metadata.namespace",
                             f"namespace {json.dumps(r.namespace)} does not exist; add a "
                             "Namespace object to this batch or apply one first",
                             "unknown_reference"))
    if isinstance(r, Pod):
        sa = r.service_account
        if sa != "default" and ResourceKey(ServiceAccount.kind, r.namespace, sa) not in final:
            errors.append(_error(item.origin, r.key, "spec.serviceAccountName",
                                 f"service account {json.dumps(sa)} does not exist in namespace "
                                 f"{json.dumps(r.namespace)}; add a ServiceAccount object or use "
                                 '"default"', "unknown_reference"))
        if r.node_name is not None and ResourceKey(Node.kind, "", r.node_name) not in final:
            errors.append(_error(item.origin, r.key, "spec.nodeName",
                                 f"node {json.dumps(r.node_name)} does not exist; add a Node "
                                 "object or leave nodeName unset to let the runner choose",
                                 "unknown_reference"))
    return errors


def _clashes(batch: Mapping[ResourceKey, Loaded],
             existing: Mapping[ResourceKey, Resource]) -> list[ConfigError]:
    """Service clusterIPs and pod IPs must be unique; each clash is reported once, on the
    batch object that comes later (existing objects come first)."""
    errors: list[ConfigError] = []
    owners: dict[tuple[str, object], ResourceKey] = {}
    for key, r in existing.items():
        if key not in batch:
            ip = _pinned_ip(r)
            if ip is not None:
                owners.setdefault((r.kind, ip), key)
    for key, item in batch.items():
        ip = _pinned_ip(item.resource)
        if ip is None:
            continue
        other = owners.setdefault((item.resource.kind, ip), key)
        if other != key:
            field, what = (("spec.clusterIP", "clusterIP") if isinstance(item.resource, Service)
                           else ("status.podIP", "pod IP"))
            errors.append(_error(item.origin, key, field, f"{what} {ip} is already used by "
                                 f"{other}; pick another or leave it unset", "conflict"))
    return errors


def _pinned_ip(r: Resource) -> object | None:
    if isinstance(r, Service):
        return r.cluster_ip
    if isinstance(r, Pod):
        return r.pod_ip
    return None


_CONTAINER_FIELDS = (("name", "name"), ("command", "command"), ("args", "args"), ("env", "env"),
                     ("working_dir", "workingDir"))


def _immutable(item: Loaded, old: Resource) -> list[ConfigError]:
    new = item.resource
    changes: list[tuple[str | None, str]] = []  # (field, what changed)
    recreate = "delete and re-create the pod"
    if isinstance(new, Pod) and isinstance(old, Pod):
        if new.node_name is not None and new.node_name != old.node_name:
            changes.append(("spec.nodeName", f"{old.node_name} -> {new.node_name}"))
        if new.service_account != old.service_account:
            changes.append(("spec.serviceAccountName",
                            f"{old.service_account} -> {new.service_account}"))
        if len(new.containers) != len(old.containers):
            changes.append(("spec.containers", f"{len(old.containers)} containers -> "
                            f"{len(new.containers)}"))
        else:
            for i, (a, b) in enumerate(zip(old.containers, new.containers)):
                for attr, yaml_name in _CONTAINER_FIELDS:
                    if getattr(a, attr) != getattr(b, attr):
                        changes.append((f"spec.containers[{i}].{yaml_name}", "changed"))
        if new.pod_ip is not None and new.pod_ip != old.pod_ip:
            changes.append(("status.podIP", f"{old.pod_ip} -> {new.pod_ip}"))
        # source_dir is the containers' default working directory: moving the file changes
        # what would run, unless every container sets workingDir.
        if new.source_dir != old.source_dir and any(c.working_dir is None for c in new.containers):
            changes.append((None, f"the pod's files moved ({old.source_dir} -> "
                            f"{new.source_dir}), which changes its containers' working directory"))
    elif isinstance(new, Service) and isinstance(old, Service):
        recreate = "delete and re-create the service"
        if None not in (new.cluster_ip, old.cluster_ip) and new.cluster_ip != old.cluster_ip:
            changes.append(("spec.clusterIP", f"{old.cluster_ip} -> {new.cluster_ip}"))
    elif isinstance(new, Node) and isinstance(old, Node):
        recreate = "delete the node's pods, then delete and re-create the node"
        if None not in (new.pod_cidr, old.pod_cidr) and new.pod_cidr != old.pod_cidr:
            changes.append(("spec.podCIDR", f"{old.pod_cidr} -> {new.pod_cidr}"))
    return [_error(item.origin, new.key, field, f"cannot be changed ({what}); {recreate}"
                   if field else f"cannot be changed: {what}; {recreate}", "immutable_field")
            for field, what in changes]


def validate_deletion(keys: Sequence[ResourceKey], existing: Mapping[ResourceKey, Resource], *,
                      missing_ok: bool = False, source: str = "<delete>") -> None:
    """Raise ConfigErrors unless deleting `keys` (together) leaves nothing dangling.

    Deletion never cascades: a Node still running pods, or a Namespace still holding objects,
    is refused until those are deleted too (in the same call or before). The implicit
    namespaces cannot be deleted. Unknown keys are an error unless `missing_ok`.
    """
    gone = set(keys)
    origin = Origin(source)
    errors: list[ConfigError] = []
    for key in dict.fromkeys(keys):
        if key not in existing:
            if not missing_ok:
                errors.append(_error(origin, key, None, "does not exist", "not_found"))
            continue
        if key.kind == Namespace.kind:
            if key.name in IMPLICIT_NAMESPACES:
                errors.append(_error(origin, key, None, "this namespace always exists and "
                                     "cannot be deleted", "forbidden"))
                continue
            left = [k for k in existing if k.namespace == key.name and k not in gone]
            if left:
                errors.append(_error(origin, key, None, f"namespace still holds {len(left)} "
                                     f"object(s): {_listing(left)}; delete them first",
                                     "in_use"))
        elif key.kind == Node.kind:
            pods = [k for k, r in existing.items()
                    if isinstance(r, Pod) and r.node_name == key.name and k not in gone]
            if pods:
                errors.append(_error(origin, key, None, f"node still runs {len(pods)} pod(s): "
                                     f"{_listing(pods)}; delete them first", "in_use"))
    if errors:
        raise ConfigErrors(errors)
